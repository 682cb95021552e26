"""The CPU training campaign (issue 17): train the learned methods on the training cache in
chunks, validate each chunk on the cache's ``val`` split, record it in the ledger, and export the
weights into ``Resources/Models`` only when the validation Dice beats what is shipped.

    nice -n 19 python benchmarks/campaign.py --cache RUNS/cache --runs RUNS \\
        --methods carnet voxelmorph --chunk 200 --threads 1 [--hours H]

Each method has a run folder ``RUNS/<method>`` (``deepreg train``'s checkpoint and ``loss.csv``;
a killed session resumes from the last checkpoint). A run that has no checkpoint starts from the
shipped weights (``--init-from``), so every session continues the same history; the model card
lists every session. The methods take turns chunk by chunk, so they get equal budgets (a method
named twice in ``--methods`` gets two turns a round).

Ledger: ``benchmarks/results/training-ledger.csv``, one row per chunk: date, session, method,
steps, CPU hours (seconds per step from ``loss.csv`` times threads), the chunk's mean loss, the
validation Dice (and the affine-only Dice of the same pairs), folding, and whether it was
exported; for D-Net, whose validation is a pose, the median rotation error on new poses of the
val subjects and the share within 10 degrees instead. ``--plot`` draws validation Dice against cumulative CPU hours for every method.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "Resources" / "Models"
LEDGER = ROOT / "benchmarks" / "results" / "training-ledger.csv"
FIELDS = ["date", "session", "method", "from_step", "to_step", "cpu_hours", "cpu_hours_total",
          "loss_mean", "dice_loss_mean", "val_pairs", "val_dice_affine", "val_dice", "val_folding_percent",
          "shipped_val_dice", "exported", "sha256", "val_rotation_median_deg", "val_within_10_percent",
          "shipped_val_rotation_median_deg", "val_within_3_percent", "val_views"]

#: per method: the ``deepreg train`` options of the campaign's recipe (coarse cached grid)
#: carnet's label weight is its NCC weight (20): its loss is 20 * (1 - NCC) + ..., so with weight
#: 1 the label term was ~3 % of its loss against ~45 % for voxelmorph (loss.csv), and its val
#: Dice stalled at 0.549 (sessions up to 2026-12-06T21:50); from 2026-12-06T22:40 both methods
#: train with the label term at the same relative weight.
#: The learning rate: 3e-4 until 2026-12-07T14:06, then a step down to 1e-4 for both (carnet's val
#: Dice had stayed within 0.562-0.567 from step 6875 to 10525 and voxelmorph's within 0.590-0.599
#: from 8950 to 11350: a plateau of the constant step, the usual point for a decay); then from
#: 2026-12-07T17:15 a second step down to 3e-5 (at 1e-4 carnet rose 0.567 -> 0.5738 and then held
#: at 0.5731-0.5738 from step 11375 to 11850, voxelmorph 0.595 -> 0.6020, held at 0.6017-0.6020
#: from 11825 to 12125)
#: every recipe from 2026-12-07T18:00: the convolutions in bf16, the rest in float32 (steps 1.8-2.2x
#: faster on this CPU, AVX512-BF16, with the gradient's direction kept: cosine to float32's
#: 0.994-0.99999 on real brains; benchmarks/training_step_layout.py, docs/BENCHMARKS.md)
BF16 = ["--bf16-conv"]
RECIPES = {
    "carnet": ["--lr", "0.00003", "--label-weight", "20.0", "--real-fraction", "0.8", *BF16],
    "voxelmorph": ["--lr", "0.00003", "--label-weight", "1.0", "--real-fraction", "0.8", *BF16],
    #: D-Net (from 2026-12-07T16:40): the shipped network (36000 steps on 4 OASIS scans) fine-tuned
    #: on the cache's 208 train scans (whole, laid out in its cube's direction, a field of view
    #: jittered by up to 35 %), its own 48^3 cube, poses relative to the scans' own orientation
    #: (--dnet-fixed-pose canonical: the target and inference keep the fixed scan's pose), its
    #: last session's anatomy augmentation and gradient clipping; validated by rotation error.
    #: lr 3e-4 until step 51175 (2026-12-07T18:35), then 1e-4: the val median fell 124.5 -> 10.4
    #: deg by step 45175 and then moved within 10.4-15.4 deg for 6000 steps with no trend.
    #: From 2026-12-07T18:50 the fixed view tilts by up to 15 degrees (--dnet-fixed-tilt): the
    #: cache aligns every brain to one reference, and the same val brains read natively, with
    #: their own tilt, scored 21.3 deg against 10.9 as cached (step 45175); D-Net is validated on
    #: them so (run.validate.validate_pose's ``data``; ledger column val_views)
    #: From 2026-12-07T19:30 the exported and validated weights are the average of the last ~1000
    #: steps (--ema 0.999): the val median had moved within 12.3-14.7 deg for 3600 steps.
    #: From 2026-12-07T23:55 lr 3e-5: the averaged weights' val median held within 7.9-9.2 deg
    #: from step 84000 to 93025 (8 chunks, no trend)
    "dnet": ["--shape", "48", "48", "48", "--lr", "0.00003", "--real-fraction", "0.9",
             "--dnet-fixed-pose", "canonical", "--dnet-fixed-tilt", "15", "--dnet-anatomy-augment", "1.5", "--clip-grad", "1.0",
             "--ema", "0.999", *BF16],
    #: SAM (from 2026-12-07T17:00): the shipped embeddings (600 steps on 4 OASIS scans at 48^3)
    #: trained on the cache's train scans whole (its 64x80x64 grid: the global embedding sees the
    #: whole head, as SAM-affine embeds whole images), each view turned by up to 25 degrees (two
    #: views by up to 50: SAM-affine's target range is +-45); validated by SAM-affine's rotation
    #: error on known poses up to 45 degrees
    #: --ema 0.999 from 2026-12-07T19:30 (the val median had moved within 22.3-23.4 deg for 750 steps)
    "sam": ["--shape", "64", "80", "64", "--lr", "0.0001", "--real-fraction", "0.9", "--sam-max-angle", "25",
            "--ema", "0.999", *BF16],
    #: SAME's deformable half, SAM-VoxelMorph. 2026-12-07T22:48-23:49: the shipped weights (600
    #: steps on synthetic pairs and 4 OASIS scans) with the campaign's SAM swapped in, at lr 3e-4
    #: (val 0.484 -> 0.518 in 600 steps, 0.09 behind voxelmorph). From 2026-12-08T00:10 a new run
    #: (START_FROM): the U-Net of the shipped voxelmorph (12975 steps, val 0.6058) with the SAM
    #: correlation's input weights at zero, trained on voxelmorph's recipe of now (lr 3e-5): from
    #: the same point, at equal steps, the ledger says what the SAM correlation adds
    #: (issue 17: "same beats voxelmorph at equal budget")
    "same": ["--lr", "0.00003", "--label-weight", "1.0", "--real-fraction", "0.8", *BF16],
    #: AMDF (from 2026-12-07T23:30): the shipped weights (1600 steps on synthetic pairs and 4 OASIS
    #: scans at 48^3; its ROI network keeps 97.6-98.7 % of real val brains in its mask) trained on
    #: the cache's labelled scans with the paper's label terms: the cross-entropy of the warped
    #: MUSE labels in 16 classes and the anatomical auto-encoder's code distance (the shipped
    #: amdf_ae, trained on the same classes); the TV weight re-expressed for voxels as before
    #: (3.5 x 2/47 = 0.0426 x 3.5); lr 3e-4 as voxelmorph's campaign began. From 2026-12-08T00:55
    #: lr 1e-4 and twice the TV weight: at 3e-4 the val Dice moved within 0.485-0.518 over 6
    #: chunks while the folding grew 0.06 -> 0.32 %
    "amdf": ["--lr", "0.0001", "--reg-weight", "0.0852", "--label-sample", "0", "--real-fraction", "1",
             "--ae-model", "{models}/amdf_ae.pt", *BF16],
}
#: the ``deepreg train`` recipe of each campaign method whose recipe has another name
TRAIN_NAME = {"same": "same_vxm"}
#: methods whose new run starts from another method's shipped weights instead of their own
#: (``--init-from``): ``(method, the recipe's option)``; the weights are copied into the run
#: folder when it starts (``start_METHOD.pt``), so every chunk names the same file
START_FROM = {"same": ("voxelmorph", "--same-vxm-unet-from")}
#: the ``deepreg register --method`` name validating each training recipe's model
INFER_NAME = {"carnet": "carnet", "voxelmorph": "voxelmorph", "dnet": "dnet", "sam": "same-affine", "same": "same",
              "amdf": "amdf"}
#: method options of the validation: SAME runs its trained part alone, SAM-VoxelMorph (from
#: 2026-12-08T00:20): the cache's pairs are aligned affinely already, and SAME's own first steps
#: (SAM-affine, 14.5 deg median error on val poses; SAM-coarse) undo that alignment: validated
#: with them, the new run started as the shipped voxelmorph (val 0.6058) scored 0.578
VALIDATE_OPTIONS = {"same": {"steps": "voxelmorph"}}
#: methods validated by pose (the median rotation error on known poses of the val subjects, lower
#: is better: D-Net's over the full range, SAM-affine's up to 45 degrees); the others by the label
#: Dice of val pairs (higher is better)
POSE_METHODS = ("dnet", "sam")
#: steps per turn as a multiple of --chunk: a D-Net step (48^3, one forward of two encoders)
#: costs about an eighth of a deformable network's (0.18 s against 1.5 s at 1 thread), so its
#: turns take about as long; SAM's about 0.6 of theirs
CHUNK_SCALE = {"dnet": 8}


def read_ledger():
    if not LEDGER.is_file():
        return []
    with open(LEDGER, newline="") as f:
        return list(csv.DictReader(f))


def append_ledger(row):
    LEDGER.parent.mkdir(parents=True, exist_ok=True)
    rows = read_ledger()
    if rows and list(rows[0].keys()) != FIELDS:  # a ledger of an older layout: rewrite with the new columns
        with open(LEDGER, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore", restval="")
            w.writeheader()
            w.writerows(rows)
    new = not LEDGER.is_file()
    with open(LEDGER, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore", restval="")
        if new:
            w.writeheader()
        w.writerow(row)


def chunk_stats(run: Path, from_step: int, to_step: int, threads: int):
    with open(run / "loss.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if from_step < int(r["step"]) <= to_step]
    secs = sum(float(r["seconds"]) for r in rows)
    loss = [float(r["loss"]) for r in rows]
    dice = [float(r["dice_loss"]) for r in rows if r.get("dice_loss") not in (None, "")]
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return secs * threads / 3600.0, mean(loss), mean(dice)


def checkpoint_step(run: Path) -> int:
    ckpt = run / "checkpoint.pt"
    if not ckpt.is_file():
        return -1
    import torch
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"])


def validate_model(method: str, weights: str, cache: str, args) -> dict:
    """The candidate's validation: the label Dice of ``--val-pairs`` val pairs, or for
    :data:`POSE_METHODS` the rotation error on ``--val-poses`` new poses of the val subjects."""
    from deepreglib.run.validate import validate, validate_pose, validate_sam_affine
    if method == "sam":
        return validate_sam_affine(weights, cache, args.val_poses // 2)
    if method in POSE_METHODS:
        return validate_pose(weights, cache, args.val_poses, data=native_data(args))
    return validate(INFER_NAME[method], weights, cache, args.val_pairs, options=VALIDATE_OPTIONS.get(method))


def native_data(args):
    """The shared data folder when it is there: D-Net is then validated on the val brains read
    natively, as inference shows them (from 2026-12-07T18:45; before, as the cache holds them)."""
    folder = Path(args.data) if args.data else None
    return folder if folder is not None and (folder / "ixi_muse" / "splits.json").is_file() else None


def primary(method: str, score: dict) -> float:
    """The score the export compares, higher is better (minus the median rotation error for
    :data:`POSE_METHODS`)."""
    return -float(score["rotation_median_deg"]) if method in POSE_METHODS else float(score["dice"])


def shipped_score(method: str, cache: str, args, cache_file: Path) -> float:
    """:func:`primary` of the shipped weights (computed once per sha256 and validation size, kept
    in ``cache_file``)."""
    card = json.loads((MODELS / f"{method}.json").read_text())
    known = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    size = {"dnet": args.val_poses, "sam": args.val_poses // 2}.get(method, args.val_pairs)
    key = f"{method}:{card['sha256']}:{size}" + (":pose" if method in POSE_METHODS else "")
    if VALIDATE_OPTIONS.get(method):
        key += ":" + ",".join(f"{k}={v}" for k, v in sorted(VALIDATE_OPTIONS[method].items()))
    if method == "dnet" and native_data(args) is not None:
        key += ":native"
    if method == "dnet" and int(card.get("inference_passes", 1)) > 1:
        key += f":passes{int(card['inference_passes'])}"
    if key not in known:
        known[key] = primary(method, validate_model(method, str(MODELS / f"{method}.pt"), cache, args))
        cache_file.write_text(json.dumps(known, indent=1))
    return float(known[key])


def annotate_card(card_path: Path, score: dict, shipped: float, session: str, method: str = "",
                  notes=None) -> None:
    """Record on the exported card how it was chosen: its validation on the cache's val split
    against the weights it replaced (the weights' sha256 is unchanged: it covers the .pt only);
    ``notes``, the replaced card's notes on its history, are kept."""
    card = json.loads(card_path.read_text())
    if notes and not card.get("notes"):
        card["notes"] = notes
    if method in POSE_METHODS:
        card["validation"] = {"split": "ixi_muse val (training cache): " + (
                                  "SAM-affine on known rigid poses up to 45 degrees" if method == "sam"
                                  else "new rigid poses over the full range"),
                              "session": session, **score, "replaced_rotation_median_deg": -shipped,
                              "ledger": "benchmarks/results/training-ledger.csv"}
    else:
        card["validation"] = {"split": "ixi_muse val (training cache, after its affine)", "session": session,
                              **score, "replaced_val_dice": shipped,
                              "ledger": "benchmarks/results/training-ledger.csv"}
    card_path.write_text(json.dumps(card, indent=2))


def run_chunk(method: str, args, session: str) -> dict:
    run = Path(args.runs) / method
    start = checkpoint_step(run)
    cmd = [sys.executable, "-m", "deepreglib", "train", TRAIN_NAME.get(method, method), "--out", str(run), "--cache", args.cache,
           "--shape", *map(str, args.shape), "--threads", str(args.threads), "--checkpoint-every", "25",
           "--log-every", "50", *(a.format(models=MODELS) for a in RECIPES[method])]  # a recipe's own --shape wins
    if start < 0 and method in START_FROM:
        run.mkdir(parents=True, exist_ok=True)
        for suffix in (".pt", ".json"):
            shutil.copyfile(MODELS / f"{START_FROM[method][0]}{suffix}", run / f"start_{START_FROM[method][0]}{suffix}")
        start = 0
    elif start < 0:
        cmd += ["--init-from", str(MODELS / f"{method}.pt")]
        start = int(json.loads((MODELS / f"{method}.json").read_text()).get("iterations", 0))
    if method in START_FROM and (run / f"start_{START_FROM[method][0]}.pt").is_file():
        cmd += [START_FROM[method][1], str(run / f"start_{START_FROM[method][0]}.pt")]
    candidate = Path(args.runs) / "candidates" / method / f"{method}.pt"
    candidate.parent.mkdir(parents=True, exist_ok=True)
    cmd += ["--steps", str(start + args.chunk * CHUNK_SCALE.get(method, 1)), "--export", str(candidate)]
    subprocess.run(cmd, check=True)
    end = checkpoint_step(run)
    earlier = [r for r in read_ledger() if r["method"] == method]
    # a chunk cut short (a killed session) left steps after the last ledger row: count them here
    if earlier and int(earlier[-1]["to_step"]) < start:
        start = int(earlier[-1]["to_step"])
    hours, loss, dice_loss = chunk_stats(run, start, end, args.threads)
    restarted = bool(earlier) and method in START_FROM and start == 0  # a new run (START_FROM)
    total = (float(earlier[-1]["cpu_hours_total"]) if earlier and not restarted else 0.0) + hours
    score = validate_model(method, str(candidate), args.cache, args)
    shipped = shipped_score(method, args.cache, args, Path(args.runs) / "shipped-scores.json")
    exported, sha = False, ""
    if primary(method, score) > shipped and score.get("folding_percent", 0.0) < 0.5:
        notes = json.loads((MODELS / f"{method}.json").read_text()).get("notes")
        for suffix in (".pt", ".json"):
            shutil.copyfile(candidate.with_suffix(suffix), MODELS / f"{method}{suffix}")
        exported = True
        sha = json.loads(candidate.with_suffix(".json").read_text())["sha256"]
        annotate_card(MODELS / f"{method}.json", score, shipped, session, method, notes)
    row = {"date": _dt.date.today().isoformat(), "session": session, "method": method, "from_step": start,
           "to_step": end, "cpu_hours": f"{hours:.4f}", "cpu_hours_total": f"{total:.4f}",
           "loss_mean": f"{loss:.4f}", "dice_loss_mean": f"{dice_loss:.4f}" if dice_loss == dice_loss else "",
           "exported": int(exported), "sha256": sha}
    if method in POSE_METHODS:
        row.update({"val_pairs": score["poses"], "val_rotation_median_deg": f"{score['rotation_median_deg']:.2f}",
                    "val_within_10_percent": f"{score['within_10_percent']:.1f}" if "within_10_percent" in score else "",
                    "val_within_3_percent": f"{score['within_3_percent']:.1f}" if "within_3_percent" in score else "",
                    "val_views": score.get("views", ""),
                    "shipped_val_rotation_median_deg": f"{-shipped:.2f}"})
    else:
        row.update({"val_pairs": score["pairs"], "val_dice_affine": f"{score['dice_affine']:.4f}",
                    "val_dice": f"{score['dice']:.4f}", "val_folding_percent": f"{score['folding_percent']:.4f}",
                    "shipped_val_dice": f"{shipped:.4f}"})
    append_ledger(row)
    print(json.dumps(row), flush=True)
    return row


def plot(out: Path) -> Path:
    """Validation against cumulative CPU hours: label Dice of the deformable networks (left) and,
    when the ledger has any, the median rotation error of the pose networks (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    rows = read_ledger()
    pose = sorted({r["method"] for r in rows if r["method"] in POSE_METHODS})
    fig = Figure(figsize=(11 if pose else 6.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if pose else 1, 1)
    for method in sorted({r["method"] for r in rows} - set(pose)):
        sel = [r for r in rows if r["method"] == method]
        runs, cut = [], 0  # a run restarted from other weights (START_FROM) is its own line
        for i in range(1, len(sel) + 1):
            if i == len(sel) or (int(sel[i]["from_step"]) == 0 and int(sel[i - 1]["to_step"]) > 0):
                runs.append(sel[cut:i])
                cut = i
        for k, part in enumerate(runs):
            # the first point: the weights the run started from, at 0 campaign hours (for a new
            # run from other weights, whose start is not what was shipped, its first chunk)
            hours = ([0.0] if k == 0 else []) + [float(r["cpu_hours_total"]) for r in part]
            dice = ([float(part[0]["shipped_val_dice"])] if k == 0 else []) + [float(r["val_dice"]) for r in part]
            label = method if k == 0 else f"{method} (new run from {START_FROM[method][0]})" if method in START_FROM \
                else f"{method} (run {k + 1})"
            ax.plot(hours, dice, "o-" if k == 0 else "^-", label=label)
    affine = [r for r in rows if r["method"] not in POSE_METHODS]
    if affine:
        ax.axhline(float(affine[-1]["val_dice_affine"]), color="grey", ls="--", label="affine alone")
    ax.set_xlabel("CPU hours of campaign training (cumulative)")
    ax.set_ylabel("validation Dice (ixi_muse val, ~145 labels)")
    ax.legend()
    if pose:
        ax2 = fig.add_subplot(1, 2, 2)
        for method in pose:
            for views in sorted({r.get("val_views") or "cache" for r in rows if r["method"] == method}):
                sel = [r for r in rows if r["method"] == method and (r.get("val_views") or "cache") == views]
                hours = [float(sel[0]["cpu_hours_total"]) - float(sel[0]["cpu_hours"])] + [
                    float(r["cpu_hours_total"]) for r in sel]
                err = ([float(sel[0]["shipped_val_rotation_median_deg"])]
                       + [float(r["val_rotation_median_deg"]) for r in sel])
                label = method + (" (SAM-affine, poses up to 45 deg)" if method == "sam" else
                                  " (full range, val " + ("as cached)" if views == "cache" else
                                                          "read natively" + views[len("native"):] + ")"))
                ax2.plot(hours, err, "o-" if views == "cache" else ("s--" if views == "native" else "d-"),
                         color={"dnet": "C3", "sam": "C4"}.get(method, "C5"), label=label)
        ax2.axhline(5.0, color="C3", ls=":", label="dnet target (5 deg)")
        if "sam" in pose:
            ax2.axhline(3.0, color="C4", ls=":", label="SAM-affine target (3 deg)")
        ax2.set_yscale("log")
        ax2.set_xlabel("CPU hours of campaign training (cumulative)")
        ax2.set_ylabel("median rotation error, deg (ixi_muse val, known poses)")
        ax2.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main(argv=None):
    global MODELS, LEDGER
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="training cache (deepreg train-cache)")
    p.add_argument("--runs", help="folder of the run folders (outside the repository)")
    p.add_argument("--methods", nargs="+", default=["carnet", "voxelmorph"], choices=sorted(RECIPES))
    p.add_argument("--chunk", type=int, default=200, help="steps per method per turn")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 80, 64))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=None, help="stop after this many turns of every method")
    p.add_argument("--val-pairs", type=int, default=10)
    p.add_argument("--val-poses", type=int, default=40,
                   help="new poses of the val subjects validating D-Net (SAM-affine: half as many)")
    p.add_argument("--hours", type=float, default=100.0, help="stop starting chunks after this wall time")
    p.add_argument("--session", default=_dt.datetime.now().strftime("%Y-%m-%dT%H:%M"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                   help="the shared data folder: D-Net's validation reads the val brains there natively")
    p.add_argument("--models", default=str(MODELS), help="where the shipped weights are read and improved ones go")
    p.add_argument("--ledger", default=str(LEDGER))
    p.add_argument("--plot", default=None, metavar="PNG", help="only draw the ledger's plot")
    args = p.parse_args(argv)
    MODELS, LEDGER = Path(args.models), Path(args.ledger)
    if args.plot:
        print(plot(Path(args.plot)))
        return 0
    if not args.cache or not args.runs:
        p.error("--cache and --runs are required to train")
    t0 = time.time()
    rounds = 0
    while time.time() - t0 < args.hours * 3600 and (args.rounds is None or rounds < args.rounds):
        rounds += 1
        for method in args.methods:
            run_chunk(method, args, args.session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
