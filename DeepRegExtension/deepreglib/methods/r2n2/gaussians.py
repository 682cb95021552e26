"""R2N2's transformation model: a displacement that is a sum of local Gaussian deformations.

Conventions: :mod:`deepreglib.core.conventions`. One local deformation (Sandkuehler et al., NeurIPS
2019, extended to 3D) is::

    l(x) = v * exp(-1/2 (x - c)^T Sigma^-1 (x - c)),    Sigma = R diag(s) R^T

with every quantity in *normalised coordinates*:

* a voxel index ``(k, j, i)`` of a grid of shape ``(D, H, W)`` has normalised coordinate
  ``x_a = 2 idx_a / (n_a - 1) - 1`` per axis ``a`` (first voxel centre -1, last +1: the same
  cube as ``ALIGN_CORNERS = True``), components kept in the engine's tensor order ``(k, j, i)``
  (not grid_sample's reversed ``(x, y, z)``);
* ``c`` (3,) the centre, ``R`` (3, 3) a rotation whose columns are the Gaussian's principal
  axes, ``s`` (3,) the variances along those axes (normalised units squared), ``v`` (3,) the
  displacement at the centre (normalised units, each component in [-1, 1]).

A normalised displacement ``v_a`` is ``v_a (n_a - 1) / 2`` voxels along axis ``a``, which is how
:func:`local_deformation` returns the engine's voxel displacement ``(N, 3, D, H, W)``, components
``(k, j, i)``, ``warped(x) = moving(x + u(x))``. Because each axis is scaled by its own size, a
Gaussian that is round in normalised coordinates is elongated along the longer axes of a
non-cubic grid; that is the paper's model and is kept. Physical (LPS mm) descriptions are made
at the output boundary (:mod:`deepreglib.methods.r2n2.outputs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ...core.warp import identity_grid

#: Added to every variance so a width whose sigmoid underflows to 0 cannot divide by zero
#: (1e-6 normalised units squared is a thousandth of a voxel's width on a 64-voxel axis).
WIDTH_FLOOR = 1e-6
#: Numbers per local deformation the network emits: 6 (rotation, 6D) + 3 (widths) + 3 (weight).
RAW_PARAMETERS = 12
#: Degrees of freedom of one local deformation: centre 3, rotation 3, widths 3, weight 3.
DOF_PER_DEFORMATION = 12


def _check_shape(shape: Sequence[int]) -> Tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"a grid shape (D, H, W) with at least 2 voxels per axis is needed, got {shape}")
    return shape


# -- normalised <-> voxel ------------------------------------------------------------------------
def voxel_scale(shape: Sequence[int], dtype=torch.float32, device="cpu") -> torch.Tensor:
    """``(3,)`` voxels per normalised unit along ``(k, j, i)``: ``(n_a - 1) / 2``."""
    shape = _check_shape(shape)
    return torch.tensor([(n - 1) / 2.0 for n in shape], dtype=dtype, device=device)


def normalized_grid(shape: Sequence[int], dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Normalised coordinate of every voxel centre, ``(1, 3, D, H, W)``, components ``(k, j, i)``,
    each in [-1, 1]."""
    scale = voxel_scale(shape, dtype, device).view(1, 3, 1, 1, 1)
    return identity_grid(_check_shape(shape), dtype, device) / scale - 1.0


