"""Every registered method beside the registrations people use today, on the same pairs.

    python benchmarks/evaluate.py [--quick] [--datasets synthetic brain_aseg oasis_pair prostate_mr_trus]
                                  [--pairs-dir DIR] [--methods NAME ... | engine | peers]
                                  [--device cpu|cuda] [--threads 2] [--refine 50] [--list]

Runs, on every pair of the chosen datasets:

* every method of the engine's registry (``deepreglib.methods.registry.METHODS``), through the same entry
  point as the worker (``pipeline.register``), and again with ``--refine N`` where the method
  supports refinement and is deformable; a method whose weights file is missing under
  ``Resources/Models`` is skipped with a message;
* the peers of ``benchmarks/peers.py`` (ANTs SyN and SyNCC, elastix affine + B-spline,
  SimpleITK affine + demons, the SimpleITK affine alone, identity) with their documented
  defaults; a peer whose package is absent is skipped with a message (``pip install .[bench]``).

Each run is a fresh process (``benchmarks/run_one.py``) given images only: labels and landmarks
are never given to a registration. Every run writes one ITK file, the fixed -> moving map (a
displacement field on the fixed grid, or a ``.tfm`` for rigid/affine methods and peers), and
the same scorer reads that file for everyone: endpoint error against the true field (mm, inside
the fixed label map's foreground), Dice per label before/after and HD95 with the moving labels
carried through the transform by SimpleITK (nearest neighbour), target registration error of
landmarks mapped through it, folding % and SDlogJ of its Jacobian on the fixed grid; plus the
run's wall time, its process's peak RAM, its peak GPU memory on CUDA, and the ratio of its wall
time to the fastest peer's on the same pair (identity, which registers nothing, left out).

Honesty: all methods and peers get the same threads and the same pairs; ``--refine`` is one
number for every method (50 steps; 20 in ``--quick``, for every method alike); peers run with
their documented defaults. ``--quick`` (one pair per dataset: 1 synthetic 64x80x64, 1
brain_aseg at 2 mm, OASIS B->A at 2 mm, 1 prostate test pair) is meant to finish in about 10
minutes on an otherwise idle 2-core CPU; it leaves out ANTs SyNCC (see ``QUICK_SKIP``: its preset
alone takes longer than that on one brain), which runs in the full mode or when named in
``--methods``.

Results go to ``benchmarks/results/accuracy-DATE.json`` (``accuracy-DATE-cuda.json`` for a CUDA
run); ``benchmarks/make_report.py`` turns them into ``docs/BENCHMARKS.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402
from datasets import DATASETS, build  # noqa: E402

from deepreglib.io.images import read_displacement_field, read_landmarks, sitk_to_displacement  # noqa: E402
from deepreglib.core.jacobian import folding_fraction, jacobian_determinant, std_log_jacobian  # noqa: E402
from deepreglib.core.metrics import dice_per_label, hd95  # noqa: E402
from deepreglib.methods.weights import models_dir  # noqa: E402
from deepreglib.methods.presets import PRESETS  # noqa: E402
from deepreglib.methods.registry import METHODS  # noqa: E402

#: the preset configurations are listed after this method
METHOD_OF_PRESETS = "voxelmorph"

#: environment of every child process: the same number of threads for torch, ITK (ANTs,
#: elastix, SimpleITK) and any OpenMP/BLAS library
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


# -- what runs ------------------------------------------------------------------------------------
def _weights_file(stem: str) -> Optional[Path]:
    for suffix in (".pt", ".safetensors"):
        path = models_dir() / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def engine_configs(refine: int, quiet: bool = False) -> Dict[str, dict]:
    """Config name -> run spec for every method in the registry (read when called, so methods
    registered later are picked up), ``NAME+refine`` too where refinement applies."""
    out = {}
    for name, info in METHODS.items():
        if info.weights and _weights_file(info.weights) is None:
            if not quiet:
                print(f"skipping {name}: its weights {models_dir() / info.weights}.pt are missing", file=sys.stderr)
            continue
        out[name] = {"kind": "engine", "name": name, "refine": 0}
        if name == METHOD_OF_PRESETS:  # the presets, as a user runs them (QA picture on)
            for preset in PRESETS:
                out[f"preset-{preset}"] = {"kind": "engine", "name": None, "preset": preset, "refine": 0, "qa": True}
            # `--contrast different` (MR to ultrasound): mutual information alignment, MIND-SSC
            for preset in ("balanced", "accurate"):
                out[f"preset-{preset}-different"] = {"kind": "engine", "name": None, "preset": preset,
                                                     "refine": 0, "qa": True, "contrast": "different"}
            # the same from the centred boxes (--init none): a small field of view of another
            # modality, where the automatic alignment fails (MR to ultrasound)
            out["preset-balanced-different-centred"] = {"kind": "engine", "name": None, "preset": "balanced",
                                                        "refine": 0, "qa": True, "contrast": "different",
                                                        "init": "none"}
        # refinement optimises a field: a rigid/affine method's run would ignore it
        if refine > 0 and info.supports_refine and info.kind == "deformable":
            out[f"{name}+refine"] = {"kind": "engine", "name": name, "refine": refine}
    return out


#: refinement steps of the ``+refine`` runs: one number for every method, fewer in ``--quick``
REFINE_STEPS = 50
QUICK_REFINE_STEPS = 20

#: peers left out of ``--quick`` unless named in ``--methods``, and why (they still run in the full mode)
QUICK_SKIP = {"ants-syncc": "its preset runs up to 2100x1200x1200x20 SyN iterations with a CC metric and had "
                            "not finished one 2 mm brain after 11 minutes of CPU, more than the whole --quick budget"}


def extra_configs(entries: Optional[List[str]], refine: int) -> Dict[str, dict]:
    """``--extra NAME=METHOD:WEIGHTS``: a registered method with other weights (e.g. a baseline
    trained for the same budget as a new method), as config ``NAME`` and ``NAME+refine``."""
    out: Dict[str, dict] = {}
    for entry in entries or []:
        name, sep, rest = entry.partition("=")
        method, sep2, weights = rest.partition(":")
        if not (sep and sep2 and name and method and weights):
            raise SystemExit(f"--extra {entry!r}: expected NAME=METHOD:WEIGHTS, e.g. "
                             f"voxelmorph-eq=voxelmorph:benchmarks/models/voxelmorph-48-1600.pt")
        if method not in METHODS:
            raise SystemExit(f"--extra {entry!r}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        path = Path(weights).resolve()
        if not path.is_file():
            raise SystemExit(f"--extra {entry!r}: no weights file {path}")
        info = METHODS[method]
        out[name] = {"kind": "engine", "name": method, "refine": 0, "weights": str(path)}
        if refine > 0 and info.supports_refine and info.kind == "deformable":
            out[f"{name}+refine"] = {"kind": "engine", "name": method, "refine": refine, "weights": str(path)}
    return out


def peer_configs(quiet: bool = False) -> Dict[str, dict]:
    out = {}
    for name in peers.peer_names():
        if not peers.available(name):
            if not quiet:
                print(peers.missing_message(name), file=sys.stderr)
            continue
        out[name] = {"kind": "peer", "name": name}
    return out


def select(configs: Dict[str, dict], wanted: Optional[List[str]]) -> Dict[str, dict]:
    """``--methods``: config names, or the groups ``engine`` / ``peers``; default everything."""
    if not wanted:
        return configs
    keep = {}
    for w in wanted:
        group = {"engine": "engine", "peers": "peer"}.get(w)
        matched = [k for k, c in configs.items() if (c["kind"] == group if group else k == w)]
        if not matched:
            raise SystemExit(f"--methods: no runnable configuration {w!r}; available: engine, peers, "
                             f"{', '.join(configs)}")
        keep.update({k: configs[k] for k in matched})
    return {k: c for k, c in configs.items() if k in keep}  # registry order, then peers


def run_child(spec: dict, folder: Path, threads: int, timeout: Optional[float]) -> dict:
    """One run in a fresh process (``run_one.py``); its result dict plus ``process_s``."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = folder / "spec.json", folder / "result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.update({v: str(threads) for v in THREAD_VARIABLES})
    # OMP_WAIT_POLICY is left alone: each tool runs as a user would run it (the engine chooses its
    # own from the load, deepreglib/run/cpu_policy.py); run_one.py applies that choice
    t0 = time.perf_counter()
    try:
        # started in its own folder: whatever a tool writes beside itself stays out of the caller's
        proc = subprocess.run([sys.executable, str(HERE / "run_one.py"), str(spec_path), str(result_path)],
                              env=env, cwd=str(folder), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "process_s": time.perf_counter() - t0}
    process_s = time.perf_counter() - t0
    if not result_path.is_file():
        return {"ok": False, "error": f"exit code {proc.returncode}: {proc.stderr.strip()[-1500:]}",
                "process_s": process_s}
    result = json.loads(result_path.read_text())
    result["process_s"] = process_s
    return result


