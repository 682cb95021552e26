"""R2N2 in 3D: registration as a recurrent sequence of local Gaussian deformations.

After Sandkuehler, Andermatt, Bauman, Pezold, Cattin and Cattin, "Recurrent Registration Neural
Networks for Deformable Image Registration", NeurIPS 2019 (2D), extended to 3D. Conventions:
:mod:`deepreglib.core.conventions`; the transformation model is in :mod:`.r2n2_transform`.

At step ``t = 1..T`` the network sees the fixed image and the moving image warped by the
cumulative field ``f_{t-1}`` (``f_0 = 0``), updates its recurrent state and emits one local
deformation ``l_t``; ``f_t = f_{t-1} + l_t``. Every warp pulls from the *original* moving image
through the summed field (``M o f_t``), so interpolation errors do not accumulate over steps.

Network, per step:

* three gated recurrent registration units (GR2U) at 1/2, 1/4 and 1/8 resolution, each a strided
  entry convolution, a residual stack and a convolutional GRU (reset, update and proposal gates
  as convolutions, tanh activations); a unit's output is the GRU state plus the residual stack's
  output (the skip);
* a position network: at each resolution two spatial-softmax maps ``p_l``, ``p_r`` (two 1-channel
  heads), the expected normalised coordinate under their mean, and a certainty
  ``w = 2 - sum |p_l - p_r|`` in [0, 2] (2 when the two maps agree, 0 when disjoint); the centre
  is the certainty-weighted mean of the per-resolution coordinates;
* a parameter network: at each resolution a convolution whose first half of channels, after a
  spatial softmax, gates the second half; the gated features are pooled over space (the
  attention-weighted mean); one fully connected layer maps the pooled features of all
  resolutions to the 6D rotation, 3 width logits and 3 weight pre-activations.

Regularisation (training only): the convolution weights of the recurrent units are multiplied
by Gaussian noise ``N(1, weight_noise^2)`` (DropConnect in its Gaussian form), drawn once per
registration sequence and shared by all its steps, as variational dropout is for RNNs.

Inference may stop early (:class:`AdaptiveStop`, beyond the paper): when the dissimilarity gain
over the last ``window`` steps falls under ``threshold`` (relative to the initial dissimilarity).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core.losses import MSE, LocalNCC
from ...core.warp import warp
from .gaussians import (RAW_PARAMETERS, GaussianParameters, local_deformation, normalized_grid,
                             rotation_from_6d, widths_from_logits)

#: Similarities a model can be trained with and the adaptive stop can monitor.
SIMILARITIES = ("mse", "ncc")


def dissimilarity(name: str) -> nn.Module:
    """Per-item dissimilarity ``(a, b) -> (N,)`` to minimise: ``"mse"`` (mean squared difference,
    0 for identical images) or ``"ncc"`` (1 - local NCC with a 9-voxel window, 0 for identical
    images, range [0, 2])."""
    if name == "mse":
        return MSE(reduction="none")
    if name == "ncc":
        return LocalNCC(9, reduction="none")
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {name!r}")


# -- building blocks -----------------------------------------------------------------------------
class NoisyConv3d(nn.Conv3d):
    """A ``Conv3d`` whose weight is multiplied by :attr:`noise` when one is set (Gaussian
    DropConnect). The noise is a plain attribute, never part of the state dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.noise is None else self.weight * self.noise
        return F.conv3d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ResidualBlock3d(nn.Module):
    """``tanh(x + conv(tanh(conv(x))))``, 3x3x3 convolutions, channels unchanged."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = NoisyConv3d(channels, channels, 3, padding=1)
        self.conv2 = NoisyConv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x + self.conv2(torch.tanh(self.conv1(x))))


class ConvGRU3d(nn.Module):
    """Convolutional GRU cell. With input ``x`` and state ``h`` (both ``(N, C, d, h, w)``)::

        r = sigmoid(W_r * [x, h]),  z = sigmoid(W_z * [x, h])
        h~ = tanh(W_h * [x, r h]),  h' = (1 - z) h + z h~

    ``*`` a 3x3x3 convolution; a missing state is zeros.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.gates = NoisyConv3d(2 * channels, 2 * channels, 3, padding=1)  # reset and update
        self.proposal = NoisyConv3d(2 * channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, h: Optional[torch.Tensor]) -> torch.Tensor:
        if h is None:
            h = torch.zeros_like(x)
        r, z = torch.sigmoid(self.gates(torch.cat([x, h], dim=1))).chunk(2, dim=1)
        proposal = torch.tanh(self.proposal(torch.cat([x, r * h], dim=1)))
        return (1 - z) * h + z * proposal


