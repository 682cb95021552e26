"""Stage ``to_fixed_grid``: the run's answer as one transform on the fixed grid, evaluated slab
by slab so that memory does not grow with the scan.

The whole fixed -> moving map is ``phi(p) = A(p + u(p))`` (``A`` the 4x4 matrix of the initial
alignment and of a linear method, ``u`` the deformable method's field). The stage itself keeps
only what is small: ``A`` and the method's field on its network grid, converted to millimetres
once (docs/CONVENTIONS.md, "voxels -> mm"). Every full-resolution quantity is made from these
for one slab of the fixed grid at a time (:meth:`FixedGridResult.slab`: consecutive slices of
its slowest axis ``k``), used (written, scored, sampled for the QA picture) and dropped:

* ``u_mm`` / ``total_mm = phi(p) - p``: LPS mm, float32 (what the displacement file holds);
* ``warped`` and ``before`` (the moving image through ``phi`` and through the identity);
* the Jacobian determinant, from the slab and a one-slice halo on each side (central
  differences need the neighbours), equal to the whole-volume computation;
* the inverse field, slab by slab of the moving grid (:meth:`FixedGridResult.inverse_slabs`).

A 512x512x300 CT then needs a few hundred MB beyond its inputs instead of ~17 GB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..core.fields import integrate_velocity, resize_field
from ..core.geometry import Grid, displacement_voxel_to_mm
from ..core.jacobian import jacobian_determinant
from ..core.conventions import ALIGN_CORNERS
from ..core.resample import (_normalized_theta, _normalized_to_index, affine_displacement, resample_to_grid,
                             sample_physical_field)
from ..core.warp import grid_sample
from .infer import Inference
from .load import Inputs

#: Voxels per slab: bounds the working memory of a slab (a few float32/float64 copies of a
#: 3-component field: ~0.3 GB) whatever the scan's size.
SLAB_VOXELS = 4_000_000


@dataclass
class Slab:
    """Slices ``k0:k1`` of the fixed grid (``grid``: that part of it), each ``(1, C, n, H, W)``
    float32. ``u_mm``: the deformable part (None for linear methods); ``total_mm``: ``phi(p) -
    p`` in LPS mm; ``total_voxel``: the same in fixed voxels (k, j, i)."""

    k0: int
    k1: int
    grid: Grid
    u_mm: Optional[torch.Tensor]
    total_mm: torch.Tensor
    total_voxel: torch.Tensor
    warped: torch.Tensor
    before: torch.Tensor
    jacobian: torch.Tensor


@dataclass
class FixedGridResult:
    """The run's answer, small: ``matrix`` the whole linear part ``A``; ``u_net_mm`` the
    deformable part on the network grid ``net`` (``(1, 3, d, h, w)`` LPS mm, float32; None for
    linear methods); ``inverse_net_mm`` the displacement of the inverse deformation there (when
    the method is diffeomorphic, else None). Full-resolution outputs: :meth:`slab` and
    :meth:`inverse_slabs`."""

    matrix: np.ndarray
    fixed_grid: Grid
    moving_grid: Grid
    net: Grid
    moving: torch.Tensor
    u_net_mm: Optional[torch.Tensor]
    inverse_net_mm: Optional[torch.Tensor]

    @property
    def has_field(self) -> bool:
        return self.u_net_mm is not None

    def slab_bounds(self, grid: Optional[Grid] = None, voxels: Optional[int] = None) -> Iterator[Tuple[int, int]]:
        """``(k0, k1)`` of consecutive slabs covering ``grid`` (default the fixed grid), of about
        ``voxels`` (default :data:`SLAB_VOXELS`) voxels each."""
        d, h, w = (grid or self.fixed_grid).shape
        n = max(2, (voxels or SLAB_VOXELS) // max(1, h * w))
        for k0 in range(0, d, n):
            yield k0, min(d, k0 + n)

    def u_mm(self, grid: Grid) -> Optional[torch.Tensor]:
        """The deformable part on ``grid`` (the fixed grid or a slab of it), LPS mm."""
        if self.u_net_mm is None:
            return None
        return sample_physical_field(self.u_net_mm, self.net, grid)

    def slab(self, k0: int, k1: int) -> Slab:
        """Every fixed-grid quantity of slices ``k0:k1`` (see the module docstring)."""
        fixed = self.fixed_grid
        h0, h1 = max(0, k0 - 1), min(fixed.shape[0], k1 + 1)  # one-slice halo for the Jacobian
        halo = rows_of(fixed, h0, h1)
        inner = slice(k0 - h0, k0 - h0 + (k1 - k0))
        grid = rows_of(fixed, k0, k1)
        u_halo = self.u_mm(halo)
        u_mm = None if u_halo is None else u_halo[:, :, inner].contiguous()
        total_mm = affine_displacement(self.matrix, grid, u_mm)
        to_voxel = torch.as_tensor(np.linalg.inv(fixed.index_to_physical_matrix[:3, :3]), dtype=torch.float32)
        total_voxel = _apply3(to_voxel, total_mm)
        jac = _jacobian(self.matrix, fixed, u_halo, h1 - h0)[:, :, inner]
        warped = warp_moving(self.moving, self.moving_grid, grid, self.matrix, u_mm)
        before = resample_to_grid(self.moving, self.moving_grid, grid)
        return Slab(k0, k1, grid, u_mm, total_mm, total_voxel, warped, before, jac.contiguous())

    def slabs(self) -> Iterator[Slab]:
        for k0, k1 in self.slab_bounds():
            yield self.slab(k0, k1)

    def inverse_slabs(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """``(k0, k1, inverse_mm)`` over the moving grid: ``phi^-1(q) - q``, ``(1, 3, n, H, W)``
        LPS mm float32 (requires :attr:`inverse_net_mm`)."""
        inv = np.linalg.inv(self.matrix)
        for k0, k1 in self.slab_bounds(self.moving_grid):
            grid = rows_of(self.moving_grid, k0, k1)
            yield k0, k1, inverse_on(grid, self.inverse_net_mm, self.net, inv)

    def resample_on_fixed(self, volume: torch.Tensor, source: Grid, grid: Grid, interpolation="linear",
                          through_transform=True) -> torch.Tensor:
        """``volume`` (on ``source``) on ``grid`` (a slab of the fixed grid), through ``phi`` or
        through the identity."""
        if not through_transform:
            return resample_to_grid(volume, source, grid, interpolation=interpolation)
        return resample_to_grid(volume, source, grid, matrix_lps=self.matrix, displacement_mm=self.u_mm(grid),
                                interpolation=interpolation)


def warp_moving(moving: torch.Tensor, moving_grid: Grid, grid: Grid, matrix: np.ndarray,
                u_mm: Optional[torch.Tensor]) -> torch.Tensor:
    """``moving(A(p + u(p)))`` on ``grid`` (linear, zero outside): :func:`resample_to_grid` with
    the sampling grid built in float32 as ``affine_grid`` of ``A`` plus the linear image of
    ``u`` (``A(p + u) = A p + A_3 u``), instead of float64 positions per voxel; the same numbers
    up to float32 rounding of normalised coordinates (~1e-5 voxel)."""
    if u_mm is None:
        return resample_to_grid(moving, moving_grid, grid, matrix_lps=matrix)
    theta = _normalized_theta(moving_grid, grid, matrix, "cpu")
    base = F.affine_grid(theta.float(), (1, 1) + grid.shape, align_corners=ALIGN_CORNERS)  # (1, n, H, W, 3)
    to_norm = np.linalg.inv(_normalized_to_index(moving_grid.shape)) @ moving_grid.physical_to_index_matrix
    lin = torch.as_tensor(to_norm[:3, :3] @ np.asarray(matrix)[:3, :3], dtype=torch.float32)  # mm -> normalised
    n, _, d, h, w = u_mm.shape
    shift = (lin @ u_mm.float().reshape(n, 3, -1)).reshape(n, 3, d, h, w).permute(0, 2, 3, 4, 1)
    return grid_sample(moving, base.add_(shift), "linear", "zeros")


def to_fixed_grid(inputs: Inputs, initial: np.ndarray, inference: Inference, deformable: bool) -> FixedGridResult:
    result, net = inference.result, inference.net
    matrix = initial
    if result.matrix is not None:
        matrix = matrix @ np.asarray(result.matrix, dtype=np.float64)
    u_net_mm = None
    if result.displacement is not None:  # voxels -> mm, once, on the (small) network grid
        u_net_mm = displacement_voxel_to_mm(result.displacement.detach().cpu().float(), net)
    inverse_net_mm = None
    if result.velocity is not None and deformable:
        inverse_net_mm = inverse_net_field(result.velocity.detach().cpu(), net)
    return FixedGridResult(np.asarray(matrix, dtype=np.float64), inputs.fixed_grid, inputs.moving_grid, net,
                           inputs.moving, u_net_mm, inverse_net_mm)


def rows_of(grid: Grid, k0: int, k1: int) -> Grid:
    """Slices ``k0:k1`` of ``grid`` (the slowest axis) as a grid of their own."""
    if k0 == 0 and k1 == grid.shape[0]:
        return grid
    origin = grid.index_to_physical(np.array([float(k0), 0.0, 0.0]))
    return Grid((k1 - k0,) + tuple(grid.shape[1:]), grid.spacing, tuple(float(v) for v in origin), grid.direction)


def _apply3(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A 3x3 matrix applied to ``(1, 3, D, H, W)`` vectors."""
    n, _, d, h, w = v.shape
    return (m.to(v.dtype) @ v.reshape(n, 3, -1)).reshape(n, 3, d, h, w)


