"""deepreglib.core.geometry against SimpleITK's own index <-> physical maps."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepreglib.core import geometry
from deepreglib.core.errors import BadInputError
from deepreglib.core.geometry import Grid

SPACING = (0.7, 1.3, 2.9)
ORIGIN = (-12.5, 40.0, 7.25)
SIZE_XYZ = (6, 5, 4)  # ITK order; the array/tensor shape is (4, 5, 6)


from helpers import rotation  # noqa: E402


DIRECTION = rotation(0.3, -0.5, 1.1)


def oblique_image() -> sitk.Image:
    img = sitk.Image(SIZE_XYZ, sitk.sitkFloat32)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION.ravel().tolist())
    return img


@pytest.fixture
def grid() -> Grid:
    return Grid.from_sitk(oblique_image())


def test_from_sitk_round_trip(grid):
    assert grid.shape == (4, 5, 6)
    assert grid.spacing == pytest.approx(SPACING)
    assert grid.origin == pytest.approx(ORIGIN)
    np.testing.assert_allclose(grid.direction_matrix, DIRECTION, atol=1e-12)
    ref = grid.reference_image()
    assert ref.GetSize() == SIZE_XYZ
    assert Grid.from_sitk(ref) == grid


def test_from_sitk_rejects_2d():
    with pytest.raises(BadInputError):
        Grid.from_sitk(sitk.Image([4, 4], sitk.sitkFloat32))


def test_index_to_physical_matches_sitk(grid):
    img = oblique_image()
    rng = np.random.default_rng(0)
    idx_kji = rng.uniform(-1.0, 5.0, size=(10, 3))
    ours = grid.index_to_physical(idx_kji)
    for idx, p in zip(idx_kji, ours):
        # SimpleITK takes the continuous index in (i, j, k) order: reverse ours.
        expected = img.TransformContinuousIndexToPhysicalPoint(idx[::-1].tolist())
        np.testing.assert_allclose(p, expected, atol=1e-10)
    np.testing.assert_allclose(grid.physical_to_index(ours), idx_kji, atol=1e-10)
    # and physical_to_index matches SimpleITK's own inverse
    for p, idx in zip(ours, idx_kji):
        np.testing.assert_allclose(img.TransformPhysicalPointToContinuousIndex(p.tolist()),
                                   idx[::-1], atol=1e-10)


def test_voxel_grid_points_are_sitk_voxel_centres(grid):
    img = oblique_image()
    pts = geometry.voxel_grid_points(grid, dtype=torch.float64)
    assert pts.shape == (1, 3, 4, 5, 6)
    for k, j, i in [(0, 0, 0), (3, 4, 5), (1, 2, 3), (2, 0, 5)]:
        np.testing.assert_allclose(pts[0, :, k, j, i].numpy(),
                                   img.TransformIndexToPhysicalPoint((i, j, k)), atol=1e-10)


def test_displacement_voxel_mm_round_trip(grid):
    u = torch.randn(2, 3, *grid.shape, dtype=torch.float64)
    u_mm = geometry.displacement_voxel_to_mm(u, grid)
    back = geometry.displacement_mm_to_voxel(u_mm, grid)
    torch.testing.assert_close(back, u, atol=1e-12, rtol=0)
    # the mm length of a displacement is what the physical points say
    img = oblique_image()
    du = u[0, :, 1, 2, 3].numpy()
    p0 = np.array(img.TransformIndexToPhysicalPoint((3, 2, 1)))
    p1 = np.array(img.TransformContinuousIndexToPhysicalPoint((3 + du[2], 2 + du[1], 1 + du[0])))
    np.testing.assert_allclose(u_mm[0, :, 1, 2, 3].numpy(), p1 - p0, atol=1e-10)


def test_unit_voxel_displacements_map_to_direction_columns(grid):
    for comp, axis_xyz in ((2, 0), (1, 1), (0, 2)):  # tensor component (k, j, i) -> ITK axis
        u = torch.zeros(1, 3, *grid.shape, dtype=torch.float64)
        u[:, comp] = 1.0
        u_mm = geometry.displacement_voxel_to_mm(u, grid)[0, :, 0, 0, 0].numpy()
        np.testing.assert_allclose(u_mm, DIRECTION[:, axis_xyz] * SPACING[axis_xyz], atol=1e-12)


def test_displacement_shape_is_checked(grid):
    with pytest.raises(ValueError):
        geometry.displacement_voxel_to_mm(torch.zeros(1, 3, 4, 5, 5), grid)
    with pytest.raises(ValueError):
        geometry.displacement_voxel_to_mm(torch.zeros(1, 2, 4, 5, 6), grid)


def test_resized_keeps_first_and_last_voxel_centres(grid):
    small = grid.resized((3, 9, 4))
    assert small.shape == (3, 9, 4)
    np.testing.assert_allclose(small.corners(), grid.corners(), atol=1e-9)
    np.testing.assert_allclose(small.direction_matrix, grid.direction_matrix)


def test_centered_like_keeps_centre_and_direction(grid):
    other = grid.centered_like((8, 8, 8), (1.0, 1.0, 1.0))
    centre = grid.corners().mean(axis=0)
    np.testing.assert_allclose(other.corners().mean(axis=0), centre, atol=1e-9)
    np.testing.assert_allclose(other.direction_matrix, grid.direction_matrix)
    assert other.spacing == (1.0, 1.0, 1.0)
    # corners are 7 mm apart along each direction column
    c = other.corners()
    np.testing.assert_allclose(c[1] - c[0], DIRECTION[:, 0] * 7.0, atol=1e-9)  # i varies fastest


def test_affine_voxel_matrix_matches_physical_map(grid):
    target = grid.centered_like((5, 5, 5), (2.0, 2.0, 2.0))
    a = np.eye(4)
    a[:3, :3] = rotation(0.1, 0.2, -0.3) * 1.1
    a[:3, 3] = [3.0, -2.0, 1.0]
    m = geometry.affine_voxel_matrix(a, grid, target)
    idx = np.array([1.0, 2.0, 3.0, 1.0])
    p = grid.index_to_physical(idx[:3])
    expected = target.physical_to_index(a[:3, :3] @ p + a[:3, 3])
    np.testing.assert_allclose((m @ idx)[:3], expected, atol=1e-9)


def test_lps_ras_helpers():
    p = np.array([[1.0, -2.0, 3.0], [0.5, 0.25, -4.0]])
    np.testing.assert_allclose(geometry.lps_to_ras(p), [[-1.0, 2.0, 3.0], [-0.5, -0.25, -4.0]])
    np.testing.assert_allclose(geometry.ras_to_lps(geometry.lps_to_ras(p)), p)
    assert geometry.lps_to_ras(p) is not p and p[0, 0] == 1.0  # input not modified
    m = np.eye(4)
    m[:3, :3] = rotation(0.2, 0.0, 0.4)
    m[:3, 3] = [1.0, 2.0, 3.0]
    m_ras = geometry.matrix_lps_to_ras(m)
    # the same geometric map expressed in RAS: ras(m @ lps(q)) == m_ras @ q
    q = np.array([4.0, -5.0, 6.0])
    lhs = geometry.lps_to_ras((m @ np.append(geometry.ras_to_lps(q), 1.0))[:3])
    np.testing.assert_allclose(lhs, (m_ras @ np.append(q, 1.0))[:3], atol=1e-12)
    np.testing.assert_allclose(geometry.matrix_ras_to_lps(m_ras), m, atol=1e-12)


def test_grid_rejects_bad_geometry():
    with pytest.raises(BadInputError):
        Grid((4, 4, 4), (1.0, 0.0, 1.0), (0, 0, 0), np.eye(3).ravel())
    with pytest.raises(BadInputError):
        Grid((4, 4, 4), (1.0, 1.0, 1.0), (0, 0, 0), (np.eye(3) * 2).ravel())
    shear = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # det 1, not a rotation
    with pytest.raises(BadInputError, match="orthonormal"):
        Grid((4, 4, 4), (1.0, 1.0, 1.0), (0, 0, 0), shear.ravel())
    # a reflection is a valid direction (left-handed images exist)
    Grid((4, 4, 4), (1.0, 1.0, 1.0), (0, 0, 0), np.diag([1.0, 1.0, -1.0]).ravel())


@pytest.mark.parametrize("to_direction", [
    (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0),   # the OASIS scans' (D-Net's cube)
    (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0),   # a sagittal stack
    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),   # RAS-stored
])
def test_reorienting_by_axes_gives_what_sitk_resamples_onto_the_same_box(to_direction):
    """The permuted and flipped array equals SimpleITK's nearest-neighbour resampling of the
    original onto a grid of the new direction covering the same box: the same anatomy at the
    same physical points."""
    from deepreglib.core.geometry import reorient_volume
    rng = np.random.default_rng(0)
    arr = rng.random((5, 6, 7)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.5, 1.5))
    img.SetOrigin((3.0, -2.0, 7.0))
    img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    out = reorient_volume(torch.from_numpy(arr), img.GetDirection(), to_direction).numpy()
    ref = sitk.Image([out.shape[2], out.shape[1], out.shape[0]], sitk.sitkFloat32)
    ref.SetSpacing(img.GetSpacing())
    ref.SetDirection(to_direction)
    corners = np.array([img.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
                        for i in (0, 6) for j in (0, 5) for k in (0, 4)])
    along = corners @ np.asarray(to_direction).reshape(3, 3)  # coordinates along the new axes
    ref.SetOrigin(tuple(corners[np.argmin(along.sum(1))]))
    expected = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor))
    assert out.shape == expected.shape and np.array_equal(out, expected)
    back = reorient_volume(torch.from_numpy(out), to_direction, img.GetDirection()).numpy()
    assert np.array_equal(back, arr)  # and back again


def test_reorienting_an_oblique_scan_is_refused_with_a_way_out():
    from deepreglib.core.geometry import reorient_volume
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(BadInputError, match="not axis-aligned.*resample"):
        reorient_volume(torch.zeros(2, 3, 4), oblique, tuple(np.eye(3).ravel()))