def normalized_to_index(points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(..., 3)`` normalised coordinates ``(k, j, i)`` -> continuous voxel indices ``(k, j, i)``."""
    scale = voxel_scale(shape, points.dtype, points.device)
    return (points + 1.0) * scale


def index_to_normalized(index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`normalized_to_index`."""
    scale = voxel_scale(shape, index.dtype, index.device)
    return index / scale - 1.0


def normalized_to_voxel_displacement(u_norm: torch.Tensor) -> torch.Tensor:
    """``(N, 3, D, H, W)`` displacement in normalised units of its own grid -> voxels."""
    if u_norm.ndim != 5 or u_norm.shape[1] != 3:
        raise ValueError(f"expected (N, 3, D, H, W), got {tuple(u_norm.shape)}")
    scale = voxel_scale(u_norm.shape[2:], u_norm.dtype, u_norm.device)
    return u_norm * scale.view(1, 3, 1, 1, 1)


# -- shape of one Gaussian ---------------------------------------------------------------------
def rotation_from_6d(a: torch.Tensor) -> torch.Tensor:
    """Continuous 6D rotation representation (Zhou et al., CVPR 2019) -> rotation matrix.

    ``a`` is ``(..., 6)``: two 3-vectors ``a1 = a[..., :3]``, ``a2 = a[..., 3:]``, made orthonormal
    by Gram-Schmidt; the third column is their cross product, so the result is a proper rotation
    (det +1). Returns ``(..., 3, 3)`` with the three axes as *columns*. ``a1`` must be non-zero
    and ``a2`` not parallel to it; the norms are floored at 1e-8 (no data-dependent check, which
    would stall the GPU every step), so a degenerate input gives a finite but meaningless matrix.
    """
    if a.shape[-1] != 6:
        raise ValueError(f"expected (..., 6), got {tuple(a.shape)}")
    a1, a2 = a[..., :3], a[..., 3:]
    b1 = a1 / a1.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    a2 = a2 - (b1 * a2).sum(-1, keepdim=True) * b1
    b2 = a2 / a2.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def covariance(rotation: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """``Sigma = R diag(s) R^T``: ``(..., 3, 3)`` from ``rotation`` ``(..., 3, 3)`` (axes as columns)
    and ``widths`` ``(..., 3)`` (variances along the axes, > 0). Symmetric positive definite."""
    if rotation.shape[-2:] != (3, 3) or widths.shape[-1] != 3:
        raise ValueError(f"expected rotation (..., 3, 3) and widths (..., 3), got "
                         f"{tuple(rotation.shape)} and {tuple(widths.shape)}")
    return rotation @ torch.diag_embed(widths) @ rotation.transpose(-1, -2)


def widths_from_logits(logits: torch.Tensor, s_max: float, s_min: float = 0.0) -> torch.Tensor:
    """``s = s_min + sigmoid(logits) * (s_max - s_min)`` (+ :data:`WIDTH_FLOOR`): variances in
    ``(s_min, s_max]``; ``s_min = 0`` is the paper's ``sigmoid(.) * s_max``."""
    return s_min + torch.sigmoid(logits) * (s_max - s_min) + WIDTH_FLOOR


# -- the deformation field -------------------------------------------------------------------------
@dataclass
class GaussianParameters:
    """A sequence of local deformations, all in normalised coordinates ``(k, j, i)``.

    Attributes:
        centres: ``(N, T, 3)`` in [-1, 1].
        rotations: ``(N, T, 3, 3)``, principal axes as columns (det +1).
        widths: ``(N, T, 3)`` variances along those axes, in ``(0, s_max]`` (normalised units^2).
        weights: ``(N, T, 3)`` displacement at the centre, in [-1, 1] (normalised units).
    """

    centres: torch.Tensor
    rotations: torch.Tensor
    widths: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self):
        n, t = self.centres.shape[:2]
        expected = {"centres": (n, t, 3), "rotations": (n, t, 3, 3), "widths": (n, t, 3),
                    "weights": (n, t, 3)}
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} must be {shape}, got {got}")

    @property
    def steps(self) -> int:
        return int(self.centres.shape[1])

    def covariances(self) -> torch.Tensor:
        """``(N, T, 3, 3)``."""
        return covariance(self.rotations, self.widths)

    def truncated(self, steps: int) -> "GaussianParameters":
        """The first ``steps`` deformations."""
        return GaussianParameters(self.centres[:, :steps], self.rotations[:, :steps],
                                  self.widths[:, :steps], self.weights[:, :steps])

    def detach(self) -> "GaussianParameters":
        return GaussianParameters(self.centres.detach(), self.rotations.detach(),
                                  self.widths.detach(), self.weights.detach())

    def field(self, shape: Sequence[int], steps: Optional[int] = None) -> torch.Tensor:
        """Voxel displacement of the sum of the first ``steps`` (default all) deformations,
        ``(N, 3, D, H, W)``, i.e. the cumulative field ``f_steps``."""
        steps = self.steps if steps is None else int(steps)
        if not 0 <= steps <= self.steps:
            raise ValueError(f"steps must be in [0, {self.steps}], got {steps}")
        n = self.centres.shape[0]
        total = self.centres.new_zeros((n, 3) + _check_shape(shape))
        for t in range(steps):
            total = total + local_deformation(self.centres[:, t], self.rotations[:, t],
                                              self.widths[:, t], self.weights[:, t], shape)
        return total


