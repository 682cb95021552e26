"""Evaluation metrics: label overlap, surface distances, landmark error, image similarity and
field quality. Conventions: :mod:`deepreglib.core.conventions`.

Inputs may be numpy arrays or torch tensors; results are Python floats, numpy arrays or dicts
of floats. Wherever distances appear, ``spacing`` is the voxel size in mm in *array-axis order*
``(d, h, w)`` = ``(z, y, x)``, i.e. ITK's ``GetSpacing()`` reversed (``grid.spacing[::-1]``).
Volumes are ``(D, H, W)``; leading axes of size 1 (``(1, 1, D, H, W)``) are accepted and dropped.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from .jacobian import folding_fraction, std_log_jacobian
from .losses import ncc


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _volume(x, name: str) -> np.ndarray:
    """A ``(D, H, W)`` array from ``(D, H, W)`` or ``(1, ..., 1, D, H, W)``."""
    arr = _numpy(x)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume (D, H, W), got shape {_numpy(x).shape}")
    return arr


def _same_shape(a: np.ndarray, b: np.ndarray, names: Tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and "
                         f"{b.shape}")


def _spacing(spacing: Optional[Sequence[float]]) -> Tuple[float, float, float]:
    """``(d, h, w)`` mm; ``None`` means 1 (distances in voxels)."""
    if spacing is None:
        return (1.0, 1.0, 1.0)
    sp = tuple(float(s) for s in np.ravel(_numpy(spacing)))
    if len(sp) != 3 or min(sp) <= 0 or not all(np.isfinite(sp)):
        raise ValueError(f"spacing must be 3 positive numbers (d, h, w) in mm, got {spacing!r}")
    return sp


def _labels(a: np.ndarray, b: np.ndarray, labels: Optional[Iterable[int]]) -> Tuple[int, ...]:
    if labels is not None:
        return tuple(int(x) for x in labels)
    found = np.union1d(np.unique(a), np.unique(b))
    return tuple(int(x) for x in found if x != 0)


# -- overlap -------------------------------------------------------------------------------------
def dice_per_label(a, b, labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """Dice ``2 |A n B| / (|A| + |B|)`` of each label of two integer label maps (same shape).

    Args:
        a, b: label maps, any shape (both the same).
        labels: labels to score; default: every non-zero label present in ``a`` or ``b``.
    Returns ``{label: dice}`` with dice in ``[0, 1]`` (1 = identical); a requested label absent
    from both maps gets ``nan`` (nothing to overlap), so averages should use ``np.nanmean``.
    """
    a, b = _numpy(a), _numpy(b)
    _same_shape(a, b, ("a", "b"))
    out: Dict[int, float] = {}
    for label in _labels(a, b, labels):
        in_a, in_b = a == label, b == label
        total = int(in_a.sum()) + int(in_b.sum())
        out[label] = float("nan") if total == 0 else 2.0 * int((in_a & in_b).sum()) / total
    return out


# -- surface distances ---------------------------------------------------------------------------
_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it; outside the volume counts as outside,
    so a mask touching the border has surface there."""
    return mask & ~ndimage.binary_erosion(mask, structure=_FACE_NEIGHBOURS, border_value=0)


