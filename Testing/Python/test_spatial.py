"""Spatial core: warp, fields, Jacobian (conventions in deepreglib.core.conventions)."""
import math

import numpy as np
import pytest
import torch

from deepreglib.core.fields import (affine_to_field, compose, integrate_velocity, invert_displacement,
                               invert_velocity, resize_field)
from deepreglib.core.jacobian import folding_fraction, jacobian_determinant, std_log_jacobian
from deepreglib.core.warp import SpatialTransformer, identity_grid, sample_at, warp


def smooth_field(shape, amplitude, seed=0, coarse=4):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(1, 3, coarse, coarse, coarse, generator=g, dtype=torch.float64)
    f = torch.nn.functional.interpolate(c, size=shape, mode="trilinear", align_corners=True)
    return amplitude * f / f.abs().max()


def blob(shape, centre, sigma=2.0):
    x = identity_grid(shape, torch.float64)
    c = torch.tensor(centre, dtype=torch.float64).view(1, 3, 1, 1, 1)
    return torch.exp(-((x - c) ** 2).sum(1, keepdim=True) / (2 * sigma ** 2))


def centroid(img):
    x = identity_grid(img.shape[2:], img.dtype)
    return ((x * img).sum((2, 3, 4)) / img.sum()).flatten()


def test_identity_warp_returns_image_exactly():
    img = torch.rand(2, 3, 6, 7, 8, dtype=torch.float64)
    out = warp(img, torch.zeros(1, 3, 6, 7, 8, dtype=torch.float64))
    assert torch.allclose(out, img, atol=1e-12)


def test_integer_translation_moves_blob_by_that_many_voxels():
    shape = (20, 22, 24)
    img = blob(shape, (10, 11, 12))
    u = torch.zeros(1, 3, *shape, dtype=torch.float64)
    u[:, 0], u[:, 1], u[:, 2] = 2.0, -3.0, 4.0  # pulls from x + u: content moves by -u
    moved = warp(img, u)
    assert torch.allclose(centroid(moved), torch.tensor([8.0, 14.0, 8.0], dtype=torch.float64), atol=1e-3)


def test_nearest_keeps_label_values():
    lab = torch.randint(0, 5, (1, 1, 8, 8, 8)).double()
    out = warp(lab, smooth_field((8, 8, 8), 1.5), interpolation="nearest")
    assert set(out.unique().tolist()) <= set(lab.unique().tolist())


def test_warp_rejects_bad_shapes():
    with pytest.raises(ValueError):
        warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError):
        warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 5))
    with pytest.raises(ValueError):
        sample_at(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 2, 2, 2), interpolation="cubic")


