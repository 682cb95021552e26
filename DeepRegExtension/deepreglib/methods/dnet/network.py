"""D-Net: a Siamese encoder-decoder with mutual non-local links regressing a rigid pose.

Zheng et al., "D-net: Siamese based network for arbitrarily oriented volume alignment" (2020).
The network sees a fixed and a moving volume on the same isotropic grid and predicts the rigid
map ``T x = R x + t`` in *network-normalised coordinates* (defined in
:mod:`deepreglib.methods.dnet.method`, which also converts ``T`` to a physical LPS matrix): ``T`` maps a
fixed point to the moving point it corresponds to, ``moving(T x) ~ fixed(x)``.

Shapes: inputs ``(N, 1, D, H, W)`` each (any size; 64^3 in the paper); outputs
:class:`DNetOutput`. The constructor arguments are the whole configuration (``self.config``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core.conventions import ALIGN_CORNERS


# -- rotation parameterisation -------------------------------------------------------------------
def _unit(v: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    norm = v.norm(dim=-1, keepdim=True)
    return v / norm.clamp_min(eps), norm


def _least_aligned_axis(b: torch.Tensor) -> torch.Tensor:
    """The coordinate axis with the smallest ``|b . e|`` (never parallel to the unit vector ``b``)."""
    idx = b.abs().argmin(dim=-1)
    return F.one_hot(idx, 3).to(b.dtype)


def sixd_to_rotation(sixd: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Gram-Schmidt map of the 6D rotation representation (Zhou et al. 2019) onto SO(3).

    ``sixd = (a1, a2)`` are the raw first and second columns; D-Net's equation 1 is
    ``b1 = a1/|a1|``, ``b2 = unit(a2 - (b1.a2) b1)``, ``b3 = b1 x b2``, ``R = [b1 b2 b3]``.
    It is computed here in float64 as ``b3 = unit(b1 x a2)``, ``b2 = b3 x b1`` (the same matrix
    in exact arithmetic, but orthonormal to rounding even when ``a2`` is nearly parallel to
    ``a1``). Degenerate inputs still give a rotation: ``a1 = 0`` uses the x axis, and ``a2``
    parallel to ``a1`` (or zero) uses the coordinate axis least aligned with ``b1``.

    Args:
        sixd: ``(..., 6)``, any scale.
    Returns:
        ``(..., 3, 3)`` in ``sixd``'s dtype: orthonormal with determinant +1; columns b1, b2, b3.
    """
    if sixd.shape[-1] != 6:
        raise ValueError(f"expected a (..., 6) tensor, got {tuple(sixd.shape)}")
    x = sixd.double()
    a1, a2 = x[..., :3], x[..., 3:]
    b1, n1 = _unit(a1, eps)
    ex = torch.zeros_like(a1)
    ex[..., 0] = 1.0
    b1 = torch.where(n1 > eps, b1, ex)
    c = torch.cross(b1, a2, dim=-1)
    fallback = torch.cross(b1, _least_aligned_axis(b1), dim=-1)
    c = torch.where(c.norm(dim=-1, keepdim=True) > eps * a2.norm(dim=-1, keepdim=True).clamp_min(1.0),
                    c, fallback)
    b3, _ = _unit(c, eps)
    b3, _ = _unit(b3 - (b3 * b1).sum(-1, keepdim=True) * b1, eps)  # removes rounding drift
    b2 = torch.cross(b3, b1, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1).to(sixd.dtype)


def rotation_to_sixd(rotation: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 3)`` -> ``(..., 6)``: the first two columns, the training target of the 6D
    head (``sixd_to_rotation(rotation_to_sixd(R)) == R`` for any rotation ``R``)."""
    if rotation.shape[-2:] != (3, 3):
        raise ValueError(f"expected (..., 3, 3), got {tuple(rotation.shape)}")
    return torch.cat([rotation[..., :, 0], rotation[..., :, 1]], dim=-1)


# -- building blocks -------------------------------------------------------------------------------
class ResidualDown(nn.Module):
    """Two 3x3x3 convolutions (the first with stride 2) plus a strided 1x1x1 shortcut, LeakyReLU.
    No normalisation: the deepest blocks are 1-2 voxels wide, where instance norm is undefined."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, 1, stride=2)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))) + self.skip(x))