def local_deformation(centre: torch.Tensor, rotation: torch.Tensor, widths: torch.Tensor,
                      weight: torch.Tensor, shape: Sequence[int],
                      grid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One local Gaussian deformation evaluated at every voxel centre.

    Args:
        centre: ``(N, 3)`` normalised ``(k, j, i)``.
        rotation: ``(N, 3, 3)`` axes as columns.
        widths: ``(N, 3)`` variances (> 0) along the axes, normalised units squared.
        weight: ``(N, 3)`` normalised displacement at the centre.
        shape: ``(D, H, W)`` of the grid.
        grid: optional precomputed :func:`normalized_grid` ``(1, 3, D, H, W)`` (saves rebuilding it
            every step).
    Returns:
        ``(N, 3, D, H, W)`` displacement in *voxels*, components ``(k, j, i)``.
    """
    shape = _check_shape(shape)
    n = centre.shape[0]
    if (centre.shape != (n, 3) or rotation.shape != (n, 3, 3) or widths.shape != (n, 3)
            or weight.shape != (n, 3)):
        raise ValueError(f"expected centre (N, 3), rotation (N, 3, 3), widths (N, 3), weight (N, 3); "
                         f"got {tuple(centre.shape)}, {tuple(rotation.shape)}, {tuple(widths.shape)}, "
                         f"{tuple(weight.shape)}")
    if grid is None:
        grid = normalized_grid(shape, centre.dtype, centre.device)
    d = grid - centre.view(n, 3, 1, 1, 1)  # (N, 3, D, H, W)
    # (x - c)^T R diag(1/s) R^T (x - c) = sum_a (R^T (x - c))_a^2 / s_a
    along_axes = torch.einsum("nca,ncdhw->nadhw", rotation, d)
    mahalanobis = (along_axes * along_axes / widths.view(n, 3, 1, 1, 1)).sum(1, keepdim=True)
    u_norm = weight.view(n, 3, 1, 1, 1) * torch.exp(-0.5 * mahalanobis)
    return u_norm * voxel_scale(shape, u_norm.dtype, u_norm.device).view(1, 3, 1, 1, 1)


# -- compactness -----------------------------------------------------------------------------------
def transformation_parameter_count(steps: int) -> int:
    """Degrees of freedom describing R2N2's final transformation after ``steps`` deformations
    (12 each: centre, rotation, widths, weight)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return DOF_PER_DEFORMATION * int(steps)


def bspline_parameter_count(mesh_size: Sequence[int], order: int = 3) -> int:
    """Coefficients of a 3D B-spline displacement on a control grid of ``mesh_size`` cells per
    axis: ``(m + order)`` control points per axis, 3 components each. Equals
    ``sitk.BSplineTransformInitializer(image, mesh_size, order).GetNumberOfParameters()``."""
    mesh = [int(m) for m in mesh_size]
    if len(mesh) != 3 or min(mesh) < 1 or order < 0:
        raise ValueError(f"mesh_size must be 3 positive integers and order >= 0, got {mesh_size}, {order}")
    return 3 * int(np.prod([m + order for m in mesh]))


def bspline_mesh_for_spacing(extent_mm: Sequence[float], spacing_mm: float) -> Tuple[int, int, int]:
    """Mesh size (cells per axis, ``(x, y, z)``) of a B-spline grid with control points about
    ``spacing_mm`` apart over an image of physical ``extent_mm`` ``(x, y, z)``."""
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
    return tuple(max(1, int(round(float(e) / spacing_mm))) for e in extent_mm)


def compactness(steps: int, mesh_size: Sequence[int], order: int = 3) -> dict:
    """R2N2's parameter count against a B-spline grid (the paper's compactness measure); the
    B-spline mesh is the one found to reach equal accuracy (chosen by the benchmark)."""
    r2n2 = transformation_parameter_count(steps)
    bspline = bspline_parameter_count(mesh_size, order)
    return {"r2n2_parameters": r2n2, "bspline_parameters": bspline,
            "bspline_mesh_size": [int(m) for m in mesh_size], "bspline_order": int(order),
            "ratio": (bspline / r2n2) if r2n2 else float("inf")}


def random_local_deformations(shape: Sequence[int], count: int, generator: torch.Generator,
                              max_weight_voxels: float = 4.0, width_range: Tuple[float, float] = (0.01, 0.06)
                              ) -> torch.Tensor:
    """A sum of ``count`` random local Gaussian deformations, ``(1, 3, D, H, W)`` in voxels: R2N2's
    own transformation class, for known-answer pairs and training curricula. Centres uniform in
    the middle half of the image (normalised ``[-0.5, 0.5]``), random axes, widths ``s`` uniform in
    ``width_range`` (normalised units squared), weights uniform in ``[-max_weight_voxels,
    max_weight_voxels]`` voxels per axis."""
    shape = _check_shape(shape)
    half = (torch.tensor(shape, dtype=torch.float32) - 1) / 2.0
    u = torch.zeros((1, 3) + shape)
    lo, hi = width_range
    for _ in range(count):
        centre = torch.rand(1, 3, generator=generator) - 0.5
        rotation = rotation_from_6d(torch.randn(1, 6, generator=generator))
        widths = lo + (hi - lo) * torch.rand(1, 3, generator=generator)
        weight = (torch.rand(1, 3, generator=generator) * 2 - 1) * max_weight_voxels / half
        u = u + local_deformation(centre, rotation, widths, weight, shape)
    return u
