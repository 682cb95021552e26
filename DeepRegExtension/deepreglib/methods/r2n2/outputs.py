"""R2N2's explanation outputs: the local deformations in physical space (a Slicer point list)
and the step-by-step play-back (a Slicer volume sequence). Conventions:
:mod:`deepreglib.core.conventions`.

A Gaussian in normalised coordinates stays a Gaussian in physical space: with
``A = M S`` (``S = diag((n - 1) / 2)`` normalised -> voxel ``(k, j, i)``, ``M`` the grid's index ->
LPS linear map), the centre maps through the grid, the covariance becomes ``A Sigma A^T`` (mm^2),
whose eigenvectors are the physical axes and the square roots of its eigenvalues the extents
(one standard deviation, mm), and the weight becomes the displacement ``A v`` in LPS mm.

Play-back is written as warped images, not fields: a volume sequence opens in Slicer's Sequences
module and plays without any transform arithmetic in Slicer (the Slicer layer does no image
math), it is a third of the size of the fields, and every cumulative field can be rebuilt exactly
from the closed-form parameters in the point list.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ...core.geometry import Grid
from ...io.images import _atomic_output, write_markups_json
from .gaussians import GaussianParameters, local_deformation, normalized_grid, voxel_scale
from ...core.warp import warp

PathLike = Union[str, Path]


def _normalized_to_mm(grid: Grid) -> np.ndarray:
    """``A``: a normalised ``(k, j, i)`` vector -> an LPS mm vector on ``grid``."""
    scale = np.diag(voxel_scale(grid.shape, torch.float64).numpy())
    return grid.index_to_physical_matrix[:3, :3] @ scale


def describe_deformations(parameters: GaussianParameters, grid: Grid, item: int = 0,
                          certainty: Optional[torch.Tensor] = None) -> List[Dict[str, object]]:
    """The local deformations of batch item ``item`` in physical terms (JSON-able).

    Args:
        parameters: from :class:`~deepreglib.methods.r2n2.network.R2N2Output`, on ``grid``'s shape.
        grid: the grid the network ran on (the network grid of a run).
        certainty: optional ``(N, T, L)`` position certainties to include.
    Returns one dict per step (1-based ``step``): ``centre_lps`` (mm), ``axes_lps`` (three unit
    vectors, longest extent first, right-handed), ``extents_mm`` (standard deviations along
    them), ``weight_mm_lps`` (displacement at the centre, fixed -> moving), ``weight_voxel_kji``,
    and the raw normalised ``centre_normalized``, ``rotation_normalized`` (axes as columns),
    ``widths_normalized`` (variances), ``weight_normalized``.
    """
    p = parameters.detach()
    a = _normalized_to_mm(grid)
    scale = voxel_scale(grid.shape, torch.float64).numpy()
    out = []
    for t in range(p.steps):
        c = p.centres[item, t].double().cpu().numpy()
        rot = p.rotations[item, t].double().cpu().numpy()
        widths = p.widths[item, t].double().cpu().numpy()
        v = p.weights[item, t].double().cpu().numpy()
        cov_mm = a @ (rot @ np.diag(widths) @ rot.T) @ a.T
        evals, evecs = np.linalg.eigh(0.5 * (cov_mm + cov_mm.T))
        order = np.argsort(evals)[::-1]
        evals, evecs = evals[order], evecs[:, order]
        if np.linalg.det(evecs) < 0:  # an ellipsoid's axis sign is free: keep a proper rotation
            evecs[:, 2] *= -1
        entry = {
            "step": t + 1,
            "centre_lps": grid.index_to_physical((c + 1.0) * scale).tolist(),
            "axes_lps": evecs.T.tolist(),
            "extents_mm": np.sqrt(np.clip(evals, 0.0, None)).tolist(),
            "weight_mm_lps": (a @ v).tolist(),
            "weight_voxel_kji": (scale * v).tolist(),
            "centre_normalized": c.tolist(),
            "rotation_normalized": rot.tolist(),
            "widths_normalized": widths.tolist(),
            "weight_normalized": v.tolist(),
        }
        if certainty is not None:
            entry["position_certainty"] = certainty[item, t].detach().double().cpu().tolist()
        out.append(entry)
    return out


def write_deformations_markups(path: PathLike, deformations: Sequence[Dict[str, object]],
                               name: str = "R2N2 local deformations") -> Path:
    """Write :func:`describe_deformations`' list as a Slicer point list (markups JSON, LPS).

    Each control point sits at a deformation's centre and is labelled ``l<step>``; its
    ``orientation`` holds the ellipsoid's axes (columns, LPS, row-major as Slicer stores it), its
    ``description`` a readable summary, and an ``r2n2`` member the full record (extents, weight
    vector, ...) for the Slicer module to draw ellipsoids and arrows. Slicer keeps the members its
    schema knows and ignores ``r2n2``.
    """
    if not deformations:
        raise ValueError("no local deformations to write")
    points = np.array([d["centre_lps"] for d in deformations], dtype=np.float64)
    attributes = []
    for d in deformations:
        axes = np.asarray(d["axes_lps"], dtype=np.float64).T  # columns = axes
        w = d["weight_mm_lps"]
        e = d["extents_mm"]
        attributes.append({
            "orientation": [float(x) for x in axes.ravel()],
            "description": (f"step {d['step']}: displacement ({w[0]:.2f}, {w[1]:.2f}, {w[2]:.2f}) mm LPS, "
                            f"extents {e[0]:.1f} x {e[1]:.1f} x {e[2]:.1f} mm (1 sd)"),
            "r2n2": dict(d),
        })
    return write_markups_json(path, points, names=[f"l{d['step']}" for d in deformations],
                              description="R2N2 local Gaussian deformations, in the order applied",
                              point_attributes=attributes, name=name)


def cumulative_frames(moving: torch.Tensor, parameters: GaussianParameters, item: int = 0) -> torch.Tensor:
    """Play-back frames ``(T + 1, D, H, W)``: ``M``, ``M o f_1``, ..., ``M o f_T`` for one batch
    item, ``moving`` ``(N, 1, D, H, W)`` on the grid the parameters were predicted on."""
    shape = tuple(moving.shape[2:])
    m = moving[item:item + 1]
    grid = normalized_grid(shape, m.dtype, m.device)
    field = m.new_zeros((1, 3) + shape)
    frames = [m[0, 0]]
    for t in range(parameters.steps):
        sl = slice(item, item + 1)
        field = field + local_deformation(parameters.centres[sl, t], parameters.rotations[sl, t],
                                          parameters.widths[sl, t], parameters.weights[sl, t], shape, grid)
        frames.append(warp(m, field)[0, 0])
    return torch.stack(frames, 0)


def write_volume_sequence(path: PathLike, frames: torch.Tensor, grid: Grid, index_name: str = "step",
                          index_values: Optional[Sequence[float]] = None) -> Path:
    """Write ``frames`` ``(T, D, H, W)`` on ``grid`` as a Slicer volume sequence (``.seq.nrrd``).

    The file is a 4D NRRD whose last axis is a ``list`` axis (the sequence index), with LPS space
    directions and origin, float32, gzip encoded, and the key/value pairs Slicer's
    ``vtkMRMLVolumeSequenceStorageNode`` reads (data node class, index name and values).
    """
    if frames.ndim != 4 or tuple(frames.shape[1:]) != grid.shape:
        raise ValueError(f"frames must be (T, {', '.join(map(str, grid.shape))}), got {tuple(frames.shape)}")
    if not str(path).endswith(".seq.nrrd"):
        raise ValueError(f"a volume sequence file must end in .seq.nrrd, got {path}")
    t = frames.shape[0]
    values = list(range(t)) if index_values is None else list(index_values)
    if len(values) != t:
        raise ValueError(f"got {len(values)} index values for {t} frames")
    arr = np.ascontiguousarray(frames.detach().cpu().numpy().astype("<f4"))
    linear = grid.direction_matrix @ np.diag(grid.spacing)  # columns: steps along i, j, k in LPS

    def vec(v):
        return "(" + ",".join(repr(float(x)) for x in v) + ")"

    d, h, w = grid.shape
    header = "\n".join([
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        "type: float",
        "dimension: 4",
        "space: left-posterior-superior",
        f"sizes: {w} {h} {d} {t}",
        "space directions: " + " ".join(vec(linear[:, a]) for a in range(3)) + " none",
        "kinds: domain domain domain list",
        f'labels: "" "" "" "{index_name}"',
        "endian: little",
        "encoding: gzip",
        "space origin: " + vec(grid.origin),
        "DataNodeClassName:=vtkMRMLScalarVolumeNode",
        "axis 3 index type:=numeric",
        "axis 3 index values:=" + " ".join(f"{v:g}" for v in values),
    ]) + "\n\n"
    # C order of (T, D, H, W) is W fastest, then H, D, T: NRRD's sizes order above
    payload = gzip.compress(arr.tobytes(), compresslevel=1)
    with _atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.encode("ascii"))
            f.write(payload)
    return Path(path)
