"""SAM: self-supervised anatomical embedding (Yan et al., "SAM: Self-supervised learning of pixel-wise
anatomical embeddings in radiological images", TMI 2022), as used by SAME.

For every voxel the network gives a *global* embedding (coarse, 1/8 resolution: which organ /
region) and a *local* embedding (fine, 1/2 resolution: where exactly within it), each
L2-normalised. :func:`concat_embedding` resamples both to one grid and concatenates them divided by
``sqrt(2)``, so the result is a unit vector and the similarity of two voxels is

    ``sim = <e_1, e_2> = (<g_1, g_2> + <l_1, l_2>) / 2``  in ``[-1, 1]`` (1: same anatomy).

Resampling between the input grid and a feature grid of another size uses ``ALIGN_CORNERS``
(:mod:`deepreglib.core.conventions`): input voxel ``x`` sits at feature voxel ``x (s - 1) / (n - 1)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...core.conventions import ALIGN_CORNERS
from ...core.warp import sample_at
from ..blocks.unet import ConvBlock


@dataclass
class SAMOutput:
    """What :class:`SAMNet` returns (always this structure).

    Attributes:
        global_embedding: ``(N, Cg, D/8, H/8, W/8)`` unit vectors along C.
        local_embedding: ``(N, Cl, D/2, H/2, W/2)`` unit vectors along C.
    """

    global_embedding: torch.Tensor
    local_embedding: torch.Tensor


class SAMNet(nn.Module):
    """Embedding network: a 4-level strided encoder; the global head is an FPN merge of levels
    1/16 and 1/8, the local head a U-Net decoder back to 1/2 with skips.

    Args:
        encoder: channels of the full-resolution stem and the 4 stride-2 levels (5 numbers).
        global_channels, local_channels: embedding sizes.
    Input ``(N, 1, D, H, W)``, D, H, W multiples of 16, intensities in [0, 1].
    """

    def __init__(self, encoder: Sequence[int] = (16, 32, 64, 64, 64), global_channels: int = 64,
                 local_channels: int = 32):
        super().__init__()
        enc = [int(c) for c in encoder]
        if len(enc) != 5:
            raise ValueError(f"encoder needs 5 channel counts (stem + 4 levels), got {enc}")
        self.config = dict(encoder=enc, global_channels=int(global_channels),
                           local_channels=int(local_channels))
        self.stem = ConvBlock(1, enc[0])
        self.down = nn.ModuleList(ConvBlock(enc[i], enc[i + 1], stride=2) for i in range(4))
        self.lateral8 = nn.Conv3d(enc[3], enc[4], 1)
        self.global_head = nn.Sequential(ConvBlock(enc[4], enc[4]), nn.Conv3d(enc[4], global_channels, 1))
        self.up4 = ConvBlock(enc[4] + enc[2], enc[2])
        self.up2 = ConvBlock(enc[2] + enc[1], enc[1])
        self.local_head = nn.Sequential(ConvBlock(enc[1], enc[1]), nn.Conv3d(enc[1], local_channels, 1))

    divisor = 16

    @property
    def channels(self) -> int:
        """Channels of :func:`concat_embedding`'s output."""
        return self.config["global_channels"] + self.config["local_channels"]

    def forward(self, image: torch.Tensor) -> SAMOutput:
        if image.ndim != 5 or image.shape[1] != 1:
            raise ValueError(f"expected (N, 1, D, H, W), got {tuple(image.shape)}")
        if any(s % self.divisor for s in image.shape[2:]):
            raise ValueError(f"spatial size {tuple(image.shape[2:])} must be divisible by {self.divisor}")
        x = self.stem(image)
        levels = []
        for layer in self.down:
            x = layer(x)
            levels.append(x)  # 1/2, 1/4, 1/8, 1/16
        up = F.interpolate(levels[3], size=levels[2].shape[2:], mode="trilinear", align_corners=ALIGN_CORNERS)
        p8 = up + self.lateral8(levels[2])  # FPN merge at 1/8
        g = self.global_head(p8)
        y = F.interpolate(p8, size=levels[1].shape[2:], mode="trilinear", align_corners=ALIGN_CORNERS)
        y = self.up4(torch.cat([y, levels[1]], dim=1))
        y = F.interpolate(y, size=levels[0].shape[2:], mode="trilinear", align_corners=ALIGN_CORNERS)
        y = self.up2(torch.cat([y, levels[0]], dim=1))
        loc = self.local_head(y)
        return SAMOutput(F.normalize(g, dim=1), F.normalize(loc, dim=1))

    def embed(self, image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Concatenated unit embedding on a grid of ``shape`` (e.g. the input's size / 4)."""
        return concat_embedding(self(image), shape)


def concat_embedding(out: SAMOutput, shape: Sequence[int]) -> torch.Tensor:
    """Resample both embeddings to ``shape`` (trilinear, ``ALIGN_CORNERS``), renormalise each and
    concatenate divided by ``sqrt(2)``: ``(N, Cg + Cl, *shape)`` unit vectors."""
    shape = tuple(int(s) for s in shape)
    parts = []
    for e in (out.global_embedding, out.local_embedding):
        if tuple(e.shape[2:]) != shape:
            e = F.interpolate(e, size=shape, mode="trilinear", align_corners=ALIGN_CORNERS)
        parts.append(F.normalize(e, dim=1))
    return torch.cat(parts, dim=1) / math.sqrt(2.0)


def to_feature_coords(points: torch.Tensor, full_shape: Sequence[int], feature_shape: Sequence[int]) -> torch.Tensor:
    """``(P, 3)`` voxel ``(k, j, i)`` of the input grid -> the same points on a feature grid."""
    scale = torch.as_tensor([(s - 1) / max(n - 1, 1) for s, n in zip(feature_shape, full_shape)],
                            dtype=points.dtype, device=points.device)
    return points * scale


def to_input_coords(points: torch.Tensor, full_shape: Sequence[int], feature_shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_feature_coords`."""
    scale = torch.as_tensor([max(n - 1, 1) / max(s - 1, 1) for s, n in zip(feature_shape, full_shape)],
                            dtype=points.dtype, device=points.device)
    return points * scale


def embedding_at(embedding: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Unit embedding vectors ``(P, C)`` of ``(1, C, d, h, w)`` at ``(P, 3)`` feature-grid voxel
    coordinates ``(k, j, i)`` (trilinear, renormalised; border values outside)."""
    if embedding.ndim != 5 or embedding.shape[0] != 1:
        raise ValueError(f"embedding must be (1, C, d, h, w), got {tuple(embedding.shape)}")
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (P, 3), got {tuple(points.shape)}")
    pts = points.to(embedding.dtype).t().reshape(1, 3, -1, 1, 1)
    v = sample_at(embedding, pts, "linear", "border")[0, :, :, 0, 0].t()
    return F.normalize(v, dim=1)


def correlation_features(fixed_emb: torch.Tensor, moving_emb: torch.Tensor,
                         offsets: Sequence[int] = (-2, 0, 2)) -> torch.Tensor:
    """SAME's correlation channels: ``corr_d(x) = <e_f(x), e_m(x + d)>`` for every
    ``d in offsets^3`` (feature-grid voxels, ``(k, j, i)``, k slowest), 0 where ``x + d`` is
    outside. Inputs ``(N, C, d, h, w)``; returns ``(N, len(offsets)^3, d, h, w)`` in [-1, 1]
    for unit embeddings."""
    if fixed_emb.shape != moving_emb.shape or fixed_emb.ndim != 5:
        raise ValueError(f"embeddings must have the same (N, C, d, h, w) shape, got "
                         f"{tuple(fixed_emb.shape)} and {tuple(moving_emb.shape)}")
    r = max(abs(int(o)) for o in offsets)
    padded = F.pad(moving_emb, (r,) * 6)
    d, h, w = fixed_emb.shape[2:]
    out = []
    for a in offsets:
        for b in offsets:
            for c in offsets:
                shifted = padded[:, :, r + a:r + a + d, r + b:r + b + h, r + c:r + c + w]
                out.append((fixed_emb * shifted).sum(dim=1))
    return torch.stack(out, dim=1)


class PixelInfoNCE(nn.Module):
    """Pixel-level InfoNCE between two views with known voxel correspondences (SAM's loss).

    For anchor ``i`` with embedding ``a_i`` (view A) and positive ``p_i`` (the corresponding voxel
    of view B), the negatives are view-B voxels farther than ``min_distance`` feature voxels from
    the positive, drawn from a random pool of ``pool_size`` voxels: the ``num_hard`` most similar
    (hard) and ``num_diverse`` random others (diverse). Loss per anchor
    ``-log( exp(a.p/tau) / (exp(a.p/tau) + sum_n exp(a.n/tau)) )``, averaged. Minimise; ``>= 0``,
    near 0 when every positive beats every negative by a wide margin, ``log(1 + K)`` for
    embeddings that carry no information (K negatives).
    """

    def __init__(self, temperature: float = 0.5, num_hard: int = 64, num_diverse: int = 64,
                 pool_size: int = 2048, min_distance: float = 2.0):
        super().__init__()
        if temperature <= 0 or num_hard < 0 or num_diverse < 0 or num_hard + num_diverse < 1:
            raise ValueError("need temperature > 0 and at least one negative")
        self.temperature = float(temperature)
        self.num_hard, self.num_diverse = int(num_hard), int(num_diverse)
        self.pool_size, self.min_distance = int(pool_size), float(min_distance)

    def forward(self, emb_a: torch.Tensor, emb_b: torch.Tensor, points_a: torch.Tensor,
                points_b: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``emb_a``, ``emb_b``: ``(1, C, d, h, w)`` unit embeddings of the two views (same
        feature grid); ``points_a``, ``points_b``: ``(P, 3)`` corresponding feature-grid voxel
        coordinates ``(k, j, i)``. Returns a scalar."""
        if points_a.shape != points_b.shape or points_a.ndim != 2 or points_a.shape[1] != 3:
            raise ValueError(f"points must be two (P, 3) tensors, got {tuple(points_a.shape)} and "
                             f"{tuple(points_b.shape)}")
        if emb_a.shape != emb_b.shape:
            raise ValueError(f"embeddings differ in shape: {tuple(emb_a.shape)} vs {tuple(emb_b.shape)}")
        anchors = embedding_at(emb_a, points_a)
        positives = embedding_at(emb_b, points_b)
        flat = emb_b[0].flatten(1)  # (C, M)
        shape = emb_b.shape[2:]
        m = flat.shape[1]
        k = min(self.pool_size, m)
        pool_idx = torch.randperm(m, generator=generator)[:k].to(flat.device)
        pool = flat[:, pool_idx]  # (C, k)
        h, w = int(shape[1]), int(shape[2])
        coords = torch.stack([pool_idx // (h * w), (pool_idx // w) % h, pool_idx % w], dim=1).to(points_b.dtype)
        near = torch.cdist(points_b, coords) < self.min_distance  # (P, k)
        sims = (anchors @ pool).masked_fill(near, float("-inf"))
        negs = []
        if self.num_hard:
            negs.append(sims.topk(min(self.num_hard, k), dim=1).values)
        if self.num_diverse:
            pick = torch.randint(0, k, (sims.shape[0], self.num_diverse), generator=generator).to(flat.device)
            negs.append(sims.gather(1, pick))
        pos = (anchors * positives).sum(dim=1, keepdim=True)
        logits = torch.cat([pos] + negs, dim=1) / self.temperature
        return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
