"""The DeepRegistration Logic's scene functions with Slicer's real MRML (``slicer-core``), no mocks.

One real worker run (``python -m deepreglib register --method iterative``, weight-free) on a tiny
oblique synthetic pair made as MRML volume nodes; its outputs are loaded back into the scene and
checked against what the engine wrote.
"""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
ndimage = pytest.importorskip("scipy.ndimage")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepRegExtension"))

from DeepRegistrationLib import scene as dscene  # noqa: E402
from DeepRegistrationLib.process import WorkerProcess, register_command  # noqa: E402
from deepreglib.core import geometry  # noqa: E402
from deepreglib.io import images as dio  # noqa: E402
from deepreglib.core.geometry import Grid  # noqa: E402
from deepreglib.core.warp import sample_at  # noqa: E402

SHAPE = (12, 14, 16)  # (k, j, i); with the spacing, the iterative method works on 16^3
LAST_IJK = [SHAPE[2] - 1, SHAPE[1] - 1, SHAPE[0] - 1]
SPACING_IJK = (1.0, 1.1, 1.25)
ORIGIN_RAS = (12.0, -7.0, 3.0)
POINT_TOL_MM = 1e-3


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ijk_to_ras() -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = _rotation(0.2, -0.1, 0.3) @ np.diag(SPACING_IJK)
    m[:3, 3] = ORIGIN_RAS
    return m


def _blob(centre_kji, sigma=(2.0, 2.3, 2.6)) -> np.ndarray:
    k, j, i = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]].astype(np.float64)
    r2 = sum(((a - c) / s) ** 2 for a, c, s in zip((k, j, i), centre_kji, sigma))
    return (100.0 * np.exp(-0.5 * r2) + 5.0).astype(np.float32)


