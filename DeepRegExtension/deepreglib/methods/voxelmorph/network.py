"""VoxelMorph, diffeomorphic variant (Dalca et al. 2019): U-Net -> stationary velocity field ->
scaling and squaring. Conventions: :mod:`deepreglib.core.conventions`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ...core.fields import integrate_velocity, resize_field
from ...core.warp import warp
from ..blocks.unet import UNet3D


@dataclass
class RegistrationOutput:
    """What a deformable network returns (always this structure).

    Attributes:
        displacement: ``(N, 3, D, H, W)`` DDF on the fixed grid, voxels, ``(k, j, i)``;
            ``warped = moving(x + displacement(x))``.
        velocity: ``(N, 3, D/s, H/s, W/s)`` the SVF (``s`` = ``int_downsize``), voxels of its grid.
        warped: ``(N, 1, D, H, W)`` the moving image pulled through ``displacement``.
    """

    displacement: torch.Tensor
    velocity: torch.Tensor
    warped: torch.Tensor


class VoxelMorph(nn.Module):
    """Diffeomorphic VoxelMorph. ``forward(moving, fixed)``, both ``(N, 1, D, H, W)``.

    Args:
        encoder, decoder: U-Net channels (VoxelMorph's defaults).
        int_steps: scaling-and-squaring steps (0 gives a plain, non-diffeomorphic DDF network).
        int_downsize: the velocity is integrated at ``1/int_downsize`` resolution, then upsampled.
    """

    def __init__(self, encoder: Sequence[int] = (16, 32, 32, 32),
                 decoder: Sequence[int] = (32, 32, 32, 32, 32, 16, 16), int_steps: int = 7,
                 int_downsize: int = 2):
        super().__init__()
        self.config = dict(encoder=list(encoder), decoder=list(decoder), int_steps=int_steps,
                           int_downsize=int_downsize)
        self.unet = UNet3D(2, encoder, decoder)
        self.flow = nn.Conv3d(self.unet.out_channels, 3, 3, padding=1)
        # Start near zero so an untrained network is the identity.
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)
        self.int_steps = int_steps
        self.int_downsize = int_downsize

    @property
    def divisor(self) -> int:
        return self.unet.divisor

    def predict_velocity(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """SVF at ``1/int_downsize`` resolution, ``(N, 3, ...)`` voxels of that grid."""
        if moving.shape != fixed.shape or moving.ndim != 5 or moving.shape[1] != 1:
            raise ValueError(f"moving and fixed must both be (N, 1, D, H, W), got "
                             f"{tuple(moving.shape)} and {tuple(fixed.shape)}")
        v = self.flow(self.unet(torch.cat([moving, fixed], dim=1)))
        if self.int_downsize > 1:
            small = [s // self.int_downsize for s in v.shape[2:]]
            v = resize_field(v, small)
        return v

    def velocity_to_displacement(self, velocity: torch.Tensor, shape) -> torch.Tensor:
        """Integrate the SVF on its grid, then upsample the DDF to ``shape``."""
        u = integrate_velocity(velocity, self.int_steps)
        return resize_field(u, shape)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        v = self.predict_velocity(moving, fixed)
        u = self.velocity_to_displacement(v, moving.shape[2:])
        return RegistrationOutput(displacement=u, velocity=v, warped=warp(moving, u))
