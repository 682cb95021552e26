"""Sampling an image from one physical grid onto another. Conventions: :mod:`.conventions`.

This is the one place where an image on a *source* grid is pulled onto a *target* grid through a
physical transform. The transform follows ITK's resampling convention (DESIGN, "Direction"): it
maps a point of the target (fixed) space to the point of the source (moving) space it pulls from.

The composed transform is "deformable on the fixed grid, then the initial affine into moving
space": for a target voxel centre ``p`` (LPS mm)::

    q = A(p + u(p))          output(p) = source(q)

with ``A`` a 4x4 LPS matrix and ``u`` a displacement in LPS millimetres on the target grid. The
coordinate arithmetic is done in float64 (float32 on devices without it, e.g. MPS) because
physical positions of a few hundred mm lose sub-voxel precision in float32; only the final
normalised sampling grid is cast to the image's dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .conventions import ALIGN_CORNERS
from .geometry import Grid, displacement_mm_to_voxel, displacement_voxel_to_mm, voxel_grid_points
from .warp import INTERPOLATIONS, PADDINGS, grid_sample, identity_grid, sample_at

MatrixLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]]


def coordinate_dtype(device) -> torch.dtype:
    """float64 for coordinate math where the device has it (MPS does not)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _as_matrix(matrix: MatrixLike, dtype, device) -> torch.Tensor:
    m = torch.as_tensor(matrix) if not isinstance(matrix, torch.Tensor) else matrix
    if tuple(m.shape) != (4, 4):
        raise ValueError(f"matrix_lps must be 4x4, got {tuple(m.shape)}")
    return m.to(dtype=dtype, device=device)


