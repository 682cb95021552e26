"""Every output the engine's methods write becomes the right MRML node (``slicer-core``, no mocks).

One real pipeline run per method (``carnet``, ``amdf``, ``r2n2``, ``dnet``, ``same``) with a tiny
model saved like a trained one (random or pinned weights: the loader does not care how good the
answer is, only that it shows what the engine wrote), on MRML volumes with oblique geometry; the
manifests are then loaded by :func:`DeepRegistrationLib.scene.load_results` and the nodes checked
against the files: overlays on the fixed grid with the file's voxels, point lists at the file's
points (LPS -> RAS), transforms that move points where the engine says, a play-back sequence
with every frame, provenance and references everywhere.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepRegExtension"))

from DeepRegistrationLib import scene as dscene  # noqa: E402
from deepreglib.core import geometry  # noqa: E402
from deepreglib.io import images as dio  # noqa: E402
from deepreglib.methods import registry  # noqa: E402
from deepreglib.core.geometry import Grid  # noqa: E402
from deepreglib.methods.weights import save_model  # noqa: E402
from deepreglib.run.pipeline import RegisterOptions, register  # noqa: E402
from deepreglib.core.warp import sample_at  # noqa: E402
from helpers import rotation  # noqa: E402

SHAPE = (14, 16, 18)  # (k, j, i)
POINT_TOL_MM = 1e-3
DNET_ANGLE = 0.3  # radians about the network's first axis: a pose that is clearly not the identity


def _tiny_models():
    """name -> (kind, implementation, model factory, method options)."""
    from deepreglib.methods.amdf.network import AMDF
    from deepreglib.methods.carnet.network import CarNet
    from deepreglib.methods.dnet.network import DNet, rotation_to_sixd
    from deepreglib.methods.r2n2.network import R2N2
    from deepreglib.methods.same.network_voxelmorph import SAMVoxelMorph

    def dnet():
        net = DNet(input_size=16, channels=(1, 4, 8, 8, 8, 8, 8), decoder=(8, 8, 8, 8), hidden=16, pool=2)
        with torch.no_grad():  # zero last layer: the same pose for any input
            net.fc2.weight.zero_()
            c, s = np.cos(DNET_ANGLE), np.sin(DNET_ANGLE)
            r = torch.tensor([[1.0, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float32)
            net.fc2.bias.copy_(torch.cat([rotation_to_sixd(r), torch.tensor([0.1, -0.05, 0.0])]))
        return net.eval()

    def carnet():
        net = CarNet(features=(4, 8), key_channels=4, value_channels=6, unet_encoder=(8, 8, 8),
                     unet_decoder=(8, 8, 8, 8))
        with torch.no_grad():  # a visible, smooth velocity (an untrained head is the identity)
            net.mean_head.bias.copy_(torch.tensor([0.6, -0.4, 0.5]))
            net.mean_head.weight.normal_(0.0, 0.05)
        return net

    def r2n2():
        net = R2N2(channels=(4, 4, 4), res_blocks=1, pooled=4, steps=3)
        with torch.no_grad():  # visible local deformations
            net.parameter_net.fc.weight[9:].normal_(0.0, 1.0)
        return net

    return {
        "carnet": ("deformable", "deepreglib.methods.carnet.method:CarNetMethod", carnet, {"uncertainty_samples": 2}),
        "amdf": ("deformable", "deepreglib.methods.amdf.method:AmdfMethod",
                 lambda: AMDF(encoder=(4, 8, 8, 8), decoder=(8, 8, 8, 4), seg_channels=(4, 8), dfsa_hidden=4), {}),
        "r2n2": ("deformable", "deepreglib.methods.r2n2.method:R2N2Method", r2n2, {"stop_threshold": 0}),
        "dnet": ("rigid", "deepreglib.methods.dnet.method:DNetMethod", dnet, {}),
        "same": ("deformable", "deepreglib.methods.same.method:SAMEMethod",
                 lambda: SAMVoxelMorph(sam=dict(encoder=(4, 8, 8, 8, 8), global_channels=8, local_channels=8),
                                       encoder=(8, 8, 8, 8), decoder=(8, 8, 8, 8, 8, 8)), {"threshold": -1.0}),
    }


METHODS = sorted(_tiny_models())
WITH_MAPS = [m for m in METHODS if m != "r2n2"]  # R2N2 explains itself with points and a play-back


def _ijk_to_ras() -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation(0.15, -0.1, 0.25) @ np.diag((1.6, 1.8, 2.0))
    m[:3, 3] = (-14.0, 10.0, 3.0)
    return m


def _vtk4(a: np.ndarray):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def _np4(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _blob(centre_kji) -> np.ndarray:
    k, j, i = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]].astype(np.float64)
    r2 = sum(((a - c) / s) ** 2 for a, c, s in zip((k, j, i), centre_kji, (2.5, 3.0, 3.5)))
    return (100.0 * np.exp(-0.5 * r2) + 5.0).astype(np.float32)


def _volume(scene, name, arr):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_vtk4(_ijk_to_ras()))
    slicer.util.updateVolumeFromArray(node, arr)
    node.CreateDefaultDisplayNodes()
    return node


def _ijk_to_ras_of(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _np4(m)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A scene with Fixed/Moving, one pipeline run per method, each manifest loaded."""
    tmp = tmp_path_factory.mktemp("methods")
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()  # the application's built-in colour tables
    colors.SetMRMLScene(scene)
    fixed = _volume(scene, "Fixed", _blob((7.0, 8.0, 9.0)))
    moving = _volume(scene, "Moving", _blob((7.5, 7.0, 10.0)))
    before = {n.GetName(): slicer.util.arrayFromVolume(n).copy() for n in (fixed, moving)}
    inputs = dscene.write_worker_inputs(tmp / "inputs", fixed, moving)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, (kind, implementation, make, options) in _tiny_models().items():
            torch.manual_seed(0)
            method = f"{name}_tiny"
            mp.setitem(registry.METHODS, method, registry.MethodInfo(
                name=method, title=name, description="test", kind=kind, weights=None,
                implementation=implementation, supports_refine=kind == "deformable"))
            weights = save_model(make(), tmp / name)
            manifest_path = register(RegisterOptions(
                fixed=inputs.files["fixed"], moving=inputs.files["moving"], out=str(tmp / f"out_{name}"),
                method=method, device="cpu", weights=str(weights), method_options=options, qa=False,
                init="none"))  # tiny untrained networks: the test is about the outputs, not a pose
            results = dscene.load_results(manifest_path, fixed, moving)
            out[name] = dict(manifest=dscene.read_manifest(manifest_path), results=results,
                             manifest_path=str(manifest_path))
    yield dict(scene=scene, fixed=fixed, moving=moving, before=before, runs=out, tmp=tmp, colors=colors)
    colors.SetMRMLScene(None)