def _volume_node(scene, name, arr):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, _ijk_to_ras()[r, c])
    node.SetIJKToRASMatrix(m)
    slicer.util.updateVolumeFromArray(node, arr)
    node.CreateDefaultDisplayNodes()
    return node


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _snapshot(node):
    return (node.GetName(), slicer.util.arrayFromVolume(node).copy(), _matrix(node),
            node.GetParentTransformNode(), node.GetStorageNode())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Scene with fixed/moving nodes, the worker inputs written from them, one real run."""
    tmp = tmp_path_factory.mktemp("scene")
    scene = slicer.vtkMRMLScene()
    fixed = _volume_node(scene, "Fixed", _blob((6.0, 7.0, 8.0)))
    moving = _volume_node(scene, "Moving", _blob((7.0, 6.0, 9.5), sigma=(2.2, 2.5, 2.9)))
    before = {"fixed": _snapshot(fixed), "moving": _snapshot(moving)}
    inputs = dscene.write_worker_inputs(tmp / "inputs", fixed, moving)
    worker = WorkerProcess(register_command(inputs.files["fixed"], inputs.files["moving"],
                                            str(tmp / "out"), "iterative", python=sys.executable,
                                            device="cpu", flags=("no-qa",)))
    worker.start()
    assert worker.wait(timeout=240) == 0, worker.outcome().message
    events = worker.poll()
    outcome = worker.outcome()
    assert outcome.ok, outcome.message + "\n" + outcome.details
    results = dscene.load_results(outcome.manifest, fixed, moving)
    return dict(scene=scene, fixed=fixed, moving=moving, before=before, inputs=inputs,
                manifest=dscene.read_manifest(outcome.manifest), results=results, tmp=tmp,
                events=events)


def _voxel_centres_ras(node, idx_ijk: np.ndarray) -> np.ndarray:
    h = np.c_[idx_ijk, np.ones(len(idx_ijk))]
    return (h @ _matrix(node).T)[:, :3]


# -- inputs --------------------------------------------------------------------------------------
def test_volume_node_written_in_lps_with_its_geometry(run, tmp_path):
    img = sitk.ReadImage(run["inputs"].files["moving"])
    grid = Grid.from_sitk(img)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), slicer.util.arrayFromVolume(run["moving"]))
    ijk = np.array([[0, 0, 0], LAST_IJK, [5, 7, 9]], dtype=float)
    expected_lps = geometry.ras_to_lps(_voxel_centres_ras(run["moving"], ijk))
    np.testing.assert_allclose(grid.index_to_physical(ijk[:, ::-1]), expected_lps, atol=1e-5)


def test_linear_parent_transform_is_folded_into_written_geometry(run, tmp_path):
    scene = run["scene"]
    node = _volume_node(scene, "Shifted", _blob((5.0, 5.0, 5.0)))
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    to_parent = np.eye(4)
    to_parent[:3, 3] = (4.0, -2.0, 7.5)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, to_parent[r, c])
    parent.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(parent.GetID())
    grid = Grid.from_sitk(sitk.ReadImage(dscene.write_volume(node, tmp_path / "s.nrrd")))
    world = _voxel_centres_ras(node, np.zeros((1, 3))) + to_parent[:3, 3]
    np.testing.assert_allclose(grid.index_to_physical(np.zeros((1, 3))), geometry.ras_to_lps(world), atol=1e-6)
    grid_node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "nonlinear")
    node.SetAndObserveTransformNodeID(grid_node.GetID())
    with pytest.raises(ValueError, match="harden"):
        dscene.write_volume(node, tmp_path / "t.nrrd")
    for n in (node, parent, grid_node):
        scene.RemoveNode(n)


def test_points_written_in_lps(run, tmp_path):
    node = run["scene"].AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "L")
    node.AddControlPoint(vtk.vtkVector3d(10.0, -20.0, 30.0), "a")
    node.AddControlPoint(vtk.vtkVector3d(-1.5, 2.5, -3.5), "b")
    names, pts = dio.read_landmarks(dscene.write_points(node, tmp_path / "L.mrk.json"))
    assert names == ["a", "b"]
    np.testing.assert_allclose(pts, [[-10.0, 20.0, 30.0], [1.5, -2.5, -3.5]], atol=1e-9)
    run["scene"].RemoveNode(node)


# -- worker outputs -> nodes ---------------------------------------------------------------------
def test_worker_progress_reached_the_end(run):
    fractions = [e["fraction"] for e in run["events"] if e["event"] == "progress"]
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)


def test_expected_output_nodes(run):
    nodes = run["results"].nodes
    assert {"warped", "transform", "inverse_transform", "jacobian"} <= set(nodes)
    assert nodes["warped"].IsA("vtkMRMLScalarVolumeNode")
    assert nodes["transform"].IsA("vtkMRMLGridTransformNode")
    assert nodes["transform"].GetTransformFromParent().GetClassName() == "vtkOrientedGridTransform"
    assert nodes["warped"].GetName() == "Moving to Fixed (iterative) warped"
    for n in nodes.values():
        assert n.GetStorageNode() is None  # the temporary files are not referenced


def _engine_targets_ras(manifest, fixed_node, ijk):
    """Where the engine's own field sends fixed voxel centres (RAS), by its own sampler."""
    path = next(Path(manifest["_folder"]) / o["path"] for o in manifest["outputs"] if o["name"] == "transform")
    u, grid = dio.read_displacement_field(path)
    u_mm = geometry.displacement_voxel_to_mm(u.double(), grid)
    kji = np.ascontiguousarray(ijk[:, ::-1])
    pts = torch.as_tensor(kji, dtype=torch.float64).T.reshape(1, 3, -1, 1, 1)
    disp = sample_at(u_mm, pts, padding="border")[0, :, :, 0, 0].T.numpy()
    return geometry.lps_to_ras(grid.index_to_physical(kji) + disp), u_mm


def test_grid_transform_moves_points_where_engine_says(run):
    node = run["results"].nodes["transform"]
    ijk = np.array([[0, 0, 0], LAST_IJK, [9, 8, 7], [4, 13, 8], [15, 3, 10]], dtype=float)
    start = _voxel_centres_ras(run["fixed"], ijk)
    expected, u_mm = _engine_targets_ras(run["manifest"], run["fixed"], ijk)
    got = np.array([node.GetTransformFromParent().TransformPoint(p.tolist()) for p in start])
    np.testing.assert_allclose(got, expected, atol=POINT_TOL_MM, rtol=0)
    assert float(u_mm.norm(dim=1).max()) > 0.5  # the run moved something: the check means something


