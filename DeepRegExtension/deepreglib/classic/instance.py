"""Fast instance optimisation of a displacement field: the engine's own deformable optimiser
behind the ``balanced`` and ``accurate`` presets, and the ``iterative`` method.

Conventions: :mod:`deepreglib.core.conventions`. Both images are on one grid (the network grid,
the moving image already through the initial matrix); the unknown is a displacement ``u``
``(1, 3, D, H, W)`` in voxels ``(k, j, i)``, ``warped(x) = moving(x + u(x))``. Adam minimises::

    (1 - local NCC(warped, fixed))  +  smooth_weight * GradientSmoothness(u)
      [+ label_weight * Dice loss of the warped labels]  [+ landmark_weight * mean |p + u(p) - q|^2]

or, for images of different contrasts (``similarity="mind"``: MR to ultrasound, MR to CT), the
first term is ``MIND_WEIGHT *`` the mean squared difference of the MIND-SSC descriptors
(:func:`deepreglib.core.losses.mind_ssc`), the moving image's descriptor warped as the image would be.

What makes it fast, in the spirit of ConvexAdam (Siebert, Hansen and Heinrich 2021) and of
greedy (Yushkevich et al.), measured on the ixi_muse val split (docs/BENCHMARKS.md):

* **Only the box that matters.** Both images are cropped to the union of their foregrounds plus
  a margin; the field outside is the border value of the field inside (continuous, so it does not
  fold). On brains in a head-sized field of view this is 2-3x fewer voxels.
* **A displacement, not a velocity,** while optimising: one warp per step instead of the eight
  grid samples of scaling and squaring (each of whose backward passes costs more than the whole
  similarity). The field is smoothed by a 3x3x3 mean at every step (a cheap B-spline-like
  parameterisation, as ConvexAdam does) and regularised by diffusion; the few voxels that still
  fold at the end are repaired locally (:func:`unfold`).
* **The similarity at the resolution that matters:** coarse levels find the large motion on
  small images; the field of the finest level lives on a grid 2x coarser than the images, and
  each level stops when its loss no longer improves.
* **The warped image's gradient** carries the similarity's gradient to the field
  (:func:`~deepreglib.core.warp.warp_image_gradient`, as ANTs' and greedy's metrics do), instead
  of differentiating the trilinear interpolation: a warp's forward and backward in half the time.
* **Local NCC from running sums** (:func:`deepreglib.core.losses.box_sum_cumsum`): the cost of a
  window does not depend on its size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import CancelledError
from ..core.fields import resize_field
from ..core.jacobian import jacobian_determinant
from ..core.losses import GradientSmoothness, LocalNCCToFixed, MINDToFixed
from ..core.resample import downsampled_shape
from ..core.warp import warp, warp_image_gradient
from .optimise import _check_pair, _label_maps, _Landmarks, _level, _resize_labels
from .adam import Adam
from .convex import ConvexStep, convex_register
from .smoothing import box_mean3, smoothed

ProgressFn = Optional[Callable[[float, str], None]]
CancelFn = Optional[Callable[[], bool]]


PerLevel = Union[float, Tuple[float, ...]]
#: How the similarity's gradient reaches the field through the warp: ``"trilinear"``
#: differentiates the interpolation (:func:`~deepreglib.core.warp.warp`), ``"image"`` uses the
#: warped image's spatial gradient (:func:`~deepreglib.core.warp.warp_image_gradient`).
WARP_GRADIENTS = ("trilinear", "image")


@dataclass(frozen=True)
class Schedule:
    """A pyramid: ``levels`` are image downsampling factors (coarse to fine, 1 = the given
    grid), ``steps`` the most Adam steps at each, ``field_factor`` how much coarser than the
    finest images the field lives (1 or 2), ``window`` the local NCC box (voxels at each level),
    ``lr`` the Adam step (voxels of the level), ``tol`` the stop: a level ends when its loss fell
    by less than this over its last 10 steps; ``min_std``: local NCC counts voxels whose fixed
    window varies by more than this (:class:`~deepreglib.core.losses.LocalNCCToFixed`), so flat
    regions do not pull the field; ``adam_eps``: Adam's floor, per voxel of the level's image
    (see the loop); ``lr_power``: the step at a level is ``lr / factor ** lr_power``.

    The field and its regularisation (a number, or one per level):

    * ``smooth_passes``: the field is the parameters smoothed by this many 3x3x3 means (a cheap
      B-spline-like parameterisation; ``smooth_parameters=False`` makes it 0 everywhere);
    * ``increments``: each level optimises an increment ``d`` over the field ``b`` the level
      before found (``u = b + d``), else the whole field ``u`` (starting from ``b``);
    * ``smooth_weight``: the diffusion weight on what the level optimises (``d`` or ``u``);
    * ``total_weight``: with ``increments``, a diffusion weight on the whole field ``u`` too;
    * ``convex``: a coarse discrete step before the pyramid (:class:`~deepreglib.classic.convex.ConvexStep`,
      ConvexAdam's search and coupled convex optimisation), or None.

    Diffusion on the whole field pulls every displacement gradient towards zero, the true ones
    included: a smooth deformation found at the coarse levels is shrunk again at the finest.
    Heavily smoothed increments at the coarse levels and a mixed penalty at the finest keep the
    large smooth motion and still hold the fine detail's roughness (SDlogJ) down (the numbers are
    at :data:`FROM_AFFINE`).

    Identical images: Adam's first steps are about ``lr`` wherever the gradient is not exactly
    zero, and the variance floor of local NCC leaves a small bias towards more contrast; with
    ``min_std = 0.03`` and ``adam_eps = 1`` the field stays within 0.6 voxel (mean length 0.23)
    of the identity on a 40^3 phantom (2.5 voxels with ``min_std = 0.01, adam_eps = 1e-3``), at
    the cost of 0.01 val Dice. ``Testing/Python/test_instance.py`` holds it there; a step that
    is not normalised per voxel (Gauss-Newton, demons) would remove the drift altogether."""

    levels: Tuple[float, ...] = (4, 2, 1)
    steps: Tuple[int, ...] = (60, 40, 20)
    field_factor: int = 2
    window: int = 5
    lr: float = 0.5
    smooth_weight: PerLevel = 1.0
    tol: float = 1e-4
    min_std: float = 0.03
    adam_eps: float = 1.0
    smooth_parameters: bool = True
    lr_power: float = 0.0
    smooth_passes: PerLevel = 1
    increments: bool = False
    total_weight: PerLevel = 0.0
    warp_gradient: Union[str, Tuple[str, ...]] = "trilinear"
    convex: Optional[ConvexStep] = None

    def __post_init__(self):
        if len(self.levels) != len(self.steps) or not self.levels:
            raise ValueError(f"levels {self.levels} and steps {self.steps} must be non-empty and "
                             "of the same length")
        if any(f < 1 for f in self.levels) or any(n < 0 for n in self.steps):
            raise ValueError(f"levels must be >= 1 and steps >= 0, got {self.levels}, {self.steps}")
        if self.field_factor not in (1, 2):
            raise ValueError(f"field_factor must be 1 or 2, got {self.field_factor}")
        for name in ("smooth_weight", "smooth_passes", "total_weight"):
            value = getattr(self, name)
            values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.levels)
            if len(values) != len(self.levels) or any(v < 0 for v in values):
                raise ValueError(f"{name} must be a number >= 0 or one per level ({len(self.levels)}), "
                                 f"got {value!r}")
            if name == "smooth_passes":
                values = tuple(int(v) if self.smooth_parameters else 0 for v in values)
            object.__setattr__(self, name, values)
        gradients = ((self.warp_gradient,) * len(self.levels) if isinstance(self.warp_gradient, str)
                     else tuple(self.warp_gradient))
        if len(gradients) != len(self.levels) or any(g not in WARP_GRADIENTS for g in gradients):
            raise ValueError(f"warp_gradient must be one of {WARP_GRADIENTS} or one per level "
                             f"({len(self.levels)}), got {self.warp_gradient!r}")
        object.__setattr__(self, "warp_gradient", gradients)
        if isinstance(self.convex, dict):  # from JSON (benchmarks/instance_tuning.py --schedule)
            object.__setattr__(self, "convex", ConvexStep(**{k: tuple(v) if isinstance(v, list) else v
                                                             for k, v in self.convex.items()}))
        if any(self.total_weight) and not self.increments:
            raise ValueError("total_weight needs increments=True (without increments smooth_weight "
                             "is already the weight on the whole field)")


#: The ``balanced`` preset, from an affine start: the field of the finest level on a 2x coarser
#: grid; the two coarse levels find the large motion as heavily smoothed increments (3 means,
#: diffusion 1), the finest adds the detail (1 mean; diffusion 2 on the increment, 2 on the whole
#: field); the similarity's gradient reaches the field through the warped image's gradient
#: (``warp_gradient="image"``: half the cost of a warp's forward and backward). Chosen on
#: validation pairs only (benchmarks/instance_tuning.py): on 3 ixi_muse val pairs Dice 0.696 and
#: SDlogJ 0.121 against 0.693 and 0.117 for the schedule before 2026-12-07 (the interpolation's
#: gradient, diffusion 3 and 3), on 3 unseen synthetic pairs 0.921 against 0.920, on 1 mm OASIS
#: brains under a known deformation an endpoint error of 0.83 against 0.85 mm
#: (instance-tuning-2026-12-07-image-gradient.json); the optimisation 25-30 % faster.
#: With diffusion 3 and 3 the image gradient is smoother still (SDlogJ 0.104) and 0.003 Dice less.
FROM_AFFINE = Schedule(tol=1e-3, smooth_passes=(3, 3, 1), smooth_weight=(1.0, 1.0, 2.0), increments=True,
                       total_weight=(0.0, 0.0, 2.0), warp_gradient="image")
#: Refining a network's field (its large motion is already found): the two finest levels.
FROM_NETWORK = Schedule(levels=(2, 1), steps=(30, 15), tol=1e-3)
#: The ``accurate`` preset: the field at full resolution, more steps, smoothed increments at the
#: coarse levels, diffusion 1 (on the increment and on the whole field) at the finest. On the
#: same validation pairs (3 of each set): ixi_muse Dice 0.716 and SDlogJ 0.163 against 0.712 and
#: 0.177 for the whole-field schedule it replaces; synthetic 0.926 against 0.904; known
#: deformation 1.02 against 1.51 mm. Its levels stop at a loss change of 1e-3 over 10 steps, as
#: balanced's (1e-4 before 2026-12-07's fifth session): on the same ixi and synthetic val pairs
#: Dice 0.7153 and 0.9261 against 0.7156 and 0.9262, 6-8 % less time
#: (instance-tuning-2026-12-07-accurate-tol.json).
ACCURATE = Schedule(levels=(4, 2, 1), steps=(60, 50, 30), field_factor=1, smooth_passes=(3, 3, 1),
                    smooth_weight=1.0, increments=True, total_weight=(0.0, 0.0, 1.0), tol=1e-3)
#: The discrete step (:mod:`deepreglib.classic.convex`) of :data:`DIFFERENT_CONTRAST`, and the
#: one the ``instance`` method puts before its pyramid with ``discrete=on``: features at half
#: the resolution, displacements up to 3 of their voxels a side, the coupling up to 10.
CONVEX_STEP = ConvexStep(factor=2, radius=3, lambdas=(0.2, 0.5, 1.0, 2.0, 5.0, 10.0), smooth_passes=3)
#: Images of different contrasts (MIND-SSC): the discrete step alone, no gradient steps. Chosen
#: on the 25 MR to ultrasound prostate **train** pairs from the centred start (gland Dice 0.619;
#: benchmarks/instance_tuning.py --sets prostate --similarity mind, docs/BENCHMARKS.md):
#: 0.636, better than the start on 18 of 25, SDlogJ 0.24, under a second. Every Adam schedule on
#: MIND-SSC tried there lost gland Dice (balanced 0.42 and diffusion 20 on every level 0.50 on 6
#: of the pairs, from 0.54), also after the discrete step (0.45, 0.54); radius 2 or 4 0.632 and
#: 0.636, features at a third 0.577, coupling up to 20 0.633 (smoother: SDlogJ 0.16).
DIFFERENT_CONTRAST = Schedule(steps=(0, 0, 0), convex=CONVEX_STEP)
#: By name (the ``instance`` method's ``schedule`` option).
SCHEDULES = {"balanced": FROM_AFFINE, "accurate": ACCURATE, "from_network": FROM_NETWORK,
             "different": DIFFERENT_CONTRAST}
#: The similarities of :func:`instance_register`: local NCC (same contrast, any scanner) and
#: MIND-SSC (different contrasts).
SIMILARITIES = ("lncc", "mind")
#: Scale of the MIND-SSC term against the schedules' smoothness weights (tuned with local NCC).
#: Chosen on the contrast-inverted phantom of ``test_instance.py`` (median endpoint error 1.01,
#: 0.76 and 0.79 voxels for 3, 10 and 30, with the balanced schedule before 2026-12-07); not tuned
#: on real multimodal pairs.
MIND_WEIGHT = 10.0


def _similarity(name: str, fixed: torch.Tensor, moving: torch.Tensor, window: int, min_std: float):
    """``(image to warp, loss of the warped image)`` for one level."""
    if name == "mind":
        mind = MINDToFixed(fixed)
        return mind.descriptor(moving), lambda warped: MIND_WEIGHT * mind(warped)
    return moving, LocalNCCToFixed(fixed, window=window, min_std=min_std)


def foreground_box(fixed: torch.Tensor, moving: torch.Tensor, threshold: float = 0.05,
                   margin: int = 4) -> Tuple[List[int], List[int]]:
    """``(lo, hi)`` index bounds (``hi`` exclusive) of the voxels above ``threshold`` in either
    image, grown by ``margin`` voxels and clipped to the grid; the whole grid when both are empty."""
    fg = (fixed[0, 0] > threshold) | (moving[0, 0] > threshold)
    shape = list(fg.shape)
    if not bool(fg.any()):
        return [0, 0, 0], shape
    lo, hi = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        idx = torch.nonzero(fg.any(dim=others[1]).any(dim=others[0]))[:, 0]
        lo.append(max(0, int(idx[0]) - margin))
        hi.append(min(shape[axis], int(idx[-1]) + 1 + margin))
    # at least 8 voxels an axis, so the pyramid has levels to work with
    for axis in range(3):
        while hi[axis] - lo[axis] < min(8, shape[axis]):
            lo[axis], hi[axis] = max(0, lo[axis] - 1), min(shape[axis], hi[axis] + 1)
    return lo, hi


def uncrop(u: torch.Tensor, lo, hi, shape) -> torch.Tensor:
    """A field found on the box ``[lo, hi)`` of a grid ``shape`` (:func:`foreground_box`) on the
    whole grid: outside the box, the border value of the field inside (continuous, so it does
    not fold)."""
    pad = []
    for axis in (2, 1, 0):  # F.pad lists the last axis first
        pad += [lo[axis], shape[axis] - hi[axis]]
    return F.pad(u, pad, mode="replicate") if any(pad) else u


def unfold(u: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Repair folding: where the Jacobian determinant of ``x + u`` is <= 0, replace ``u`` in the
    3x3x3 neighbourhood by its local mean, until nothing folds (or ``iterations`` are done).
    Elsewhere ``u`` is left exactly as it was."""
    u = u.detach()
    for _ in range(iterations):
        jac = jacobian_determinant(u)
        bad = jac <= 0
        if not bool(bad.any()):
            break
        near = F.max_pool3d(bad.float(), 3, stride=1, padding=1) > 0
        u = torch.where(near, box_mean3(u), u)
    return u