def _entries(run, kind=None):
    return [o for o in run["manifest"]["outputs"] if kind is None or o["kind"] == kind]


def _file(run, entry) -> Path:
    return Path(run["manifest"]["_folder"]) / entry["path"]


# -- every output kind has a node ---------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_every_manifest_output_becomes_a_node(runs, method):
    run = runs["runs"][method]
    kinds = {o["kind"] for o in _entries(run)}
    assert kinds <= set(dscene.OUTPUT_KINDS), f"kinds without a node type: {kinds - set(dscene.OUTPUT_KINDS)}"
    expected = {o["name"] for o in _entries(run)} - {"qa", "initial_transform"}
    assert set(run["results"].nodes) == expected
    assert not [m for m in run["results"].messages if "does not show" in m]


def test_the_five_methods_write_what_the_module_shows(runs):
    """What each method adds besides warped volume, transform and Jacobian (DESIGN.md table)."""
    def names(method, kind):
        return {o["name"] for o in _entries(runs["runs"][method], kind)}
    assert {"attention_fixed", "attention_moving", "uncertainty_mm"} <= names("carnet", "volume")
    assert {"roi_mask_fixed", "roi_mask_moving", "fusion_weight_s1", "field_s1_mm"} <= names("amdf", "volume")
    assert names("r2n2", "markups") == {"r2n2_deformations"} and names("r2n2", "volume_sequence") == {"r2n2_steps"}
    assert names("dnet", "linear_transform") == {"transform"} and "mutual_attention" in names("dnet", "volume")
    assert {"same_affine_fixed_points", "same_affine_moving_points"} <= names("same", "markups")
    assert "same_coarse_displacement" in names("same", "displacement_field")
    assert "embedding_similarity" in names("same", "volume")
    for method in METHODS:
        transform = runs["runs"][method]["results"].nodes["transform"]
        cls = "vtkMRMLLinearTransformNode" if method == "dnet" else "vtkMRMLGridTransformNode"
        assert transform.IsA(cls), method


