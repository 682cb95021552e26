"""Postprocessing + writing time of one 160x192x224 registration (issue 16, item 4: target <= 2 s
on 2 CPU cores), from the manifests of fresh worker processes.

    python benchmarks/write_timing.py [--repeats 3] [--method voxelmorph]

Uses the shared OASIS pair when present (as benchmarks/stage_timing.py), else synthetic phantoms
of that size. Prints the stage medians (s) and the files written; writes nothing else.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_timing import make_pair  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method", default="voxelmorph")
    p.add_argument("--init", default="none")
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="deepreg-write-timing-") as tmp:
        fixed, moving, source = make_pair(Path(tmp))
        for i in range(args.repeats):
            out = Path(tmp) / f"run{i}"
            subprocess.run([sys.executable, "-m", "deepreglib", "register", "--fixed", fixed, "--moving", moving,
                            "--out", str(out), "--method", args.method, "--init", args.init, "--device", "cpu",
                            "--progress", "none"], check=True)
            m = json.loads((out / "manifest.json").read_text())
            runs.append(m["timings"])
            files = {o["path"]: (out / o["path"]).stat().st_size for o in m["outputs"]}
    med = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    print(json.dumps({"pair": source, "method": args.method, "stage_medians_s": med,
                      "postprocess_plus_write_s": round(med["postprocess"] + med["write"], 3),
                      "runs": runs, "files_bytes": files}, indent=1))


if __name__ == "__main__":
    main()
