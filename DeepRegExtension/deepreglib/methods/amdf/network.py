"""Deformable registration with attention-guided fusion of multi-scale deformation fields (AMDF).

Conventions: :mod:`deepreglib.core.conventions`. Images ``(N, 1, D, H, W)``; a field at scale ``k``
lives on the grid of ``1 / 2**k`` resolution, ``(N, 3, D/2**k, ...)`` in voxels of that grid,
components ``(k, j, i)``; ``warped = moving(x + u(x))``.

Three networks, trained in this order:

* :class:`RoiSegmentationUNet` (about 2M parameters) predicts a region-of-interest mask per
  image; each input is multiplied by its mask before registration.
* :class:`LabelAutoEncoder`, a denoising auto-encoder of label maps, whose encoder is the
  anatomical term of the registration loss (training only).
* :class:`AMDF`: the segmentation net (frozen) and :class:`MultiScaleRegistrationUNet`, whose
  decoder predicts a field ``DF_k`` at 4 scales, fused coarse to fine by :class:`DFSA`:
  ``DF_k^a = DFSA(DF_{k+1}^a) + DF_k``, ``DF_3^a = DF_3``; the displacement is ``DF_0^a``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core.fields import resize_field
from ...core.warp import warp
from ..blocks.unet import ConvBlock


def _check_image(x: torch.Tensor, channels: int, divisor: int, name: str) -> None:
    if x.ndim != 5 or x.shape[1] != channels:
        raise ValueError(f"{name} must be (N, {channels}, D, H, W), got {tuple(x.shape)}")
    if any(s % divisor for s in x.shape[2:]):
        raise ValueError(f"{name}: spatial size {tuple(x.shape[2:])} must be divisible by {divisor}")


def _up(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(shape), mode="nearest")


# -- segmentation --------------------------------------------------------------------------------
class _DoubleConv(nn.Sequential):
    """Two 3x3x3 conv + instance norm + LeakyReLU(0.2). Instance norm (not batch norm): batches
    are single pairs, and it behaves the same in training and inference."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True),
                         nn.LeakyReLU(0.2), nn.Conv3d(cout, cout, 3, padding=1),
                         nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.2))


