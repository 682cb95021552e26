"""Operations on displacement and velocity fields. Conventions: :mod:`deepreglib.core.conventions`.

All fields are ``(N, 3, D, H, W)`` in voxels of their grid, components ``(k, j, i)``; SVF =
stationary velocity field, DDF = dense displacement field.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .conventions import ALIGN_CORNERS
from .warp import identity_grid, sample_at, warp


def _check(u: torch.Tensor, name: str = "field") -> None:
    if u.ndim != 5 or u.shape[1] != 3:
        raise ValueError(f"{name} must be (N, 3, D, H, W), got {tuple(u.shape)}")


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: the displacement of ``exp(v)`` for an SVF ``v``.

    ``u_0 = v / 2**steps``, then ``steps`` times ``u <- u + u(x + u)`` (i.e. ``phi <- phi o phi``).
    Returns a DDF ``(N, 3, D, H, W)``; with ``steps = 0`` it returns ``v`` itself.
    """
    _check(velocity, "velocity")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    u = velocity / (2 ** steps)
    if steps == 0:
        return u
    grid = identity_grid(u.shape[2:], u.dtype, u.device)  # built once, not per squaring
    for _ in range(steps):
        u = u + sample_at(u, grid + u, padding="border")
    return u


def invert_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """DDF of the inverse diffeomorphism ``exp(-v)``."""
    return integrate_velocity(-velocity, steps)


def compose(u_second: torch.Tensor, u_first: torch.Tensor) -> torch.Tensor:
    """DDF of ``phi_second o phi_first``: ``x -> x + u_first(x) + u_second(x + u_first(x))``.

    Pulling an image through the result equals pulling it through ``u_second`` and then pulling
    that result through ``u_first``: ``warp(warp(m, u_second), u_first) == warp(m, compose(...))``
    up to interpolation. Both fields must be on the same grid.
    """
    _check(u_second, "u_second")
    _check(u_first, "u_first")
    return u_first + warp(u_second, u_first, padding="border")


def resize_field(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a DDF/SVF to another grid ``shape`` over the same extent (first to last voxel
    centre, ``ALIGN_CORNERS``) and rescale its components to the new voxel size."""
    _check(u)
    shape = tuple(int(s) for s in shape)
    old = u.shape[2:]
    scale = torch.as_tensor([(n - 1) / (o - 1) if o > 1 else 1.0 for n, o in zip(shape, old)],
                            dtype=u.dtype, device=u.device)
    if tuple(old) == shape:
        return u
    if u.device.type == "cpu" and ALIGN_CORNERS:
        return _separable_resize(u, shape, scale)
    out = F.interpolate(u, size=shape, mode="trilinear", align_corners=ALIGN_CORNERS)
    return out * scale.view(1, 3, 1, 1, 1)


def _linear_weights(n_out: int, n_in: int, dtype: torch.dtype) -> torch.Tensor:
    """``(n_out, n_in)`` linear interpolation from ``n_in`` samples to ``n_out`` over the same
    extent (first to last sample, align-corners): each row holds two weights summing to 1."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    if n_in == 1:
        m[:, 0] = 1.0
        return m.to(dtype)
    pos = rows.to(torch.float64) * ((n_in - 1) / max(n_out - 1, 1))
    i0 = pos.floor().clamp(max=n_in - 2).long()
    t = pos - i0
    m[rows, i0] = 1.0 - t
    m[rows, i0 + 1] += t
    return m.to(dtype)


def _separable_resize(u: torch.Tensor, shape: Sequence[int], scale: torch.Tensor) -> torch.Tensor:
    """Trilinear resize (align-corners) as three small matrix products, one per axis, the
    component scale folded into the last: the same numbers as ``F.interpolate`` to float
    rounding, and on the CPU 2.7x faster forward and backward (the instance optimiser resizes
    its field at every step; benchmarks/cpu_kernels.py)."""
    n, c, d, h, w = u.shape
    D, H, W = shape
    md, mh, mw = (_linear_weights(a, b, u.dtype) for a, b in zip(shape, (d, h, w)))
    x = torch.matmul(u, mw.t())                                  # (n, c, d, h, W)
    x = torch.matmul(mh, x)                                      # (n, c, d, H, W)
    per_component = md.unsqueeze(0) * scale.view(c, 1, 1)        # (c, D, d)
    x = torch.matmul(per_component, x.reshape(n, c, d, H * W))   # (n, c, D, H*W)
    return x.reshape(n, c, D, H, W)


def affine_to_field(matrix_kji: np.ndarray, shape: Sequence[int], dtype=torch.float32,
                    device="cpu") -> torch.Tensor:
    """DDF of an affine map between voxel indices.

    Args:
        matrix_kji: 4x4 homogeneous map from output-grid index ``(k, j, i)`` to the continuous
            index it pulls from (e.g. :func:`geometry.affine_voxel_matrix`).
        shape: ``(D, H, W)`` of the output grid.
    Returns ``(1, 3, D, H, W)``: ``u(x) = A x + t - x``.
    """
    m = torch.as_tensor(np.asarray(matrix_kji), dtype=torch.float64, device=device)
    if m.shape != (4, 4):
        raise ValueError(f"matrix must be 4x4, got {tuple(m.shape)}")
    x = identity_grid(shape, torch.float64, device)
    y = torch.einsum("pc,ncdhw->npdhw", m[:3, :3], x) + m[:3, 3].view(1, 3, 1, 1, 1)
    return (y - x).to(dtype)


def invert_displacement(u: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Approximate inverse of a DDF by fixed-point iteration ``w <- -u(x + w)`` (valid for fields
    whose Jacobian stays positive; use :func:`invert_velocity` when the SVF is known)."""
    _check(u)
    w = -u
    for _ in range(iterations):
        w = -warp(u, w, padding="border")
    return w