class GR2U(nn.Module):
    """Gated recurrent registration unit: strided entry convolution (halves the resolution),
    residual stack, convolutional GRU. ``forward(x, h) -> (output, new_state)`` with
    ``output = new_state + residual_output``."""

    def __init__(self, in_channels: int, channels: int, res_blocks: int):
        super().__init__()
        self.entry = NoisyConv3d(in_channels, channels, 3, stride=2, padding=1)
        self.residual = nn.Sequential(*[ResidualBlock3d(channels) for _ in range(res_blocks)])
        self.gru = ConvGRU3d(channels)

    def forward(self, x: torch.Tensor, h: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        res = self.residual(torch.tanh(self.entry(x)))
        h = self.gru(res, h)
        return h + res, h


def _spatial_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``(N, C, d, h, w)`` -> ``(N, C, d*h*w)`` probabilities summing to 1 over space."""
    return torch.softmax(logits.flatten(2), dim=-1)


def level_coordinates(full_shape: Sequence[int], level_shape: Sequence[int], stride: int,
                      dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Normalised ``(k, j, i)`` coordinates of a feature map's voxels, ``(d*h*w, 3)``.

    A 3x3x3 convolution with stride 2 and padding 1 centres output voxel ``q`` on input voxel
    ``2 q``, so a voxel ``q`` of a map ``stride`` times coarser sits on full-resolution voxel
    ``q * stride`` (exactly, for any size), whose normalised coordinate is
    ``2 q stride / (n - 1) - 1``.
    """
    axes = [torch.arange(m, dtype=dtype, device=device) * stride * 2.0 / (n - 1) - 1.0
            for m, n in zip(level_shape, full_shape)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


class PositionNetwork(nn.Module):
    """Centre of the next local deformation from the GR2U outputs (see the module docstring)."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv3d(c, c, 3, padding=1), nn.Tanh(), nn.Conv3d(c, 2, 1)) for c in channels)

    def forward(self, features: List[torch.Tensor], full_shape: Sequence[int],
                strides: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns the centre ``(N, 3)`` (normalised ``(k, j, i)``), the per-resolution
        certainties ``(N, L)`` in [0, 2] and the per-resolution position maps (each ``(N, V)``,
        the mean of ``p_l`` and ``p_r``, summing to 1 over the level's voxels, in
        :func:`level_coordinates`' order)."""
        coords, certainties, maps = [], [], []
        for head, feat, stride in zip(self.heads, features, strides):
            p = _spatial_softmax(head(feat))  # (N, 2, V): p_l and p_r
            grid = level_coordinates(full_shape, feat.shape[2:], stride, feat.dtype, feat.device)
            maps.append(p.mean(1))
            coords.append(torch.einsum("nv,vc->nc", maps[-1], grid))
            certainties.append(2.0 - (p[:, 0] - p[:, 1]).abs().sum(-1))
        c = torch.stack(coords, 1)  # (N, L, 3)
        w = torch.stack(certainties, 1)  # (N, L)
        centre = (w.unsqueeze(-1) * c).sum(1) / (w.sum(1, keepdim=True) + 1e-6)
        return centre, w, maps


class ParameterNetwork(nn.Module):
    """Shape and weight parameters of the next local deformation: per resolution a convolution
    to ``2 * pooled`` channels, the first half spatial-softmaxed gating the second, pooled over
    space; one fully connected layer on the concatenation gives :data:`RAW_PARAMETERS` numbers
    (6D rotation, 3 width logits, 3 weight pre-activations)."""

    def __init__(self, channels: Sequence[int], pooled: int, readout_radius: float = 0.0):
        super().__init__()
        self.pooled = pooled
        self.readout_radius = float(readout_radius)
        self.convs = nn.ModuleList(nn.Conv3d(c, 2 * pooled, 3, padding=1) for c in channels)
        self.fc = nn.Linear(pooled * len(channels), RAW_PARAMETERS)
        # Start at the identity transformation: weight pre-activations ~0 (so v = tanh(.) ~ 0),
        # rotation at the 6D code of the identity, widths at half of s_max.
        with torch.no_grad():
            self.fc.weight.normal_(0.0, 1e-3)
            self.fc.weight[9:].normal_(0.0, 1e-5)
            self.fc.bias.zero_()
            self.fc.bias[:6] = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])

    def forward(self, features: List[torch.Tensor], centre: Optional[torch.Tensor] = None,
                full_shape: Optional[Sequence[int]] = None, strides: Optional[Sequence[int]] = None
                ) -> torch.Tensor:
        """``features`` per resolution; ``centre`` ``(N, 3)`` (normalised), ``full_shape`` and
        ``strides`` are needed only with a ``readout_radius``: then every gate's logits get the
        log of a Gaussian window ``-|x - centre|^2 / (2 radius^2)``, so the parameters are read
        from the features around the place the deformation goes (beyond the paper)."""
        pooled = []
        for level, (conv, feat) in enumerate(zip(self.convs, features)):
            gate, values = conv(feat).flatten(2).chunk(2, dim=1)  # (N, q, V) each
            if self.readout_radius > 0:
                if centre is None or full_shape is None or strides is None:
                    raise ValueError("a readout radius needs the centre, the full shape and the strides")
                grid = level_coordinates(full_shape, feat.shape[2:], strides[level], feat.dtype, feat.device)
                d2 = ((grid.unsqueeze(0) - centre.unsqueeze(1)) ** 2).sum(-1)  # (N, V)
                gate = gate - (d2 / (2.0 * self.readout_radius ** 2)).unsqueeze(1)
            pooled.append((torch.softmax(gate, dim=-1) * values).sum(-1))
        return self.fc(torch.cat(pooled, dim=1))


