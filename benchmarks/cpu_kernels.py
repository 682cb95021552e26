"""CPU kernels of the instance optimiser, before and after the 2026-12-06 changes:

- the warp (``F.grid_sample``, forward and backward) as one call, whose 3D CPU kernel runs a lone
  image on one thread, against ``core/warp._sample``, which cuts the grid into one slab per thread;
- the 3x3x3 smoother as ``avg_pool3d`` against the separable sum of shifted views
  (``classic/instance.box_mean3``).

    python benchmarks/cpu_kernels.py [--shape 96 112 112] [--threads 2] [--repeats 20]
        [--out benchmarks/results/cpu-kernels-DATE.json]

Each timing is the median of ``--repeats`` calls after two warm-up calls.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deepreglib.classic.instance import box_mean3
from deepreglib.core import warp as warp_module


def _median_s(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[96, 112, 112])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, *shape, generator=g)
    u0 = 2.0 * torch.randn(1, 3, *shape, generator=g)

    def warp_step(split: bool):
        def run():
            old = warp_module.SPLIT_MIN_VOXELS
            warp_module.SPLIT_MIN_VOXELS = old if split else 10 ** 12
            try:
                u = u0.clone().requires_grad_(True)
                warp_module.warp(image, u).sum().backward()
            finally:
                warp_module.SPLIT_MIN_VOXELS = old
        return run

    def smooth_step(separable: bool):
        def run():
            u = u0.clone().requires_grad_(True)
            out = box_mean3(u) if separable else F.avg_pool3d(F.pad(u, (1,) * 6, mode="replicate"), 3, stride=1)
            out.sum().backward()
        return run

    rows = {
        "warp_fwd_bwd_one_call_s": _median_s(warp_step(False), args.repeats),
        "warp_fwd_bwd_split_s": _median_s(warp_step(True), args.repeats),
        "smooth_fwd_bwd_avg_pool_s": _median_s(smooth_step(False), args.repeats),
        "smooth_fwd_bwd_separable_s": _median_s(smooth_step(True), args.repeats),
    }
    result = {"date": _dt.date.today().isoformat(), "shape": list(shape), "threads": args.threads,
              "repeats": args.repeats, "load_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "processor": platform.processor()},
              "timings": rows}
    for k, v in rows.items():
        print(f"{k:30s} {v * 1000:8.1f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print("wrote", args.out)


if __name__ == "__main__":
    main()
