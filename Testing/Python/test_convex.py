"""classic/convex.py (the coarse discrete step, after ConvexAdam): the cost volume's order and
values, identity in gives identity out, a known shift and a known smooth deformation are
recovered within a stated error, also across a contrast inversion, and the step runs inside
the instance optimiser as a schedule's ``convex``."""
import dataclasses

import pytest
import torch

from deepreglib.classic.convex import (ConvexStep, convex_register, cost_volume, coupled_argmin,
                                       displacement_labels)
from deepreglib.classic.instance import FROM_AFFINE, Schedule, instance_register
from deepreglib.core.errors import CancelledError
from deepreglib.core.jacobian import jacobian_determinant
from deepreglib.core.warp import warp

from test_instance import _blobs, _smooth_field, inverted_contrast_pair


def test_cost_volume_matches_a_brute_force_shift_and_is_zero_at_the_true_shift():
    g = torch.Generator().manual_seed(0)
    ff = torch.rand(1, 4, 9, 10, 8, generator=g)
    mf = torch.rand(1, 4, 9, 10, 8, generator=g)
    radius = 2
    cost = cost_volume(ff, mf, radius, patch=0)
    labels = displacement_labels(radius)
    assert cost.shape == (len(labels), 9, 10, 8) and labels.shape == (125, 3)
    padded = torch.nn.functional.pad(mf, (radius,) * 6, mode="replicate")
    for index in (0, 17, 62, 124):
        k, j, i = (int(v) + radius for v in labels[index])
        shifted = padded[:, :, k:k + 9, j:j + 10, i:i + 8]
        want = ((ff - shifted) ** 2).mean(1)[0]
        assert torch.allclose(cost[index], want, atol=1e-5), index
    assert torch.equal(labels[62], torch.zeros(3))  # the middle label is no motion

    # a moving image that is the fixed one shifted by (1, -2, 1) voxels: that label costs 0 inside
    shift = torch.tensor([1.0, -2.0, 1.0])
    big = torch.rand(1, 4, 15, 16, 14, generator=g)
    fixed = big[:, :, 3:12, 3:13, 3:11]
    moving = big[:, :, 2:11, 5:15, 2:10]  # moving(x + shift) = fixed(x)
    cost = cost_volume(fixed, moving, radius, patch=1)
    best = labels[cost[:, 2:-2, 2:-2, 2:-2].argmin(0).reshape(-1)]
    assert bool((best == shift).all())


def test_identity_in_identity_out():
    """Identical images: every voxel's cost is lowest at no motion, and the prior breaks the
    ties of flat regions towards it, so every label chosen is zero (exactly, without the
    refinement below a label); the parabola through a cost that is not symmetric about its
    minimum moves the vertex a little: within 0.1 voxel everywhere, 0.03 on average (0.069 and
    0.023 measured)."""
    f = _blobs()
    exact = convex_register(f, f.clone(), ConvexStep(subvoxel="off"))
    assert float(exact.abs().max()) == 0.0
    u = convex_register(f, f.clone())
    assert u.shape == (1, 3) + tuple(f.shape[2:])
    assert float(u.abs().max()) < 0.1 and float(u.norm(dim=1).mean()) < 0.03


def test_a_translation_beyond_the_gradient_steps_is_found():
    """A whole-object shift of (4, -4, 3) voxels (2, 2 and 1.5 feature voxels): recovered within
    0.5 voxel at the median inside the object (0.0 measured: the shift is on the label grid of
    the step's features at factor 2 except for the last axis, 0.5 voxel between two labels)."""
    f = _blobs(shape=(48, 52, 44))
    shift = torch.tensor([4.0, -4.0, 3.0]).view(1, 3, 1, 1, 1)
    truth = shift.expand(1, 3, *f.shape[2:])
    m = warp(f, -truth, padding="zeros")  # moving(x + shift) = fixed(x)
    u = convex_register(f, m, ConvexStep(factor=2, radius=3))
    inside = f[0, 0] > 0.05
    err = (u - truth).norm(dim=1)[0][inside]
    assert float(err.median()) < 0.8, float(err.median())
    assert float(jacobian_determinant(u).min()) > 0


def test_a_known_smooth_deformation_is_recovered_across_a_contrast_inversion():
    """MIND-SSC features hold for any contrast: the smooth field of up to 3 voxels of
    test_instance.py, the moving image's contrast inverted inside the object. The discrete step
    alone, its features at the images' resolution (this phantom is 40 voxels across: at half
    resolution MIND-SSC's neighbours span its blobs): median error below 0.85 voxel and below
    half the error before (0.70 from 1.59 measured; 0.60 on the same contrast; the Adam pyramid
    on MIND-SSC 0.70)."""
    f, inverted, want, inside = inverted_contrast_pair()
    before = float(want.norm(dim=1)[0][inside].median())
    u = convex_register(f, inverted, ConvexStep(factor=1, radius=3))
    err = float((u - want).norm(dim=1)[0][inside].median())
    assert err < 0.85 and err < 0.5 * before, (err, before)


