"""R2N2's adaptive stop and compactness (issue 6).

    python benchmarks/r2n2_study.py [--quick]

On synthetic known-answer pairs (the engine's generator, 2 mm voxels), R2N2 runs on its network
grid with a fixed number of local deformations ``T`` (adaptive stop off) and with the adaptive
stop; each run reports the endpoint error (mm, inside the fixed label map's foreground), the mean
label Dice, the steps used and the number of parameters describing the transformation (each local
deformation: centre 3, rotation 3 degrees of freedom, widths 3, weight 3 = 12 numbers). The paper's compactness
comparison: a SimpleITK B-spline registration (``BSplineTransformInitializer`` mesh ``m``, LBFGS-B,
correlation metric, 3-level pyramid) for several mesh sizes, whose transformation has
``3 (m + 3)^3`` parameters. Results go to ``benchmarks/results/r2n2-DATE.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import List

import numpy as np
import SimpleITK as sitk
import torch

from deepreglib.geometry import Grid
from deepreglib.io import displacement_to_sitk, sitk_to_displacement, tensor_to_image
from deepreglib.methods.base import RunContext
from deepreglib.metrics import dice_per_label
from deepreglib.registry import get_method_info
from deepreglib.synth import synth_pair
from deepreglib.warp import warp

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (64, 64, 64)
SPACING = 2.0


def _epe_mm(u, u_gt, mask) -> float:
    return float(((u - u_gt) * SPACING).norm(dim=1)[0][mask].mean())


def _dice(fixed_labels, moving_labels, u) -> float:
    warped = warp(moving_labels.float(), u, interpolation="nearest").round().long()
    fl = fixed_labels.long()
    labels = sorted(set(torch.unique(fl).tolist()) - {0})
    return float(np.nanmean(list(dice_per_label(fl[0, 0].numpy(), warped[0, 0].numpy(), labels).values())))


def bspline(fixed, moving, grid: Grid, mesh: int):
    """SimpleITK B-spline registration; returns (displacement in voxels, parameter count, s)."""
    f, m = tensor_to_image(fixed, grid), tensor_to_image(moving, grid)
    tx = sitk.BSplineTransformInitializer(f, [mesh] * 3, order=3)
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsCorrelation()
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100)
    r.SetShrinkFactorsPerLevel([4, 2, 1])
    r.SetSmoothingSigmasPerLevel([2, 1, 0])
    r.SetInitialTransform(tx, inPlace=True)
    t0 = time.perf_counter()
    r.Execute(f, m)
    seconds = time.perf_counter() - t0
    field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, f.GetSize(), f.GetOrigin(),
                                              f.GetSpacing(), f.GetDirection())
    u, _ = sitk_to_displacement(field)
    return u.float(), len(tx.GetParameters()), seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one pair, fewer settings")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from deepreglib.registry import create_method
    grid = Grid(SHAPE, (SPACING,) * 3, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    steps_list: List[int] = [1, 3, 6, 12] if args.quick else [1, 3, 6, 12, 24]
    meshes: List[int] = [2, 4] if args.quick else [2, 4, 6, 8]
    rows = []
    for i in range(1 if args.quick else args.pairs):
        pair = synth_pair(SHAPE, seed=30_000 + i, max_std=3.0, same_contrast=True, full_resolution=True)
        mask = (pair.fixed_labels[0, 0] > 0)
        zero = torch.zeros_like(pair.displacement)
        row = {"pair": i, "identity": {"epe_mm": _epe_mm(zero, pair.displacement, mask),
                                       "dice": _dice(pair.fixed_labels, pair.moving_labels, zero)},
               "r2n2": [], "bspline": []}
        for t in steps_list + ["adaptive"]:
            opts = ({"max_steps": max(steps_list) * 2, "stop_threshold": 0.01} if t == "adaptive"
                    else {"max_steps": t, "stop_threshold": 0})
            method = create_method("r2n2", "cpu", sequence=False, **opts)
            t0 = time.perf_counter()
            res = method.run(pair.fixed, pair.moving, grid, RunContext())
            sec = time.perf_counter() - t0
            row["r2n2"].append({"setting": t, "steps_used": res.info["steps_used"],
                                "parameters": res.info["transformation_parameters"],
                                "epe_mm": _epe_mm(res.displacement, pair.displacement, mask),
                                "dice": _dice(pair.fixed_labels, pair.moving_labels, res.displacement),
                                "seconds": sec})
            print(f"pair {i} r2n2 {t}: {row['r2n2'][-1]}", flush=True)
        for mesh in meshes:
            u, n, sec = bspline(pair.fixed, pair.moving, grid, mesh)
            row["bspline"].append({"mesh": mesh, "parameters": n, "epe_mm": _epe_mm(u, pair.displacement, mask),
                                   "dice": _dice(pair.fixed_labels, pair.moving_labels, u), "seconds": sec})
            print(f"pair {i} bspline {mesh}: {row['bspline'][-1]}", flush=True)
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = out / f"r2n2-{stamp}.json"
    card = get_method_info("r2n2")
    path.write_text(json.dumps({"date": stamp, "threads": args.threads, "shape": SHAPE, "spacing_mm": SPACING,
                                "method": card.name, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


def markdown_section(result: dict) -> List[str]:
    """BENCHMARKS.md lines for one r2n2-DATE.json (means over pairs)."""
    rows = result["rows"]
    ident = np.mean([r["identity"]["epe_mm"] for r in rows]), np.mean([r["identity"]["dice"] for r in rows])
    lines = [f"Run of {result['date']} ({result['threads']} CPU threads), {len(rows)} synthetic pair(s) "
             f"{tuple(result['shape'])} at {result['spacing_mm']} mm. Identity: EPE {ident[0]:.2f} mm, "
             f"Dice {ident[1]:.3f}.", "",
             "| transformation | setting | steps used | parameters | EPE (mm) | Dice | seconds |", "|---|---|---|---|---|---|---|"]
    for k in range(len(rows[0]["r2n2"])):
        e = [r["r2n2"][k] for r in rows]
        lines.append(f"| R2N2 | T = {e[0]['setting']} | {np.mean([x['steps_used'] for x in e]):.1f} | "
                     f"{np.mean([x['parameters'] for x in e]):.0f} | {np.mean([x['epe_mm'] for x in e]):.2f} | "
                     f"{np.mean([x['dice'] for x in e]):.3f} | {np.mean([x['seconds'] for x in e]):.1f} |")
    for k in range(len(rows[0]["bspline"])):
        e = [r["bspline"][k] for r in rows]
        lines.append(f"| B-spline (SimpleITK) | mesh {e[0]['mesh']} | - | {e[0]['parameters']} | "
                     f"{np.mean([x['epe_mm'] for x in e]):.2f} | {np.mean([x['dice'] for x in e]):.3f} | "
                     f"{np.mean([x['seconds'] for x in e]):.1f} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
