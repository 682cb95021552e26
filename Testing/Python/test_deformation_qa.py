"""The DeformationQA module's Logic on transforms with known answers, with Slicer's real MRML
(``slicer-core``): nodes are written with Slicer's storage nodes, ``deepreg qa`` computes in a
worker process, and its maps come back as nodes. The numbers themselves are checked in
``test_transform_qa.py``."""
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


def test_report_table(scene):
    rows = qa.report_rows({"folding_percent": 0.5, "tre": {"before": {"mean": 3.0}}, "jacobian": np.ones(3),
                           "method": "iterative", "linear": True, "tre_per_point": [["L0", 1.0, 0.5]]})
    assert rows == [("folding_percent", "0.5"), ("tre.before.mean", "3"), ("method", "iterative"), ("linear", "yes")]
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "report")
    qa.fill_table(table, rows)
    assert table.GetNumberOfRows() == 4 and table.GetCellText(1, 0) == "tre.before.mean"


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


def _points(scene, name, points):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for n, p in enumerate(points):
        node.AddControlPoint(vtk.vtkVector3d(*p), f"L{n}")
    return node


def _segmentations(scene, arrays):
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    segs = []
    for name, arr in arrays:
        lab = _volume(scene, name + " source", "vtkMRMLLabelMapVolumeNode", arr)
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        assert logic.ImportLabelmapToSegmentationNode(lab, seg)
        segs.append(seg)
    logic.SetMRMLScene(None)
    return segs


def test_logic_report_with_inverse_landmarks_segmentations_and_the_method(scene):
    ref = _volume(scene)
    t = np.diag([1.1, 0.9, 1.0, 1.0])
    t[:3, 3] = (1.0, 0.0, -2.0)
    forward = _tag(_linear(scene, t, "fwd"), ref, ref, "transform", method="dnet")
    exact = _linear(scene, np.linalg.inv(t), "exact inverse")
    p = np.array([[0.0, 0.0, 0.0], [10.0, 5.0, -2.0]])
    mapped = (p @ t[:3, :3].T) + t[:3, 3]
    fixed_points = _points(scene, "F", p)
    moving_points = _points(scene, "M", mapped + [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 0 and 1 mm off
    a = np.zeros(SHAPE, np.int16)
    b = np.zeros(SHAPE, np.int16)
    a[2:6, 2:6, 2:6] = 1
    b[2:6, 2:6, 4:8] = 1  # shifted by 2 voxels along i (2 x 1.5 mm)
    segs = _segmentations(scene, (("fixed seg", a), ("warped seg", b)))
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "report")
    n_nodes = scene.GetNumberOfNodes()
    stats = _logic().report(forward, ref, table, inverseTransform=exact, fixedLandmarks=fixed_points,
                            movingLandmarks=moving_points, fixedSegmentation=segs[0], warpedSegmentation=segs[1])
    assert scene.GetNumberOfNodes() == n_nodes  # the report adds no node and leaves none behind
    assert stats["method"] == "dnet" and stats["inverse"] == "given"
    assert stats["inverse_consistency_mm"]["max"] < 1e-5
    assert stats["jacobian_min"] == pytest.approx(0.99, abs=1e-6)  # det = 1.1 * 0.9 * 1.0
    assert stats["tre_after_mm"]["mean"] == pytest.approx(0.5, abs=1e-6)
    assert stats["dice"]["1"] == pytest.approx(0.5) and stats["hd95_mm"]["1"] == pytest.approx(3.0)
    rows = {table.GetCellText(r, 0): table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())}
    assert rows["method"] == "dnet" and rows["folding_percent"] == "0" and rows["dice.1"] == "0.5"


def test_logic_maps_of_a_linear_and_a_grid_transform(scene):
    from DeepRegistrationLib import scene as dscene
    ref = _volume(scene)
    t = _linear(scene, np.diag([1.1, 1.1, 1.1, 1.0]))
    logic = _logic()
    jac, stats = logic.jacobianVolume(t, ref)
    assert jac.GetDisplayNode().GetColorNodeID() == dscene.jacobian_color_node(scene).GetID()
    assert (jac.GetDisplayNode().GetWindowLevelMin(), jac.GetDisplayNode().GetWindowLevelMax()) == dscene.JACOBIAN_WINDOW
    assert jac.GetNodeReferenceID("DeepReg.transform") == t.GetID()
    np.testing.assert_allclose(slicer.util.arrayFromVolume(jac), 1.331, atol=1e-4)
    np.testing.assert_allclose(_ijk_to_ras(jac), _ijk_to_ras(ref), atol=1e-6)  # on the reference grid
    assert stats["folding_percent"] == 0.0
    # a grid transform node whose FromParent displacement is a ramp in RAS x: u_x = 0.2 (x - x0)
    grid_node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "ramp")
    disp = vtk.vtkImageData()
    disp.SetDimensions(SHAPE[2], SHAPE[1], SHAPE[0])
    disp.SetSpacing(1.5, 1.0, 2.0)
    disp.SetOrigin(-5.0, 3.0, 10.0)
    disp.AllocateScalars(vtk.VTK_DOUBLE, 3)
    arr = vtk.util.numpy_support.vtk_to_numpy(disp.GetPointData().GetScalars()).reshape(SHAPE + (3,))
    arr[...] = 0
    arr[..., 0] = 0.2 * (np.arange(SHAPE[2]) * 1.5)[None, None, :]
    grid = slicer.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(disp)
    grid.SetInterpolationModeToLinear()
    grid_node.SetAndObserveTransformFromParent(grid)
    mag, mstats = logic.magnitudeVolume(grid_node, ref)
    assert mstats["max_displacement_mm"] == pytest.approx(0.2 * 1.5 * (SHAPE[2] - 1), rel=1e-5)
    assert float(slicer.util.arrayFromVolume(mag).max()) == pytest.approx(mstats["max_displacement_mm"], rel=1e-5)
    assert mstats["jacobian_min"] == pytest.approx(1.2, abs=1e-4) or mstats["jacobian_min"] < 1.2  # edges
    assert "jacobian" not in stats and "magnitude_mm" not in mstats  # numbers only, the maps are nodes


def _ijk_to_ras(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_logic_refuses_what_it_cannot_check_before_starting(scene):
    ref = _volume(scene)
    parent = _linear(scene, np.eye(4), "parent")
    child = _linear(scene, np.diag([1.1, 1.0, 1.0, 1.0]), "child")
    child.SetAndObserveTransformNodeID(parent.GetID())
    with pytest.raises(ValueError, match="harden"):
        _logic().start(child, ref)
    with pytest.raises(ValueError, match="both point lists"):
        _logic().start(parent, ref, fixedLandmarks=_points(scene, "F", [(0.0, 0.0, 0.0)]))
    # bad input found by the worker: its message, not a traceback
    with pytest.raises(RuntimeError, match="same number") as err:
        _logic().run(parent, ref, fixedLandmarks=_points(scene, "F2", [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0)]),
                     movingLandmarks=_points(scene, "M2", [(0.0, 0.0, 0.0)]), outputs=())
    assert "Traceback" not in str(err.value)
