"""Seconds per training step of the campaign's recipes (voxelmorph, carnet) on the CPU, with the
network and the batch in the plain layout and in channels-last layout (issue 17, item 2):

    python benchmarks/training_step_layout.py [--shape 64 80 64] [--threads 1] [--repeats 3]
        [--out benchmarks/results/training-step-layout-DATE.json]

One step = the recipe's loss (local NCC, regulariser, 16-label Dice term) forward and backward on
a random pair at the cache's grid, batch 1; the minimum of ``--repeats`` after one warm-up. The
loss of both layouts is printed: it must be the same.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

import torch

from deepreglib.methods.registry import training_recipes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[64, 80, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["voxelmorph", "carnet"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recipes = training_recipes()
    run_args = argparse.Namespace(reg_weight=1.0, label_weight=1.0)
    g = torch.Generator().manual_seed(0)
    shape = (1, 1, *args.shape)
    fixed, moving = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    fixed_labels, moving_labels = torch.randint(0, 16, shape, generator=g), torch.randint(0, 16, shape, generator=g)
    rows = []
    for name in args.methods:
        recipe = recipes[name]
        base = recipe.build(run_args).train()
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            model = copy.deepcopy(base).to(memory_format=layout)
            batch = {"fixed": fixed.contiguous(memory_format=layout), "moving": moving.contiguous(memory_format=layout),
                     "fixed_labels": fixed_labels, "moving_labels": moving_labels}

            def step():
                torch.manual_seed(0)
                model.zero_grad()
                total, _ = recipe.loss(model, batch, run_args)
                total.backward()
                return float(total)

            step()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                loss = step()
                times.append(time.perf_counter() - t0)
            row = {"method": name, "layout": "channels_last_3d" if layout == torch.channels_last_3d else "contiguous",
                   "seconds_per_step": min(times), "loss": loss}
            rows.append(row)
            print(f"{name:12s} {row['layout']:18s} {row['seconds_per_step']:.3f} s/step  loss {loss:.5f}")
    result = {"date": _dt.date.today().isoformat(), "shape": args.shape, "threads": args.threads,
              "repeats": args.repeats,
              "load_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print("wrote", args.out)


if __name__ == "__main__":
    main()