def surface_distances(a_mask, b_mask, spacing: Optional[Sequence[float]]
                      ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Directed distances (mm) between the surface voxels of two binary masks ``(D, H, W)``.

    Returns ``(a_to_b, b_to_a)``: for every surface voxel of ``a`` the distance from its centre to
    the nearest surface-voxel centre of ``b``, and the reverse; ``None`` if either mask is empty.
    ``spacing``: ``(d, h, w)`` mm (``None``: voxels).
    """
    a, b = _volume(a_mask, "a_mask").astype(bool), _volume(b_mask, "b_mask").astype(bool)
    _same_shape(a, b, ("a_mask", "b_mask"))
    sp = _spacing(spacing)
    if not a.any() or not b.any():
        return None
    sa, sb = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=sp)
    to_a = ndimage.distance_transform_edt(~sa, sampling=sp)
    return to_b[sa], to_a[sb]


def _empty_value(a_mask, b_mask) -> float:
    """nan if both masks are empty, inf if exactly one is."""
    a_any = bool(_numpy(a_mask).any())
    b_any = bool(_numpy(b_mask).any())
    return float("nan") if not (a_any or b_any) else float("inf")


def hd95(a_mask, b_mask, spacing: Optional[Sequence[float]]) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) between two binary masks ``(D, H, W)``.

    The larger of the two directed 95th percentiles of :func:`surface_distances` (surface voxels
    counted equally, as in the DeepMind surface-distance code that Learn2Reg uses, there with
    surfel areas). 0 for identical masks. ``inf`` if exactly one mask is empty, ``nan`` if both.
    ``spacing``: ``(d, h, w)`` mm, ITK's spacing reversed; ``None`` gives voxels.
    """
    dists = surface_distances(a_mask, b_mask, spacing)
    if dists is None:
        return _empty_value(a_mask, b_mask)
    return float(max(np.percentile(dists[0], 95), np.percentile(dists[1], 95)))


def assd(a_mask, b_mask, spacing: Optional[Sequence[float]]) -> float:
    """Average symmetric surface distance (mm): the mean of both directed distance sets of
    :func:`surface_distances` pooled. 0 for identical masks; ``inf`` if exactly one mask is
    empty, ``nan`` if both. ``spacing``: ``(d, h, w)`` mm; ``None`` gives voxels."""
    dists = surface_distances(a_mask, b_mask, spacing)
    if dists is None:
        return _empty_value(a_mask, b_mask)
    return float((dists[0].sum() + dists[1].sum()) / (dists[0].size + dists[1].size))


def hd95_per_label(a, b, spacing: Optional[Sequence[float]],
                   labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """:func:`hd95` of each label of two label maps ``(D, H, W)``; labels as in
    :func:`dice_per_label` (a label present in one map only gives ``inf``, in neither ``nan``)."""
    a, b = _volume(a, "a"), _volume(b, "b")
    _same_shape(a, b, ("a", "b"))
    return {label: hd95(a == label, b == label, spacing) for label in _labels(a, b, labels)}


def assd_per_label(a, b, spacing: Optional[Sequence[float]],
                   labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """:func:`assd` of each label of two label maps ``(D, H, W)``; labels as in
    :func:`dice_per_label`."""
    a, b = _volume(a, "a"), _volume(b, "b")
    _same_shape(a, b, ("a", "b"))
    return {label: assd(a == label, b == label, spacing) for label in _labels(a, b, labels)}


# -- landmarks -----------------------------------------------------------------------------------
def tre(points_a, points_b) -> np.ndarray:
    """Target registration error: Euclidean distance between corresponding points.

    Args:
        points_a, points_b: ``(P, 3)`` physical points in mm, the same axis order in both (LPS
            ``(x, y, z)`` as read from files; the order does not change a distance).
    Returns ``(P,)`` float64 distances in mm.
    """
    pa = np.asarray(_numpy(points_a), dtype=np.float64)
    pb = np.asarray(_numpy(points_b), dtype=np.float64)
    if pa.ndim != 2 or pa.shape[1] != 3 or pa.shape != pb.shape:
        raise ValueError(f"points must be two (P, 3) arrays of the same shape, got {pa.shape} and "
                         f"{pb.shape}")
    return np.linalg.norm(pa - pb, axis=1)


def _summary(values: np.ndarray, what: str) -> Dict[str, float]:
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError(f"no {what} to summarise")
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
            "p95": float(np.percentile(v, 95)), "max": float(v.max()), "count": int(v.size)}


def tre_summary(distances) -> Dict[str, float]:
    """``{mean, std, median, p95, max, count}`` of :func:`tre` distances (mm)."""
    return _summary(_numpy(distances), "distances")


# -- images --------------------------------------------------------------------------------------
def ncc_metric(a, b, mask=None) -> float:
    """Global normalised cross-correlation of two images (same shape; all voxels pooled, or
    those where ``mask`` is non-zero), in float64, without a variance floor. Range ``[-1, 1]``,
    1 for identical images; ``nan`` if either image is constant there (undefined)."""
    ta = torch.as_tensor(_numpy(a), dtype=torch.float64)
    tb = torch.as_tensor(_numpy(b), dtype=torch.float64)
    if ta.shape != tb.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(ta.shape)} and "
                         f"{tuple(tb.shape)}")
    tm = None
    if mask is not None:
        tm = torch.as_tensor(_numpy(mask) != 0)
        if tm.shape != ta.shape:
            raise ValueError(f"mask must have the images' shape {tuple(ta.shape)}, got "
                             f"{tuple(tm.shape)}")
        tm = tm.reshape(1, 1, -1, 1, 1)
    return float(ncc(ta.reshape(1, 1, -1, 1, 1), tb.reshape(1, 1, -1, 1, 1), tm, eps=0.0)[0])


