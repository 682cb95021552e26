"""From any input (size, spacing, orientation) to what a network sees: intensities in [0, 1]
and the network grid.

Conventions: :mod:`deepreglib.core.conventions`. The network works on an isotropic grid that covers
the fixed image with the fixed image's direction and centre (:func:`network_grid`). Both images
are resampled onto it in physical space (the moving one through the initial transform), the
network predicts a voxel DDF there, and :func:`deepreglib.core.resample.field_to_fixed_grid` brings that field back to the
fixed image's own grid as a physical (mm) field, from which every output is made.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch

from .geometry import Grid


def _percentiles(values: torch.Tensor, low: float, high: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two percentiles (linear interpolation, as ``torch.quantile``). On the CPU by numpy's
    selection (``np.quantile`` partitions, where ``torch.quantile`` sorts: 0.04 s against 0.72 s
    for both of a 1.3 M-voxel brain on 2 cores); on a GPU by ``torch.quantile``."""
    if values.device.type != "cpu":
        return torch.quantile(values, low / 100.0), torch.quantile(values, high / 100.0)
    q = np.quantile(values.detach().numpy(), [low / 100.0, high / 100.0])
    return (torch.tensor(float(q[0]), dtype=values.dtype), torch.tensor(float(q[1]), dtype=values.dtype))


def normalize_intensity(image: torch.Tensor, low: float = 0.5, high: float = 99.5,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scale ``(N, 1, D, H, W)`` intensities to [0, 1] by the ``low``/``high`` percentiles (robust
    to outliers such as CT metal or MR flow artefacts), clipping outside."""
    x = image.float()
    values = x[mask.bool().expand_as(x)] if mask is not None else x.reshape(-1)
    if values.numel() > 2_000_000:  # percentiles of a subsample: same answer, far less memory
        step = values.numel() // 2_000_000 + 1
        values = values[::step]
    lo, hi = _percentiles(values, low, high)
    if float(hi - lo) <= 1e-12:
        lo, hi = values.min(), values.max()
    if float(hi - lo) <= 1e-12:
        return torch.zeros_like(x)
    return ((x - lo) / (hi - lo)).clamp(0, 1)


def network_grid(fixed: Grid, max_size: int = 112, divisor: int = 16,
                 min_spacing: Optional[float] = None) -> Grid:
    """The isotropic grid a network runs on for this fixed image.

    Spacing ``s = max(longest physical side / max_size, finest input spacing)`` (never finer
    than the data, never more than ``max_size`` voxels a side); each size is rounded up to a
    multiple of ``divisor`` (the U-Net's), centred on the fixed image, with its direction. E.g. a
    160x192x224 mm brain at 1 mm gets 2 mm voxels and shape (112, 96, 80); a 64x64x60 prostate
    MR at 0.4 mm keeps 0.4 mm and gets (64, 64, 64).
    """
    extent = fixed.extent_mm  # (x, y, z)
    s = max(float(extent.max()) / max_size, min(fixed.spacing))
    if min_spacing is not None:
        s = max(s, min_spacing)
    sizes_xyz = [max(divisor, int(math.ceil(e / s / divisor - 1e-6)) * divisor) for e in extent]
    return fixed.centered_like(tuple(reversed(sizes_xyz)), (s, s, s))
