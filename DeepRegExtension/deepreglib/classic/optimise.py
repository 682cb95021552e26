"""Instance optimisation of a stationary velocity field (the ``--refine N`` option) and the
weight-free ``iterative`` method. Conventions: :mod:`deepreglib.core.conventions`.

Both images are on the same grid (the fixed one, after initial alignment). The unknown is an SVF
``v`` ``(1, 3, D, H, W)`` in voxels, components ``(k, j, i)``; the deformation is
``u = integrate_velocity(v)`` (scaling and squaring, so it is diffeomorphic when integrated
finely enough) and the moving image is pulled through it, ``warped(x) = moving(x + u(x))``.
The loss minimised by Adam is::

    similarity(warped, fixed)
      + smooth_weight   * GradientSmoothness(v)          (diffusion on the *velocity*)
      + label_weight    * Dice(warped moving labels, fixed labels)        [optional]
      + landmark_weight * mean |p + u(p) - q|^2 (voxels^2)                [optional]

The smoothness term acts on the velocity rather than the displacement: it is the usual SVF
prior, cheap (no integration in its gradient), and keeps ``u`` smooth because the exponential of
a smooth field is smooth. Landmarks ``p`` (fixed) and ``q`` (moving) are voxel ``(k, j, i)``
positions; the field maps fixed points to moving points, so it should carry ``p`` onto ``q``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .align import make_similarity
from ..core.errors import BadInputError, CancelledError
from ..core.fields import integrate_velocity, resize_field
from ..core.geometry import Grid
from ..core.losses import DiceLoss, GradientSmoothness, one_hot
from ..core.resample import downsample, downsampled_shape
from ..core.warp import identity_grid, sample_at, warp
from .adam import Adam

ProgressFn = Optional[Callable[[float, str], None]]
CancelFn = Optional[Callable[[], bool]]


def _check_pair(fixed: torch.Tensor, moving: torch.Tensor) -> None:
    for name, x in (("fixed", fixed), ("moving", moving)):
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[:2] != (1, 1):
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"{name} must be a (1, 1, D, H, W) tensor, got {shape}")
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must be on "
                         "the same grid (resample the moving image first)")
    if min(fixed.shape[2:]) < 4:
        raise ValueError(f"every axis needs at least 4 voxels, got {tuple(fixed.shape[2:])}")


def _points(points, shape, name: str) -> torch.Tensor:
    p = torch.as_tensor(np.asarray(points, dtype=np.float64))
    if p.ndim != 2 or p.shape[1] != 3 or p.shape[0] == 0:
        raise ValueError(f"{name} must be (P, 3) voxel (k, j, i) positions, got {tuple(p.shape)}")
    if not torch.isfinite(p).all():
        raise BadInputError(f"{name} contains NaN or infinite coordinates")
    hi = torch.as_tensor(shape, dtype=p.dtype) - 1
    if (p < 0).any() or (p > hi).any():
        raise BadInputError(f"{name} has points outside the image (valid 0..{tuple(hi.tolist())})")
    return p


def _axis_scale(old: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """Per-axis factor from ``old``-grid voxels to ``new``-grid voxels (first/last centres fixed,
    ``ALIGN_CORNERS``)."""
    return torch.as_tensor([(n - 1) / (o - 1) for o, n in zip(old, new)], dtype=torch.float64)


def _resize_labels(labels: torch.Tensor, shape) -> torch.Tensor:
    """Nearest-neighbour label map on a pyramid grid (same first/last voxel centres)."""
    if tuple(labels.shape[2:]) == tuple(shape):
        return labels
    up = (1.0 / _axis_scale(labels.shape[2:], shape)).to(torch.float32).view(1, 3, 1, 1, 1)
    points = identity_grid(shape, torch.float32, labels.device) * up.to(labels.device)
    return sample_at(labels.float(), points, "nearest", "border").round().long()


def _label_maps(fixed_labels: torch.Tensor, moving_labels: torch.Tensor, dtype):
    """One-hot maps of both label images and the Dice loss over the foreground classes.
    Label values are renumbered to 0..K-1 first, so FreeSurfer-style codes (up to 2035) do not
    make thousands of empty channels."""
    if fixed_labels.dtype.is_floating_point or moving_labels.dtype.is_floating_point:
        raise ValueError("label maps must be integer tensors")
    values = torch.unique(torch.cat([fixed_labels.reshape(-1), moving_labels.reshape(-1)]))
    if int(values.min()) < 0:
        raise BadInputError(f"label values must be >= 0 (0 = background), got {int(values.min())}")
    values = torch.unique(torch.cat([values.new_zeros(1), values]))  # class 0 = background
    if len(values) < 2:
        raise BadInputError("the label maps contain only background; nothing to align")

    def encode(labels):
        return one_hot(torch.searchsorted(values, labels.long()), len(values)).to(dtype)

    return encode(fixed_labels), encode(moving_labels), DiceLoss(include_background=False)


class _Landmarks:
    """``mean_P |p + u(p) - q|^2`` in full-resolution voxels, with ``u`` given on a coarser grid."""

    def __init__(self, fixed_points, moving_points, shape, coarse_shape, dtype, device):
        p = _points(fixed_points, shape, "fixed_points")
        q = _points(moving_points, shape, "moving_points")
        if p.shape != q.shape:
            raise ValueError(f"fixed_points {tuple(p.shape)} and moving_points {tuple(q.shape)} "
                             "must pair up one to one")
        down = _axis_scale(shape, coarse_shape)
        self.p = p.to(dtype=dtype, device=device)
        self.q = q.to(dtype=dtype, device=device)
        self.at = (p * down).T.reshape(1, 3, -1, 1, 1).to(dtype=dtype, device=device)
        self.up = (1.0 / down).to(dtype=dtype, device=device)

    def residual(self, u_coarse: torch.Tensor) -> torch.Tensor:
        """``(P, 3)`` vectors ``p + u(p) - q`` (voxels)."""
        u = sample_at(u_coarse, self.at.to(u_coarse.dtype), "linear", "border")
        u = u.reshape(3, -1).T * self.up.to(u.dtype)
        return self.p.to(u.dtype) + u - self.q.to(u.dtype)

    def __call__(self, u_coarse: torch.Tensor) -> torch.Tensor:
        return (self.residual(u_coarse) ** 2).sum(1).mean()


def refine_velocity(fixed: torch.Tensor, moving: torch.Tensor,
                    velocity: Optional[torch.Tensor] = None, steps: int = 50, lr: float = 0.1,
                    similarity: str = "lncc", smooth_weight: float = 1.0, resolution: int = 1,
                    int_steps: int = 7, fixed_labels: Optional[torch.Tensor] = None,
                    moving_labels: Optional[torch.Tensor] = None, label_weight: float = 1.0,
                    fixed_points=None, moving_points=None, landmark_weight: float = 0.1,
                    similarity_options: Optional[dict] = None, progress: ProgressFn = None,
                    cancel: CancelFn = None) -> torch.Tensor:
    """Optimise an SVF so that ``moving(x + exp(v)(x))`` matches ``fixed``.

    Args:
        fixed, moving: ``(1, 1, D, H, W)`` on the same grid, intensities comparable (e.g. both
            normalised to [0, 1]).
        velocity: initial SVF ``(1, 3, D, H, W)`` in voxels ``(k, j, i)``; zeros if ``None``.
        steps: Adam steps (0 returns the initial velocity).
        lr: Adam step size in (optimisation-grid) voxels per step.
        similarity: a name in :data:`deepreglib.classic.align.SIMILARITIES` (``"lncc"``, ``"ncc"``,
            ``"mi"``, ``"mind"``, ``"mse"``); ``similarity_options`` go to its loss.
        smooth_weight: weight of ``GradientSmoothness("l2")`` of the velocity (dimensionless).
        resolution: 1, or 2 to optimise the velocity on a grid downsampled by 2 (integrated
            there, the displacement upsampled to warp the full-resolution images); the update is
            upsampled with :func:`fields.resize_field` and added to ``velocity``.
        int_steps: scaling-and-squaring steps.
        fixed_labels, moving_labels: optional ``(1, 1, D, H, W)`` integer label maps (0 =
            background); adds ``label_weight * (1 - mean foreground Dice)`` of the warped
            (linearly interpolated one-hot) moving labels.
        fixed_points, moving_points: optional ``(P, 3)`` voxel ``(k, j, i)`` pairs; adds
            ``landmark_weight * mean |p + u(p) - q|^2`` (voxels^2).
        progress: ``progress(fraction 0..1, message)``.
        cancel: returning True raises :class:`~deepreglib.core.errors.CancelledError`.
    Returns:
        SVF ``(1, 3, D, H, W)`` in voxels (detached).
    """
    _check_pair(fixed, moving)
    shape = tuple(fixed.shape[2:])
    device, dtype = fixed.device, fixed.dtype
    if velocity is None:
        velocity = torch.zeros(1, 3, *shape, dtype=dtype, device=device)
    if velocity.ndim != 5 or tuple(velocity.shape) != (1, 3) + shape:
        raise ValueError(f"velocity must be (1, 3, {', '.join(map(str, shape))}), got "
                         f"{tuple(velocity.shape)}")
    if resolution not in (1, 2):
        raise ValueError(f"resolution must be 1 or 2, got {resolution}")
    if steps < 0 or int_steps < 0:
        raise ValueError(f"steps and int_steps must be >= 0, got {steps}, {int_steps}")
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("give both fixed_labels and moving_labels, or neither")
    if (fixed_points is None) != (moving_points is None):
        raise ValueError("give both fixed_points and moving_points, or neither")
    velocity = velocity.detach().to(device=device, dtype=dtype)
    if steps == 0:
        return velocity

    coarse = downsampled_shape(shape, resolution)
    start = resize_field(velocity, coarse).detach()
    v = start.clone().requires_grad_(True)
    sim = make_similarity(similarity, **(similarity_options or {}))
    smooth = GradientSmoothness("l2")
    labels = None
    if fixed_labels is not None:
        if tuple(fixed_labels.shape) != tuple(fixed.shape) or \
                tuple(moving_labels.shape) != tuple(fixed.shape):
            raise ValueError(f"label maps must be {tuple(fixed.shape)}, got "
                             f"{tuple(fixed_labels.shape)} and {tuple(moving_labels.shape)}")
        labels = _label_maps(fixed_labels, moving_labels, dtype)
    landmarks = None
    if fixed_points is not None:
        landmarks = _Landmarks(fixed_points, moving_points, shape, coarse, dtype, device)

    optimiser = Adam([v], lr=lr)
    for step in range(steps):
        if cancel is not None and cancel():
            raise CancelledError("refinement cancelled")
        optimiser.zero_grad()
        u_coarse = integrate_velocity(v, int_steps)
        u = resize_field(u_coarse, shape)
        loss = sim(warp(moving, u, padding="border"), fixed) + smooth_weight * smooth(v)
        if labels is not None:
            fixed_oh, moving_oh, dice = labels
            loss = loss + label_weight * dice(warp(moving_oh, u, padding="border"), fixed_oh)
        if landmarks is not None:
            loss = loss + landmark_weight * landmarks(u_coarse)
        loss.backward()
        optimiser.step()
        if progress is not None and (step % 5 == 0 or step == steps - 1):
            progress((step + 1) / steps,
                     f"refine step {step + 1}/{steps}: loss {float(loss.detach()):.4f}")
    with torch.no_grad():
        return velocity + resize_field(v.detach() - start, shape)


def _level(image: torch.Tensor, factor: float) -> torch.Tensor:
    return downsample(image, Grid.identity(image.shape[2:]), factor)[0]


def iterative_register(fixed: torch.Tensor, moving: torch.Tensor,
                       levels: Sequence[float] = (4, 2, 1), steps: Sequence[int] = (80, 40, 20),
                       lr: float = 0.1, similarity: str = "lncc", smooth_weight: float = 1.0,
                       final_resolution: int = 2, int_steps: int = 7,
                       fixed_labels: Optional[torch.Tensor] = None,
                       moving_labels: Optional[torch.Tensor] = None, label_weight: float = 1.0,
                       fixed_points=None, moving_points=None, landmark_weight: float = 0.1,
                       similarity_options: Optional[dict] = None, progress: ProgressFn = None,
                       cancel: CancelFn = None) -> torch.Tensor:
    """The weight-free ``iterative`` method: coarse-to-fine SVF optimisation from zero.

    A diffeomorphic, demons-like optimiser on torch: at each pyramid level (images blurred and
    downsampled by the factor, :func:`resample.downsample`) the velocity from the previous level
    is upsampled (:func:`fields.resize_field`) and refined by :func:`refine_velocity`; at the
    last level (factor 1) the velocity lives at ``final_resolution`` (2 = half the voxels per
    axis, 8x cheaper, while the similarity still sees the full-resolution images).

    Args: as :func:`refine_velocity`; ``levels`` are downsampling factors coarse to fine and
        ``steps`` the Adam steps per level. Landmarks are in full-resolution voxels.
    Returns:
        SVF ``(1, 3, D, H, W)`` in voxels of the input grid.
    """
    _check_pair(fixed, moving)
    if len(levels) != len(steps) or not levels:
        raise ValueError(f"levels {tuple(levels)} and steps {tuple(steps)} must be non-empty and "
                         "of the same length")
    if any(f < 1 for f in levels):
        raise ValueError(f"levels must be >= 1, got {tuple(levels)}")
    shape = tuple(fixed.shape[2:])
    shapes = [downsampled_shape(shape, f) for f in levels]
    # Progress by work: a step costs about as much as the voxels it touches.
    work = np.array([n * np.prod(s) for n, s in zip(steps, shapes)], dtype=np.float64)
    bounds = np.concatenate([[0.0], np.cumsum(work) / max(work.sum(), 1.0)])

    velocity = None
    for index, (factor, n, level_shape) in enumerate(zip(levels, steps, shapes)):
        f_level, m_level = _level(fixed, factor), _level(moving, factor)
        velocity = (torch.zeros(1, 3, *level_shape, dtype=fixed.dtype, device=fixed.device)
                    if velocity is None else resize_field(velocity, level_shape))
        kwargs = {}
        if fixed_labels is not None:
            kwargs.update(fixed_labels=_resize_labels(fixed_labels, level_shape),
                          moving_labels=_resize_labels(moving_labels, level_shape),
                          label_weight=label_weight)
        if fixed_points is not None:
            scale = _axis_scale(shape, level_shape).numpy()
            kwargs.update(fixed_points=np.asarray(fixed_points, dtype=np.float64) * scale,
                          moving_points=np.asarray(moving_points, dtype=np.float64) * scale,
                          landmark_weight=landmark_weight)
        sub = None
        if progress is not None:
            lo, hi, tag = bounds[index], bounds[index + 1], f"level {index + 1}/{len(levels)}"
            sub = (lambda f, msg, lo=lo, hi=hi, tag=tag: progress(lo + f * (hi - lo),
                                                                  f"{tag}: {msg}"))
        last = index == len(levels) - 1 and level_shape == shape
        velocity = refine_velocity(f_level, m_level, velocity, steps=n, lr=lr,
                                   similarity=similarity, smooth_weight=smooth_weight,
                                   resolution=final_resolution if last else 1,
                                   int_steps=int_steps, similarity_options=similarity_options,
                                   progress=sub, cancel=cancel, **kwargs)
    if progress is not None:
        progress(1.0, "iterative registration done")
    return resize_field(velocity, shape)

