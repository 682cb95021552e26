"""SAME's embedding-based steps (Liu et al., "SAME: Deformable Image Registration based on
Self-supervised Anatomical Embeddings", MICCAI 2021): SAM-affine and SAM-coarse, as functions of
precomputed SAM embeddings (:mod:`deepreglib.methods.same.network`), so they are testable with any
embedding. Conventions: :mod:`deepreglib.core.conventions`.

Points are ``(P, 3)`` continuous voxel indices ``(k, j, i)`` of an *image* grid unless a name says
``_lps`` (physical LPS mm ``(x, y, z)``). Embeddings are ``(1, C, d, h, w)`` unit vectors on a
feature grid covering the same box (``ALIGN_CORNERS``; SAME uses the image size / 4).

* SAM-affine: fixed points on a stride-8 lattice inside a body mask (threshold + morphology), each
  matched to the most similar moving feature voxel (refined to sub-voxel by a per-axis parabola);
  matches with similarity >= 0.7 are kept and an affine is fitted to the physical point pairs by
  least squares (the paper), or robustly: RANSAC (minimal 4-point samples, consensus, least-squares
  refit on the inliers) or IRLS (Tukey biweight from the least-squares start).
* SAM-coarse: after the affine, the same lattice is re-matched inside a search radius and the
  sparse displacements are interpolated to a dense smooth field by normalised Gaussian
  convolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...core.conventions import ALIGN_CORNERS
from ...core.errors import BadInputError
from ...core.geometry import Grid
from .network import embedding_at, to_feature_coords, to_input_coords
from ...core.resample import gaussian_blur

#: affine fit names accepted by :func:`fit_affine`
FITS = ("lstsq", "ransac", "irls")
#: SAME's similarity threshold (similarity in [-1, 1], see :mod:`deepreglib.methods.same.network`)
SIMILARITY_THRESHOLD = 0.7
#: SAME's lattice stride, in image voxels
POINT_STRIDE = 8


# -- body mask and lattice points -------------------------------------------------------------------
def body_mask(image: torch.Tensor, threshold: float = 0.1, closing: int = 2,
              opening: int = 1) -> torch.Tensor:
    """Foreground of an intensity-normalised image ``(1, 1, D, H, W)`` in [0, 1]: voxels above
    ``threshold``, closed (``closing`` dilations then erosions), opened (removes specks), the
    largest connected component, holes filled. Returns a bool tensor of the same shape."""
    from scipy import ndimage
    if image.ndim != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"image must be (1, 1, D, H, W), got {tuple(image.shape)}")
    m = image[0, 0].detach().cpu().numpy() > threshold
    ball = ndimage.generate_binary_structure(3, 1)
    if closing > 0:
        m = ndimage.binary_closing(m, ball, iterations=closing, border_value=0)
    if opening > 0:
        m = ndimage.binary_opening(m, ball, iterations=opening)
    labels, n = ndimage.label(m)
    if n > 1:
        sizes = ndimage.sum(m, labels, index=np.arange(1, n + 1))
        m = labels == (1 + int(np.argmax(sizes)))
    m = ndimage.binary_fill_holes(m)
    return torch.from_numpy(np.ascontiguousarray(m))[None, None].to(image.device)


def lattice_points(mask: torch.Tensor, stride: int = POINT_STRIDE, min_points: int = 8) -> torch.Tensor:
    """``(P, 3)`` float voxel indices of a lattice (every ``stride`` voxels, offset
    ``stride // 2``) inside ``mask`` ``(1, 1, D, H, W)``; the whole lattice when fewer than
    ``min_points`` fall inside (an empty or wrong mask must not stop the registration)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    shape = mask.shape[2:]
    axes = [torch.arange(min(stride // 2, n - 1), n, stride) for n in shape]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    inside = mask[0, 0].cpu()[pts[:, 0], pts[:, 1], pts[:, 2]].bool()
    if int(inside.sum()) >= min_points:
        pts = pts[inside]
    return pts.double()


# -- matching --------------------------------------------------------------------------------------
@dataclass
class Matches:
    """Point pairs from :func:`match_points` (all ``P`` of them; ``kept`` marks the reliable ones).

    Attributes:
        fixed: ``(P, 3)`` fixed-image voxel indices ``(k, j, i)``.
        moving: ``(P, 3)`` moving-image voxel indices of the best match.
        similarity: ``(P,)`` in [-1, 1]; ``-inf`` where no moving voxel lay within the search
            radius (the point is then not kept and its "match" is itself).
        kept: ``(P,)`` bool, ``similarity >= threshold``.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    similarity: torch.Tensor
    kept: torch.Tensor

    def subset(self) -> "Matches":
        k = self.kept
        return Matches(self.fixed[k], self.moving[k], self.similarity[k], self.kept[k])


def _parabolic_offsets(sims: torch.Tensor, best: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Sub-voxel offsets ``(P, 3)`` of the similarity peak from a parabola through the best feature
    voxel and its two neighbours along each axis (0 at the grid border or a flat peak)."""
    d, h, w = shape
    coords = torch.stack([best // (h * w), (best // w) % h, best % w], dim=1)
    strides = (h * w, w, 1)
    offsets = torch.zeros(coords.shape, dtype=torch.float64)
    s0 = sims.gather(1, best[:, None])[:, 0].double()
    for a, (n, st) in enumerate(zip(shape, strides)):
        ok = (coords[:, a] > 0) & (coords[:, a] < n - 1)
        lo = sims.gather(1, (best - st).clamp(0, sims.shape[1] - 1)[:, None])[:, 0].double()
        hi = sims.gather(1, (best + st).clamp(0, sims.shape[1] - 1)[:, None])[:, 0].double()
        denom = lo - 2 * s0 + hi
        off = torch.where(denom < -1e-12, 0.5 * (lo - hi) / denom, torch.zeros_like(denom))
        offsets[:, a] = torch.where(ok, off.clamp(-0.5, 0.5), torch.zeros_like(off))
    return coords.double() + offsets


def match_points(fixed_embedding: torch.Tensor, fixed_shape: Sequence[int], moving_embedding: torch.Tensor,
                 moving_shape: Sequence[int], fixed_points: torch.Tensor,
                 threshold: float = SIMILARITY_THRESHOLD, radius: Optional[float] = None,
                 chunk: int = 512) -> Matches:
    """Best moving match of every fixed point by embedding similarity.

    Args:
        fixed_embedding, moving_embedding: ``(1, C, d, h, w)`` unit embeddings of the two images
            (feature grids may differ in size).
        fixed_shape, moving_shape: the image grids' shapes the embeddings cover.
        fixed_points: ``(P, 3)`` fixed voxel indices.
        threshold: matches with similarity below it are marked not ``kept``.
        radius: if given (same-grid images only), the match is searched only within ``radius``
            image voxels of the fixed point's own position (SAM-coarse).
    """
    if fixed_points.ndim != 2 or fixed_points.shape[1] != 3:
        raise ValueError(f"fixed_points must be (P, 3), got {tuple(fixed_points.shape)}")
    if fixed_embedding.shape[1] != moving_embedding.shape[1]:
        raise ValueError(f"embedding channels differ: {fixed_embedding.shape[1]} vs {moving_embedding.shape[1]}")
    if radius is not None and tuple(fixed_shape) != tuple(moving_shape):
        raise ValueError("a search radius needs both images on the same grid")
    fs, ms = fixed_embedding.shape[2:], tuple(moving_embedding.shape[2:])
    pts = fixed_points.to(fixed_embedding.device, torch.float64)
    fvec = embedding_at(fixed_embedding, to_feature_coords(pts, fixed_shape, fs).float())
    flat = moving_embedding[0].flatten(1)  # (C, M)
    positions = None
    if radius is not None:
        axes = [torch.arange(n, dtype=torch.float64, device=flat.device) for n in ms]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        positions = to_input_coords(grid, moving_shape, ms)
    best_pts, best_sim = [], []
    for start in range(0, pts.shape[0], chunk):
        sims = fvec[start:start + chunk] @ flat
        if positions is not None:
            far = torch.cdist(pts[start:start + chunk], positions) > radius
            sims = sims.masked_fill(far, float("-inf"))
        value, idx = sims.max(dim=1)
        best_pts.append(_parabolic_offsets(sims.nan_to_num(neginf=-2.0).cpu(), idx.cpu(), ms))
        best_sim.append(value.cpu())
    moving_pts = to_input_coords(torch.cat(best_pts), moving_shape, ms)
    sim = torch.cat(best_sim).double()
    none = torch.isinf(sim)  # no candidate within the radius: unmatched, stays in place
    moving_pts[none] = pts.cpu()[none]
    return Matches(pts.cpu(), moving_pts, sim, sim >= threshold)


def similarity_map(fixed_embedding: torch.Tensor, fixed_shape: Sequence[int], moving_embedding: torch.Tensor,
                   moving_shape: Sequence[int], query_kji: Sequence[float]) -> torch.Tensor:
    """SAM's "where is this point in the other scan": similarity in [-1, 1] of the fixed query
    voxel's embedding with every moving voxel, ``(1, 1, *moving_shape)`` (trilinear upsampling
    of the feature-grid map)."""
    q = torch.as_tensor([list(query_kji)], dtype=torch.float64)
    fvec = embedding_at(fixed_embedding, to_feature_coords(q, fixed_shape, fixed_embedding.shape[2:]).float())
    sims = torch.einsum("c,cdhw->dhw", fvec[0], moving_embedding[0])[None, None]
    return F.interpolate(sims, size=tuple(int(s) for s in moving_shape), mode="trilinear",
                         align_corners=ALIGN_CORNERS)


# -- affine fits -------------------------------------------------------------------------------------
@dataclass
class AffineFit:
    """Result of :func:`fit_affine`: ``matrix`` 4x4 (source -> destination points), ``inliers``
    ``(P,)`` bool (all True for least squares), ``rms`` residual over the inliers (point units)."""

    matrix: np.ndarray
    inliers: np.ndarray
    rms: float


def _solve(src: np.ndarray, dst: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    h = np.hstack([src, np.ones((len(src), 1))])
    if weights is not None:
        sw = np.sqrt(weights)[:, None]
        h, dst = h * sw, dst * sw
    x, _, rank, _ = np.linalg.lstsq(h, dst, rcond=None)
    if rank < 4:
        raise BadInputError(f"the {len(src)} matched points are (nearly) coplanar; an affine needs "
                            "points spread in 3D (lower the similarity threshold or the stride)")
    m = np.eye(4)
    m[:3, :] = x.T
    return m


def _residuals(m: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    return np.linalg.norm(src @ m[:3, :3].T + m[:3, 3] - dst, axis=1)


def fit_affine(src, dst, method: str = "lstsq", inlier_threshold: float = 4.0, iterations: int = 1000,
               seed: int = 0) -> AffineFit:
    """Affine ``A`` with ``A src_i ~ dst_i`` from ``(P, 3)`` point pairs (float64).

    Args:
        method: ``"lstsq"`` (least squares, SAME), ``"ransac"`` or ``"irls"`` (robust).
        inlier_threshold: RANSAC's inlier distance, in point units (mm for physical points).
        iterations: RANSAC samples / IRLS iterations.
        seed: RANSAC's sampling seed (the fit is deterministic).
    Raises BadInputError with fewer than 4 pairs or coplanar points.
    """
    if method not in FITS:
        raise ValueError(f"method must be one of {FITS}, got {method!r}")
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3:
        raise ValueError(f"src and dst must be two (P, 3) arrays, got {src.shape} and {dst.shape}")
    if len(src) < 4:
        raise BadInputError(f"an affine fit needs at least 4 matched points, got {len(src)}; the "
                            "images may not show the same anatomy (or lower the similarity threshold)")
    if method == "lstsq":
        m = _solve(src, dst)
        inl = np.ones(len(src), bool)
    elif method == "ransac":
        m, inl = _ransac(src, dst, inlier_threshold, iterations, seed)
    else:
        m, inl = _irls(src, dst, iterations)
    r = _residuals(m, src, dst)[inl]
    return AffineFit(m, inl, float(np.sqrt(np.mean(r ** 2))) if len(r) else float("nan"))


def _ransac(src, dst, threshold, iterations, seed):
    rng = np.random.default_rng(seed)
    n = len(src)
    best, best_count, best_err = None, -1, np.inf
    h = np.hstack([src, np.ones((n, 1))])
    for _ in range(max(1, iterations)):
        idx = rng.choice(n, 4, replace=False)
        hs = h[idx]
        if abs(np.linalg.det(hs)) < 1e-9 * max(1.0, np.abs(hs).max()) ** 3:
            continue  # degenerate (coplanar) sample
        x = np.linalg.solve(hs, dst[idx])
        r = np.linalg.norm(h @ x - dst, axis=1)
        inl = r < threshold
        count, err = int(inl.sum()), float(np.minimum(r, threshold).sum())
        if count > best_count or (count == best_count and err < best_err):
            best, best_count, best_err = inl, count, err
    if best is None or best_count < 4:
        return _solve(src, dst), np.ones(n, bool)
    inl = best
    for _ in range(3):  # refit on the consensus set, then re-select inliers with the refit
        m = _solve(src[inl], dst[inl])
        new = _residuals(m, src, dst) < threshold
        if new.sum() < 4 or np.array_equal(new, inl):
            break
        inl = new
    return _solve(src[inl], dst[inl]), inl


def _irls(src, dst, iterations, c: float = 4.685):
    m = _solve(src, dst)
    w = np.ones(len(src))
    for _ in range(max(1, iterations)):
        r = _residuals(m, src, dst)
        scale = max(1.4826 * float(np.median(r)), 1e-9)
        u = r / (c * scale)
        w_new = np.where(u < 1, (1 - u ** 2) ** 2, 0.0)  # Tukey biweight
        if (w_new > 0).sum() < 4:
            break
        m_new = _solve(src, dst, w_new)
        done = np.abs(m_new - m).max() < 1e-9
        m, w = m_new, w_new
        if done:
            break
    return m, w > 0


# -- dense interpolation ----------------------------------------------------------------------------
def sparse_to_dense(points: torch.Tensor, displacements: torch.Tensor, shape: Sequence[int],
                    sigma: float = POINT_STRIDE, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalised Gaussian convolution of sparse displacements into a smooth dense field.

    ``u(x) = (sum_i w_i G(x - x_i) d_i + e m) / (sum_i w_i G(x - x_i) + e)`` with ``G`` a Gaussian
    of ``sigma`` voxels, ``m`` the weighted mean displacement and ``e`` a small weight
    (1e-3 of the largest kernel sum) so regions far from every point fall back to ``m``.

    Args:
        points: ``(P, 3)`` voxel indices ``(k, j, i)``; displacements: ``(P, 3)`` voxels.
        shape: ``(D, H, W)``; weights: optional ``(P,)`` >= 0.
    Returns ``(1, 3, D, H, W)`` float32.
    """
    if points.shape != displacements.shape or points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points and displacements must be two (P, 3) tensors, got "
                         f"{tuple(points.shape)} and {tuple(displacements.shape)}")
    shape = tuple(int(s) for s in shape)
    if len(points) == 0:
        return torch.zeros((1, 3) + shape)
    w = torch.ones(len(points), dtype=torch.float64) if weights is None else weights.double().cpu()
    idx = points.double().cpu().round().long()
    for a, n in enumerate(shape):
        idx[:, a] = idx[:, a].clamp(0, n - 1)
    flat = (idx[:, 0] * shape[1] + idx[:, 1]) * shape[2] + idx[:, 2]
    n_vox = shape[0] * shape[1] * shape[2]
    acc = torch.zeros(4, n_vox, dtype=torch.float64)
    vals = torch.cat([displacements.double().cpu() * w[:, None], w[:, None]], dim=1)  # (P, 4)
    acc.index_add_(1, flat, vals.t())
    blurred = gaussian_blur(acc.reshape(1, 4, *shape), sigma)
    mean = (displacements.double().cpu() * w[:, None]).sum(0) / w.sum().clamp_min(1e-12)
    eps = 1e-3 * float(blurred[:, 3].max())
    dense = (blurred[:, :3] + eps * mean.view(1, 3, 1, 1, 1)) / (blurred[:, 3:4] + eps)
    return dense.float()


# -- the two steps -----------------------------------------------------------------------------------
@dataclass
class SamAffineResult:
    """SAM-affine's answer: ``matrix`` 4x4 LPS (fixed point -> moving point), the kept point
    pairs in LPS mm, their similarities, the fit's inlier mask (over kept pairs) and facts."""

    matrix: np.ndarray
    fixed_points_lps: np.ndarray
    moving_points_lps: np.ndarray
    similarity: np.ndarray
    inliers: np.ndarray
    info: Dict[str, object] = field(default_factory=dict)


def sam_affine(fixed_embedding: torch.Tensor, fixed_grid: Grid, moving_embedding: torch.Tensor,
               moving_grid: Grid, fixed_points: torch.Tensor, threshold: float = SIMILARITY_THRESHOLD,
               fit: str = "lstsq", inlier_threshold_mm: Optional[float] = None) -> SamAffineResult:
    """SAM-affine between two images on their own grids.

    ``fixed_points`` ``(P, 3)`` fixed voxel indices (see :func:`body_mask`, :func:`lattice_points`).
    ``inlier_threshold_mm`` (RANSAC) defaults to one feature voxel of the moving embedding.
    """
    matches = match_points(fixed_embedding, fixed_grid.shape, moving_embedding, moving_grid.shape,
                           fixed_points, threshold)
    kept = matches.subset()
    src = fixed_grid.index_to_physical(kept.fixed.numpy())
    dst = moving_grid.index_to_physical(kept.moving.numpy())
    if inlier_threshold_mm is None:
        factor = (np.asarray(moving_grid.shape) - 1) / np.maximum(np.asarray(moving_embedding.shape[2:]) - 1, 1)
        inlier_threshold_mm = float(np.max(factor * moving_grid.spacing_kji))
    result = fit_affine(src, dst, fit, inlier_threshold=inlier_threshold_mm)
    info = {"points": int(len(matches.fixed)), "matches_kept": int(kept.fixed.shape[0]),
            "similarity_threshold": float(threshold), "fit": fit, "inliers": int(result.inliers.sum()),
            "fit_rms_mm": result.rms, "mean_similarity_kept": float(kept.similarity.mean())}
    return SamAffineResult(result.matrix, src, dst, kept.similarity.numpy(), result.inliers, info)


def sam_coarse(fixed_embedding: torch.Tensor, moving_embedding: torch.Tensor, shape: Sequence[int],
               fixed_points: torch.Tensor, threshold: float = SIMILARITY_THRESHOLD,
               radius: float = 2 * POINT_STRIDE, sigma: float = POINT_STRIDE) -> Tuple[torch.Tensor, Matches]:
    """SAM-coarse on one grid (the moving image already affinely aligned to the fixed one).

    Returns ``(u, matches)``: ``u`` ``(1, 3, D, H, W)`` voxel DDF with
    ``moving_affine(x + u(x)) ~ fixed(x)``, and the kept matches (voxel indices of the grid).
    """
    matches = match_points(fixed_embedding, shape, moving_embedding, shape, fixed_points, threshold,
                           radius=radius).subset()
    u = sparse_to_dense(matches.fixed, matches.moving - matches.fixed, shape, sigma,
                        weights=matches.similarity.clamp_min(0))
    return u, matches