# -- scoring --------------------------------------------------------------------------------------
def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def load_transform(path: str, kind: str) -> sitk.Transform:
    """The fixed -> moving map a run wrote: a displacement-field image or a linear ``.tfm``."""
    if kind == "displacement_field":
        return sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(path), sitk.sitkVectorFloat64))
    return sitk.ReadTransform(path)


def dense_field(transform: sitk.Transform, fixed_img: sitk.Image) -> torch.Tensor:
    """``T(p) - p`` at every fixed voxel centre as an engine field ``(1, 3, D, H, W)`` in voxels
    (:func:`deepreglib.io.images.sitk_to_displacement`): the same representation for every run."""
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(fixed_img)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    return sitk_to_displacement(to_field.Execute(transform))[0]


def _hd95_cropped(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """:func:`hd95` on the two masks' joint bounding box plus one voxel (the same number: both
    surfaces lie inside it), which is what keeps 30 labels of a whole brain affordable."""
    both = a | b
    if not both.any():
        return float("nan")
    idx = np.argwhere(both)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, a.shape)
    box = tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))
    return hd95(a[box], b[box], spacing)


def _finite_or_none(x: float):
    return float(x) if np.isfinite(x) else None


def score(case: dict, transform_path: str, kind: str) -> dict:
    """Every figure of one run, from the transform file it wrote (see the module docstring)."""
    fixed_img = sitk.ReadImage(case["fixed"])
    spacing = np.array(fixed_img.GetSpacing()[::-1])
    transform = load_transform(transform_path, kind)
    u = dense_field(transform, fixed_img)
    jac = jacobian_determinant(u)  # voxel units: the determinant is the same (see jacobian.py)
    res = {"folding_percent": 100.0 * folding_fraction(jac), "sdlogj": std_log_jacobian(jac),
           "jacobian_min": float(jac.min())}
    del jac
    if case.get("gt_displacement"):
        u_gt, grid = read_displacement_field(case["gt_displacement"])
        if case.get("fixed_labels"):  # inside the anatomy: background has no information to register
            mask = _array(case["fixed_labels"]) > 0
        else:
            fixed = sitk.GetArrayFromImage(fixed_img)
            mask = fixed > 0.05 * fixed.max()
        sp = torch.as_tensor(grid.spacing_kji, dtype=torch.float32).view(1, 3, 1, 1, 1)
        err = ((u - u_gt) * sp).norm(dim=1)[0].numpy()[mask]
        gt = (u_gt * sp).norm(dim=1)[0].numpy()[mask]
        res["epe_mm"] = {"mean": float(err.mean()), "median": float(np.median(err)),
                         "p95": float(np.percentile(err, 95))}
        res["epe_before_mm"] = float(gt.mean())
    if case.get("fixed_labels"):
        fl = _array(case["fixed_labels"]).astype(np.int32)
        moving_labels = sitk.ReadImage(case["moving_labels"])
        before = sitk.GetArrayFromImage(sitk.Resample(moving_labels, fixed_img, sitk.Transform(),
                                                      sitk.sitkNearestNeighbor)).astype(np.int32)
        # the labels are not given to the registration (refinement could use them); they are
        # carried through the written transform file, as any user of the result would do
        after = sitk.GetArrayFromImage(sitk.Resample(moving_labels, fixed_img, transform,
                                                     sitk.sitkNearestNeighbor)).astype(np.int32)
        labels = case.get("labels_of_interest") or sorted(int(k) for k in set(np.unique(fl)) - {0})
        d0 = dice_per_label(fl, before, labels)
        d1 = dice_per_label(fl, after, labels)
        res["dice_before"] = {str(k): v for k, v in d0.items()}
        res["dice_after"] = {str(k): v for k, v in d1.items()}
        res["dice_mean_before"] = float(np.nanmean(list(d0.values())))
        res["dice_mean_after"] = float(np.nanmean(list(d1.values())))
        per = {str(k): _hd95_cropped(fl == k, after == k, spacing) for k in labels}
        finite = [v for v in per.values() if np.isfinite(v)]  # a label lost by the warp has no distance
        res["hd95_after_mm"] = {k: _finite_or_none(v) for k, v in per.items()}
        res["hd95_mean_after_mm"] = float(np.mean(finite)) if finite else None
    if case.get("fixed_landmarks"):
        p = read_landmarks(case["fixed_landmarks"])[1]
        q = read_landmarks(case["moving_landmarks"])[1]
        mapped = np.array([transform.TransformPoint(tuple(float(c) for c in pt)) for pt in p])
        before, after = np.linalg.norm(p - q, axis=1), np.linalg.norm(mapped - q, axis=1)
        res["tre_before_mm"] = float(before.mean())
        res["tre_after_mm"] = float(after.mean())
        res["tre_after_per_point_mm"] = [float(x) for x in after]
    return res


