"""Jacobian determinant of a deformation and the statistics read from it.

Conventions: :mod:`deepreglib.core.conventions`. ``J(x) = det(I + grad u(x))``. The determinant is a
ratio of volumes, so it does not depend on the unit: for ``u`` in voxels of its grid and
``grad`` in voxels it equals the physical ``det(I + d u_mm / d x_mm)`` (the two Jacobians are
similar matrices, ``S G S^-1`` with ``S`` = direction x spacing). Pass ``spacing`` only when
``u`` is already in millimetres (components still in ``(k, j, i)`` order).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def spatial_gradient(u: torch.Tensor, spacing: Optional[Sequence[float]] = None) -> torch.Tensor:
    """``(N, C, D, H, W)`` -> ``(N, C, 3, D, H, W)``: ``d u_c / d x_a`` by central differences
    (one-sided at the borders), ``a`` in ``(k, j, i)`` order, divided by ``spacing`` if given."""
    if u.ndim != 5:
        raise ValueError(f"expected (N, C, D, H, W), got {tuple(u.shape)}")
    if min(u.shape[2:]) < 2:
        raise ValueError(f"every spatial axis needs 2 voxels for a gradient, got {tuple(u.shape)}")
    sp = [1.0, 1.0, 1.0] if spacing is None else [float(s) for s in spacing]
    grads = torch.gradient(u, spacing=sp, dim=(2, 3, 4), edge_order=1)
    return torch.stack(grads, dim=2)


def jacobian_determinant(u: torch.Tensor, spacing: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Determinant of ``I + grad u`` per voxel.

    Args:
        u: DDF ``(N, 3, D, H, W)``, components ``(k, j, i)``; voxels of its grid (default) or mm.
        spacing: ``(d, h, w)`` voxel size in mm when ``u`` is in mm; ``None`` for voxel units.
    Returns ``(N, 1, D, H, W)``; 1 where the map preserves volume, <= 0 where it folds.
    """
    if u.ndim != 5 or u.shape[1] != 3:
        raise ValueError(f"displacement must be (N, 3, D, H, W), got {tuple(u.shape)}")
    if min(u.shape[2:]) < 2:
        raise ValueError(f"every spatial axis needs 2 voxels for a gradient, got {tuple(u.shape)}")
    sp = [1.0, 1.0, 1.0] if spacing is None else [float(s) for s in spacing]
    # g[c][a] = d u_c / d x_a, (N, D, H, W) each; the 3x3 determinant by cofactors (a batched
    # LU, torch.linalg.det, is ~10x slower and needs the 9 values per voxel in one tensor)
    g = [torch.gradient(u[:, c], spacing=sp, dim=(1, 2, 3), edge_order=1) for c in range(3)]
    a, b, c = g[0][0] + 1, g[0][1], g[0][2]
    d, e, f = g[1][0], g[1][1] + 1, g[1][2]
    p, q, r = g[2][0], g[2][1], g[2][2] + 1
    det = a * (e * r - f * q)
    det -= b * (d * r - f * p)
    det += c * (d * q - e * p)
    return det.unsqueeze(1)


def _masked(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.reshape(-1)
    m = mask.to(torch.bool).expand_as(values)
    return values[m]


def folding_fraction(jac: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """Fraction (0..1) of voxels (inside ``mask`` if given) where ``det <= 0``."""
    v = _masked(jac, mask)
    return float((v <= 0).float().mean()) if v.numel() else 0.0


def std_log_jacobian(jac: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     clamp: float = 1e-9) -> float:
    """SDlogJ: standard deviation of ``log(det)``, with ``det`` clamped to ``[clamp, 1/clamp]``
    as in the Learn2Reg evaluation. Lower is smoother; 0 for any volume-preserving field."""
    v = _masked(jac, mask).double().clamp(clamp, 1.0 / clamp).log()
    return float(v.std()) if v.numel() > 1 else 0.0