def test_coupling_makes_the_field_smooth_and_keeps_a_clear_match():
    """With growing coupling a lone outlier among clear matches is pulled to its neighbours, and
    with no coupling the field is the per-voxel argmin smoothed."""
    labels = displacement_labels(1)
    shape = (6, 6, 6)
    cost = torch.ones(len(labels), *shape)
    right = 13 + 1  # label (0, 0, 1)
    assert torch.equal(labels[right], torch.tensor([0.0, 0.0, 1.0]))
    cost[right] = 0.0
    cost[:, 3, 3, 3] = 1.0
    cost[0, 3, 3, 3] = 0.9  # the outlier's own best: (-1, -1, -1), barely better than the rest
    u = coupled_argmin(cost.clone(), labels, lambdas=(1.0, 2.0, 5.0), smooth_passes=1, prior=0.0)
    assert torch.allclose(u[0, :, 3, 3, 3], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    loose = coupled_argmin(cost.clone(), labels, lambdas=(), smooth_passes=0, prior=0.0)
    assert torch.equal(loose[0, :, 3, 3, 3], torch.tensor([-1.0, -1.0, -1.0]))


def test_the_step_runs_inside_the_instance_optimiser_and_is_checked():
    """As a schedule's ``convex`` (built from a JSON dict as benchmarks/instance_tuning.py gives
    it); with no Adam steps the result is the discrete step's (on the foreground box)."""
    f = _blobs()
    truth = _smooth_field(f.shape[2:], 3.0)
    m = warp(f, -truth)
    only = Schedule(levels=(4, 2, 1), steps=(0, 0, 0), convex={"factor": 2, "radius": 3, "lambdas": [0.5, 1.0]})
    assert only.convex == ConvexStep(factor=2, radius=3, lambdas=(0.5, 1.0))
    u = instance_register(f, m, schedule=only)
    assert u.shape == (1, 3) + tuple(f.shape[2:]) and float(u.abs().max()) > 0.5
    both = dataclasses.replace(FROM_AFFINE, convex=ConvexStep())
    u2 = instance_register(f, m, schedule=both, displacement=torch.zeros_like(u))
    assert float((jacobian_determinant(u2) <= 0).float().mean()) == 0.0
    with pytest.raises(CancelledError):
        convex_register(f, m, cancel=lambda: True)
    for bad in ({"radius": 0}, {"radius": 2.5}, {"lambdas": (1.0, 0.5)}, {"factor": 0.5}, {"patch": -1},
                {"smooth_passes": -1}, {"prior": -1.0}):
        with pytest.raises(ValueError):
            ConvexStep(**bad)
    with pytest.raises(ValueError, match="features must be"):
        cost_volume(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), 1)


def test_the_instance_method_runs_the_discrete_step_alone_on_different_contrasts():
    """``--contrast different`` (similarity mind): the discrete step alone by default, the Adam
    pyramid on MIND-SSC with ``discrete=off``, the discrete step before the local NCC pyramid with
    ``discrete=on``; the manifest's method outputs say which ran."""
    from deepreglib.classic.instance import DIFFERENT_CONTRAST, SCHEDULES
    from deepreglib.core.errors import BadInputError
    from deepreglib.core.geometry import Grid
    from deepreglib.methods.base import RunContext
    from deepreglib.methods.registry import create_method

    def method(**options):
        return create_method("instance", torch.device("cpu"), **options)

    assert method(similarity="mind").schedule() is DIFFERENT_CONTRAST
    assert method(similarity="mind", schedule="accurate").schedule() is DIFFERENT_CONTRAST
    assert method(similarity="mind", discrete="off").schedule() is SCHEDULES["balanced"]
    assert method().schedule() is SCHEDULES["balanced"]
    on = method(discrete="on").schedule()
    assert on.convex is not None and on.steps == SCHEDULES["balanced"].steps
    with pytest.raises(BadInputError, match="discrete must be"):
        method(discrete="yes")
    f = _blobs()
    m = warp(f, -_smooth_field(f.shape[2:], 3.0))
    result = method(similarity="mind").run(f, m, Grid.identity(f.shape[2:]), RunContext())
    assert result.info["discrete"] is True and result.info["gradient_steps"] is False
    assert result.info["schedule"] == "different"
    assert float((jacobian_determinant(result.displacement) <= 0).float().mean()) == 0.0
