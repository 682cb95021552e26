"""A coarse discrete step before the instance optimiser's pyramid, for deformations larger than
its gradient steps can find: a search over every displacement of a small range, then a coupled
convex optimisation that makes the chosen displacements smooth, after ConvexAdam (Siebert,
Hansen and Heinrich, MICCAI 2021, and the discrete-continuous coupling of Heinrich et al.,
"Non-parametric discrete registration with convex optimisation", WBIR 2014).

Conventions: :mod:`deepreglib.core.conventions`. ``fixed`` and ``moving`` are on one grid (the
moving image already through the initial matrix), the field a displacement in voxels of that
grid, ``warped(x) = moving(x + u(x))``.

1. **Features** on a grid ``factor`` coarser than the images: MIND-SSC (12 channels,
   :func:`~deepreglib.core.losses.mind_ssc`), which holds for any contrast and is what
   ConvexAdam matches, so the step serves local NCC and MIND-SSC runs alike.
2. **The cost of every displacement** ``s`` in ``[-radius, radius]^3`` (whole voxels of the
   feature grid) at every feature voxel ``x``: the squared feature distance
   ``|F(x) - M(x + s)|^2`` averaged over a ``(2 patch + 1)^3`` box around ``x``. Whole-voxel
   shifts need no interpolation: each is a slice of the padded moving features.
3. **Coupled convex optimisation.** ``d`` minimises the cost at each voxel on its own
   (``argmin_s C(x, s)``, a global optimum per voxel, found by enumeration); then, for
   increasing coupling weights ``lambda``, the smooth field ``ubar`` = ``d`` smoothed by
   ``smooth_passes`` 3x3x3 means, and ``d(x) = argmin_s C(x, s) + lambda |s - ubar(x)|^2`` again.
   Both sub-problems are solved exactly (the first by enumeration, the second by a smoothing);
   as ``lambda`` grows, ``d`` and ``ubar`` meet. Each ``d`` is refined below a label (the vertex
   of a parabola through its energy and its two neighbours' along each axis), so that ``ubar``
   is not pulled towards whole labels.

The cost is normalised per voxel (its minimum subtracted, divided by the mean over voxels and
displacements of what is left), so that ``lambda`` is in units of that mean per voxel^2 and the
same weights serve every image. A small ``prior`` on ``|s|^2`` decides ties (flat regions,
identical images) towards no motion: identity in gives identity out (exactly without the
sub-label refinement, within 0.1 voxel with it, where a cost that is not symmetric about its
minimum moves the parabola's vertex).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from ..core.errors import CancelledError
from ..core.fields import resize_field
from ..core.losses import box_sum_cumsum, mind_ssc
from .optimise import CancelFn, _check_pair, _level
from .smoothing import smoothed


#: Below a label: never, the last choice only, or every choice of the coupling.
SUBVOXEL = ("off", "last", "every")


@dataclass(frozen=True)
class ConvexStep:
    """The discrete step's settings (module docstring): features ``factor`` times coarser than
    the images, displacements up to ``radius`` feature voxels a side, the cost averaged over
    ``(2 patch + 1)^3`` feature voxels, the coupling weights ``lambdas`` (increasing), the smooth
    field ``smooth_passes`` 3x3x3 means of the discrete one, the tie-breaking ``prior``, and
    ``subvoxel``: where the choice is refined below a label (:data:`SUBVOXEL`)."""

    factor: float = 2.0
    radius: int = 3
    patch: int = 1
    lambdas: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
    smooth_passes: int = 2
    prior: float = 1e-3
    subvoxel: str = "last"

    def __post_init__(self):
        if self.subvoxel not in SUBVOXEL:
            raise ValueError(f"subvoxel must be one of {SUBVOXEL}, got {self.subvoxel!r}")
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if int(self.radius) != self.radius or not 1 <= self.radius <= 8:
            raise ValueError(f"radius must be an int from 1 to 8 (feature voxels), got {self.radius}")
        if int(self.patch) != self.patch or self.patch < 0:
            raise ValueError(f"patch must be an int >= 0, got {self.patch}")
        lambdas = tuple(float(v) for v in self.lambdas)
        if any(v < 0 for v in lambdas) or list(lambdas) != sorted(lambdas):
            raise ValueError(f"lambdas must be >= 0 and increasing, got {self.lambdas}")
        object.__setattr__(self, "lambdas", lambdas)
        if int(self.smooth_passes) != self.smooth_passes or self.smooth_passes < 0:
            raise ValueError(f"smooth_passes must be an int >= 0, got {self.smooth_passes}")
        if self.prior < 0:
            raise ValueError(f"prior must be >= 0, got {self.prior}")


def displacement_labels(radius: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``(L, 3)`` every whole-voxel displacement ``(k, j, i)`` in ``[-radius, radius]^3``, in the
    order of :func:`cost_volume`'s first axis (``i`` fastest)."""
    r = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


