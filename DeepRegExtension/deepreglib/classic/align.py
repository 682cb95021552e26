"""Initial alignment of unaligned scans (the ``--init`` option). Conventions:
:mod:`deepreglib.core.conventions`, resampling: :mod:`deepreglib.core.resample`.

Every function here returns a 4x4 LPS matrix ``A`` (numpy float64) in ITK's resampling
direction: it maps a point ``p`` of the *fixed* space to the point ``A p`` of the *moving* space
that the fixed voxel pulls from, so ``resample_to_grid(moving, moving_grid, fixed_grid, A)`` is
the moving image aligned to the fixed one. Everything runs on torch on the given ``device``.

Images are ``(1, 1, D, H, W)`` tensors (a ``(D, H, W)`` array is accepted too) on their grids.
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.errors import BadInputError, CancelledError
from ..core.geometry import Grid
from ..core.losses import MSE, GlobalNCC, LocalNCC, MINDLoss, MutualInformation
from ..core.preprocess import normalize_intensity
from ..core.resample import coordinate_dtype, downsample, resample_to_grid
from .adam import Adam

ProgressFn = Optional[Callable[[float, str], None]]
CancelFn = Optional[Callable[[], bool]]

#: Similarity names accepted by :func:`affine_register` and :mod:`deepreglib.classic.optimise`.
SIMILARITIES = ("ncc", "lncc", "mi", "mind", "mse")


#: Voxels sampled per step by ``mi`` in :func:`affine_register`.
MI_SAMPLES = 32768


def make_similarity(name: str, **options) -> torch.nn.Module:
    """The loss module (minimise, see :mod:`deepreglib.core.losses`) for a similarity name:
    ``ncc`` = 1 - global NCC (same modality, one global intensity relation), ``lncc`` = 1 - mean
    local NCC (same modality with bias fields), ``mi`` = -mutual information and ``mind`` = MIND-SSC
    descriptor distance (different modalities), ``mse`` = mean squared difference."""
    factories = {"ncc": GlobalNCC, "lncc": LocalNCC, "mi": MutualInformation, "mind": MINDLoss,
                 "mse": MSE}
    if name not in factories:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {name!r}")
    return factories[name](**options)


def as_volume(image, grid: Grid, name: str, device) -> torch.Tensor:
    x = torch.as_tensor(image)
    if x.ndim == 3:
        x = x[None, None]
    if x.ndim != 5 or x.shape[:2] != (1, 1):
        raise ValueError(f"{name} must be (1, 1, D, H, W) or (D, H, W), got {tuple(x.shape)}")
    if tuple(x.shape[2:]) != grid.shape:
        raise ValueError(f"{name} shape {tuple(x.shape[2:])} does not match its grid {grid.shape}")
    if not torch.isfinite(x).all():
        raise BadInputError(f"{name} contains NaN or infinite values; fix or mask them first")
    return x.to(device=device, dtype=torch.float32)


def check_cancel(cancel: CancelFn, what: str) -> None:
    if cancel is not None and cancel():
        raise CancelledError(f"{what} cancelled")


def to_numpy(m: torch.Tensor) -> np.ndarray:
    return m.detach().to("cpu", torch.float64).numpy()


# -- moments ---------------------------------------------------------------------------------
def _weights(image: torch.Tensor, low_percentile: float) -> torch.Tensor:
    """Intensity minus a low percentile, clipped at 0: the background (air at -1000 HU, MR noise)
    gets no weight, so a large field of view does not pull the centroid to the volume centre."""
    values = image.reshape(-1)
    if values.numel() > 1_000_000:  # a strided subsample gives the same percentile, far cheaper
        values = values[:: values.numel() // 1_000_000 + 1]
    k = max(1, int(round(low_percentile / 100.0 * values.numel())))
    low = values.kthvalue(min(k, values.numel())).values
    w = (image - low).clamp(min=0)
    if float(w.sum()) <= 0:
        raise BadInputError("the image is constant above its low percentile; nothing to align")
    return w


def intensity_moments(image: torch.Tensor, grid: Grid, low_percentile: float,
             second: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weighted centroid ``(3,)`` and, if ``second``, covariance ``(3, 3)`` in LPS mm.

    Computed from 1D and 2D marginal sums of the weights in index space and mapped to physical
    space by the grid's linear part (``c = M c_idx + o``, ``C = M C_idx M^T``), so no per-voxel
    coordinate array is built: a 512x512x300 CT needs no extra gigabytes."""
    dtype = coordinate_dtype(image.device)
    w = _weights(image, low_percentile)[0, 0]
    total = w.sum(dtype=dtype)
    axes = [torch.arange(n, dtype=dtype, device=image.device) for n in w.shape]
    others = [(1, 2), (0, 2), (0, 1)]
    marginals = [w.sum(dim=others[a], dtype=dtype) / total for a in range(3)]
    c_idx = torch.stack([(marginals[a] * axes[a]).sum() for a in range(3)])
    m = torch.as_tensor(grid.index_to_physical_matrix, dtype=dtype, device=image.device)
    centroid = m[:3, :3] @ c_idx + m[:3, 3]
    if not second:
        return centroid, None
    d = [axes[a] - c_idx[a] for a in range(3)]
    cov = torch.zeros(3, 3, dtype=dtype, device=image.device)
    for a in range(3):
        cov[a, a] = (marginals[a] * d[a] ** 2).sum()
        for b in range(a + 1, 3):
            pair = w.sum(dim=3 - a - b, dtype=dtype) / total  # 2D marginal over axes a < b
            cov[a, b] = cov[b, a] = (pair * d[a][:, None] * d[b][None, :]).sum()
    return centroid, m[:3, :3] @ cov @ m[:3, :3].T


