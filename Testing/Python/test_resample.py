"""resample.py: physical-grid resampling against SimpleITK's own Resample and TransformPoint."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepreglib.core.geometry import Grid, voxel_grid_points
from deepreglib.core.resample import (downsample, downsampled_shape, gaussian_blur, physical_field,
                                 resample_to_grid)


def _rotation(axis, degrees):
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


SOURCE = Grid((20, 28, 24), (1.2, 1.0, 1.5), (-10.0, 5.0, 3.0),
              tuple(_rotation((0.2, 1.0, 0.3), 12).ravel()))


def _smooth_image(grid):
    """A smooth, asymmetric test function of physical position (values about 0..2)."""
    p = voxel_grid_points(grid, torch.float64)[0]
    c = torch.as_tensor(grid.index_to_physical((np.asarray(grid.shape) - 1) / 2.0)).view(3, 1, 1, 1)
    d = p - c
    blob = torch.exp(-(d[0] ** 2 / 120 + (d[1] - 2) ** 2 / 60 + (d[2] + 1) ** 2 / 90))
    waves = 0.5 * torch.sin(d[0] / 4.0) * torch.cos(d[1] / 5.0 + d[2] / 7.0)
    return (blob + waves + 0.5).float()[None, None]


def _to_sitk(image, grid):
    img = sitk.GetImageFromArray(image[0, 0].double().numpy())
    return grid.apply_to(img)


def _sitk_resample(image, source, target, transform):
    out = sitk.Resample(_to_sitk(image, source), target.reference_image(sitk.sitkFloat64),
                        transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    return torch.from_numpy(sitk.GetArrayFromImage(out))


def _inside_mask(source, target, matrix=None, disp_mm=None, margin=0.0):
    """Target voxels whose source index lies inside [margin, n - 1 - margin] on every axis, where
    ITK (clamped edge) and grid_sample (zero beyond the last centre) agree by construction."""
    p = voxel_grid_points(target, torch.float64)[0].reshape(3, -1).T.numpy()
    if disp_mm is not None:
        p = p + disp_mm[0].reshape(3, -1).T.double().numpy()
    if matrix is not None:
        p = p @ matrix[:3, :3].T + matrix[:3, 3]
    idx = source.physical_to_index(p)
    hi = np.asarray(source.shape) - 1 - margin
    ok = np.all((idx >= margin) & (idx <= hi), axis=1)
    return torch.from_numpy(ok.reshape(target.shape))


def _affine(matrix):
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(matrix[:3, :3].ravel()))
    t.SetTranslation(tuple(matrix[:3, 3]))
    return t


MATRIX = np.eye(4)
MATRIX[:3, :3] = _rotation((1.0, -0.5, 0.2), 8) @ np.diag([1.05, 0.97, 1.02])
MATRIX[:3, 3] = (1.5, -2.0, 0.7)


def test_identity_grids_give_back_the_image():
    img = torch.rand(2, 3, *SOURCE.shape)
    out = resample_to_grid(img, SOURCE, SOURCE)
    torch.testing.assert_close(out, img, atol=1e-5, rtol=0)
    out_nn = resample_to_grid(img, SOURCE, SOURCE, interpolation="nearest")
    torch.testing.assert_close(out_nn, img, atol=0, rtol=0)


def test_other_spacing_and_rotated_direction_matches_sitk_resample():
    target = SOURCE.centered_like((18, 22, 26), (1.3, 1.1, 0.9))
    target = Grid(target.shape, target.spacing, target.origin,
                  tuple((_rotation((0.0, 0.3, 1.0), 20) @ SOURCE.direction_matrix).ravel()))
    img = _smooth_image(SOURCE)
    ours = resample_to_grid(img, SOURCE, target)[0, 0].double()
    ref = _sitk_resample(img, SOURCE, target, sitk.Transform(3, sitk.sitkIdentity))
    mask = _inside_mask(SOURCE, target)
    assert mask.float().mean() > 0.5  # the comparison covers most of the volume
    # Both are trilinear on the same samples; 1e-5 covers float32 grid coordinates.
    assert (ours - ref)[mask].abs().max() < 1e-5


def test_translation_matrix_moves_a_blob_by_the_expected_mm():
    grid = Grid.identity((32, 32, 32), (1.0, 1.0, 1.0))
    p = voxel_grid_points(grid, torch.float64)[0]
    centre = torch.tensor([15.0, 16.0, 14.0], dtype=torch.float64).view(3, 1, 1, 1)
    blob = torch.exp(-((p - centre) ** 2).sum(0) / (2 * 2.5 ** 2)).float()[None, None]
    t = np.array([4.5, -3.25, 2.0])
    m = np.eye(4)
    m[:3, 3] = t  # output(p) = source(p + t): the blob appears at centre - t
    out = resample_to_grid(blob, grid, grid, matrix_lps=m)[0, 0].double()
    centroid = (p * out).flatten(1).sum(1) / out.sum()
    np.testing.assert_allclose(centroid.numpy(), centre.flatten().numpy() - t, atol=1e-3)


def _smooth_displacement_mm(grid, amplitude=2.5):
    p = voxel_grid_points(grid, torch.float64)[0]
    u = torch.stack([amplitude * torch.sin(p[1] / 6.0),
                     amplitude * torch.cos(p[2] / 7.0 + p[0] / 9.0),
                     0.6 * amplitude * torch.sin(p[0] / 5.0)])
    return u[None]


def test_displacement_then_matrix_matches_sitk_composite_transform():
    target = SOURCE.centered_like((18, 20, 22), (1.4, 1.2, 1.0))
    img = _smooth_image(SOURCE)
    u_mm = _smooth_displacement_mm(target)
    ours = resample_to_grid(img, SOURCE, target, matrix_lps=MATRIX,
                            displacement_mm=u_mm.float())[0, 0].double()

    field = sitk.GetImageFromArray(u_mm[0].permute(1, 2, 3, 0).numpy(), isVector=True)
    composite = sitk.CompositeTransform(3)
    # ITK's CompositeTransform applies the *last added* transform first:
    # T(p) = T_0(T_1(p)). Adding the affine and then the displacement field gives
    # T(p) = A(p + u(p)), the engine's "deformable on the fixed grid, then affine" order.
    composite.AddTransform(_affine(MATRIX))
    composite.AddTransform(sitk.DisplacementFieldTransform(target.apply_to(field)))
    ref = _sitk_resample(img, SOURCE, target, composite)
    mask = _inside_mask(SOURCE, target, MATRIX, u_mm)
    assert mask.float().mean() > 0.4
    assert (ours - ref)[mask].abs().max() < 1e-5

    # The single exported field maps every voxel centre where ITK's composite maps it.
    phys = physical_field(MATRIX, u_mm, target, dtype=torch.float64)
    pts = voxel_grid_points(target, torch.float64)[0]
    for kji in [(0, 0, 0), (5, 7, 9), (17, 19, 21), (9, 3, 15)]:
        p = pts[(slice(None),) + kji].numpy()
        expected = np.asarray(composite.TransformPoint(tuple(p)))
        np.testing.assert_allclose(p + phys[(0, slice(None)) + kji].numpy(), expected, atol=1e-6)

    # ... and resampling through that one field reproduces the composed resampling.
    again = resample_to_grid(img, SOURCE, target, displacement_mm=phys.float())[0, 0].double()
    assert (again - ours).abs().max() < 1e-4


def test_affine_only_fast_path_equals_the_point_path():
    """Without a displacement the sampling grid comes from affine_grid; with a zero displacement
    it goes through physical points and sample_at. Both must sample the same places."""
    target = SOURCE.centered_like((15, 17, 19), (1.3, 1.1, 1.7))
    img = torch.rand(2, 2, *SOURCE.shape)
    fast = resample_to_grid(img, SOURCE, target, matrix_lps=MATRIX)
    zero = torch.zeros(1, 3, *target.shape)
    slow = resample_to_grid(img, SOURCE, target, matrix_lps=MATRIX, displacement_mm=zero)
    assert (fast - slow).abs().max() < 1e-5
    fast_nn = resample_to_grid(img, SOURCE, target, MATRIX, interpolation="nearest")
    slow_nn = resample_to_grid(img, SOURCE, target, MATRIX, zero, interpolation="nearest")
    assert (fast_nn != slow_nn).float().mean() < 1e-3  # ties at exact half-voxels may differ


def test_physical_field_of_identity_is_zero_and_matrix_only_is_affine():
    grid = Grid.identity((6, 7, 8), (2.0, 1.0, 0.5))
    assert physical_field(None, None, grid).abs().max() == 0
    f = physical_field(MATRIX, None, grid, dtype=torch.float64)
    p = voxel_grid_points(grid, torch.float64)[0, :, 2, 3, 4].numpy()
    np.testing.assert_allclose(f[0, :, 2, 3, 4].numpy(), MATRIX[:3, :3] @ p + MATRIX[:3, 3] - p,
                               atol=1e-9)


def test_bad_inputs_raise():
    img = torch.zeros(1, 1, *SOURCE.shape)
    with pytest.raises(ValueError, match="source grid"):
        resample_to_grid(torch.zeros(1, 1, 4, 4, 4), SOURCE, SOURCE)
    with pytest.raises(ValueError, match="4x4"):
        resample_to_grid(img, SOURCE, SOURCE, matrix_lps=np.eye(3))
    with pytest.raises(ValueError, match="target grid"):
        resample_to_grid(img, SOURCE, SOURCE, displacement_mm=torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="interpolation"):
        resample_to_grid(img, SOURCE, SOURCE, interpolation="cubic")


def test_downsample_keeps_a_linear_ramp_and_the_physical_box():
    grid = Grid((17, 21, 25), (1.5, 1.0, 2.0), (3.0, -4.0, 1.0),
                tuple(_rotation((1, 1, 0), 30).ravel()))
    p = voxel_grid_points(grid, torch.float64)[0]
    ramp = (0.3 * p[0] - 0.2 * p[1] + 0.1 * p[2]).float()[None, None]
    small, level = downsample(ramp, grid, 2)
    assert level.shape == downsampled_shape(grid.shape, 2) == (9, 11, 13)
    np.testing.assert_allclose(level.corners(), grid.corners(), atol=1e-9)
    q = voxel_grid_points(level, torch.float64)[0]
    expected = 0.3 * q[0] - 0.2 * q[1] + 0.1 * q[2]
    # Gaussian blur keeps a linear function away from the replicated border.
    inner = (slice(2, -2),) * 3
    assert (small[0, 0].double() - expected)[inner].abs().max() < 1e-4


def test_gaussian_blur_preserves_mass_of_an_interior_blob():
    x = torch.zeros(1, 1, 21, 21, 21)
    x[0, 0, 10, 10, 10] = 1.0
    y = gaussian_blur(x, 1.5)
    assert abs(float(y.sum()) - 1.0) < 1e-5
    assert float(y[0, 0, 10, 10, 10]) < 0.1


def test_intensity_normalisation_uses_the_percentiles_torch_defines():
    """``normalize_intensity`` maps the 0.5th and 99.5th percentiles (linear interpolation, as
    ``torch.quantile``) to 0 and 1, with or without a mask, and clips outside."""
    import torch
    from deepreglib.core.preprocess import normalize_intensity
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 23, 31, 37, generator=g) ** 3 * 4000 - 100
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[..., 3:20, 5:25, 4:30] = True
    for m in (None, mask):
        v = x[m] if m is not None else x.reshape(-1)
        lo, hi = torch.quantile(v, 0.005), torch.quantile(v, 0.995)
        expected = ((x - lo) / (hi - lo)).clamp(0, 1)
        assert torch.allclose(normalize_intensity(x, mask=m), expected, rtol=0, atol=1e-6)
