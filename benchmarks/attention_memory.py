"""Peak memory and time of the attention networks at clinical size (issue 4: CAR-Net at 160x192x224).

    python benchmarks/attention_memory.py [--device cpu|cuda] [--threads N] [--quick]

Every case runs in its own fresh process, so each peak is that case's alone:

* ``carnet`` -- the shipped CAR-Net, inference (posterior mean, no gradients) on a 160x192x224
  pair: features, co-attention at 1/4 resolution (``L = 40*48*56 = 107520`` tokens per image),
  U-Net, integration, upsampling, warping;
* ``coattention`` -- the co-attention block alone on the features CAR-Net makes at that size;
* ``coattention-naive@S`` / ``coattention@S`` -- the block with ``S = f g^T`` formed explicitly
  (the N x N reference the tests compare against) against the fused ``scaled_dot_product_attention``
  path, on a smaller input ``S`` where the explicit matrix still fits: the measured gap checks the
  quadratic estimate;
* ``amdf`` -- the shipped AMDF on the same pair (no attention matrix; for scale).

Memory on the CPU is the growth of the process's peak resident set (``ru_maxrss``) over the
moment before the forward pass (inputs and model already in memory); on CUDA it is
``torch.cuda.max_memory_allocated`` over the allocation before it. ``S`` in float32 takes
``4 L^2`` bytes, and the explicit softmax needs at least a second such matrix.
Results: ``benchmarks/results/attention-memory-DATE-DEVICE.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FULL = (160, 192, 224)  # (D, H, W) of the tensor: a 224x192x160 (x, y, z) volume
SMALL = (96, 96, 96)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _naive_attend(query, key, value):
    import torch
    s = query @ key.transpose(1, 2)  # (N, L_q, L_k): the matrix the fused path never forms
    return torch.softmax(s, dim=-1) @ value


def _child(case: str, shape, device: str, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from deepreglib.methods.weights import load_model, models_dir
    from deepreglib.methods.carnet import network as carnet_module
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand((1, 1) + tuple(shape), generator=g).to(dev)
    moving = torch.rand((1, 1) + tuple(shape), generator=g).to(dev)
    name = "amdf" if case == "amdf" else "carnet"
    model, card = load_model(models_dir() / f"{name}.pt", device=dev)
    model.eval()
    out = {"case": case, "shape_dhw": list(shape), "weights_sha256": card["sha256"]}
    with torch.no_grad():
        if case in ("coattention", "coattention-naive"):
            f_mov, f_fix = model.features(moving, fixed)
            out["feature_shape_dhw"] = list(f_mov.shape[2:])
            out["tokens"] = int(f_mov.shape[2] * f_mov.shape[3] * f_mov.shape[4])
            del fixed, moving
            if case == "coattention-naive":
                carnet_module.attend = _naive_attend  # the explicit N x N reference

            def run():
                return model.coattention(f_mov, f_fix)
        else:
            def run():
                return model(moving, fixed)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        before = _rss_mb()
        t0 = time.perf_counter()
        result = run()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            out["peak_gpu_above_inputs_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
        out["seconds"] = time.perf_counter() - t0
        out["peak_rss_mb"] = _rss_mb()
        out["rss_before_mb"] = before
        out["peak_above_inputs_mb"] = out["peak_rss_mb"] - before
        del result
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="the small-input comparison only (a minute)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.shape, args.device, args.threads)))
        return 0
    cases = [("coattention", SMALL), ("coattention-naive", SMALL)]
    if not args.quick:
        cases += [("coattention", FULL), ("carnet", FULL), ("amdf", FULL)]
    rows = []
    for case, shape in cases:
        cmd = [sys.executable, __file__, "--child", case, "--shape", *map(str, shape),
               "--device", args.device, "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"case": case, "shape_dhw": list(shape), "ok": False, "error": tail})
            print(f"{case:<20} {shape}: FAILED {tail}", flush=True)
            continue
        row = dict(json.loads(proc.stdout.strip().splitlines()[-1]), ok=True)
        if "tokens" in row:
            row["explicit_S_mb"] = 4.0 * row["tokens"] ** 2 / 2 ** 20
        rows.append(row)
        print(f"{case:<20} {shape}: {row['seconds']:.1f} s, peak +{row['peak_above_inputs_mb']:.0f} MB "
              f"(process {row['peak_rss_mb']:.0f} MB)" +
              (f", explicit S would be {row['explicit_S_mb']:.0f} MB" if "explicit_S_mb" in row else ""),
              flush=True)
    import torch
    stamp = datetime.date.today().isoformat()
    result = {"date": stamp, "kind": "attention-memory", "device": args.device, "threads": args.threads,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "python": platform.python_version()},
              "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"attention-memory-{stamp}-{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
