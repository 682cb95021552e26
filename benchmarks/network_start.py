"""Does a network save the instance optimiser steps? (issue 17's target: "carnet plus
optimisation reaches the optimiser-alone Dice with at most a third of its steps").

    python benchmarks/network_start.py [--pairs 10] [--networks carnet voxelmorph] [--threads 2]

On ordered pairs of the training cache's ``val`` subjects (unseen in training, already aligned
affinely by the cache, 64x80x64 at 2.5 mm; the same pairs as the campaign's validation):

* ``optimiser``: :func:`~deepreglib.classic.instance.instance_register` alone, the ``balanced``
  schedule from the affine start (the default's optimiser);
* ``NET``: the network alone (its shipped weights, as inference runs it);
* ``NET+from_network``: the optimiser started from the network's field with the ``from_network``
  schedule (the two finest levels);
* ``NET+balanced``: the ``balanced`` schedule started from the network's field;
* ``NET+last_level``: only ``balanced``'s finest level (its settings, at most 20 steps) from the
  network's field: the network stands in for the coarse levels; ``NET+last_level_10``: the same
  with at most 10 steps.

Each row: mean label Dice (over the labels present, then pairs, as the campaign's validation),
the Adam steps taken (every level stops when it converges) and the step cost in voxel-steps
(steps times the level's voxels: a coarse step is cheaper), folding, and the time (network
included). Settings are chosen here (val); a report on the test split is another run.
Results: ``benchmarks/results/network-start-DATE.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deepreglib.classic.instance import SCHEDULES, Schedule, instance_register
from deepreglib.core.jacobian import folding_fraction, jacobian_determinant
from deepreglib.core.metrics import dice_per_label
from deepreglib.core.warp import warp
from deepreglib.methods.base import RunContext
from deepreglib.methods.registry import create_method
from deepreglib.methods.weights import models_dir
from deepreglib.run.validate import validation_pairs
from deepreglib.train.cache import load_cache

RESULTS = Path(__file__).resolve().parent / "results"
#: balanced's finest level alone (its settings: field 2x coarser, 1 mean, diffusion 2 on the
#: increment and 2 on the whole field, the warped image's gradient)
LAST_LEVEL = Schedule(levels=(1,), steps=(20,), tol=1e-3, smooth_passes=1, smooth_weight=2.0, increments=True,
                      total_weight=2.0, warp_gradient="image")
#: the same level with half the steps: after a network the finest level starts close, and the
#: network only saves the user time if the level it leaves is shorter than the coarse ones it
#: replaces are cheap (2026-12-07: 20 steps gave 1.47 s against the optimiser's 1.30 s)
LAST_LEVEL_10 = Schedule(levels=(1,), steps=(10,), tol=1e-3, smooth_passes=1, smooth_weight=2.0, increments=True,
                         total_weight=2.0, warp_gradient="image")
REFINEMENTS = {"from_network": SCHEDULES["from_network"], "balanced": SCHEDULES["balanced"], "last_level": LAST_LEVEL,
               "last_level_10": LAST_LEVEL_10}


def _score(f, m, u):
    warped = warp(m.labels.float(), u, "nearest").long()
    return (float(np.mean(list(dice_per_label(f.labels, warped).values()))),
            100.0 * float(folding_fraction(jacobian_determinant(u))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default="runs/cache")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--networks", nargs="+", default=["carnet", "voxelmorph"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    subjects, grid = load_cache(args.cache, "val")
    subjects = [s for s in subjects if s.labels is not None]
    nets = {n: create_method(n, torch.device("cpu")) for n in args.networks}
    rows = {}

    def add(name, dice, folding, seconds, stats=None):
        r = rows.setdefault(name, {"dice": [], "folding_percent": [], "seconds": [], "steps": [], "voxel_steps": []})
        r["dice"].append(dice)
        r["folding_percent"].append(folding)
        r["seconds"].append(seconds)
        steps = sum(stats["steps"]) if stats else 0
        r["steps"].append(steps)
        r["voxel_steps"].append(sum(a * b for a, b in zip(stats["steps"], stats["voxels"])) if stats else 0)

    pairs = validation_pairs(len(subjects), args.pairs)
    for i, j in pairs:
        f, m = subjects[i], subjects[j]
        add("affine", *_score(f, m, torch.zeros(1, 3, *grid.shape)), 0.0)
        stats = {}
        t = time.perf_counter()
        u = instance_register(f.image, m.image, schedule=SCHEDULES["balanced"], stats=stats)
        add("optimiser", *_score(f, m, u), time.perf_counter() - t, stats)
        for name, net in nets.items():
            t = time.perf_counter()
            with torch.no_grad():
                u0 = net.run(f.image, m.image, grid, RunContext()).displacement.float()
            t_net = time.perf_counter() - t
            add(name, *_score(f, m, u0), t_net)
            for sched, schedule in REFINEMENTS.items():
                stats = {}
                t = time.perf_counter()
                u = instance_register(f.image, m.image, displacement=u0, schedule=schedule, stats=stats)
                add(f"{name}+{sched}", *_score(f, m, u), t_net + time.perf_counter() - t, stats)
        print(f"pair {i}->{j}: " + ", ".join(f"{k} {v['dice'][-1]:.3f}" for k, v in rows.items()), flush=True)
    base = rows["optimiser"]
    summary = {}
    for name, r in rows.items():
        summary[name] = {"dice": float(np.mean(r["dice"])), "folding_percent": float(np.mean(r["folding_percent"])),
                         "seconds": float(np.mean(r["seconds"])), "steps": float(np.mean(r["steps"])),
                         "voxel_steps": float(np.mean(r["voxel_steps"])),
                         "steps_vs_optimiser": float(np.mean(r["steps"]) / max(np.mean(base["steps"]), 1e-9)),
                         "voxel_steps_vs_optimiser": float(np.mean(r["voxel_steps"]) / max(np.mean(base["voxel_steps"]), 1e-9)),
                         "per_pair": r}
    out = {"date": datetime.date.today().isoformat(), "cache": str(args.cache), "pairs": len(pairs),
           "threads": args.threads, "grid": list(grid.shape), "summary": summary,
           "weights": {n: json.loads((models_dir() / f"{n}.json").read_text())["sha256"] for n in nets}}
    for name, s in summary.items():
        print(f"{name:28s} Dice {s['dice']:.4f}  steps {s['steps']:6.1f} ({s['steps_vs_optimiser']:.2f}x)  "
              f"voxel-steps {s['voxel_steps_vs_optimiser']:.2f}x  folding {s['folding_percent']:.4f} %  "
              f"{s['seconds']:.2f} s")
    path = Path(args.out) / f"network-start-{out['date']}{'-' + args.tag if args.tag else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
