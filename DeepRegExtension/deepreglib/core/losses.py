"""Training losses: image similarity, field regularisers, a KL term and soft Dice.

Conventions: :mod:`deepreglib.core.conventions`. Images are ``(N, C, D, H, W)``; displacement and
velocity fields ``(N, 3, D, H, W)`` in voxels of their grid, components ``(k, j, i)``.

Every loss is an ``nn.Module`` to *minimise*; its docstring gives its range and its value for
identical images (or a zero field). ``reduction`` is ``'mean'`` (a scalar: mean over the batch,
the default), ``'sum'`` (sum over the batch) or ``'none'`` (one value per batch item, ``(N,)``;
:class:`DiceLoss` gives ``(N, C)``). Constant kernels are built per call on the input's device
and dtype, so no loss carries state to move between devices.
"""
from __future__ import annotations

from itertools import combinations
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("mean", "sum", "none")
Window = Union[int, Sequence[int]]


# -- validation and reduction helpers ------------------------------------------------------------
def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    return per_item


def _check_image(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 5:
        raise ValueError(f"{name} must be (N, C, D, H, W), got shape {tuple(x.shape)}")


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: Tuple[str, str] = ("a", "b")) -> None:
    _check_image(a, names[0])
    _check_image(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def _check_field(u: torch.Tensor, name: str, min_size: int) -> None:
    _check_image(u, name)
    if u.shape[1] != 3:
        raise ValueError(f"{name} must be (N, 3, D, H, W), got shape {tuple(u.shape)}")
    if min(u.shape[2:]) < min_size:
        raise ValueError(f"{name} needs at least {min_size} voxels along every spatial axis, got "
                         f"{tuple(u.shape)}")


def _mask_weights(mask: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """``mask`` ``(N or 1, 1 or C, D, H, W)`` (bool or weights) -> float weights shaped ``like``."""
    if mask is None:
        return None
    _check_image(mask, "mask")
    n, c = like.shape[:2]
    if (mask.shape[2:] != like.shape[2:] or mask.shape[0] not in (1, n)
            or mask.shape[1] not in (1, c)):
        raise ValueError(f"mask must be ({n} or 1, 1 or {c}, {', '.join(map(str, like.shape[2:]))})"
                         f", got {tuple(mask.shape)}")
    return mask.to(like.dtype).expand_as(like)


def _mean_per_item(x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(Weighted) mean of ``(N, ...)`` over all but the batch axis -> ``(N,)``. An item whose
    weights are all zero gives 0."""
    if weights is None:
        return x.flatten(1).mean(1)
    total = weights.flatten(1).sum(1)
    return (x * weights).flatten(1).sum(1) / total.clamp_min(torch.finfo(x.dtype).tiny)


def _window3(window: Window, shape: Sequence[int]) -> Tuple[int, int, int]:
    """An int or 3 ints, each >= 1, clamped to the image ``shape`` ``(D, H, W)``."""
    sizes = (window,) * 3 if isinstance(window, int) else tuple(window)
    if len(sizes) != 3 or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"window must be a positive int or 3 positive ints, got {window!r}")
    return tuple(min(s, n) for s, n in zip(sizes, shape))


def _separable_filter(x: torch.Tensor, kernels: Sequence[Optional[torch.Tensor]],
                      padded: bool) -> torch.Tensor:
    """Filter every channel of ``x`` ``(M, K, D, H, W)`` with one 1D kernel per axis
    (``None`` skips an axis). ``padded``: zero-pad so the output keeps the input shape (a window
    of even length reaches one voxel further forward than back); otherwise 'valid' output."""
    channels = x.shape[1]
    for axis, kernel in enumerate(kernels):
        if kernel is None:
            continue
        w = kernel.numel()
        shape = [1, 1, 1]
        shape[axis] = w
        weight = kernel.to(x.dtype).reshape(1, 1, *shape).expand(channels, 1, *shape)
        if padded:
            pad = [0] * 6
            # F.pad lists the last axis first: W is pad[0:2], H pad[2:4], D pad[4:6]
            pad[2 * (2 - axis)] = (w - 1) // 2
            pad[2 * (2 - axis) + 1] = w // 2
            x = F.pad(x, pad)
        x = F.conv3d(x, weight, groups=channels)
    return x


def _box_kernels(window: Tuple[int, int, int], like: torch.Tensor) -> List[Optional[torch.Tensor]]:
    return [None if w == 1 else like.new_ones(w) for w in window]


#: How :func:`local_ncc` takes its window sums: ``"conv"`` (separable convolution, exact to
#: float32 rounding of one window) or ``"cumsum"`` (running sums, cost independent of the window,
#: 1.6-2.4x faster on CPU for windows 5-9; its rounding grows with the image length, so use it for
#: intensities of order 1, e.g. normalised to [0, 1]).
BOX_FILTERS = ("conv", "cumsum")


def box_sum_cumsum(x: torch.Tensor, window: Tuple[int, int, int]) -> torch.Tensor:
    """Sum of ``x`` ``(N, C, D, H, W)`` over a box window at every voxel, windows cut at the
    border (as ``_separable_filter(..., padded=True)``: a window of even length reaches one
    voxel further forward than back), by running sums along each axis.

    Differentiable through :class:`_BoxSum`: the adjoint of a cut box sum is the box sum with
    the window mirrored (the same one for odd lengths), so the backward pass costs what the
    forward does (2x faster forward and backward than autograd through ``cumsum``, whose
    backward flips and cumsums again; benchmarks/cpu_kernels.py)."""
    return _BoxSum.apply(x, tuple(int(w) for w in window), False)


def _running_box_sum(x: torch.Tensor, window: Tuple[int, ...], mirrored: bool) -> torch.Tensor:
    """The box sum itself (no autograd): per axis, one zero-padded copy, its running sum in
    place, and one difference. ``mirrored`` swaps the window's reach back and forward."""
    for axis, w in enumerate(window):
        dim = 2 + axis
        n = x.shape[dim]
        w = min(w, n)
        if w == 1:
            continue
        back, forward = (w - 1) // 2, w // 2
        if mirrored:
            back, forward = forward, back
        pad = [0] * 6
        # F.pad lists the last axis first; one zero more in front, so that sum[i] = c[i + w] - c[i]
        pad[2 * (2 - axis)], pad[2 * (2 - axis) + 1] = back + 1, forward
        c = F.pad(x, pad)
        torch.cumsum(c, dim, out=c)
        x = torch.sub(c.narrow(dim, w, n), c.narrow(dim, 0, n))
    return x


class _BoxSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, window, mirrored):
        ctx.window, ctx.mirrored = window, mirrored
        return _running_box_sum(x, window, mirrored)

    @staticmethod
    def backward(ctx, grad):
        return _BoxSum.apply(grad.contiguous(), ctx.window, not ctx.mirrored), None, None


def _box_counts(shape: Sequence[int], window: Tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
    """Voxels inside the image in each cut window, ``(1, 1, D, H, W)`` (a product of 1D counts)."""
    out = like.new_ones((1, 1, 1, 1, 1))
    for axis, (n, w) in enumerate(zip(shape, window)):
        i = torch.arange(n, dtype=like.dtype, device=like.device)
        c = torch.clamp(i + w // 2, max=n - 1) - torch.clamp(i - (w - 1) // 2, min=0) + 1
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = n
        out = out * c.view(view)
    return out


# -- normalised cross-correlation ----------------------------------------------------------------
def ncc(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None,
        eps: float = 1e-10) -> torch.Tensor:
    """Global normalised cross-correlation (Pearson correlation) per batch item.

    Args:
        a, b: images ``(N, C, D, H, W)``, same shape; all channels and voxels are pooled.
        mask: optional ``(N or 1, 1 or C, D, H, W)`` bool or weights; only voxels with weight > 0
            count.
        eps: variance floor in squared intensity units, so a constant image gives 0, not nan.
    Returns ``(N,)`` in ``[-1, 1]``: 1 for ``b = s * a + t`` with ``s > 0``, -1 for ``s < 0``.
    """
    _check_pair(a, b)
    w = _mask_weights(mask, a)
    if w is None:
        w = torch.ones_like(a)
    dims = (1, 2, 3, 4)
    total = w.sum(dims).clamp_min(torch.finfo(a.dtype).tiny)
    da = a - ((w * a).sum(dims) / total).view(-1, 1, 1, 1, 1)
    db = b - ((w * b).sum(dims) / total).view(-1, 1, 1, 1, 1)
    cov = (w * da * db).sum(dims) / total
    var_a = (w * da * da).sum(dims) / total
    var_b = (w * db * db).sum(dims) / total
    return cov * torch.rsqrt((var_a + eps) * (var_b + eps))


def local_ncc(a: torch.Tensor, b: torch.Tensor, window: Window = 9,
              eps: float = 1e-5, box: str = "conv") -> torch.Tensor:
    """Local normalised cross-correlation map (signed, not squared as in VoxelMorph).

    At every voxel, over a box window centred on it: ``cov / sqrt((var_a + eps)(var_b + eps))``.
    Windows are cut at the image border and the statistics are means over the voxels inside the
    image (not zero-padded), so border voxels are as trustworthy as inner ones.

    Args:
        a, b: images ``(N, C, D, H, W)``, same shape; channels are computed apart and averaged.
        window: box side in voxels, an int or ``(d, h, w)``; clamped to the image size.
        eps: local variance floor in squared intensity units (1e-5 suits intensities in
            ``[0, 1]``; it costs ``eps / var`` of the value in textured regions and makes flat
            regions score 0 instead of nan).
        box: ``"conv"`` or ``"cumsum"`` (:data:`BOX_FILTERS`): how window sums are taken.
    Returns ``(N, 1, D, H, W)`` in ``[-1, 1]``; 1 where ``b`` is locally ``s * a + t``, ``s > 0``.
    """
    _check_pair(a, b)
    if box not in BOX_FILTERS:
        raise ValueError(f"box must be one of {BOX_FILTERS}, got {box!r}")
    channels = a.shape[1]
    win = _window3(window, a.shape[2:])
    # NCC ignores intensity offsets; removing the global mean first keeps E[x^2] - E[x]^2 from
    # cancelling catastrophically for large intensities (CT) in float32.
    a = a - a.mean(dim=(2, 3, 4), keepdim=True)
    b = b - b.mean(dim=(2, 3, 4), keepdim=True)
    stack = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    if box == "cumsum":
        sums, count = box_sum_cumsum(stack, win), _box_counts(a.shape[2:], win, a)
    else:
        kernels = _box_kernels(win, a)
        sums = _separable_filter(stack, kernels, padded=True)
        count = _separable_filter(a.new_ones((1, 1) + tuple(a.shape[2:])), kernels, padded=True)
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = (sums / count).split(channels, dim=1)
    var_a = (mean_aa - mean_a * mean_a).clamp_min(0.0)
    var_b = (mean_bb - mean_b * mean_b).clamp_min(0.0)
    cov = mean_ab - mean_a * mean_b
    r = cov * torch.rsqrt((var_a + eps) * (var_b + eps))
    # |r| <= 1 holds exactly (Cauchy-Schwarz); the clamp only removes rounding overshoot.
    return r.clamp(-1.0, 1.0).mean(dim=1, keepdim=True)


class GlobalNCC(nn.Module):
    """``1 - ncc(a, b)`` per item. Minimise; 0 for identical images (or ``b = s a + t``, s > 0),
    1 for uncorrelated, 2 for inverted. Range ``[0, 2]``. See :func:`ncc`."""

    def __init__(self, eps: float = 1e-10, reduction: str = "mean"):
        super().__init__()
        self.eps = float(eps)
        self.reduction = _check_reduction(reduction)

    def forward(self, a: torch.Tensor, b: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _reduce(1.0 - ncc(a, b, mask, self.eps), self.reduction)


class LocalNCC(nn.Module):
    """``1 - mean local NCC`` (over voxels, or over ``mask``). Minimise; 0 for identical images,
    range ``[0, 2]``. See :func:`local_ncc` for ``window`` and ``eps``."""

    def __init__(self, window: Window = 9, eps: float = 1e-5, reduction: str = "mean",
                 box: str = "conv"):
        super().__init__()
        _window3(window, (10 ** 9,) * 3)  # validate now, clamp per call
        if box not in BOX_FILTERS:
            raise ValueError(f"box must be one of {BOX_FILTERS}, got {box!r}")
        self.window = window
        self.eps = float(eps)
        self.reduction = _check_reduction(reduction)
        self.box = box

    def forward(self, a: torch.Tensor, b: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        r = local_ncc(a, b, self.window, self.eps, self.box)
        return _reduce(1.0 - _mean_per_item(r, _mask_weights(mask, r)), self.reduction)


class LocalNCCToFixed(nn.Module):
    """``1 - mean local NCC`` of moving images against one ``fixed`` image ``(1, C, D, H, W)``,
    the same number as :class:`LocalNCC` (``box="cumsum"``), with the fixed image's window
    statistics computed once: an optimiser that compares many warped images with one fixed image
    pays for three running-sum channels per call instead of five.

    ``min_std``: when > 0, the mean is taken only over voxels whose fixed window has a standard
    deviation above it (in intensity units): flat regions (the background of a skull-stripped
    brain) score about 0 whatever the warp, and without them the loss is a mean over the
    structure, comparable between images with different amounts of background. The variance
    floor ``eps`` still weights strong edges above weak ones (which helps on real scans), and it
    still leaves a small bias: a warped copy of *higher* contrast than the fixed image scores
    slightly better than the exact match (``r -> sqrt(var_b / (var_b + eps))`` as the warped
    contrast grows, against ``var_b / (var_b + eps)`` for the match; 7e-4 of loss on the test
    phantom, with or without ``min_std``)."""

    def __init__(self, fixed: torch.Tensor, window: Window = 9, eps: float = 1e-5,
                 min_std: float = 0.0):
        super().__init__()
        _check_image(fixed, "fixed")
        self.window = _window3(window, fixed.shape[2:])
        self.eps = float(eps)
        b = (fixed - fixed.mean(dim=(2, 3, 4), keepdim=True)).detach()
        self.count = _box_counts(fixed.shape[2:], self.window, b)
        sums = box_sum_cumsum(torch.cat([b, b * b], dim=1), self.window) / self.count
        mean_b, mean_bb = sums.split(fixed.shape[1], dim=1)
        var_b = (mean_bb - mean_b * mean_b).clamp_min(0.0)
        self.textured = (var_b > float(min_std) ** 2) if min_std > 0 else None
        self.b, self.mean_b = b, mean_b
        self.inv_std_b = torch.rsqrt(var_b + self.eps)

    def forward(self, a: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``a`` ``(1, C, D, H, W)`` like the fixed image; ``mask`` (bool or weights): the mean
        is taken over it."""
        if a.shape != self.b.shape:
            raise ValueError(f"moving image {tuple(a.shape)} must match the fixed {tuple(self.b.shape)}")
        a = a - a.mean(dim=(2, 3, 4), keepdim=True)
        c = a.shape[1]
        sums = box_sum_cumsum(torch.cat([a, a * a, a * self.b], dim=1), self.window) / self.count
        mean_a, mean_aa, mean_ab = sums.split(c, dim=1)
        var_a = (mean_aa - mean_a * mean_a).clamp_min(0.0)
        r = (mean_ab - mean_a * self.mean_b) * torch.rsqrt(var_a + self.eps) * self.inv_std_b
        r = r.clamp(-1.0, 1.0)
        if self.textured is not None:
            mask = self.textured if mask is None else (mask.bool() & self.textured)
        if mask is None:
            return 1.0 - r.mean()
        return 1.0 - _mean_per_item(r, _mask_weights(mask, r))[0]


class MSE(nn.Module):
    """Mean squared intensity difference (over channels and voxels, or over ``mask``).
    Minimise; 0 for identical images, range ``[0, inf)`` in squared intensity units."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def forward(self, a: torch.Tensor, b: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_pair(a, b)
        return _reduce(_mean_per_item((a - b) ** 2, _mask_weights(mask, a)), self.reduction)


# -- structural similarity -----------------------------------------------------------------------
SSIM_KERNELS = ("gaussian", "box")


def _ssim_kernels(window: Tuple[int, int, int], kernel: str, sigma: float,
                  like: torch.Tensor) -> List[Optional[torch.Tensor]]:
    out: List[Optional[torch.Tensor]] = []
    for w in window:
        if w == 1:
            out.append(None)
            continue
        if kernel == "box":
            k = like.new_ones(w)
        else:
            x = torch.arange(w, dtype=like.dtype, device=like.device) - (w - 1) / 2.0
            k = torch.exp(-0.5 * (x / sigma) ** 2)
        out.append(k / k.sum())
    return out


def ssim(a: torch.Tensor, b: torch.Tensor, window: Window = 7,
         data_range: Optional[float] = None, kernel: str = "gaussian", sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) in 3D, averaged per batch item.

    Local means, variances and covariance are taken with a normalised ``kernel`` window
    (``'gaussian'`` with ``sigma`` voxels, truncated to ``window``, or ``'box'``) over the voxels
    where the window fits entirely ('valid' filtering, as scikit-image crops its border).

    Args:
        a, b: images ``(N, C, D, H, W)``, same shape; channels computed apart and averaged.
        window: window side in voxels, an int or ``(d, h, w)``; clamped to the image size.
        data_range: intensity range ``L`` for the constants ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``.
            ``None``: per item, ``max - min`` over both images (treated as a constant, no
            gradient; 1 if both images are constant).
    Returns ``(N,)``; 1 for identical images, lower for less similar ones, range ``[-1, 1]``.
    """
    _check_pair(a, b)
    if kernel not in SSIM_KERNELS:
        raise ValueError(f"kernel must be one of {SSIM_KERNELS}, got {kernel!r}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    n, channels = a.shape[:2]
    if data_range is None:
        with torch.no_grad():
            both = torch.cat([a.flatten(1), b.flatten(1)], dim=1)
            rng = both.max(1).values - both.min(1).values
            rng = torch.where(rng > 0, rng, torch.ones_like(rng))
    else:
        if data_range <= 0:
            raise ValueError(f"data_range must be > 0, got {data_range}")
        rng = a.new_full((n,), float(data_range))
    c1 = ((k1 * rng) ** 2).view(n, 1, 1, 1, 1)
    c2 = ((k2 * rng) ** 2).view(n, 1, 1, 1, 1)
    kernels = _ssim_kernels(_window3(window, a.shape[2:]), kernel, sigma, a)
    stats = _separable_filter(torch.cat([a, b, a * a, b * b, a * b], dim=1), kernels, padded=False)
    mu_a, mu_b, m_aa, m_bb, m_ab = stats.split(channels, dim=1)
    var_a = m_aa - mu_a * mu_a
    var_b = m_bb - mu_b * mu_b
    cov = m_ab - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return _mean_per_item(num / den)


class SSIMLoss(nn.Module):
    """``1 - ssim(a, b)``. Minimise; 0 for identical images, range ``[0, 2]``. See :func:`ssim`."""

    def __init__(self, window: Window = 7, data_range: Optional[float] = None,
                 kernel: str = "gaussian", sigma: float = 1.5, reduction: str = "mean"):
        super().__init__()
        _window3(window, (10 ** 9,) * 3)
        if kernel not in SSIM_KERNELS:
            raise ValueError(f"kernel must be one of {SSIM_KERNELS}, got {kernel!r}")
        self.window = window
        self.data_range = data_range
        self.kernel = kernel
        self.sigma = float(sigma)
        self.reduction = _check_reduction(reduction)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        s = ssim(a, b, self.window, self.data_range, self.kernel, self.sigma)
        return _reduce(1.0 - s, self.reduction)


# -- MIND-SSC ------------------------------------------------------------------------------------
_SIX_NEIGHBOURS = ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1))
#: The 12 pairs of 6-neighbourhood offsets that lie on different axes (squared distance 2): the
#: self-similarity context of MIND-SSC. Descriptor channel ``c`` compares pair ``c`` of this list.
SSC_PAIRS = tuple((p, q) for p, q in combinations(_SIX_NEIGHBOURS, 2)
                  if sum((pi - qi) ** 2 for pi, qi in zip(p, q)) == 2)


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013): self-similarity context.

    For each pair ``(p, q)`` in :data:`SSC_PAIRS`, ``Dp(x)`` is the mean over a
    ``(2 radius + 1)^3`` patch around ``x`` of ``(I(x + dilation p) - I(x + dilation q))^2``
    (image edges replicated). Then ``MIND_c(x) = exp(-(Dp_c - min_c Dp) / V(x))`` with
    ``V(x)`` the mean over channels of ``Dp - min Dp``, clamped to ``[0.001, 1000]`` times its
    image mean (the bounds are constants for the gradient).

    Args:
        image: ``(N, 1, D, H, W)``.
        radius: patch radius in voxels (>= 0).
        dilation: distance of the neighbours in voxels (>= 1).
    Returns ``(N, 12, D, H, W)`` in ``(0, 1]``; unchanged by ``I -> s I + t`` for any ``s != 0``,
    which is what makes it robust across modalities.
    """
    _check_image(image, "image")
    if image.shape[1] != 1:
        raise ValueError(f"image must have one channel, (N, 1, D, H, W), got {tuple(image.shape)}")
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius}")
    if int(dilation) != dilation or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation}")
    d = int(dilation)
    size = image.shape[2:]
    padded = F.pad(image, (d,) * 6, mode="replicate")

    def shifted(offset):
        start = [d + o * d for o in offset]
        return padded[:, :, start[0]:start[0] + size[0], start[1]:start[1] + size[1],
                      start[2]:start[2] + size[2]]

    dist = torch.cat([(shifted(p) - shifted(q)) ** 2 for p, q in SSC_PAIRS], dim=1)
    if radius > 0:
        r = int(radius)
        dist = F.avg_pool3d(F.pad(dist, (r,) * 6, mode="replicate"), 2 * r + 1, stride=1)
    dist = dist - dist.min(dim=1, keepdim=True).values
    var = dist.mean(dim=1, keepdim=True)
    with torch.no_grad():
        level = var.mean(dim=(2, 3, 4), keepdim=True)
    var = torch.minimum(torch.maximum(var, 0.001 * level), 1000.0 * level)
    # a constant image has V = 0 everywhere; its descriptor is then exp(0) = 1, not nan
    var = var.clamp_min(torch.finfo(var.dtype).tiny)
    return torch.exp(-dist / var)


class MINDLoss(nn.Module):
    """Mean squared difference of the MIND-SSC descriptors of ``a`` and ``b`` (over the 12
    channels and all voxels). Minimise; 0 for identical images and for ``b = s a + t`` with any
    ``s != 0`` (an intensity-inverted copy too); range ``[0, 1]``. Images ``(N, 1, D, H, W)``."""

    def __init__(self, radius: int = 1, dilation: int = 2, reduction: str = "mean"):
        super().__init__()
        self.radius = int(radius)
        self.dilation = int(dilation)
        self.reduction = _check_reduction(reduction)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _check_pair(a, b)
        diff = mind_ssc(a, self.radius, self.dilation) - mind_ssc(b, self.radius, self.dilation)
        return _reduce(_mean_per_item(diff ** 2), self.reduction)


class MINDToFixed(nn.Module):
    """:class:`MINDLoss` against one fixed image, for an optimiser that warps the moving image
    many times: the fixed descriptor is computed once, and ``forward`` takes the moving image's
    *descriptor warped* onto the fixed grid (the 12 channels warped as the image would be, as
    ConvexAdam does), so no descriptor is recomputed per step. ``descriptor(moving)`` gives
    what to warp. 0 for equal structure."""

    def __init__(self, fixed: torch.Tensor, radius: int = 1, dilation: int = 2):
        super().__init__()
        self.radius, self.dilation = int(radius), int(dilation)
        with torch.no_grad():
            self.fixed = mind_ssc(fixed, self.radius, self.dilation)

    def descriptor(self, moving: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return mind_ssc(moving, self.radius, self.dilation)

    def forward(self, warped_descriptor: torch.Tensor) -> torch.Tensor:
        if warped_descriptor.shape != self.fixed.shape:
            raise ValueError(f"descriptor {tuple(warped_descriptor.shape)} must match the fixed "
                             f"{tuple(self.fixed.shape)}")
        return ((warped_descriptor - self.fixed) ** 2).mean()


# -- mutual information --------------------------------------------------------------------------
def _parzen_weights(x: torch.Tensor, centres: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` ``(N, V)`` in ``[0, 1]`` -> ``(N, V, B)`` Gaussian bin memberships summing to 1."""
    w = torch.exp(-0.5 * ((x.unsqueeze(-1) - centres) / sigma) ** 2)
    return w / w.sum(-1, keepdim=True)


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``(N, V)``, map ``[min, max]`` to ``[0, 1]`` (the map is a constant for the
    gradient; a constant row becomes 0)."""
    with torch.no_grad():
        lo = x.min(1, keepdim=True).values
        span = x.max(1, keepdim=True).values - lo
        span = torch.where(span > 0, span, torch.ones_like(span))
    return (x - lo) / span


def mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int = 32,
                       sigma_ratio: float = 0.5, normalized: bool = False,
                       mask: Optional[torch.Tensor] = None, max_voxels: Optional[int] = None,
                       eps: float = 1e-10) -> torch.Tensor:
    """Differentiable mutual information from a Parzen-window joint histogram.

    Each image is mapped to ``[0, 1]`` by its own min and max (per item), each voxel is spread
    over ``bins`` equally spaced bin centres with a Gaussian of ``sigma = sigma_ratio x bin
    width``, and ``p(a, b)`` is the mean outer product of the two memberships; the marginals are
    its sums. ``MI = H(a) + H(b) - H(a, b)`` in nats; with ``normalized``, Studholme's
    ``NMI = (H(a) + H(b)) / H(a, b)``.

    Args:
        a, b: images ``(N, C, D, H, W)``, same shape; all channels and voxels are samples.
        mask: optional ``(N or 1, 1 or C, D, H, W)`` weights; voxels weigh in proportionally.
        max_voxels: if set and the image has more voxels, a random subset of that many voxels
            (the same for ``a`` and ``b``) is used, to bound memory (``N x V x bins`` floats).
    Returns ``(N,)``: MI in ``[0, log(bins)]`` (0 for independent images), NMI in ``[1, 2]``.
    Invariant to any affine intensity change of either image; nearly so to monotone ones.
    """
    _check_pair(a, b)
    if int(bins) != bins or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins}")
    if sigma_ratio <= 0:
        raise ValueError(f"sigma_ratio must be > 0, got {sigma_ratio}")
    w = _mask_weights(mask, a)
    xa, xb = a.flatten(1), b.flatten(1)
    wm = None if w is None else w.flatten(1)
    if max_voxels is not None:
        if max_voxels < 1:
            raise ValueError(f"max_voxels must be >= 1, got {max_voxels}")
        if xa.shape[1] > max_voxels:
            pick = torch.randperm(xa.shape[1], device=a.device)[:max_voxels]
            xa, xb = xa[:, pick], xb[:, pick]
            wm = None if wm is None else wm[:, pick]
    centres = torch.linspace(0.0, 1.0, int(bins), dtype=a.dtype, device=a.device)
    sigma = sigma_ratio / (bins - 1)
    pa = _parzen_weights(_unit_range(xa), centres, sigma)
    pb = _parzen_weights(_unit_range(xb), centres, sigma)
    if wm is None:
        wm = torch.ones_like(xa)
    total = wm.sum(1).clamp_min(torch.finfo(a.dtype).tiny).view(-1, 1, 1)
    joint = torch.einsum("nv,nvb,nvc->nbc", wm, pa, pb) / total
    marg_a, marg_b = joint.sum(2), joint.sum(1)
    h_a = -(marg_a * torch.log(marg_a + eps)).sum(1)
    h_b = -(marg_b * torch.log(marg_b + eps)).sum(1)
    h_ab = -(joint * torch.log(joint + eps)).sum((1, 2))
    if normalized:
        return (h_a + h_b) / h_ab.clamp_min(eps)
    return h_a + h_b - h_ab


class MutualInformation(nn.Module):
    """``-MI`` (or ``-NMI`` with ``normalized=True``). Minimise; about 0 for independent images
    (-1 with NMI), and down to ``-H(a)`` (-2 with NMI) for identical ones. See
    :func:`mutual_information`."""

    def __init__(self, bins: int = 32, sigma_ratio: float = 0.5, normalized: bool = False,
                 max_voxels: Optional[int] = None, reduction: str = "mean"):
        super().__init__()
        if int(bins) != bins or bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {bins}")
        if sigma_ratio <= 0:
            raise ValueError(f"sigma_ratio must be > 0, got {sigma_ratio}")
        self.bins = int(bins)
        self.sigma_ratio = float(sigma_ratio)
        self.normalized = bool(normalized)
        self.max_voxels = max_voxels
        self.reduction = _check_reduction(reduction)

    def forward(self, a: torch.Tensor, b: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mi = mutual_information(a, b, self.bins, self.sigma_ratio, self.normalized, mask,
                                self.max_voxels)
        return _reduce(-mi, self.reduction)


# -- field regularisers --------------------------------------------------------------------------
PENALTIES = ("l1", "l2")


class GradientSmoothness(nn.Module):
    """VoxelMorph's "Grad" loss of a field ``u`` ``(N, 3, D, H, W)`` (voxel units).

    Per axis, the mean over components and voxels of the squared (``'l2'``) or absolute
    (``'l1'``) forward difference; the loss is the mean of the three. For an affine field
    ``u(x) = A x + t`` with ``'l2'`` it is ``||A||_F^2 / 9``. Minimise; 0 for a constant field,
    range ``[0, inf)`` in voxels^2 (``'l2'``) or voxels (``'l1'``).
    """

    def __init__(self, penalty: str = "l2", reduction: str = "mean"):
        super().__init__()
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        self.penalty = penalty
        self.reduction = _check_reduction(reduction)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        _check_field(u, "u", 2)
        terms = []
        for axis in (2, 3, 4):
            diff = u.diff(dim=axis)
            terms.append(_mean_per_item(diff * diff if self.penalty == "l2" else diff.abs()))
        return _reduce(sum(terms) / 3.0, self.reduction)


def _shifted_interior(u: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """``u`` at ``x + offset`` for every interior voxel ``x`` (one voxel in from each face)."""
    d, h, w = u.shape[2:]
    k, j, i = offset
    return u[:, :, 1 + k:d - 1 + k, 1 + j:h - 1 + j, 1 + i:w - 1 + i]


class BendingEnergy(nn.Module):
    """Bending energy of a field ``u`` ``(N, 3, D, H, W)`` (voxel units).

    Mean over components and interior voxels of the squared Frobenius norm of the Hessian,
    ``sum_a u_aa^2 + 2 sum_{a<b} u_ab^2``, with central second differences
    (``u[x+e] - 2u[x] + u[x-e]`` and ``(u[x+e+f] - u[x+e-f] - u[x-e+f] + u[x-e-f]) / 4``), which
    are exact for quadratic fields. Minimise; 0 for any affine field, range ``[0, inf)``.
    Needs 3 voxels along every axis.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        _check_field(u, "u", 3)
        unit = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
        centre = _shifted_interior(u, (0, 0, 0))
        energy = torch.zeros_like(centre)
        for e in unit:
            minus = tuple(-x for x in e)
            second = _shifted_interior(u, e) - 2 * centre + _shifted_interior(u, minus)
            energy = energy + second * second
        for e, f in combinations(unit, 2):
            def at(se, sf):
                return _shifted_interior(u, tuple(se * x + sf * y for x, y in zip(e, f)))
            mixed = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / 4.0
            energy = energy + 2 * mixed * mixed
        return _reduce(_mean_per_item(energy), self.reduction)


class TotalVariation(nn.Module):
    """Isotropic total variation of ``x`` ``(N, C, D, H, W)`` (a field or an image).

    Per channel and voxel ``x`` of the ``(D-1, H-1, W-1)`` grid where all three forward
    differences exist: ``sqrt(dk^2 + dj^2 + di^2 + eps)``; the loss is its mean. Minimise;
    ``sqrt(eps)`` for a constant input, range ``[sqrt(eps), inf)`` in the input's units.
    ``eps`` keeps the gradient finite where the input is flat.
    """

    def __init__(self, eps: float = 1e-6, reduction: str = "mean"):
        super().__init__()
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)
        self.reduction = _check_reduction(reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "x")
        if min(x.shape[2:]) < 2:
            raise ValueError(f"x needs at least 2 voxels along every spatial axis, got "
                             f"{tuple(x.shape)}")
        base = x[:, :, :-1, :-1, :-1]
        dk = x[:, :, 1:, :-1, :-1] - base
        dj = x[:, :, :-1, 1:, :-1] - base
        di = x[:, :, :-1, :-1, 1:] - base
        tv = torch.sqrt(dk * dk + dj * dj + di * di + self.eps)
        return _reduce(_mean_per_item(tv), self.reduction)


# -- KL divergence of a probabilistic velocity ---------------------------------------------------
PRIORS = ("laplacian", "normal")


def _degree_map(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Number of in-grid 6-neighbours of every voxel, ``(1, 1, D, H, W)``."""
    deg = like.new_zeros((1, 1) + tuple(shape))
    for axis, n in enumerate(shape):
        per_axis = like.new_full((n,), 2.0)
        per_axis[0] -= 1
        per_axis[-1] -= 1  # n == 1: 0 neighbours along this axis
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = n
        deg = deg + per_axis.view(view)
    return deg


class KLDivergence(nn.Module):
    """KL divergence of the posterior ``q = N(mean, diag(exp(log_var)))`` of a velocity field
    from its prior (Dalca et al., MICCAI 2018; VoxelMorph-diff, CAR-Net), per scalar variable.

    With ``K = 3 D H W`` variables, ``s2 = exp(log_var)``, ``deg(x)`` the number of in-grid
    6-neighbours of ``x`` and ``E`` the set of neighbouring voxel pairs (each pair once):

    ``prior='laplacian'``: ``p = N(0, (lambda L)^-1)`` with ``L = Deg - Adj`` the grid Laplacian::

        KL = 0.5 / K * sum_c [ lambda sum_x deg(x) s2_c(x) - sum_x log s2_c(x)
                               + lambda sum_{(x,y) in E} (mean_c(x) - mean_c(y))^2 ]

      These are the terms of ``KL(q || p) / K`` that depend on ``q``; the constant
      ``-0.5 (1 + log det(lambda L) / K)`` (``L`` over all ``K`` variables) is dropped as in the
      paper: ``L`` is singular, the prior improper, so it is not finite. The optimum over ``s2``
      is ``1 / (lambda deg)``, and a smooth mean costs little. Not 0 at its minimum: use it for
      gradients, not as a score.

    ``prior='normal'``: ``p = N(0, I)``: ``KL = 0.5 * mean(s2 + mean^2 - 1 - log s2)``, exact,
    ``>= 0``, 0 at ``mean = 0, log_var = 0``.

    Inputs: ``mean`` and ``log_var`` ``(N, 3, D, H, W)``, voxel units. Minimise.
    """

    def __init__(self, prior_lambda: float = 20.0, prior: str = "laplacian",
                 reduction: str = "mean"):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        if prior_lambda <= 0:
            raise ValueError(f"prior_lambda must be > 0, got {prior_lambda}")
        self.prior_lambda = float(prior_lambda)
        self.prior = prior
        self.reduction = _check_reduction(reduction)

    def forward(self, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        _check_field(mean, "mean", 1)
        _check_pair(mean, log_var, ("mean", "log_var"))
        var = torch.exp(log_var)
        if self.prior == "normal":
            return _reduce(0.5 * _mean_per_item(var + mean * mean - 1.0 - log_var), self.reduction)
        lam = self.prior_lambda
        deg = _degree_map(mean.shape[2:], mean)
        sigma_term = _mean_per_item(lam * deg * var - log_var)
        count = mean[0].numel()
        edges = sum((mean.diff(dim=axis) ** 2).flatten(1).sum(1) for axis in (2, 3, 4))
        return _reduce(0.5 * (sigma_term + lam * edges / count), self.reduction)


# -- segmentation overlap ------------------------------------------------------------------------
def one_hot(labels: torch.Tensor, num_classes: int,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer label map ``(N, 1, D, H, W)`` with values in ``[0, num_classes)`` ->
    ``(N, num_classes, D, H, W)`` of 0/1 in ``dtype``."""
    _check_image(labels, "labels")
    if labels.shape[1] != 1:
        raise ValueError(f"labels must be (N, 1, D, H, W), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return F.one_hot(labels[:, 0].long(), int(num_classes)).permute(0, 4, 1, 2, 3).to(dtype)


class DiceLoss(nn.Module):
    """Soft Dice loss on probability / one-hot maps ``(N, C, D, H, W)``.

    Per item and class ``Dice = (2 sum(p q) + eps) / (sum p + sum q + eps)``; the loss is
    ``1 - Dice``, averaged over classes (``reduction='none'`` returns ``(N, C)`` per class).
    Minimise; 0 for identical maps (a class absent from both counts as Dice 1), 1 for disjoint
    ones, range ``[0, 1]``. ``include_background=False`` drops class 0.
    """

    def __init__(self, eps: float = 1e-5, include_background: bool = True,
                 reduction: str = "mean"):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.include_background = bool(include_background)
        self.reduction = _check_reduction(reduction)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target, ("pred", "target"))
        if not self.include_background:
            if pred.shape[1] < 2:
                raise ValueError(f"include_background=False needs >= 2 classes, got "
                                 f"{tuple(pred.shape)}")
            pred, target = pred[:, 1:], target[:, 1:]
        dims = (2, 3, 4)
        inter = (pred * target).sum(dims)
        dice = (2 * inter + self.eps) / (pred.sum(dims) + target.sum(dims) + self.eps)
        loss = 1.0 - dice
        if self.reduction == "none":
            return loss
        return _reduce(loss.mean(1), self.reduction)


__all__ = [
    "ncc", "local_ncc", "GlobalNCC", "LocalNCC", "MSE", "ssim", "SSIMLoss", "mind_ssc",
    "MINDLoss", "MINDToFixed", "mutual_information", "MutualInformation", "GradientSmoothness", "BendingEnergy",
    "TotalVariation", "KLDivergence", "one_hot", "DiceLoss", "SSC_PAIRS", "REDUCTIONS",
]