def _sample_volume(node, ras_points, order=1):
    idx_ijk = (np.c_[ras_points, np.ones(len(ras_points))] @ np.linalg.inv(_matrix(node)).T)[:, :3]
    arr = slicer.util.arrayFromVolume(node).astype(np.float64)
    return ndimage.map_coordinates(arr, idx_ijk[:, ::-1].T, order=order, mode="nearest"), idx_ijk


def test_moving_resampled_through_node_matches_warped_volume(run):
    fixed, moving = run["fixed"], run["moving"]
    node = run["results"].nodes["transform"]
    node.GetTransformFromParent().SetInterpolationModeToLinear()  # the engine interpolates linearly
    k, j, i = np.mgrid[1:SHAPE[0] - 1:2, 1:SHAPE[1] - 1:2, 1:SHAPE[2] - 1:2]
    ijk = np.c_[i.ravel(), j.ravel(), k.ravel()].astype(float)
    fixed_ras = _voxel_centres_ras(fixed, ijk)
    mapped = np.array([node.GetTransformFromParent().TransformPoint(p.tolist()) for p in fixed_ras])
    values, idx = _sample_volume(moving, mapped)
    inside = np.all((idx >= 0) & (idx <= np.array(SHAPE[::-1]) - 1), axis=1)
    assert inside.mean() > 0.7
    warped_node = run["results"].nodes["warped"]
    np.testing.assert_allclose(_matrix(warped_node), _matrix(fixed), atol=1e-5)  # on the fixed grid
    warped, _ = _sample_volume(warped_node, fixed_ras)  # at voxel centres: the voxel values
    np.testing.assert_allclose(values[inside], warped[inside], atol=1e-3 * 100, rtol=0)  # 0.1% of the peak
    # and the warped volume is not simply the moving one
    assert np.abs(slicer.util.arrayFromVolume(warped_node)
                  - slicer.util.arrayFromVolume(moving)).max() > 5.0

    # Slicer's own resampling (hardening the transform on a copy of the moving volume) agrees
    # within the extra interpolation of resampling twice
    copy = run["scene"].AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving copy")
    copy.Copy(moving)
    copy.SetName("moving copy")
    image = vtk.vtkImageData()
    image.DeepCopy(moving.GetImageData())
    copy.SetAndObserveImageData(image)
    copy.SetAndObserveTransformNodeID(node.GetID())
    logic = slicer.vtkSlicerTransformLogic()
    assert logic.hardenTransform(copy)
    hardened, _ = _sample_volume(copy, fixed_ras)
    np.testing.assert_allclose(hardened[inside], warped[inside], atol=5.0, rtol=0)  # 5% of the peak
    run["scene"].RemoveNode(copy)


