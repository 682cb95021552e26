"""Random draws shared by the training recipes, as pure functions of the batch (exact resume)."""
from __future__ import annotations

import zlib
from typing import Dict

import numpy as np
import torch

from ..warp import identity_grid, sample_at


def batch_generator(batch: Dict[str, torch.Tensor], seed: int) -> torch.Generator:
    """A CPU generator that is a pure function of ``seed`` and the batch's fixed image."""
    data = batch["fixed"].detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(data)) % (2 ** 63))


def uniform_draw(g: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=g, dtype=torch.float64))


def sample_through(volume: torch.Tensor, matrix_kji: np.ndarray) -> torch.Tensor:
    """``out(x) = volume(M x)`` for a 4x4 map of voxel indices ``(k, j, i)`` (zeros outside)."""
    m = torch.as_tensor(matrix_kji, dtype=torch.float64)
    x = identity_grid(volume.shape[2:], torch.float64)
    pts = torch.einsum("pc,ncdhw->npdhw", m[:3, :3], x) + m[:3, 3].view(1, 3, 1, 1, 1)
    return sample_at(volume, pts.to(volume.dtype), "linear", "zeros")
