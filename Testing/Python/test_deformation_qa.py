"""DeepRegistrationLib.qa (the DeformationQA module's Logic) on transforms with known answers,
with Slicer's real MRML (``slicer-core``)."""
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepRegExtension"))

from DeepRegistrationLib import qa  # noqa: E402

SHAPE = (8, 9, 10)  # (k, j, i)


def _volume(scene, name="ref", cls="vtkMRMLScalarVolumeNode", arr=None):
    node = scene.AddNewNodeByClass(cls, name)
    node.SetSpacing(1.5, 1.0, 2.0)
    node.SetOrigin(-5.0, 3.0, 10.0)
    slicer.util.updateVolumeFromArray(node, np.zeros(SHAPE, np.float32) if arr is None else arr)
    return node


def _linear(scene, from_parent: np.ndarray, name="T"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(from_parent[r, c]))
    node.SetMatrixTransformFromParent(m)
    return node


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def test_scaling_has_known_jacobian_and_magnitude(scene):
    ref = _volume(scene)
    t = _linear(scene, np.diag([1.1, 1.1, 1.1, 1.0]))
    maps = qa.deformation_maps(t, ref)
    np.testing.assert_allclose(maps["jacobian"], 1.331, atol=1e-4)
    assert maps["jacobian"].shape == SHAPE
    assert maps["folding_percent"] == 0.0
    assert maps["sdlogj"] == pytest.approx(0.0, abs=1e-5)
    # |phi(p) - p| = 0.1 |p| at the voxel (i, j, k) = (2, 3, 4)
    m = vtk.vtkMatrix4x4()
    ref.GetIJKToRASMatrix(m)
    p = np.array(m.MultiplyPoint([2, 3, 4, 1]))[:3]
    assert maps["magnitude_mm"][4, 3, 2] == pytest.approx(0.1 * np.linalg.norm(p), rel=1e-5)


def test_reflection_folds_everywhere(scene):
    ref = _volume(scene)
    maps = qa.deformation_maps(_linear(scene, np.diag([-1.0, 1.0, 1.0, 1.0])), ref)
    np.testing.assert_allclose(maps["jacobian"], -1.0, atol=1e-5)
    assert maps["folding_percent"] == pytest.approx(100.0)


def test_grid_transform_made_from_known_field(scene):
    """A grid transform node whose FromParent displacement is a known linear ramp in RAS x:
    u_x = 0.2 * (x - x0) so det = 1.2 in the interior."""
    ref = _volume(scene)
    grid_node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "ramp")
    disp = vtk.vtkImageData()
    disp.SetDimensions(SHAPE[2], SHAPE[1], SHAPE[0])
    disp.SetSpacing(1.5, 1.0, 2.0)
    disp.SetOrigin(-5.0, 3.0, 10.0)
    disp.AllocateScalars(vtk.VTK_DOUBLE, 3)
    arr = vtk.util.numpy_support.vtk_to_numpy(disp.GetPointData().GetScalars()).reshape(SHAPE + (3,))
    i = np.arange(SHAPE[2])
    arr[...] = 0
    arr[..., 0] = 0.2 * (i * 1.5)[None, None, :]
    grid = slicer.vtkOrientedGridTransform() if hasattr(slicer, "vtkOrientedGridTransform") else vtk.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(disp)
    grid.SetInterpolationModeToLinear()
    grid_node.SetAndObserveTransformFromParent(grid)
    maps = qa.deformation_maps(grid_node, ref)
    np.testing.assert_allclose(maps["jacobian"][1:-1, 1:-1, 1:-1], 1.2, atol=1e-4)
    assert maps["max_displacement_mm"] == pytest.approx(0.2 * 1.5 * (SHAPE[2] - 1), rel=1e-5)