def test_jacobian_node_colour_table_and_window(run):
    node = run["results"].nodes["jacobian"]
    display = node.GetDisplayNode()
    color = display.GetColorNode()
    assert color.GetName() == dscene.JACOBIAN_COLOR_NODE_NAME
    assert display.GetAutoWindowLevel() == 0
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(dscene.JACOBIAN_WINDOW)
    lo, hi = dscene.JACOBIAN_WINDOW
    assert (lo + hi) / 2 == pytest.approx(1.0)  # centred on "no volume change"
    rgba = [0.0] * 4
    color.GetColor(0, rgba)
    assert rgba[:3] == pytest.approx(dscene.FOLDING_RGB, abs=1 / 255)  # det <= 0 in its own colour
    middle = [0.0] * 4
    color.GetColor(color.GetNumberOfColors() // 2, middle)
    assert min(middle[:3]) > 0.95  # det = 1 is (almost) white
    jac = slicer.util.arrayFromVolume(node)
    assert float(jac.min()) == pytest.approx(run["manifest"]["metrics"]["jacobian_min"], rel=1e-5)
    assert jac.shape == SHAPE
    # one colour table per scene, reused by later runs
    assert dscene.jacobian_color_node(run["scene"]) is color


def test_references_and_provenance_on_every_output(run):
    fixed, moving = run["fixed"], run["moving"]
    for name, node in run["results"].nodes.items():
        assert node.GetAttribute("DeepReg.Method") == "iterative", name
        assert node.GetAttribute("DeepReg.Device") == "cpu", name
        assert node.GetAttribute("DeepReg.WeightsSHA256").startswith("none"), name
        assert '"refine": 0' in node.GetAttribute("DeepReg.Parameters"), name
        assert node.GetAttribute("DeepReg.Time") == run["manifest"]["created"], name
        want_fixed, want_moving = (moving, fixed) if name == "inverse_transform" else (fixed, moving)
        assert node.GetNodeReferenceID(dscene.FIXED_REFERENCE_ROLE) == want_fixed.GetID(), name
        assert node.GetNodeReferenceID(dscene.MOVING_REFERENCE_ROLE) == want_moving.GetID(), name


def test_inputs_untouched(run):
    for key in ("fixed", "moving"):
        name, arr, m, parent, storage = run["before"][key]
        node = run[key]
        assert node.GetName() == name
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), arr)
        np.testing.assert_array_equal(_matrix(node), m)
        assert node.GetParentTransformNode() is parent  # warped volume made: nothing applied
        assert node.GetStorageNode() is storage
        assert run["scene"].IsNodePresent(node)


def test_second_load_adds_nodes_unless_same_output_node(run):
    first = run["results"].nodes
    first_warped = slicer.util.arrayFromVolume(first["warped"]).copy()
    n_volumes = run["scene"].GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    manifest = str(Path(run["manifest"]["_folder"]) / "manifest.json")
    second = dscene.load_results(manifest, run["fixed"], run["moving"],
                                 dscene.OutputChoices(create_inverse=False, create_jacobian=False))
    assert second.nodes["warped"] is not first["warped"]
    assert second.nodes["warped"].GetName() != first["warped"].GetName()
    assert second.nodes["transform"] is not first["transform"]
    assert run["scene"].GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == n_volumes + 1
    # the same output node chosen: overwritten in place, nothing new
    slicer.util.arrayFromVolume(first["warped"])[:] = 0
    third = dscene.load_results(manifest, run["fixed"], run["moving"],
                                dscene.OutputChoices(warped_volume=first["warped"], transform=first["transform"],
                                                     create_inverse=False, create_jacobian=False))
    assert third.nodes["warped"] is first["warped"] and third.nodes["transform"] is first["transform"]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(first["warped"]), first_warped)
    assert run["scene"].GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == n_volumes + 1


def test_without_warped_volume_the_moving_volume_is_placed_under_the_transform(run):
    moving = run["moving"]
    manifest = str(Path(run["manifest"]["_folder"]) / "manifest.json")
    try:
        res = dscene.load_results(manifest, run["fixed"], moving,
                                  dscene.OutputChoices(create_warped=False, create_inverse=False,
                                                       create_jacobian=False))
        assert "warped" not in res.nodes
        assert moving.GetParentTransformNode() is res.nodes["transform"]
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(moving), run["before"]["moving"][1])
    finally:
        moving.SetAndObserveTransformNodeID(None)


def _manifest_path(run):
    return str(Path(run["manifest"]["_folder"]) / "manifest.json")


def test_second_run_after_placing_the_moving_volume_registers_the_original(run, tmp_path):
    """Run 1 without a warped volume puts the moving volume under its transform; the inputs of
    run 2 are then the original moving volume (not the one shown registered), and run 2's
    result replaces run 1's as its parent; run 1's transform stays in the scene."""
    fixed, moving = run["fixed"], run["moving"]
    only_transform = dscene.OutputChoices(create_warped=False, create_inverse=False, create_jacobian=False)
    try:
        first = dscene.load_results(_manifest_path(run), fixed, moving, only_transform)
        assert first.moving_placed_under is first.nodes["transform"]
        assert dscene.placed_by_registration(moving)
        inputs = dscene.write_worker_inputs(tmp_path / "again", fixed, moving)
        again = sitk.ReadImage(inputs.files["moving"])
        original = sitk.ReadImage(run["inputs"].files["moving"])
        np.testing.assert_allclose(again.GetOrigin(), original.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(again.GetDirection(), original.GetDirection(), atol=1e-9)
        assert inputs.messages and "original moving volume" in inputs.messages[0]
        second = dscene.load_results(_manifest_path(run), fixed, moving, only_transform)
        assert moving.GetParentTransformNode() is second.nodes["transform"]
        assert run["scene"].IsNodePresent(first.nodes["transform"])
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(moving), run["before"]["moving"][1])
    finally:
        moving.SetAndObserveTransformNodeID(None)


