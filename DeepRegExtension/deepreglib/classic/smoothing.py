"""The 3x3x3 mean that smooths the instance optimisers' fields (the pyramid, the fine level and
the discrete step's coupling): a cheap B-spline-like parameterisation, as ConvexAdam's."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def box_mean3(u: torch.Tensor) -> torch.Tensor:
    """3x3x3 mean, edges replicated; separable (three sums of three shifted views: 9 additions
    a voxel instead of ``avg_pool3d``'s 27, and elementwise, so it uses every thread; 3x faster
    forward and backward on 2 cores). Its backward is its adjoint written out the same way
    (:class:`_BoxMean3`): autograd through the replicate padding scatters, 5x the forward."""
    return _BoxMean3.apply(u) if u.requires_grad else _box_mean3(u)


def _box_mean3(u: torch.Tensor) -> torch.Tensor:
    u = F.pad(u, (1, 1, 1, 1, 1, 1), mode="replicate")
    u = u[:, :, :-2] + u[:, :, 1:-1] + u[:, :, 2:]
    u = u[:, :, :, :-2] + u[:, :, :, 1:-1] + u[:, :, :, 2:]
    u = u[..., :-2] + u[..., 1:-1] + u[..., 2:]
    return u / 27.0


def _box_sum3_adjoint(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Adjoint of ``y[i] = x[max(i-1, 0)] + x[i] + x[min(i+1, n-1)]`` along ``dim``: the
    zero-padded 3-sum of ``g``, plus ``g``'s first and last slices again at the edges (what
    the replicated edge voxels took from them)."""
    n = g.shape[dim]
    pad = [0] * 6
    pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = 1  # F.pad lists the last axis first
    z = F.pad(g, pad)
    out = z.narrow(dim, 0, n) + z.narrow(dim, 1, n) + z.narrow(dim, 2, n)
    out.narrow(dim, 0, 1).add_(g.narrow(dim, 0, 1))
    out.narrow(dim, n - 1, 1).add_(g.narrow(dim, n - 1, 1))
    return out


class _BoxMean3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u):
        return _box_mean3(u)

    @staticmethod
    def backward(ctx, grad):
        g = grad
        for dim in (4, 3, 2):  # the forward's axes in reverse
            g = _box_sum3_adjoint(g, dim)
        return g / 27.0


def smoothed(p: torch.Tensor, passes: int) -> torch.Tensor:
    """The field of parameters ``p``: ``passes`` 3x3x3 means of it."""
    for _ in range(passes):
        p = box_mean3(p)
    return p