def test_landmark_errors_before_and_after(scene):
    t = np.eye(4)
    t[:3, 3] = (3.0, -4.0, 0.0)
    node = _linear(scene, t)
    fixed = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
    moving = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "M")
    for n, p in enumerate([(0.0, 0.0, 0.0), (10.0, 5.0, -2.0)]):
        fixed.AddControlPoint(vtk.vtkVector3d(*p), f"L{n}")
        moving.AddControlPoint(vtk.vtkVector3d(*(np.array(p) + t[:3, 3] + [0.0, 0.0, 1.0 * n])), f"L{n}")
    res = qa.landmark_errors(node, fixed, moving)
    assert res["after"]["mean"] == pytest.approx(0.5)  # 0 and 1 mm
    assert res["before"]["max"] == pytest.approx(np.sqrt(25 + 1))
    assert [r[0] for r in res["per_point"]] == ["L0", "L1"]
    moving.RemoveNthControlPoint(1)
    with pytest.raises(ValueError, match="same number"):
        qa.landmark_errors(node, fixed, moving)


def test_inverse_consistency(scene):
    ref = _volume(scene)
    t = np.eye(4)
    t[:3, 3] = (2.0, 0.0, 0.0)
    forward = _linear(scene, t, "fwd")
    assert qa.inverse_consistency(forward, ref)["max"] == pytest.approx(0.0, abs=1e-9)
    wrong = _linear(scene, np.eye(4), "identity")
    assert qa.inverse_consistency(forward, ref, inverse_node=wrong)["mean"] == pytest.approx(2.0)


def test_label_overlap_dice_and_hd95(scene):
    a = np.zeros(SHAPE, np.int16)
    b = np.zeros(SHAPE, np.int16)
    a[2:6, 2:6, 2:6] = 1
    b[2:6, 2:6, 4:8] = 1  # shifted by 2 voxels along i (2 x 1.5 mm)
    fa = _volume(scene, "fixed labels", "vtkMRMLLabelMapVolumeNode", a)
    fb = _volume(scene, "warped labels", "vtkMRMLLabelMapVolumeNode", b)
    res = qa.label_overlap(fa, fb)
    assert res["dice"][1] == pytest.approx(0.5)
    assert res["hd95_mm"][1] == pytest.approx(3.0)
    other = _volume(scene, "elsewhere", "vtkMRMLLabelMapVolumeNode", b)
    other.SetOrigin(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="not on the grid"):
        qa.label_overlap(fa, other)


def test_report_table(scene):
    rows = qa.report_rows({"folding_percent": 0.5, "tre": {"before": {"mean": 3.0}}, "jacobian": np.ones(3),
                           "method": "iterative"})
    assert rows == [("folding_percent", "0.5"), ("tre.before.mean", "3"), ("method", "iterative")]
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "report")
    qa.fill_table(table, rows)
    assert table.GetNumberOfRows() == 3 and table.GetCellText(1, 0) == "tre.before.mean"


# -- the module's Logic (DeformationQA.DeformationQALogic) ----------------------------------------
def _logic():
    import DeformationQA
    return DeformationQA.DeformationQALogic()


def _tag(node, fixed, moving, output, created="2026-01-01T00:00:00+00:00", method="iterative"):
    from DeepRegistrationLib import scene as dscene
    dscene.tag_output(node, {"method": method, "created": created, "device": "cpu"}, fixed, moving, output)
    return node