# -- method maps: overlays ------------------------------------------------------------------------
@pytest.mark.parametrize("method", WITH_MAPS)
def test_method_maps_are_overlays_on_the_fixed_grid_with_the_files_voxels(runs, method):
    run = runs["runs"][method]
    maps = [o for o in _entries(run, "volume") if o["name"] != "warped"]
    assert maps
    overlays = run["results"].overlays
    for entry in maps:
        node = run["results"].nodes[entry["name"]]
        assert node in overlays
        assert node.GetAttribute(dscene.OVERLAY_ATTRIBUTE) == "true"
        assert node.GetDisplayNode().GetColorNodeID() == dscene.OVERLAY_COLOR_NODE_ID
        assert node.GetDisplayNode().GetColorNode() is not None  # a built-in table of every scene
        np.testing.assert_allclose(_ijk_to_ras_of(node), _ijk_to_ras_of(runs["fixed"]), atol=1e-4)
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(_file(run, entry))))
        np.testing.assert_allclose(slicer.util.arrayFromVolume(node), expected, rtol=0, atol=1e-6)
        assert node.GetAttribute("DeepReg.Description") == entry["description"]
    warped = run["results"].nodes["warped"]
    assert warped not in overlays and warped.GetAttribute(dscene.OVERLAY_ATTRIBUTE) is None


def test_amdf_masks_and_fusion_weights_keep_their_range(runs):
    nodes = runs["runs"]["amdf"]["results"].nodes
    for name in ("roi_mask_fixed", "roi_mask_moving", "fusion_weight_s1", "fusion_weight_s2", "fusion_weight_s4"):
        arr = slicer.util.arrayFromVolume(nodes[name])
        assert float(arr.min()) >= -1e-6 and float(arr.max()) <= 1.0 + 1e-6, name
    for name in ("field_s1_mm", "field_s8_mm"):
        assert float(slicer.util.arrayFromVolume(nodes[name]).min()) >= 0.0  # lengths in mm


# -- transforms ---------------------------------------------------------------------------------
def test_dnet_linear_transform_maps_points_like_the_engine_matrix(runs):
    run = runs["runs"]["dnet"]
    node = run["results"].nodes["transform"]
    entry = next(o for o in _entries(run) if o["name"] == "transform")
    lps = dio.read_linear_transform(str(_file(run, entry)))
    np.testing.assert_allclose(lps, np.asarray(run["manifest"]["matrix_lps"]), atol=1e-6)
    angle = np.degrees(np.arccos(np.clip((np.trace(lps[:3, :3]) - 1) / 2, -1, 1)))
    assert angle == pytest.approx(np.degrees(DNET_ANGLE), abs=0.5)  # the pinned pose, not the identity
    pts_ras = (np.c_[np.array([[0, 0, 0], [17, 15, 13], [9, 3, 11]], float), np.ones(3)] @ _ijk_to_ras().T)[:, :3]
    expected = geometry.lps_to_ras(geometry.ras_to_lps(pts_ras) @ lps[:3, :3].T + lps[:3, 3])
    got = np.array([node.GetTransformFromParent().TransformPoint(p.tolist()) for p in pts_ras])
    np.testing.assert_allclose(got, expected, atol=POINT_TOL_MM)
    assert node.IsTransformToWorldLinear()


def _engine_field_targets_ras(path, points_ras):
    u, grid = dio.read_displacement_field(str(path))
    u_mm = geometry.displacement_voxel_to_mm(u.double(), grid)
    kji = grid.physical_to_index(geometry.ras_to_lps(points_ras))
    pts = torch.as_tensor(np.ascontiguousarray(kji), dtype=torch.float64).T.reshape(1, 3, -1, 1, 1)
    disp = sample_at(u_mm, pts, padding="border")[0, :, :, 0, 0].T.numpy()
    return geometry.lps_to_ras(geometry.ras_to_lps(points_ras) + disp), grid