def add_peer_ratios(results: List[dict]) -> None:
    """``ratio_to_fastest_peer`` of every run of one pair: its wall time over the fastest peer's."""
    timed = [r for r in results
             if r["group"] == "peer" and r.get("ok") and r["config"] not in peers.NOT_A_REGISTRATION]
    if not timed:
        return
    fastest = min(timed, key=lambda r: r["wall_s"])
    for r in results:
        if r.get("ok"):
            r["fastest_peer"] = fastest["config"]
            r["ratio_to_fastest_peer"] = r["wall_s"] / fastest["wall_s"]


def _summary_line(r: dict) -> str:
    if not r.get("ok"):
        return f"{r['case']:<24} {r['config']:<24} FAILED: {r['error'].splitlines()[0][:200]}"
    dice = f" dice {r['dice_mean_before']:.3f}->{r['dice_mean_after']:.3f}" if "dice_mean_after" in r else ""
    epe = f" epe {r['epe_before_mm']:.2f}->{r['epe_mm']['mean']:.2f}mm" if "epe_mm" in r else ""
    tre = f" tre {r['tre_before_mm']:.2f}->{r['tre_after_mm']:.2f}mm" if "tre_after_mm" in r else ""
    return (f"{r['case']:<24} {r['config']:<24} wall {r['wall_s']:6.1f}s ram {r['peak_ram_mb']:5.0f}MB"
            f"{dice}{epe}{tre} fold {r['folding_percent']:.3f}%")