# -- outputs ---------------------------------------------------------------------------------------
@dataclass
class AdaptiveStop:
    """Stop the recursion when it stops paying (inference only).

    After step ``t >= max(min_steps, window)``, with ``S_t`` the dissimilarity of fixed and
    ``M o f_t`` (``S_0``: before any step), stop when for every batch item
    ``(S_{t-window} - S_t) / S_0 < threshold`` (``S_0`` floored at 1e-8, so an identical pair stops
    at once). ``similarity`` ``None`` uses the one the model was trained with.
    """

    threshold: float = 0.005
    window: int = 3
    min_steps: int = 3
    similarity: Optional[str] = None

    def __post_init__(self):
        if self.window < 1 or self.min_steps < 0:
            raise ValueError(f"window must be >= 1 and min_steps >= 0, got {self.window}, {self.min_steps}")
        if self.similarity is not None and self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES} or None, got {self.similarity!r}")


@dataclass
class R2N2Output:
    """What :class:`R2N2` returns (always this structure; optional parts are ``None``).

    Attributes:
        displacement: ``(N, 3, D, H, W)`` final field ``f_T`` on the fixed grid, voxels,
            ``(k, j, i)``; ``warped = moving(x + displacement(x))``.
        warped: ``(N, 1, D, H, W)`` moving pulled through ``displacement``.
        parameters: the ``T`` local deformations (normalised coordinates), ``T = steps``.
        position_certainty: ``(N, T, 3)`` the position network's per-resolution weights in [0, 2].
        steps: number of steps taken (``< T_max`` when the adaptive stop fired).
        fields: ``(N, T, 3, D, H, W)`` cumulative fields ``f_1..f_T`` (voxels) if requested.
        warped_steps: ``(N, T, 1, D, H, W)`` ``M o f_1 .. M o f_T`` if requested.
        dissimilarity: ``(N, T + 1)`` the stop's dissimilarity ``S_0..S_T`` when a stop was given.
        stopped_early: whether the adaptive stop ended the recursion.
        position_maps: per step, the position network's maps per resolution (``(N, V)`` each,
            see :class:`PositionNetwork`) if requested (the supervised warm start's target).
        predicted_centres: ``(N, T, 3)`` the network's own centres when a ``centre_guide``
            placed the deformations (``parameters.centres`` then holds the guide's).
        flows: per step, the flow head's residual displacement ``(N, 3, d, h, w)`` on the finest
            features' grid (normalised units), in training with ``return_position_maps``.
    """

    displacement: torch.Tensor
    warped: torch.Tensor
    parameters: GaussianParameters
    position_certainty: torch.Tensor
    steps: int
    fields: Optional[torch.Tensor] = None
    warped_steps: Optional[torch.Tensor] = None
    dissimilarity: Optional[torch.Tensor] = None
    stopped_early: bool = False
    position_maps: Optional[List[List[torch.Tensor]]] = None
    predicted_centres: Optional[torch.Tensor] = None
    flows: Optional[List[torch.Tensor]] = None


