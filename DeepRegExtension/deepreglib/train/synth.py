"""Synthetic training and test data in the spirit of SynthMorph (Hoffmann et al., 2022).

Random label maps (argmax of smooth noise inside an ellipsoidal "head"), images rendered from
them with random contrast and acquisition artefacts, and random diffeomorphic (optionally rigid)
ground-truth deformations, plus a deterministic brain-like phantom for the bundled example pair.

Conventions: :mod:`deepreglib.core.conventions`. Images ``(1, 1, D, H, W)`` float in [0, 1]; label
maps ``(1, 1, D, H, W)`` long; fields ``(1, 3, D, H, W)`` in voxels, components ``(k, j, i)``,
pulling: ``warped(x) = moving(x + u(x))``.

Randomness comes only from the ``torch.Generator`` passed in (or one seeded from ``seed``); global
RNG state is never read or changed, so the same seed gives the same tensors. Random numbers are
drawn on the generator's device and moved to ``device``, so a CPU generator gives the same data
on any device (up to floating-point differences of the arithmetic).

Speed: smooth noise is a random coarse grid upsampled by three separable B-spline matrices
(matrix products, no full-resolution ``interpolate``), blur is separable matrix products too, and
the diffeomorphism is integrated on a half-resolution grid and upsampled (the velocity is
band-limited at 16 voxels; this differs from full-resolution integration by about 0.04 voxel on
average and up to about 0.4 voxel at the strongest default deformations). Full-resolution
integration costs about 3x the whole pair and is available with ``full_resolution=True``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..core.fields import affine_to_field, integrate_velocity, resize_field
from ..core.warp import warp

Shape = Tuple[int, int, int]
Scale = Union[float, Sequence[float]]


# -- validation and random draws -------------------------------------------------------------------
def _shape3(shape: Sequence[int], minimum: int = 2) -> Shape:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be 3 integers (D, H, W), got {shape!r}") from None
    if len(out) != 3 or min(out) < minimum:
        raise ValueError(f"shape must be 3 integers (D, H, W) each >= {minimum}, got {shape!r}")
    return out  # type: ignore[return-value]


def _scale3(scale: Scale) -> Tuple[float, float, float]:
    values = [float(scale)] * 3 if np.isscalar(scale) else [float(s) for s in scale]  # type: ignore
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"scale must be a positive number or 3 positive numbers, got {scale!r}")
    return values[0], values[1], values[2]


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _nonneg(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _rand(generator: torch.Generator, *size: int) -> torch.Tensor:
    """Uniform [0, 1) float64 draws on the generator's device (CPU tensors for a CPU generator)."""
    return torch.rand(size, generator=generator, dtype=torch.float64, device=generator.device)


def _randn(generator: torch.Generator, *size: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(size, generator=generator, dtype=dtype, device=generator.device)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * _rand(generator, 1)[0])


# -- smooth noise ----------------------------------------------------------------------------------
def _bspline(t: torch.Tensor, order: int) -> torch.Tensor:
    t = t.abs()
    if order == 1:
        return (1.0 - t).clamp(min=0.0)
    # cubic B-spline = the linear one convolved with itself at twice the width: a blurred trilinear
    return torch.where(t < 1.0, 2.0 / 3.0 - t ** 2 + 0.5 * t ** 3,
                       torch.where(t < 2.0, (2.0 - t) ** 3 / 6.0, torch.zeros_like(t)))


def _upsample_matrix(n: int, spacing: float, order: int, offset: float) -> torch.Tensor:
    """``(n, m)`` float64 matrix evaluating a B-spline with knots every ``spacing`` voxels, shifted
    by ``offset`` in [0, 1) knots, at voxels ``0..n-1``; columns are the ``m`` coarse nodes. Rows
    are scaled so that unit-variance node values give unit variance on average over the axis."""
    half = (order + 1) / 2.0
    coord = torch.arange(n, dtype=torch.float64) / spacing + offset + half
    m = int(math.floor(float(coord[-1]) + half)) + 1
    mat = _bspline(coord[:, None] - torch.arange(m, dtype=torch.float64)[None, :], order)
    return mat / mat.pow(2).sum(1).mean().sqrt()