def test_same_coarse_field_is_a_grid_transform_moving_points_like_the_engine(runs):
    run = runs["runs"]["same"]
    entry = next(o for o in _entries(run) if o["name"] == "same_coarse_displacement")
    node = run["results"].nodes["same_coarse_displacement"]
    assert node.IsA("vtkMRMLGridTransformNode")
    grid = Grid.from_sitk(sitk.ReadImage(str(_file(run, entry))))
    inner = np.array([[3.0, 4.0, 5.0], [8.0, 6.0, 9.0], [5.5, 9.5, 4.5]])  # (k, j, i) inside its grid
    inner = inner * (np.asarray(grid.shape) - 1) / np.asarray(grid.shape).max()
    points_ras = geometry.lps_to_ras(grid.index_to_physical(inner))
    expected, _ = _engine_field_targets_ras(_file(run, entry), points_ras)
    got = np.array([node.GetTransformFromParent().TransformPoint(p.tolist()) for p in points_ras])
    np.testing.assert_allclose(got, expected, atol=POINT_TOL_MM)
    assert float(np.linalg.norm(expected - points_ras, axis=1).max()) > 0.5  # it moves points
    assert node.GetNodeReferenceID(dscene.FIXED_REFERENCE_ROLE) == runs["fixed"].GetID()


def test_carnet_inverse_has_swapped_roles_and_undoes_the_forward_transform(runs):
    nodes = runs["runs"]["carnet"]["results"].nodes
    forward, inverse = nodes["transform"], nodes["inverse_transform"]
    fixed, moving = runs["fixed"], runs["moving"]
    assert inverse.GetNodeReferenceID(dscene.FIXED_REFERENCE_ROLE) == moving.GetID()
    assert inverse.GetNodeReferenceID(dscene.MOVING_REFERENCE_ROLE) == fixed.GetID()
    k, j, i = np.mgrid[4:10:2, 4:12:3, 5:13:3]
    pts = (np.c_[i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)] @ _ijk_to_ras().T)[:, :3]
    there = [forward.GetTransformFromParent().TransformPoint(p.tolist()) for p in pts]
    back = np.array([inverse.GetTransformFromParent().TransformPoint(q) for q in there])
    moved = np.linalg.norm(np.array(there) - pts, axis=1)
    assert float(moved.min()) > 0.5  # the forward transform moves every point: the check means something
    assert float(np.linalg.norm(back - pts, axis=1).max()) < 0.1 * float(moved.min())


# -- point lists ----------------------------------------------------------------------------------
def _json_points(path):
    data = json.loads(Path(path).read_text())["markups"][0]
    assert data["coordinateSystem"] == "LPS"
    return data["controlPoints"]