# -- the run --------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="*", default=None, choices=list(DATASETS),
                   help="built-in datasets (default all; none with --datasets and no name, e.g. for --pairs-dir)")
    p.add_argument("--pairs-dir", default=None,
                   help="also run on your own pairs: DIR/<case>/fixed.*, moving.*, optional fixed_labels.*, "
                        "moving_labels.*, fixed_landmarks.*, moving_landmarks.* (see benchmarks/datasets.py)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="configurations to run (names from --list, or 'engine' / 'peers'); default all")
    p.add_argument("--extra", nargs="+", default=None, metavar="NAME=METHOD:WEIGHTS",
                   help="also run METHOD with other weights as configuration NAME (and NAME+refine)")
    p.add_argument("--quick", action="store_true",
                   help="one pair per dataset, brains at 2 mm, fewer refinement steps (about 10 min on 2 cores)")
    p.add_argument("--refine", type=int, default=None,
                   help=f"refinement steps of every NAME+refine run, the same for all (default {REFINE_STEPS}, "
                        f"--quick {QUICK_REFINE_STEPS}; 0: no +refine runs)")
    p.add_argument("--ixi-pairs", type=int, default=None,
                   help="ixi_muse: this many subject pairs of the test split, each in both directions (default 10)")
    p.add_argument("--device", default="cpu", help="device of the engine methods (peers always run on the CPU)")
    p.add_argument("--threads", type=int, default=2, help="threads of every run, engine and peers alike")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before one run is stopped and recorded as failed (default: no limit)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--list", action="store_true", help="print the configurations that would run, and exit")
    p.add_argument("--tag", default=None,
                   help="write accuracy-DATE-TAG.json instead of accuracy-DATE.json (e.g. equal-budget)")
    p.add_argument("--update", default=None, metavar="RESULTS.json",
                   help="rerun the --methods configurations on that file's cases and settings (e.g. after "
                        "new weights) and replace their rows in it; the other rows stay; the file records "
                        "each update")
    args = p.parse_args(argv)
    named_datasets = args.datasets
    if args.datasets is None:
        args.datasets = list(DATASETS)
    previous = None
    if args.update:
        previous = _load_for_update(args, named_datasets)
    if args.refine is None:
        args.refine = QUICK_REFINE_STEPS if args.quick else REFINE_STEPS
    configs = select({**engine_configs(args.refine), **extra_configs(args.extra, args.refine), **peer_configs()},
                     args.methods)
    skipped = {}
    if args.quick:
        for name, why in QUICK_SKIP.items():
            if name in configs and name not in (args.methods or []):
                print(f"skipping {name} in --quick: {why} (name it in --methods to run it anyway, e.g. "
                      f"--methods engine peers {name})", file=sys.stderr)
                skipped[name] = why
                del configs[name]
    if args.list:
        for name, c in configs.items():
            print(f"{name:<26} {c['kind']}")
        return
    torch.set_num_threads(args.threads)
    # a stopped benchmark (SIGTERM, e.g. from `timeout`) stops its running child too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("benchmark stopped (SIGTERM)"))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    device_kind = args.device.split(":")[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if device_kind == "cpu" else f"-{device_kind}"
    tag += f"-{args.tag}" if args.tag else ""
    path = Path(args.update) if args.update else out / f"accuracy-{stamp}{tag}.json"
    results: List[dict] = []
    header = {"date": stamp, "kind": "accuracy", "format": 2, "machine": _machine(args.device, args.threads),
              "quick": args.quick, "refine_steps": args.refine, "configs": {k: dict(c) for k, c in configs.items()},
              "skipped_in_quick": skipped,
              "peer_descriptions": {k: peers.PEERS[k].description for k, c in configs.items() if c["kind"] == "peer"}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deepreg-bench-") as tmp:
        tmp = Path(tmp)
        cases = build(args.datasets, tmp / "data", quick=args.quick, pairs_dir=args.pairs_dir,
                      options={"ixi_muse": {"pairs": args.ixi_pairs}} if args.ixi_pairs else None)
        header["cases"] = {c["name"]: {"dataset": c["dataset"], "note": c.get("note", "")} for c in cases}
        for case in cases:
            case_results = []
            for cfg, spec in configs.items():
                run_dir = tmp / "runs" / f"{case['name']}-{cfg}"
                spec = dict(spec, fixed=case["fixed"], moving=case["moving"], out=str(run_dir / "out"),
                            device=args.device, threads=args.threads)
                child = run_child(spec, run_dir, args.threads, args.timeout)
                r = {"dataset": case["dataset"], "case": case["name"], "config": cfg, "group": spec["kind"],
                     "method": spec["name"], "refine": spec.get("refine", 0)}
                if spec.get("weights"):
                    r["weights"] = Path(spec["weights"]).name
                r.update({k: v for k, v in child.items() if k != "traceback"})
                if r["ok"]:
                    try:
                        r.update(score(case, child["transform"], child["transform_kind"]))
                        r["transform"] = Path(child["transform"]).name
                    except Exception as e:  # e.g. an unreadable transform: that run failed, the others go on
                        r.update(ok=False, error=f"scoring failed: {type(e).__name__}: {e}")
                elif child.get("traceback"):
                    print(child["traceback"].strip().splitlines()[-1], file=sys.stderr)
                case_results.append(r)
                print(_summary_line(r), flush=True)
            # an update's runs are timed against the peers already in the file
            add_peer_ratios(case_results + ([] if previous is None else [
                r for r in previous["results"] if r["case"] == case["name"] and r["group"] == "peer"
                and r["config"] not in configs]))
            results.extend(case_results)
            # written after every pair: a long run that is stopped keeps what it measured
            _write_results(path, header, results, time.perf_counter() - t_start, previous)
    _write_results(path, header, results, time.perf_counter() - t_start, previous)
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f} s)")


