"""Losses on label probabilities: the Laplacian contour loss and cross-entropy against soft
predictions (used by the ``amdf`` networks). Conventions: :mod:`deepreglib.core.conventions`.

Inputs are ``(N, C, D, H, W)`` class probabilities (or one-hot maps). Every loss is an
``nn.Module`` to minimise; ``reduction`` as in :mod:`deepreglib.core.losses`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import _check_image, _check_pair, _check_reduction, _mean_per_item, _reduce


def laplacian_edges(x: torch.Tensor) -> torch.Tensor:
    """Discrete 3D Laplacian of every channel of ``x`` ``(N, C, D, H, W)``: the sum of the 6
    face neighbours minus 6 times the voxel, with edge replication (so a constant map gives 0
    everywhere, borders included). Non-zero only next to a change: an edge map of the labels.
    Same shape as ``x``; for maps in [0, 1] the values lie in ``[-6, 6]``."""
    _check_image(x, "x")
    p = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
    c = p[:, :, 1:-1, 1:-1, 1:-1]
    return (p[:, :, :-2, 1:-1, 1:-1] + p[:, :, 2:, 1:-1, 1:-1] + p[:, :, 1:-1, :-2, 1:-1]
            + p[:, :, 1:-1, 2:, 1:-1] + p[:, :, 1:-1, 1:-1, :-2] + p[:, :, 1:-1, 1:-1, 2:] - 6.0 * c)


class LaplacianContourLoss(nn.Module):
    """Contour loss: mean squared difference of the Laplacian edge maps (:func:`laplacian_edges`)
    of the prediction and the truth, over channels and voxels.

    ``forward(pred, target)``: probabilities and one-hot maps ``(N, C, D, H, W)``. Minimise; 0 when
    the two have the same edges (e.g. identical maps), range ``[0, 144]`` for maps in [0, 1].
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target, ("pred", "target"))
        diff = laplacian_edges(pred) - laplacian_edges(target.to(pred.dtype))
        return _reduce(_mean_per_item(diff * diff), self.reduction)


class SoftCrossEntropy(nn.Module):
    """Cross-entropy ``-sum_c target_c log(pred_c)`` with ``pred`` already probabilities
    (e.g. one-hot labels warped with trilinear interpolation), mean over voxels.

    ``forward(pred, target)``: ``(N, C, D, H, W)``, both non-negative and summing to 1 over C.
    ``eps`` floors ``pred`` so a zero probability costs ``-log(eps)`` instead of infinity.
    Minimise; 0 when ``pred == target`` is one-hot, range ``[0, -log(eps)]``.
    """

    def __init__(self, eps: float = 1e-6, reduction: str = "mean"):
        super().__init__()
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.eps = float(eps)
        self.reduction = _check_reduction(reduction)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target, ("pred", "target"))
        ce = -(target.to(pred.dtype) * torch.log(pred.clamp_min(self.eps))).sum(1)
        return _reduce(_mean_per_item(ce), self.reduction)
