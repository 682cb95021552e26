"""Time each stage of one registration of a 160x192x224 pair, and its peak memory.

    python benchmarks/stage_timing.py [--device cpu|cuda] [--repeats 3] [--refine 50]

Each run is a fresh worker process (``python -m deepreglib register --progress json``), exactly
as Slicer starts it, so the peak RAM (the process's max RSS, from the manifest) includes Python,
torch and the model. Targets (issue 2): network inference plus I/O under 20 s on the 2-core CPU and
under 1 s on a GPU; peak RAM under 4 GB. Results: ``benchmarks/results/timing-DATE-DEVICE.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_pair(folder: Path):
    """Two real 160x192x224 brains if the shared data is here, else two synthetic phantoms of
    that size (same cost: the timing does not depend on the content)."""
    a, b = SHARED / "oasis_unlabeled" / "subject_1.nii.gz", SHARED / "oasis_unlabeled" / "subject_2.nii.gz"
    if a.is_file() and b.is_file():
        return str(a), str(b), "oasis_unlabeled subject_1 <- subject_2"
    import SimpleITK as sitk
    from deepreglib.train.synth import example_pair
    pair = example_pair((224, 192, 160), seed=0)
    paths = []
    for name, t in (("fixed", pair.fixed), ("moving", pair.moving)):
        img = sitk.GetImageFromArray(t[0, 0].numpy())
        p = folder / f"{name}.nii.gz"
        sitk.WriteImage(img, str(p))
        paths.append(str(p))
    return paths[0], paths[1], "synthetic phantoms 160x192x224"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", default="voxelmorph")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--refine", type=int, default=50, help="also time a run with this many refinement steps (0: skip)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="deepreg-timing-") as tmp:
        tmp = Path(tmp)
        fixed, moving, source = make_pair(tmp)
        plan = [0] * args.repeats + ([args.refine] if args.refine else [])
        for i, refine in enumerate(plan):
            out = tmp / f"run{i}"
            cmd = [sys.executable, "-m", "deepreglib", "register", "--fixed", fixed, "--moving", moving,
                   "--out", str(out), "--method", args.method, "--device", args.device, "--refine", str(refine),
                   "--progress", "json", "--no-qa"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            m = json.loads((out / "manifest.json").read_text())
            t = m["timings"]
            io_and_net = sum(t.get(k, 0.0) for k in ("read", "preprocess", "inference", "postprocess", "write"))
            runs.append({"refine": refine, "timings": t, "network_plus_io_s": io_and_net,
                         "process_wall_s": wall, "peak_ram_mb": m["peak_memory_mb"]["ram"],
                         "peak_gpu_mb": m["peak_memory_mb"]["gpu"], "device": m["device"],
                         "network_grid": m["grids"]["network"]["size"], "weights_sha256": m["weights"]["sha256"]})
            print(f"run {i} refine={refine}: " + " ".join(f"{k} {v:.2f}s" for k, v in t.items()) +
                  f" | net+io {io_and_net:.2f}s | process {wall:.1f}s | peak RAM {runs[-1]['peak_ram_mb']:.0f} MB",
                  flush=True)
    plain = [r for r in runs if r["refine"] == 0]
    summary = {"network_plus_io_s_median": float(np.median([r["network_plus_io_s"] for r in plain])),
               "peak_ram_mb_max": float(max(r["peak_ram_mb"] for r in runs)),
               "stage_medians_s": {k: float(np.median([r["timings"].get(k, 0.0) for r in plain]))
                                   for k in plain[0]["timings"]}}
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"timing-{stamp}-{args.device.split(':')[0]}.json"
    path.write_text(json.dumps({"date": stamp, "kind": "timing", "pair": source, "method": args.method,
                                "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                            "device": args.device},
                                "summary": summary, "runs": runs}, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
