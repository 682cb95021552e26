"""Random draws shared by the training recipes, as pure functions of the batch (exact resume)."""
from __future__ import annotations

import zlib
from typing import Dict, Optional

import numpy as np
import torch

from ..core.warp import identity_grid, sample_at


def batch_generator(batch: Dict[str, torch.Tensor], seed: int, step: Optional[int] = None) -> torch.Generator:
    """A CPU generator that is a pure function of ``seed``, the batch's fixed image and, when
    given, the training ``step``.

    Pass the step in training: the data sources repeat images (a bank of synthetic pairs, a few
    whole real scans, times 8 flips), and a generator of the image alone would give each repeated
    image the same random pose every time it comes back, which a network can memorise (D-Net did:
    near-zero rotation loss on 4 real scans, no generalisation)."""
    data = batch["fixed"].detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    key = int(seed) * 1_000_003 + zlib.crc32(data)
    if step is not None:
        key = key * 2_147_483_629 + int(step) + 1
    return torch.Generator().manual_seed(key % (2 ** 63))


def uniform_draw(g: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=g, dtype=torch.float64))


def sample_through(volume: torch.Tensor, matrix_kji: np.ndarray) -> torch.Tensor:
    """``out(x) = volume(M x)`` for a 4x4 map of voxel indices ``(k, j, i)`` (zeros outside)."""
    m = torch.as_tensor(matrix_kji, dtype=torch.float64)
    x = identity_grid(volume.shape[2:], torch.float64)
    pts = torch.einsum("pc,ncdhw->npdhw", m[:3, :3], x) + m[:3, 3].view(1, 3, 1, 1, 1)
    return sample_at(volume, pts.to(volume.dtype), "linear", "zeros")