def _load_for_update(args, named_datasets: Optional[List[str]] = None) -> dict:
    """The results file ``--update`` names, with ``args`` set to its settings (datasets, quick,
    refinement steps, threads); refuses a run whose configurations are not named. Datasets named
    with ``--datasets`` narrow the rerun to those of the file (a name the file lacks is refused);
    without it every dataset of the file is rerun."""
    path = Path(args.update)
    if not path.is_file():
        raise SystemExit(f"--update {path}: no such results file")
    previous = json.loads(path.read_text())
    if previous.get("format", 1) < 2:
        raise SystemExit(f"--update {path}: a format-{previous.get('format', 1)} file; only format 2 can be updated")
    if not args.methods:
        raise SystemExit("--update needs --methods: the configurations to rerun (e.g. --methods amdf amdf+refine)")
    in_file = sorted({c["dataset"] for c in previous["cases"].values()})
    if named_datasets:
        missing = sorted(set(named_datasets) - set(in_file))
        if missing:
            raise SystemExit(f"--update {path}: it has no {', '.join(missing)} cases (it has "
                             f"{', '.join(in_file)}); run those without --update")
        args.datasets = [d for d in in_file if d in named_datasets]
    else:
        args.datasets = in_file
    args.quick = bool(previous.get("quick"))
    args.refine = previous.get("refine_steps", args.refine)
    args.threads = previous.get("machine", {}).get("threads", args.threads)
    return previous


