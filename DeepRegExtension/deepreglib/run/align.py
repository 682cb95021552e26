"""Stage ``align``: the initial 4x4 physical map (fixed -> moving points, LPS) from
``--initial-transform`` and ``--init``, and the check that the images then overlap."""
from __future__ import annotations

import numpy as np
import torch

from ..classic.align import box_centres_transform
from ..classic.auto import auto_transform
from ..classic.initial import initial_transform
from ..core.errors import BadInputError
from ..core.geometry import Grid, voxel_grid_points
from ..io import images as io
from .load import Inputs
from .options import RegisterOptions
from .session import Session


#: ``--init auto`` with ``--contrast different``: when either image's box is smaller than this on
#: its longest side (mm), no intensity alignment is tried and the boxes' centres are matched
#: (:func:`~deepreglib.classic.align.box_centres_transform`; an ``--initial-transform`` is kept
#: as it is). A few centimetres of one organ in another modality hold too little for it: on the
#: 27 MR to transrectal ultrasound prostate pairs (17.6 x 23.6 x 16.4 mm boxes) the automatic
#: alignment on mutual information took the gland Dice from 0.612 at the centred boxes to 0.270,
#: worse on 24 of them; the centre of mass gave 0.533 and a check on MIND-SSC could not tell the
#: two apart (docs/BENCHMARKS.md, "MR to ultrasound: a discrete step"). Whole brains, heads and
#: bodies are 120 mm and more.
SMALL_FIELD_OF_VIEW_MM = 60.0


def small_field_of_view(inputs: Inputs) -> bool:
    """Whether either image's box is under :data:`SMALL_FIELD_OF_VIEW_MM` on its longest side."""
    return min(float(np.max(inputs.fixed_grid.extent_mm)),
               float(np.max(inputs.moving_grid.extent_mm))) < SMALL_FIELD_OF_VIEW_MM


def align(opts: RegisterOptions, inputs: Inputs, session: Session, device: torch.device) -> np.ndarray:
    with session.stage("initialize"):
        matrix = np.eye(4)
        if opts.initial_transform:
            matrix = io.read_linear_transform(opts.initial_transform)
        progress = session.context("initialize").progress
        # mutual information where the contrasts differ (MR to ultrasound, MR to CT)
        similarity = "mi" if opts.contrast == "different" else "lncc"
        if opts.init == "auto" and opts.contrast == "different" and small_field_of_view(inputs):
            if not opts.initial_transform:
                matrix = box_centres_transform(inputs.fixed_grid, inputs.moving_grid)
            sizes = [round(float(np.max(g.extent_mm)), 1) for g in (inputs.fixed_grid, inputs.moving_grid)]
            message = (f"different contrasts and a small field of view (longest sides {sizes[0]} and {sizes[1]} mm, "
                       f"under {SMALL_FIELD_OF_VIEW_MM:.0f}): no intensity alignment, "
                       + ("the --initial-transform as given" if opts.initial_transform else
                          "the centres of the two image boxes matched")
                       + "; give --init rigid or affine to align by mutual information anyway")
            session.details["alignment"] = {"init": "auto", "quality": "not checked",
                                            "method": "initial-transform" if opts.initial_transform else "box-centres",
                                            "local_ncc": None, "longest_sides_mm": sizes, "message": message}
            session.warn(message)  # the user should look: nothing checked this start
        elif opts.init == "auto":
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
