"""The sparse fine level: the instance optimiser's last level on images finer than its pyramid's
(1 mm brains, whose pyramid runs on the 2 mm network grid), at a cost that grows with the
edges scored, not with the voxels.

Conventions: :mod:`deepreglib.core.conventions`. ``fixed`` and ``moving`` are on one grid (the
moving image already through the initial matrix and resampled), the field a displacement in
voxels of that grid. From the pyramid's field ``b`` the level optimises an increment ``d`` on a
grid ``field_factor`` coarser than the images (``u = b + d``), minimising::

    1/2 mean over the points p of (M(p + u(p)) - F(p))^2
      + smooth_weight * GradientSmoothness(d) + total_weight * GradientSmoothness(u)

where ``F`` and ``M`` are the images normalised locally once (mean and deviation over a
``window``^3 box, :func:`local_normalise`), so the squared difference is local NCC's, with the
moving statistics taken before the warp instead of after, and ``p`` runs over the ``fraction``
of the fixed image's foreground voxels with the strongest edges (:func:`edge_points`): the voxels
whose match moves the field. Flat inside tissue says nothing about the field; a dense similarity
pays for every such voxel at every step. The moving image is sampled at the points through its
precomputed slopes (:func:`~deepreglib.core.warp.sample_with_slopes`, the warped image's
gradient as in :func:`~deepreglib.core.warp.warp_image_gradient`), the field at the points by a
sparse matrix built once (:class:`~deepreglib.core.warp.PointInterpolation`).

Measured on validation data only (benchmarks/fine_level_study.py and docs/BENCHMARKS.md, "The
1 mm gap"): the finest level of the 2 mm pyramid leaves an endpoint error of about 1 mm on 1 mm
brains under a known deformation, which this level cuts by a quarter to a third.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from ..core.errors import CancelledError
from ..core.fields import resize_field
from ..core.losses import GradientSmoothness, box_sum_cumsum
from ..core.resample import downsampled_shape
from ..core.warp import PointInterpolation, image_with_slopes, sample_with_slopes
from .adam import Adam
from .instance import CancelFn, ProgressFn, foreground_box, uncrop, unfold
from .smoothing import smoothed
from .optimise import _check_pair

@dataclass(frozen=True)
class FineLevel:
    """One sparse level (module docstring): at most ``steps`` Adam steps of size ``lr`` (voxels
    of the images, decaying linearly to a tenth), ending early when the loss fell by less than
    ``tol`` over the last 10; the similarity at the ``fraction`` of the foreground (fixed
    intensity above ``threshold``) with the strongest edges, normalised over ``window``^3 boxes;
    the field on a grid ``field_factor`` coarser than the images, the parameters smoothed by
    ``smooth_passes`` 3x3x3 means; diffusion ``smooth_weight`` on the increment and
    ``total_weight`` on the whole field. The defaults are the ``balanced`` preset's
    (:data:`deepreglib.methods.instance.method.FINE_LEVELS`)."""

    steps: int = 20
    fraction: float = 0.5
    window: int = 5
    lr: float = 1.0
    smooth_weight: float = 2.0
    total_weight: float = 0.0
    field_factor: int = 2
    smooth_passes: int = 5
    tol: float = 1e-4
    threshold: float = 0.05

    def __post_init__(self):
        if self.steps < 0 or not 0.0 < self.fraction <= 1.0 or self.window < 1 or self.lr <= 0:
            raise ValueError(f"FineLevel needs steps >= 0, 0 < fraction <= 1, window >= 1 and lr > 0, "
                             f"got {self.steps}, {self.fraction}, {self.window}, {self.lr}")
        if self.field_factor < 1 or self.smooth_passes < 0 or self.smooth_weight < 0 or self.total_weight < 0:
            raise ValueError("FineLevel needs field_factor >= 1 and smooth_passes, smooth_weight, "
                             "total_weight >= 0")


def local_normalise(image: torch.Tensor, window: int = 5, eps: float = 1e-3) -> torch.Tensor:
    """``(image - local mean) / sqrt(local variance + eps)`` over ``window``^3 boxes (cut at the
    border), from running sums: the squared difference of two such images is, up to the
    variance floor, ``2 (1 - local correlation)``."""
    n = float(window ** 3)
    box = (window,) * 3
    mean = box_sum_cumsum(image, box) / n
    var = (box_sum_cumsum(image * image, box) / n - mean * mean).clamp_min(0.0)
    return (image - mean) / torch.sqrt(var + eps)


def edge_points(normalised: torch.Tensor, foreground: torch.Tensor, fraction: float) -> torch.Tensor:
    """Linear indices (ascending, i.e. memory order) of the ``fraction`` of the ``foreground``
    voxels where ``normalised`` ``(1, 1, D, H, W)`` has the largest gradient magnitude; at least
    one point when the foreground is not empty, none when it is."""
    g = image_with_slopes(normalised)[:, 1:].pow(2).sum(dim=1)[0]
    count = int(foreground.sum())
    k = max(1, int(fraction * count)) if count else 0
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=normalised.device)
    score = torch.where(foreground, g, torch.full_like(g, -1.0)).flatten()
    return torch.topk(score, k, sorted=False).indices.sort().values


def fine_register(fixed: torch.Tensor, moving: torch.Tensor, displacement: torch.Tensor,
                  level: FineLevel = FineLevel(), progress: ProgressFn = None,
                  cancel: CancelFn = None) -> Tuple[torch.Tensor, dict]:
    """Refine ``displacement`` ``(1, 3, D, H, W)`` (voxels of the pair's grid) by one sparse level
    (module docstring). ``fixed``, ``moving``: ``(1, 1, D, H, W)``, intensities in [0, 1].

    Returns ``(u, info)``: the refined displacement (detached; folding repaired by
    :func:`~deepreglib.classic.instance.unfold` on the field's grid, then on the images'), and
    ``steps``, ``points`` and the field's shape. Outside the foreground box the field is its
    border value, as the pyramid's."""
    _check_pair(fixed, moving)
    shape = tuple(fixed.shape[2:])
    if tuple(displacement.shape) != (1, 3) + shape:
        raise ValueError(f"displacement must be (1, 3, {', '.join(map(str, shape))}), got "
                         f"{tuple(displacement.shape)}")
    lo, hi = foreground_box(fixed, moving, threshold=level.threshold)
    box = (Ellipsis,) + tuple(slice(a, b) for a, b in zip(lo, hi))
    f_box, m_box = fixed[box].contiguous(), moving[box].contiguous()
    box_shape = tuple(f_box.shape[2:])
    u_box = displacement.detach()[box].contiguous()
    fn = local_normalise(f_box, level.window)
    table = image_with_slopes(local_normalise(m_box, level.window))
    idx = edge_points(fn, f_box[0, 0] > level.threshold, level.fraction)
    info = {"points": int(idx.numel()), "steps": 0}
    if idx.numel() == 0 or level.steps == 0:
        return displacement.detach().clone(), info
    h, w = box_shape[1], box_shape[2]
    kji = torch.stack([idx // (h * w), (idx // w) % h, idx % w]).to(fixed.dtype)
    target = fn.flatten()[idx]
    field_shape = downsampled_shape(box_shape, level.field_factor)
    info["field_shape"] = list(field_shape)
    scale = torch.tensor([(n - 1) / (o - 1) if o > 1 else 1.0 for n, o in zip(field_shape, box_shape)],
                         dtype=fixed.dtype, device=fixed.device).view(3, 1)
    interp = PointInterpolation(field_shape, kji * scale)
    base = resize_field(u_box, field_shape)
    p = torch.zeros_like(base).requires_grad_(True)
    optimiser = Adam([p], lr=level.lr, eps=1.0 / idx.numel())
    smooth = GradientSmoothness("l2")
    history = []
    for step in range(level.steps):
        if cancel is not None and cancel():
            raise CancelledError("instance optimisation cancelled")
        optimiser.lr = level.lr * (1.0 - 0.9 * step / max(level.steps - 1, 1))
        optimiser.zero_grad()
        d = smoothed(p, level.smooth_passes)
        q = base + d
        warped = sample_with_slopes(table, kji + interp(q) / scale)
        loss = 0.5 * (warped - target).pow(2).mean() + level.smooth_weight * smooth(d)
        if level.total_weight:
            loss = loss + level.total_weight * smooth(q)
        loss.backward()
        optimiser.step()
        history.append(float(loss.detach()))
        if progress is not None and (step % 5 == 0 or step == level.steps - 1):
            progress((step + 1) / level.steps, f"fine level: step {step + 1}, loss {history[-1]:.4f}")
        if len(history) > 10 and history[-11] - min(history[-10:]) < level.tol:
            break
    info["steps"] = len(history)
    with torch.no_grad():
        # repaired on the field's grid (cheap), then what the upsampling still folds at the
        # images' resolution (usually nothing: one Jacobian)
        q = unfold(base + smoothed(p.detach(), level.smooth_passes))
        u = unfold(resize_field(q, box_shape), iterations=5)
    return uncrop(u, lo, hi, shape), info