def _jacobian(matrix: np.ndarray, fixed: Grid, u_mm: Optional[torch.Tensor], rows: int) -> torch.Tensor:
    """det J of ``phi`` on ``rows`` slices of the fixed grid from ``u_mm`` on them.

    ``phi - id`` in fixed voxels is ``Ab (x + u_vox(x)) + c - x`` with ``Ab`` the linear part of
    ``A`` in fixed voxels, so (finite differences being exact on the linear part)
    ``I + grad(phi - id) = Ab (I + grad u_vox)`` and ``det J = det(A) det(I + grad u_vox)``:
    the same determinant as from the total field, without building it."""
    det_a = float(np.linalg.det(matrix[:3, :3]))
    if u_mm is None:
        h, w = fixed.shape[1:]
        return torch.full((1, 1, rows, h, w), det_a, dtype=torch.float32)
    to_voxel = torch.as_tensor(np.linalg.inv(fixed.index_to_physical_matrix[:3, :3]), dtype=torch.float32)
    jac = jacobian_determinant(_apply3(to_voxel, u_mm))
    return jac if det_a == 1.0 else jac * det_a


def inverse_net_field(velocity: torch.Tensor, net: Grid) -> torch.Tensor:
    """Displacement of ``exp(-v)`` on the network grid, LPS mm float32: the inverse of the
    deformable part, integrated from the negated velocity (once)."""
    with torch.no_grad():
        u_inv = integrate_velocity(-velocity.double())
        u_inv = resize_field(u_inv, net.shape)
        return displacement_voxel_to_mm(u_inv, net).float()


def inverse_on(grid: Grid, inverse_net_mm: torch.Tensor, net: Grid, inv: np.ndarray) -> torch.Tensor:
    """Inverse of ``phi(p) = A(p + u(p))`` as a physical field on ``grid`` (the moving grid or a
    slab of it): ``phi^-1(q) = y + u_inv(y)`` with ``y = A^-1 q``, ``u_inv`` sampled at ``y``
    (border padding). Returns ``phi^-1(q) - q``, ``(1, 3, D, H, W)`` LPS mm float32."""
    with torch.no_grad():
        u_at_y = sample_physical_field(inverse_net_mm, net, grid, matrix_lps=inv)
        return affine_displacement(inv, grid, u_at_y, before=False)

