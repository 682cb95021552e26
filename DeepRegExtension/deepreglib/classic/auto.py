"""``--init auto``: automatic rigid + affine alignment of unaligned scans, fast and robust.

Conventions as :mod:`deepreglib.classic.align`: the result is a 4x4 LPS matrix ``A`` mapping a
fixed point to the moving point it pulls from.

The steps, each on a small isotropic pyramid level (never the full-resolution images, so the
cost does not grow with the scan; a 512x512x300 CT aligns as fast as a 2 mm brain):

1. **Start candidates** at :data:`SEARCH_MM`: the centroid translation with a set of rotations
   (identity, +-15/30 degrees about each axis) and the principal-axes rotations of the second
   moments (:func:`~deepreglib.classic.align.moments_transform`'s 24 frames). Each is scored by
   the similarity as it stands; the best few are polished rigidly for a few steps and the best
   after polishing wins. A wide search matters when headers disagree (prone/supine, a flipped
   slice order stored as a rotation) and costs well under a second at 8 mm.
2. **Rigid, then affine**, at each level of :data:`LEVELS_MM` (coarse to fine, each no finer
   than the images themselves), with Adam and a stop when the loss no longer improves.
3. **A quality check**: the local NCC of the aligned pair at the finest level, how much it beats
   the same result turned by 90, 180 or 270 degrees about each axis (its decoys: a relative
   score, which does not depend much on the pair's contrast), and the foreground overlap. When
   the result is poor, :class:`AutoResult` says so and the run warns (messages, manifest and QA
   picture) rather than returning it silently.

The similarity is local NCC with a window of about 20 mm, robust to intensity differences
between scanners (bias fields, different contrast scaling), and to whole-head against
skull-stripped pairs: the skull and scalp of one image have no counterpart in the other, and a
local measure lets them disagree without pulling the brain off. ``similarity="mi"`` (mutual
information) suits different modalities.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import CancelledError
from ..core.geometry import Grid
from ..core.losses import LocalNCCToFixed
from ..core.resample import ALIGN_CORNERS, coordinate_dtype, gaussian_blur, resample_to_grid
from .align import (MI_SAMPLES, AffineAboutCentre, intensity_moments, principal_axes, to_numpy, as_volume,
                    make_similarity)
from .adam import Adam

ProgressFn = Optional[Callable[[float, str], None]]
CancelFn = Optional[Callable[[], bool]]

#: Spacing (mm) of the level where start candidates are compared.
SEARCH_MM = 8.0
#: Spacings (mm) of the optimisation levels, coarse to fine (each clamped to the image spacing).
LEVELS_MM = (8.0, 4.0)
#: Local NCC counts voxels whose fixed window varies by more than this (normalised intensity):
#: see :class:`~deepreglib.core.losses.LocalNCCToFixed`'s ``min_std``.
MIN_STD = 0.01
#: Fewest voxels along an axis of a level (small images are not coarsened below it).
MIN_VOXELS = 16
#: Local NCC window, in mm (converted to voxels per level, at least 3).
WINDOW_MM = 20.0
#: Rotations (degrees) tried about each axis besides identity, in the candidate search.
SEARCH_DEGREES = (15.0, 30.0)
#: A result whose local NCC at the finest level is below this is reported as poor: over the
#: foreground box (``plain``), or inside the smaller image's foreground (``masked``). Chosen on
#: the ixi_muse val split (inter-subject T1, 2 mm): correct alignments scored 0.45-0.50 plain and
#: 0.71-0.76 masked, starts left 90 or 180 degrees off scored 0.31-0.40 and 0.39-0.47.
POOR_LNCC = {"plain": 0.42, "masked": 0.6}
#: ... and it is reported as poor only when it also fails to beat the best of its decoys (the
#: result turned by 90, 180 or 270 degrees about any axis, :data:`DECOY_DEGREES`) by this much
#: local NCC. The absolute value depends on the pair (contrast, residual deformation: right
#: alignments of synthetic pairs scored 0.32-0.95, of a brain under a large known deformation
#: 0.40), the margin much less: on validation data (benchmarks/alignment_quality.py, results
#: alignment-quality-2026-12-07.json) right answers beat their decoys by 0.16-0.79, answers left
#: 90 or 180 degrees off by -0.08 to 0.07.
DECOY_MARGIN = 0.1


@dataclass
class AutoResult:
    """The alignment and how good it looks. ``lncc``: mean local NCC (-1..1) of the aligned pair
    at the finest level; ``overlap``: Dice of the two foreground masks (intensity above 10 % of
    the range) after alignment; ``poor``: the result should not be trusted; ``message``: what to
    tell the user; ``seconds``: wall time; ``decoy_lncc``: the best local NCC of the result turned
    round (:data:`DECOY_DEGREES`), scored only when ``lncc`` is below :data:`POOR_LNCC`."""

    matrix: np.ndarray
    lncc: float
    overlap: float
    poor: bool
    message: str
    seconds: float
    candidates: int = 0
    steps: List[int] = field(default_factory=list)
    masked: bool = False
    swapped: bool = False
    decoy_lncc: Optional[float] = None


def _level(image: torch.Tensor, grid: Grid, spacing_mm: float) -> Tuple[torch.Tensor, Grid]:
    """``image`` on a grid of about ``spacing_mm`` per axis (never finer than the image), with an
    area pre-reduction (average pooling) for large factors and a Gaussian against aliasing."""
    # never fewer than MIN_VOXELS along an axis: a small image keeps enough voxels to align
    extent = np.asarray(grid.shape, dtype=np.float64) * grid.spacing_kji
    factors = [max(1.0, min(spacing_mm, e / MIN_VOXELS) / s) for s, e in zip(grid.spacing_kji, extent)]
    pool = tuple(max(1, int(math.floor(f))) for f in factors)
    x, g = image, grid
    if max(pool) > 1:
        shape = tuple(s // p for s, p in zip(grid.shape, pool))
        x = F.avg_pool3d(image[..., :shape[0] * pool[0], :shape[1] * pool[1], :shape[2] * pool[2]],
                         kernel_size=pool)
        # pooled voxel centres: the mean of each block's centres, on the same direction
        spacing_xyz = tuple(np.asarray(grid.spacing) * np.asarray(pool[::-1]))
        origin = grid.index_to_physical((np.asarray(pool, dtype=np.float64) - 1) / 2.0)
        g = Grid(shape, spacing_xyz, tuple(origin), grid.direction)
    rest = [f / p for f, p in zip(factors, pool)]
    if max(rest) > 1.05:
        x = gaussian_blur(x, [0.5 * r if r > 1.05 else 0.0 for r in rest])
        shape = tuple(max(2, int(round((s - 1) / r)) + 1) for s, r in zip(g.shape, rest))
        x = F.interpolate(x, size=shape, mode="trilinear", align_corners=ALIGN_CORNERS)
        g = g.resized(shape)
    return x.contiguous(), g


def _crop_to_foreground(image: torch.Tensor, grid: Grid, threshold: float = 0.05,
                        margin: int = 2) -> Tuple[torch.Tensor, Grid]:
    """The box of voxels above ``threshold`` (plus ``margin`` voxels), and its grid: the fixed
    image's background adds cost but no information to the similarity."""
    fg = image[0, 0] > threshold
    if not bool(fg.any()):
        return image, grid
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = torch.nonzero(fg.any(dim=other[1]).any(dim=other[0]))[:, 0]
        lo.append(max(0, int(idx[0]) - margin))
        hi.append(min(grid.shape[axis], int(idx[-1]) + 1 + margin))
    if any(h - l < 4 for l, h in zip(lo, hi)):
        return image, grid
    cropped = image[..., lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].contiguous()
    origin = grid.index_to_physical(np.asarray(lo, dtype=np.float64))
    return cropped, Grid(tuple(h - l for l, h in zip(lo, hi)), grid.spacing, tuple(origin),
                         grid.direction)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _candidate_rotations(cov_f: torch.Tensor, cov_m: torch.Tensor) -> List[np.ndarray]:
    out = [np.eye(3)]
    for axis in range(3):
        for deg in SEARCH_DEGREES:
            out += [_rotation(axis, deg), _rotation(axis, -deg)]
    ef, em = principal_axes(cov_f), principal_axes(cov_m)
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1),
                      (-1, 1, 1), (1, -1, 1), (1, 1, -1), (-1, -1, -1)):
            r = em[:, list(perm)] @ np.diag(signs) @ ef.T
            if np.linalg.det(r) > 0:
                out.append(r)
    return out


