"""Calibrate ``--init auto``'s quality check on validation data only: the local NCC of the result,
the best of its decoys (the result turned by 90, 180 and 270 degrees about each axis) and the
foreground overlap, for right answers and for answers known to be wrong.

    python benchmarks/alignment_quality.py [--pairs 4] [--threads 2] [--out FILE.json]

The cases (none of them holds a pair of the benchmark's test data):

* ``ixi``: inter-subject pairs of the ixi_muse **val** split (2 mm, native geometry), aligned by
  the search (right: label Dice after the affine above 0.4), and the same pairs started 180
  degrees about one axis and 90 degrees about another with the search off (``init=``), which
  leaves the optimiser in a wrong basin (Dice below 0.3);
* ``ixi_head``: val subjects' skull-stripped brains against the whole head of another (the val
  split's one whole-head scan);
* ``synthetic``: the engine's generator from seeds 30 000 on (the benchmark's are 10 000 on):
  random contrasts, the truth is the identity affine plus a smooth deformation;
* ``known``: unlabelled OASIS brains at 1 mm under the brain_aseg benchmark's kind of random
  diffeomorphism (seeds 40 000 on): the truth is the identity affine.

An answer is right when its label Dice is above 0.4 (ixi), or when it moves the corners of the
fixed image's box by less than 10 mm from the identity (synthetic, known: the best affine of a
brain under a 4 mm-std random deformation is not quite the identity; 6-7 mm at the corners of
a 256 mm box). Results:
``benchmarks/results/alignment-quality-DATE.json``; the rule and its thresholds are in
:mod:`deepreglib.classic.auto` (``POOR_LNCC``, ``DECOY_MARGIN``).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SHARED = HERE.parent.parent / "shared" / "data"


def _read(path, labels=False):
    from deepreglib.core.preprocess import normalize_intensity
    from deepreglib.io import images as io
    img, grid = io.image_to_tensor(io.read_labels(path) if labels else io.read_image(path))
    return (img if labels else normalize_intensity(img)), grid


def _label_dice(fixed_labels, moving_labels, matrix) -> float:
    """Mean Dice over the fixed map's labels, the moving labels through ``matrix``."""
    from deepreglib.core.metrics import dice_per_label
    from deepreglib.core.resample import resample_to_grid
    fl, flg = _read(fixed_labels, labels=True)
    ml, mlg = _read(moving_labels, labels=True)
    warped = resample_to_grid(ml.float(), mlg, flg, matrix_lps=matrix, interpolation="nearest").long()
    fixed = fl.long()
    labels = [v for v in np.unique(fixed.numpy()) if v]
    return float(np.nanmean(list(dice_per_label(fixed, warped, labels).values())))


def _corner_error_mm(grid, matrix) -> float:
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in grid.shape])), dtype=np.float64)
    pts = np.stack([grid.index_to_physical(c) for c in corners])
    moved = pts @ matrix[:3, :3].T + matrix[:3, 3]
    return float(np.linalg.norm(moved - pts, axis=1).max())


def _turn(grid, axis, degrees):
    """``degrees`` about ``axis`` through the centre of ``grid``'s box."""
    from deepreglib.classic.auto import _about, _rotation
    c = grid.index_to_physical((np.asarray(grid.shape) - 1) / 2.0)
    return _about(c, c, _rotation(axis, degrees))


def _row(set_name, name, kind, report, truth: dict) -> dict:
    return {"set": set_name, "case": name, "start": kind, "lncc": report.lncc,
            "decoy_lncc": report.decoy_lncc, "margin": report.lncc - report.decoy_lncc,
            "overlap": report.overlap, "masked": report.masked, "poor": report.poor,
            "seconds": report.seconds, **truth}


def cases(folder: Path, n: int):
    from instance_tuning import known_val_pairs, synthetic_val_pairs
    src = SHARED / "ixi_muse"
    val = json.loads((src / "splits.json").read_text())["val"]
    for a, b in list(itertools.combinations(sorted(val), 2))[::7][:n]:
        yield "ixi", {"name": f"{b}_to_{a}", "fixed": str(src / f"{a}_t1.nii.gz"),
                      "moving": str(src / f"{b}_t1.nii.gz"), "fixed_labels": str(src / f"{a}_labels.nii.gz"),
                      "moving_labels": str(src / f"{b}_labels.nii.gz")}
    heads = [s for s in sorted(val) if (src / f"{s}_t1_wholehead.nii.gz").is_file()]
    for b in heads[:1]:
        for a in [s for s in sorted(val) if s != b][:max(1, n // 2)]:
            yield "ixi_head", {"name": f"{b}_head_to_{a}", "fixed": str(src / f"{a}_t1.nii.gz"),
                               "moving": str(src / f"{b}_t1_wholehead.nii.gz"),
                               "fixed_labels": str(src / f"{a}_labels.nii.gz"),
                               "moving_labels": str(src / f"{b}_labels.nii.gz")}
    for case in synthetic_val_pairs(folder, n):
        yield "synthetic", case
    for case in known_val_pairs(folder, max(1, n // 2)):
        yield "known", case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not (SHARED / "ixi_muse" / "splits.json").is_file():
        print(f"needs {SHARED / 'ixi_muse'}", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(args.threads)
    from deepreglib.classic.auto import auto_transform
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for set_name, case in cases(Path(tmp), args.pairs):
            f, fg = _read(case["fixed"])
            m, mg = _read(case["moving"])
            starts = [("search", None)]
            if set_name == "ixi":
                starts += [("wrong_180_about_k", _turn(fg, 0, 180.0)), ("wrong_90_about_i", _turn(fg, 2, 90.0))]
            for kind, init in starts:
                report = auto_transform(f, fg, m, mg, init=init, report=True, decoys=True)
                if "fixed_labels" in case:
                    dice = _label_dice(case["fixed_labels"], case["moving_labels"], report.matrix)
                    truth = {"dice": dice, "right": dice > 0.4}
                else:
                    err = _corner_error_mm(fg, report.matrix)
                    truth = {"corner_error_mm": err, "right": err < 10.0}
                rows.append(_row(set_name, case["name"], kind, report, truth))
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for right in (True, False):
        for set_name in sorted({r["set"] for r in rows}):
            mine = [r for r in rows if r["set"] == set_name and r["right"] == right]
            if mine:
                summary[f"{set_name} {'right' if right else 'wrong'}"] = {
                    k: [round(min(r[k] for r in mine), 3), round(max(r[k] for r in mine), 3)]
                    for k in ("lncc", "decoy_lncc", "margin", "overlap")} | {"n": len(mine),
                                                                             "reported_poor": sum(r["poor"] for r in mine)}
    today = datetime.date.today().isoformat()
    out = args.out or HERE / "results" / f"alignment-quality-{today}.json"
    out.write_text(json.dumps({"date": today, "machine": platform.processor() or platform.machine(),
                               "threads": args.threads, "rows": rows, "summary": summary}, indent=1))
    for k, v in summary.items():
        print(f"{k:>20}: {v}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