def instance_register(fixed: torch.Tensor, moving: torch.Tensor,
                      displacement: Optional[torch.Tensor] = None,
                      schedule: Schedule = FROM_AFFINE,
                      fixed_labels: Optional[torch.Tensor] = None,
                      moving_labels: Optional[torch.Tensor] = None, label_weight: float = 1.0,
                      fixed_points=None, moving_points=None, landmark_weight: float = 0.1,
                      crop: bool = True, similarity: str = "lncc", progress: ProgressFn = None,
                      cancel: CancelFn = None, stats: Optional[Dict[str, list]] = None) -> torch.Tensor:
    """Optimise a displacement so that ``moving(x + u(x))`` matches ``fixed`` (module docstring).

    Args:
        fixed, moving: ``(1, 1, D, H, W)`` on one grid, intensities normalised to [0, 1].
        displacement: start ``(1, 3, D, H, W)`` voxels (e.g. a network's field); zeros if None.
        schedule: the pyramid (:class:`Schedule`; :data:`FROM_AFFINE`, :data:`FROM_NETWORK`,
            :data:`ACCURATE`).
        fixed_labels, moving_labels: optional integer label maps on the grid; add
            ``label_weight`` times the foreground Dice loss of the warped one-hot labels.
        fixed_points, moving_points: optional ``(P, 3)`` voxel ``(k, j, i)`` pairs; add
            ``landmark_weight * mean |p + u(p) - q|^2``.
        crop: optimise on the foreground box only (:func:`foreground_box`).
        similarity: ``"lncc"`` (same contrast) or ``"mind"`` (different contrasts), see
            :data:`SIMILARITIES`.
        stats: a dict that receives, per level run, ``steps`` (the Adam steps taken) and
            ``voxels`` (the level's image voxels, what a step costs).
    Returns:
        ``(1, 3, D, H, W)`` displacement in voxels (detached), without folding where
        :func:`unfold` could repair it.
    """
    _check_pair(fixed, moving)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    shape = tuple(fixed.shape[2:])
    device, dtype = fixed.device, fixed.dtype
    if displacement is not None and tuple(displacement.shape) != (1, 3) + shape:
        raise ValueError(f"displacement must be (1, 3, {', '.join(map(str, shape))}), got "
                         f"{tuple(displacement.shape)}")
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("give both fixed_labels and moving_labels, or neither")
    if (fixed_points is None) != (moving_points is None):
        raise ValueError("give both fixed_points and moving_points, or neither")

    lo, hi = foreground_box(fixed, moving) if crop else ([0, 0, 0], list(shape))
    if fixed_points is not None:  # the box holds every landmark
        pts = np.concatenate([np.asarray(fixed_points, dtype=np.float64).reshape(-1, 3),
                              np.asarray(moving_points, dtype=np.float64).reshape(-1, 3)])
        lo = [max(0, min(a, int(np.floor(pts[:, k].min())) - 2)) for k, a in enumerate(lo)]
        hi = [min(shape[k], max(b, int(np.ceil(pts[:, k].max())) + 3)) for k, b in enumerate(hi)]
    box = (Ellipsis,) + tuple(slice(a, b) for a, b in zip(lo, hi))
    f_box, m_box = fixed[box].contiguous(), moving[box].contiguous()
    box_shape = tuple(f_box.shape[2:])
    u = None if displacement is None else displacement.detach().to(device, dtype)[box].contiguous()
    labels = None
    if fixed_labels is not None:
        labels = (fixed_labels[box].contiguous(), moving_labels[box].contiguous())
    points = None
    if fixed_points is not None:
        offset = np.asarray(lo, dtype=np.float64)
        points = (np.asarray(fixed_points, dtype=np.float64) - offset,
                  np.asarray(moving_points, dtype=np.float64) - offset)

    if schedule.convex is not None:
        u = _convex_start(f_box, m_box, u, schedule.convex, cancel)
    smooth = GradientSmoothness("l2")
    n_levels = len(schedule.levels)
    for index, (factor, steps) in enumerate(zip(schedule.levels, schedule.steps)):
        if steps == 0:  # a level with no steps changes nothing (a discrete step alone: steps 0 everywhere)
            continue
        f_lv, m_lv = _level(f_box, factor), _level(m_box, factor)
        image_shape = tuple(f_lv.shape[2:])
        source, sim = _similarity(similarity, f_lv, m_lv, schedule.window, schedule.min_std)
        last = index == n_levels - 1
        field_shape = downsampled_shape(box_shape, factor * schedule.field_factor) if last else image_shape
        start = (torch.zeros(1, 3, *field_shape, dtype=dtype, device=device) if u is None
                 else resize_field(u, field_shape))
        terms = _level_terms(labels, points, box_shape, image_shape, field_shape, label_weight,
                             landmark_weight, dtype, device)
        base = start
        p = (torch.zeros_like(start) if schedule.increments else start.clone()).requires_grad_(True)
        weight, total_weight = schedule.smooth_weight[index], schedule.total_weight[index]
        # Adam divides each gradient by its running size: a gradient that is only rounding noise
        # (a voxel already matched, the flat inside of an organ) would get full-size steps and
        # random-walk the field. Its floor is set per voxel of the image, in which units a real
        # mismatch has gradients of order 1e-2..1 and rounding noise 1e-7.
        level_lr = schedule.lr / factor ** schedule.lr_power
        optimiser = Adam([p], lr=level_lr, eps=schedule.adam_eps / float(np.prod(image_shape)))
        history: List[float] = []
        warp_source = warp_image_gradient if schedule.warp_gradient[index] == "image" else warp
        for step in range(steps):
            if cancel is not None and cancel():
                raise CancelledError("instance optimisation cancelled")
            # the step decays linearly to a tenth over the level: at a match, trilinear
            # interpolation has a kink (its derivative jumps at voxel centres), so a constant
            # step keeps jumping across the optimum and the field wanders
            optimiser.lr = level_lr * (1.0 - 0.9 * step / max(steps - 1, 1))
            optimiser.zero_grad()
            d = smoothed(p, schedule.smooth_passes[index])
            q = base + d if schedule.increments else d
            full = resize_field(q, image_shape)
            loss = sim(warp_source(source, full, padding="border")) + weight * smooth(d)
            if total_weight:
                loss = loss + total_weight * smooth(q)
            loss = loss + sum(term(full, q) for term in terms)
            loss.backward()
            optimiser.step()
            history.append(float(loss.detach()))
            if progress is not None and (step % 5 == 0 or step == steps - 1):
                progress((index + (step + 1) / max(steps, 1)) / n_levels,
                         f"level {index + 1}/{n_levels}: step {step + 1}, loss {history[-1]:.4f}")
            if len(history) > 10 and history[-11] - min(history[-10:]) < schedule.tol:
                break
        if stats is not None:
            stats.setdefault("steps", []).append(len(history))
            stats.setdefault("voxels", []).append(int(np.prod(image_shape)))
        with torch.no_grad():
            u = smoothed(p.detach(), schedule.smooth_passes[index])
            if schedule.increments:
                u = base + u
    if u is None:
        u = torch.zeros(1, 3, *box_shape, dtype=dtype, device=device)
    u = unfold(resize_field(u, box_shape))
    out = uncrop(u, lo, hi, shape)
    if progress is not None:
        progress(1.0, "instance optimisation done")
    return out