def _positions_ras(node):
    out = []
    for i in range(node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(i, p)
        out.append(p)
    return np.array(out)


def test_r2n2_local_deformations_are_a_locked_point_list_at_the_engines_centres(runs):
    run = runs["runs"]["r2n2"]
    entry = next(o for o in _entries(run) if o["name"] == "r2n2_deformations")
    node = run["results"].nodes["r2n2_deformations"]
    points = _json_points(_file(run, entry))
    assert node.IsA("vtkMRMLMarkupsFiducialNode") and node in run["results"].point_lists
    assert node.GetNumberOfControlPoints() == len(points) == run["manifest"]["method_outputs"]["steps_used"] == 3
    lps = np.array([p["position"] for p in points])
    np.testing.assert_allclose(_positions_ras(node), geometry.lps_to_ras(lps), atol=1e-6)
    np.testing.assert_allclose(lps, [p["r2n2"]["centre_lps"] for p in points], atol=1e-9)
    assert [node.GetNthControlPointLabel(i) for i in range(3)] == ["l1", "l2", "l3"]
    assert "displacement" in node.GetNthControlPointDescription(0)
    assert node.GetLocked()
    assert node.GetName().startswith("Moving to Fixed (r2n2_tiny)")


def test_same_matched_points_are_paired_point_lists(runs):
    run = runs["runs"]["same"]
    nodes = run["results"].nodes
    for step in ("affine", "coarse"):
        f, m = nodes[f"same_{step}_fixed_points"], nodes[f"same_{step}_moving_points"]
        assert f.GetNumberOfControlPoints() == m.GetNumberOfControlPoints() > 0
        labels = [f.GetNthControlPointLabel(i) for i in range(f.GetNumberOfControlPoints())]
        assert labels == [m.GetNthControlPointLabel(i) for i in range(m.GetNumberOfControlPoints())]
        for node, side in ((f, "fixed"), (m, "moving")):
            entry = next(o for o in _entries(run) if o["name"] == f"same_{step}_{side}_points")
            lps = np.array([p["position"] for p in _json_points(_file(run, entry))])
            np.testing.assert_allclose(_positions_ras(node), geometry.lps_to_ras(lps), atol=1e-6)
            assert node.GetLocked()
        assert f.GetDisplayNode().GetSelectedColor() != m.GetDisplayNode().GetSelectedColor()
    assert len(run["results"].point_lists) == 4


# -- step-by-step play-back ---------------------------------------------------------------------------
def test_r2n2_steps_become_a_sequence_with_a_browser_and_a_playback_volume(runs):
    run = runs["runs"]["r2n2"]
    entry = next(o for o in _entries(run) if o["kind"] == "volume_sequence")
    results = run["results"]
    sequence = results.nodes[entry["name"]]
    browser = results.browsers[entry["name"]]
    img = sitk.ReadImage(str(_file(run, entry)))  # ITK: the list axis as vector components
    frames = np.moveaxis(sitk.GetArrayFromImage(img), -1, 0)
    assert sequence.IsA("vtkMRMLSequenceNode")
    assert sequence.GetNumberOfDataNodes() == frames.shape[0] == run["manifest"]["method_outputs"]["steps_used"] + 1
    for t in range(frames.shape[0]):
        np.testing.assert_allclose(slicer.util.arrayFromVolume(sequence.GetNthDataNode(t)), frames[t], atol=1e-6)
    proxy = browser.GetProxyNode(sequence)
    assert proxy.IsA("vtkMRMLScalarVolumeNode") and proxy in results.overlays
    assert results.overlays[-1] is proxy  # the maps first, the play-back last
    assert browser.GetSelectedItemNumber() == 0
    assert browser.GetPlaybackRateFps() == pytest.approx(dscene.PLAYBACK_FPS) and browser.GetPlaybackLooped()
    np.testing.assert_allclose(slicer.util.arrayFromVolume(proxy), frames[0], atol=1e-6)
    # the proxy lies where the engine's network grid is (LPS -> RAS)
    grid = Grid.from_sitk(img)
    corner_ras = geometry.lps_to_ras(grid.index_to_physical(np.array([[0.0, 0.0, 0.0], [3.0, 2.0, 1.0]])))
    ijk = np.array([[0, 0, 0, 1], [1, 2, 3, 1]], float)
    np.testing.assert_allclose((ijk @ _ijk_to_ras_of(proxy).T)[:, :3], corner_ras, atol=1e-4)
    # stepping the browser shows the next frame
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(runs["scene"])
    try:
        browser.SetSelectedItemNumber(frames.shape[0] - 1)
        logic.UpdateProxyNodesFromSequences(browser)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(proxy), frames[-1], atol=1e-6)
    finally:
        browser.SetSelectedItemNumber(0)
        logic.UpdateProxyNodesFromSequences(browser)
        logic.SetMRMLScene(None)
    assert sequence.GetStorageNode() is None  # not tied to the temporary file
    assert not frames[0].tolist() == frames[-1].tolist()  # the steps moved something


# -- provenance, references, inputs ----------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_provenance_and_references_on_every_output_node(runs, method):
    run = runs["runs"][method]
    manifest = run["manifest"]
    nodes = list(run["results"].nodes.items()) + [(f"{k} browser", b) for k, b in run["results"].browsers.items()]
    nodes += [("proxy", o) for o in run["results"].overlays if o.GetAttribute("DeepReg.Output") in run["results"].browsers]
    for label, node in nodes:
        assert node.GetAttribute("DeepReg.Method") == f"{method}_tiny", label
        assert node.GetAttribute("DeepReg.WeightsSHA256") == manifest["weights"]["sha256"], label
        assert node.GetAttribute("DeepReg.WeightsFile") == f"{method}.pt", label
        assert node.GetAttribute("DeepReg.Device") == "cpu", label
        assert node.GetAttribute("DeepReg.Time") == manifest["created"], label
        assert json.loads(node.GetAttribute("DeepReg.Parameters"))["refine"] == 0, label
        swapped = label == "inverse_transform"
        fixed, moving = (runs["moving"], runs["fixed"]) if swapped else (runs["fixed"], runs["moving"])
        assert node.GetNodeReferenceID(dscene.FIXED_REFERENCE_ROLE) == fixed.GetID(), label
        assert node.GetNodeReferenceID(dscene.MOVING_REFERENCE_ROLE) == moving.GetID(), label
        if hasattr(node, "GetStorageNode"):
            assert node.GetStorageNode() is None, label


