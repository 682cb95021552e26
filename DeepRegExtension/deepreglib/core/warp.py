"""Warping images by dense displacements. Conventions: :mod:`deepreglib.core.conventions`.

``warped(x) = image(x + u(x))`` with ``u`` in voxels of the image's grid, components ``(k, j, i)``.
"""
from __future__ import annotations

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
