"""Warping images by dense displacements. Conventions: :mod:`deepreglib.core.conventions`.

``warped(x) = image(x + u(x))`` with ``u`` in voxels of the image's grid, components ``(k, j, i)``.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .conventions import ALIGN_CORNERS

#: Interpolation names accepted by :func:`warp` (``"nearest"`` for label maps).
INTERPOLATIONS = ("linear", "nearest")
#: Padding names accepted by :func:`warp`: ``"zeros"`` is 0 outside the image's box, which (as in
#: ITK's resampling) reaches half a voxel beyond the first and last voxel centres, the edge value
#: being repeated in that rim; ``"border"`` repeats the edge voxel everywhere (right for
#: displacement fields, which should not fall to zero outside).
PADDINGS = ("zeros", "border", "reflection")


def identity_grid(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Voxel coordinates of every voxel, ``(1, 3, D, H, W)``, components ``(k, j, i)``."""
    axes = [torch.arange(s, dtype=dtype, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def voxel_to_normalized(points: torch.Tensor, shape) -> torch.Tensor:
    """``(N, 3, D, H, W)`` voxel coordinates ``(k, j, i)`` -> ``grid_sample`` grid ``(N, D, H, W, 3)``.

    grid_sample wants the last axis as ``(x, y, z)`` = ``(i, j, k)``, so the components are
    reversed here, and scaled so index 0 -> -1 and index n-1 -> +1 (``ALIGN_CORNERS = True``).
    """
    sizes = torch.as_tensor([max(s - 1, 1) for s in shape], dtype=points.dtype, device=points.device)
    norm = 2.0 * points / sizes.view(1, 3, 1, 1, 1) - 1.0
    return norm.permute(0, 2, 3, 4, 1).flip(-1)


def sample_at(image: torch.Tensor, points: torch.Tensor, interpolation: str = "linear",
              padding: str = "zeros") -> torch.Tensor:
    """Sample ``image`` ``(N, C, D, H, W)`` at voxel coordinates ``points`` ``(N, 3, d, h, w)``
    (components ``(k, j, i)`` of ``image``'s grid). Returns ``(N, C, d, h, w)``."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if image.ndim != 5 or points.ndim != 5 or points.shape[1] != 3:
        raise ValueError(f"expected image (N, C, D, H, W) and points (N, 3, d, h, w), got "
                         f"{tuple(image.shape)} and {tuple(points.shape)}")
    grid = voxel_to_normalized(points, image.shape[2:])
    if grid.shape[0] != image.shape[0]:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    return grid_sample(image, grid.to(image.dtype), interpolation, padding)


def grid_sample(image: torch.Tensor, grid: torch.Tensor, interpolation: str = "linear",
                padding: str = "zeros") -> torch.Tensor:
    """``F.grid_sample`` with the engine's ``ALIGN_CORNERS`` and padding names (:data:`PADDINGS`).

    ``grid`` is ``(N, d, h, w, 3)`` in normalised ``(x, y, z)`` order. For ``"zeros"`` the image
    is sampled with border padding and then zeroed outside ``[-0.5, n - 0.5]`` voxels per axis,
    so an image resampled onto its own grid keeps its edge voxels intact (torch's own zero
    padding would blend them with 0 over the outer half voxel, unlike ITK).
    """
    mode = "bilinear" if interpolation == "linear" else "nearest"
    if padding != "zeros":
        return _sample(image, grid, mode, padding)
    out = _sample(image, grid, mode, "border")
    # half a voxel in normalised units is 1 / (n - 1); grid's last axis is (x, y, z) = (W, H, D)
    sizes = image.shape[2:][::-1]
    limit = torch.as_tensor([1.0 + 1.0 / max(n - 1, 1) for n in sizes], dtype=grid.dtype, device=grid.device)
    inside = (grid.abs() <= limit).all(dim=-1).unsqueeze(1)
    return out * inside.to(out.dtype)


#: Fewest output voxels for which :func:`_sample` splits a single image's grid across threads.
SPLIT_MIN_VOXELS = 32768


def _sample(image: torch.Tensor, grid: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """``F.grid_sample``, using every CPU thread for a single image.

    On the CPU, torch's 3D grid sampler (forward and backward) runs its batch items in parallel
    and each item on one thread, so a batch of one image uses one core whatever
    ``torch.get_num_threads()`` says. Here the output grid of a lone image is cut along its
    depth into as many slabs as threads and sampled as a batch of slabs from the same image
    (an expanded view, no copy): every output value is computed exactly as before, on all the
    cores (``benchmarks/cpu_kernels.py``: 1.8x for a warp forward and backward at 96x112x112 on 2 cores)."""
    threads = torch.get_num_threads()
    n, d = grid.shape[0], grid.shape[1]
    if (image.device.type != "cpu" or n != 1 or threads < 2 or d < 2
            or grid[0, ..., 0].numel() < SPLIT_MIN_VOXELS):
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=ALIGN_CORNERS)
    parts = min(threads, d)
    per = -(-d // parts)  # ceil
    pad = per * parts - d
    g = grid if not pad else torch.cat([grid, grid[:, -1:].expand(1, pad, *grid.shape[2:])], dim=1)
    g = g.reshape(parts, per, *grid.shape[2:])
    out = F.grid_sample(image.expand(parts, *image.shape[1:]), g, mode=mode, padding_mode=padding,
                        align_corners=ALIGN_CORNERS)
    # (parts, C, per, h, w) -> (1, C, parts * per, h, w), the padding slices dropped
    out = out.transpose(0, 1).reshape(1, image.shape[1], parts * per, *out.shape[3:])
    return out[:, :, :d] if pad else out


def warp(image: torch.Tensor, displacement: torch.Tensor, interpolation: str = "linear",
         padding: str = "zeros") -> torch.Tensor:
    """Pull ``image`` through a displacement: ``warped(x) = image(x + u(x))``.

    Args:
        image: ``(N, C, D, H, W)``.
        displacement: ``(N or 1, 3, D, H, W)`` in voxels of the same grid, components ``(k, j, i)``.
        interpolation: ``"linear"`` (trilinear) or ``"nearest"`` (for label maps).
        padding: value outside the image, see :data:`PADDINGS`.
    Returns:
        ``(N, C, D, H, W)``.
    """
    if displacement.ndim != 5 or displacement.shape[1] != 3:
        raise ValueError(f"displacement must be (N, 3, D, H, W), got {tuple(displacement.shape)}")
    if image.ndim != 5 or tuple(image.shape[2:]) != tuple(displacement.shape[2:]):
        raise ValueError(f"image {tuple(image.shape)} and displacement {tuple(displacement.shape)} "
                         "must be 5D with the same spatial shape")
    points = identity_grid(displacement.shape[2:], displacement.dtype, displacement.device)
    return sample_at(image, points + displacement, interpolation, padding)


def _central_differences(image: torch.Tensor) -> torch.Tensor:
    """Spatial gradient of ``image`` ``(N, C, D, H, W)`` by central differences, edges replicated
    (half a difference at the edge voxels), in intensity per voxel: ``(N, 3 * C, D, H, W)``, the
    ``(k, j, i)`` derivatives of channel 0, then of channel 1, ... The same as
    :func:`deepreglib.core.jacobian.spatial_gradient` inside; not that one because
    ``torch.gradient`` takes 8x longer here (11.5 against 1.5 ms at 80x96x80 on 2 cores), once per
    optimiser step."""
    n, c = image.shape[:2]
    out = []
    for dim in (2, 3, 4):
        pad = [0] * 6
        pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = 1  # F.pad lists the last axis first
        padded = F.pad(image, pad, mode="replicate")
        size = image.shape[dim]
        out.append(0.5 * (padded.narrow(dim, 2, size) - padded.narrow(dim, 0, size)))
    return torch.stack(out, dim=2).reshape(n, 3 * c, *image.shape[2:])


class _WarpImageGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, displacement, padding):
        with torch.no_grad():
            warped = warp(image, displacement, "linear", padding)
        ctx.save_for_backward(warped)
        return warped

    @staticmethod
    def backward(ctx, grad):
        (warped,) = ctx.saved_tensors
        n, c = warped.shape[:2]
        slopes = _central_differences(warped).view(n, c, 3, *warped.shape[2:])
        grad_u = (grad.unsqueeze(2) * slopes).sum(dim=1)
        return None, grad_u, None


def warp_image_gradient(image: torch.Tensor, displacement: torch.Tensor,
                        padding: str = "border") -> torch.Tensor:
    """:func:`warp` (trilinear) whose gradient with respect to the displacement is that of the
    warped image's spatial gradient: ``d loss / d u(x) = d loss / d warped(x) * grad warped(x)``,
    by central differences, as ANTs' and greedy's metrics compute it, instead of differentiating
    the trilinear interpolation. It ignores the deformation's Jacobian
    (``grad (m o phi) = J^T (grad m) o phi``, near the identity for a smooth field), its slope does not
    jump at voxel centres, and the backward pass is a few elementwise operations instead of
    ``grid_sample``'s (the forward and backward of a warp in half the time on 2 cores). No
    gradient flows to ``image``. For optimising a field against a fixed image (the instance optimiser);
    networks use :func:`warp`."""
    if image.requires_grad:
        raise ValueError("warp_image_gradient gives no gradient to the image; use warp")
    if displacement.shape[0] != image.shape[0]:
        raise ValueError(f"displacement {tuple(displacement.shape)} and image {tuple(image.shape)} "
                         "must have the same batch size")
    return _WarpImageGradient.apply(image, displacement, padding)


class _SampleWithSlopes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, points):
        with torch.no_grad():
            out = _sample_points(table, points)
        ctx.save_for_backward(out[1:])
        return out[:1]

    @staticmethod
    def backward(ctx, grad):
        (slopes,) = ctx.saved_tensors
        return None, grad * slopes


def _sample_points(table: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``table`` ``(1, C, D, H, W)`` at ``points`` ``(3, P)`` (border padding): ``(C, P)``.
    torch's CPU grid sampler runs batch items in parallel and each on one thread, so the points
    are cut into one batch item per thread over one expanded (not copied) table. The sampling
    grid is written once in ``grid_sample``'s order (normalised ``x, y, z`` last), and the
    output of each item is a contiguous run of the points."""
    n = points.shape[1]
    c = table.shape[1]
    parts = max(1, min(torch.get_num_threads(), n // 4096)) if table.device.type == "cpu" else 1
    per = -(-n // parts)
    sizes = [max(int(s) - 1, 1) for s in table.shape[2:]]  # (D, H, W)
    grid = torch.empty(parts * per, 3, dtype=table.dtype, device=table.device)
    for axis in range(3):  # grid's last axis is (x, y, z) = (i, j, k)
        torch.mul(points[axis], 2.0 / sizes[axis], out=grid[:n, 2 - axis]).sub_(1.0)
    if parts * per > n:
        grid[n:] = grid[n - 1]
    out = F.grid_sample(table.expand(parts, *table.shape[1:]), grid.view(parts, 1, 1, per, 3),
                        mode="bilinear", padding_mode="border", align_corners=ALIGN_CORNERS)
    out = out.view(parts, c, per).transpose(0, 1).reshape(c, parts * per)
    return out[:, :n] if parts * per > n else out


def sample_with_slopes(table: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """An image sampled (trilinearly, border padding) at moving points, differentiable in the
    points through the image's own slopes: ``table`` ``(1, 4, D, H, W)`` holds the image and its
    ``(k, j, i)`` derivatives (e.g. :func:`image_with_slopes`), ``points`` ``(3, P)`` voxel
    coordinates. Returns ``(P,)``; ``d out / d points`` is the slopes sampled at the points. The
    sparse counterpart of :func:`warp_image_gradient` (the same gradient at a list of points
    instead of a whole grid): a step of an optimiser that scores a few hundred thousand points
    costs in proportion to them. Give the points in memory order (ascending linear index of
    their voxels): sampling then reads the volume almost in order, 4-5x faster than at the same
    points in random order (400 k points of a 1 mm brain)."""
    if table.ndim != 5 or table.shape[:2] != (1, 4) or points.ndim != 2 or points.shape[0] != 3:
        raise ValueError(f"expected table (1, 4, D, H, W) and points (3, P), got {tuple(table.shape)} "
                         f"and {tuple(points.shape)}")
    if table.requires_grad:
        raise ValueError("sample_with_slopes gives no gradient to the image")
    return _SampleWithSlopes.apply(table, points)[0]


def image_with_slopes(image: torch.Tensor) -> torch.Tensor:
    """``(1, 4, D, H, W)``: ``image`` ``(1, 1, D, H, W)`` and its central differences, the
    table of :func:`sample_with_slopes`."""
    return torch.cat([image, _central_differences(image)], dim=1).contiguous()


class PointInterpolation:
    """Trilinear interpolation of fields on a grid ``shape`` at fixed points ``(3, P)`` (voxel
    coordinates of that grid, clamped to it as border padding does), precomputed once as a sparse
    matrix: ``self(field)`` ``(1, C, D, H, W)`` -> ``(C, P)``, differentiable in the field (its
    backward is the transposed matrix). For an optimiser whose field is sampled at the same
    points every step: forward and backward 3-4x faster than ``grid_sample``'s on 2 cores,
    whose backward scatters on one thread."""

    def __init__(self, shape, points: torch.Tensor):
        shape = tuple(int(s) for s in shape)
        if points.ndim != 2 or points.shape[0] != 3:
            raise ValueError(f"points must be (3, P), got {tuple(points.shape)}")
        self.shape = shape
        n_points, n_voxels = points.shape[1], int(np.prod(shape))
        lo, frac = [], []
        for axis, n in enumerate(shape):
            x = points[axis].clamp(0, n - 1)
            base = x.floor().clamp(max=max(n - 2, 0))
            lo.append(base.long())
            frac.append(x - base if n > 1 else torch.zeros_like(x))
        strides = (shape[1] * shape[2], shape[2], 1)
        cols, weights = [], []
        for corner in range(8):
            offs = ((corner >> 2) & 1, (corner >> 1) & 1, corner & 1)
            cols.append(sum((lo[a] + min(offs[a], shape[a] - 1)) * strides[a] for a in range(3)))
            w = torch.ones_like(frac[0])
            for a in range(3):
                w = w * (frac[a] if offs[a] else 1.0 - frac[a])
            weights.append(w)
        # CSR built directly (no coalescing: 1.3 s at a million points): row p holds its 8
        # corners (a corner repeated at a grid of one voxel sums, as it should); the transpose
        # by one sort of the columns
        cols = torch.stack(cols, dim=1).reshape(-1)
        weights = torch.stack(weights, dim=1).reshape(-1)
        device = points.device
        crow = torch.arange(0, 8 * n_points + 1, 8, device=device)
        order = torch.argsort(cols.int() if n_voxels < 2 ** 31 else cols)  # int32 sorts 2x faster
        counts = torch.bincount(cols, minlength=n_voxels)
        t_crow = torch.cat([torch.zeros(1, dtype=torch.long, device=device), counts.cumsum(0)])
        with warnings.catch_warnings():  # torch calls CSR tensors beta; the product is stable
            warnings.simplefilter("ignore")
            self.matrix = torch.sparse_csr_tensor(crow, cols, weights, (n_points, n_voxels))
            self.transposed = torch.sparse_csr_tensor(t_crow, order // 8, weights[order], (n_voxels, n_points))

    def __call__(self, field: torch.Tensor) -> torch.Tensor:
        if field.ndim != 5 or field.shape[0] != 1 or tuple(field.shape[2:]) != self.shape:
            raise ValueError(f"field must be (1, C, {', '.join(map(str, self.shape))}), got "
                             f"{tuple(field.shape)}")
        return _Interpolate.apply(field, self)


class _Interpolate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, field, interp):
        ctx.interp, ctx.field_shape = interp, field.shape
        c = field.shape[1]
        return (interp.matrix @ field.detach().reshape(c, -1).t().contiguous()).t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        interp = ctx.interp
        g = interp.transposed @ grad.t().contiguous()
        return g.t().reshape(ctx.field_shape), None


class SpatialTransformer(nn.Module):
    """:func:`warp` as a module (no state: the reference grid is rebuilt per shape, not saved)."""

    def __init__(self, interpolation: str = "linear", padding: str = "zeros"):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")
        self.interpolation = interpolation
        self.padding = padding

    def forward(self, image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        return warp(image, displacement, self.interpolation, self.padding)
