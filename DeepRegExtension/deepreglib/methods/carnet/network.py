"""CAR-Net: co-attention guided, probabilistic diffeomorphic registration, in 3D.

Conventions: :mod:`deepreglib.core.conventions`. Images ``(N, 1, D, H, W)``; every field ``(N, 3, ...)``
in voxels of the grid it lives on, components ``(k, j, i)``; ``warped = moving(x + u(x))``.

Data flow (``s`` = the input size):

* two stride-2 convolutions per image -> feature maps ``F_mov``, ``F_fix`` on the ``s/4`` grid;
* the 3D co-attention block (:class:`CoAttention3D`) -> ``O_mov``, ``O_fix`` on the same grid;
* ``[F_mov, F_fix, O_mov, O_fix]`` upsampled to ``s/2`` -> U-Net (3 down, 3 up) -> mean and
  log-variance of a stationary velocity field (SVF) on the ``s/2`` grid;
* a velocity sample (training) or the mean (inference) -> scaling and squaring -> upsampled DDF.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core.conventions import ALIGN_CORNERS
from ...core.fields import integrate_velocity, resize_field
from ...core.warp import warp
from ..blocks.unet import ConvBlock, UNet3D


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, d, h, w)`` -> ``(N, d*h*w, C)``: one token per voxel, in C (row-major) order."""
    return x.flatten(2).transpose(1, 2)