def _write_results(path: Path, header: dict, results: List[dict], elapsed: float, previous: Optional[dict]) -> None:
    """A new results file, or ``previous`` with the rerun configurations' rows replaced (rows of
    cases the rerun did not reach yet are kept) and the update recorded."""
    if previous is None:
        path.write_text(json.dumps(dict(header, results=results, elapsed_s=elapsed), indent=1))
        return
    done = {(r["case"], r["config"]) for r in results}
    kept = [r for r in previous["results"] if (r["case"], r["config"]) not in done]
    configs = {**previous["configs"], **header["configs"]}  # a rerun configuration keeps its place
    case_order = {name: i for i, name in enumerate(previous["cases"])}
    config_order = {name: i for i, name in enumerate(configs)}
    merged = sorted(kept + results, key=lambda r: (case_order.get(r["case"], len(case_order)),
                                                   config_order.get(r["config"], len(config_order))))
    updated = dict(previous, results=merged, configs=configs)
    record = {"date": header["date"], "configs": sorted(header["configs"]), "machine": header["machine"],
              "elapsed_s": elapsed}
    updated["updates"] = [u for u in previous.get("updates", []) if u.get("date") != record["date"]
                          or u.get("configs") != record["configs"]] + [record]
    path.write_text(json.dumps(updated, indent=1))


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _machine(device: str, threads: int) -> dict:
    m = {"device": device, "cpu_count": os.cpu_count(), "cpu": _cpu_model(), "threads": threads,
         "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
         "SimpleITK": sitk.Version_VersionString(), "antspyx": _version("antspyx"),
         "itk-elastix": _version("itk-elastix"), "load_average_at_start": list(os.getloadavg())}
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        m["ram_gb"] = round(pages * page_size / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return m


if __name__ == "__main__":
    main()