def test_inputs_untouched_after_all_runs(runs):
    for node in (runs["fixed"], runs["moving"]):
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), runs["before"][node.GetName()])
        np.testing.assert_allclose(_ijk_to_ras_of(node), _ijk_to_ras(), atol=1e-12)
        assert node.GetParentTransformNode() is None  # every run made a warped volume
        assert node.GetAttribute("DeepReg.Method") is None


# -- choices, repeats, the unknown -------------------------------------------------------------------
def test_method_outputs_can_be_left_out(runs):
    scene = runs["scene"]
    run = runs["runs"]["same"]
    counts = {c: scene.GetNumberOfNodesByClass(c) for c in
              ("vtkMRMLMarkupsFiducialNode", "vtkMRMLGridTransformNode", "vtkMRMLSequenceNode")}
    res = dscene.load_results(run["manifest_path"], runs["fixed"], runs["moving"],
                              dscene.OutputChoices(create_method_outputs=False, create_jacobian=False))
    assert set(res.nodes) == {"warped", "transform"}
    assert not res.overlays and not res.point_lists
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == counts["vtkMRMLMarkupsFiducialNode"]
    assert scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode") == counts["vtkMRMLGridTransformNode"] + 1


def test_second_load_adds_a_new_playback_and_keeps_the_first(runs):
    run = runs["runs"]["r2n2"]
    first = run["results"]
    second = dscene.load_results(run["manifest_path"], runs["fixed"], runs["moving"])
    for name in ("r2n2_steps", "r2n2_deformations"):
        assert second.nodes[name] is not first.nodes[name]
        assert second.nodes[name].GetName() != first.nodes[name].GetName()
    assert second.browsers["r2n2_steps"] is not first.browsers["r2n2_steps"]
    assert first.browsers["r2n2_steps"].GetProxyNode(first.nodes["r2n2_steps"]) is not None
    assert first.nodes["r2n2_steps"].GetNumberOfDataNodes() == second.nodes["r2n2_steps"].GetNumberOfDataNodes()


def test_unknown_kind_is_reported_and_a_method_linear_transform_is_loaded(runs, tmp_path):
    run = runs["runs"]["same"]
    folder = tmp_path / "run"
    shutil.copytree(run["manifest"]["_folder"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    affine = np.eye(4)
    affine[:3, :3] = rotation(0.1, 0.0, -0.2) * 1.05
    affine[:3, 3] = (2.0, -1.0, 3.0)
    dio.write_linear_transform(affine, str(folder / "same_affine.tfm"))
    manifest["outputs"] += [
        {"name": "same_affine", "kind": "linear_transform", "path": "same_affine.tfm", "grid": None,
         "description": "SAM-affine alone (fixed -> moving, LPS)"},
        {"name": "surface", "kind": "mesh", "path": "surface.vtk", "grid": None, "description": ""}]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    res = dscene.load_results(folder / "manifest.json", runs["fixed"], runs["moving"])
    assert any("'surface'" in m and "'mesh'" in m for m in res.messages)
    node = res.nodes["same_affine"]
    assert node.IsA("vtkMRMLLinearTransformNode")
    np.testing.assert_allclose(_np4(node.GetMatrixTransformFromParent() if hasattr(node, "GetMatrixTransformFromParent")
                                    else node.GetTransformFromParent().GetMatrix()),
                               dscene._LPS_RAS @ affine @ dscene._LPS_RAS, atol=1e-6)
    assert node.GetAttribute("DeepReg.Description") == "SAM-affine alone (fixed -> moving, LPS)"


def test_metrics_summary_reports_folding_and_sdlogj(runs):
    text = dscene.metrics_summary(runs["runs"]["carnet"]["manifest"]["metrics"])
    assert text.startswith("folding ") and "SDlogJ" in text and "NCC" in text and "->" in text
    assert dscene.metrics_summary({"tre_before_mm": 4.0, "tre_after_mm": 1.25}) == "TRE 4.00 -> 1.25 mm"
    assert dscene.metrics_summary({}) == "(no metrics)"

