"""Our files read and written by 3D Slicer's own MRML classes (pip package ``slicer-core``).

This is the contract the Slicer module relies on: a displacement field, linear transform, point
list or volume written by the engine means the same physical thing inside Slicer (RAS), and what
Slicer writes reads back into the engine unchanged.
"""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from deepreglib.core import geometry  # noqa: E402
from deepreglib.io import images as dio  # noqa: E402
from deepreglib.core.geometry import Grid  # noqa: E402
from deepreglib.core.warp import sample_at  # noqa: E402

#: Tolerance for points mapped through a Slicer transform (mm). Slicer stores the field in
#: double precision and interpolates it trilinearly, as the engine does.
POINT_TOL_MM = 1e-3

_REVERSE4 = np.diag([1.0, 1.0, 1.0, 1.0])[[2, 1, 0, 3]]  # (i, j, k, 1) <-> (k, j, i, 1)


from helpers import rotation  # noqa: E402


def oblique_grid(shape=(10, 12, 14), direction=None) -> Grid:
    d = rotation(0.35, -0.2, 0.8) if direction is None else direction
    return Grid(shape, (0.9, 1.3, 2.1), (-30.0, 12.5, 4.0), np.asarray(d).ravel())


def smooth_field(shape, amplitude=2.0, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 3, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    return (amplitude * F.interpolate(coarse, size=shape, mode="trilinear",
                                      align_corners=True)).to(torch.float32)


def vtk_to_numpy4(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_vtk4(a: np.ndarray):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def read_with_storage_node(node, storage_node, path: Path):
    """Load ``path`` into ``node`` the way Slicer does; return the storage node's messages."""
    scene = slicer.vtkMRMLScene()
    scene.AddNode(node)
    scene.AddNode(storage_node)
    node.SetAndObserveStorageNodeID(storage_node.GetID())
    storage_node.SetFileName(str(path))
    ok = storage_node.ReadData(node)
    messages = storage_node.GetUserMessages()
    assert ok == 1, messages.GetAllMessagesAsString()
    return messages


def write_with_storage_node(node, storage_node, path: Path):
    scene = node.GetScene()
    if scene is None:
        scene = slicer.vtkMRMLScene()
        scene.AddNode(node)
    scene.AddNode(storage_node)
    storage_node.SetFileName(str(path))
    ok = storage_node.WriteData(node)
    assert ok == 1, storage_node.GetUserMessages().GetAllMessagesAsString()


def n_warnings(messages) -> int:
    return messages.GetNumberOfMessagesOfType(vtk.vtkCommand.WarningEvent) + \
        messages.GetNumberOfMessagesOfType(vtk.vtkCommand.ErrorEvent)


# -- displacement fields ----------------------------------------------------------------------
def expected_targets_lps(u: torch.Tensor, grid: Grid, idx_kji: np.ndarray) -> np.ndarray:
    """p + u_mm(p) for continuous indices ``idx_kji`` ``(N, 3)``, u_mm interpolated trilinearly
    by the engine's own sampler."""
    u_mm = geometry.displacement_voxel_to_mm(u.double(), grid)
    pts = torch.as_tensor(idx_kji, dtype=torch.float64).T.reshape(1, 3, -1, 1, 1)
    disp = sample_at(u_mm, pts, padding="border")[0, :, :, 0, 0].T.numpy()
    return grid.index_to_physical(idx_kji) + disp


@pytest.mark.parametrize("ext", [".nii.gz", ".h5", ".nrrd", ".mha"])
def test_displacement_field_in_slicer_maps_points_like_engine(tmp_path, ext):
    grid = oblique_grid()
    u = smooth_field(grid.shape)
    path = dio.write_displacement_field(u, grid, tmp_path / f"field{ext}")
    node = slicer.vtkMRMLTransformNode()
    messages = read_with_storage_node(node, slicer.vtkMRMLTransformStorageNode(), path)
    if ext != ".nii.gz":
        # NIfTI: Slicer warns that it expected intent 1006 instead of SimpleITK's 1007; the
        # mapping is still right, as checked below.
        assert n_warnings(messages) == 0, messages.GetAllMessagesAsString()
    from_parent = node.GetTransformFromParent()
    assert from_parent.GetClassName() == "vtkOrientedGridTransform"

    def mapped(idx_kji):
        start_ras = geometry.lps_to_ras(grid.index_to_physical(idx_kji))
        return np.array([from_parent.TransformPoint(p.tolist()) for p in start_ras])

    centres = np.array([[0, 0, 0], [9, 11, 13], [5, 6, 7], [2, 9, 3], [7, 1, 12]], dtype=float)
    np.testing.assert_allclose(mapped(centres),
                               geometry.lps_to_ras(expected_targets_lps(u, grid, centres)),
                               atol=POINT_TOL_MM, rtol=0)
    # Between voxel centres Slicer interpolates the field with cubic splines by default, the
    # engine and ITK trilinearly: with linear mode they agree to POINT_TOL_MM, with the default
    # they differ by the interpolation error of this smooth field (a few hundredths of a mm).
    off_grid = np.random.default_rng(0).uniform(1.0, np.asarray(grid.shape) - 2.0, size=(6, 3))
    expected_off = geometry.lps_to_ras(expected_targets_lps(u, grid, off_grid))
    assert from_parent.GetInterpolationModeAsString() == "Cubic"
    np.testing.assert_allclose(mapped(off_grid), expected_off, atol=0.1, rtol=0)
    from_parent.SetInterpolationModeToLinear()
    np.testing.assert_allclose(mapped(off_grid), expected_off, atol=POINT_TOL_MM, rtol=0)
    # the field is not negligible, so the checks above mean something
    moved = expected_targets_lps(u, grid, centres) - grid.index_to_physical(centres)
    assert np.abs(moved).max() > 1.0


@pytest.mark.parametrize("ext", [".h5", ".nrrd", ".nii.gz"])
def test_field_written_by_slicer_reads_back(tmp_path, ext):
    """Slicer writes NIfTI fields with intent 1006 and RAS components on disk; SimpleITK converts
    them back to LPS, so read_displacement_field returns our field unchanged."""
    grid = oblique_grid()
    u = smooth_field(grid.shape)
    node = slicer.vtkMRMLTransformNode()
    read_with_storage_node(node, slicer.vtkMRMLTransformStorageNode(),
                           dio.write_displacement_field(u, grid, tmp_path / "ours.mha"))
    out = tmp_path / f"slicer{ext}"
    write_with_storage_node(node, slicer.vtkMRMLTransformStorageNode(), out)
    back, g = dio.read_displacement_field(out)
    assert g.shape == grid.shape
    np.testing.assert_allclose(g.origin, grid.origin, atol=1e-4)
    np.testing.assert_allclose(g.direction, grid.direction, atol=1e-5)
    torch.testing.assert_close(back, u, atol=1e-4, rtol=0)


# -- linear transforms ------------------------------------------------------------------------
def random_affine(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] = rotation(*rng.uniform(-0.4, 0.4, 3)) @ np.diag(rng.uniform(0.9, 1.1, 3))
    m[:3, 3] = rng.uniform(-10.0, 10.0, 3)
    return m


@pytest.mark.parametrize("ext", [".tfm", ".h5", ".txt"])
def test_linear_transform_in_slicer(tmp_path, ext):
    m_lps = random_affine()
    path = dio.write_linear_transform(m_lps, tmp_path / f"affine{ext}")
    node = slicer.vtkMRMLLinearTransformNode()
    messages = read_with_storage_node(node, slicer.vtkMRMLTransformStorageNode(), path)
    assert n_warnings(messages) == 0
    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformFromParent(m)
    np.testing.assert_allclose(vtk_to_numpy4(m), geometry.matrix_lps_to_ras(m_lps), atol=1e-9)
    # a fixed RAS point goes where the LPS matrix sends it
    p_ras = np.array([12.0, -7.0, 33.0])
    got = node.GetTransformFromParent().TransformPoint(p_ras.tolist())
    expected = geometry.lps_to_ras(m_lps[:3, :3] @ geometry.ras_to_lps(p_ras) + m_lps[:3, 3])
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_linear_transform_written_by_slicer_reads_back(tmp_path):
    m_ras = geometry.matrix_lps_to_ras(random_affine(3))
    node = slicer.vtkMRMLLinearTransformNode()
    scene = slicer.vtkMRMLScene()
    scene.AddNode(node)
    node.SetMatrixTransformFromParent(numpy_to_vtk4(m_ras))
    for ext in (".h5", ".tfm"):
        out = tmp_path / f"slicer{ext}"
        write_with_storage_node(node, slicer.vtkMRMLTransformStorageNode(), out)
        np.testing.assert_allclose(dio.read_linear_transform(out),
                                   geometry.matrix_ras_to_lps(m_ras), atol=1e-9)


# -- markups -------------------------------------------------------------------------------------
POINTS_LPS = np.array([[1.5, -2.25, 30.0], [-10.0, 4.0, 0.125], [7.0, 8.0, -9.5]])
NAMES = ["apex", "base", "F-3"]


def test_markups_json_read_by_slicer(tmp_path):
    path = dio.write_markups_json(tmp_path / "L.mrk.json", POINTS_LPS, NAMES)
    node = slicer.vtkMRMLMarkupsFiducialNode()
    messages = read_with_storage_node(node, slicer.vtkMRMLMarkupsJsonStorageNode(), path)
    assert n_warnings(messages) == 0, messages.GetAllMessagesAsString()
    assert node.GetNumberOfControlPoints() == 3
    expected_ras = geometry.lps_to_ras(POINTS_LPS)
    for i in range(3):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(i, p)
        np.testing.assert_allclose(p, expected_ras[i], atol=1e-9)
        assert node.GetNthControlPointLabel(i) == NAMES[i]


def test_markups_json_written_by_slicer_reads_back(tmp_path):
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene = slicer.vtkMRMLScene()
    scene.AddNode(node)
    for name, p in zip(NAMES, geometry.lps_to_ras(POINTS_LPS)):
        node.AddControlPoint(vtk.vtkVector3d(*p), name)
    out = tmp_path / "slicer.mrk.json"
    write_with_storage_node(node, slicer.vtkMRMLMarkupsJsonStorageNode(), out)
    names, pts = dio.read_landmarks(out)
    assert names == NAMES
    np.testing.assert_allclose(pts, POINTS_LPS, atol=1e-9)


# -- volumes -------------------------------------------------------------------------------------
def ijk_to_ras(grid: Grid) -> np.ndarray:
    """The grid's index -> RAS map with Slicer's (i, j, k) index order: only the output side
    changes from LPS to RAS (negate the x and y rows)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ grid.index_to_physical_matrix @ _REVERSE4


def test_volume_nrrd_in_slicer_has_our_geometry(tmp_path):
    grid = oblique_grid((6, 7, 8))
    arr = np.random.default_rng(0).normal(size=grid.shape).astype(np.float32)
    path = dio.write_image(grid.apply_to(sitk.GetImageFromArray(arr)), tmp_path / "vol.nrrd")
    node = slicer.vtkMRMLScalarVolumeNode()
    read_with_storage_node(node, slicer.vtkMRMLVolumeArchetypeStorageNode(), path)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    np.testing.assert_allclose(vtk_to_numpy4(m), ijk_to_ras(grid), atol=1e-6)
    # Slicer's voxel array is indexed (k, j, i) like ours
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), arr)


def test_left_handed_volume_is_flipped_by_slicer_but_same_in_space(tmp_path):
    """Slicer makes IJK right-handed on load (ForceRightHandedIJKCoordinateSystem), so for a
    left-handed direction its voxel k runs backwards; the physical position of every value is
    unchanged. Modules must therefore go through files/physical space, never raw indices."""
    grid = oblique_grid((6, 7, 8), direction=np.diag([1.0, 1.0, -1.0]))
    arr = np.random.default_rng(1).normal(size=grid.shape).astype(np.float32)
    path = dio.write_image(grid.apply_to(sitk.GetImageFromArray(arr)), tmp_path / "lh.nrrd")
    node = slicer.vtkMRMLScalarVolumeNode()
    read_with_storage_node(node, slicer.vtkMRMLVolumeArchetypeStorageNode(), path)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    slicer_ijk_to_ras = vtk_to_numpy4(m)
    slicer_arr = slicer.util.arrayFromVolume(node)
    assert np.linalg.det(slicer_ijk_to_ras[:3, :3]) * np.linalg.det(grid.direction_matrix) < 0
    for k, j, i in [(0, 0, 0), (5, 6, 7), (1, 4, 2)]:
        ras = (slicer_ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]
        ours = np.rint(grid.physical_to_index(geometry.ras_to_lps(ras))).astype(int)
        assert slicer_arr[k, j, i] == arr[tuple(ours)]


def test_volume_written_by_slicer_reads_back(tmp_path):
    grid = oblique_grid((6, 7, 8))
    arr = np.random.default_rng(2).normal(size=grid.shape).astype(np.float32)
    node = slicer.vtkMRMLScalarVolumeNode()
    read_with_storage_node(node, slicer.vtkMRMLVolumeArchetypeStorageNode(),
                           dio.write_image(grid.apply_to(sitk.GetImageFromArray(arr)),
                                           tmp_path / "ours.nii.gz"))
    out = tmp_path / "slicer.nrrd"
    write_with_storage_node(node, slicer.vtkMRMLVolumeArchetypeStorageNode(), out)
    img = dio.read_image(out)
    got = Grid.from_sitk(img)
    assert got.shape == grid.shape
    np.testing.assert_allclose(got.index_to_physical_matrix, grid.index_to_physical_matrix,
                               atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)
