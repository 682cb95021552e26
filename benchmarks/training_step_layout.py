"""Seconds per training step of the campaign's recipes on the CPU, for the ways issue 17 (item 2)
asks to compare: memory layout, bf16 autocast, ``torch.compile``, batch size and threads.

    python benchmarks/training_step_layout.py [--shape 64 80 64] [--threads 1] [--repeats 3]
        [--methods voxelmorph carnet dnet] [--variants plain channels_last bf16 compile batch2]
        [--out benchmarks/results/training-step-layout-DATE.json]

One step = the recipe's loss (for the registration networks: local NCC, regulariser, 16-label
Dice term) forward and backward on a random pair (``--cache``: two real cached brains) at the cache's grid (D-Net: its own cube,
``--dnet-shape``), batch 1; the minimum of ``--repeats`` after one warm-up (``compile``: after
its compilation). Variants:

* ``plain``: contiguous tensors, float32;
* ``channels_last``: the network and the batch in channels-last 3D layout;
* ``bf16``: the recipe's own layout under ``torch.autocast("cpu", torch.bfloat16)``;
* ``bf16_conv``: only the convolutions under it, their outputs back in float32 (the loss, the
  warp and attention in float32);
* ``compile``: ``torch.compile(model)`` (inductor), the recipe's own layout, float32;
* ``batch2``: two pairs a step, reported per pair (``seconds_per_step`` is per pair).

Whether a variant still learns the same: the cosine between its gradient and the plain
variant's on the same pair (1 = the same direction), and its loss beside the plain one.
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
from deepreglib.train.loop import convolutions_in_bf16

VARIANTS = ("plain", "channels_last", "bf16", "bf16_conv", "compile", "batch2")


def _batch(name, shape, n, g, cache=None):
    full = (n, 1, *shape)
    if cache is not None:  # two (or 2n) real cached brains and 16 of their labels, as the campaign draws them
        import numpy as np
        from deepreglib.train.cache import load_cache
        from deepreglib.train.loop import real_pair
        subjects, _ = load_cache(cache, "train", ["ixi_muse"])
        rng = np.random.default_rng(0)
        vols, labels = [s.image for s in subjects[:8]], [s.labels for s in subjects[:8]]
        pairs = [real_pair(vols, shape, rng, labels, 16) for _ in range(n)]
        batch = {k: torch.cat([q[k] for q in pairs]) for k in pairs[0]}
        if name == "dnet":
            import torch.nn.functional as F
            batch = {k: F.interpolate(batch[k], size=tuple(shape), mode="trilinear", align_corners=True)
                     for k in ("fixed", "moving")}
        return batch
    batch = {"fixed": torch.rand(full, generator=g), "moving": torch.rand(full, generator=g)}
    if name != "dnet":
        batch["fixed_labels"] = torch.randint(0, 16, full, generator=g)
        batch["moving_labels"] = torch.randint(0, 16, full, generator=g)
    return batch


def _gradient(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])


def measure(name, recipe, variant, base, shape, run_args, repeats, g, cache=None):
    own = recipe.channels_last
    layout = {"plain": torch.contiguous_format, "channels_last": torch.channels_last_3d}.get(
        variant, torch.channels_last_3d if own else torch.contiguous_format)
    model = copy.deepcopy(base).to(memory_format=layout)
    n = 2 if variant == "batch2" else 1
    batch = {k: v.contiguous(memory_format=layout) if v.ndim == 5 and v.is_floating_point() else v
             for k, v in _batch(name, shape, n, g, cache).items()}
    net = torch.compile(model) if variant == "compile" else model
    if variant == "bf16_conv":
        convolutions_in_bf16(model)

    def step():
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        if variant == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                total, _ = recipe.loss(net, batch, run_args)
        else:
            total, _ = recipe.loss(net, batch, run_args)
        total.float().backward()
        return float(total.detach())

    t0 = time.perf_counter()
    step()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"method": name, "variant": variant, "batch": n, "seconds_per_step": min(times) / n,
            "first_step_s": warm, "loss": loss, "gradient": _gradient(model)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[64, 80, 64])
    p.add_argument("--dnet-shape", type=int, nargs=3, default=[48, 48, 48])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["voxelmorph", "carnet", "dnet"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--cache", default=None, help="a training cache: real brains instead of random images "
                   "(local NCC's gradient on noise is mostly rounding, which says nothing of bf16)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recipes = training_recipes()
    rows = []
    for name in args.methods:
        recipe = recipes[name]
        shape = args.dnet_shape if name == "dnet" else args.shape
        run_args = argparse.Namespace(reg_weight=1.0, label_weight=1.0, seed=0, current_step=0,
                                      shape=tuple(shape))
        base = recipe.build(run_args).train()
        plain = None
        for variant in ["plain"] + [v for v in args.variants if v != "plain"]:
            if variant == "batch2" and name == "dnet":
                continue  # D-Net's recipe makes its pair from one volume: batch 1 only
            row = measure(name, recipe, variant, base, shape, run_args, args.repeats, torch.Generator().manual_seed(0),
                          args.cache)
            grad = row.pop("gradient")
            if variant == "plain":
                plain = grad
            # in float64 with no floor on the norms (torch's eps would swamp a network's tiny gradients)
            row["gradient_cosine_to_plain"] = (None if variant == "batch2" else float(
                grad.double() @ plain.double() / (grad.double().norm() * plain.double().norm())))
            rows.append(row)
            print(f"{name:12s} {variant:14s} {row['seconds_per_step']:.3f} s/step (first {row['first_step_s']:.1f} s)"
                  f"  loss {row['loss']:.5f}  grad cos {row['gradient_cosine_to_plain']}", flush=True)
    result = {"date": _dt.date.today().isoformat(), "shape": args.shape, "dnet_shape": args.dnet_shape,
              "images": "training cache (real brains)" if args.cache else "random",
              "threads": args.threads, "repeats": args.repeats,
              "load_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print("wrote", args.out)


if __name__ == "__main__":
    main()