def test_moving_volume_under_someone_elses_transform_is_left_there(run):
    fixed, moving, scene = run["fixed"], run["moving"], run["scene"]
    theirs = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "user's transform")
    moving.SetAndObserveTransformNodeID(theirs.GetID())
    try:
        res = dscene.load_results(_manifest_path(run), fixed, moving,
                                  dscene.OutputChoices(create_warped=False, create_inverse=False,
                                                       create_jacobian=False))
        assert moving.GetParentTransformNode() is theirs
        assert res.moving_placed_under is None
        assert "warped" in res.nodes  # shown instead, so the result is still visible at once
        assert any("user's transform" in m for m in res.messages)
        assert not dscene.placed_by_registration(moving)
    finally:
        moving.SetAndObserveTransformNodeID(None)
        scene.RemoveNode(theirs)


def test_an_input_is_never_an_output_node(run):
    fixed, moving, scene = run["fixed"], run["moving"], run["scene"]
    for node in (fixed, moving):
        with pytest.raises(ValueError, match="inputs are never overwritten"):
            dscene.load_results(_manifest_path(run), fixed, moving, dscene.OutputChoices(warped_volume=node))
    initial = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "initial")
    try:
        with pytest.raises(ValueError, match="one of the inputs"):
            dscene.check_output_nodes(fixed, moving, transform=initial, other_inputs=(initial,))
        fixed.SetAndObserveTransformNodeID(initial.GetID())
        with pytest.raises(ValueError, match="is under the output transform"):
            dscene.check_output_nodes(fixed, moving, transform=initial)
    finally:
        fixed.SetAndObserveTransformNodeID(None)
        scene.RemoveNode(initial)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(moving), run["before"]["moving"][1])


def _labelmap_on(scene, like, arr, name):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    node.SetIJKToRASMatrix(_vtk4(_matrix(like)))
    slicer.util.updateVolumeFromArray(node, arr)
    return node


def _vtk4(a):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def test_segmentation_written_as_labels_on_its_volumes_grid(run, tmp_path):
    scene, moving = run["scene"], run["moving"]
    labels = np.zeros(SHAPE, np.int16)
    labels[3:8, 4:10, 5:12] = 1
    labels[9:11, 2:5, 2:6] = 2
    source = _labelmap_on(scene, moving, labels, "source labels")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    assert logic.ImportLabelmapToSegmentationNode(source, seg)
    n_nodes = scene.GetNumberOfNodes()
    try:
        inputs = dscene.write_worker_inputs(tmp_path / "in", run["fixed"], moving, moving_mask=seg,
                                            moving_labels=source)
        written = sitk.ReadImage(inputs.files["moving_mask"])
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels)  # label = segment index + 1
        reference = sitk.ReadImage(run["inputs"].files["moving"])
        np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-9)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(inputs.files["moving_labels"])), labels)
        assert inputs.options()["moving-mask"] == inputs.files["moving_mask"]
        assert scene.GetNumberOfNodes() == n_nodes  # the temporary label map is gone
        empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
        with pytest.raises(ValueError, match="no segments"):
            dscene.write_segmentation_as_labels(empty, moving, tmp_path / "e.nrrd")
        scene.RemoveNode(empty)
    finally:
        logic.SetMRMLScene(None)
        for node in (seg, source):
            scene.RemoveNode(node)