def test_warp_gradcheck():
    img = torch.rand(1, 1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    u = (0.3 * torch.rand(1, 3, 3, 3, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: SpatialTransformer()(a, b), (img, u))


def test_scaling_and_squaring_matches_dense_euler_integration():
    shape = (24, 24, 24)
    v = smooth_field(shape, 2.0, seed=1)
    u_ss = integrate_velocity(v, steps=10)
    # Euler: follow every voxel through dx/dt = v(x) in 512 small steps.
    x0 = identity_grid(shape, torch.float64)
    x = x0.clone()
    n = 256
    for _ in range(n):
        x = x + sample_at(v, x, padding="border") / n
    u_euler = x - x0
    err = (u_ss - u_euler).norm(dim=1)
    # voxels, for |v| up to 2 voxels varying over ~8 voxels: interpolation limits the worst case
    assert float(err.mean()) < 0.005 and float(err.max()) < 0.1, (float(err.mean()), float(err.max()))
    assert float(u_ss.abs().max()) > 1.0  # the test deforms for real


def test_inverse_velocity_composes_to_identity():
    v = smooth_field((24, 24, 24), 2.0, seed=2)
    u, w = integrate_velocity(v), invert_velocity(v)
    residual = compose(w, u).norm(dim=1)  # |x + u(x) + w(x + u(x)) - x|, voxels
    assert float(residual.mean()) < 0.015
    assert float(residual[:, 4:-4, 4:-4, 4:-4].max()) < 0.15


def test_invert_displacement_fixed_point():
    u = integrate_velocity(smooth_field((24, 24, 24), 2.0, seed=3))
    w = invert_displacement(u, iterations=40)
    residual = compose(w, u).norm(dim=1)
    assert float(residual.mean()) < 0.015
    assert float(residual[:, 4:-4, 4:-4, 4:-4].max()) < 0.15


def test_compose_equals_warping_twice():
    shape = (16, 16, 16)
    img = blob(shape, (8, 8, 8), sigma=4.0)
    a, b = smooth_field(shape, 1.5, seed=4), smooth_field(shape, 1.5, seed=5)
    twice = warp(warp(img, a), b)  # pull through a, then through b
    once = warp(img, compose(a, b))
    # two linear interpolations blur a little more than one: 3% of the peak at most
    assert float((twice - once)[..., 3:-3, 3:-3, 3:-3].abs().max()) < 0.03


def test_resize_field_keeps_affine_fields_exact():
    m = np.array([[1.05, 0.02, 0.0, 0.5], [0.0, 0.97, 0.03, -1.0], [0.01, 0.0, 1.02, 0.25], [0, 0, 0, 1]])
    small = affine_to_field(m, (9, 9, 9), torch.float64)
    big = resize_field(small, (17, 17, 17))
    # the same physical map: index scale s = 2, so the matrix in big-grid indices is S M S^-1
    s = np.diag([2.0, 2.0, 2.0, 1.0])
    expected = affine_to_field(s @ m @ np.linalg.inv(s), (17, 17, 17), torch.float64)
    assert torch.allclose(big, expected, atol=1e-9)


@pytest.mark.parametrize("old,new", [((5, 6, 4), (9, 11, 7)), ((9, 11, 7), (5, 6, 4)),
                                     ((3, 1, 4), (5, 4, 4)), ((2, 2, 2), (2, 5, 3))])
def test_resize_field_on_the_cpu_is_trilinear_interpolation_values_and_gradients(old, new):
    """The CPU path (three matrix products) gives F.interpolate's numbers, and its gradient."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 3, *old, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([(n - 1) / (o - 1) if o > 1 else 1.0 for n, o in zip(new, old)], dtype=u.dtype)
    ref = F.interpolate(u, size=new, mode="trilinear", align_corners=True) * scale.view(1, 3, 1, 1, 1)
    out = resize_field(u, new)
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn(ref.shape, generator=g, dtype=u.dtype)
    g_out, = torch.autograd.grad((out * w).sum(), u)
    g_ref, = torch.autograd.grad((ref * w).sum(), u)
    assert torch.allclose(g_out, g_ref, atol=1e-12)


def test_affine_to_field_translation():
    m = np.eye(4)
    m[:3, 3] = [1.0, 2.0, 3.0]
    u = affine_to_field(m, (4, 5, 6), torch.float64)
    assert torch.allclose(u[0, :, 1, 2, 3], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


@pytest.mark.parametrize("spacing", [None, (2.0, 0.5, 1.3)])
def test_jacobian_of_affine_field_is_its_determinant(spacing):
    a = np.array([[1.1, 0.1, 0.0], [0.05, 0.9, 0.02], [0.0, -0.1, 1.2]])
    m = np.eye(4)
    m[:3, :3] = a
    u = affine_to_field(m, (10, 11, 12), torch.float64)
    if spacing is not None:  # the same map in mm: u_mm = S u, grad in mm; determinant unchanged
        u = u * torch.tensor(spacing, dtype=torch.float64).view(1, 3, 1, 1, 1)
    jac = jacobian_determinant(u, spacing)
    assert torch.allclose(jac, torch.full_like(jac, float(np.linalg.det(a))), atol=1e-9)


def test_folding_and_sdlogj():
    u = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    jac = jacobian_determinant(u)
    assert folding_fraction(jac) == 0.0 and std_log_jacobian(jac) == 0.0
    u[0, 2, :, :, 4] = -3.0  # voxels at i=4 pull from i=1: neighbours cross over -> folding
    jac = jacobian_determinant(u)
    assert folding_fraction(jac) > 0.0
    assert std_log_jacobian(jac) > 0.1
    mask = torch.zeros_like(jac, dtype=torch.bool)
    mask[..., :2] = True
    assert folding_fraction(jac, mask) == 0.0


def test_diffeomorphic_integration_does_not_fold():
    u = integrate_velocity(smooth_field((16, 16, 16), 6.0, seed=6))
    assert float(jacobian_determinant(u).min()) > 0


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("depth", [37, 40])  # not a multiple of the slab count, and one that is
def test_split_sampler_equals_one_call(padding, depth, monkeypatch):
    """The CPU sampler that cuts a lone image's grid into per-thread slabs (core/warp._sample)
    gives the values and gradients of one ``F.grid_sample`` call."""
    from deepreglib.core import warp as warp_module
    shape = (depth, 36, 30)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 2, *shape, generator=g, dtype=torch.float64)
    u = smooth_field(shape, 4.0, seed=2)
    old = torch.get_num_threads()
    results = []
    try:
        for threads, minimum in ((1, 10 ** 9), (3, 1)):  # one call; then forced split into 3 slabs
            torch.set_num_threads(threads)
            monkeypatch.setattr(warp_module, "SPLIT_MIN_VOXELS", minimum)
            img = image.clone().requires_grad_(True)
            disp = u.clone().requires_grad_(True)
            out = warp(img, disp, padding=padding)
            (out * torch.linspace(0, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            results.append((out.detach(), img.grad, disp.grad))
    finally:
        torch.set_num_threads(old)
    (o1, gi1, gu1), (o2, gi2, gu2) = results
    assert torch.equal(o1, o2)
    assert torch.equal(gu1, gu2)
    assert torch.allclose(gi1, gi2, rtol=0, atol=1e-12)  # the image's gradient is summed over slabs


def test_separable_smoother_is_the_box_mean():
    from deepreglib.classic.smoothing import box_mean3
    u = torch.rand(1, 3, 9, 11, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    box = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(u, (1,) * 6, mode="replicate"), 3, stride=1)
    assert torch.allclose(box_mean3(u), box, rtol=0, atol=1e-14)