def _convex_start(fixed, moving, start, step, cancel):
    """The discrete step's field (:mod:`deepreglib.classic.convex`), over ``start`` when there is
    one: found on the moving image warped by ``start``, then composed with it
    (``moving(x + d(x) + start(x + d(x)))``)."""
    if start is None:
        return convex_register(fixed, moving, step, cancel=cancel)
    d = convex_register(fixed, warp(moving, start, padding="border"), step, cancel=cancel)
    return d + warp(start, d, padding="border")


def _level_terms(labels, points, box_shape, image_shape, field_shape, label_weight,
                 landmark_weight, dtype, device) -> list:
    """The optional label and landmark terms of one level, each ``term(u_image, u_field)``."""
    terms = []
    if labels is not None:
        fixed_oh, moving_oh, dice = _label_maps(_resize_labels(labels[0], image_shape),
                                                _resize_labels(labels[1], image_shape), dtype)
        terms.append(lambda full, q: label_weight * dice(warp(moving_oh, full, padding="border"), fixed_oh))
    if points is not None:
        scale = np.asarray([(n - 1) / (o - 1) if o > 1 else 1.0 for o, n in zip(box_shape, image_shape)])
        landmarks = _Landmarks(points[0] * scale, points[1] * scale, image_shape, field_shape, dtype, device)
        terms.append(lambda full, q: landmark_weight * landmarks(q))
    return terms