def _volume(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`_tokens`: ``(N, L, C)`` -> ``(N, C, *shape)``."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *shape)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``softmax(query key^T) value`` through ``scaled_dot_product_attention`` with scale 1.

    ``query`` ``(N, L_q, E)``, ``key`` ``(N, L_k, E)``, ``value`` ``(N, L_k, E_v)`` -> ``(N, L_q, E_v)``.
    Torch's memory-efficient CPU kernel (flash attention for CPU) is chosen only for contiguous
    4D inputs (batch, heads, L, E) whose query, key and value share E; otherwise it falls back to
    the math path, which forms the ``L_q x L_k`` matrix. So a head axis is added, the inputs are
    made contiguous and the narrower side is zero-padded: zero query/key channels add nothing to
    ``query key^T``, zero value channels give zero output channels that are cut off; the result
    is exact (``scale`` is passed, as the default ``1/sqrt(E)`` would change with the padding).
    """
    e, ev = query.shape[-1], value.shape[-1]
    if ev > e:
        query, key = F.pad(query, (0, ev - e)), F.pad(key, (0, ev - e))
    elif e > ev:
        value = F.pad(value, (0, e - ev))
    q, k, v = (t.unsqueeze(1).contiguous() for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    return out.squeeze(1)[..., :ev]


@dataclass
class CoAttentionOutput:
    """What :class:`CoAttention3D` returns; every tensor on the feature grid ``(d, h, w)``.

    Attributes:
        o_mov, o_fix: ``(N, C_v, d, h, w)`` the attended moving / fixed features.
        gate_mov, gate_fix: ``(N, C_v, d, h, w)`` ``sigmoid_conv(ATT_*)`` in ``(0, 1)``.
    """

    o_mov: torch.Tensor
    o_fix: torch.Tensor
    gate_mov: torch.Tensor
    gate_fix: torch.Tensor


class CoAttention3D(nn.Module):
    """The 3D co-attention block. Inputs ``F_mov``, ``F_fix`` ``(N, C, d, h, w)``, same shape.

    With 1x1x1 convolutions ``f, g`` (to ``C_k`` channels) and ``h1, h2`` (to ``C_v``), and the
    voxels of each map flattened to ``L = d h w`` tokens::

        S       = f(F_mov) g(F_fix)^T                       (L_mov x L_fix, never formed)
        ATT_mov = softmax(S) h2(F_fix)                      softmax over fixed positions
        ATT_fix = softmax(S^T) h1(F_mov)                    softmax over moving positions
        O_mov   = h1(F_mov) + a1 * sigmoid(c_mov(ATT_mov)) * h1(F_mov)
        O_fix   = h2(F_fix) + a2 * sigmoid(c_fix(ATT_fix)) * h2(F_fix)

    Both attentions are exactly ``scaled_dot_product_attention(q, k, v, scale=1)`` (:func:`attend`),
    so the ``L x L`` matrix is never materialised (torch's fused kernels work block by block);
    memory is linear in ``L`` (``benchmarks/attention_memory.py``, CPU, forward without gradients,
    160x192x224 input, ``L = 107520``: 109 MB above the inputs, where ``S`` alone would take 43 GiB
    in float32). ``a1``, ``a2`` are learned scalars that start at 0, so an
    untrained block passes ``h1(F_mov)``, ``h2(F_fix)`` through and training phases the
    attention in.
    """

    def __init__(self, channels: int, key_channels: int, value_channels: int):
        super().__init__()
        self.f = nn.Conv3d(channels, key_channels, 1)
        self.g = nn.Conv3d(channels, key_channels, 1)
        self.h1 = nn.Conv3d(channels, value_channels, 1)
        self.h2 = nn.Conv3d(channels, value_channels, 1)
        self.gate_mov = nn.Conv3d(value_channels, value_channels, 1)
        self.gate_fix = nn.Conv3d(value_channels, value_channels, 1)
        self.a1 = nn.Parameter(torch.zeros(()))
        self.a2 = nn.Parameter(torch.zeros(()))
        self.channels = channels

    def _check(self, f_mov: torch.Tensor, f_fix: torch.Tensor) -> None:
        if f_mov.ndim != 5 or f_mov.shape != f_fix.shape or f_mov.shape[1] != self.channels:
            raise ValueError(f"F_mov and F_fix must both be (N, {self.channels}, d, h, w), got "
                             f"{tuple(f_mov.shape)} and {tuple(f_fix.shape)}")

    def forward(self, f_mov: torch.Tensor, f_fix: torch.Tensor) -> CoAttentionOutput:
        self._check(f_mov, f_fix)
        shape = f_mov.shape[2:]
        q_mov, k_fix = _tokens(self.f(f_mov)), _tokens(self.g(f_fix))
        v_mov, v_fix = self.h1(f_mov), self.h2(f_fix)
        # rows of S are moving positions: each moving query attends over the fixed keys
        att_mov = attend(q_mov, k_fix, _tokens(v_fix))
        # S^T: each fixed query attends over the moving keys (the same logits, transposed)
        att_fix = attend(k_fix, q_mov, _tokens(v_mov))
        gate_mov = torch.sigmoid(self.gate_mov(_volume(att_mov, shape)))
        gate_fix = torch.sigmoid(self.gate_fix(_volume(att_fix, shape)))
        o_mov = v_mov + self.a1 * gate_mov * v_mov
        # The paper prints h1(F_fix) here; we use h2(F_fix). ATT_fix and O_fix live on the fixed
        # grid, so the gated term must be fixed-image features, and h2 is the projection the
        # block already uses for them (the values of ATT_mov); h1 is trained as the moving
        # image's projection. h2 makes the block symmetric: swapping the images swaps
        # (f, h1, gate_mov, a1) with (g, h2, gate_fix, a2).
        o_fix = v_fix + self.a2 * gate_fix * v_fix
        return CoAttentionOutput(o_mov, o_fix, gate_mov, gate_fix)

    def query_attention(self, f_mov: torch.Tensor, f_fix: torch.Tensor,
                        index_kji: Sequence[int]) -> torch.Tensor:
        """Attention of one fixed-grid feature voxel over all moving-grid voxels.

        This is row ``p`` of ``softmax(S^T)`` (equivalently column ``p`` of ``S``, normalised over
        the moving positions): the weights with which ``ATT_fix`` at ``p`` averages ``h1(F_mov)``.
        Only that one query is computed (``L`` logits, not ``L x L``).

        Args:
            f_mov, f_fix: ``(1, C, d, h, w)`` feature maps.
            index_kji: the fixed voxel ``(k, j, i)`` on the feature grid (integers in range).
        Returns ``(1, 1, d, h, w)``, non-negative, summing to 1.
        """
        self._check(f_mov, f_fix)
        if f_mov.shape[0] != 1:
            raise ValueError(f"query_attention takes one pair (N = 1), got N = {f_mov.shape[0]}")
        shape = tuple(f_fix.shape[2:])
        idx = tuple(int(round(float(c))) for c in index_kji)
        if len(idx) != 3 or any(not 0 <= c < n for c, n in zip(idx, shape)):
            raise ValueError(f"index_kji must be 3 indices inside the feature grid {shape}, got "
                             f"{tuple(index_kji)}")
        key = self.g(f_fix)[0, :, idx[0], idx[1], idx[2]]  # (C_k,)
        logits = torch.einsum("c,cdhw->dhw", key, self.f(f_mov)[0])
        return torch.softmax(logits.flatten(), 0).view(1, 1, *shape)


@dataclass
class CarNetOutput:
    """What :class:`CarNet` returns (always this structure).

    Attributes:
        displacement: ``(N, 3, D, H, W)`` DDF on the fixed grid, voxels, ``(k, j, i)``;
            ``warped = moving(x + displacement(x))``.
        velocity: ``(N, 3, D/2, H/2, W/2)`` the SVF that was integrated (a posterior sample in
            training, the mean otherwise), voxels of the half-resolution grid.
        velocity_mean: ``(N, 3, D/2, H/2, W/2)`` posterior mean of the SVF.
        log_var: ``(N, 3, D/2, H/2, W/2)`` posterior log-variance (voxels^2, natural log).
        warped: ``(N, 1, D, H, W)`` the moving image pulled through ``displacement``.
        attention_moving, attention_fixed: ``(N, 1, D/4, H/4, W/4)`` the co-attention gates
            ``sigmoid_conv(ATT_*)`` averaged over channels, in ``(0, 1)``, on the feature grid.
    """

    displacement: torch.Tensor
    velocity: torch.Tensor
    velocity_mean: torch.Tensor
    log_var: torch.Tensor
    warped: torch.Tensor
    attention_moving: torch.Tensor
    attention_fixed: torch.Tensor


class CarNet(nn.Module):
    """CAR-Net. ``forward(moving, fixed)``, both ``(N, 1, D, H, W)`` with sizes divisible by
    :attr:`divisor` (16), intensities in [0, 1].

    Args:
        features: channels of the two stride-2 convolutions; ``F`` has ``features[-1]``.
        key_channels: channels of ``f``, ``g`` (the similarity ``S``).
        value_channels: channels of ``h1``, ``h2`` (and so of ``O_mov``, ``O_fix``).
        unet_encoder, unet_decoder: channels of the U-Net on the half-resolution grid
            (3 entries in the encoder = 3 down, 3 up; later decoder entries are extra convs).
        int_steps: scaling-and-squaring steps.
        siamese: one feature extractor for both images (comparable features for ``S``); False
            gives each image its own.
        init_log_var: starting bias of the log-variance head (voxels^2, natural log).
    """

    def __init__(self, features: Sequence[int] = (16, 32), key_channels: int = 16,
                 value_channels: int = 32, unet_encoder: Sequence[int] = (32, 32, 32),
                 unet_decoder: Sequence[int] = (32, 32, 32, 16, 16), int_steps: int = 7,
                 siamese: bool = True, init_log_var: float = -10.0):
        super().__init__()
        if len(features) != 2:
            raise ValueError(f"CAR-Net uses exactly two stride-2 convolutions, got features={features}")
        if len(unet_encoder) != 3:
            raise ValueError(f"the U-Net has 3 levels (3 down, 3 up), got unet_encoder={unet_encoder}")
        self.config = dict(features=list(features), key_channels=key_channels,
                           value_channels=value_channels, unet_encoder=list(unet_encoder),
                           unet_decoder=list(unet_decoder), int_steps=int_steps, siamese=siamese,
                           init_log_var=init_log_var)
        self.extract_mov = self._extractor(features)
        self.extract_fix = self.extract_mov if siamese else self._extractor(features)
        c = features[-1]
        self.coattention = CoAttention3D(c, key_channels, value_channels)
        self.unet = UNet3D(2 * c + 2 * value_channels, unet_encoder, unet_decoder)
        self.mean_head = nn.Conv3d(self.unet.out_channels, 3, 3, padding=1)
        self.log_var_head = nn.Conv3d(self.unet.out_channels, 3, 3, padding=1)
        # Start near zero mean and tiny variance (as VoxelMorph-diff) so that an untrained network
        # is the identity and early samples are not noise.
        nn.init.normal_(self.mean_head.weight, std=1e-5)
        nn.init.zeros_(self.mean_head.bias)
        nn.init.normal_(self.log_var_head.weight, std=1e-10)
        nn.init.constant_(self.log_var_head.bias, float(init_log_var))
        self.int_steps = int_steps

    @staticmethod
    def _extractor(features: Sequence[int]) -> nn.Sequential:
        return nn.Sequential(ConvBlock(1, features[0], stride=2), ConvBlock(features[0], features[1], stride=2))

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this: 4 for the features, times the U-Net's 8 on
        the half-resolution grid, over 2."""
        return 2 * self.unet.divisor

    # -- pieces ---------------------------------------------------------------------------------
    def _check_pair(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        if moving.ndim != 5 or moving.shape != fixed.shape or moving.shape[1] != 1:
            raise ValueError(f"moving and fixed must both be (N, 1, D, H, W), got "
                             f"{tuple(moving.shape)} and {tuple(fixed.shape)}")
        if any(s % self.divisor for s in moving.shape[2:]):
            raise ValueError(f"spatial size {tuple(moving.shape[2:])} must be divisible by {self.divisor}")

    def features(self, moving: torch.Tensor, fixed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(F_mov, F_fix)``, each ``(N, features[-1], D/4, H/4, W/4)``."""
        self._check_pair(moving, fixed)
        return self.extract_mov(moving), self.extract_fix(fixed)

    def posterior(self, moving: torch.Tensor, fixed: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor, CoAttentionOutput]:
        """Mean and log-variance of the SVF, ``(N, 3, D/2, H/2, W/2)`` each, and the block's output."""
        f_mov, f_fix = self.features(moving, fixed)
        co = self.coattention(f_mov, f_fix)
        half = [s // 2 for s in moving.shape[2:]]
        x = torch.cat([f_mov, f_fix, co.o_mov, co.o_fix], dim=1)
        x = F.interpolate(x, size=half, mode="trilinear", align_corners=ALIGN_CORNERS)
        y = self.unet(x)
        return self.mean_head(y), self.log_var_head(y), co

    def velocity_to_displacement(self, velocity: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Integrate the SVF on its grid, then upsample the DDF to ``shape`` (voxels rescaled)."""
        return resize_field(integrate_velocity(velocity, self.int_steps), shape)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor,
                sample: Optional[bool] = None) -> CarNetOutput:
        """``sample``: draw the velocity from the posterior (default: in training mode only)."""
        mean, log_var, co = self.posterior(moving, fixed)
        if sample is None:
            sample = self.training
        v = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean) if sample else mean
        u = self.velocity_to_displacement(v, moving.shape[2:])
        return CarNetOutput(displacement=u, velocity=v, velocity_mean=mean, log_var=log_var,
                            warped=warp(moving, u),
                            attention_moving=co.gate_mov.mean(1, keepdim=True),
                            attention_fixed=co.gate_fix.mean(1, keepdim=True))

    # -- explanation outputs --------------------------------------------------------------------
    @staticmethod
    def gate_map(gate: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """A co-attention gate ``(N, C_v, d, h, w)`` averaged over channels and resampled
        (trilinear) to the image grid ``shape``: ``(N, 1, D, H, W)`` in ``(0, 1)``."""
        return F.interpolate(gate.mean(1, keepdim=True), size=tuple(shape), mode="trilinear",
                             align_corners=ALIGN_CORNERS)

    def coattention_maps(self, moving: torch.Tensor, fixed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Co-attention maps ``(attention_fixed, attention_moving)``, each ``(N, 1, D, H, W)`` in
        ``(0, 1)`` on its image's grid (:meth:`gate_map`). High values: where the other image's
        attended features reinforce this image's own."""
        f_mov, f_fix = self.features(moving, fixed)
        co = self.coattention(f_mov, f_fix)
        shape = moving.shape[2:]
        return self.gate_map(co.gate_fix, shape), self.gate_map(co.gate_mov, shape)

    def feature_index(self, point_kji: Sequence[float], image_shape: Sequence[int]) -> Tuple[int, int, int]:
        """Nearest feature-grid voxel of an image voxel ``(k, j, i)``. Two stride-2, padding-1
        3x3x3 convolutions centre feature voxel ``o`` on image voxel ``4 o``."""
        if len(point_kji) != 3:
            raise ValueError(f"point must be 3 indices (k, j, i), got {point_kji}")
        out = []
        for c, n in zip(point_kji, image_shape):
            if not -0.5 <= float(c) <= n - 0.5:
                raise ValueError(f"point {tuple(point_kji)} is outside the image {tuple(image_shape)}")
            out.append(min(int(round(float(c) / 4.0)), n // 4 - 1))
        return tuple(out)

    def query_attention(self, moving: torch.Tensor, fixed: torch.Tensor, point_kji: Sequence[float],
                        image_grid: bool = True) -> torch.Tensor:
        """Where in the moving image a fixed-image point looks: one row of ``softmax(S^T)``
        (:meth:`CoAttention3D.query_attention`) for the feature voxel nearest ``point_kji``.

        Args:
            moving, fixed: ``(1, 1, D, H, W)``.
            point_kji: fixed-image voxel ``(k, j, i)`` (continuous; the nearest feature voxel is used).
            image_grid: resample the map (trilinear) to ``(D, H, W)`` and divide by 64 (the image
                voxels per feature voxel) so it stays a density per image voxel; False returns the
                row itself on the ``(D/4, H/4, W/4)`` feature grid, summing to exactly 1.
        Returns ``(1, 1, D, H, W)`` or ``(1, 1, D/4, H/4, W/4)``, non-negative.
        """
        f_mov, f_fix = self.features(moving, fixed)
        row = self.coattention.query_attention(f_mov, f_fix, self.feature_index(point_kji, moving.shape[2:]))
        if not image_grid:
            return row
        up = F.interpolate(row, size=moving.shape[2:], mode="trilinear", align_corners=ALIGN_CORNERS)
        return up / 64.0

    def displacement_spread(self, mean: torch.Tensor, log_var: torch.Tensor, shape: Sequence[int],
                            samples: int = 8, generator: Optional[torch.Generator] = None,
                            spacing_kji: Sequence[float] = (1.0, 1.0, 1.0),
                            callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """Voxelwise std of the displacement over ``samples`` draws ``v = mean + exp(log_var / 2)
        eps`` of the velocity posterior, each integrated and upsampled to ``shape``.

        Per voxel ``sqrt(sum_c s_c^2 var_c)``: the root of the trace of the displacement's sample
        covariance (unbiased, ``samples - 1`` in the denominator) with components scaled by
        ``spacing_kji`` (1: image voxels; the grid's spacing: mm). Welford's running update keeps
        memory independent of ``samples`` and loses no precision to cancellation when the spread
        is tiny. ``callback(i, samples)`` runs after each sample (progress, cancellation).
        Returns ``(N, 1, *shape)``, >= 0; 0 when the posterior variance is 0.
        """
        if int(samples) != samples or samples < 2:
            raise ValueError(f"samples must be an int >= 2, got {samples}")
        if len(spacing_kji) != 3 or min(float(s) for s in spacing_kji) <= 0:
            raise ValueError(f"spacing_kji must be 3 positive numbers, got {spacing_kji}")
        std = torch.exp(0.5 * log_var)
        running = m2 = None
        for n in range(1, int(samples) + 1):
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            u = self.velocity_to_displacement(mean + std * eps, shape)
            if running is None:
                running, m2 = u, torch.zeros_like(u)
            else:
                delta = u - running
                running = running + delta / n
                m2 = m2 + delta * (u - running)
            if callback is not None:
                callback(n, int(samples))
        scale = torch.as_tensor([float(s) ** 2 for s in spacing_kji], dtype=m2.dtype, device=m2.device)
        var = m2 * scale.view(1, 3, 1, 1, 1) / (int(samples) - 1)
        return var.sum(1, keepdim=True).sqrt()

    def uncertainty(self, moving: torch.Tensor, fixed: torch.Tensor, samples: int = 8,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Registration uncertainty ``(N, 1, D, H, W)`` in image voxels: the voxelwise std of the
        displacement over ``samples`` posterior draws (:meth:`displacement_spread`)."""
        mean, log_var, _ = self.posterior(moving, fixed)
        return self.displacement_spread(mean, log_var, moving.shape[2:], samples, generator)
