"""Tune the instance optimiser's schedules on the ixi_muse **val** split (never on test): Dice,
folding and the time of the optimisation stage alone, per schedule, on the same pairs.

    python benchmarks/instance_tuning.py [--pairs 3] [--threads 2] [--out FILE.json]
                                         [--schedule NAME=JSON ...]

Each pair is aligned once (``--init auto``; its ``initial_transform.tfm`` is reused by every
schedule, so the numbers compare the optimiser alone); every schedule then runs in this process
through ``deepreglib.cli.main`` (``--initial-transform``, ``--init none``, ``--no-qa``) and is scored
by the run's own manifest (Dice over the fixed map's labels, folding, SDlogJ, the ``inference``
stage's seconds). ``--schedule fast2='{"levels": [4, 2], "steps": [60, 40]}'`` adds a variant
(fields of :class:`deepreglib.classic.instance.Schedule`); the named schedules of the engine
always run. Results: ``benchmarks/results/instance-tuning-DATE.json``.
"""
from __future__ import annotations

import argparse
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
SHARED = HERE.parent.parent / "shared" / "data"


def val_pairs(n: int):
    src = SHARED / "ixi_muse"
    val = json.loads((src / "splits.json").read_text())["val"]
    for a, b in list(itertools.combinations(sorted(val), 2))[::7][:n]:
        yield {"name": f"{b}_to_{a}", "fixed": src / f"{a}_t1.nii.gz", "moving": src / f"{b}_t1.nii.gz",
               "fixed_labels": src / f"{a}_labels.nii.gz", "moving_labels": src / f"{b}_labels.nii.gz"}


def _run(argv):
    from deepreglib.cli import main
    code = main(argv)
    if code != 0:
        raise SystemExit(f"deepreg {' '.join(map(str, argv))} exited {code}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--schedule", action="append", default=[], metavar="NAME=JSON")
    p.add_argument("--only", nargs="*", help="run only these schedule names")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not (SHARED / "ixi_muse" / "splits.json").is_file():
        print(f"needs {SHARED / 'ixi_muse'}", file=sys.stderr)
        return 2
    from deepreglib.classic.instance import SCHEDULES, Schedule
    for text in args.schedule:
        name, _, spec = text.partition("=")
        fields = json.loads(spec)
        SCHEDULES[name] = Schedule(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    names = args.only or list(SCHEDULES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for pair in val_pairs(args.pairs):
            common = ["--fixed", str(pair["fixed"]), "--moving", str(pair["moving"]),
                      "--fixed-labels", str(pair["fixed_labels"]), "--moving-labels", str(pair["moving_labels"]),
                      "--threads", str(args.threads), "--no-qa", "--progress", "none"]
            start = tmp / f"{pair['name']}-init"
            _run(["register", *common, "--init", "auto", "--method", "instance", "--out", str(start)])
            for name in names:
                out = tmp / f"{pair['name']}-{name}"
                _run(["register", *common, "--init", "none", "--initial-transform",
                      str(start / "initial_transform.tfm"), "--method", "instance",
                      "--method-option", f"schedule={name}", "--out", str(out)])
                m = json.loads((out / "manifest.json").read_text())
                metrics = m["metrics"]
                rows.append({"pair": pair["name"], "schedule": name,
                             "dice_after": metrics.get("dice_mean_after"),
                             "folding_percent": metrics.get("folding_percent"),
                             "sd_log_jacobian": metrics.get("sdlogj"),
                             "seconds": m["timings"]["inference"], "total_s": m["timings"]["total"]})
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for name in names:
        mine = [r for r in rows if r["schedule"] == name]
        summary[name] = {k: statistics.mean(r[k] for r in mine) for k in
                         ("dice_after", "folding_percent", "sd_log_jacobian", "seconds")
                         if all(isinstance(r[k], (int, float)) for r in mine)}
        summary[name]["schedule"] = {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in asdict(SCHEDULES[name]).items()}
    today = datetime.date.today().isoformat()
    out = args.out or HERE / "results" / f"instance-tuning-{today}.json"
    out.write_text(json.dumps({"date": today, "machine": platform.processor() or platform.machine(),
                               "threads": args.threads, "split": "ixi_muse val", "rows": rows,
                               "summary": summary}, indent=1))
    for name, s in summary.items():
        print(f"{name:>14}: " + ", ".join(f"{k} {v:.4g}" for k, v in s.items() if k != "schedule"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