class RoiSegmentationUNet(nn.Module):
    """U-Net predicting region-of-interest logits. ``forward(image)``: ``(N, 1, D, H, W)`` in
    [0, 1] -> ``(N, num_classes, D, H, W)`` logits (class 1 = the ROI when ``num_classes = 2``).

    Args:
        channels: per level; ``len(channels) - 1`` max-pool downsamplings. The default
            ``(18, 36, 72, 144)`` has about 1.85M parameters.
    """

    def __init__(self, channels: Sequence[int] = (18, 36, 72, 144), num_classes: int = 2):
        super().__init__()
        if len(channels) < 2 or num_classes < 2:
            raise ValueError(f"need >= 2 levels and >= 2 classes, got {channels}, {num_classes}")
        self.config = dict(channels=list(channels), num_classes=num_classes)
        self.down = nn.ModuleList()
        prev = 1
        for ch in channels:
            self.down.append(_DoubleConv(prev, ch))
            prev = ch
        self.up = nn.ModuleList()
        for ch in reversed(channels[:-1]):
            self.up.append(_DoubleConv(prev + ch, ch))
            prev = ch
        self.head = nn.Conv3d(prev, num_classes, 1)
        self.num_classes = num_classes

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.down) - 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        _check_image(image, 1, self.divisor, "image")
        skips = []
        x = image
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = block(torch.cat([_up(x, skip.shape[2:]), skip], dim=1))
        return self.head(x)

    def roi_mask(self, image: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """Binary ROI mask ``(N, 1, D, H, W)`` of 0/1: ``p(ROI) > threshold`` (class 1 for two
        classes; any non-background class otherwise)."""
        p = torch.softmax(self(image), dim=1)
        return (1.0 - p[:, :1] > threshold).to(image.dtype)


# -- label auto-encoder ----------------------------------------------------------------------------
class LabelAutoEncoder(nn.Module):
    """Denoising auto-encoder of label maps (the anatomical prior of the registration loss).

    ``encode(p)``: probabilities / one-hot ``(N, num_classes, D, H, W)`` -> latent
    ``(N, latent_channels, D/s, H/s, W/s)`` with ``s = 2 ** len(channels)``.
    ``forward(p)``: label logits ``(N, num_classes, D, H, W)``. No skip connections, so the
    latent alone must describe the anatomy.
    """

    def __init__(self, num_classes: int = 16, channels: Sequence[int] = (16, 32, 64),
                 latent_channels: int = 16):
        super().__init__()
        if num_classes < 2 or not channels:
            raise ValueError(f"need >= 2 classes and >= 1 level, got {num_classes}, {channels}")
        self.config = dict(num_classes=num_classes, channels=list(channels),
                           latent_channels=latent_channels)
        layers: List[nn.Module] = []
        prev = num_classes
        for ch in channels:
            layers.append(ConvBlock(prev, ch, stride=2))
            prev = ch
        layers.append(nn.Conv3d(prev, latent_channels, 1))
        self.encoder = nn.Sequential(*layers)
        self.decoder = nn.ModuleList()
        prev = latent_channels
        for ch in reversed(channels):
            self.decoder.append(ConvBlock(prev, ch))
            prev = ch
        self.head = nn.Conv3d(prev, num_classes, 3, padding=1)
        self.num_classes = num_classes

    @property
    def divisor(self) -> int:
        return 2 ** len(self.config["channels"])

    def encode(self, probabilities: torch.Tensor) -> torch.Tensor:
        _check_image(probabilities, self.num_classes, self.divisor, "label probabilities")
        return self.encoder(probabilities)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        z = self.encode(probabilities)
        for block in self.decoder:
            z = block(F.interpolate(z, scale_factor=2, mode="nearest"))
        return self.head(z)


def corrupt_labels(labels: torch.Tensor, num_classes: int, fraction: float,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Denoising input: each voxel of ``labels`` ``(N, 1, D, H, W)`` (integer) is replaced, with
    probability ``fraction``, by a label drawn uniformly from ``[0, num_classes)``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < fraction
    random = torch.randint(0, num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.where(flip, random.to(labels.dtype), labels)


# -- multi-scale registration ----------------------------------------------------------------------
class DFSA(nn.Module):
    """Deformation-field spatial attention: weighs an upsampled coarser field per voxel and per
    component.

    ``forward(coarse_up, features)``: ``coarse_up`` ``(N, 3, d, h, w)`` (already upsampled to
    this scale, voxels of this grid), ``features`` ``(N, C, d, h, w)`` the decoder features of
    this scale (ignored when ``use_features`` is False). Returns ``(weights * coarse_up,
    weights)`` with ``weights = sigmoid(conv(conv([coarse_up, features])))`` ``(N, 3, d, h, w)``
    in ``(0, 1)``: one map per displacement component. The features tell the convolutions where
    the image evidence disagrees with the coarse estimate; the field alone could not.
    """

    def __init__(self, feature_channels: int, hidden: int = 16, use_features: bool = True):
        super().__init__()
        cin = 3 + (feature_channels if use_features else 0)
        self.hidden = ConvBlock(cin, hidden)
        self.weight = nn.Conv3d(hidden, 3, 3, padding=1)
        self.use_features = use_features

    def forward(self, coarse_up: torch.Tensor, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if coarse_up.ndim != 5 or coarse_up.shape[1] != 3 or coarse_up.shape[2:] != features.shape[2:]:
            raise ValueError(f"coarse field (N, 3, d, h, w) and features (N, C, d, h, w) must share "
                             f"the grid, got {tuple(coarse_up.shape)} and {tuple(features.shape)}")
        x = torch.cat([coarse_up, features], dim=1) if self.use_features else coarse_up
        w = torch.sigmoid(self.weight(self.hidden(x)))
        return w * coarse_up, w


def fuse_fields(fields: Sequence[torch.Tensor], features: Sequence[torch.Tensor],
                attention: Sequence[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]]
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Coarse-to-fine fusion ``DF_k^a = attention[k](up(DF_{k+1}^a), features[k]) + DF_k``.

    Args:
        fields: ``DF_0 .. DF_K``, finest first, ``DF_k`` ``(N, 3, ...)`` in voxels of its grid.
        features: decoder features per scale, finest first (passed to ``attention``).
        attention: ``K`` callables (scales ``0 .. K-1``) returning ``(weighted, weights)``.
    Returns ``(fused, weights)``: ``fused[k] = DF_k^a`` (finest first, ``K + 1`` of them) and
    ``weights[k]`` the attention weights at scale ``k < K``. ``up`` is :func:`resize_field`
    (trilinear, components rescaled to the finer voxels).
    """
    if len(fields) < 1 or len(attention) != len(fields) - 1 or len(features) < len(attention):
        raise ValueError(f"need K + 1 fields, >= K features and K attention modules, got "
                         f"{len(fields)}, {len(features)}, {len(attention)}")
    fused = [fields[-1]]
    weights: List[torch.Tensor] = []
    for k in range(len(fields) - 2, -1, -1):
        up = resize_field(fused[0], fields[k].shape[2:])
        weighted, w = attention[k](up, features[k])
        fused.insert(0, weighted + fields[k])
        weights.insert(0, w)
    return fused, weights


class MultiScaleRegistrationUNet(nn.Module):
    """U-Net whose decoder predicts a field at every level: ``forward(x)`` with ``x``
    ``(N, 2, D, H, W)`` -> ``(fields, features)``, finest first: ``fields[k]`` ``(N, 3, D/2**k,
    ...)`` voxels of that grid, for ``k = 0 .. len(decoder) - 1``.

    The encoder has ``len(encoder)`` stride-2 levels; the decoder climbs back one level per
    entry, so ``len(decoder) == len(encoder)`` gives branches down to 1/2**(len-1) resolution.
    """

    def __init__(self, encoder: Sequence[int] = (16, 32, 32, 32), decoder: Sequence[int] = (32, 32, 32, 16)):
        super().__init__()
        if len(decoder) != len(encoder):
            raise ValueError(f"one decoder level per encoder level, got {encoder} and {decoder}")
        self.down = nn.ModuleList()
        prev, skips = 2, [2]
        for ch in encoder:
            self.down.append(ConvBlock(prev, ch, stride=2))
            prev = ch
            skips.append(ch)
        skips.pop()
        self.up = nn.ModuleList()
        self.heads = nn.ModuleList()
        self.feature_channels: List[int] = []
        for ch in decoder:
            self.up.append(ConvBlock(prev + skips.pop(), ch))
            head = nn.Conv3d(ch, 3, 3, padding=1)
            # near-zero branches: an untrained network is the identity
            nn.init.normal_(head.weight, std=1e-5)
            nn.init.zeros_(head.bias)
            self.heads.append(head)
            self.feature_channels.insert(0, ch)
            prev = ch
        self.divisor = 2 ** len(encoder)

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        _check_image(x, 2, self.divisor, "input")
        history = [x]
        for layer in self.down:
            x = layer(x)
            history.append(x)
        history.pop()
        fields: List[torch.Tensor] = []
        features: List[torch.Tensor] = []
        for layer, head in zip(self.up, self.heads):
            skip = history.pop()
            x = layer(torch.cat([_up(x, skip.shape[2:]), skip], dim=1))
            features.insert(0, x)
            fields.insert(0, head(x))
        return fields, features


@dataclass
class AmdfOutput:
    """What :class:`AMDF` returns (always this structure; lists are finest first).

    Attributes:
        displacement: ``(N, 3, D, H, W)`` the fused field ``DF_0^a``, voxels, ``(k, j, i)``;
            ``warped = moving(x + displacement(x))``.
        warped: ``(N, 1, D, H, W)`` the *masked* moving image pulled through ``displacement``.
        fields: ``DF_k`` per scale, ``(N, 3, D/2**k, ...)``, voxels of that grid.
        fused: ``DF_k^a`` per scale, same shapes (``fused[0] is displacement``).
        weights: DFSA weight maps per scale ``k < K``, ``(N, 3, D/2**k, ...)`` in ``(0, 1)``;
            ``weights[k]`` multiplies the upsampled ``DF_{k+1}^a``.
        mask_fixed, mask_moving: ``(N, 1, D, H, W)`` 0/1 ROI masks the inputs were multiplied by
            (all ones when the network does not use masks).
    """

    displacement: torch.Tensor
    warped: torch.Tensor
    fields: List[torch.Tensor]
    fused: List[torch.Tensor]
    weights: List[torch.Tensor]
    mask_fixed: torch.Tensor
    mask_moving: torch.Tensor


class AMDF(nn.Module):
    """Masked inputs -> multi-scale fields -> DFSA fusion. ``forward(moving, fixed)``, both
    ``(N, 1, D, H, W)`` in [0, 1], sizes divisible by :attr:`divisor`.

    Args:
        encoder, decoder: channels of :class:`MultiScaleRegistrationUNet` (4 levels = 4 scales).
        seg_channels, seg_classes: configuration of the embedded :class:`RoiSegmentationUNet`,
            whose weights are loaded from its own trained model before registration training
            and kept frozen (it ships inside this model's file, so inference needs one file).
        use_masks: multiply each input by its ROI mask (False: an ablation without masks).
        mask_threshold: ROI probability above which a voxel is in the mask.
        dfsa_hidden: channels of DFSA's hidden convolution.
        dfsa_uses_features: give DFSA the decoder features besides the coarser field.
    """

    def __init__(self, encoder: Sequence[int] = (16, 32, 32, 32), decoder: Sequence[int] = (32, 32, 32, 16),
                 seg_channels: Sequence[int] = (18, 36, 72, 144), seg_classes: int = 2,
                 use_masks: bool = True, mask_threshold: float = 0.5, dfsa_hidden: int = 16,
                 dfsa_uses_features: bool = True):
        super().__init__()
        self.config = dict(encoder=list(encoder), decoder=list(decoder), seg_channels=list(seg_channels),
                           seg_classes=seg_classes, use_masks=use_masks, mask_threshold=mask_threshold,
                           dfsa_hidden=dfsa_hidden, dfsa_uses_features=dfsa_uses_features)
        self.segmenter = RoiSegmentationUNet(seg_channels, seg_classes)
        self.segmenter.requires_grad_(False)
        self.registration = MultiScaleRegistrationUNet(encoder, decoder)
        self.dfsa = nn.ModuleList(DFSA(c, dfsa_hidden, dfsa_uses_features)
                                  for c in self.registration.feature_channels[:-1])
        self.use_masks = use_masks
        self.mask_threshold = mask_threshold

    @property
    def divisor(self) -> int:
        return max(self.registration.divisor, self.segmenter.divisor)

    def roi_masks(self, moving: torch.Tensor, fixed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mask_fixed, mask_moving)``, ``(N, 1, D, H, W)`` of 0/1 (ones without masks).
        No gradient: the segmenter is trained on its own."""
        if not self.use_masks:
            return torch.ones_like(fixed), torch.ones_like(moving)
        with torch.no_grad():
            return (self.segmenter.roi_mask(fixed, self.mask_threshold),
                    self.segmenter.roi_mask(moving, self.mask_threshold))

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> AmdfOutput:
        if moving.shape != fixed.shape:
            raise ValueError(f"moving and fixed must have the same shape, got {tuple(moving.shape)} "
                             f"and {tuple(fixed.shape)}")
        _check_image(moving, 1, self.divisor, "moving")
        mask_fixed, mask_moving = self.roi_masks(moving, fixed)
        m, f = moving * mask_moving, fixed * mask_fixed
        fields, features = self.registration(torch.cat([m, f], dim=1))
        fused, weights = fuse_fields(fields, features, list(self.dfsa))
        u = fused[0]
        return AmdfOutput(displacement=u, warped=warp(m, u), fields=fields, fused=fused,
                          weights=weights, mask_fixed=mask_fixed, mask_moving=mask_moving)
