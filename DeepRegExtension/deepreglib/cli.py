"""The ``deepreg`` command (also ``python -m deepreglib``): the worker Slicer launches and the tool
researchers run on cohorts.

Exit codes (DESIGN.md): 0 done, 2 bad input (the message says what and how to fix), 3 cancelled,
1 internal error.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from pathlib import Path
from typing import List, Optional

from .io.protocol import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_INTERNAL, EXIT_OK


class _ArgumentParser(argparse.ArgumentParser):
    """argparse exits with 2 on bad arguments, which is our bad-input code too; in JSON mode the
    message must also be a JSON line, so errors are raised and reported by :func:`main`."""

    def error(self, message):
        from .core.errors import BadInputError
        raise BadInputError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _register_parser(sub) -> None:
    from .run.initializers import init_choices
    from .methods.presets import PRESETS
    from .methods.registry import method_names
    p = sub.add_parser("register", help="register a moving image to a fixed image",
                       description="Register MOVING to FIXED and write the warped image, the transform, "
                                   "the Jacobian map, a QA picture and manifest.json to OUT.")
    p.add_argument("--fixed", required=True, help="fixed (reference) image: NIfTI, NRRD, MHA/MHD or a DICOM folder")
    p.add_argument("--moving", required=True, help="moving image, same formats")
    p.add_argument("--preset", default=None, choices=tuple(PRESETS),
                   help="fast | balanced | accurate: a whole recipe (alignment, method, optimisation) with "
                        "its measured time; default balanced when no --method is given")
    p.add_argument("--method", default=None, choices=method_names(),
                   help="the registration method (default: the preset's; see `deepreg methods`)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="N instance-optimisation steps after the network (0: none)")
    p.add_argument("--init", default=None, choices=init_choices(),
                   help="initial alignment; default auto (pose search, rigid then affine, with a quality "
                        "check) before a deformable method, none before a rigid/affine method")
    p.add_argument("--initial-transform", default=None, help="ITK linear transform file (fixed->moving) to start from")
    p.add_argument("--fixed-mask", default=None)
    p.add_argument("--moving-mask", default=None)
    p.add_argument("--fixed-labels", default=None, help="label map of the fixed image (Dice, refinement)")
    p.add_argument("--moving-labels", default=None, help="label map of the moving image (warped and scored)")
    p.add_argument("--fixed-landmarks", default=None, help="CSV or Slicer .mrk.json")
    p.add_argument("--moving-landmarks", default=None, help="CSV or Slicer .mrk.json, same order")
    p.add_argument("--weights", default=None, help="use these weights instead of the shipped ones")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the method (repeatable); VALUE is read as JSON when it parses, "
                        "e.g. query_point=[10.5,-3,22] or uncertainty_samples=16")
    p.add_argument("--contrast", default="same", choices=("same", "different"),
                   help="same: both images of one contrast (e.g. T1 MRs, any scanners); different: MR to "
                        "ultrasound, MR to CT (the alignment uses mutual information, the balanced and "
                        "accurate presets MIND-SSC)")
    p.add_argument("--no-qa", action="store_true", help="do not draw qa.png")
    p.add_argument("--no-cpu-fallback", action="store_true", help="fail instead of retrying on the CPU after CUDA OOM")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--progress", default="bar", choices=("json", "bar", "none"),
                   help="json: one JSON object per line on stdout (for Slicer); bar: a bar on stderr")


def _cmd_register(args, reporter) -> int:
    from .run.pipeline import RegisterOptions, register
    opts = RegisterOptions(
        fixed=args.fixed, moving=args.moving, out=args.out, method=args.method, preset=args.preset,
        device=args.device,
        refine=args.refine, init=args.init, initial_transform=args.initial_transform,
        fixed_mask=args.fixed_mask, moving_mask=args.moving_mask, fixed_labels=args.fixed_labels,
        moving_labels=args.moving_labels, fixed_landmarks=args.fixed_landmarks,
        moving_landmarks=args.moving_landmarks, weights=args.weights, qa=not args.no_qa,
        cpu_fallback=not args.no_cpu_fallback, threads=args.threads, contrast=args.contrast,
        method_options=parse_method_options(args.method_option))
    manifest = register(opts, reporter, cancel=lambda: bool(_CANCEL_REQUESTED))
    reporter.result(str(manifest))
    return EXIT_OK


def parse_method_options(items: List[str]) -> dict:
    """``["k=v", ...]`` -> ``{k: v}`` with ``v`` parsed as JSON when possible (else a string)."""
    from .core.errors import BadInputError
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"--method-option needs KEY=VALUE, got {item!r}")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.strip().replace("-", "_")] = value
    return options


def _cmd_batch(args, reporter) -> int:
    from .run.batch import batch_from_args
    return batch_from_args(args, parse_method_options(args.method_option))


def _cmd_methods(args, reporter) -> int:
    from .methods.presets import PRESETS
    from .methods.registry import METHODS
    if args.json:
        print(json.dumps([m.to_dict() for m in METHODS.values()], indent=2))
        return EXIT_OK
    for p in PRESETS.values():
        t = ", ".join(f"{k} {v:g} s" for k, v in p.expected_seconds.items())
        print(f"--preset {p.name:<10} {p.title}: {p.description}\n{'':<22}measured: {t} ({p.measured})")
    print()
    for m in METHODS.values():
        t = ", ".join(f"{k} ~{v:g} s" for k, v in m.expected_seconds.items())
        print(f"{m.name:<12} {m.kind:<11} {m.title}\n{'':<24}{m.description}\n{'':<24}"
              f"expected: {t}; weights: {m.weights or 'none needed'}\n")
    return EXIT_OK


def _cmd_devices(args, reporter) -> int:
    from .run.devices import list_devices
    devices = list_devices()
    if args.json:
        print(json.dumps({"event": "result", "devices": devices}), flush=True)
        return EXIT_OK
    for d in devices:
        print(f"{d['value']:<8} {d['label']}")
    return EXIT_OK


def _cmd_qa(args, reporter) -> int:
    from .report.transform_qa import QAOptions, run_qa
    opts = QAOptions(transform=args.transform, reference=args.reference, out=args.out,
                     inverse=args.inverse, fixed_landmarks=args.fixed_landmarks,
                     moving_landmarks=args.moving_landmarks, fixed_labels=args.fixed_labels,
                     warped_labels=args.warped_labels,
                     inverse_consistency=not args.no_inverse_consistency)
    reporter.result(str(run_qa(opts, reporter)))
    return EXIT_OK


def _cmd_train(args, reporter) -> int:
    from .methods.registry import training_recipes
    from .train.loop import train
    train(args, training_recipes(), log=lambda msg: print(msg, flush=True))
    return EXIT_OK


def _cmd_train_cache(args, reporter) -> int:
    import torch
    from .train.cache import build_cache
    torch.set_num_threads(args.threads)
    print(build_cache(args.data, args.out, shape=tuple(args.shape), spacing=args.spacing,
                      datasets=args.datasets, limit=args.limit, log=lambda m: print(m, flush=True)))
    return EXIT_OK


def _cmd_report(args, reporter) -> int:
    from .report.qa import report_from_manifest
    path = report_from_manifest(args.manifest, args.out)
    print(path)
    return EXIT_OK


def _cmd_example(args, reporter) -> int:
    """Make the bundled example pair (deterministic brain-like phantoms) and register it."""
    from .run.example import write_example_pair
    from .run.pipeline import RegisterOptions, register
    out = Path(args.out)
    from .run.options import check_output_folder
    check_output_folder(out)
    inputs = out.resolve().parent / f"{out.name}_inputs"
    fixed, moving, fixed_labels, moving_labels = write_example_pair(inputs)
    opts = RegisterOptions(fixed=str(fixed), moving=str(moving), out=str(out),
                           method=args.method, preset=args.preset, device=args.device,
                           refine=args.refine, fixed_labels=str(fixed_labels),
                           moving_labels=str(moving_labels))
    manifest = register(opts, reporter, cancel=lambda: bool(_CANCEL_REQUESTED))
    reporter.result(str(manifest))
    data = json.loads(Path(manifest).read_text())
    if args.progress != "json":
        met = data["metrics"]
        print(f"example inputs: {inputs}\nresults: {out}\n"
              f"Dice (mean over labels) {met.get('dice_mean_before', float('nan')):.3f} -> "
              f"{met.get('dice_mean_after', float('nan')):.3f}; NCC {met['ncc_before']:.3f} -> "
              f"{met['ncc_after']:.3f}; folding {met['folding_percent']:.3f}%; "
              f"time {data['timings']['total']:.1f} s on {data['device']}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="deepreg", description="Deep-learning 3D image registration (DeepRegExtension engine)")
    sub = parser.add_subparsers(dest="command", parser_class=_ArgumentParser)
    _register_parser(sub)
    from .run.batch import add_arguments as add_batch_arguments
    add_batch_arguments(sub.add_parser("batch", help="register a cohort: a table of pairs, or every scan to a "
                                                      "template; on local processes or a Dask cluster; resumable"))
    pm = sub.add_parser("methods", help="list the registration methods")
    pm.add_argument("--json", action="store_true")
    from .methods.registry import training_recipes
    from .train.loop import add_arguments
    from .train.cache import DATASETS as CACHE_SETS, DEFAULT_SETS as DEFAULT_CACHE_SETS
    pt = sub.add_parser("train", help="train (or resume training) a method's network")
    add_arguments(pt, training_recipes())
    pc = sub.add_parser("train-cache", help="align the real training scans affinely to one reference, once, "
                                             "and cache them on the coarse training grid")
    pc.add_argument("--data", required=True, help="the shared data folder (../shared/data)")
    pc.add_argument("--out", required=True, help="cache folder (resumes a build with the same settings)")
    pc.add_argument("--shape", type=int, nargs=3, default=(64, 80, 64), metavar=("D", "H", "W"))
    pc.add_argument("--spacing", type=float, default=2.5, help="mm")
    pc.add_argument("--datasets", nargs="+", default=list(DEFAULT_CACHE_SETS), choices=sorted(CACHE_SETS))
    pc.add_argument("--limit", type=int, default=None, help="at most this many subjects per split (tests)")
    pc.add_argument("--threads", type=int, default=1)
    pr = sub.add_parser("report", help="draw the QA picture of a finished run")
    pr.add_argument("manifest", help="a run's manifest.json")
    pr.add_argument("--out", default=None, help="PNG path (default: qa.png beside the manifest)")
    pd = sub.add_parser("devices", help="list the devices a run can use (GPUs with their free memory)")
    pd.add_argument("--json", action="store_true", help="one JSON line: {\"event\": \"result\", \"devices\": [...]}")
    pq = sub.add_parser("qa", help="Jacobian, folding, displacement, inverse consistency, TRE and label "
                                   "overlap of any transform file (DeformationQA's worker)")
    pq.add_argument("--transform", required=True, help="ITK transform file (.h5, .tfm, ...) or "
                                                       "displacement-field image, fixed -> moving")
    pq.add_argument("--reference", required=True, help="image whose grid the maps are computed on")
    pq.add_argument("--out", required=True, help="output folder (must be new or empty)")
    pq.add_argument("--inverse", default=None, help="the transform's inverse (default: exact for "
                                                    "linear, numerical for deformable)")
    pq.add_argument("--no-inverse-consistency", action="store_true")
    for side in ("fixed", "moving"):
        pq.add_argument(f"--{side}-landmarks", default=None, help=f"{side} points (CSV or markups JSON)")
    pq.add_argument("--fixed-labels", default=None, help="label map on the fixed side")
    pq.add_argument("--warped-labels", default=None, help="moving label map warped by the transform")
    pq.add_argument("--progress", default="bar", choices=("json", "bar", "none"))
    pe = sub.add_parser("example", help="register the bundled example pair (brain-like phantoms)")
    pe.add_argument("--out", default="example_out", help="output folder (must be new or empty)")
    pe.add_argument("--method", default=None)
    pe.add_argument("--preset", default=None, choices=("fast", "balanced", "accurate"))
    pe.add_argument("--device", default="auto")
    pe.add_argument("--refine", type=int, default=0)
    for p in (pt, pr, pm, pd):
        p.set_defaults(progress="bar")
    pe.add_argument("--progress", default="bar", choices=("json", "bar", "none"))
    return parser


def _make_reporter(kind: str):
    from .io.progress import BarReporter, JsonReporter, SilentReporter
    return {"json": JsonReporter, "bar": BarReporter}.get(kind, SilentReporter)()


#: set by SIGTERM: the run's cancel callback reads it too, so a CancelledError raised by the
#: handler where Python discards exceptions (a finalizer, a library's broad ``except``) still
#: stops the run at its next check
_CANCEL_REQUESTED = []


def _on_sigterm(signum, frame):
    from .core.errors import CancelledError
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: cleanup must not be interrupted again
    _CANCEL_REQUESTED.append(signum)
    raise CancelledError("cancelled by signal %d" % signum)


def _threads_in(argv: List[str]) -> Optional[int]:
    """``--threads N`` read from the raw arguments (argparse needs the method registry, which
    imports torch); ``None`` when absent or not a number (argparse reports that later)."""
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--threads=") else (
            argv[i + 1] if a == "--threads" and i + 1 < len(argv) else None)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before anything imports torch: idle OpenMP threads spin only when the cores are free, else
    # they sleep (run/cpu_policy.py has the measurements).
    from .run.cpu_policy import apply_wait_policy
    apply_wait_policy(_threads_in(argv))
    json_mode = "json" in argv and "--progress" in argv
    from .io.progress import JsonReporter, BarReporter
    reporter = JsonReporter() if json_mode else BarReporter()
    from .core.errors import BadInputError, CancelledError
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
        if hasattr(signal, "SIGXFSZ"):  # a file-size limit makes writes fail (EFBIG), not kill us
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return EXIT_BAD_INPUT
        reporter = _make_reporter(getattr(args, "progress", "bar"))
        handler = {"register": _cmd_register, "batch": _cmd_batch, "methods": _cmd_methods, "train": _cmd_train,
                   "train-cache": _cmd_train_cache,
                   "report": _cmd_report, "example": _cmd_example, "devices": _cmd_devices,
                   "qa": _cmd_qa}[args.command]
        return handler(args, reporter)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except BadInputError as e:
        reporter.error("bad_input", str(e))
        return EXIT_BAD_INPUT
    except (CancelledError, KeyboardInterrupt) as e:
        reporter.error("cancelled", str(e) or "cancelled")
        return EXIT_CANCELLED
    except Exception as e:  # noqa: BLE001 - the worker must always answer in its protocol
        tb = traceback.format_exc()
        if isinstance(reporter, JsonReporter):
            reporter.log(tb, "debug")
        else:
            sys.stderr.write(tb)
        reporter.error("internal", f"{type(e).__name__}: {e}")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
