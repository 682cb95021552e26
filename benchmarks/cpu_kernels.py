"""CPU kernels of the instance optimiser, before and after the 2026-12-06 changes:

- the warp (``F.grid_sample``, forward and backward) as one call, whose 3D CPU kernel runs a lone
  image on one thread, against ``core/warp._sample``, which cuts the grid into one slab per thread;
- the 3x3x3 smoother as ``avg_pool3d`` against the separable sum of shifted views
  (``classic/smoothing.box_mean3``);
- the field's resize to the image grid (the finest level's field lives on a 2x coarser grid) as
  ``F.interpolate`` against ``core/fields.resize_field``'s three matrix products on the CPU;
- local NCC's box sums (three channels, window 5) as autograd through ``cumsum`` (the code before
  2026-12-06's second change, kept here as the reference) against ``core/losses.box_sum_cumsum``,
  whose backward pass is the mirrored box sum;
- the QA picture (``report.qa.render_qa_png``, now painted with numpy and Pillow) on a volume of
  the shape, with its import.

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

from deepreglib.classic.smoothing import box_mean3
from deepreglib.core import warp as warp_module
from deepreglib.core.fields import resize_field
from deepreglib.core.losses import box_sum_cumsum


def _autograd_cumsum_box(x, window):
    """The box sum as it was: autograd through cumsum, narrow and cat (the reference)."""
    for axis, w in enumerate(window):
        dim, n = 2 + axis, x.shape[2 + axis]
        back, forward = (w - 1) // 2, w // 2
        c = torch.cumsum(x, dim)
        upper = c.narrow(dim, forward, n - forward)
        size = list(c.shape)
        size[dim] = forward
        upper = torch.cat([upper, c.narrow(dim, n - 1, 1).expand(size)], dim)
        lower = torch.cat([torch.zeros_like(c.narrow(dim, 0, back + 1)), c.narrow(dim, 0, n - back - 1)], dim)
        x = upper - lower
    return x


_QA_SCRIPT = """
import sys, tempfile, time
from pathlib import Path
import numpy as np
import torch
t0 = time.perf_counter()
from deepreglib.report.qa import render_qa_png
t1 = time.perf_counter()
shape = tuple(int(n) for n in sys.argv[1:4])
rng = np.random.default_rng(0)
image = rng.random(shape, dtype=np.float32)
field = rng.normal(0.0, 1.0, (3,) + shape).astype(np.float32)
jacobian = 1.0 + 0.1 * field[0]
times = []
with tempfile.TemporaryDirectory() as folder:
    for n in range(3):
        t = time.perf_counter()
        render_qa_png(Path(folder) / f"qa{n}.png", image, image[::-1].copy(), image, jacobian, field,
                      metrics={"ncc_before": 0.5, "ncc_after": 0.9})
        times.append(time.perf_counter() - t)
print(t1 - t0, times[0], sorted(times[1:])[0])
"""


def _qa_page_s(shape) -> dict:
    """Seconds to import the QA module in a fresh interpreter (torch already loaded, as in a
    run), to render the first page (fonts load), and the best of two more pages."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _QA_SCRIPT, *map(str, shape)], capture_output=True,
                         text=True, check=True).stdout.split()
    return {"qa_import_s": float(out[0]), "qa_first_page_s": float(out[1]), "qa_page_s": float(out[2])}


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

    coarse = tuple(max(2, n // 2) for n in shape)
    field = torch.randn(1, 3, *coarse, generator=g)
    scale = torch.tensor([(n - 1) / (o - 1) for n, o in zip(shape, coarse)]).view(1, 3, 1, 1, 1)

    def resize_step(separable: bool):
        def run():
            v = field.clone().requires_grad_(True)
            out = resize_field(v, shape) if separable else \
                F.interpolate(v, size=shape, mode="trilinear", align_corners=True) * scale
            out.sum().backward()
        return run

    three = torch.rand(1, 3, *shape, generator=g)

    def box_step(function: bool):
        def run():
            x = three.clone().requires_grad_(True)
            out = box_sum_cumsum(x, (5, 5, 5)) if function else _autograd_cumsum_box(x, (5, 5, 5))
            (out * three).sum().backward()
        return run

    rows = {
        "resize_fwd_bwd_interpolate_s": _median_s(resize_step(False), args.repeats),
        "resize_fwd_bwd_separable_s": _median_s(resize_step(True), args.repeats),
        "box_sum_fwd_bwd_autograd_cumsum_s": _median_s(box_step(False), args.repeats),
        "box_sum_fwd_bwd_function_s": _median_s(box_step(True), args.repeats),
        "warp_fwd_bwd_one_call_s": _median_s(warp_step(False), args.repeats),
        "warp_fwd_bwd_split_s": _median_s(warp_step(True), args.repeats),
        "smooth_fwd_bwd_avg_pool_s": _median_s(smooth_step(False), args.repeats),
        "smooth_fwd_bwd_separable_s": _median_s(smooth_step(True), args.repeats),
    }
    rows.update(_qa_page_s(shape))
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