def _separable(volume: torch.Tensor, mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Apply per-axis matrices ``(n_a, m_a)`` to ``volume`` ``(C, m_0, m_1, m_2)`` ->
    ``(C, n_0, n_1, n_2)``; three batched matrix products (BLAS), cheaper than 3D interpolation."""
    md, mh, mw = mats
    c = volume.shape[0]
    out = volume @ mw.t()                                    # (C, m0, m1, W)
    out = mh @ out                                           # (C, m0, H, W)
    out = md @ out.reshape(c, out.shape[1], -1)              # (C, D, H*W)
    return out.reshape(c, md.shape[0], mh.shape[0], mw.shape[0])


def smooth_noise(shape: Sequence[int], generator: torch.Generator, scale: Scale, channels: int = 1,
                 *, order: int = 1, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Band-limited random field: i.i.d. N(0, 1) values on a coarse grid with one node every
    ``scale`` voxels (random sub-node offset per axis), upsampled with B-spline weights.

    Args:
        shape: ``(D, H, W)`` of the output.
        generator: source of all randomness.
        scale: node spacing in voxels (a number, or one per axis); larger is smoother.
        channels: number of independent fields ``C``.
        order: 1 = trilinear interpolation of the coarse grid (the default); 3 = cubic B-spline,
            i.e. the trilinear field blurred once more (smooth derivatives), at the same cost.
    Returns:
        ``(1, C, D, H, W)``, mean 0, variance 1 on average over the volume (dimensionless).
    """
    _check_generator(generator)
    shape = _shape3(shape, minimum=1)
    spacing = _scale3(scale)
    if order not in (1, 3):
        raise ValueError(f"order must be 1 (trilinear) or 3 (cubic B-spline), got {order}")
    if int(channels) < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    offsets = _rand(generator, 3).tolist()
    mats = [_upsample_matrix(n, s, order, o).to(device=device, dtype=dtype)
            for n, s, o in zip(shape, spacing, offsets)]
    coarse = _randn(generator, int(channels), *(m.shape[1] for m in mats))
    out = _separable(coarse.to(device=device, dtype=dtype), mats)
    return out.unsqueeze(0)


def _gaussian_matrix(n: int, sigma: float, device, dtype) -> Optional[torch.Tensor]:
    if sigma < 0.1:  # below a tenth of a voxel the kernel is a delta: skip the work
        return None
    x = torch.arange(n, dtype=torch.float64)
    g = torch.exp(-0.5 * ((x[:, None] - x[None, :]) / sigma) ** 2)
    g[(x[:, None] - x[None, :]).abs() > 4 * sigma] = 0.0
    return (g / g.sum(1, keepdim=True)).to(device=device, dtype=dtype)  # rows renormalised at edges


def _blur(volume: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(1, C, D, H, W)`` with per-axis ``sigmas`` (voxels)."""
    _, c, d, h, w = volume.shape
    mats = [_gaussian_matrix(n, s, volume.device, volume.dtype) for n, s in zip((d, h, w), sigmas)]
    out = volume.reshape(c, d, h, w)
    if mats[2] is not None:
        out = out @ mats[2].t()
    if mats[1] is not None:
        out = mats[1] @ out
    if mats[0] is not None:
        out = (mats[0] @ out.reshape(c, d, h * w)).reshape(c, d, h, w)
    return out.reshape(1, c, d, h, w)


def _ellipsoid_radius(shape: Shape, radii: Sequence[float], device, dtype) -> torch.Tensor:
    """``(D, H, W)``: ellipsoidal radius about the grid centre, 1 on the surface of the ellipsoid
    with semi-axes ``radii`` given as fractions of each axis' half-extent ``(n - 1) / 2``."""
    total = None
    for axis, (n, r) in enumerate(zip(shape, radii)):
        half = max((n - 1) / 2.0, 0.5)
        p = (torch.arange(n, dtype=dtype, device=device) - (n - 1) / 2.0) / (half * r)
        view = [1, 1, 1]
        view[axis] = n
        term = (p ** 2).view(view)
        total = term if total is None else total + term
    return total.sqrt()


# -- label maps and images -------------------------------------------------------------------------
def random_label_map(shape: Sequence[int], generator: torch.Generator, num_labels: int = 16,
                     scale: Scale = 8, *, warp_std: float = 2.0, device="cpu") -> torch.Tensor:
    """Random anatomy-like label map (SynthMorph): argmax of ``num_labels - 1`` smooth noise
    channels inside a random ellipsoidal "head", label 0 (background) outside it.

    The head has semi-axes drawn uniformly in 0.6-0.9 of each half-extent and a smoothly perturbed
    surface; the whole map is then pulled through a random smooth (not necessarily invertible)
    displacement with std ``warp_std`` voxels for more varied shapes (0 disables).

    Returns:
        ``(1, 1, D, H, W)`` long with values in ``[0, num_labels - 1]``; 0 outside the head.
    """
    _check_generator(generator)
    shape = _shape3(shape)
    num_labels = int(num_labels)
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2 (background and one tissue), got {num_labels}")
    warp_std = _nonneg("warp_std", warp_std)
    spacing = _scale3(scale)

    radii = [_uniform(generator, 0.6, 0.9) for _ in range(3)]
    rough = smooth_noise(shape, generator, [2 * s for s in spacing], 1, order=3, device=device)
    inside = _ellipsoid_radius(shape, radii, device, torch.float32) < 1.0 + 0.08 * rough[0, 0]

    noise = smooth_noise(shape, generator, spacing, num_labels - 1, device=device)[0]
    # max(0).indices is several times faster than argmax(0) on CPU for this layout
    labels = noise.max(0).indices.add_(1)
    labels.masked_fill_(~inside, 0)
    labels = labels.view(1, 1, *shape)

    if warp_std > 0:
        w = smooth_noise(shape, generator, [2 * s for s in spacing], 3, order=3, device=device)
        labels = warp(labels.float(), w * warp_std, "nearest").long()
    return labels


def labels_to_image(labels: torch.Tensor, generator: torch.Generator,
                    same_as: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                    intensities: Optional[torch.Tensor] = None, *, num_labels: Optional[int] = None,
                    texture_std: float = 0.1, bias_std: float = 0.3, bias_scale: Scale = 32,
                    blur_max: float = 1.0, noise_std: float = 0.05, gamma_std: float = 0.25
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Render an image from a label map with random contrast and acquisition artefacts.

    In order: a mean intensity per label (label 0, background, uniform in [0, 0.05]; others
    uniform in [0, 1]); within-label Gaussian noise with a per-label std uniform in
    ``[0, texture_std]``; a multiplicative bias field ``exp(b)``, ``b`` smooth noise (node spacing
    ``bias_scale`` voxels) with std uniform in ``[0, bias_std]``; a Gaussian blur with per-axis
    sigma uniform in ``[0, blur_max]`` voxels; additive Gaussian noise with std uniform in
    ``[0, noise_std]``; min-max normalisation; a gamma ``exp(N(0, gamma_std))``. Setting an
    amplitude to 0 switches that step off.

    Args:
        labels: ``(1, 1, D, H, W)`` integer label map, values in ``[0, num_labels - 1]``.
        generator: source of all randomness.
        same_as: the ``(image, intensities)`` result of an earlier call: reuse its label means
            (same contrast, e.g. for a pair trained with NCC). Exclusive with ``intensities``.
        intensities: ``(num_labels,)`` label means to reuse; ``None`` draws new ones
            (a new contrast).
        num_labels: number of labels; default ``len(intensities)`` or ``labels.max() + 1``.
    Returns:
        ``image`` ``(1, 1, D, H, W)`` float32 in [0, 1] on ``labels``' device, and the label
        means ``(num_labels,)`` float32 (on the same device) used before the artefacts.
    """
    _check_generator(generator)
    if labels.ndim != 5 or labels.shape[:2] != (1, 1):
        raise ValueError(f"labels must be (1, 1, D, H, W), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if same_as is not None:
        if intensities is not None:
            raise ValueError("pass either same_as or intensities, not both")
        intensities = same_as[1]
    texture_std, bias_std = _nonneg("texture_std", texture_std), _nonneg("bias_std", bias_std)
    blur_max, noise_std = _nonneg("blur_max", blur_max), _nonneg("noise_std", noise_std)
    gamma_std = _nonneg("gamma_std", gamma_std)
    device = labels.device
    shape = tuple(labels.shape[2:])
    lab = labels[0, 0].long()
    lo, hi = int(lab.min()), int(lab.max())
    if num_labels is None:
        num_labels = len(intensities) if intensities is not None else hi + 1
    if lo < 0 or hi >= num_labels:
        raise ValueError(f"label values must be in [0, {num_labels - 1}], got [{lo}, {hi}]")

    if intensities is None:
        means = _rand(generator, num_labels)
        means[0] *= 0.05
        means = means.to(device=device, dtype=torch.float32)
    else:
        means = torch.as_tensor(intensities).to(device=device, dtype=torch.float32).reshape(-1)
        if means.numel() != num_labels:
            raise ValueError(f"intensities must have {num_labels} values, got {means.numel()}")
    image = means[lab]

    if texture_std > 0:
        stds = (_rand(generator, num_labels) * texture_std).to(device=device, dtype=torch.float32)
        image = image + stds[lab] * _randn(generator, *shape).to(device)
    image = image.view(1, 1, *shape)
    if bias_std > 0:
        amp = _uniform(generator, 0.0, bias_std)
        bias = smooth_noise(shape, generator, bias_scale, 1, order=3, device=device)
        image = image * torch.exp(amp * bias)
    if blur_max > 0:
        image = _blur(image, [_uniform(generator, 0.0, blur_max) for _ in range(3)])
    if noise_std > 0:
        amp = _uniform(generator, 0.0, noise_std)
        image = image + amp * _randn(generator, *shape).to(device).view(1, 1, *shape)
    image = _min_max(image)
    if gamma_std > 0:
        gamma = math.exp(gamma_std * float(_randn(generator, 1, dtype=torch.float64)[0]))
        image = image.pow(gamma)  # keeps 0 and 1 fixed, so the range stays [0, 1]
    return image.clamp_(0.0, 1.0), means


def _min_max(image: torch.Tensor) -> torch.Tensor:
    lo, hi = image.min(), image.max()
    return (image - lo) / (hi - lo).clamp(min=1e-8)


# -- deformations ----------------------------------------------------------------------------------
def random_velocity(shape: Sequence[int], generator: torch.Generator, max_std: float = 3.0,
                    scale: Scale = 16, *, std: Optional[float] = None,
                    device="cpu") -> torch.Tensor:
    """Smooth random stationary velocity field (SVF).

    Each component is cubic-B-spline smooth noise with nodes every ``scale`` voxels, scaled to a
    std drawn uniformly in ``[0, max_std]`` voxels (SynthMorph), or exactly ``std`` when given.
    Returns ``(1, 3, D, H, W)`` float32 in voxels, components ``(k, j, i)``.
    """
    _check_generator(generator)
    shape = _shape3(shape)
    max_std = _nonneg("max_std", max_std)
    amp = _uniform(generator, 0.0, max_std) if std is None else _nonneg("std", std)
    return smooth_noise(shape, generator, scale, 3, order=3, device=device) * amp


def _integration_shape(shape: Shape, scale: Scale, full_resolution: bool) -> Shape:
    # Half resolution only for fields smooth over >= 8 voxels, where its error stays sub-voxel.
    if full_resolution or min(_scale3(scale)) < 8 or min(shape) < 16:
        return shape
    return tuple((n - 1) // 2 + 1 for n in shape)  # type: ignore[return-value]


def _integrate(velocity: torch.Tensor, scale: Scale, steps: int, full_resolution: bool
               ) -> torch.Tensor:
    shape = tuple(velocity.shape[2:])
    coarse = _integration_shape(shape, scale, full_resolution)  # type: ignore[arg-type]
    if coarse == shape:
        return integrate_velocity(velocity, steps)
    return resize_field(integrate_velocity(resize_field(velocity, coarse), steps), shape)


def random_displacement(shape: Sequence[int], generator: torch.Generator, max_std: float = 3.0,
                        scale: Scale = 16, steps: int = 7, *, std: Optional[float] = None,
                        full_resolution: bool = False, device="cpu"
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random diffeomorphic displacement: :func:`random_velocity` integrated by scaling and
    squaring (:func:`deepreglib.core.fields.integrate_velocity`, ``steps`` squarings).

    For speed (unless ``full_resolution``) the integration runs on a half-resolution grid when
    ``scale >= 8`` and every axis has >= 16 voxels, and the result is upsampled; it then equals
    ``integrate_velocity(velocity, steps)`` to about 0.04 voxel on average and 0.4 voxel at most
    for component std 3 voxels (errors scale roughly with the std squared).
    Returns ``(displacement, velocity)``, both ``(1, 3, D, H, W)`` float32 in voxels, ``(k, j, i)``.
    """
    if int(steps) < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    velocity = random_velocity(shape, generator, max_std, scale, std=std, device=device)
    return _integrate(velocity, scale, int(steps), full_resolution), velocity


# -- rigid poses (float64 numpy) -------------------------------------------------------------------
def rotation_matrix(axis, angle: float) -> np.ndarray:
    """Rodrigues' formula: 3x3 float64 numpy rotation by ``angle`` radians (right-handed) about
    ``axis`` (3 numbers, any non-zero length, in the same coordinates the matrix acts on)."""
    a = np.asarray(axis, dtype=np.float64).reshape(-1)
    if a.shape != (3,):
        raise ValueError(f"axis must have 3 components, got shape {a.shape}")
    norm = np.linalg.norm(a)
    if not norm > 1e-12:
        raise ValueError(f"axis must be non-zero, got {a.tolist()}")
    a = a / norm
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)


def random_rigid(generator: torch.Generator, max_angle: float = math.pi,
                 max_translation: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """Random rigid pose: a rotation by an angle uniform in ``(-max_angle, max_angle)`` radians
    about an axis uniform on the unit sphere, and a translation with each component uniform in
    ``(-max_translation, max_translation)``.

    Returns float64 numpy ``R`` (3x3, orthonormal, det +1) and ``t`` (3,). Used on voxel indices
    ``(k, j, i)`` they are a rigid motion in physical space only for isotropic voxels, as the
    synthetic images here are.
    """
    _check_generator(generator)
    max_angle = _nonneg("max_angle", max_angle)
    max_translation = _nonneg("max_translation", max_translation)
    axis = _randn(generator, 3, dtype=torch.float64).cpu().numpy()
    while np.linalg.norm(axis) < 1e-6:  # measure-zero event; redraw rather than divide by ~0
        axis = _randn(generator, 3, dtype=torch.float64).cpu().numpy()
    u = _rand(generator, 4).cpu().numpy()
    angle = (2.0 * u[0] - 1.0) * max_angle
    t = (2.0 * u[1:] - 1.0) * max_translation
    return rotation_matrix(axis, angle), t


def rigid_matrix(rotation, translation, center) -> np.ndarray:
    """4x4 float64 numpy homogeneous map ``x -> R (x - c) + c + t`` (rotation about ``center``)."""
    r = np.asarray(rotation, dtype=np.float64)
    t = np.asarray(translation, dtype=np.float64).reshape(-1)
    c = np.asarray(center, dtype=np.float64).reshape(-1)
    if r.shape != (3, 3) or t.shape != (3,) or c.shape != (3,):
        raise ValueError(f"expected R 3x3, t (3,), center (3,), got {r.shape}, {t.shape}, "
                         f"{c.shape}")
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c + t - r @ c
    return m


# -- pairs -----------------------------------------------------------------------------------------
@dataclass
class SyntheticPair:
    """A registration pair with its ground truth, all on the fixed grid ``(D, H, W)``.

    Attributes:
        fixed, moving: ``(1, 1, D, H, W)`` float32 images in [0, 1].
        fixed_labels, moving_labels: ``(1, 1, D, H, W)`` long label maps;
            ``fixed_labels == warp(moving_labels.float(), displacement, "nearest")`` exactly.
        displacement: ``(1, 3, D, H, W)`` float32 ground truth in voxels ``(k, j, i)`` on the
            fixed grid: ``warp(moving, displacement) ~ fixed``.
        velocity: ``(1, 3, D, H, W)`` SVF of the deformable part: ``integrate_velocity(velocity)``
            is the displacement when there is no rigid part (up to the half-resolution
            integration error stated in :func:`random_displacement`; exact with
            ``full_resolution=True``).
        seed: the seed that reproduces the pair.
        rigid_kji: 4x4 float64 numpy map from fixed ``(k, j, i)`` to moving ``(k, j, i)``, or
            ``None``. With it, ``x + displacement(x) = rigid_kji (x + integrate_velocity(v)(x))``.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor
    moving_labels: torch.Tensor
    displacement: torch.Tensor
    velocity: torch.Tensor
    seed: int
    rigid_kji: Optional[np.ndarray] = None

    def to(self, device) -> "SyntheticPair":
        """A copy with every tensor on ``device``."""
        names = ("fixed", "moving", "fixed_labels", "moving_labels", "displacement", "velocity")
        return replace(self, **{n: getattr(self, n).to(device) for n in names})


def _with_rigid(u_deform: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """DDF of ``x -> A (x + u(x))`` (deform on the fixed grid, then the rigid pose). Equals
    ``compose(affine_to_field(A), u)`` but is exact where ``x + u`` leaves the grid, because an
    affine field is evaluated analytically instead of interpolated with border padding."""
    shape = tuple(u_deform.shape[2:])
    rot = torch.as_tensor(matrix[:3, :3], dtype=u_deform.dtype, device=u_deform.device)
    rotated = torch.einsum("pc,ncdhw->npdhw", rot, u_deform)
    return affine_to_field(matrix, shape, u_deform.dtype, u_deform.device) + rotated


def synth_pair(shape: Sequence[int], seed: int, num_labels: int = 16, max_std: float = 3.0,
               same_contrast: bool = True, rigid_angle: float = 0.0,
               rigid_translation: float = 0.0, *, scale: Scale = 16, label_scale: Scale = 8,
               image_options: Optional[Dict[str, float]] = None, full_resolution: bool = False,
               device="cpu") -> SyntheticPair:
    """One synthetic pair with known ground truth (deterministic in ``seed``).

    A random label map becomes the moving labels; a random diffeomorphism (std up to ``max_std``
    voxels, nodes every ``scale`` voxels), optionally followed by a random rigid pose about the
    image centre (angle up to ``rigid_angle`` radians, translation up to ``rigid_translation``
    voxels per axis), gives the displacement; the fixed labels are the moving labels pulled
    through it (nearest). Both images are rendered by :func:`labels_to_image` with independent
    artefacts and, when ``same_contrast``, the same label means. ``image_options`` are keyword
    arguments for :func:`labels_to_image` (e.g. ``noise_std=0``); ``full_resolution`` is passed
    to :func:`random_displacement`.
    """
    shape = _shape3(shape, minimum=4)
    rigid_angle = _nonneg("rigid_angle", rigid_angle)
    rigid_translation = _nonneg("rigid_translation", rigid_translation)
    seed = int(seed)
    g = torch.Generator().manual_seed(seed)
    moving_labels = random_label_map(shape, g, num_labels, label_scale, device=device)
    u, velocity = random_displacement(shape, g, max_std, scale, full_resolution=full_resolution,
                                      device=device)
    rigid = None
    if rigid_angle > 0 or rigid_translation > 0:
        rot, t = random_rigid(g, rigid_angle, rigid_translation)
        rigid = rigid_matrix(rot, t, (np.asarray(shape, dtype=np.float64) - 1) / 2)
        u = _with_rigid(u, rigid)
    fixed_labels = warp(moving_labels.float(), u, "nearest").long()
    opts = dict(image_options or {})
    moving, means = labels_to_image(moving_labels, g, num_labels=num_labels, **opts)
    fixed, _ = labels_to_image(fixed_labels, g, intensities=means if same_contrast else None,
                               num_labels=num_labels, **opts)
    return SyntheticPair(fixed, moving, fixed_labels, moving_labels, u, velocity, seed, rigid)


def collate_pairs(pairs: Sequence[SyntheticPair]) -> SyntheticPair:
    """Batch pairs of the same shape along N (a ``collate_fn`` for ``DataLoader``): tensors become
    ``(N, ...)``, ``seed`` a list of seeds, ``rigid_kji`` an ``(N, 4, 4)`` array or ``None``."""
    if not pairs:
        raise ValueError("need at least one pair to collate")
    names = ("fixed", "moving", "fixed_labels", "moving_labels", "displacement", "velocity")
    cat = {n: torch.cat([getattr(p, n) for p in pairs], 0) for n in names}
    rigid = None
    if any(p.rigid_kji is not None for p in pairs):
        rigid = np.stack([np.eye(4) if p.rigid_kji is None else p.rigid_kji for p in pairs])
    return SyntheticPair(seed=[p.seed for p in pairs], rigid_kji=rigid, **cat)  # type: ignore


def pair_seed(base_seed: int, index: int) -> int:
    """The seed of item ``index`` of a stream with ``base_seed`` (decorrelated by SeedSequence)."""
    if int(index) < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    state = np.random.SeedSequence([int(base_seed) % 2 ** 64, int(index)]).generate_state(2)
    return int(state[0]) << 31 | int(state[1]) >> 1  # 62 bits, a valid torch seed


class SyntheticPairs(IterableDataset):
    """Stream of :func:`synth_pair` pairs for training.

    Item ``i`` is always ``synth_pair(shape, pair_seed(seed, i), **pair_kwargs)``, whatever the
    number of ``DataLoader`` workers (worker ``w`` of ``n`` yields items ``start + w``,
    ``start + w + n``, ...), so a run resumes exactly by passing ``start``. Infinite when
    ``length`` is ``None``; otherwise items ``start .. length - 1``. Batch with
    :func:`collate_pairs` (or ``batch_size=None``).
    """

    def __init__(self, shape: Sequence[int], seed: int = 0, length: Optional[int] = None,
                 start: int = 0, **pair_kwargs):
        super().__init__()
        self.shape = _shape3(shape, minimum=4)
        self.seed = int(seed)
        if length is not None and int(length) < 0:
            raise ValueError(f"length must be >= 0 or None, got {length}")
        if int(start) < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.length = None if length is None else int(length)
        self.start = int(start)
        self.pair_kwargs = pair_kwargs

    def pair(self, index: int) -> SyntheticPair:
        """Item ``index`` of the stream."""
        return synth_pair(self.shape, pair_seed(self.seed, index), **self.pair_kwargs)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an infinite SyntheticPairs stream has no length")
        return max(0, self.length - self.start)

    def __iter__(self) -> Iterator[SyntheticPair]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.start + worker
        while self.length is None or index < self.length:
            yield self.pair(index)
            index += workers


# -- brain phantom ---------------------------------------------------------------------------------
#: Phantom tissue classes and their T1-like intensities (skull is bright but labelled background).
PHANTOM_LABELS = {"background": 0, "grey": 1, "white": 2, "csf": 3}
_INTENSITY = {"background": 0.0, "skull": 0.9, "csf": 0.12, "grey": 0.45, "white": 0.75}


def _phantom_anatomy(shape: Shape, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Noise-free phantom ``(image, labels)``, each ``(1, 1, D, H, W)``; see
    :func:`brain_phantom`."""
    d, h, w = shape
    axes = [(torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0) / max((n - 1) / 2.0, 0.5)
            for n in shape]
    pk, pj, pi = (a.view(v) for a, v in zip(axes, ((d, 1, 1), (1, h, 1), (1, 1, w))))
    # normalised coordinates in [-1, 1]; k = z (inferior-superior), j = y, i = x (left-right)
    outline = smooth_noise(shape, generator, 24, 1, order=3)[0, 0]
    rho = _ellipsoid_radius(shape, (0.86, 0.9, 0.84), "cpu", torch.float32) + 0.015 * outline
    folds = smooth_noise(shape, generator, 8, 1, order=3)[0, 0]
    texture = smooth_noise(shape, generator, 3, 1, order=3)[0, 0]

    labels = torch.zeros(shape, dtype=torch.long)
    image = torch.zeros(shape, dtype=torch.float32)
    head = rho < 1.0
    skull = head & (rho >= 0.9)
    csf = head & (rho < 0.9)
    brain = rho < 0.83 + 0.015 * folds
    # sulci: thin sheets along the zero level set of the fold field, cutting the outer cortex;
    # white matter reaches into the gyri between them and recedes under the sulci
    sulci = (folds.abs() < 0.12) & (rho > 0.62)
    white = rho < 0.56 + 0.14 * folds.abs().clamp(max=1.0)
    fissure = (pi.abs() < 0.025) & (pk > -0.3) & (rho > 0.55)  # interhemispheric fissure
    grey = brain & ~white & ~sulci & ~fissure
    white = white & ~fissure
    deep_grey = (((pk + 0.08) / 0.14) ** 2 + ((pj - 0.05) / 0.18) ** 2
                 + ((pi.abs() - 0.22) / 0.09) ** 2) < 1.0
    ventricles = (((pk - 0.08) / 0.12) ** 2 + ((pj + 0.02 * torch.cos(3 * pj)) / 0.34) ** 2
                  + ((pi.abs() - 0.09) / 0.055) ** 2) < 1.0 + 0.1 * folds

    for region, name in ((skull, "skull"), (csf, "csf"), (grey, "grey"), (white, "white"),
                         (deep_grey & white, "grey"), (ventricles & brain, "csf")):
        image[region] = _INTENSITY[name]
        labels[region] = PHANTOM_LABELS.get(name, 0)
    image = image * (1.0 + 0.03 * texture * (labels > 0))
    return image.view(1, 1, *shape), labels.view(1, 1, *shape)


def _acquire(anatomy: torch.Tensor, generator: torch.Generator, noise_std: float) -> torch.Tensor:
    """Mild scanner effects on a phantom image: smooth bias, slight blur, white noise, [0, 1]."""
    shape = tuple(anatomy.shape[2:])
    bias = torch.exp(0.05 * smooth_noise(shape, generator, 48, 1, order=3))
    image = _blur(anatomy * bias, (0.6, 0.6, 0.6))
    image = image + noise_std * _randn(generator, *shape).view(1, 1, *shape)
    return image.clamp_(0.0, 1.0)


def brain_phantom(shape: Sequence[int] = (96, 112, 96), seed: int = 0
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A deterministic brain-like phantom (T1-like contrast).

    An ellipsoidal head with a bright skull-like ring (labelled background), a CSF-like rim, a
    grey-matter-like cortex whose boundaries are folded by smooth noise, white matter, deep grey
    nuclei, dark ventricle-like blobs either side of the midline and a midline fissure, with a
    mild bias field, blur and noise. The head's long axis is H (anterior-posterior).

    Returns:
        ``image`` ``(1, 1, D, H, W)`` float32 in [0, 1] and ``labels`` ``(1, 1, D, H, W)`` long:
        0 background (and skull), 1 grey-like, 2 white-like, 3 CSF-like (:data:`PHANTOM_LABELS`).
    """
    shape = _shape3(shape, minimum=8)
    g = torch.Generator().manual_seed(int(seed))
    anatomy, labels = _phantom_anatomy(shape, g)
    return _acquire(anatomy, g, 0.01), labels


def example_pair(shape: Sequence[int] = (96, 112, 96), seed: int = 0, *, std: float = 2.5,
                 scale: Scale = 24) -> SyntheticPair:
    """The bundled example: a phantom (moving) and the same phantom pulled through a known smooth
    diffeomorphism (fixed), each with its own mild bias and noise.

    The deformation is :func:`random_displacement` with component std exactly ``std`` voxels and
    nodes every ``scale`` voxels. ``fixed_labels`` is the nearest-neighbour pull of
    ``moving_labels``; ``fixed`` is the linear pull of the noise-free moving anatomy.
    """
    shape = _shape3(shape, minimum=8)
    seed = int(seed)
    g = torch.Generator().manual_seed(seed)
    anatomy, moving_labels = _phantom_anatomy(shape, g)
    u, velocity = random_displacement(shape, g, scale=scale, std=std)
    fixed_anatomy = warp(anatomy, u)
    fixed_labels = warp(moving_labels.float(), u, "nearest").long()
    moving = _acquire(anatomy, g, 0.01)
    fixed = _acquire(fixed_anatomy, g, 0.01)
    return SyntheticPair(fixed, moving, fixed_labels, moving_labels, u, velocity, seed, None)