def test_related_nodes_of_a_registration_result(scene):
    fixed, moving = _volume(scene, "Fixed"), _volume(scene, "Moving")
    t = np.eye(4)
    t[:3, 3] = (1.0, 2.0, 0.0)
    forward = _tag(_linear(scene, t, "fwd"), fixed, moving, "transform")
    inverse = _tag(_linear(scene, np.linalg.inv(t), "inv"), moving, fixed, "inverse_transform")
    warped = _tag(_volume(scene, "warped"), fixed, moving, "warped")
    # the same outputs of another run (other time) must not be picked
    _tag(_linear(scene, np.eye(4), "other inv"), moving, fixed, "inverse_transform", created="2026-02-02T00:00:00+00:00")
    _tag(_volume(scene, "other warped"), fixed, moving, "warped", created="2026-02-02T00:00:00+00:00")
    related = _logic().relatedNodes(forward)
    assert related["referenceVolume"] is fixed and related["fixedVolume"] is fixed
    assert related["warpedVolume"].GetID() == warped.GetID()
    assert related["inverseTransform"].GetID() == inverse.GetID()
    # a transform made elsewhere (SlicerElastix, by hand): nothing guessed
    assert set(_logic().relatedNodes(_linear(scene, t, "elastix")).values()) == {None}


def test_logic_report_with_an_explicit_inverse_and_the_method(scene):
    ref = _volume(scene)
    t = np.diag([1.1, 0.9, 1.0, 1.0])
    t[:3, 3] = (1.0, 0.0, -2.0)
    forward = _tag(_linear(scene, t, "fwd"), ref, ref, "transform", method="dnet")
    exact = _linear(scene, np.linalg.inv(t), "exact inverse")
    wrong = _linear(scene, np.eye(4), "not an inverse")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "report")
    logic = _logic()
    stats = logic.report(forward, ref, table, inverseTransform=exact)
    assert stats["method"] == "dnet"
    assert stats["inverse_consistency_mm"]["max"] < 1e-6
    assert stats["jacobian_min"] == pytest.approx(0.99, abs=1e-6)  # det = 1.1 * 0.9 * 1.0
    rows = {table.GetCellText(r, 0): table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())}
    assert rows["method"] == "dnet" and rows["folding_percent"] == "0"
    assert logic.report(forward, ref, table, inverseTransform=wrong)["inverse_consistency_mm"]["mean"] > 0.5


def test_logic_jacobian_and_magnitude_volumes(scene):
    from DeepRegistrationLib import scene as dscene
    ref = _volume(scene)
    t = _linear(scene, np.diag([1.1, 1.1, 1.1, 1.0]))
    logic = _logic()
    jac, stats = logic.jacobianVolume(t, ref)
    assert jac.GetDisplayNode().GetColorNodeID() == dscene.jacobian_color_node(scene).GetID()
    assert (jac.GetDisplayNode().GetWindowLevelMin(), jac.GetDisplayNode().GetWindowLevelMax()) == dscene.JACOBIAN_WINDOW
    assert jac.GetNodeReferenceID("DeepReg.transform") == t.GetID()
    np.testing.assert_allclose(slicer.util.arrayFromVolume(jac), 1.331, atol=1e-4)
    mag, mstats = logic.magnitudeVolume(t, ref)
    assert float(slicer.util.arrayFromVolume(mag).max()) == pytest.approx(mstats["max_displacement_mm"], rel=1e-5)
    assert "jacobian" not in stats and "magnitude_mm" not in mstats  # numbers only, the maps are nodes


def test_label_overlap_of_segmentations_leaves_the_scene_as_it_was(scene):
    a = np.zeros(SHAPE, np.int16)
    b = np.zeros(SHAPE, np.int16)
    a[2:6, 2:6, 2:6] = 1
    b[2:6, 2:6, 4:8] = 1
    segs = []
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    for name, arr in (("fixed seg", a), ("warped seg", b)):
        lab = _volume(scene, name + " source", "vtkMRMLLabelMapVolumeNode", arr)
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        assert logic.ImportLabelmapToSegmentationNode(lab, seg)
        segs.append(seg)
    logic.SetMRMLScene(None)
    ref = _volume(scene)
    n_nodes = scene.GetNumberOfNodes()
    res = qa.label_overlap(segs[0], segs[1], ref)
    assert res["dice"][1] == pytest.approx(0.5)
    assert res["hd95_mm"][1] == pytest.approx(3.0)
    assert scene.GetNumberOfNodes() == n_nodes