# -- the network -----------------------------------------------------------------------------------
class R2N2(nn.Module):
    """Recurrent registration neural network in 3D. ``forward(moving, fixed)``, both
    ``(N, 1, D, H, W)`` with every size >= 2.

    Args:
        channels: feature channels of the three GR2Us (1/2, 1/4, 1/8 resolution).
        res_blocks: residual blocks per GR2U.
        pooled: gated pooled features per resolution in the parameter network.
        steps: ``T``, the number of local deformations (training; inference may change it).
        s_max: largest variance of a Gaussian along an axis, normalised units squared.
        s_min: smallest variance (0: the paper's ``sigmoid(.) * s_max``; above 0 keeps training
            from collapsing every width to zero, where no gradient reaches the heads again).
        weight_noise: std of the multiplicative Gaussian weight noise in training (0: off).
        readout_radius: 0 (the paper): the parameter network pools its gated features over the
            whole image. Above 0 (normalised units, beyond the paper): the gates are windowed by
            a Gaussian of this radius around the predicted centre, so the shape and weight of a
            local deformation are read from the features where it acts.
        similarity: the similarity the model is trained with (``"mse"`` or ``"ncc"``); the
            adaptive stop monitors it unless told otherwise.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 32), res_blocks: int = 2, pooled: int = 16,
                 steps: int = 25, s_max: float = 0.3, weight_noise: float = 0.0, similarity: str = "mse",
                 s_min: float = 0.0, readout_radius: float = 0.0, flow_head: bool = False):
        super().__init__()
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels must be 3 positive numbers (one per resolution), got {channels}")
        if steps < 1 or res_blocks < 0 or pooled < 1:
            raise ValueError(f"need steps >= 1, res_blocks >= 0, pooled >= 1; got {steps}, {res_blocks}, {pooled}")
        if not 0 < s_max <= 4.0:
            raise ValueError(f"s_max must be in (0, 4] (normalised units squared), got {s_max}")
        if not 0 <= s_min < s_max:
            raise ValueError(f"s_min must be in [0, s_max), got {s_min} with s_max {s_max}")
        if readout_radius < 0:
            raise ValueError(f"readout_radius must be >= 0 (0: off), got {readout_radius}")
        if weight_noise < 0:
            raise ValueError(f"weight_noise must be >= 0, got {weight_noise}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.config = dict(channels=[int(c) for c in channels], res_blocks=int(res_blocks), pooled=int(pooled),
                           steps=int(steps), s_max=float(s_max), s_min=float(s_min), weight_noise=float(weight_noise),
                           similarity=similarity, readout_radius=float(readout_radius))
        if flow_head:  # only then in the config, so the cards of models without it stay as they were
            self.config["flow_head"] = True
        self.steps = int(steps)
        self.s_max = float(s_max)
        self.s_min = float(s_min)
        self.weight_noise = float(weight_noise)
        self.similarity = similarity
        ins = [2] + list(channels[:-1])
        self.units = nn.ModuleList(GR2U(i, c, res_blocks) for i, c in zip(ins, channels))
        self.strides = [2, 4, 8]
        self.position = PositionNetwork(channels)
        self.parameter_net = ParameterNetwork(channels, pooled, readout_radius)
        #: training only (beyond the paper): the residual displacement at every voxel of the finest
        #: features, so a dense signal teaches them the local motion the sparse heads read
        self.flow_head = nn.Conv3d(channels[0], 3, 1) if flow_head else None

    #: sizes need no particular multiple (strided convolutions accept any size)
    divisor = 1

    def _set_weight_noise(self, on: bool) -> None:
        for m in self.units.modules():
            if isinstance(m, NoisyConv3d):
                m.noise = (1.0 + self.weight_noise * torch.randn_like(m.weight)) if on else None

    def step(self, fixed: torch.Tensor, warped: torch.Tensor, state: List[Optional[torch.Tensor]],
             place: Optional[torch.Tensor] = None):
        """One recurrence step: ``(centre, rotation, widths, weight, certainty, new_state,
        position_maps, flow)`` with shapes ``(N, 3)``, ``(N, 3, 3)``, ``(N, 3)``, ``(N, 3)``,
        ``(N, L)``, the GRU states, ``(N, V_l)`` per resolution, and the flow head's
        ``(N, 3, d, h, w)`` (``None`` without the head or outside training). ``place`` ``(N, 3)``
        (teacher forcing): the parameters are read for a deformation there, not at the network's
        own centre, which is still returned."""
        x = torch.cat([fixed, warped], dim=1)
        features, new_state = [], []
        for unit, h in zip(self.units, state):
            x, h = unit(x, h)
            features.append(x)
            new_state.append(h)
        centre, certainty, maps = self.position(features, fixed.shape[2:], self.strides)
        flow = self.flow_head(features[0]) if self.flow_head is not None and self.training else None
        raw = self.parameter_net(features, centre if place is None else place, fixed.shape[2:], self.strides)
        rotation = rotation_from_6d(raw[:, :6])
        widths = widths_from_logits(raw[:, 6:9], self.s_max, self.s_min)
        weight = torch.tanh(raw[:, 9:12])
        return centre, rotation, widths, weight, certainty, new_state, maps, flow

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, steps: Optional[int] = None,
                stop: Optional[AdaptiveStop] = None, return_fields: bool = False,
                return_warped: bool = False, on_step: Optional[Callable[[int, int], None]] = None,
                return_position_maps: bool = False,
                centre_guide: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> R2N2Output:
        """Run the recursion.

        Args:
            moving, fixed: ``(N, 1, D, H, W)``, intensities in [0, 1].
            steps: largest number of steps (default :attr:`steps`).
            stop: adaptive stop rule (``None``: always take ``steps`` steps).
            return_fields: keep every cumulative field ``f_t`` (memory: ``T`` fields).
            return_warped: keep every ``M o f_t`` (the training loss averages over them).
            on_step: called as ``on_step(t, steps)`` after step ``t`` (progress, cancellation).
            return_position_maps: keep the position network's maps of every step.
            centre_guide: teacher forcing (training only): ``centre_guide(field) -> (N, 3)`` gives
                the centre each step's deformation is placed at, from the field so far; the
                network's own centres are then kept in ``predicted_centres``.
        """
        if moving.ndim != 5 or moving.shape != fixed.shape or moving.shape[1] != 1:
            raise ValueError(f"moving and fixed must both be (N, 1, D, H, W), got "
                             f"{tuple(moving.shape)} and {tuple(fixed.shape)}")
        if min(moving.shape[2:]) < 2:
            raise ValueError(f"every spatial size must be >= 2, got {tuple(moving.shape[2:])}")
        steps = self.steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        shape = tuple(moving.shape[2:])
        grid = normalized_grid(shape, moving.dtype, moving.device)
        noisy = self.training and self.weight_noise > 0
        self._set_weight_noise(noisy)
        try:
            return self._recur(moving, fixed, steps, stop, return_fields, return_warped, on_step, shape, grid,
                               return_position_maps, centre_guide)
        finally:
            if noisy:
                self._set_weight_noise(False)

    def _recur(self, moving, fixed, steps, stop, return_fields, return_warped, on_step, shape, grid,
               return_position_maps=False, centre_guide=None) -> R2N2Output:
        n = moving.shape[0]
        field = moving.new_zeros((n, 3) + shape)
        warped = moving
        state: List[Optional[torch.Tensor]] = [None] * len(self.units)
        params = {"centres": [], "rotations": [], "widths": [], "weights": []}
        certainties, fields, warps, maps, predicted, flows = [], [], [], [], [], []
        metric = dissimilarity(stop.similarity or self.similarity) if stop is not None else None
        history = [metric(fixed, moving).detach()] if metric is not None else []
        stopped = False
        taken = 0
        for t in range(1, steps + 1):
            place = centre_guide(field).to(field.dtype) if centre_guide is not None else None
            centre, rotation, widths, weight, certainty, state, step_maps, flow = self.step(fixed, warped, state, place)
            if place is not None:
                predicted.append(centre)
                centre = place
            field = field + local_deformation(centre, rotation, widths, weight, shape, grid)
            warped = warp(moving, field)
            taken = t
            for key, value in zip(params, (centre, rotation, widths, weight)):
                params[key].append(value)
            certainties.append(certainty)
            if return_fields:
                fields.append(field)
            if return_warped:
                warps.append(warped)
            if return_position_maps:
                maps.append(step_maps)
                if flow is not None:
                    flows.append(flow)
            if on_step is not None:
                on_step(t, steps)
            if metric is not None:
                history.append(metric(fixed, warped).detach())
                if t < steps and t >= max(stop.min_steps, stop.window):
                    gain = (history[t - stop.window] - history[t]) / history[0].clamp_min(1e-8)
                    if bool((gain < stop.threshold).all()):
                        stopped = True
                        break
        parameters = GaussianParameters(**{k: torch.stack(v, 1) for k, v in params.items()})
        return R2N2Output(
            displacement=field, warped=warped, parameters=parameters,
            position_certainty=torch.stack(certainties, 1), steps=taken,
            fields=torch.stack(fields, 1) if return_fields else None,
            warped_steps=torch.stack(warps, 1) if return_warped else None,
            dissimilarity=torch.stack(history, 1) if metric is not None else None,
            stopped_early=stopped, position_maps=maps if return_position_maps else None,
            predicted_centres=torch.stack(predicted, 1) if predicted else None,
            flows=flows or None)