def test_initial_transform_written_as_the_fixed_to_moving_lps_matrix(run, tmp_path):
    scene = run["scene"]
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "initial")
    from_parent = np.eye(4)
    from_parent[:3, :3] = _rotation(0.1, 0.2, -0.3)
    from_parent[:3, 3] = (3.0, -4.0, 5.0)
    node.SetMatrixTransformFromParent(_vtk4(from_parent))
    try:
        inputs = dscene.write_worker_inputs(tmp_path / "in", run["fixed"], run["moving"], initial_transform=node)
        lps = dio.read_linear_transform(inputs.files["initial_transform"])
        p_ras = np.array([10.0, -20.0, 30.0])
        expected_ras = from_parent[:3, :3] @ p_ras + from_parent[:3, 3]  # fixed point -> moving point
        got_lps = lps[:3, :3] @ geometry.ras_to_lps(p_ras[None])[0] + lps[:3, 3]
        np.testing.assert_allclose(geometry.lps_to_ras(got_lps[None])[0], expected_ras, atol=1e-9)
        assert inputs.options()["initial-transform"] == inputs.files["initial_transform"]
        grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "not linear")
        with pytest.raises(ValueError, match="must be linear"):
            dscene.write_linear_transform_node(grid, tmp_path / "g.tfm")
        scene.RemoveNode(grid)
    finally:
        scene.RemoveNode(node)


def test_grid_transform_lives_on_the_fixed_grid(run):
    """The displacement grid's points are the fixed volume's voxel centres (RAS): the transform
    is defined exactly where the fixed image is, as FromParent (fixed -> moving)."""
    node = run["results"].nodes["transform"]
    grid_transform = node.GetTransformFromParent()
    image = grid_transform.GetDisplacementGrid()
    assert image.GetDimensions() == tuple(reversed(SHAPE))
    direction = vtk_to_np3(grid_transform.GetGridDirectionMatrix())
    grid_to_ras = np.eye(4)
    grid_to_ras[:3, :3] = direction @ np.diag(image.GetSpacing())
    grid_to_ras[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(grid_to_ras, _matrix(run["fixed"]), atol=1e-5)
    assert node.GetTransformToParent() is not None  # Slicer can invert it (shows the moving volume)


def vtk_to_np3(m):
    return np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])


def test_an_unreadable_output_leaves_no_half_loaded_result(run, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(run["manifest"]["_folder"], folder)
    (folder / "jacobian.mha").write_bytes(b"not an image")
    scene = run["scene"]
    n_nodes = scene.GetNumberOfNodes()
    chosen = run["results"].nodes["warped"]  # a chosen output node stays (it was there before)
    with pytest.raises(ValueError, match="could not read"):
        dscene.load_results(folder / "manifest.json", run["fixed"], run["moving"],
                            dscene.OutputChoices(warped_volume=chosen))
    assert scene.GetNumberOfNodes() == n_nodes and scene.IsNodePresent(chosen)
    assert run["moving"].GetParentTransformNode() is None
    assert not (folder / "_slicer").exists()


def test_query_point_goes_to_the_worker_in_lps(run):
    """The GUI's query point (a point list) becomes ``--method-option query_point=[x,y,z]`` in
    LPS; a method without that option says so, in words."""
    import DeepRegistration
    scene = run["scene"]
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "query")
    points.AddControlPoint(vtk.vtkVector3d(10.0, -20.0, 30.0), "q")
    try:
        assert dscene.query_point_lps(points) == [-10.0, 20.0, 30.0]
        r = DeepRegistration.DeepRegistrationLogic().start(
            run["fixed"], run["moving"], method="iterative", device="cpu", queryPoint=points,
            methodOptions="seed=3", python=sys.executable)
        assert "query_point=[-10.0, 20.0, 30.0]" in r.worker.args and "seed=3" in r.worker.args
        assert r.worker.wait(120) == 2
        assert r.finish() is None and r.outcome.status == "bad_input"
        assert "options are" in r.outcome.message
        points.RemoveAllControlPoints()
        with pytest.raises(ValueError, match="no placed point"):
            dscene.query_point_lps(points)
    finally:
        scene.RemoveNode(points)
