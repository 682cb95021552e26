"""Stage ``to_fixed_grid``: the run's answer as one transform on the fixed grid.

The whole fixed -> moving map is ``phi(p) = A(p + u(p))`` (``A`` the 4x4 matrix of the initial
alignment and of a linear method, ``u`` the deformable method's field). This stage makes every
quantity the outputs need, each once (docs/CONVENTIONS.md):

* voxels -> mm, once: the network's voxel field becomes the physical field ``u_mm`` on the fixed
  grid (:func:`~deepreglib.core.resample.field_to_fixed_grid`), and the inverse likewise on the
  moving grid; files are written from these millimetre fields;
* mm -> voxels, once: ``phi - id`` becomes ``total_voxel`` on the fixed grid, for the Jacobian
  determinant and the QA picture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..core.fields import integrate_velocity, resize_field
from ..core.geometry import Grid, displacement_mm_to_voxel, displacement_voxel_to_mm, voxel_grid_points
from ..core.jacobian import jacobian_determinant
from ..core.resample import field_to_fixed_grid, physical_field, resample_to_grid
from ..core.warp import sample_at
from .infer import Inference
from .load import Inputs


@dataclass
class FixedGridResult:
    """Everything on the fixed grid (``(1, C, D, H, W)``), ``matrix`` the whole linear part ``A``.

    ``u_mm``: the deformable part, LPS mm (None for linear methods); ``total_mm``: ``phi(p) - p``,
    LPS mm, float64; ``total_voxel``: the same in fixed voxels, float64; ``inverse_mm``: ``phi^-1(q) -
    q`` on the moving grid when the method is diffeomorphic, else None."""

    matrix: np.ndarray
    u_mm: Optional[torch.Tensor]
    total_mm: torch.Tensor
    total_voxel: torch.Tensor
    warped: torch.Tensor
    before: torch.Tensor
    jacobian: torch.Tensor
    inverse_mm: Optional[torch.Tensor]


def to_fixed_grid(inputs: Inputs, initial: np.ndarray, inference: Inference, deformable: bool) -> FixedGridResult:
    result, net, fixed_grid = inference.result, inference.net, inputs.fixed_grid
    matrix = initial
    if result.matrix is not None:
        matrix = matrix @ np.asarray(result.matrix, dtype=np.float64)
    u_mm = None
    if result.displacement is not None:
        u_mm = field_to_fixed_grid(result.displacement.detach().cpu(), net, fixed_grid)
    total_mm = physical_field(matrix, u_mm, fixed_grid).double()  # phi(p) - p, (1, 3, D, H, W) mm
    total_voxel = displacement_mm_to_voxel(total_mm, fixed_grid)
    warped = resample_to_grid(inputs.moving, inputs.moving_grid, fixed_grid, matrix_lps=matrix, displacement_mm=u_mm)
    jac = jacobian_determinant(total_voxel.float())
    before = resample_to_grid(inputs.moving, inputs.moving_grid, fixed_grid)
    inverse_mm = None
    if result.velocity is not None and deformable:
        inverse_mm = inverse_on_moving_grid(result.velocity.detach().cpu(), net, inputs.moving_grid, matrix)
    return FixedGridResult(matrix, u_mm, total_mm, total_voxel, warped, before, jac, inverse_mm)


def inverse_on_moving_grid(velocity: torch.Tensor, net: Grid, moving_grid: Grid, matrix: np.ndarray) -> torch.Tensor:
    """Inverse of ``phi(p) = A(p + u(p))`` as a physical field on the moving grid:
    ``phi^-1(q) = y + u_inv(y)`` with ``y = A^-1 q`` and ``u_inv`` from the negated velocity."""
    with torch.no_grad():
        u_inv = integrate_velocity(-velocity.double())
        u_inv = resize_field(u_inv, net.shape)
        u_inv_mm = displacement_voxel_to_mm(u_inv, net)
        q = voxel_grid_points(moving_grid, torch.float64)
        inv = torch.as_tensor(np.linalg.inv(matrix), dtype=torch.float64)
        y = torch.einsum("pc,ncdhw->npdhw", inv[:3, :3], q) + inv[:3, 3].view(1, 3, 1, 1, 1)
        m = torch.as_tensor(net.physical_to_index_matrix, dtype=torch.float64)
        idx = torch.einsum("pc,ncdhw->npdhw", m[:3, :3], y) + m[:3, 3].view(1, 3, 1, 1, 1)
        u_at_y = sample_at(u_inv_mm, idx, "linear", "border")
        return (y + u_at_y - q).float()
