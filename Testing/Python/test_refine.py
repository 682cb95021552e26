"""refine.py: SVF instance optimisation recovers a known smooth deformation.

The synthetic pair is made here from a smooth random velocity ``v`` (coarse noise upsampled):
``moving = warp(fixed, exp(-v))``, so the field that registers it is ``u_true = exp(v)``
(``moving(x + u_true(x)) = fixed(x)``). Endpoint error (EPE) is the mean ``|u - u_true|`` in
voxels over the interior (4 voxels in from each face, where the border padding decides).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepreglib.core.errors import BadInputError, CancelledError
from deepreglib.core.fields import integrate_velocity
from deepreglib.core.jacobian import jacobian_determinant
from deepreglib.core.losses import LocalNCC
from deepreglib.classic.optimise import iterative_register, refine_velocity
from deepreglib.core.resample import gaussian_blur
from deepreglib.core.warp import sample_at, warp

SIZE = 32


def _texture(n, seed):
    """Smooth random texture in [0, 1] (blurred noise, sigma 2 voxels): structure everywhere, so
    local NCC sees the deformation in every window."""
    g = torch.Generator().manual_seed(seed)
    tex = gaussian_blur(torch.rand(1, 1, n, n, n, generator=g), 2.0)
    return (tex - tex.min()) / (tex.max() - tex.min())


def _velocity(n, amplitude, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 5, 5, 5, generator=g)
    v = F.interpolate(coarse, size=(n, n, n), mode="trilinear", align_corners=True)
    return v * amplitude / v.abs().max()


def _pair(n=SIZE, amplitude=3.0, seed=0):
    fixed = _texture(n, seed)
    v = _velocity(n, amplitude, seed + 100)
    moving = warp(fixed, integrate_velocity(-v), padding="border")
    return fixed, moving, integrate_velocity(v)


def _epe(u, u_true, margin=4):
    inner = (slice(None), slice(None)) + (slice(margin, -margin),) * 3
    return float((u - u_true)[inner].norm(dim=1).mean())


@pytest.fixture(scope="module")
def pair():
    return _pair()


def test_refine_recovers_a_known_deformation_without_folding(pair):
    fixed, moving, u_true = pair
    start_epe = _epe(torch.zeros_like(u_true), u_true)
    assert start_epe > 0.8  # about a voxel on average, up to ~3 voxels
    v = refine_velocity(fixed, moving)
    assert v.shape == (1, 3) + (SIZE,) * 3
    u = integrate_velocity(v)
    lncc = LocalNCC()
    before = float(lncc(moving, fixed))
    after = float(lncc(warp(moving, u, padding="border"), fixed))
    assert after < 0.5 * before
    assert _epe(u, u_true) < 0.5 * start_epe
    assert float(jacobian_determinant(u).min()) > 0  # default smoothness: no folding


def test_half_resolution_refine_also_recovers_it(pair):
    fixed, moving, u_true = pair
    v = refine_velocity(fixed, moving, resolution=2, steps=40)
    assert v.shape == (1, 3) + (SIZE,) * 3
    assert _epe(integrate_velocity(v), u_true) < 0.5 * _epe(torch.zeros_like(u_true), u_true)


def test_identity_pair_stays_identity():
    fixed = _texture(20, seed=3)
    v = refine_velocity(fixed, fixed.clone(), steps=25)
    # Not exactly 0: Adam turns rounding-level gradients into steps of up to lr.
    assert float(integrate_velocity(v).abs().max()) < 0.15


def test_zero_steps_return_the_initial_velocity(pair):
    fixed, moving, _ = pair
    v0 = _velocity(SIZE, 1.0, seed=7)
    torch.testing.assert_close(refine_velocity(fixed, moving, velocity=v0, steps=0), v0)


def test_landmark_term_pulls_a_point_pair_together():
    image = _texture(20, seed=5)
    p = np.array([[10.0, 9.0, 8.0]])
    q = np.array([[12.5, 7.0, 9.0]])  # 3.4 voxels away; the images alone say "stay put"
    at = torch.tensor(p.T, dtype=torch.float32).view(1, 3, 1, 1, 1)
    v = refine_velocity(image, image.clone(), steps=40, fixed_points=p, moving_points=q)
    u_p = sample_at(integrate_velocity(v), at)[0, :, 0, 0, 0].numpy()
    assert np.linalg.norm(p[0] - q[0]) > 3.0
    assert np.linalg.norm(p[0] + u_p - q[0]) < 0.5


def test_label_term_aligns_label_maps_where_images_say_nothing():
    n = 20
    x = torch.arange(n, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(x, x, x, indexing="ij")
    fixed_labels = (((zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2) < 25).long()[None, None]
    moving_labels = (((zz - 12) ** 2 + (yy - 9) ** 2 + (xx - 10) ** 2) < 25).long()[None, None]
    flat = torch.zeros(1, 1, n, n, n)  # constant images: only the label term can move anything

    def dice(a, b):
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    assert dice(fixed_labels, moving_labels) < 0.7
    v = refine_velocity(flat, flat, steps=25, fixed_labels=fixed_labels * 1017,
                        moving_labels=moving_labels * 1017, label_weight=1.0)  # any label code
    warped = warp(moving_labels.float(), integrate_velocity(v), interpolation="nearest").long()
    assert dice(fixed_labels, warped) > 0.95
    # The pyramid carries the label maps to every level.
    v = iterative_register(flat, flat, levels=(2, 1), steps=(20, 20), final_resolution=1,
                           fixed_labels=fixed_labels, moving_labels=moving_labels)
    warped = warp(moving_labels.float(), integrate_velocity(v), interpolation="nearest").long()
    assert dice(fixed_labels, warped) > 0.9


def test_cancel_raises():
    fixed = _texture(16, seed=1)
    calls = []
    with pytest.raises(CancelledError):
        refine_velocity(fixed, fixed, steps=20, cancel=lambda: calls.append(1) or len(calls) > 2)
    assert len(calls) == 3
    with pytest.raises(CancelledError):
        iterative_register(fixed, fixed, levels=(2, 1), steps=(5, 5), cancel=lambda: True)


def test_iterative_register_from_zero_with_progress():
    fixed, moving, u_true = _pair(n=SIZE, amplitude=4.0, seed=11)
    fractions = []
    v = iterative_register(fixed, moving, progress=lambda f, msg: fractions.append(f))
    u = integrate_velocity(v)
    assert _epe(u, u_true) < 0.5 * _epe(torch.zeros_like(u_true), u_true)
    assert float(jacobian_determinant(u).min()) > 0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] == 1.0 and len(fractions) > 5


def test_bad_inputs_raise(pair):
    fixed, moving, _ = pair
    with pytest.raises(ValueError, match="same grid"):
        refine_velocity(fixed, moving[:, :, :-1])
    with pytest.raises(ValueError, match="velocity"):
        refine_velocity(fixed, moving, velocity=torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="resolution"):
        refine_velocity(fixed, moving, resolution=3)
    with pytest.raises(ValueError, match="both"):
        refine_velocity(fixed, moving, fixed_points=np.zeros((1, 3)))
    with pytest.raises(BadInputError, match="outside"):
        refine_velocity(fixed, moving, fixed_points=[[0, 0, 40.0]], moving_points=[[0, 0, 0.0]])
    with pytest.raises(ValueError, match="same length"):
        iterative_register(fixed, moving, levels=(2, 1), steps=(3,))