def _coarse(image: torch.Tensor, grid: Grid, max_size: int) -> Tuple[torch.Tensor, Grid]:
    factor = max(1.0, max(grid.shape) / float(max_size))
    return downsample(image, grid, factor)


def center_of_mass_transform(fixed, fixed_grid: Grid, moving, moving_grid: Grid,
                             low_percentile: float = 10.0, device="cpu") -> np.ndarray:
    """Translation taking the fixed intensity centroid to the moving one.

    Args:
        fixed, moving: ``(1, 1, D, H, W)`` images on their grids (any intensity unit).
        low_percentile: intensities below this percentile (0..100) get no weight.
    Returns:
        4x4 LPS ``[[I, c_moving - c_fixed], [0, 1]]`` (mm).
    """
    f = as_volume(fixed, fixed_grid, "fixed", device)
    m = as_volume(moving, moving_grid, "moving", device)
    cf, _ = intensity_moments(f, fixed_grid, low_percentile, second=False)
    cm, _ = intensity_moments(m, moving_grid, low_percentile, second=False)
    out = np.eye(4)
    out[:3, 3] = to_numpy(cm - cf)
    return out


def box_centres_transform(fixed_grid: Grid, moving_grid: Grid) -> np.ndarray:
    """Translation taking the centre of the fixed image's box (the middle of its voxel
    centres) to the centre of the moving image's box: ``[[I, c_moving - c_fixed], [0, 1]]`` (mm,
    LPS). What is left to do for images whose headers do not share a space and whose content
    says too little to align by (a few centimetres of ultrasound against an MR)."""
    out = np.eye(4)
    out[:3, 3] = moving_grid.centre - fixed_grid.centre
    return out


def principal_axes(cov: torch.Tensor) -> np.ndarray:
    _, vecs = torch.linalg.eigh(cov.to("cpu", torch.float64))  # columns, ascending eigenvalues
    return vecs.numpy()


