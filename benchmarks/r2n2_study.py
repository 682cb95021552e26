"""R2N2's adaptive stop and compactness (issue 6).

    python benchmarks/r2n2_study.py [--quick]

On synthetic known-answer pairs (2 mm voxels) of two kinds, R2N2 runs on its network grid with
a fixed number of local deformations ``T`` (adaptive stop off) and with the adaptive stop; each run reports the endpoint error (mm, inside the fixed label map's foreground), the mean
label Dice, the steps used and the number of parameters describing the transformation (each local
deformation: centre 3, rotation 3 degrees of freedom, widths 3, weight 3 = 12 numbers). The paper's compactness
comparison: a SimpleITK B-spline registration (``BSplineTransformInitializer`` mesh ``m``, LBFGS-B,
correlation metric, 3-level pyramid) for several mesh sizes, whose transformation has
``3 (m + 3)^3`` parameters; the B-spline size of *equal accuracy* is interpolated (log-linear in
the parameter count) between the meshes whose endpoint errors bracket R2N2's best one.

Pair kinds (each with a real deformation, unlike the engine's default ``max_std`` 3 generator,
whose 0.65 mm mean displacement at 64^3 leaves nothing to measure):

* ``smooth``: the engine's generator with ``max_std`` 12 voxels and control nodes every 32
  voxels (mean displacement about 2.5 mm, largest about 7 mm);
* ``bumps``: a synthetic label image warped by a sum of ``BUMPS`` random local Gaussian
  deformations (R2N2's own transformation class: random centres inside the middle half, random
  axes, widths ``s`` in ``[0.01, 0.06]`` normalised units squared, weights up to 4 voxels).

Results go to ``benchmarks/results/r2n2-DATE.json``.
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

from deepreglib.core.geometry import Grid
from deepreglib.io.images import displacement_to_sitk, sitk_to_displacement, tensor_to_image
from deepreglib.methods.base import RunContext
from deepreglib.core.metrics import dice_per_label
from deepreglib.methods.r2n2.training import bump_pair_images
from deepreglib.methods.r2n2.gaussians import random_local_deformations
from deepreglib.methods.registry import get_method_info
from deepreglib.train.synth import synth_pair
from deepreglib.core.warp import warp

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


BUMPS = 6


def bumps_pair(seed: int):
    """A known-answer pair in R2N2's transformation class (see the module docstring)."""
    base = synth_pair(SHAPE, seed=seed, max_std=0.0, same_contrast=True)
    u = random_local_deformations(SHAPE, BUMPS, torch.Generator().manual_seed(seed))
    return bump_pair_images(base.moving_labels, u, seed + 1) + (u,)


def make_pair(kind: str, seed: int):
    if kind == "bumps":
        return bumps_pair(seed)
    p = synth_pair(SHAPE, seed=seed, max_std=12.0, scale=32, same_contrast=True, full_resolution=True)
    return p.fixed, p.moving, p.fixed_labels, p.moving_labels, p.displacement