def source_points(source: Grid, target: Grid, matrix_lps: Optional[MatrixLike] = None,
                  displacement_mm: Optional[torch.Tensor] = None, device="cpu",
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Continuous ``(k, j, i)`` indices of ``source`` that each target voxel centre pulls from.

    Args:
        source, target: the two grids.
        matrix_lps: 4x4 LPS map target point -> source point (numpy or torch; a torch tensor with
            ``requires_grad`` keeps autograd, which :mod:`deepreglib.classic.align` relies on). ``None``
            is the identity.
        displacement_mm: ``(N, 3, D', H', W')`` on ``target``, LPS millimetres ``(x, y, z)``.
        dtype: coordinate dtype; default :func:`coordinate_dtype` of ``device``.
    Returns:
        ``(N or 1, 3, D', H', W')`` indices ``(k, j, i)`` of ``A(p + u(p))`` in ``source``.
    """
    dtype = dtype or coordinate_dtype(device)
    to_index = torch.as_tensor(source.physical_to_index_matrix, dtype=dtype, device=device)
    m = to_index if matrix_lps is None else to_index @ _as_matrix(matrix_lps, dtype, device)
    if displacement_mm is None:
        m = m @ torch.as_tensor(target.index_to_physical_matrix, dtype=dtype, device=device)
        return _apply(m, identity_grid(target.shape, dtype=dtype, device=device))
    if displacement_mm.ndim != 5 or displacement_mm.shape[1] != 3:
        raise ValueError("displacement_mm must be (N, 3, D, H, W), got "
                         f"{tuple(displacement_mm.shape)}")
    if tuple(displacement_mm.shape[2:]) != target.shape:
        raise ValueError(f"displacement_mm spatial shape {tuple(displacement_mm.shape[2:])} "
                         f"does not match the target grid {target.shape}")
    pts = voxel_grid_points(target, dtype=dtype, device=device)  # (1, 3, D', H', W') LPS
    return _apply(m, pts + displacement_mm.to(dtype=dtype, device=device))


def _normalized_to_index(shape: Sequence[int]) -> np.ndarray:
    """4x4 from grid_sample's normalised ``(x, y, z)`` (``ALIGN_CORNERS``: -1 and +1 are the
    first and last voxel centres) to the index ``(k, j, i)`` of an array of ``shape``; note the
    reversed component order (x runs along W = i)."""
    m = np.zeros((4, 4))
    for row, size in enumerate(shape):  # row 0 = k (D axis) comes from column 2 = z
        half = max(int(size) - 1, 1) / 2.0
        m[row, 2 - row] = half
        m[row, 3] = half
    m[3, 3] = 1.0
    return m


def _normalized_theta(source: Grid, target: Grid, matrix_lps: Optional[MatrixLike],
                      device) -> torch.Tensor:
    """``(1, 3, 4)`` affine_grid theta: target normalised coords -> source normalised coords for
    ``q = A p``, composed in float64 (keeps autograd through a torch ``matrix_lps``)."""
    dtype = coordinate_dtype(device)
    to_norm = np.linalg.inv(_normalized_to_index(source.shape)) @ source.physical_to_index_matrix
    from_norm = target.index_to_physical_matrix @ _normalized_to_index(target.shape)
    m = torch.as_tensor(to_norm, dtype=dtype, device=device)
    if matrix_lps is not None:
        m = m @ _as_matrix(matrix_lps, dtype, device)
    m = m @ torch.as_tensor(from_norm, dtype=dtype, device=device)
    return m[:3].unsqueeze(0)


def _apply(m: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """A 4x4 homogeneous map applied to ``(N, 3, D, H, W)`` points (a batched matmul, which is
    much faster than the equivalent einsum for float64 on CPU)."""
    n, _, d, h, w = points.shape
    out = m[:3, :3] @ points.reshape(n, 3, -1) + m[:3, 3].view(1, 3, 1)
    return out.reshape(n, 3, d, h, w)


def resample_to_grid(image: torch.Tensor, source: Grid, target: Grid,
                     matrix_lps: Optional[MatrixLike] = None,
                     displacement_mm: Optional[torch.Tensor] = None,
                     interpolation: str = "linear", padding: str = "zeros") -> torch.Tensor:
    """Pull ``image`` from ``source`` onto ``target``: ``output(p) = image(A(p + u(p)))``.

    Args:
        image: ``(N, C, D, H, W)`` on ``source``.
        source: grid of ``image``.
        target: output grid ``(D', H', W')``.
        matrix_lps: 4x4 LPS map target point -> source point (ITK's resampling transform, the
            "initial affine into moving space"); ``None`` = identity.
        displacement_mm: ``(N or 1, 3, D', H', W')`` displacement on ``target`` in LPS mm,
            components ``(x, y, z)``, applied before the matrix.
        interpolation: ``"linear"`` or ``"nearest"`` (label maps).
        padding: ``"zeros"`` or ``"border"`` for points outside ``source``.
    Returns:
        ``(N, C, D', H', W')`` in ``image``'s dtype.
    """
    if image.ndim != 5:
        raise ValueError(f"image must be (N, C, D, H, W), got {tuple(image.shape)}")
    if tuple(image.shape[2:]) != source.shape:
        raise ValueError(f"image spatial shape {tuple(image.shape[2:])} does not match the source "
                         f"grid {source.shape}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if displacement_mm is not None and displacement_mm.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"displacement batch {displacement_mm.shape[0]} does not match image "
                         f"batch {image.shape[0]}")
    if displacement_mm is None:
        # Affine only: the whole map is one affine of grid_sample's normalised coordinates, so
        # affine_grid builds the sampling grid without per-voxel float64 arithmetic (about 10x
        # faster, which matters inside the affine optimiser's loop). Same numbers up to float32
        # rounding of normalised coordinates (~1e-5 voxel at 512 voxels).
        theta = _normalized_theta(source, target, matrix_lps, image.device)
        size = (image.shape[0], image.shape[1]) + target.shape
        grid = F.affine_grid(theta.to(image.dtype).expand(image.shape[0], 3, 4), size,
                             align_corners=ALIGN_CORNERS)
        return grid_sample(image, grid, interpolation, padding)
    pts = source_points(source, target, matrix_lps, displacement_mm, device=image.device)
    if pts.shape[0] != image.shape[0]:
        pts = pts.expand(image.shape[0], *pts.shape[1:])
    return sample_at(image, pts, interpolation, padding)


def physical_field(matrix_lps: Optional[MatrixLike], displacement_mm: Optional[torch.Tensor],
                   grid: Grid, dtype=torch.float32) -> torch.Tensor:
    """The single displacement of the composed map ``p -> A(p + u(p))``, for one ITK transform.

    Args:
        matrix_lps: 4x4 LPS matrix ``A`` (``None`` = identity).
        displacement_mm: ``(1, 3, D, H, W)`` LPS mm on ``grid`` (``None`` = zero).
        grid: the fixed grid the field lives on.
    Returns:
        ``(1, 3, D, H, W)`` LPS mm, components ``(x, y, z)``: ``A(p + u(p)) - p``. Written as an
        ITK displacement-field image it resamples exactly like ``resample_to_grid``.
    """
    if displacement_mm is not None and displacement_mm.shape[0] != 1:
        raise ValueError(f"displacement_mm must have batch 1, got {tuple(displacement_mm.shape)}")
    device = displacement_mm.device if displacement_mm is not None else "cpu"
    cdtype = coordinate_dtype(device)
    p = voxel_grid_points(grid, dtype=cdtype, device=device)
    q = p if displacement_mm is None else p + _checked(displacement_mm, grid).to(cdtype)
    if matrix_lps is not None:
        q = _apply(_as_matrix(matrix_lps, cdtype, device), q)
    return (q - p).to(dtype)


def affine_displacement(matrix_lps: MatrixLike, grid: Grid, displacement_mm: Optional[torch.Tensor] = None,
                        before: bool = True) -> torch.Tensor:
    """:func:`physical_field` for slabs, in float32 without float64 positions: the affine part
    ``(A - I) p + t`` is an affine function of the voxel index, composed in float64 and applied
    to the (exact) integer indices, so no large coordinate is ever rounded.

    Args:
        matrix_lps: 4x4 LPS matrix ``A``.
        grid: where the field lives (a grid or a slab of one, :func:`physical_field`'s ``grid``).
        displacement_mm: ``(1, 3, D, H, W)`` LPS mm on ``grid`` or None.
        before: True: ``A(p + u(p)) - p`` (the displacement applied before ``A``, as
            :func:`physical_field`); False: ``A p + u(p) - p`` (added after ``A``, e.g. an inverse
            field sampled at ``A p``).
    Returns ``(1, 3, D, H, W)`` float32 LPS mm.
    """
    a = np.asarray(matrix_lps.detach().cpu().numpy() if isinstance(matrix_lps, torch.Tensor) else matrix_lps,
                   dtype=np.float64)
    lin = a[:3, :3] - np.eye(3)
    to_mm = grid.index_to_physical_matrix
    coef = lin @ to_mm[:3, :3]  # (A - I) P: index -> mm
    const = lin @ to_mm[:3, 3] + a[:3, 3]
    u = None
    if displacement_mm is not None:
        u = _checked(displacement_mm, grid).float()
        if before and not np.array_equal(a[:3, :3], np.eye(3)):
            m = np.eye(4)
            m[:3, :3] = a[:3, :3]
            u = _apply(torch.as_tensor(m, dtype=torch.float32), u)
    if not coef.any() and not const.any():
        return u.clone() if u is not None else torch.zeros((1, 3) + grid.shape, dtype=torch.float32)
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = coef, const
    out = _apply(torch.as_tensor(m, dtype=torch.float32), identity_grid(grid.shape, torch.float32))
    return out if u is None else out.add_(u)


def _separable_linear(field: torch.Tensor, coords) -> torch.Tensor:
    """Trilinear sampling with border padding when each target axis maps to one source axis
    (index ``coords[a]`` along axis ``a``, e.g. a network grid sharing the fixed grid's
    direction): three 1D interpolations, ~4x faster than ``grid_sample`` and the same numbers
    up to float rounding."""
    out = field
    for axis, c in enumerate(coords):
        n = out.shape[2 + axis]
        x = torch.as_tensor(np.clip(c, 0, n - 1), dtype=torch.float64)
        i0 = x.floor().long().clamp(0, max(n - 2, 0))
        t = (x - i0).to(field.dtype)
        a = out.index_select(2 + axis, i0)
        if n == 1:
            out = a
            continue
        b = out.index_select(2 + axis, i0 + 1)
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = -1
        out = torch.lerp(a, b, t.view(view))
    return out


def sample_physical_field(field_mm: torch.Tensor, source: Grid, target: Grid,
                          matrix_lps: Optional[MatrixLike] = None) -> torch.Tensor:
    """A physical field on ``source`` read at the points ``A p`` of ``target``'s voxel centres
    (trilinear; outside ``source`` it continues the border value).

    Args:
        field_mm: ``(1, C, d, h, w)`` on ``source`` (e.g. a displacement in LPS mm).
        target: the grid to read it on (a fixed grid, or a slab of it).
        matrix_lps: 4x4 LPS map applied to the target points first (None: identity).
    Returns ``(1, C, D, H, W)`` in ``field_mm``'s dtype. One ``affine_grid`` (no per-voxel
    float64 index arithmetic): the same numbers as :func:`field_to_fixed_grid` up to float32
    rounding of the normalised coordinates.
    """
    if field_mm.ndim != 5 or tuple(field_mm.shape[2:]) != source.shape:
        raise ValueError(f"field must be (1, C, {', '.join(map(str, source.shape))}), got "
                         f"{tuple(field_mm.shape)}")
    if matrix_lps is None:
        m = source.physical_to_index_matrix @ target.index_to_physical_matrix
        if np.allclose(m[:3, :3] - np.diag(np.diag(m[:3, :3])), 0.0, atol=1e-9):
            return _separable_linear(field_mm, [np.diag(m)[a] * np.arange(n) + m[a, 3]
                                                for a, n in enumerate(target.shape)])
    theta = _normalized_theta(source, target, matrix_lps, field_mm.device)
    size = (1, field_mm.shape[1]) + target.shape
    grid = F.affine_grid(theta.to(field_mm.dtype), size, align_corners=ALIGN_CORNERS)
    return grid_sample(field_mm, grid, "linear", "border")


def _checked(u: torch.Tensor, grid: Grid) -> torch.Tensor:
    if u.ndim != 5 or u.shape[1] != 3 or tuple(u.shape[2:]) != grid.shape:
        raise ValueError(f"displacement must be (1, 3, {', '.join(map(str, grid.shape))}), got "
                         f"{tuple(u.shape)}")
    return u


# -- pyramids ----------------------------------------------------------------------------------
def downsampled_shape(shape: Sequence[int], factor: float) -> Tuple[int, int, int]:
    """Shape of a pyramid level: the first-to-last voxel-centre span divided by ``factor``
    (``ALIGN_CORNERS``), at least 2 voxels per axis. ``factor = 1`` keeps the shape."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    return tuple(int(s) if factor == 1 else max(2, int(round((s - 1) / factor)) + 1)
                 for s in shape)


def gaussian_blur(image: torch.Tensor, sigma_vox: Union[float, Sequence[float]]) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(N, C, D, H, W)``; ``sigma_vox`` in voxels, one value or
    one per axis ``(d, h, w)``. Edges are replicated so the border does not darken."""
    if image.ndim != 5:
        raise ValueError(f"image must be (N, C, D, H, W), got {tuple(image.shape)}")
    sigmas = [float(sigma_vox)] * 3 if np.isscalar(sigma_vox) else [float(s) for s in sigma_vox]
    out = image
    c = image.shape[1]
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        radius = max(1, int(math.ceil(3 * sigma)))
        radius = min(radius, image.shape[2 + axis] - 1)
        if radius < 1:
            continue
        x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
        k = torch.exp(-0.5 * (x / sigma) ** 2)
        k = (k / k.sum()).repeat(c, 1, 1, 1, 1)  # (C, 1, K, 1, 1) grouped per channel
        view = [1, 1, 1]
        view[axis] = 2 * radius + 1
        k = k.view(c, 1, *view)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k, groups=c)
    return out


def downsample(image: torch.Tensor, grid: Grid, factor: float) -> Tuple[torch.Tensor, Grid]:
    """One pyramid level: blur (sigma = factor / 2 voxels, against aliasing) and resample onto
    ``grid.resized(downsampled_shape(...))``, which keeps the first and last voxel centres.

    Returns ``(image (N, C, d, h, w), level_grid)``.
    """
    if tuple(image.shape[2:]) != grid.shape:
        raise ValueError(f"image spatial shape {tuple(image.shape[2:])} does not match grid "
                         f"{grid.shape}")
    shape = downsampled_shape(grid.shape, factor)
    if shape == grid.shape:
        return image, grid
    smooth = gaussian_blur(image, 0.5 * factor)
    out = F.interpolate(smooth, size=shape, mode="trilinear", align_corners=ALIGN_CORNERS)
    return out, grid.resized(shape)


def field_to_fixed_grid(u_net: torch.Tensor, net: Grid, fixed: Grid) -> torch.Tensor:
    """A voxel DDF on the network grid -> the same deformation as a physical field on ``fixed``.

    Args:
        u_net: ``(1, 3, d, h, w)`` voxels of ``net``, components ``(k, j, i)``.
    Returns:
        ``(1, 3, D, H, W)`` LPS millimetres ``(x, y, z)`` at every fixed voxel centre (the field
        is sampled trilinearly; outside the network grid it continues the border value).
    """
    u_mm = displacement_voxel_to_mm(u_net.float(), net)
    # fixed voxel index -> network voxel index is one affine map (float32 is ample: indices < 1e3)
    m = torch.as_tensor(net.physical_to_index_matrix @ fixed.index_to_physical_matrix, dtype=torch.float32)
    idx = identity_grid(fixed.shape, torch.float32)
    idx = torch.einsum("pc,ncdhw->npdhw", m[:3, :3], idx) + m[:3, 3].view(1, 3, 1, 1, 1)
    return sample_at(u_mm, idx, "linear", "border")


def field_to_network_grid(u_mm: torch.Tensor, fixed: Grid, net: Grid) -> torch.Tensor:
    """Inverse of :func:`field_to_fixed_grid` (up to interpolation): a physical field on
    ``fixed`` -> a voxel DDF on ``net`` (used to start refinement from a given field)."""
    points = voxel_grid_points(net, torch.float64)
    m = torch.as_tensor(fixed.physical_to_index_matrix, dtype=torch.float64)
    idx = torch.einsum("pc,ncdhw->npdhw", m[:3, :3], points) + m[:3, 3].view(1, 3, 1, 1, 1)
    u = sample_at(u_mm.double(), idx, "linear", "border")
    return displacement_mm_to_voxel(u, net).float()
