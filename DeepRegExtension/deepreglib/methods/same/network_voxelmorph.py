"""SAM-VoxelMorph (SAME's third step): diffeomorphic VoxelMorph whose U-Net also receives SAM
correlation features before its third encoder block. Conventions: :mod:`deepreglib.core.conventions`.

The frozen SAM network is a submodule, so one model file holds both (and SAME's affine and coarse
steps use the same embeddings). Correlation: 27 channels ``<e_f(x), e_m(x + d)>`` for
``d in {-2, 0, 2}^3`` voxels of the 1/4-resolution grid, which is the grid the third block of
VoxelMorph's U-Net reads (after two stride-2 blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...core.fields import integrate_velocity, resize_field
from ...core.warp import warp
from .network import SAMNet, correlation_features
from ..blocks.unet import ConvBlock, UNet3D


@dataclass
class SAMRegistrationOutput:
    """What :class:`SAMVoxelMorph` returns (always this structure).

    Attributes:
        displacement: ``(N, 3, D, H, W)`` voxel DDF on the fixed grid, ``(k, j, i)``;
            ``warped = moving(x + displacement(x))``.
        velocity: ``(N, 3, D/s, H/s, W/s)`` the SVF (``s = int_downsize``).
        warped: ``(N, 1, D, H, W)``.
        fixed_embedding, moving_embedding: ``(N, C, D/4, H/4, W/4)`` unit SAM embeddings
            (no gradient: SAM is frozen).
    """

    displacement: torch.Tensor
    velocity: torch.Tensor
    warped: torch.Tensor
    fixed_embedding: torch.Tensor
    moving_embedding: torch.Tensor


class _InjectedUNet3D(UNet3D):
    """:class:`UNet3D` whose encoder block ``level`` also takes ``extra`` input channels (its
    skip connections are unchanged)."""

    def __init__(self, in_channels: int, encoder: Sequence[int], decoder: Sequence[int], level: int,
                 extra_channels: int):
        super().__init__(in_channels, encoder, decoder)
        if not 1 <= level < len(encoder):
            raise ValueError(f"injection level must be in [1, {len(encoder)}), got {level}")
        self.level = level
        self.down[level] = ConvBlock(encoder[level - 1] + extra_channels, encoder[level], stride=2)

    def forward(self, x: torch.Tensor, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by {self.divisor}")
        history = [x]
        for i, layer in enumerate(self.down):
            x = layer(torch.cat([x, extra], dim=1) if i == self.level else x)
            history.append(x)
        history.pop()
        for layer in self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = layer(torch.cat([x, history.pop()], dim=1))
        for layer in self.extra:
            x = layer(x)
        return x


class SAMVoxelMorph(nn.Module):
    """``forward(moving, fixed)``, both ``(N, 1, D, H, W)``, sizes multiples of 16.

    Args:
        sam: :class:`SAMNet` constructor arguments (its weights are part of this model's state).
        encoder, decoder, int_steps, int_downsize: as :class:`~deepreglib.methods.voxelmorph.network.VoxelMorph`.
        offsets: per-axis correlation shifts (feature voxels); ``len(offsets)^3`` channels.
        inject_level: encoder block receiving the correlation (2 = the third, at 1/4 resolution).
    """

    def __init__(self, sam: Optional[dict] = None, encoder: Sequence[int] = (16, 32, 32, 32),
                 decoder: Sequence[int] = (32, 32, 32, 32, 32, 16, 16), int_steps: int = 7,
                 int_downsize: int = 2, offsets: Sequence[int] = (-2, 0, 2), inject_level: int = 2):
        super().__init__()
        self.sam = SAMNet(**(sam or {}))
        self.config = dict(sam=dict(self.sam.config), encoder=list(encoder), decoder=list(decoder),
                           int_steps=int(int_steps), int_downsize=int(int_downsize),
                           offsets=[int(o) for o in offsets], inject_level=int(inject_level))
        self.freeze_sam()
        self.offsets = tuple(int(o) for o in offsets)
        self.unet = _InjectedUNet3D(2, encoder, decoder, inject_level, len(self.offsets) ** 3)
        self.flow = nn.Conv3d(self.unet.out_channels, 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-5)  # an untrained network is the identity
        nn.init.zeros_(self.flow.bias)
        self.int_steps = int(int_steps)
        self.int_downsize = int(int_downsize)
        self.feature_stride = 2 ** int(inject_level)

    def freeze_sam(self) -> None:
        for p in self.sam.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.sam.eval()  # frozen feature extractor
        return self

    @property
    def divisor(self) -> int:
        return max(self.unet.divisor, self.sam.divisor)

    def embeddings(self, moving: torch.Tensor, fixed: torch.Tensor):
        """Unit SAM embeddings of both images on the injection grid, without gradient."""
        shape = [s // self.feature_stride for s in fixed.shape[2:]]
        with torch.no_grad():
            return self.sam.embed(fixed, shape), self.sam.embed(moving, shape)

    def predict_velocity(self, moving: torch.Tensor, fixed: torch.Tensor,
                         fixed_embedding: Optional[torch.Tensor] = None,
                         moving_embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SVF at ``1/int_downsize`` resolution (voxels of that grid)."""
        if moving.shape != fixed.shape or moving.ndim != 5 or moving.shape[1] != 1:
            raise ValueError(f"moving and fixed must both be (N, 1, D, H, W), got "
                             f"{tuple(moving.shape)} and {tuple(fixed.shape)}")
        if fixed_embedding is None or moving_embedding is None:
            fixed_embedding, moving_embedding = self.embeddings(moving, fixed)
        corr = correlation_features(fixed_embedding, moving_embedding, self.offsets)
        v = self.flow(self.unet(torch.cat([moving, fixed], dim=1), corr))
        if self.int_downsize > 1:
            v = resize_field(v, [s // self.int_downsize for s in v.shape[2:]])
        return v

    def velocity_to_displacement(self, velocity: torch.Tensor, shape) -> torch.Tensor:
        return resize_field(integrate_velocity(velocity, self.int_steps), shape)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> SAMRegistrationOutput:
        e_f, e_m = self.embeddings(moving, fixed)
        v = self.predict_velocity(moving, fixed, e_f, e_m)
        u = self.velocity_to_displacement(v, moving.shape[2:])
        return SAMRegistrationOutput(displacement=u, velocity=v, warped=warp(moving, u),
                                     fixed_embedding=e_f, moving_embedding=e_m)


class SAMSimilarityLoss(nn.Module):
    """SAME's SAM similarity loss: ``1 - mean_x <e_f(x), e_m(x + u(x))>``.

    The moving embedding is warped by the displacement resized to the embedding grid and
    renormalised. Sign: the inner product is *maximised*, so the loss (to minimise) is one minus
    it; range ``[0, 2]``, 0 when the warped moving embedding equals the fixed one everywhere.

    Shapes: embeddings ``(N, C, d, h, w)`` (unit along C); ``displacement`` ``(N, 3, D, H, W)``
    voxels of the image grid.
    """

    def forward(self, fixed_embedding: torch.Tensor, moving_embedding: torch.Tensor,
                displacement: torch.Tensor) -> torch.Tensor:
        if fixed_embedding.shape != moving_embedding.shape or fixed_embedding.ndim != 5:
            raise ValueError(f"embeddings must share an (N, C, d, h, w) shape, got "
                             f"{tuple(fixed_embedding.shape)} and {tuple(moving_embedding.shape)}")
        if displacement.ndim != 5 or displacement.shape[1] != 3:
            raise ValueError(f"displacement must be (N, 3, D, H, W), got {tuple(displacement.shape)}")
        u = resize_field(displacement, fixed_embedding.shape[2:])
        warped = F.normalize(warp(moving_embedding, u, padding="border"), dim=1)
        return 1.0 - (fixed_embedding * warped).sum(dim=1).mean()