def equal_accuracy_parameters(target_epe: float, bsplines: List[dict]):
    """B-spline parameter count of the same endpoint error as ``target_epe``: log-linear
    interpolation between the two meshes that bracket it; ``None`` when none does (then the
    table says whether every B-spline was better or worse)."""
    pts = sorted((b["parameters"], b["epe_mm"]) for b in bsplines)
    for (n0, e0), (n1, e1) in zip(pts, pts[1:]):
        if (e0 - target_epe) * (e1 - target_epe) <= 0 and e0 != e1:
            f = (e0 - target_epe) / (e0 - e1)
            return float(np.exp(np.log(n0) + f * (np.log(n1) - np.log(n0))))
    return None


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
    global SHAPE
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one pair, fewer settings")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--weights", default=None, help="R2N2 model file (default: the shipped r2n2.pt)")
    p.add_argument("--kinds", nargs="+", default=["smooth", "bumps"], choices=["smooth", "bumps"])
    p.add_argument("--meshes", nargs="+", type=int, default=None, help="B-spline mesh sizes")
    p.add_argument("--shape", type=int, default=64,
                   help="the pairs' cube size (default 64; the warm start trains at 32)")
    p.add_argument("--tag", default="", help="added to the results file's name")
    args = p.parse_args(argv)
    SHAPE = (args.shape,) * 3
    torch.set_num_threads(args.threads)
    from deepreglib.methods.registry import create_method
    grid = Grid(SHAPE, (SPACING,) * 3, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    steps_list: List[int] = [1, 3, 6, 12] if args.quick else [1, 3, 6, 12, 24]
    meshes: List[int] = args.meshes or ([2, 4] if args.quick else [2, 4, 6, 8])
    rows = []
    for kind in args.kinds:
        for i in range(1 if args.quick else args.pairs):
            fixed, moving, fixed_labels, moving_labels, u_gt = make_pair(kind, 30_000 + i)
            mask = (fixed_labels[0, 0] > 0)
            zero = torch.zeros_like(u_gt)
            row = {"kind": kind, "pair": i, "identity": {"epe_mm": _epe_mm(zero, u_gt, mask),
                                                         "dice": _dice(fixed_labels, moving_labels, zero)},
                   "r2n2": [], "bspline": []}
            for t in steps_list + ["adaptive"]:
                opts = ({"max_steps": max(steps_list) * 2, "stop_threshold": 0.01} if t == "adaptive"
                        else {"max_steps": t, "stop_threshold": 0})
                method = create_method("r2n2", "cpu", sequence=False, weights=args.weights, **opts)
                t0 = time.perf_counter()
                res = method.run(fixed, moving, grid, RunContext())
                sec = time.perf_counter() - t0
                row["r2n2"].append({"setting": t, "steps_used": res.info["steps_used"],
                                    "parameters": res.info["transformation_parameters"],
                                    "epe_mm": _epe_mm(res.displacement, u_gt, mask),
                                    "dice": _dice(fixed_labels, moving_labels, res.displacement),
                                    "seconds": sec})
                print(f"{kind} pair {i} r2n2 {t}: {row['r2n2'][-1]}", flush=True)
            for mesh in meshes:
                u, n, sec = bspline(fixed, moving, grid, mesh)
                row["bspline"].append({"mesh": mesh, "parameters": n, "epe_mm": _epe_mm(u, u_gt, mask),
                                       "dice": _dice(fixed_labels, moving_labels, u), "seconds": sec})
                print(f"{kind} pair {i} bspline {mesh}: {row['bspline'][-1]}", flush=True)
            best = min(row["r2n2"], key=lambda e: e["epe_mm"])
            row["compactness"] = {"r2n2_setting": best["setting"], "r2n2_parameters": best["parameters"],
                                  "r2n2_epe_mm": best["epe_mm"],
                                  "bspline_parameters_equal_epe": equal_accuracy_parameters(best["epe_mm"], row["bspline"])}
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = out / (f"r2n2-{stamp}-{args.tag}.json" if args.tag else f"r2n2-{stamp}.json")
    card = get_method_info("r2n2")
    weights = Path(args.weights).name if args.weights else "r2n2.pt (shipped)"
    path.write_text(json.dumps({"date": stamp, "threads": args.threads, "shape": SHAPE, "spacing_mm": SPACING,
                                "method": card.name, "weights": weights, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


def markdown_section(result: dict) -> List[str]:
    """BENCHMARKS.md lines for one r2n2-DATE.json (means over the pairs of each kind)."""
    lines: List[str] = []
    kinds = sorted({r.get("kind", "default") for r in result["rows"]})
    for kind in kinds:
        rows = [r for r in result["rows"] if r.get("kind", "default") == kind]
        lines += _kind_section(result, kind, rows)
    return lines


def _kind_section(result: dict, kind: str, rows: List[dict]) -> List[str]:
    ident = np.mean([r["identity"]["epe_mm"] for r in rows]), np.mean([r["identity"]["dice"] for r in rows])
    label = {"smooth": "smooth random deformation (max_std 12, nodes every 32 voxels)",
             "bumps": f"sum of {BUMPS} local Gaussian deformations",
             "default": "engine generator, max_std 3"}.get(kind, kind)
    lines = [f"Run of {result['date']} ({result['threads']} CPU threads, weights {result.get('weights', 'r2n2.pt')}), "
             f"{len(rows)} synthetic pair(s) {tuple(result['shape'])} at {result['spacing_mm']} mm, {label}. "
             f"Identity: EPE {ident[0]:.2f} mm, Dice {ident[1]:.3f}.", "",
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
    comp = [r["compactness"] for r in rows if "compactness" in r]
    if comp:
        lines.append("")
        for c, r in zip(comp, rows):
            eq = c["bspline_parameters_equal_epe"]
            if eq is None:
                better = all(b["epe_mm"] < c["r2n2_epe_mm"] for b in r["bspline"])
                eq_txt = ("every B-spline mesh tried was more accurate" if better
                          else "no B-spline mesh tried reached it")
            else:
                eq_txt = f"a B-spline of equal EPE needs about {eq:.0f} parameters ({eq / c['r2n2_parameters']:.1f}x)"
            lines.append(f"- Compactness, pair {r['pair']}: R2N2's best EPE {c['r2n2_epe_mm']:.2f} mm (T = "
                         f"{c['r2n2_setting']}) uses {c['r2n2_parameters']} parameters; {eq_txt}.")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