def _about(centre_f: np.ndarray, centre_m: np.ndarray, r: np.ndarray) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = r
    a[:3, 3] = centre_m - r @ centre_f
    return a


class _Stopper:
    """Stop when the loss has improved by less than ``tol`` over the last ``window`` steps."""

    def __init__(self, window: int = 10, tol: float = 2e-4):
        self.window, self.tol, self.history = window, tol, []

    def __call__(self, loss: float) -> bool:
        self.history.append(loss)
        if len(self.history) <= self.window:
            return False
        return self.history[-self.window - 1] - min(self.history[-self.window:]) < self.tol


def _window_vox(grid: Grid) -> Tuple[int, int, int]:
    """The local NCC window on a level: about :data:`WINDOW_MM`, odd, 3 to 9 voxels."""
    return tuple(min(9, max(3, int(round(WINDOW_MM / s)) | 1)) for s in grid.spacing_kji)


class _Similarity:
    """``loss(warped, fixed)`` against one reference level, inside ``mask`` when given: local NCC
    with the reference's window statistics computed once (running sums), or mutual information."""

    def __init__(self, name: str, fixed: torch.Tensor, grid: Grid, mask: Optional[torch.Tensor],
                 min_std: float = MIN_STD):
        self.mask = mask
        if name == "mi":
            self.mi = make_similarity("mi", max_voxels=MI_SAMPLES)
            self.lncc = None
        else:
            self.lncc = LocalNCCToFixed(fixed, window=_window_vox(grid), min_std=min_std)

    def __call__(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if self.lncc is not None:
            return self.lncc(warped, self.mask)
        return self.mi(warped, fixed) if self.mask is None else self.mi(warped, fixed, self.mask)


def _optimise(f: torch.Tensor, f_grid: Grid, m: torch.Tensor, m_grid: Grid, start: np.ndarray,
              rigid: bool, steps: int, lr: float, sim, cancel: CancelFn,
              stop: bool = True) -> Tuple[np.ndarray, float, int]:
    dtype = coordinate_dtype(f.device)
    centre = f_grid.index_to_physical((np.asarray(f_grid.shape) - 1) / 2.0)
    radius = float(np.mean(f_grid.extent_mm)) / 2.0
    model = AffineAboutCentre(centre, radius, rigid, dtype, f.device)
    a0 = torch.as_tensor(start, dtype=dtype, device=f.device)
    optimiser = Adam(model.parameters(), lr=lr)
    stopper = _Stopper()
    loss_value, done = float("inf"), 0
    for done in range(1, steps + 1):
        if cancel is not None and cancel():
            raise CancelledError("initial alignment cancelled")
        optimiser.zero_grad()
        loss = sim(resample_to_grid(m, m_grid, f_grid, a0 @ model(), padding="zeros"), f)
        loss.backward()
        optimiser.step()
        loss_value = float(loss.detach())
        if stop and stopper(loss_value):
            break
    with torch.no_grad():
        return to_numpy(a0 @ model()), loss_value, done


def _score(sim, f, f_grid, m, m_grid, a) -> float:
    with torch.no_grad():
        return float(sim(resample_to_grid(m, m_grid, f_grid, a, padding="zeros"), f))


#: Foreground threshold on normalised intensities (0..1).
FOREGROUND = 0.1
#: When one image's foreground is smaller than this fraction of the other's (a skull-stripped
#: brain against a whole head, a slab against a volume), the similarity is measured inside the
#: smaller foreground only.
CONTENT_RATIO = 0.7


def _foreground_volume(image: torch.Tensor, grid: Grid) -> float:
    return float((image > FOREGROUND).sum()) * float(np.prod(grid.spacing))


def _eroded(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` less its boundary voxels (6-neighbourhood and diagonals: a 3x3x3 minimum)."""
    return ~(F.max_pool3d((~mask).float(), kernel_size=3, stride=1, padding=1) > 0)


def _angle_degrees(matrix: np.ndarray) -> float:
    """Rotation angle of the 3x3 block (nearest rotation)."""
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    r = u @ vt
    return math.degrees(math.acos(float(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


#: A start rotated more than this (degrees) from the headers' own orientation must beat the best
#: small rotation by :data:`LARGE_ROTATION_MARGIN` in loss to be chosen: scanner headers are
#: right far more often than not, and a brain inside its own mask looks much like its mirror.
LARGE_ROTATION = 45.0
LARGE_ROTATION_MARGIN = 0.05
#: An affine that scales any axis by less than the first or more than the second factor is not
#: an anatomical answer (adult brains differ by about 0.8-1.25): the alignment is then reported as
#: poor. On MR to ultrasound prostate pairs the search found scales of 0.22-0.62 (2026-12-06).
PLAUSIBLE_SCALE = (0.5, 2.0)


def _foreground_overlap(f: torch.Tensor, f_grid: Grid, m: torch.Tensor, m_grid: Grid,
                        a: np.ndarray, within: Optional[torch.Tensor] = None) -> float:
    """Dice of the two foregrounds after alignment (inside ``within`` when given)."""
    with torch.no_grad():
        w = resample_to_grid(m, m_grid, f_grid, a, padding="zeros")
        fa, ma = f > FOREGROUND, w > FOREGROUND
        if within is not None:
            fa, ma = fa & within, ma & within
        total = float(fa.sum() + ma.sum())
        return 2.0 * float((fa & ma).sum()) / total if total > 0 else 0.0


#: The decoys of the quality check: the result turned by 90, 180 and 270 degrees about each
#: axis through the centre of the reference's foreground, the poses a wrong answer most often
#: holds instead of the right one (headers that disagree, a brain that looks like itself turned).
DECOY_DEGREES = (90.0, 180.0, 270.0)


def _best_decoy(sim, f, f_grid, m, m_grid, a) -> float:
    """The best local NCC (as the quality check measures it) of the result ``a`` turned into
    any of the :data:`DECOY_DEGREES` poses. A right answer beats all of them by a margin that does
    not depend much on the pair's contrast or residual deformation; a wrong one has the right
    pose, or one near it, among its decoys."""
    fg = f[0, 0] > FOREGROUND
    idx = torch.nonzero(fg).double().mean(dim=0).cpu().numpy() if bool(fg.any()) else \
        (np.asarray(f_grid.shape, dtype=np.float64) - 1) / 2.0
    centre = f_grid.index_to_physical(idx)
    turns = [_about(centre, centre, _rotation(axis, degrees)) for axis in range(3) for degrees in DECOY_DEGREES]
    return max(1.0 - _score(sim, f, f_grid, m, m_grid, a @ turn) for turn in turns)


def _best_small(scored, candidates) -> int:
    """Index of the best-scored candidate whose rotation is small."""
    for _, i in scored:
        if _angle_degrees(candidates[i]) <= LARGE_ROTATION:
            return i
    return scored[0][1]


def auto_transform(fixed, fixed_grid: Grid, moving, moving_grid: Grid, device="cpu",
                   progress: ProgressFn = None, cancel: CancelFn = None, similarity: str = "lncc",
                   levels_mm: Sequence[float] = LEVELS_MM, steps: Sequence[int] = (150, 80),
                   init: Optional[np.ndarray] = None, report: bool = False, decoys: bool = False):
    """Automatic rigid then affine alignment (``--init auto``); see the module docstring.

    Args:
        fixed, moving: ``(1, 1, D, H, W)`` images on their grids, intensities normalised to
            [0, 1] (:func:`~deepreglib.core.preprocess.normalize_intensity`).
        similarity: ``"lncc"`` (same modality, any scanner) or ``"mi"`` (different modalities).
        levels_mm, steps: optimisation levels (mm, coarse to fine) and the most Adam steps at
            each (rigid and affine each get this many; a level stops early when converged).
        init: a 4x4 start (e.g. ``--initial-transform``) instead of the candidate search.
        report: return an :class:`AutoResult` instead of the bare matrix.
        decoys: always score the result's decoys (calibration, ``benchmarks/alignment_quality.py``);
            else only when its local NCC is below :data:`POOR_LNCC`, where the rule needs them.
    Returns:
        4x4 LPS matrix (fixed -> moving points), or an :class:`AutoResult` when ``report``.
    """
    t0 = time.perf_counter()
    if len(levels_mm) != len(steps) or not levels_mm:
        raise ValueError(f"levels_mm {tuple(levels_mm)} and steps {tuple(steps)} must be non-empty "
                         "and of the same length")
    if similarity not in ("lncc", "mi"):
        raise ValueError(f"similarity must be 'lncc' or 'mi', got {similarity!r}")
    f_full = as_volume(fixed, fixed_grid, "fixed", device)
    m_full = as_volume(moving, moving_grid, "moving", device)

    def say(fraction, message):
        if progress is not None:
            progress(fraction, message)


    # which image's content is the smaller (a skull-stripped brain against a whole head)? The
    # similarity is measured inside that one's foreground, so the skull of the other cannot pull
    # the brain outwards; if it is the moving image, the pair is aligned the other way round.
    f8, f8_grid = _level(f_full, fixed_grid, SEARCH_MM)
    m8, m8_grid = _level(m_full, moving_grid, SEARCH_MM)
    vf, vm = _foreground_volume(f8, f8_grid), _foreground_volume(m8, m8_grid)
    swapped = vm < CONTENT_RATIO * vf
    masked = swapped or vf < CONTENT_RATIO * vm
    if swapped:
        f_full, fixed_grid, m_full, moving_grid = m_full, moving_grid, f_full, fixed_grid
        f8, f8_grid, m8, m8_grid = m8, m8_grid, f8, f8_grid
        if init is not None:
            init = np.linalg.inv(np.asarray(init, dtype=np.float64))

    def reference(spacing, erode=False):
        """The reference level cropped to its foreground, and its mask when masked (eroded at
        the finest level: the edge of a stripped brain meets dark CSF in the whole head, and
        counting it biases the scale by a few per cent)."""
        f_lv, f_grid = _crop_to_foreground(*_level(f_full, fixed_grid, spacing), threshold=FOREGROUND)
        mask = None
        if masked:
            mask = f_lv > FOREGROUND
            if erode:
                mask = _eroded(mask)
        return f_lv, f_grid, mask

    # 1. candidates at the search level: rotations about the centroids, then translations
    fs, fs_grid, mask = reference(SEARCH_MM)
    ms, ms_grid = m8, m8_grid
    sim = _Similarity(similarity, fs, fs_grid, mask)
    n_candidates = 1
    if init is not None:
        best = np.asarray(init, dtype=np.float64)
    else:
        cf, cov_f = intensity_moments(fs, fs_grid, 10.0, second=True)
        cm, cov_m = intensity_moments(ms, ms_grid, 10.0, second=True)
        cf_np, cm_np = to_numpy(cf), to_numpy(cm)
        starts = [_about(cf_np, cm_np, r) for r in _candidate_rotations(cov_f, cov_m)]
        scored = sorted((_score(sim, fs, fs_grid, ms, ms_grid, a), i) for i, a in enumerate(starts))
        # translations of the best rotations: centroids disagree when the contents differ
        step = 0.15 * float(np.max(fs_grid.extent_mm))
        shifted = []
        chosen = [i for _, i in scored[:4]]
        if all(_angle_degrees(starts[i]) > LARGE_ROTATION for i in chosen):
            chosen.append(_best_small(scored, starts))  # the headers' orientation always competes
        for i in chosen:
            for offset in itertools.product((-step, 0.0, step), repeat=3):
                a = starts[i].copy()
                a[:3, 3] += np.asarray(offset)
                shifted.append(a)
        n_candidates = len(starts) + len(shifted)
        scored = sorted((_score(sim, fs, fs_grid, ms, ms_grid, a), i) for i, a in enumerate(shifted))
        say(0.05, f"compared {n_candidates} starting poses")
        polished = []
        for _, i in scored[:3]:
            a, loss, _ = _optimise(fs, fs_grid, ms, ms_grid, shifted[i], True, 15, 0.05, sim, cancel,
                                   stop=False)
            polished.append((loss, a))
        small = [p for p in polished if _angle_degrees(p[1]) <= LARGE_ROTATION]
        if not small:  # the headers' orientation must always be in the race
            a, loss, _ = _optimise(fs, fs_grid, ms, ms_grid, shifted[_best_small(scored, shifted)],
                                   True, 15, 0.05, sim, cancel, stop=False)
            small = [(loss, a)]
        best_small = min(small, key=lambda p: p[0])
        best_any = min(polished, key=lambda p: p[0])
        best = best_any[1] if best_any[0] < best_small[0] - LARGE_ROTATION_MARGIN else best_small[1]
        say(0.2, "best starting pose chosen")

    # 2. rigid then affine, coarse to fine
    done_steps = []
    f_lv = m_lv = None
    for index, (spacing, n) in enumerate(zip(levels_mm, steps)):
        f_lv, f_grid, mask = reference(spacing, erode=index == len(levels_mm) - 1)
        m_lv, m_grid = _level(m_full, moving_grid, spacing)
        sim = _Similarity(similarity, f_lv, f_grid, mask)
        lr = 0.02 / 2 ** index
        k1 = 0
        if index == 0:  # rigid first at the coarsest level only: the pose, before any shear
            best, _, k1 = _optimise(f_lv, f_grid, m_lv, m_grid, best, True, n, lr, sim, cancel)
        best, _, k2 = _optimise(f_lv, f_grid, m_lv, m_grid, best, False, n, lr, sim, cancel)
        done_steps += [k1, k2]
        say(0.2 + 0.8 * (index + 1) / len(levels_mm), f"level {index + 1}/{len(levels_mm)} "
            f"({spacing:g} mm): rigid {k1} + affine {k2} steps")

    # 3. how good is it
    # the quality score counts every voxel of the box (min_std 0), as POOR_LNCC was calibrated
    lncc_sim = _Similarity("lncc", f_lv, f_grid, mask, min_std=0.0)
    lncc = 1.0 - _score(lncc_sim, f_lv, f_grid, m_lv, m_grid, best)
    threshold = POOR_LNCC["masked" if masked else "plain"]
    # the decoys cost 9 scores at the finest level: only when the absolute score is in doubt
    decoy = None
    if similarity != "mi" and (decoys or lncc < threshold):
        decoy = _best_decoy(lncc_sim, f_lv, f_grid, m_lv, m_grid, best)
    overlap = _foreground_overlap(f_lv, f_grid, m_lv, m_grid, best, mask)
    if swapped:
        best = np.linalg.inv(best)
    scales = np.linalg.svd(best[:3, :3], compute_uv=False)
    implausible = bool(scales.min() < PLAUSIBLE_SCALE[0] or scales.max() > PLAUSIBLE_SCALE[1])
    # local NCC says nothing across modalities; there only a lost overlap is flagged
    margin = None if decoy is None else lncc - decoy
    poor = implausible or (overlap < 0.5 if similarity == "mi" else
                           (lncc < threshold and margin < DECOY_MARGIN))
    turned = "" if margin is None else f" ({margin:+.2f} against the pose turned round)"
    message = f"automatic alignment: local NCC {lncc:.2f}{turned}, foreground overlap {overlap:.2f}"
    if implausible:
        message = (f"the automatic alignment looks poor: it scales the moving image by "
                   f"{scales.min():.2f}-{scales.max():.2f} along its axes (an anatomical answer stays within "
                   f"{PLAUSIBLE_SCALE[0]:g}-{PLAUSIBLE_SCALE[1]:g}): check the result, or give an "
                   "--initial-transform (e.g. from landmarks), or --init rigid or none, and run again")
    elif poor:
        detail = (f"foreground overlap {overlap:.2f}, expected above 0.5" if similarity == "mi" else
                  f"local NCC {lncc:.2f}, expected above {threshold}, and only {margin:+.2f} better than "
                  f"the same pose turned round, expected {DECOY_MARGIN:+g} or more")
        message = (f"the automatic alignment looks poor ({detail}): check the result, or give an "
                   "--initial-transform (e.g. from landmarks) and run again")
    say(1.0, message)
    result = AutoResult(best, lncc, overlap, poor, message, time.perf_counter() - t0,
                        n_candidates, done_steps, masked, swapped, decoy)
    return result if report else best
