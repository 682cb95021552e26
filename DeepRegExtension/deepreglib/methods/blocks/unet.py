"""A 3D U-Net backbone in the VoxelMorph layout (Balakrishnan et al. 2019).

Shapes: input ``(N, C_in, D, H, W)`` with D, H, W divisible by ``2 ** len(encoder)``; output
``(N, decoder[-1], D, H, W)``. The constructor arguments are the whole configuration.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Module):
    """3x3x3 convolution, stride 1 or 2, then LeakyReLU(0.2) as in VoxelMorph."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class UNet3D(nn.Module):
    """Encoder of strided convs, decoder with nearest upsampling and skip concatenation, then
    extra full-resolution convs (``decoder`` entries beyond ``len(encoder)``)."""

    def __init__(self, in_channels: int = 2, encoder: Sequence[int] = (16, 32, 32, 32),
                 decoder: Sequence[int] = (32, 32, 32, 32, 32, 16, 16)):
        super().__init__()
        if len(decoder) < len(encoder):
            raise ValueError("decoder needs at least as many levels as the encoder")
        self.in_channels = in_channels
        self.encoder_channels = list(encoder)
        self.decoder_channels = list(decoder)
        self.down = nn.ModuleList()
        prev = in_channels
        skips: List[int] = [in_channels]
        for ch in encoder:
            self.down.append(ConvBlock(prev, ch, stride=2))
            prev = ch
            skips.append(ch)
        skips.pop()  # the bottleneck is not a skip
        self.up = nn.ModuleList()
        for ch in decoder[:len(encoder)]:
            self.up.append(ConvBlock(prev + skips.pop(), ch))
            prev = ch
        self.extra = nn.ModuleList()
        for ch in decoder[len(encoder):]:
            self.extra.append(ConvBlock(prev, ch))
            prev = ch
        self.out_channels = prev

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** len(self.encoder_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (N, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by {self.divisor}")
        history = [x]
        for layer in self.down:
            x = layer(x)
            history.append(x)
        history.pop()
        for layer in self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = layer(torch.cat([x, history.pop()], dim=1))
        for layer in self.extra:
            x = layer(x)
        return x