def cost_volume(fixed_features: torch.Tensor, moving_features: torch.Tensor, radius: int,
                patch: int = 1, cancel: CancelFn = None) -> torch.Tensor:
    """``(L, D, H, W)``: at every voxel ``x`` and for every displacement ``s`` of
    :func:`displacement_labels`, the mean over channels of ``(F(x) - M(x + s))^2``, averaged over
    the ``(2 patch + 1)^3`` box around ``x`` (cut at the border); ``M`` beyond the grid is its
    border value. Features ``(1, C, D, H, W)``, both on one grid."""
    if fixed_features.shape != moving_features.shape or fixed_features.dim() != 5 or fixed_features.shape[0] != 1:
        raise ValueError(f"features must be (1, C, D, H, W) and alike, got {tuple(fixed_features.shape)} and "
                         f"{tuple(moving_features.shape)}")
    _, channels, D, H, W = fixed_features.shape
    r = int(radius)
    ff = fixed_features[0]
    mp = F.pad(moving_features, (r,) * 6, mode="replicate")[0]
    # |F - M_s|^2 = |F|^2 + |M_s|^2 - 2 F.M_s: only the cross term needs all channels at each shift
    f2 = (ff * ff).sum(0)
    m2 = (mp * mp).sum(0)
    side = 2 * r + 1
    out = fixed_features.new_empty((side ** 3, D, H, W))
    for a in range(side):
        if cancel is not None and cancel():
            raise CancelledError("discrete step cancelled")
        for b in range(side):
            rows = mp[:, a:a + D, b:b + H]  # (C, D, H, W + 2r): the i shifts are views of it
            for c in range(side):
                cross = torch.einsum("cdhw,cdhw->dhw", ff, rows[..., c:c + W])
                out[(a * side + b) * side + c] = m2[a:a + D, b:b + H, c:c + W] - 2.0 * cross
    out += f2
    out.clamp_(min=0.0).div_(channels)
    if patch > 0:
        w = 2 * int(patch) + 1
        sums = box_sum_cumsum(out.unsqueeze(0), (w, w, w))[0]
        counts = box_sum_cumsum(out.new_ones((1, 1, D, H, W)), (w, w, w))[0]
        out = sums / counts
    return out


def coupled_argmin(cost: torch.Tensor, labels: torch.Tensor, lambdas, smooth_passes: int = 2,
                   prior: float = 1e-3, subvoxel: str = "last", cancel: CancelFn = None) -> torch.Tensor:
    """The coupled convex optimisation of the module docstring on a cost ``(L, D, H, W)`` over
    the displacements ``labels`` ``(L, 3)`` (:func:`displacement_labels`, in its order: the
    refinement below a label finds each label's neighbours by it): the smooth field ``(1, 3, D, H, W)``, voxels of the
    cost's grid. The cost is normalised in place."""
    low = cost.min(dim=0, keepdim=True).values
    cost.sub_(low)
    scale = float(cost.mean())
    if scale > 0:
        cost.div_(scale)
    size2 = (labels * labels).sum(1)  # (L,)
    if prior:
        cost.add_(prior * size2.view(-1, 1, 1, 1))
    shape = cost.shape[1:]

    def chosen(index: torch.Tensor) -> torch.Tensor:
        return labels[index.reshape(-1)].t().reshape(1, 3, *shape)

    radius = int(labels[:, 0].max())  # labels span [-radius, radius]^3 (displacement_labels)

    def best(energy: torch.Tensor, refine: bool) -> torch.Tensor:
        index = energy.argmin(dim=0)
        return chosen(index) + _subvoxel(energy, index, radius) if refine else chosen(index)

    energy = cost
    ubar = smoothed(best(cost, subvoxel == "every"), smooth_passes)
    for lam in lambdas:
        if cancel is not None and cancel():
            raise CancelledError("discrete step cancelled")
        if lam <= 0:
            continue
        # lambda |s - ubar|^2 = lambda (|s|^2 - 2 s.ubar + |ubar|^2); the last term is the same for every s
        energy = torch.einsum("lc,cdhw->ldhw", labels, ubar[0]).mul_(-2.0 * lam)
        energy.add_(lam * size2.view(-1, 1, 1, 1)).add_(cost)
        ubar = smoothed(best(energy, subvoxel == "every"), smooth_passes)
    if subvoxel == "last":
        ubar = smoothed(best(energy, True), smooth_passes)
    return ubar


def _subvoxel(energy: torch.Tensor, index: torch.Tensor, radius: int) -> torch.Tensor:
    """``(1, 3, D, H, W)``: per axis, the vertex of the parabola through the energy at the chosen
    label and its two neighbours along that axis (within half a label; 0 at the range's edge or
    where the parabola does not open upwards)."""
    side = 2 * radius + 1
    coords = (index // (side * side), (index // side) % side, index % side)
    centre = energy.gather(0, index.unsqueeze(0))[0]
    out = []
    for axis, stride in enumerate((side * side, side, 1)):
        inner = (coords[axis] > 0) & (coords[axis] < side - 1)
        lo = energy.gather(0, torch.where(inner, index - stride, index).unsqueeze(0))[0]
        hi = energy.gather(0, torch.where(inner, index + stride, index).unsqueeze(0))[0]
        curve = lo - 2.0 * centre + hi
        ok = inner & (curve > 1e-12)
        step = torch.where(ok, 0.5 * (lo - hi) / curve.clamp_min(1e-12), torch.zeros_like(curve))
        out.append(step.clamp(-0.5, 0.5))
    return torch.stack(out).unsqueeze(0)


def convex_register(fixed: torch.Tensor, moving: torch.Tensor, step: ConvexStep = ConvexStep(),
                    cancel: CancelFn = None) -> torch.Tensor:
    """The discrete step on a pair ``(1, 1, D, H, W)`` on one grid: a smooth displacement
    ``(1, 3, D, H, W)`` in voxels of that grid (detached), to start the pyramid from."""
    _check_pair(fixed, moving)
    shape = tuple(fixed.shape[2:])
    with torch.no_grad():
        f_lv, m_lv = _level(fixed, step.factor), _level(moving, step.factor)
        features = (mind_ssc(f_lv), mind_ssc(m_lv))
        cost = cost_volume(features[0], features[1], step.radius, step.patch, cancel=cancel)
        labels = displacement_labels(step.radius, dtype=fixed.dtype, device=fixed.device)
        u = coupled_argmin(cost, labels, step.lambdas, step.smooth_passes, step.prior, step.subvoxel,
                           cancel=cancel)
        del cost
        return resize_field(u, shape)
