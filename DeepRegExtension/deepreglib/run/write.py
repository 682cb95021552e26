"""Stage ``write``: every output file, the QA picture and ``manifest.json``, into a temporary
folder renamed to ``--out`` when complete (a cancelled or crashed run leaves no half-written
result). The manifest's format is :mod:`deepreglib.io.protocol`."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np

from ..core.errors import BadInputError
from ..core.resample import resample_to_grid
from ..io import images as io
from ..io import protocol as P
from ..io.exchange import staged_folder
from ..io.images import SlabImageWriter
from ..methods.spec import MethodInfo
from .infer import Inference
from .load import Inputs
from .manifest import build_manifest, qa_numbers
from .options import RegisterOptions
from .scores import Scores
from .session import Session
from .to_fixed_grid import FixedGridResult


class _Outputs:
    """Lists the outputs written into ``folder`` (manifest entries)."""

    def __init__(self, folder: Path, session: Session):
        self.folder, self.session, self.entries = folder, session, []

    def file(self, name, kind, filename, grid, description, writer):
        writer(self.folder / filename)
        self.add(name, kind, filename, grid, description)

    def add(self, name, kind, filename, grid, description):
        self.entries.append(P.output_entry(name, kind, filename, grid, description))
        self.session.check()


#: file names of the outputs on the fixed grid: uncompressed MetaImage, written slab by slab
#: (gzip made writing ~5x slower for files read once, by Slicer, which reads .mha at once)
WARPED_FILE, JACOBIAN_FILE, LABELS_FILE = "warped.mha", "jacobian.mha", "warped_labels.mha"
FIELD_FILE, INVERSE_FILE = "displacement.mha", "inverse_displacement.mha"


def write(opts: RegisterOptions, info: MethodInfo, inputs: Inputs, inference: Inference,
          fx: FixedGridResult, metrics: Scores, session: Session) -> Path:
    """Write the run into ``opts.out``; returns the path of its manifest. Every fixed-grid output
    is computed once, slab by slab, and streamed to its file (``metrics`` and the QA picture's
    planes are filled on the way). The stage is timed by hand: computing counts as
    ``postprocess``, the rest as ``write``; the manifest records both before it ends.

    Raises BadInputError (exit 2) when the folder cannot be written (disk full, file size limit,
    read-only): nothing is left under ``--out`` then."""
    out = Path(opts.out).resolve()
    t_write = time.perf_counter()
    session.reporter.progress("write", 0.0, "writing outputs")
    try:
        with staged_folder(out) as tmp:
            outputs = _Outputs(tmp, session)
            qa = _stream_fixed_grid(outputs, opts, info, inputs, inference, fx, metrics)
            if fx.inverse_net_mm is not None and info.kind == "deformable":
                with SlabImageWriter(tmp / INVERSE_FILE, inputs.moving_grid, np.float32, 3) as w:
                    for _, _, inv in fx.inverse_slabs():
                        w.write(inv)
                        session.check()
            _list_outputs(outputs, opts, info, inputs, inference, fx)
            session.reporter.progress("write", 0.7, "outputs written")
            manifest = build_manifest(opts, info, inputs, inference, fx, metrics.result(), outputs.entries, session)
            if opts.qa:
                _draw_qa(tmp / "qa.png", opts, inputs, qa, metrics, manifest)
                outputs.entries.append(P.output_entry("qa", P.OUTPUT_QA_PNG, "qa.png", None, "QA picture"))
            session.timings["write"] = time.perf_counter() - t_write - qa["compute_s"]
            session.timings["total"] = session.elapsed()
            (tmp / P.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
            session.check()
            _past_the_point_of_no_return()
    except OSError as e:
        raise BadInputError(f"cannot write the results into {out.parent}: {e.strerror or e} "
                            f"({type(e).__name__}). Free disk space (or raise the file size limit), "
                            "or choose another --out; nothing was left there.") from None
    session.reporter.progress("write", 1.0, "done")
    return out / P.MANIFEST_NAME


def _past_the_point_of_no_return() -> None:
    """Outputs are complete and about to be renamed into place: from here a SIGTERM can no longer
    cancel the run, so it is ignored, and the worker exits 0 with its result (otherwise a signal
    arriving during the rename, or while Python shuts down, would end a finished run as killed).
    Only where the worker installed its own handler (the command line), in the main thread."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return
    if callable(signal.getsignal(signal.SIGTERM)):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stream_fixed_grid(outputs: _Outputs, opts, info, inputs: Inputs, inference: Inference,
                       fx: FixedGridResult, metrics: Scores) -> dict:
    """One pass over the fixed grid's slabs: warped image, displacement (deformable methods),
    Jacobian, warped labels and the method's own maps, each written as it is made; the scores
    and the QA picture's planes collect from the same slabs. Returns the QA collectors (and the
    seconds spent computing, ``compute_s``)."""
    from ..report.qa import PlaneCollector
    grid, folder, session = inputs.fixed_grid, outputs.folder, outputs.session
    centre = tuple(n // 2 for n in grid.shape)
    qa = {k: PlaneCollector(grid.shape, centre, channels=3 if k == "displacement" else 0)
          for k in ("before", "warped", "jacobian", "displacement")}
    labels = inputs.labels.get("moving_labels")
    volumes = inference.result.volumes
    compute = 0.0
    with contextlib.ExitStack() as files:
        def writer(filename, dtype=np.float32, components=1):
            return files.enter_context(SlabImageWriter(folder / filename, grid, dtype, components))
        warped_w = writer(WARPED_FILE)
        field_w = writer(FIELD_FILE, np.float32, 3) if info.kind == "deformable" else None
        jac_w = writer(JACOBIAN_FILE)
        labels_w = writer(LABELS_FILE, np.int16) if labels is not None else None
        volume_w = {name: writer(f"{name}.mha") for name in volumes}
        for k0, k1 in fx.slab_bounds():
            t0 = time.perf_counter()
            slab = fx.slab(k0, k1)
            warped_labels = None
            if labels is not None:
                warped_labels = fx.resample_on_fixed(labels[0], labels[1], slab.grid, interpolation="nearest")
            metrics.add(slab, labels_after=warped_labels)
            for key, value in (("before", slab.before), ("warped", slab.warped), ("jacobian", slab.jacobian),
                               ("displacement", slab.total_voxel)):
                qa[key].add(k0, value)
            maps = {name: resample_to_grid(v.detach().cpu().float(), inference.net, slab.grid)
                    for name, v in volumes.items()}
            compute += time.perf_counter() - t0
            warped_w.write(slab.warped)
            if field_w is not None:
                field_w.write(slab.total_mm)
            jac_w.write(slab.jacobian)
            if labels_w is not None:
                labels_w.write(warped_labels)
            for name, v in maps.items():
                volume_w[name].write(v)
            session.check()
            session.reporter.progress("write", 0.6 * k1 / grid.shape[0], "writing outputs")
    session.timings["postprocess"] = session.timings.get("postprocess", 0.0) + compute
    qa["compute_s"] = compute
    return qa


def _list_outputs(outputs: _Outputs, opts, info, inputs: Inputs, inference: Inference, fx: FixedGridResult):
    """The transforms written whole (small), and the manifest's list in its documented order."""
    fixed_grid, moving_grid = inputs.fixed_grid, inputs.moving_grid
    outputs.add("warped", P.OUTPUT_VOLUME, WARPED_FILE, fixed_grid, "moving image resampled onto the fixed grid")
    if info.kind == "deformable":
        outputs.add("transform", P.OUTPUT_DISPLACEMENT_FIELD, FIELD_FILE, fixed_grid,
                    "fixed->moving displacement (ITK vector image, LPS mm, on the fixed grid; the "
                    "initial transform is included)")
        if fx.inverse_net_mm is not None:
            outputs.add("inverse_transform", P.OUTPUT_DISPLACEMENT_FIELD, INVERSE_FILE,
                        moving_grid, "moving->fixed displacement on the moving grid (exact inverse of the "
                        "diffeomorphism, integrated from the negated velocity)")
    else:
        outputs.file("transform", P.OUTPUT_LINEAR_TRANSFORM, "transform.tfm", None,
                     "fixed->moving affine transform (ITK, LPS)",
                     lambda p: io.write_linear_transform(fx.matrix, str(p)))
    if opts.init != "none" or opts.initial_transform:
        outputs.file("initial_transform", P.OUTPUT_LINEAR_TRANSFORM, "initial_transform.tfm", None,
                     "the initial alignment (already included in the transform)",
                     lambda p: io.write_linear_transform(_initial_only(fx.matrix, inference.result), str(p)))
    outputs.add("jacobian", P.OUTPUT_JACOBIAN, JACOBIAN_FILE, fixed_grid,
                "Jacobian determinant of the transform on the fixed grid (<= 0: folding)")
    if "moving_labels" in inputs.labels:
        outputs.add("warped_labels", P.OUTPUT_LABELS, LABELS_FILE, fixed_grid,
                    "moving labels resampled onto the fixed grid (nearest neighbour)")
    outputs.entries.extend(inference.result.write_files(outputs.folder))
    outputs.session.check()
    for name in inference.result.volumes:
        outputs.add(name, P.OUTPUT_VOLUME, f"{name}.mha", fixed_grid, f"{name} (method output)")


def _initial_only(matrix: np.ndarray, result) -> np.ndarray:
    if result.matrix is None:
        return matrix
    return matrix @ np.linalg.inv(np.asarray(result.matrix, dtype=np.float64))


def _draw_qa(path: Path, opts: RegisterOptions, inputs: Inputs, qa: dict, metrics: Scores, manifest: dict) -> None:
    from ..report.qa import Planes, render_qa_png
    centre = qa["warped"].centre
    render_qa_png(path, Planes.of(inputs.fixed[0, 0].numpy(), centre), qa["before"].result(),
                  qa["warped"].result(), qa["jacobian"].result(metrics.jacobian_stats()),
                  displacement=qa["displacement"].result(),
                  spacing=tuple(inputs.fixed_grid.spacing_kji), metrics=qa_numbers(manifest),
                  title=f"{opts.method}: {Path(opts.moving).name} -> {Path(opts.fixed).name}")
