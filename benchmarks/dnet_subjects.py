"""D-Net's rotation error on new poses of unseen brains, as inference shows them (issue 17's
target: median at most 5 degrees over the full +-180, 90 % within 10).

    python benchmarks/dnet_subjects.py [--weights PATH] [--poses 40] [--sets ...]

For every set this draws ``--poses`` new rigid poses (angle uniform in (-pi, pi) about a uniform
axis, translation up to 1/4 of the extent; seeds past training's), pose ``s`` of scan
``s mod n``, and reports the rotation error from the trace formula. Each scan is seen as the
method sees a fixed image (:func:`~deepreglib.methods.dnet.method.network_view`): read with its
header, normalised, resampled in physical space onto the network's cube (the model card's
``grid_direction``, centred, its longest side across the cube); the fixed view keeps the
scan's own pose and the moving view is it under the drawn pose.

Sets:

* ``ixi_muse_test``: the 19 skull-stripped test brains (native scanner geometry), unseen;
* ``ixi_muse_val``: the 10 val brains, read natively (the campaign validates on the same brains
  as the cache holds them, aligned to its reference: this set shows what that alignment hides);
* ``openneuro_test``: the 10 test brains of ``openneuro_ds002748`` (another site, 1.5 mm);
* ``ixi_muse_wholehead_test``: the test subjects that also have a whole-head scan;
* ``brain_aseg``: the labelled brain (no header: the array is read in the OASIS scans' layout);
* ``oasis_unlabeled``: the 4 OASIS scans the first D-Net was trained on.

Results: ``benchmarks/results/dnet-subjects-DATE.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch

from deepreglib.methods.dnet.method import cube_direction, inference_passes, load_dnet
from deepreglib.methods.dnet.training import pose_errors
from deepreglib.methods.weights import models_dir
from deepreglib.run.validate import native_views

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
SETS = ("ixi_muse_test", "ixi_muse_val", "openneuro_test", "ixi_muse_wholehead_test", "brain_aseg", "oasis_unlabeled")


def _split(folder: str, split: str):
    return json.loads((SHARED / folder / "splits.json").read_text())[split]


def _files(name: str):
    if name in ("ixi_muse_test", "ixi_muse_val"):
        return [SHARED / "ixi_muse" / f"{s}_t1.nii.gz" for s in _split("ixi_muse", name.split("_")[-1])]
    if name == "ixi_muse_wholehead_test":
        return [p for p in (SHARED / "ixi_muse" / f"{s}_t1_wholehead.nii.gz" for s in _split("ixi_muse", "test"))
                if p.is_file()]
    if name == "openneuro_test":
        found = []
        for s in _split("openneuro_ds002748", "test"):
            found += sorted((SHARED / "openneuro_ds002748").glob(f"{s}*.nii*"))
        return found
    if name == "oasis_unlabeled":
        return sorted((SHARED / "oasis_unlabeled").glob("*.nii*"))
    raise KeyError(name)


def _brain_aseg_view(size: int) -> torch.Tensor:
    """The labelled brain, whose npz has no header: its array ``(x, y, z)`` transposed to the OASIS
    scans' tensor layout (which is the cube's direction), at 2 mm, whole on the cube."""
    from deepreglib.methods.dnet.training import whole_volume
    d = np.load(SHARED / "brain_aseg" / "test_scan.npz")
    vol = np.ascontiguousarray(d["vol"].astype(np.float32).transpose(2, 1, 0))
    a = torch.nn.functional.avg_pool3d(torch.from_numpy(vol)[None, None], 2)
    lo, hi = float(a.min()), float(torch.quantile(a.flatten()[::7], 0.995))
    return whole_volume(((a - lo) / (hi - lo + 1e-8)).clamp(0, 1), (size,) * 3)


def views(name: str, size: int, direction):
    """The set's scans on the network cube, as inference shows a fixed image."""
    if name == "brain_aseg":
        return [_brain_aseg_view(size)]
    return native_views(_files(name), size, direction)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=str(models_dir() / "dnet.pt"))
    p.add_argument("--poses", type=int, default=40)
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--passes", type=int, nargs="+", default=None,
                   help="forward passes to score, each a row (default: the card's inference_passes)")
    p.add_argument("--tag", default="", help="added to the results file's name")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, card = load_dnet(args.weights, torch.device("cpu"))
    size = model.input_size
    direction = cube_direction(card)
    out = {"date": datetime.date.today().isoformat(), "weights": Path(args.weights).name,
           "weights_sha256": card["sha256"], "iterations": card.get("iterations"),
           "grid_direction": list(direction), "card_inference_passes": inference_passes(card), "sets": {}}
    for name, passes in [(n, k) for n in args.sets for k in (args.passes or [inference_passes(card)])]:
        vols = views(name, size, direction)
        if not vols:
            print(f"{name}: no scans, skipped", flush=True)
            continue
        # pose s on scan s mod n; the view is the scan's own field of view already
        r = pose_errors(model, vols, (size,) * 3, args.poses, field_of_view=(1.0, 1.0), passes=passes)
        if args.passes and len(args.passes) > 1:
            name = f"{name} ({passes} passes)"
        true, e, terr = r["true_deg"], r["error_deg"], r["translation_error"]
        out["sets"][name] = {"scans": len(vols), "poses": args.poses, "passes": passes,
                             "true_angle_median_deg": float(np.median(true)),
                             "rotation_error_median_deg": float(np.median(e)),
                             "rotation_error_p90_deg": float(np.percentile(e, 90)),
                             "rotation_error_mean_deg": float(np.mean(e)),
                             "within_10_deg_percent": float(100 * np.mean(e <= 10)),
                             "within_30_deg_percent": float(100 * np.mean(e <= 30)),
                             "translation_error_median": float(np.median(terr)),
                             "errors_deg": [round(float(v), 2) for v in e]}
        print(name, {k: v for k, v in out["sets"][name].items() if k != "errors_deg"}, flush=True)
    path = Path(args.out) / (f"dnet-subjects-{out['date']}-{args.tag}.json" if args.tag
                             else f"dnet-subjects-{out['date']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
