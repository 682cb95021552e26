"""Tune the instance optimiser's schedules on validation pairs only (never on test): Dice, endpoint
error, folding, SDlogJ and the time of the optimisation stage, per schedule, on the same pairs.

    python benchmarks/instance_tuning.py [--sets ixi synthetic known prostate] [--pairs 3] [--threads 2]
                                         [--similarity lncc|mind] [--out FILE.json]
                                         [--schedule NAME=JSON ...] [--only NAME ...]

The sets (none of them holds a pair of the benchmark's test data):

* ``ixi``: inter-subject pairs of the ixi_muse **val** split (2 mm, native geometry, ~145 labels);
* ``synthetic``: the engine's generator (as ``datasets.synthetic_cases``, 96x112x96 at 2 mm) from
  seeds 30 000 on, where the benchmark's synthetic pairs are seeds 10 000 on;
* ``known``: the unlabelled OASIS brains at 1 mm (``oasis_unlabeled``, no test subject of any
  benchmark set) warped by the brain_aseg benchmark's kind of random diffeomorphism
  (``datasets.known_deformation_cases``, seeds 40 000 on): endpoint error against the true field;
* ``prostate``: MR to transrectal ultrasound pairs of the prostate_mr_trus **train** split (as
  ``datasets.prostate_cases``; gland Dice), from the centred boxes (no alignment: it fails there),
  usually with ``--similarity mind``.

Each pair is aligned once (``--init auto``, except ``prostate``; its ``initial_transform.tfm`` is
reused by every schedule, so the numbers compare the optimiser alone); every schedule then runs in this process
through ``deepreglib.cli.main`` (``--initial-transform``, ``--init none``, ``--no-qa``) and its
written transform is scored by ``evaluate.score``, the benchmark's own scorer (Dice over all the
fixed map's labels, endpoint error inside the foreground, folding, SDlogJ); time is the manifest's
``inference`` stage. ``--schedule fast2='{"levels": [4, 2], "steps": [60, 40]}'`` adds a variant
(fields of :class:`deepreglib.classic.instance.Schedule`; ``"base": "balanced"`` changes only the
given fields of that schedule, and ``"convex": {...}`` gives a
:class:`deepreglib.classic.convex.ConvexStep`); the named schedules of the engine
always run unless ``--only`` names some. Results: ``benchmarks/results/instance-tuning-DATE.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import platform
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SHARED = HERE.parent.parent / "shared" / "data"


def ixi_val_pairs(folder: Path, n: int):
    src = SHARED / "ixi_muse"
    val = json.loads((src / "splits.json").read_text())["val"]
    for a, b in list(itertools.combinations(sorted(val), 2))[::7][:n]:
        yield {"dataset": "ixi_val", "name": f"{b}_to_{a}", "fixed": str(src / f"{a}_t1.nii.gz"),
               "moving": str(src / f"{b}_t1.nii.gz"), "fixed_labels": str(src / f"{a}_labels.nii.gz"),
               "moving_labels": str(src / f"{b}_labels.nii.gz")}


def synthetic_val_pairs(folder: Path, n: int):
    from datasets import synthetic_cases
    yield from synthetic_cases(folder, count=n, seed=30_000, prefix="synthetic_val")


def known_val_pairs(folder: Path, n: int):
    import SimpleITK as sitk
    from datasets import known_deformation_cases
    subjects = sorted((SHARED / "oasis_unlabeled").glob("subject_*.nii.gz"))
    for i in range(n):
        img = sitk.ReadImage(str(subjects[i % len(subjects)]))
        yield from known_deformation_cases(folder, img, None, f"known_{subjects[i % len(subjects)].name[:-7]}",
                                           [40_000 + i])


def prostate_train_pairs(folder: Path, n: int):
    from datasets import prostate_cases
    cases = list(prostate_cases(folder, "train"))
    yield from cases[::max(1, len(cases) // n)][:n]


SETS = {"ixi": (ixi_val_pairs, SHARED / "ixi_muse" / "splits.json"),
        "synthetic": (synthetic_val_pairs, None),
        "known": (known_val_pairs, SHARED / "oasis_unlabeled"),
        "prostate": (prostate_train_pairs, SHARED / "prostate_mr_trus" / "train")}
#: The start of each set's schedules: ``--init auto``, except the MR to ultrasound pairs, which
#: start from the centred boxes (the alignment fails there, docs/BENCHMARKS.md).
INIT = {"prostate": "none"}


def _run(argv):
    from deepreglib.cli import main
    code = main(argv)
    if code != 0:
        raise SystemExit(f"deepreg {' '.join(map(str, argv))} exited {code}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", choices=sorted(SETS), default=["ixi"])
    p.add_argument("--pairs", type=int, default=3, help="pairs of each set")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--schedule", action="append", default=[], metavar="NAME=JSON")
    p.add_argument("--only", nargs="*", help="run only these schedule names")
    p.add_argument("--similarity", choices=["lncc", "mind"], default="lncc",
                   help="the instance method's similarity (mind: different contrasts)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    for name in args.sets:
        needs = SETS[name][1]
        if needs is not None and not needs.exists():
            print(f"set {name} needs {needs}", file=sys.stderr)
            return 2
    from deepreglib.classic.instance import SCHEDULES, Schedule
    from evaluate import score
    for text in args.schedule:
        name, _, spec = text.partition("=")
        fields = json.loads(spec)
        base = fields.pop("base", None)  # "base": "balanced": that schedule with the given fields changed
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        SCHEDULES[name] = dataclasses.replace(SCHEDULES[base], **fields) if base else Schedule(**fields)
    names = args.only or list(SCHEDULES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for set_name in args.sets:
            for pair in SETS[set_name][0](tmp / "cases", args.pairs):
                common = ["--fixed", pair["fixed"], "--moving", pair["moving"],
                          "--threads", str(args.threads), "--no-qa", "--progress", "none"]
                start = tmp / f"{pair['name']}-init"
                init = []
                if INIT.get(set_name, "auto") != "none":
                    _run(["register", *common, "--init", "auto", "--method", "instance", "--out", str(start)])
                    init = ["--initial-transform", str(start / "initial_transform.tfm")]
                for name in names:
                    out = tmp / f"{pair['name']}-{name}"
                    _run(["register", *common, "--init", "none", *init, "--method", "instance",
                          "--method-option", f"schedule={name}", "--method-option",
                          f"similarity={args.similarity}", "--out", str(out)])
                    m = json.loads((out / "manifest.json").read_text())
                    transform = next(o for o in m["outputs"] if o["name"] == "transform")
                    scored = score(pair, str(out / transform["path"]), transform["kind"])
                    rows.append({"set": set_name, "pair": pair["name"], "schedule": name,
                                 "dice_before": scored.get("dice_mean_before"),
                                 "dice_after": scored.get("dice_mean_after"),
                                 "epe_mm": scored.get("epe_mm", {}).get("mean"),
                                 "folding_percent": scored["folding_percent"],
                                 "sd_log_jacobian": scored["sdlogj"],
                                 "seconds": m["timings"]["inference"], "total_s": m["timings"]["total"]})
                    print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for set_name in args.sets:
        for name in names:
            mine = [r for r in rows if r["schedule"] == name and r["set"] == set_name]
            entry = {k: statistics.mean(r[k] for r in mine) for k in
                     ("dice_before", "dice_after", "epe_mm", "folding_percent", "sd_log_jacobian", "seconds")
                     if mine and all(isinstance(r[k], (int, float)) for r in mine)}
            summary.setdefault(name, {"schedule": {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in asdict(SCHEDULES[name]).items()}})[set_name] = entry
    today = datetime.date.today().isoformat()
    out = args.out or HERE / "results" / f"instance-tuning-{today}.json"
    out.write_text(json.dumps({"date": today, "machine": platform.processor() or platform.machine(),
                               "threads": args.threads, "sets": args.sets, "pairs_per_set": args.pairs,
                               "rows": rows, "summary": summary}, indent=1))
    for name, s in summary.items():
        for set_name in args.sets:
            print(f"{name:>14} {set_name:>9}: " + ", ".join(f"{k} {v:.4g}" for k, v in s[set_name].items()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
