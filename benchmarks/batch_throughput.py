"""Throughput of ``deepreg batch`` on real brains: pairs per minute with 1 and 2 local worker
processes (issue 19), on the inter-subject pairs of the ixi_muse **test** split (2 mm T1 with
labels, about 120x120x90; the pairs of benchmarks/datasets.py ``ixi_muse_cases``).

    python benchmarks/batch_throughput.py [--pairs 10] [--preset balanced | --method NAME]
                                          [--jobs 1 2] [--init auto] [--device cpu] [--out FILE.json]

Each setting runs the whole command in a fresh process (``python -m deepreglib batch PAIRS.csv
--out TMP --jobs N``): the wall time counts what a user waits for, start-up included; the
steady rate (first pair started to last pair ended) is recorded beside it. Writes
``benchmarks/results/batch-throughput-DATE.json`` (or ``--out``) with, per ``--jobs``: wall
seconds, pairs per minute, threads per job, the mean and max of each pair's own time and
the mean Dice after, from the batch's summary.csv. Needs ../shared/data/ixi_muse; run it when
the machine is otherwise idle (the numbers are of the cores the batch gets).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from datasets import SHARED, ixi_muse_cases  # noqa: E402


def _pairs(n: int):
    cases = []
    for case in ixi_muse_cases(SHARED, pairs=(n + 1) // 2):
        cases.append(case)
        if len(cases) == n:
            break
    return cases


def _write_table(path: Path, cases) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "fixed", "moving", "fixed_labels", "moving_labels"])
        for c in cases:
            w.writerow([c["name"], c["fixed"], c["moving"], c["fixed_labels"], c["moving_labels"]])
    return path


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def run_setting(table: Path, out: Path, jobs: int, run_args) -> dict:
    command = [sys.executable, "-m", "deepreglib", "batch", str(table), "--out", str(out), "--jobs", str(jobs),
               "--progress", "json", *run_args]
    t0 = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    pair_events = [e for e in events if e.get("stage") == "batch"]
    first = next((e["elapsed_s"] for e in pair_events if e.get("state") == "started"), None)
    last = max((e["elapsed_s"] for e in pair_events if e.get("state") in ("done", "failed")), default=None)
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    done = [r for r in rows if r["status"] == "done"]
    times = [t for t in (_number(r["total_s"]) for r in done) if t is not None]
    dice = [d for d in (_number(r["dice_after"]) for r in done) if d is not None]
    batch = json.loads((out / "batch.json").read_text())
    workers = [rec.get("worker") or {} for rec in batch["pairs"].values()]
    pids = {w.get("pid") for w in workers} - {None}
    threads = sorted({w.get("threads") for w in workers} - {None})
    steady = (last - first) if first is not None and last is not None and last > first else None
    return {"jobs": jobs, "exit_code": proc.returncode, "pairs": len(rows), "done": len(done),
            "failed": len(rows) - len(done), "wall_s": round(wall, 2),
            "pairs_per_min": round(len(done) / wall * 60, 3) if wall > 0 else None,
            "steady_s": None if steady is None else round(steady, 2),
            "pairs_per_min_steady": round(len(done) / steady * 60, 3) if steady else None,
            "worker_processes": len(pids), "threads_per_job": threads,
            "pair_seconds_mean": round(statistics.mean(times), 2) if times else None,
            "pair_seconds_max": round(max(times), 2) if times else None,
            "dice_after_mean": round(statistics.mean(dice), 4) if dice else None,
            "command": command[1:], "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=10, help="pairs of the ixi_muse test split (default 10)")
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--preset", default=None, help="fast | balanced | accurate (default: the batch's default)")
    p.add_argument("--method", default=None)
    p.add_argument("--init", default=None, help="e.g. none for a quick check")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores // jobs)")
    p.add_argument("--no-qa", action="store_true", help="no qa.png per pair")
    p.add_argument("--keep", default=None, help="keep the batch folders here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/batch-throughput-DATE.json)")
    args = p.parse_args(argv)
    cases = _pairs(args.pairs)
    if not cases:
        sys.exit(f"no ixi_muse pairs: {SHARED / 'ixi_muse'} is absent")
    run_args = ["--device", args.device]
    for name in ("preset", "method", "init", "threads"):
        if getattr(args, name) is not None:
            run_args += [f"--{name}", str(getattr(args, name))]
    if args.no_qa:
        run_args.append("--no-qa")
    date = datetime.date.today().isoformat()
    results = []
    with tempfile.TemporaryDirectory(prefix="deepreg-batch-throughput-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        table = _write_table(work / "pairs.csv", cases)
        for jobs in args.jobs:
            out = work / f"jobs{jobs}"
            if out.exists():
                sys.exit(f"{out} exists; choose another --keep folder (a batch there would resume)")
            print(f"--jobs {jobs}: {len(cases)} pairs ...", file=sys.stderr, flush=True)
            r = run_setting(table, out, jobs, run_args)
            print(f"  {r['done']}/{r['pairs']} done in {r['wall_s']} s: {r['pairs_per_min']} pairs/min "
                  f"(steady {r['pairs_per_min_steady']})", file=sys.stderr, flush=True)
            results.append(r)
    report = {"benchmark": "batch-throughput", "date": date, "dataset": "ixi_muse test split",
              "pairs": [c["name"] for c in cases], "settings": {k: getattr(args, k) for k in
                                                                 ("preset", "method", "init", "device", "threads")},
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "results": results}
    try:
        import torch
        report["machine"]["torch"] = torch.__version__
    except ImportError:
        pass
    path = Path(args.out) if args.out else HERE / "results" / f"batch-throughput-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(path)
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
