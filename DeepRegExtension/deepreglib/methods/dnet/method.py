"""The ``dnet`` method and the ``--init dnet`` initializer: D-Net's rigid pose as an LPS matrix.

Network-normalised coordinates (what :class:`~deepreglib.methods.dnet.network.DNet` predicts in)
    On a network grid of shape ``(D, H, W)``, a voxel index ``idx = (k, j, i)`` has normalised
    coordinate ``x_n = (idx - c) / h`` with ``c = (shape - 1) / 2`` (the grid centre, per axis)
    and one scalar ``h = (max(shape) - 1) / 2``; on the cubic grid D-Net uses this is exactly
    ``grid_sample``'s ``ALIGN_CORNERS`` coordinate, in ``(k, j, i)`` order instead of
    ``(x, y, z)``. One scalar for all axes keeps a rotation of ``x_n`` a rotation of voxels.

From normalised coordinates to millimetres
    The grids built here (:func:`dnet_grid`) are isotropic with spacing ``s`` mm and have one
    fixed direction ``D`` (:func:`cube_direction`), so with ``p_c`` the grid centre (LPS mm)::

        p = p_c + s * h * D @ (x_n[2], x_n[1], x_n[0])      # (x, y, z) = reversed (k, j, i)

    i.e. ``P = grid.index_to_physical_matrix @ [[h I, c], [0, 1]]`` (:func:`normalized_to_physical`).
    A prediction ``T x_n = R x_n + t`` becomes the LPS matrix ``A = P_moving T P_fixed^-1``
    (fixed point -> moving point, ITK's resampling direction), a rigid map because both grids
    share ``s`` and ``D``.

Which way the cube faces
    D-Net learns poses relative to the orientation its real training scans had *as tensors*
    (the fixed view keeps it), so the cube must show every input in that anatomical orientation,
    whatever voxel order its file uses. Both images are resampled in physical space onto a cube
    whose direction is the training scans' direction, recorded in the model card as
    ``grid_direction`` (the OASIS scans': ``(1, 0, 0, 0, 0, -1, 0, -1, 0)``, so tensor axes
    ``(k, j, i)`` run anterior, inferior, left). A card without it gets the identity (LPS axes).
    With the identity the shipped network would see every brain mirrored (that direction has
    determinant -1 relative to the identity) and fail at any angle.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ...core.geometry import Grid
from ..weights import load_network, shipped_weights
from ...core.preprocess import normalize_intensity
from ...core.resample import resample_to_grid
from ..base import Method, MethodResult, RunContext

#: model file stem of the shipped D-Net weights
WEIGHTS_STEM = "dnet"
#: the direction D-Net's training lays its real scans out in (the OASIS scans', in which the
#: first network learned its poses): tensor axes ``(k, j, i)`` run anterior, inferior, left.
#: Training records it as the card's ``grid_direction``; inference reads it from there.
CUBE_DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)


def cube_direction(card: Optional[dict]) -> Tuple[float, ...]:
    """The network cube's direction (9 numbers, row-major, as SimpleITK's ``GetDirection``): the
    model card's ``grid_direction``, or the identity when it names none. Raises ``ValueError``
    for a card entry that is not 9 numbers of an orthonormal matrix."""
    d = (card or {}).get("grid_direction")
    if d is None:
        return tuple(float(v) for v in np.eye(3).ravel())
    m = np.asarray(d, dtype=np.float64)
    if m.size != 9 or not np.allclose(m.reshape(3, 3) @ m.reshape(3, 3).T, np.eye(3), atol=1e-6):
        raise ValueError(f"model card grid_direction must be 9 numbers of an orthonormal matrix, got {d}")
    return tuple(float(v) for v in m.ravel())


def dnet_grid(centre_lps: Sequence[float], size: int, spacing: float,
              direction: Optional[Sequence[float]] = None) -> Grid:
    """Cubic ``size^3`` grid, ``spacing`` mm, centred on ``centre_lps``, with ``direction``
    (row-major 3x3; default the identity)."""
    if size < 2 or spacing <= 0:
        raise ValueError(f"need size >= 2 and spacing > 0, got {size}, {spacing}")
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    half = spacing * (size - 1) / 2.0
    origin = np.asarray(centre_lps, dtype=np.float64) - d @ np.full(3, half)
    return Grid((size, size, size), (spacing,) * 3, tuple(float(v) for v in origin), tuple(float(v) for v in d.ravel()))


def grid_centre(grid: Grid) -> np.ndarray:
    """LPS position of the centre of ``grid`` (:attr:`Grid.centre`)."""
    return grid.centre


def longest_side_mm(grid: Grid) -> float:
    return float(grid.extent_mm.max())


def normalized_to_index(shape: Sequence[int]) -> np.ndarray:
    """4x4 from network-normalised ``(k, j, i)`` coordinates to voxel indices of ``shape``."""
    shape = np.asarray(shape, dtype=np.float64)
    h = (shape.max() - 1) / 2.0
    m = np.eye(4)
    m[:3, :3] *= h
    m[:3, 3] = (shape - 1) / 2.0
    return m


def normalized_to_physical(grid: Grid) -> np.ndarray:
    """4x4 from network-normalised coordinates of ``grid`` to LPS mm (see the module text)."""
    return grid.index_to_physical_matrix @ normalized_to_index(grid.shape)


def pose_matrix(rotation, translation) -> np.ndarray:
    """4x4 ``x -> R x + t`` (float64 numpy) from ``(3, 3)`` and ``(3,)`` arrays or tensors."""
    r = np.asarray(torch.as_tensor(rotation).detach().cpu().double().numpy()).reshape(3, 3)
    t = np.asarray(torch.as_tensor(translation).detach().cpu().double().numpy()).reshape(3)
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = r, t
    return m


def physical_rigid(rotation, translation, fixed_net: Grid, moving_net: Grid) -> np.ndarray:
    """The LPS matrix (fixed point -> moving point) of a normalised prediction ``(R, t)`` made
    with the fixed image on ``fixed_net`` and the moving image on ``moving_net``."""
    return (normalized_to_physical(moving_net) @ pose_matrix(rotation, translation)
            @ np.linalg.inv(normalized_to_physical(fixed_net)))


def rotation_error_deg(r_est: np.ndarray, r_true: np.ndarray) -> float:
    """Angle of ``R_est^T R_true`` in degrees, from the trace formula ``cos a = (tr - 1) / 2``."""
    c = (np.trace(np.asarray(r_est).T @ np.asarray(r_true)) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def _rotation_angle_deg(r: np.ndarray) -> float:
    return rotation_error_deg(np.eye(3), r)


def load_dnet(path, device) -> Tuple[torch.nn.Module, dict]:
    """A D-Net model file (checksum verified), cached per path and device."""
    return load_network(path, device, ("DNet",), "a DNet", cached=True)


def _predict(model, fixed_net: torch.Tensor, moving_net: torch.Tensor):
    with torch.inference_mode():
        out = model(moving_net, fixed_net)
    return out.rotation[0], out.translation[0], out.sixd[0]


def inference_passes(card: Optional[dict]) -> int:
    """How many passes the model card says its network runs (``inference_passes``; 1 without)."""
    passes = int((card or {}).get("inference_passes", 1))
    if passes < 1:
        raise ValueError(f"inference_passes must be >= 1, got {passes}")
    return passes


def pose_in_passes(model, fixed_view: torch.Tensor, fixed_net: Grid, moving_view: torch.Tensor, moving_net: Grid,
                   moving: torch.Tensor, moving_grid: Grid, passes: int = 1):
    """D-Net's pose as an LPS matrix (fixed point -> moving point) in ``passes`` forward passes.

    The first pass sees the two views as given (``moving_view`` on ``moving_net``); each later
    pass sees ``moving`` (intensities in [0, 1], on ``moving_grid``) resampled through the pose so
    far onto the fixed view's cube, and its prediction, the residual pose, is composed on:
    ``A = A_1 A_2 ... A_k``. Returns ``(matrix, (rotation, translation, sixd) of the first pass)``."""
    rot, trans, sixd = _predict(model, fixed_view, moving_view)
    matrix = physical_rigid(rot, trans, fixed_net, moving_net)
    for _ in range(passes - 1):
        seen = resample_to_grid(moving, moving_grid, fixed_net, matrix).to(fixed_view.device)
        r2, t2, _ = _predict(model, fixed_view, seen)
        matrix = matrix @ physical_rigid(r2, t2, fixed_net, fixed_net)
    return matrix, (rot, trans, sixd)


class DNetMethod(Method):
    """Rigid registration at any rotation by one D-Net forward pass.

    Options:
        query_point: ``(x, y, z)`` LPS mm in the fixed image for the mutual-attention map
            (default: the fixed image centre).
        attention_link: which mutual non-local link the map is read from (0 = finest).
    """

    def __init__(self, info, device, weights=None, query_point=None, attention_link: int = 0,
                 passes: Optional[int] = None, **options):
        super().__init__(info, device, **options)
        self.model, card = self.load_weights(weights, ("DNet",), "a DNet", WEIGHTS_STEM, cached=True)
        self.direction = cube_direction(card)
        self.passes = inference_passes(card) if passes is None else int(passes)
        if self.passes < 1:
            raise ValueError(f"passes must be >= 1, got {self.passes}")
        self.query_point = None if query_point is None else np.asarray(query_point, dtype=np.float64)
        if self.query_point is not None and self.query_point.shape != (3,):
            raise ValueError(f"query_point must be (x, y, z), got {self.query_point.shape}")
        self.attention_link = int(attention_link)

    def grid_for(self, fixed: Grid) -> Grid:
        return whole_scan_grid(fixed, self.model.input_size, self.direction)

    def run(self, fixed, moving, grid: Grid, ctx: RunContext) -> MethodResult:
        ctx.check()
        ctx.progress(0.1, "D-Net forward pass" + (f"es ({self.passes})" if self.passes > 1 else ""))
        matrix, (rot, trans, sixd) = pose_in_passes(self.model, fixed, grid, moving, grid, moving, grid, self.passes)
        ctx.check()
        ctx.progress(0.6, "mutual-attention map")
        query = self.query_point if self.query_point is not None else grid_centre(grid)
        q_kji = grid.physical_to_index(query)
        with torch.inference_mode():
            amap = self.model.attention_map(moving, fixed, q_kji, self.attention_link)
        ctx.progress(1.0, "D-Net done")
        return MethodResult(
            matrix=matrix,
            volumes={"mutual_attention": amap.float()},
            info={"rotation_deg": _rotation_angle_deg(matrix[:3, :3]),
                  "centre_displacement_mm": float(np.linalg.norm(
                      matrix[:3, :3] @ grid_centre(grid) + matrix[:3, 3] - grid_centre(grid))),
                  "sixd": [float(v) for v in sixd],
                  "normalized_translation": [float(v) for v in trans],
                  "passes": self.passes,
                  "attention_query_lps": [float(v) for v in query],
                  "attention_note": "fixed->moving attention weights of the query over the moving "
                                    "image as given to the network (after --init), max-normalised"})


def network_view(image, image_grid: Grid, net_grid: Grid) -> torch.Tensor:
    """``image`` (on ``image_grid``) as D-Net is shown it: intensities normalised to [0, 1] and
    resampled in physical space onto its cube ``net_grid`` (:func:`dnet_grid`)."""
    arr = torch.as_tensor(image).float().reshape(1, 1, *image_grid.shape)
    return resample_to_grid(normalize_intensity(arr), image_grid, net_grid)


def whole_scan_grid(image_grid: Grid, size: int, direction) -> Grid:
    """The cube that shows a scan whole: centred on it, its longest side across ``size`` voxels."""
    return dnet_grid(grid_centre(image_grid), size, longest_side_mm(image_grid) / size, direction)


def dnet_initializer(fixed, fixed_grid: Grid, moving, moving_grid: Grid, device="cpu",
                     progress=None, cancel=None, weights=None, **_) -> np.ndarray:
    """``--init dnet``: each image on its own D-Net cube (centred on it, facing the model card's
    :func:`cube_direction`, both at the spacing
    that fits the *fixed* image's longest side in the cube, as in training, where the moving
    view is the fixed cube moved: a larger moving scan is cut to that field of view rather than
    shrunk), one forward pass, the pose as an LPS 4x4 (fixed -> moving).

    ``fixed``/``moving`` are ``(1, 1, D, H, W)`` on their grids; ``weights`` a ``.pt`` path
    (default ``Resources/Models/dnet.pt``)."""
    path = weights or shipped_weights(WEIGHTS_STEM)
    model, card = load_dnet(path, device)
    direction = cube_direction(card)
    if cancel is not None and cancel():
        from ...core.errors import CancelledError
        raise CancelledError("initial alignment cancelled")
    f_net = whole_scan_grid(fixed_grid, model.input_size, direction)
    m_net = dnet_grid(grid_centre(moving_grid), model.input_size, f_net.spacing[0], direction)
    f = network_view(fixed, fixed_grid, f_net).to(device)
    m = network_view(moving, moving_grid, m_net).to(device)
    if progress is not None:
        progress(0.5, "D-Net forward pass")
    moving_norm = normalize_intensity(torch.as_tensor(moving).float().reshape(1, 1, *moving_grid.shape))
    matrix, _ = pose_in_passes(model, f, f_net, m, m_net, moving_norm, moving_grid, inference_passes(card))
    if progress is not None:
        progress(1.0, "D-Net pose done")
    return matrix


def unit_translation_scale(shape: Sequence[int]) -> float:
    """Voxels per normalised unit (``h``) of a grid of ``shape``."""
    return (max(int(s) for s in shape) - 1) / 2.0