# -- field quality -------------------------------------------------------------------------------
def _jacobian_and_mask(jac, mask) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    j = torch.as_tensor(_numpy(jac))
    if mask is None:
        return j, None
    m = torch.as_tensor(_numpy(mask) != 0)
    try:
        ok = torch.broadcast_shapes(m.shape, j.shape) == j.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask of shape {tuple(m.shape)} does not broadcast to the Jacobian's "
                         f"{tuple(j.shape)}")
    return j, m


def folding_percent(jac, mask=None) -> float:
    """Percentage (0..100) of voxels (inside ``mask``) with Jacobian determinant ``<= 0``.
    ``jac``: determinants, e.g. ``(N, 1, D, H, W)`` from :func:`jacobian.jacobian_determinant`."""
    j, m = _jacobian_and_mask(jac, mask)
    return 100.0 * folding_fraction(j, m)


def sdlogj(jac, mask=None) -> float:
    """Standard deviation of ``log(det)`` (inside ``mask``), :func:`jacobian.std_log_jacobian`.
    0 for a volume-preserving field; lower is smoother."""
    j, m = _jacobian_and_mask(jac, mask)
    return std_log_jacobian(j, m)


def endpoint_error(u_pred, u_true, spacing: Optional[Sequence[float]] = None,
                   mask=None) -> Dict[str, float]:
    """Endpoint error ``|u_pred(x) - u_true(x)|`` of two displacement fields.

    Args:
        u_pred, u_true: ``(N, 3, D, H, W)`` in voxels, components ``(k, j, i)``.
        spacing: ``(d, h, w)`` mm: component ``c`` is scaled by ``spacing[c]`` so errors are in
            mm (a length, so the grid's direction matrix does not change it); ``None``: voxels.
        mask: optional ``(N or 1, 1, D, H, W)`` or ``(D, H, W)``; only non-zero voxels count.
    Returns ``{mean, median, p95, max}`` over the (masked) voxels of all items.
    """
    up = np.asarray(_numpy(u_pred), dtype=np.float64)
    ut = np.asarray(_numpy(u_true), dtype=np.float64)
    if up.ndim != 5 or up.shape[1] != 3 or up.shape != ut.shape:
        raise ValueError(f"u_pred and u_true must both be (N, 3, D, H, W), got {up.shape} and "
                         f"{ut.shape}")
    sp = np.asarray(_spacing(spacing)).reshape(1, 3, 1, 1, 1)
    err = np.sqrt((((up - ut) * sp) ** 2).sum(axis=1, keepdims=True))  # (N, 1, D, H, W)
    if mask is not None:
        m = _numpy(mask) != 0
        try:
            m = np.broadcast_to(m, err.shape)
        except ValueError:
            raise ValueError(f"mask of shape {m.shape} does not broadcast to {err.shape}") from None
        err = err[m]
    if err.size == 0:
        raise ValueError("mask selects no voxels")
    s = _summary(err, "voxels")
    return {k: s[k] for k in ("mean", "median", "p95", "max")}


__all__ = [
    "dice_per_label", "surface_distances", "hd95", "assd", "hd95_per_label", "assd_per_label",
    "tre", "tre_summary", "ncc_metric", "folding_percent", "sdlogj", "endpoint_error",
]
