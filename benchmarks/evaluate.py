"""Accuracy of the engine's methods on known-answer and real labelled pairs.

    python benchmarks/evaluate.py [--datasets synthetic brain_aseg oasis_pair] [--quick]
                                  [--methods voxelmorph voxelmorph+refine iterative]

Runs each method through the same entry point as the worker (``pipeline.register``), images only
(labels are never given to the registration), then scores the files it wrote: endpoint error
against the true field (mm, inside the fixed label map's foreground), Dice per label before/after
with the moving labels carried through the written displacement field by SimpleITK, HD95,
folding % and SDlogJ, wall time. Results go to
``benchmarks/results/accuracy-DATE.json``; ``benchmarks/make_report.py`` turns them into
``docs/BENCHMARKS.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import build  # noqa: E402

from deepreglib.io import read_displacement_field  # noqa: E402
from deepreglib.metrics import dice_per_label, hd95  # noqa: E402
from deepreglib.pipeline import RegisterOptions, register  # noqa: E402

#: name -> (method, refine steps)
def _configs():
    """identity, then every deformable method of the registry (rigid ones are scored by
    ``pose_range.py``), with ``+refine`` (50 steps) where the method supports it."""
    from deepreglib.registry import METHODS
    out = {"identity": None}
    for name, info in METHODS.items():
        if info.kind != "deformable":
            continue
        out[name] = (name, 0)
        if info.supports_refine:
            out[f"{name}+refine"] = (name, 50)
    return out


CONFIGS = _configs()


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def score(case, run_dir: Path, manifest: dict) -> dict:
    fixed_img = sitk.ReadImage(case["fixed"])
    spacing = np.array(fixed_img.GetSpacing()[::-1])
    res = {"metrics": manifest["metrics"], "timings": manifest["timings"],
           "peak_ram_mb": manifest["peak_memory_mb"]["ram"], "device": manifest["device"]}
    if case.get("gt_displacement"):
        u_gt, grid = read_displacement_field(case["gt_displacement"])
        u, _ = read_displacement_field(str(run_dir / "displacement.mha"))
        if case.get("fixed_labels"):  # inside the anatomy: background has no information to register
            mask = _array(case["fixed_labels"]) > 0
        else:
            fixed = sitk.GetArrayFromImage(fixed_img)
            mask = fixed > 0.05 * fixed.max()
        sp = torch.as_tensor(grid.spacing_kji, dtype=torch.float32).view(1, 3, 1, 1, 1)
        err = ((u - u_gt) * sp).norm(dim=1)[0].numpy()[mask]
        gt = (u_gt * sp).norm(dim=1)[0].numpy()[mask]
        res["epe_mm"] = {"mean": float(err.mean()), "median": float(np.median(err)),
                         "p95": float(np.percentile(err, 95))}
        res["epe_before_mm"] = float(gt.mean())
    if case.get("fixed_labels"):
        fl = _array(case["fixed_labels"]).astype(np.int32)
        moving_on_fixed = sitk.Resample(sitk.ReadImage(case["moving_labels"]), fixed_img, sitk.Transform(),
                                        sitk.sitkNearestNeighbor)
        before = sitk.GetArrayFromImage(moving_on_fixed).astype(np.int32)
        # the labels are not given to the registration (refinement could use them); they are
        # carried through the written transform file, as any user of the result would do
        field = sitk.ReadImage(str(run_dir / "displacement.mha"), sitk.sitkVectorFloat64)
        warped_labels = sitk.Resample(sitk.ReadImage(case["moving_labels"]), fixed_img,
                                      sitk.DisplacementFieldTransform(field), sitk.sitkNearestNeighbor)
        after = sitk.GetArrayFromImage(warped_labels).astype(np.int32)
        labels = case.get("labels_of_interest") or sorted(set(np.unique(fl)) - {0})
        d0 = dice_per_label(fl, before, labels)
        d1 = dice_per_label(fl, after, labels)
        res["dice_before"] = {str(k): v for k, v in d0.items()}
        res["dice_after"] = {str(k): v for k, v in d1.items()}
        res["dice_mean_before"] = float(np.nanmean(list(d0.values())))
        res["dice_mean_after"] = float(np.nanmean(list(d1.values())))
        res["hd95_mean_after_mm"] = float(np.nanmean([hd95(fl == k, after == k, spacing) for k in labels
                                                      if (fl == k).any() and (after == k).any()]))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["synthetic", "brain_aseg", "oasis_pair"])
    p.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--quick", action="store_true", help="fewer cases")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="deepreg-bench-") as tmp:
        tmp = Path(tmp)
        cases = build(args.datasets, tmp / "data", quick=args.quick)
        for case in cases:
            for cfg in args.methods:
                run_dir = tmp / "runs" / f"{case['name']}-{cfg}"
                if CONFIGS[cfg] is None:
                    method, refine = "identity", 0
                    opts = RegisterOptions(fixed=case["fixed"], moving=case["moving"], out=str(run_dir),
                                           method="voxelmorph", device=args.device, qa=False,
                                           weights=str(_identity_weights(tmp)))
                else:
                    method, refine = CONFIGS[cfg]
                    opts = RegisterOptions(fixed=case["fixed"], moving=case["moving"], out=str(run_dir),
                                           method=method, device=args.device, refine=refine, qa=False)
                t0 = time.perf_counter()
                manifest = json.loads(register(opts).read_text())
                wall = time.perf_counter() - t0
                r = score(case, run_dir, manifest)
                r.update({"dataset": case["dataset"], "case": case["name"], "config": cfg, "wall_s": wall,
                          "weights_sha256": manifest["weights"]["sha256"]})
                results.append(r)
                print(f"{case['name']:<18} {cfg:<18} wall {wall:6.1f}s "
                      f"dice {r.get('dice_mean_before', float('nan')):.3f}->{r.get('dice_mean_after', float('nan')):.3f} "
                      f"epe {r.get('epe_mm', {}).get('mean', float('nan')):.2f}mm "
                      f"fold {r['metrics']['folding_percent']:.3f}%", flush=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"accuracy-{stamp}.json"
    path.write_text(json.dumps({"date": stamp, "kind": "accuracy", "machine": _machine(args.device),
                                "quick": args.quick, "results": results}, indent=1))
    print(f"wrote {path}")


def _identity_weights(tmp: Path) -> Path:
    """An untrained VoxelMorph: its flow head starts at ~0, so it is the identity baseline."""
    from deepreglib.modelio import save_model
    from deepreglib.networks.voxelmorph import VoxelMorph
    path = tmp / "identity" / "identity.pt"
    if not path.is_file():
        torch.manual_seed(0)
        save_model(VoxelMorph(), path)
    return path


def _machine(device: str) -> dict:
    import os
    return {"device": device, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "torch": torch.__version__}


if __name__ == "__main__":
    main()