def moments_transform(fixed, fixed_grid: Grid, moving, moving_grid: Grid,
                      low_percentile: float = 10.0, max_size: int = 32,
                      device="cpu") -> np.ndarray:
    """Rigid alignment of principal axes (centroid + rotation from second moments).

    An eigenvector's sign is arbitrary and the order of near-equal eigenvalues is unstable, so
    all 24 proper rotations that map the fixed principal frame onto the moving one (3 axis
    pairings x sign flips with det = +1), plus the plain centroid translation, are tried; the one
    with the lowest 1 - global NCC after resampling on a coarse grid (``max_size`` voxels on the
    longest side) wins.

    Returns:
        4x4 LPS: ``p -> c_moving + R (p - c_fixed)``.
    """
    f = as_volume(fixed, fixed_grid, "fixed", device)
    m = as_volume(moving, moving_grid, "moving", device)
    cf, cov_f = intensity_moments(f, fixed_grid, low_percentile, second=True)
    cm, cov_m = intensity_moments(m, moving_grid, low_percentile, second=True)
    ef, em = principal_axes(cov_f), principal_axes(cov_m)
    cf_np, cm_np = to_numpy(cf), to_numpy(cm)

    candidates = [np.eye(3)]
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            r = em[:, list(perm)] @ np.diag(signs) @ ef.T
            if np.linalg.det(r) > 0:  # a reflection is not a patient motion
                candidates.append(r)

    fs, fs_grid = _coarse(normalize_intensity(f), fixed_grid, max_size)
    ms, ms_grid = _coarse(normalize_intensity(m), moving_grid, max_size)
    score = GlobalNCC()
    best, best_loss = None, float("inf")
    for r in candidates:
        a = np.eye(4)
        a[:3, :3] = r
        a[:3, 3] = cm_np - r @ cf_np
        with torch.no_grad():
            loss = float(score(resample_to_grid(ms, ms_grid, fs_grid, a), fs))
        if loss < best_loss - 1e-9:
            best, best_loss = a, loss
    return best


# -- optimisation ----------------------------------------------------------------------------
def _skew(v: torch.Tensor) -> torch.Tensor:
    z = torch.zeros((), dtype=v.dtype, device=v.device)
    return torch.stack([torch.stack([z, -v[2], v[1]]), torch.stack([v[2], z, -v[0]]),
                        torch.stack([-v[1], v[0], z])])


class AffineAboutCentre(torch.nn.Module):
    """``T(p) = c + M (p - c) + radius * t`` with ``M = I + L`` (affine, 12 parameters) or
    ``M = exp(skew(w))`` (rigid: axis-angle ``w``, exactly orthonormal). Parameters start at 0
    (identity). Scaling the translation by the image radius makes one unit of every parameter
    move the image boundary by about one radius, so a single Adam step size suits all of them."""

    def __init__(self, centre: np.ndarray, radius: float, rigid: bool, dtype, device):
        super().__init__()
        self.rigid = rigid
        self.register_buffer("centre", torch.as_tensor(centre, dtype=dtype, device=device),
                             persistent=False)
        self.radius = float(radius)
        shape = (3,) if rigid else (3, 3)
        self.linear = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.translation = torch.nn.Parameter(torch.zeros(3, dtype=dtype, device=device))

    def forward(self) -> torch.Tensor:
        eye = torch.eye(3, dtype=self.centre.dtype, device=self.centre.device)
        m = torch.linalg.matrix_exp(_skew(self.linear)) if self.rigid else eye + self.linear
        t = self.centre - m @ self.centre + self.radius * self.translation
        bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=m.dtype, device=m.device)
        return torch.cat([torch.cat([m, t[:, None]], dim=1), bottom], dim=0)


