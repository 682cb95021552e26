"""The ``same`` method (SAM-affine -> SAM-coarse -> SAM-VoxelMorph) and the ``--init same-affine``
initializer. Algorithms: :mod:`deepreglib.methods.same.matching`; networks: :mod:`deepreglib.methods.same.network`,
:mod:`deepreglib.methods.same.network_voxelmorph`.

On the network grid (fixed and moving both resampled there, the moving one through ``--init``),
the final map is ``x -> A (x + u(x))`` with ``A`` the SAM-affine matrix (LPS, ``result.matrix``)
and ``u = compose(u_coarse, u_vxm)`` (voxels, ``result.displacement``): SAM-VoxelMorph registers
the fixed image to the moving image already warped by the affine and the coarse field. This is
exactly the order :mod:`deepreglib.run.pipeline` applies ``matrix`` and ``displacement``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...core.errors import BadInputError
from ...core.fields import compose
from ...core.geometry import Grid
from ..weights import load_network, shipped_weights
from ...core.preprocess import network_grid, normalize_intensity
from ...core.resample import physical_field, resample_to_grid
from .matching import (FITS, POINT_STRIDE, SIMILARITY_THRESHOLD, body_mask, lattice_points, sam_affine,
                    sam_coarse, similarity_map)
from ...core.warp import warp
from ...io.protocol import grid_entry
from ..base import Method, MethodResult, RunContext

#: the three steps, in the order they run
STEPS = ("affine", "coarse", "voxelmorph")
#: model file stems: the full SAME model (SAM-VoxelMorph with its SAM) and SAM alone
WEIGHTS_STEM = "same"
SAM_WEIGHTS_STEM = "sam"
#: feature grid = image grid / this (SAME matches on embeddings downsampled by 4)
FEATURE_STRIDE = 4


#: the network classes a SAME model file may hold
SAME_NETWORKS = ("SAMVoxelMorph", "SAMNet")
SAME_WHAT = "a SAM or SAM-VoxelMorph model"


def load_same_model(path, device) -> Tuple[torch.nn.Module, dict]:
    """A SAMVoxelMorph or SAMNet model file (checksum verified), cached per path and device."""
    return load_network(path, device, SAME_NETWORKS, SAME_WHAT, cached=True)


def sam_of(model):
    return model.sam if hasattr(model, "sam") else model


def parse_steps(steps) -> Tuple[str, ...]:
    """``"affine,coarse"``, ``["voxelmorph"]`` or ``"all"`` -> the chosen steps in run order."""
    if steps in (None, "all"):
        return STEPS
    names = [s.strip() for s in (steps.split(",") if isinstance(steps, str) else steps) if s.strip()]
    bad = [s for s in names if s not in STEPS]
    if bad or not names:
        raise BadInputError(f"SAME steps must be a non-empty subset of {STEPS} (or 'all'), got {steps!r}")
    return tuple(s for s in STEPS if s in names)


def feature_shape(shape: Sequence[int]) -> Tuple[int, int, int]:
    return tuple(max(2, int(s) // FEATURE_STRIDE) for s in shape)


@dataclass
class SAMEResult(MethodResult):
    """:class:`MethodResult` plus SAME's non-scalar outputs (written by :func:`write_same_outputs`).

    Attributes:
        coarse_displacement: ``(1, 3, D, H, W)`` voxel DDF of SAM-coarse on the network grid
            (applied before ``matrix``), or ``None``.
        point_pairs: step name -> ``(fixed_lps (P, 3), moving_lps (P, 3), similarity (P,))``; the
            moving points are in the space the method saw (the moving image after ``--init``).
    """

    coarse_displacement: Optional[torch.Tensor] = None
    point_pairs: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: the network grid the result lives on (set by :meth:`SAMEMethod.run`)
    grid: Optional[Grid] = None

    def write_files(self, folder) -> List[Dict[str, object]]:
        """The pipeline's hook: :func:`write_same_outputs` on the network grid. The method does not
        know ``--init``, so moving points are in the space it saw (the original moving image's
        when ``--init none``) and the coarse field lies on the network grid, without the init."""
        if self.grid is None:
            return []
        entries = []
        for name, path in write_same_outputs(self, folder, self.grid, self.grid).items():
            if name == "affine":
                entries.append({"name": "same_affine", "kind": "linear_transform", "path": Path(path).name,
                                "grid": None, "description": "SAM-affine matrix alone (fixed -> moving, LPS)"})
                continue
            field_like = name == "coarse_displacement"
            entries.append({"name": f"same_{name}", "kind": "displacement_field" if field_like else "markups",
                            "path": Path(path).name, "grid": grid_entry(self.grid) if field_like else None,
                            "description": ("SAM-affine + SAM-coarse map (fixed -> moving, LPS mm, network grid)"
                                            if field_like else f"SAME matched points ({name.replace('_', ' ')}, LPS)")})
        return entries


class SAMEMethod(Method):
    """SAME on the network grid.

    Options:
        steps: which of ``affine``, ``coarse``, ``voxelmorph`` to run (comma string or list;
            default all three, in that order). ``voxelmorph`` needs a SAM-VoxelMorph model file.
        fit: SAM-affine's fit, one of :data:`deepreglib.methods.same.matching.FITS` (``lstsq`` as in the paper).
        threshold: similarity threshold (default 0.7); stride: lattice stride (default 8).
        coarse_radius: SAM-coarse search radius (network voxels, default 16).
        query_point: ``(x, y, z)`` LPS mm in the fixed image for the similarity map (default: centre).
    """

    max_size = 112
    divisor = 16

    def __init__(self, info, device, weights=None, steps="all", fit: str = "lstsq",
                 threshold: float = SIMILARITY_THRESHOLD, stride: int = POINT_STRIDE,
                 coarse_radius: float = 2 * POINT_STRIDE, query_point=None, **options):
        super().__init__(info, device, **options)
        self.model, _ = self.load_weights(weights, SAME_NETWORKS, SAME_WHAT, WEIGHTS_STEM, cached=True)
        path = self.weights_path
        self.steps = parse_steps(steps)
        if "voxelmorph" in self.steps and not hasattr(self.model, "sam"):
            raise BadInputError(f"{path} holds SAM only; the voxelmorph step needs a SAM-VoxelMorph model")
        if fit not in FITS:
            raise BadInputError(f"fit must be one of {FITS}, got {fit!r}")
        self.fit, self.threshold, self.stride = fit, float(threshold), int(stride)
        self.coarse_radius = float(coarse_radius)
        self.query_point = None if query_point is None else np.asarray(query_point, dtype=np.float64)
        self.divisor = max(self.divisor, getattr(self.model, "divisor", 16))

    def run(self, fixed, moving, grid: Grid, ctx: RunContext) -> SAMEResult:
        sam = sam_of(self.model)
        shape, fshape = grid.shape, feature_shape(grid.shape)
        result = SAMEResult(grid=grid)
        ctx.check()
        ctx.progress(0.05, "SAM embeddings")
        with torch.inference_mode():
            e_f = sam.embed(fixed, fshape)
            e_m = sam.embed(moving, fshape)
        mask = body_mask(fixed)
        points = lattice_points(mask, self.stride)
        matrix = np.eye(4)
        if "affine" in self.steps:
            ctx.check()
            ctx.progress(0.25, "SAM-affine")
            aff = sam_affine(e_f, grid, e_m, grid, points, self.threshold, self.fit)
            matrix = aff.matrix
            result.matrix = matrix
            result.point_pairs["affine"] = (aff.fixed_points_lps, aff.moving_points_lps, aff.similarity)
            result.info["affine"] = dict(aff.info, matrix_lps=matrix.tolist())
        moving_a = resample_to_grid(moving, grid, grid, matrix) if "affine" in self.steps else moving
        u = None
        if "coarse" in self.steps:
            ctx.check()
            ctx.progress(0.45, "SAM-coarse")
            with torch.inference_mode():
                e_ma = sam.embed(moving_a, fshape)
            u, matches = sam_coarse(e_f, e_ma, shape, points, self.threshold, self.coarse_radius)
            u = u.to(fixed.device)
            result.coarse_displacement = u
            m_pts = grid.index_to_physical(matches.moving.numpy())
            m_pts = m_pts @ matrix[:3, :3].T + matrix[:3, 3]  # into the space the method saw
            result.point_pairs["coarse"] = (grid.index_to_physical(matches.fixed.numpy()), m_pts,
                                            matches.similarity.numpy())
            result.info["coarse"] = {"matches_kept": int(matches.fixed.shape[0]), "radius_voxels": self.coarse_radius}
        if "voxelmorph" in self.steps:
            ctx.check()
            ctx.progress(0.7, "SAM-VoxelMorph")
            moving_c = warp(moving_a, u) if u is not None else moving_a
            with torch.inference_mode():
                v = self.model.predict_velocity(moving_c, fixed)
                u_v = self.model.velocity_to_displacement(v, shape)
            result.velocity = v if u is None else None  # a composed field is not exp(v)
            u = u_v if u is None else compose(u, u_v)
        result.displacement = u
        ctx.progress(0.9, "embedding similarity map")
        query = self.query_point if self.query_point is not None else grid.index_to_physical(
            (np.asarray(shape, dtype=np.float64) - 1) / 2)
        result.volumes["embedding_similarity"] = similarity_map(e_f, shape, e_m, shape, grid.physical_to_index(query))
        result.volumes["body_mask"] = mask.float()
        result.info["steps"] = list(self.steps)
        result.info["similarity_query_lps"] = [float(v) for v in query]
        result.info["similarity_note"] = ("cosine similarity in [-1, 1] of the fixed query's SAM embedding with "
                                          "every voxel of the moving image as given to the method (after --init)")
        ctx.progress(1.0, "SAME done")
        return result


def write_same_outputs(result: SAMEResult, folder, net_grid: Grid, fixed_grid: Grid,
                       initial_matrix: Optional[np.ndarray] = None) -> Dict[str, Path]:
    """Write SAME's extra outputs into ``folder``; returns name -> path.

    * ``same_<step>_fixed_points.mrk.json`` / ``same_<step>_moving_points.mrk.json``: the matched
      pairs as two Slicer point lists (LPS; same labels pair up), the moving points carried
      through ``initial_matrix`` into the original moving image's space;
    * ``coarse_displacement.mha``: the affine plus SAM-coarse map as an ITK displacement field
      on the fixed grid (LPS mm), ``initial_matrix`` included.
    """
    from ...io import images as io
    from ...core.resample import field_to_fixed_grid
    from ...core.geometry import displacement_mm_to_voxel
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    init = np.eye(4) if initial_matrix is None else np.asarray(initial_matrix, dtype=np.float64)
    written = {}
    for step, (f_lps, m_lps, sim) in result.point_pairs.items():
        m_orig = m_lps @ init[:3, :3].T + init[:3, 3] if len(m_lps) else m_lps
        names = [f"{step}-{i + 1}" for i in range(len(f_lps))]
        attrs = [{"description": f"similarity {s:.3f}"} for s in sim]
        for side, pts in (("fixed", f_lps), ("moving", m_orig)):
            p = folder / f"same_{step}_{side}_points.mrk.json"
            io.write_markups_json(p, np.asarray(pts).reshape(-1, 3), names, point_attributes=attrs,
                                  name=f"SAME {step} {side} points",
                                  description=f"SAM-{step} matched points in the {side} image (LPS)")
            written[f"{step}_{side}_points"] = p
    if result.matrix is not None:
        # the SAM-affine step alone, fixed -> moving points (ITK's resampling direction), with the
        # --init matrix in front, so Slicer can show it as a linear transform node
        p = folder / "same_affine.tfm"
        io.write_linear_transform(init @ np.asarray(result.matrix, dtype=np.float64), str(p))
        written["affine"] = p
    if result.coarse_displacement is not None:
        matrix = init @ (result.matrix if result.matrix is not None else np.eye(4))
        u_mm = field_to_fixed_grid(result.coarse_displacement.detach().cpu(), net_grid, fixed_grid)
        total = physical_field(matrix, u_mm, fixed_grid)
        p = folder / "coarse_displacement.mha"
        io.write_displacement_field(displacement_mm_to_voxel(total.double(), fixed_grid).float(), fixed_grid, str(p))
        written["coarse_displacement"] = p
    return written


def _facing_grid(image: Grid, direction, spacing: float, divisor: int) -> Grid:
    """Isotropic grid with ``direction`` (row-major 3x3) and ``spacing`` that covers ``image``
    (its corner voxels' boxes, projected on the new axes), centred on it; sizes rounded up to a
    multiple of ``divisor``."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    centre = image.index_to_physical((np.asarray(image.shape, dtype=np.float64) - 1) / 2)
    along = (image.corners() - centre) @ d  # (8, 3): corner coordinates on the new (x, y, z) axes
    extent = 2 * np.abs(along).max(0) + spacing
    sizes = [max(divisor, int(np.ceil(e / spacing / divisor - 1e-6)) * divisor) for e in extent]
    g = Grid(tuple(reversed(sizes)), (spacing,) * 3, (0.0, 0.0, 0.0), tuple(d.ravel()))
    origin = centre - g.index_to_physical((np.asarray(g.shape, dtype=np.float64) - 1) / 2)
    return Grid(g.shape, g.spacing, tuple(float(v) for v in origin), g.direction)


def embed_on_own_grids(sam, fixed, fixed_grid: Grid, moving, moving_grid: Grid, max_size: int, device):
    """Each image on an isotropic grid of its own (SAME's network grid), one common spacing, both
    facing the *fixed* image's direction: SAM compares embeddings of the two views, and a moving
    file stored in another voxel order (say RAS against LPS, a reflection) would otherwise be seen
    mirrored, which SAM never learned to match."""
    g_f = network_grid(fixed_grid, max_size, sam.divisor)
    g_m = network_grid(moving_grid, max_size, sam.divisor)
    s = max(g_f.spacing[0], g_m.spacing[0])
    grids = [_facing_grid(g, fixed_grid.direction, s, sam.divisor) for g in (fixed_grid, moving_grid)]
    out = []
    for img, g, net in ((fixed, fixed_grid, grids[0]), (moving, moving_grid, grids[1])):
        t = normalize_intensity(torch.as_tensor(img).float().reshape(1, 1, *g.shape))
        out.append(resample_to_grid(t, g, net).to(device))
    with torch.inference_mode():
        e_f = sam.embed(out[0], feature_shape(grids[0].shape))
        e_m = sam.embed(out[1], feature_shape(grids[1].shape))
    return out[0], grids[0], e_f, grids[1], e_m


def same_affine_initializer(fixed, fixed_grid: Grid, moving, moving_grid: Grid, device="cpu",
                            progress=None, cancel=None, weights=None, fit: str = "lstsq",
                            threshold: float = SIMILARITY_THRESHOLD, stride: int = POINT_STRIDE,
                            max_size: int = 112, **_) -> np.ndarray:
    """``--init same-affine``: SAM-affine between the two images, each embedded on its own grid
    (so unaligned fields of view are fine). Returns the 4x4 LPS matrix (fixed -> moving).
    ``weights``: a SAM or SAME model file (default ``sam.pt``, else ``same.pt``)."""
    if weights is None:
        weights = shipped_weights(SAM_WEIGHTS_STEM)
        if not weights.is_file():
            weights = shipped_weights(WEIGHTS_STEM)
    model, _ = load_same_model(weights, device)
    sam = sam_of(model)
    if cancel is not None and cancel():
        from ...core.errors import CancelledError
        raise CancelledError("initial alignment cancelled")
    if progress is not None:
        progress(0.2, "SAM embeddings")
    f_img, g_f, e_f, g_m, e_m = embed_on_own_grids(sam, fixed, fixed_grid, moving, moving_grid, max_size, device)
    points = lattice_points(body_mask(f_img), stride)
    if progress is not None:
        progress(0.7, "SAM-affine matching")
    result = sam_affine(e_f, g_f, e_m, g_m, points, threshold, fit)
    if progress is not None:
        progress(1.0, "SAM-affine done")
    return result.matrix