class ResidualUp(nn.Module):
    """Trilinear upsampling (to the skip's size, else x2), concatenation with the skip, then two
    3x3x3 convolutions plus a 1x1x1 shortcut, LeakyReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        cat = in_channels + skip_channels
        self.conv1 = nn.Conv3d(cat, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv3d(cat, out_channels, 1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        size = tuple(skip.shape[2:]) if skip is not None else tuple(2 * s for s in x.shape[2:])
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=ALIGN_CORNERS)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.act(self.conv2(self.act(self.conv1(x))) + self.skip(x))


class MutualNonLocal(nn.Module):
    """Mutual non-local link between a fixed and a moving feature map (embedded Gaussian, one
    shared 1x1x1 projection ``W`` for query, key and value)::

        y_m2f(k) = sum_j softmax_j( (W x_f(k)) . (W x_m(j)) ) W x_m(j)
        y_f2m(k) = sum_j softmax_j( (W x_m(k)) . (W x_f(j)) ) W x_f(j)

    computed with ``scaled_dot_product_attention`` at scale 1 (no ``1/sqrt(C)``). Each branch
    continues with its input plus the attention read-out: ``(x_f + y_m2f, x_m + y_f2m)``.

    Shapes: ``x_f``, ``x_m`` ``(N, C, D, H, W)`` (same size); outputs the same.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.w = nn.Conv3d(channels, channels, 1, bias=False)

    @staticmethod
    def _tokens(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # (N, S, C)

    def forward(self, x_f: torch.Tensor, x_m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x_f.shape != x_m.shape or x_f.ndim != 5:
            raise ValueError(f"fixed and moving features must both be (N, C, D, H, W), got "
                             f"{tuple(x_f.shape)} and {tuple(x_m.shape)}")
        wf, wm = self._tokens(self.w(x_f)), self._tokens(self.w(x_m))
        y_m2f = F.scaled_dot_product_attention(wf, wm, wm, scale=1.0)
        y_f2m = F.scaled_dot_product_attention(wm, wf, wf, scale=1.0)
        shape = x_f.shape
        return (x_f + y_m2f.transpose(1, 2).reshape(shape),
                x_m + y_f2m.transpose(1, 2).reshape(shape))

    def attention(self, x_f: torch.Tensor, x_m: torch.Tensor) -> torch.Tensor:
        """``(N, S_f, S_m)`` softmax weights of the fixed->moving link (row ``k``: where fixed
        position ``k`` reads from in the moving map; rows sum to 1; positions flattened in
        ``(D, H, W)`` order)."""
        wf, wm = self._tokens(self.w(x_f)), self._tokens(self.w(x_m))
        return torch.softmax(wf @ wm.transpose(1, 2), dim=-1)


# -- the network -----------------------------------------------------------------------------------
@dataclass
class DNetOutput:
    """What :class:`DNet` returns (always this structure).

    Attributes:
        rotation: ``(N, 3, 3)`` in SO(3), acting on network-normalised ``(k, j, i)`` coordinates.
        translation: ``(N, 3)`` in network-normalised units, ``(k, j, i)`` order.
        sixd: ``(N, 6)`` the raw 6D output before Gram-Schmidt (what the training loss compares).
    """

    rotation: torch.Tensor
    translation: torch.Tensor
    sixd: torch.Tensor


class DNet(nn.Module):
    """D-Net. ``forward(moving, fixed)`` (VoxelMorph's argument order), both ``(N, 1, D, H, W)``.

    Args:
        channels: input channels then the output channels of the 6 (``len - 1``) residual
            down-sampling blocks of each Siamese branch (shared weights); the paper's
            ``(1, 16, 32, 64, 64, 64, 64)``.
        linked: how many of the deepest block pairs get a mutual non-local link (paper: 4).
        decoder: output channels of the ``linked`` residual up-sampling blocks. The deepest
            linked pair (both branches concatenated) is the decoder's input; the other linked
            pairs are its skips, deepest first; the last block has no skip and upsamples x2.
        hidden: width of the fully connected layer (paper: 128).
        pool: the decoder output is average-pooled to ``pool^3`` before the FC layers, so the
            regression size does not depend on the input size (16^3 -> 4^3 at 64^3 input).
        input_size: side of the cubic grid the network was trained on (used by the method).
    """

    def __init__(self, channels: Sequence[int] = (1, 16, 32, 64, 64, 64, 64), linked: int = 4,
                 decoder: Sequence[int] = (64, 64, 32, 16), hidden: int = 128, pool: int = 4,
                 input_size: int = 64):
        super().__init__()
        channels, decoder = [int(c) for c in channels], [int(c) for c in decoder]
        blocks = len(channels) - 1
        if blocks < 1 or not 1 <= linked <= blocks:
            raise ValueError(f"need 1 <= linked <= {blocks} blocks, got linked={linked}")
        if len(decoder) != linked:
            raise ValueError(f"decoder needs one entry per linked block ({linked}), got {decoder}")
        if channels[0] != 1:
            raise ValueError(f"D-Net branches take one-channel images, channels[0] = {channels[0]}")
        self.config = dict(channels=channels, linked=int(linked), decoder=decoder, hidden=int(hidden),
                           pool=int(pool), input_size=int(input_size))
        self.input_size = int(input_size)
        self.encoder = nn.ModuleList(ResidualDown(channels[i], channels[i + 1]) for i in range(blocks))
        self.linked_levels = list(range(blocks - linked, blocks))  # block indices, shallow -> deep
        self.links = nn.ModuleList(MutualNonLocal(channels[i + 1]) for i in self.linked_levels)
        self.up = nn.ModuleList()
        prev = 2 * channels[-1]
        skips = [2 * channels[i + 1] for i in reversed(self.linked_levels[:-1])] + [0]
        for ch, sk in zip(decoder, skips):
            self.up.append(ResidualUp(prev, sk, ch))
            prev = ch
        self.pool = nn.AdaptiveAvgPool3d(pool)
        self.fc1 = nn.Linear(prev * pool ** 3, hidden)
        self.fc2 = nn.Linear(hidden, 9)
        self.act = nn.LeakyReLU(0.2)
        # Start at the identity pose: 6D = first two columns of I, no translation.
        nn.init.normal_(self.fc2.weight, std=1e-4)
        with torch.no_grad():
            self.fc2.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1.0, 0, 0, 0, 0]))

    def _check(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        if moving.shape != fixed.shape or moving.ndim != 5 or moving.shape[1] != 1:
            raise ValueError(f"moving and fixed must both be (N, 1, D, H, W), got "
                             f"{tuple(moving.shape)} and {tuple(fixed.shape)}")

    def encode(self, moving: torch.Tensor, fixed: torch.Tensor
               ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[Tuple[torch.Tensor, torch.Tensor]]]:
        """Both branches; returns the linked fixed and moving features (after the link), shallow
        to deep, and the features *entering* each link (for attention maps)."""
        self._check(moving, fixed)
        f, m = fixed, moving
        linked_f, linked_m, before = [], [], []
        for i, block in enumerate(self.encoder):
            f, m = block(f), block(m)
            if i in self.linked_levels:
                before.append((f, m))
                f, m = self.links[self.linked_levels.index(i)](f, m)
                linked_f.append(f)
                linked_m.append(m)
        return linked_f, linked_m, before

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> DNetOutput:
        lf, lm, _ = self.encode(moving, fixed)
        x = torch.cat([lf[-1], lm[-1]], dim=1)
        skips = [torch.cat([a, b], dim=1) for a, b in zip(reversed(lf[:-1]), reversed(lm[:-1]))]
        for layer, skip in zip(self.up, skips + [None]):
            x = layer(x, skip)
        params = self.fc2(self.act(self.fc1(self.pool(x).flatten(1))))
        sixd, translation = params[:, :6], params[:, 6:]
        return DNetOutput(rotation=sixd_to_rotation(sixd), translation=translation, sixd=sixd)

    def attention_map(self, moving: torch.Tensor, fixed: torch.Tensor, query_kji: Sequence[float],
                      link: int = 0) -> torch.Tensor:
        """Mutual-attention map of one fixed query point over the moving image.

        Args:
            moving, fixed: ``(1, 1, D, H, W)``.
            query_kji: continuous voxel index ``(k, j, i)`` of the query in ``fixed``.
            link: which link (0 = the shallowest, finest one).
        Returns:
            ``(1, 1, D, H, W)``: the fixed->moving softmax weights of the feature voxel nearest
            the query, upsampled trilinearly to the input grid and divided by their maximum
            (range [0, 1]; 1 where the query attends most).
        """
        if moving.shape[0] != 1:
            raise ValueError(f"attention maps are for one pair, got batch {moving.shape[0]}")
        if not 0 <= link < len(self.links):
            raise ValueError(f"link must be in [0, {len(self.links)}), got {link}")
        _, _, before = self.encode(moving, fixed)
        x_f, x_m = before[link]
        weights = self.links[link].attention(x_f, x_m)  # (1, S_f, S_m)
        full, small = fixed.shape[2:], x_f.shape[2:]
        # align_corners mapping from input voxels to feature voxels (see conventions)
        q = [round(float(c) * (s - 1) / max(n - 1, 1)) for c, s, n in zip(query_kji, small, full)]
        q = [min(max(v, 0), s - 1) for v, s in zip(q, small)]
        row = (q[0] * small[1] + q[1]) * small[2] + q[2]
        amap = weights[:, row].reshape(1, 1, *small)
        amap = F.interpolate(amap, size=tuple(full), mode="trilinear", align_corners=ALIGN_CORNERS)
        return amap / amap.amax().clamp_min(1e-12)