def affine_register(fixed, fixed_grid: Grid, moving, moving_grid: Grid,
                    init: Optional[np.ndarray] = None, levels: Sequence[float] = (4, 2, 1),
                    iterations: Sequence[int] = (100, 50, 25), similarity: str = "ncc",
                    rigid: bool = False, lr: float = 0.02, progress: ProgressFn = None,
                    cancel: CancelFn = None, device="cpu",
                    similarity_options: Optional[dict] = None) -> np.ndarray:
    """Multi-resolution affine (or rigid) registration by gradient descent (Adam).

    The moving image is resampled onto the fixed grid, downsampled by each factor in ``levels``
    (blurred, :func:`resample.downsample`), through ``A = init @ T`` where ``T`` is an affine map
    about the fixed image centre (identity at start). The step size halves at each finer level
    (coarse levels find the basin, fine levels polish).

    Args:
        fixed, moving: ``(1, 1, D, H, W)`` images on their grids; intensities are scaled to
            [0, 1] by robust percentiles first.
        init: 4x4 LPS starting matrix (fixed -> moving points); ``None`` = identity.
        levels: downsampling factors, coarse to fine (1 = the fixed grid itself).
        iterations: Adam steps per level (same length as ``levels``).
        similarity: a name in :data:`SIMILARITIES` (:func:`make_similarity`);
            ``similarity_options`` go to its loss. ``mi`` samples :data:`MI_SAMPLES` random
            voxels per step unless told otherwise (Mattes-style: the joint histogram of every
            voxel is ~20x slower and no more accurate for 12 parameters).
        rigid: rotation + translation only (the returned 3x3 block is orthonormal, det +1).
        lr: Adam step at the coarsest level, in units of the fixed image radius.
        progress: ``progress(fraction 0..1, message)``, called as the steps go (ends at 1).
        cancel: called every step; returning True raises :class:`~deepreglib.core.errors.CancelledError`.
    Returns:
        4x4 LPS matrix ``A`` mapping fixed points to moving points.
    """
    if len(levels) != len(iterations) or not levels:
        raise ValueError(f"levels {tuple(levels)} and iterations {tuple(iterations)} must be "
                         "non-empty and of the same length")
    if any(f < 1 for f in levels) or any(n < 0 for n in iterations):
        raise ValueError(f"levels must be >= 1 and iterations >= 0, got {levels}, {iterations}")
    options = dict(similarity_options or {})
    if similarity == "mi":
        options.setdefault("max_voxels", MI_SAMPLES)
    sim = make_similarity(similarity, **options)
    f = normalize_intensity(as_volume(fixed, fixed_grid, "fixed", device))
    m = normalize_intensity(as_volume(moving, moving_grid, "moving", device))
    dtype = coordinate_dtype(device)
    a0 = torch.as_tensor(np.eye(4) if init is None else np.asarray(init, dtype=np.float64),
                         dtype=dtype, device=device)
    if tuple(a0.shape) != (4, 4):
        raise ValueError(f"init must be 4x4, got {tuple(a0.shape)}")

    centre = fixed_grid.index_to_physical((np.asarray(fixed_grid.shape) - 1) / 2.0)
    radius = float(np.mean(fixed_grid.extent_mm)) / 2.0
    model = AffineAboutCentre(centre, radius, rigid, dtype, device)
    total = max(1, sum(iterations))
    done = 0
    # The moving image is downsampled to about the same spacing as the fixed level, so a fine
    # moving image is not aliased when sampled on a coarse fixed grid.
    spacing_ratio = float(np.mean(fixed_grid.spacing) / np.mean(moving_grid.spacing))
    for index, (factor, steps) in enumerate(zip(levels, iterations)):
        f_level, f_grid = downsample(f, fixed_grid, factor)
        m_level, m_grid = downsample(m, moving_grid, max(1.0, factor * spacing_ratio))
        optimiser = Adam(model.parameters(), lr=lr / 2 ** index)
        label = f"{'rigid' if rigid else 'affine'} level {index + 1}/{len(levels)} (x{factor:g})"
        for step in range(steps):
            check_cancel(cancel, "affine registration")
            optimiser.zero_grad()
            warped = resample_to_grid(m_level, m_grid, f_grid, a0 @ model(), padding="border")
            loss = sim(warped, f_level)
            loss.backward()
            optimiser.step()
            done += 1
            if progress is not None and (step % 5 == 0 or step == steps - 1):
                progress(done / total, f"{label}: loss {float(loss.detach()):.4f}")
    if progress is not None:
        progress(1.0, "affine registration done")
    with torch.no_grad():
        return to_numpy(a0 @ model())
