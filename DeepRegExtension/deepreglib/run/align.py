"""Stage ``align``: the initial 4x4 physical map (fixed -> moving points, LPS) from
``--initial-transform`` and ``--init``, and the check that the images then overlap."""
from __future__ import annotations

import numpy as np
import torch

from ..classic.initial import initial_transform
from ..classic.auto import auto_transform
from ..core.errors import BadInputError
from ..core.geometry import Grid, voxel_grid_points
from ..io import images as io
from .load import Inputs
from .options import RegisterOptions
from .session import Session


def align(opts: RegisterOptions, inputs: Inputs, session: Session, device: torch.device) -> np.ndarray:
    with session.stage("initialize"):
        matrix = np.eye(4)
        if opts.initial_transform:
            matrix = io.read_linear_transform(opts.initial_transform)
        progress = session.context("initialize").progress
        # mutual information where the contrasts differ (MR to ultrasound, MR to CT)
        similarity = "mi" if opts.contrast == "different" else "lncc"
        if opts.init == "auto":
            report = auto_transform(inputs.fixed_n, inputs.fixed_grid, inputs.moving_n, inputs.moving_grid,
                                    device=device, progress=progress, cancel=session.cancel, report=True,
                                    init=matrix if opts.initial_transform else None, similarity=similarity)
            matrix = report.matrix
            session.details["alignment"] = alignment_entry(report)
            if report.poor:
                session.warn(report.message)
            else:
                session.reporter.log(report.message)
        elif opts.init != "none":
            extra = {}
            if opts.initial_transform:
                if opts.init not in ("rigid", "affine"):
                    raise BadInputError(f"--init {opts.init} would discard the --initial-transform; use "
                                        "--init auto, rigid or affine to refine it, or --init none to use it as is")
                extra["init"] = matrix
            if opts.init in ("rigid", "affine"):
                extra["similarity"] = similarity
            matrix = initial_transform(opts.init, inputs.fixed_n, inputs.fixed_grid, inputs.moving_n,
                                       inputs.moving_grid, progress=progress,
                                       cancel=session.cancel, device=device, **extra)
        _check_overlap(overlap_fraction(inputs.fixed_grid, inputs.moving_grid, matrix), session)
        session.reporter.progress("initialize", 1.0, "initial alignment done")
    return matrix


def alignment_entry(report) -> dict:
    """The manifest's ``alignment`` section for an ``--init auto`` run."""
    return {"init": "auto", "quality": "poor" if report.poor else "ok",
            "local_ncc": round(float(report.lncc), 4),
            "local_ncc_turned_round": None if report.decoy_lncc is None else round(float(report.decoy_lncc), 4),
            "foreground_overlap": round(float(report.overlap), 4),
            "masked_to_smaller_foreground": bool(report.masked), "candidates": int(report.candidates),
            "steps": [int(s) for s in report.steps], "seconds": round(float(report.seconds), 3),
            "message": report.message}


def _check_overlap(overlap: float, session: Session) -> None:
    if overlap < 0.01:
        raise BadInputError(
            "the fixed and moving images do not overlap in physical space (less than 1% of the "
            "fixed image falls inside the moving one). Use --init auto to align them first, or "
            "give an --initial-transform.")
    if overlap < 0.5:
        session.warn(f"only {100 * overlap:.0f}% of the fixed image overlaps the moving image")


def overlap_fraction(fixed: Grid, moving: Grid, matrix: np.ndarray) -> float:
    """Fraction of fixed voxel centres (on a coarse 16^3 lattice) whose mapped point falls inside
    the moving image's box."""
    coarse = fixed.resized([min(16, s) for s in fixed.shape])
    pts = voxel_grid_points(coarse, torch.float64)[0].reshape(3, -1).T.numpy()
    mapped = pts @ matrix[:3, :3].T + matrix[:3, 3]
    idx = moving.physical_to_index(mapped)
    upper = np.asarray(moving.shape, dtype=np.float64) - 0.5
    inside = np.all((idx >= -0.5) & (idx <= upper), axis=1)
    return float(inside.mean())
