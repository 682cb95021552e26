"""Stage ``write``: every output file, the QA picture and ``manifest.json``, into a temporary
folder renamed to ``--out`` when complete (a cancelled or crashed run leaves no half-written
result). The manifest's format is :mod:`deepreglib.io.protocol`."""
from __future__ import annotations

import json
import time
from pathlib import Path
import numpy as np
import torch

from ..core.resample import resample_to_grid
from ..io import images as io
from ..io import protocol as P
from ..io.exchange import staged_folder
from ..methods.spec import MethodInfo
from .infer import Inference
from .load import Inputs
from .manifest import build_manifest, qa_numbers
from .options import RegisterOptions
from .session import Session
from .to_fixed_grid import FixedGridResult


class _Outputs:
    """Writes outputs into ``folder`` and lists them (manifest entries)."""

    def __init__(self, folder: Path, session: Session):
        self.folder, self.session, self.entries = folder, session, []

    def image(self, name, kind, filename, grid, description, image):
        io.write_image(image, str(self.folder / filename))
        self._add(name, kind, filename, grid, description)

    def file(self, name, kind, filename, grid, description, writer):
        writer(self.folder / filename)
        self._add(name, kind, filename, grid, description)

    def _add(self, name, kind, filename, grid, description):
        self.entries.append(P.output_entry(name, kind, filename, grid, description))
        self.session.check()


def write(opts: RegisterOptions, info: MethodInfo, inputs: Inputs, inference: Inference,
          fx: FixedGridResult, metrics: dict, session: Session) -> Path:
    """Write the run into ``opts.out``; returns the path of its manifest. The stage is timed by
    hand: the manifest records its time before it ends."""
    out = Path(opts.out).resolve()
    t_write = time.perf_counter()
    session.reporter.progress("write", 0.0, "writing outputs")
    with staged_folder(out) as tmp:
        outputs = _Outputs(tmp, session)
        _write_transform(outputs, opts, info, inputs, inference, fx)
        _write_images(outputs, inputs, inference, fx)
        session.reporter.progress("write", 0.7, "outputs written")
        manifest = build_manifest(opts, info, inputs, inference, fx, metrics, outputs.entries, session)
        if opts.qa:
            _draw_qa(tmp / "qa.png", opts, inputs, fx, manifest)
            outputs.entries.append(P.output_entry("qa", P.OUTPUT_QA_PNG, "qa.png", None, "QA picture"))
        session.timings["write"] = time.perf_counter() - t_write
        session.timings["total"] = session.elapsed()
        (tmp / P.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        session.check()
    session.reporter.progress("write", 1.0, "done")
    return out / P.MANIFEST_NAME


def _write_transform(outputs: _Outputs, opts, info, inputs: Inputs, inference: Inference, fx: FixedGridResult):
    fixed_grid, moving_grid = inputs.fixed_grid, inputs.moving_grid
    outputs.image("warped", P.OUTPUT_VOLUME, "warped.nii.gz", fixed_grid, "moving image resampled onto the fixed grid",
                  io.tensor_to_image(fx.warped, fixed_grid))
    if info.kind == "deformable":
        outputs.file("transform", P.OUTPUT_DISPLACEMENT_FIELD, "displacement.mha", fixed_grid,
                     "fixed->moving displacement (ITK vector image, LPS mm, on the fixed grid; the "
                     "initial transform is included)",
                     lambda p: io.write_physical_field(fx.total_mm, fixed_grid, str(p)))
        if fx.inverse_mm is not None:
            outputs.file("inverse_transform", P.OUTPUT_DISPLACEMENT_FIELD, "inverse_displacement.mha",
                         moving_grid, "moving->fixed displacement on the moving grid (exact inverse of the "
                         "diffeomorphism, integrated from the negated velocity)",
                         lambda p: io.write_physical_field(fx.inverse_mm.double(), moving_grid, str(p)))
    else:
        outputs.file("transform", P.OUTPUT_LINEAR_TRANSFORM, "transform.tfm", None,
                     "fixed->moving affine transform (ITK, LPS)",
                     lambda p: io.write_linear_transform(fx.matrix, str(p)))
    if opts.init != "none" or opts.initial_transform:
        outputs.file("initial_transform", P.OUTPUT_LINEAR_TRANSFORM, "initial_transform.tfm", None,
                     "the initial alignment (already included in the transform)",
                     lambda p: io.write_linear_transform(_initial_only(fx.matrix, inference.result), str(p)))


def _write_images(outputs: _Outputs, inputs: Inputs, inference: Inference, fx: FixedGridResult) -> None:
    grid = inputs.fixed_grid
    outputs.image("jacobian", P.OUTPUT_JACOBIAN, "jacobian.nii.gz", grid,
                  "Jacobian determinant of the transform on the fixed grid (<= 0: folding)",
                  io.tensor_to_image(fx.jacobian, grid))
    if "moving_labels" in inputs.labels:
        lab_t, lab_grid = inputs.labels["moving_labels"]
        wl = resample_labels(lab_t, lab_grid, grid, fx)
        outputs.image("warped_labels", P.OUTPUT_LABELS, "warped_labels.nii.gz", grid,
                      "moving labels resampled onto the fixed grid (nearest neighbour)",
                      io.tensor_to_image(wl.round().to(torch.int16), grid))
    outputs.entries.extend(inference.result.write_files(outputs.folder))
    outputs.session.check()
    for name, vol in inference.result.volumes.items():
        v = resample_to_fixed(vol, inference.net, grid)
        outputs.image(name, P.OUTPUT_VOLUME, f"{name}.nii.gz", grid, f"{name} (method output)",
                      io.tensor_to_image(v, grid))


def resample_labels(labels, grid, fixed_grid, fx: FixedGridResult):
    return resample_to_grid(labels, grid, fixed_grid, matrix_lps=fx.matrix, displacement_mm=fx.u_mm,
                            interpolation="nearest")


def resample_to_fixed(volume, net, fixed_grid):
    return resample_to_grid(volume.detach().cpu().float(), net, fixed_grid)


def _initial_only(matrix: np.ndarray, result) -> np.ndarray:
    if result.matrix is None:
        return matrix
    return matrix @ np.linalg.inv(np.asarray(result.matrix, dtype=np.float64))


def _draw_qa(path: Path, opts: RegisterOptions, inputs: Inputs, fx: FixedGridResult, manifest: dict) -> None:
    from ..report.qa import render_qa_png
    render_qa_png(path, inputs.fixed[0, 0].numpy(), fx.before[0, 0].numpy(), fx.warped[0, 0].numpy(),
                  fx.jacobian[0, 0].numpy(), displacement=fx.total_voxel[0].numpy(),
                  spacing=tuple(inputs.fixed_grid.spacing_kji), metrics=qa_numbers(manifest),
                  title=f"{opts.method}: {Path(opts.moving).name} -> {Path(opts.fixed).name}")

