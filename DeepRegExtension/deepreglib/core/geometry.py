"""Image grids and the voxel <-> physical boundary. Conventions: :mod:`deepreglib.core.conventions`.

A :class:`Grid` is where an image's samples sit in physical space (ITK/LPS millimetres). Inside
the engine everything is in voxel units with components in tensor order ``(k, j, i)``; this module
is the only place that converts to and from physical ``(x, y, z)``.

The index -> physical map of ITK is ``p = origin + Direction @ diag(spacing) @ (i, j, k)``. With the
engine's reversed index order ``(k, j, i)`` that is ``p = origin + M @ idx_kji`` where
``M = Direction @ diag(spacing) @ R`` and ``R`` reverses the three components.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from .errors import BadInputError

_REVERSE = np.eye(3)[::-1].copy()  # (k, j, i) <-> (i, j, k); its own inverse


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3D image.

    Attributes:
        shape: array shape ``(D, H, W)`` = ``(z, y, x)`` sizes, as ``sitk.GetArrayFromImage`` gives.
        spacing: voxel size in mm, ITK order ``(x, y, z)``.
        origin: physical position (LPS mm) of voxel ``(0, 0, 0)``'s centre, ``(x, y, z)``.
        direction: 3x3 direction cosines, row-major as ITK's ``GetDirection()`` (9 numbers).
    """

    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in np.ravel(self.direction)))
        if len(self.shape) != 3 or len(self.spacing) != 3 or len(self.origin) != 3:
            raise BadInputError(f"a 3D grid needs 3 sizes, spacings and origin values, got {self}")
        if len(self.direction) != 9:
            raise BadInputError(f"direction must have 9 numbers (3x3), got {len(self.direction)}")
        if min(self.spacing) <= 0:
            raise BadInputError(f"spacing must be positive, got {self.spacing}")
        d = self.direction_matrix
        # A determinant of +-1 alone would let shears through; the physical-unit Jacobian and
        # Slicer's IJK-to-RAS assume a rotation (possibly with a reflection).
        if not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
            raise BadInputError(f"direction matrix is not orthonormal: {self.direction}")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Grid":
        """The grid of a SimpleITK image (3D)."""
        if image.GetDimension() != 3:
            raise BadInputError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(tuple(reversed(image.GetSize())), image.GetSpacing(), image.GetOrigin(),
                   image.GetDirection())

    @classmethod
    def identity(cls, shape: Sequence[int], spacing=(1.0, 1.0, 1.0)) -> "Grid":
        """Axis-aligned grid with origin 0."""
        return cls(tuple(shape), tuple(spacing), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Stamp this grid's spacing, origin and direction on ``image`` (sizes must agree)."""
        if tuple(reversed(image.GetSize())) != self.shape:
            raise ValueError(f"image size {image.GetSize()} does not match grid shape {self.shape}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference_image(self, pixel_type=sitk.sitkFloat32) -> sitk.Image:
        """An empty SimpleITK image on this grid (a resampling reference)."""
        return self.apply_to(sitk.Image([int(s) for s in reversed(self.shape)], pixel_type))

    # -- matrices -------------------------------------------------------------------------------
    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def spacing_kji(self) -> np.ndarray:
        """Spacing in tensor-axis order ``(d, h, w)``."""
        return np.asarray(self.spacing[::-1], dtype=np.float64)

    @property
    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 homogeneous map from a ``(k, j, i)`` index to a physical ``(x, y, z)`` LPS point."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing) @ _REVERSE
        m[:3, 3] = self.origin
        return m

    @property
    def physical_to_index_matrix(self) -> np.ndarray:
        """Inverse of :attr:`index_to_physical_matrix`: LPS point -> continuous ``(k, j, i)``."""
        return np.linalg.inv(self.index_to_physical_matrix)

    def index_to_physical(self, idx_kji) -> np.ndarray:
        """``(..., 3)`` continuous indices ``(k, j, i)`` -> ``(..., 3)`` LPS points ``(x, y, z)``."""
        idx = np.asarray(idx_kji, dtype=np.float64)
        m = self.index_to_physical_matrix
        return idx @ m[:3, :3].T + m[:3, 3]

    def physical_to_index(self, points_xyz) -> np.ndarray:
        """``(..., 3)`` LPS points ``(x, y, z)`` -> ``(..., 3)`` continuous indices ``(k, j, i)``."""
        pts = np.asarray(points_xyz, dtype=np.float64)
        m = self.physical_to_index_matrix
        return pts @ m[:3, :3].T + m[:3, 3]

    # -- derived grids --------------------------------------------------------------------------
    @property
    def extent_mm(self) -> np.ndarray:
        """Physical size ``(x, y, z)`` covered by the voxels (size times spacing)."""
        return np.asarray(self.shape[::-1], dtype=np.float64) * np.asarray(self.spacing)

    @property
    def centre(self) -> np.ndarray:
        """LPS position (mm) of the grid's centre: the middle between its first and last voxel
        centres, index ``(shape - 1) / 2``."""
        return self.index_to_physical((np.asarray(self.shape, dtype=np.float64) - 1) / 2)

    def corners(self) -> np.ndarray:
        """The 8 corner voxel centres as LPS points, ``(8, 3)``."""
        d, h, w = (s - 1 for s in self.shape)
        idx = np.array([[k, j, i] for k in (0, d) for j in (0, h) for i in (0, w)], dtype=np.float64)
        return self.index_to_physical(idx)

    def resized(self, shape: Sequence[int]) -> "Grid":
        """A grid of another ``shape`` covering the same physical box from first to last voxel
        centre (consistent with ``ALIGN_CORNERS = True``), same direction."""
        shape = tuple(int(s) for s in shape)
        old = np.asarray(self.shape, dtype=np.float64)
        new = np.asarray(shape, dtype=np.float64)
        scale_kji = np.where(new > 1, (old - 1) / np.maximum(new - 1, 1), old / new)
        spacing = tuple(float(s) for s in self.spacing_kji * scale_kji)[::-1]
        return Grid(shape, spacing, self.origin, self.direction)

    def centered_like(self, shape: Sequence[int], spacing: Sequence[float]) -> "Grid":
        """A grid with this grid's direction and centre, another shape and spacing ``(x, y, z)``."""
        shape = tuple(int(s) for s in shape)
        g = Grid(shape, tuple(spacing), (0.0, 0.0, 0.0), self.direction)
        offset = self.centre - g.centre
        return Grid(shape, tuple(spacing), tuple(offset), self.direction)


# -- displacement conversions --------------------------------------------------------------------
def _linear_part(grid: Grid, dtype, device) -> torch.Tensor:
    return torch.as_tensor(grid.index_to_physical_matrix[:3, :3], dtype=dtype, device=device)


def displacement_voxel_to_mm(u: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Voxel displacement -> physical displacement.

    Args:
        u: ``(N, 3, D, H, W)`` displacement in voxels of ``grid``, components ``(k, j, i)``.
        grid: the grid the field lives on (its shape must match ``u``).
    Returns:
        ``(N, 3, D, H, W)`` displacement in LPS millimetres, components ``(x, y, z)``:
        ``u_mm = Direction @ diag(spacing) @ reverse(u)``.
    """
    _check_field(u, grid)
    m = _linear_part(grid, u.dtype, u.device)
    return torch.einsum("pc,ncdhw->npdhw", m, u)


def displacement_mm_to_voxel(u_mm: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Inverse of :func:`displacement_voxel_to_mm`: ``(N, 3, D, H, W)`` LPS mm ``(x, y, z)`` ->
    voxels of ``grid`` with components ``(k, j, i)``."""
    _check_field(u_mm, grid)
    m = torch.as_tensor(np.linalg.inv(grid.index_to_physical_matrix[:3, :3]), dtype=u_mm.dtype,
                        device=u_mm.device)
    return torch.einsum("cp,npdhw->ncdhw", m, u_mm)


def _check_field(u: torch.Tensor, grid: Grid) -> None:
    if u.ndim != 5 or u.shape[1] != 3:
        raise ValueError(f"expected a displacement of shape (N, 3, D, H, W), got {tuple(u.shape)}")
    if tuple(u.shape[2:]) != grid.shape:
        raise ValueError(f"field spatial shape {tuple(u.shape[2:])} does not match grid {grid.shape}")


def voxel_grid_points(grid: Grid, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Physical LPS positions ``(x, y, z)`` of every voxel centre, ``(1, 3, D, H, W)``."""
    m = torch.as_tensor(grid.index_to_physical_matrix, dtype=torch.float64)
    axes = [torch.arange(s, dtype=torch.float64) for s in grid.shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # (3, D, H, W) in (k, j, i)
    pts = torch.einsum("pc,cdhw->pdhw", m[:3, :3], idx) + m[:3, 3].view(3, 1, 1, 1)
    return pts.unsqueeze(0).to(dtype=dtype, device=device)


def affine_voxel_matrix(matrix_phys: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """A physical 4x4 map (LPS, ``p -> A p``) expressed between voxel indices:
    ``(k, j, i)`` of ``source`` -> continuous ``(k, j, i)`` of ``target``."""
    return target.physical_to_index_matrix @ np.asarray(matrix_phys) @ source.index_to_physical_matrix


def lps_to_ras(points) -> np.ndarray:
    """LPS <-> RAS for ``(..., 3)`` points: x and y change sign (the map is its own inverse)."""
    p = np.array(points, dtype=np.float64, copy=True)
    p[..., 0] *= -1
    p[..., 1] *= -1
    return p


ras_to_lps = lps_to_ras


def matrix_lps_to_ras(m: np.ndarray) -> np.ndarray:
    """A 4x4 point map in LPS -> the same map in RAS (``F m F`` with ``F = diag(-1, -1, 1, 1)``)."""
    f = np.diag([-1.0, -1.0, 1.0, 1.0])
    return f @ np.asarray(m, dtype=np.float64) @ f


matrix_ras_to_lps = matrix_lps_to_ras


def axis_reorientation(from_direction: Sequence[float], to_direction: Sequence[float]
                       ) -> Tuple[Tuple[int, int, int], Tuple[bool, bool, bool]]:
    """How a volume stored with direction ``from_direction`` is shown with ``to_direction``
    (9 numbers each, row-major as SimpleITK's ``GetDirection``) by axis permutation and flips
    alone, when one is a signed permutation of the other: ``(source, flipped)`` with, per index
    axis ``c`` of the new layout (0 = i, 1 = j, 2 = k), the index axis of the old layout it
    runs along and whether it runs the other way. Raises :class:`BadInputError` when the two
    directions are not axis-aligned to each other (an oblique scan needs resampling)."""
    a = np.asarray(from_direction, dtype=np.float64).reshape(3, 3)
    b = np.asarray(to_direction, dtype=np.float64).reshape(3, 3)
    m = a.T @ b  # column c: new axis c in old-axis coordinates
    source, flipped = [], []
    for c in range(3):
        s = int(np.argmax(np.abs(m[:, c])))
        if abs(abs(m[s, c]) - 1.0) > 1e-4:
            raise BadInputError(f"direction {tuple(np.round(a.ravel(), 4))} is not axis-aligned to "
                                f"{tuple(np.round(b.ravel(), 4))}; resample the scan onto an axis-aligned "
                                "grid first (e.g. SimpleITK.Resample or DICOMOrient)")
        source.append(s)
        flipped.append(bool(m[s, c] < 0))
    if sorted(source) != [0, 1, 2]:
        raise BadInputError(f"directions {tuple(a.ravel())} and {tuple(b.ravel())} do not form a permutation")
    return tuple(source), tuple(flipped)


def reorient_volume(volume: torch.Tensor, from_direction: Sequence[float],
                    to_direction: Sequence[float]) -> torch.Tensor:
    """``volume`` ``(..., D, H, W)`` (tensor order ``(k, j, i)``) stored with ``from_direction``,
    laid out for ``to_direction`` by :func:`axis_reorientation`'s permutation and flips (exact:
    no interpolation). The same voxels cover the same box; only the origin (the first voxel's
    corner) moves, which callers that keep only arrays never need."""
    source, flipped = axis_reorientation(from_direction, to_direction)
    n = volume.ndim
    lead = list(range(n - 3))
    # new index axis c sits at tensor dim n - 1 - c and comes from old tensor dim n - 1 - source[c]
    order = lead + [n - 1 - source[c] for c in (2, 1, 0)]
    out = volume.permute(*order)
    flips = [n - 1 - c for c in range(3) if flipped[c]]
    return out.flip(flips) if flips else out
