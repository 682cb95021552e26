"""Study (issue 16, the 1 mm gap): what a sparse 1 mm level after the balanced schedule would gain.

    python benchmarks/fine_level_study.py [THREADS] ['[{"fraction": 0.1, ...}, ...]'] [--out FILE]
                                          [--inter] [--pyramid balanced|accurate]

Validation data only: the unlabelled OASIS brains at 1 mm (``oasis_unlabeled``) under the
brain_aseg benchmark's kind of random diffeomorphism, seeds 40 000 on (as ``instance_tuning.py``'s
``known`` set; no pair of any benchmark's test data). No initial alignment: the pair differs by
the known field alone. ``balanced@2mm`` is :data:`~deepreglib.classic.instance.FROM_AFFINE` on the
2 mm grid the engine uses for these brains (``--pyramid accurate``: the accurate schedule instead); each variant then runs the engine's sparse fine
level (:func:`deepreglib.classic.fine.fine_register`, keyword sets of
:class:`~deepreglib.classic.fine.FineLevel`) at 1 mm. Endpoint error (mm) inside the foreground
against the true field; results in ``benchmarks/results/fine-level-study-DATE.json``.
Endpoint errors are in voxels of the 1 mm grid, i.e. mm.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SHARED = HERE.parent.parent / "shared" / "data"

from datasets import known_deformation  # noqa: E402
from deepreglib.classic.fine import FineLevel, fine_register  # noqa: E402
from deepreglib.classic.instance import SCHEDULES, foreground_box, instance_register  # noqa: E402
from deepreglib.classic.optimise import _level  # noqa: E402
from deepreglib.core.fields import resize_field  # noqa: E402
from deepreglib.core.jacobian import jacobian_determinant  # noqa: E402
from deepreglib.core.metrics import folding_percent, ncc_metric, sdlogj  # noqa: E402
from deepreglib.core.preprocess import normalize_intensity  # noqa: E402
from deepreglib.core.warp import warp  # noqa: E402


def case(path: Path, seed: int):
    """``(fixed, moving, true field)`` of one val brain under the benchmark's kind of deformation."""
    vol = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32))[None, None]
    u, w = known_deformation(vol.shape[2:], seed)
    return vol, warp(vol, w), u


def _fmt(scores) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in scores.items())


def epe(u, gt, fg):
    return float((u - gt).pow(2).sum(1).sqrt()[0][fg].mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("threads", nargs="?", type=int, default=1)
    p.add_argument("variants", nargs="?", default="[{}]", help="JSON list of FineLevel keyword sets")
    p.add_argument("--out", type=Path)
    p.add_argument("--inter", action="store_true",
                   help="also two inter-subject pairs of the val brains (SDlogJ, folding, NCC; no truth)")
    p.add_argument("--pyramid", choices=["balanced", "accurate"], default="balanced",
                   help="the schedule of the 2 mm pyramid the fine level starts from")
    args = p.parse_args(argv)
    subjects = sorted((SHARED / "oasis_unlabeled").glob("subject_*.nii.gz"))
    if not subjects:
        print(f"fine_level_study needs {SHARED / 'oasis_unlabeled'} (absent)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    variants = json.loads(args.variants)
    today = datetime.date.today().isoformat()
    out = args.out or HERE / "results" / f"fine-level-study-{today}.json"
    rows = []
    cases = []
    for i in range(2):  # the same brain under a known deformation
        fixed, moving, gt = case(subjects[i], 40_000 + i)
        cases.append(({"case": i, "kind": "known", "subject": subjects[i].name, "seed": 40_000 + i},
                      fixed, moving, gt))
    if args.inter:  # two different val brains (affinely aligned already): roughness only
        for a, b in ((2, 3), (3, 2)):
            read = [torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(subjects[k]))).astype(np.float32))
                    [None, None] for k in (a, b)]
            cases.append(({"case": len(cases), "kind": "inter", "fixed": subjects[a].name,
                           "moving": subjects[b].name}, read[0], read[1], None))
    for common, fixed, moving, gt in cases:
        f, m = normalize_intensity(fixed), normalize_intensity(moving)
        lo, hi = foreground_box(f, m)
        box = (Ellipsis,) + tuple(slice(a, b) for a, b in zip(lo, hi))
        fb, mb = f[box].contiguous(), m[box].contiguous()
        gtb = None if gt is None else gt[box]
        fg = fb[0, 0] > 0.05
        t = time.perf_counter()
        u2 = instance_register(_level(fb, 2.0), _level(mb, 2.0), schedule=SCHEDULES[args.pyramid], crop=False)
        t_bal = time.perf_counter() - t
        u_bal = resize_field(u2, fb.shape[2:])

        def scores(u):
            jac = jacobian_determinant(u)
            out = {"sdlogj": sdlogj(jac, fg), "folding_percent": folding_percent(jac, fg),
                   "ncc": ncc_metric(warp(mb, u, padding="border"), fb, fg[None, None])}
            if gtb is not None:
                out["epe_mm"] = epe(u, gtb, fg)
            return out

        first = scores(u_bal)
        if gtb is not None:
            first["epe_none_mm"] = epe(torch.zeros_like(gtb), gtb, fg)
        start = f"{args.pyramid}@2mm"
        print(f"{common} box {tuple(fb.shape[2:])} {start} {_fmt(first)} in {t_bal:.1f}s", flush=True)
        rows.append({**common, "variant": start, **first, "seconds": t_bal})
        for v in variants:
            t = time.perf_counter()
            u, info = fine_register(fb, mb, u_bal, FineLevel(**v))
            info["seconds"] = time.perf_counter() - t
            result = scores(u)
            print(f"   {v}: {_fmt(result)} {info}", flush=True)
            rows.append({**common, "variant": v, **result, **info})
    out.write_text(json.dumps({"date": today, "threads": torch.get_num_threads(),
                               "machine": platform.processor() or platform.machine(), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
