"""The real-pair benchmark of issue 16 as a markdown table, with each target met or missed.

    python benchmarks/real_pairs_report.py benchmarks/results/accuracy-DATE-real-pairs.json

Reads a results file of ``benchmarks/evaluate.py`` (run with ``--datasets ixi_muse ...
--methods preset-fast preset-balanced preset-accurate ants-syn greedy greedy-affine
elastix-affine-bspline convexadam``) and prints, per dataset and configuration: mean +- sd Dice over the
pairs, HD95, folding, SDlogJ, the registration time (``wall_s``: reading the images to the last
file written), its ratio to each peer's on the same pairs, and peak RAM; then each target of
issue 16 with the measured numbers.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import numpy as np

#: the deformable peers: every configuration's time is compared with each, and balanced's Dice too
PEERS = ("ants-syn", "greedy", "elastix-affine-bspline", "convexadam")
PRESETS = ("preset-fast", "preset-balanced", "preset-accurate")


def _rows(results: List[dict]) -> Dict[str, Dict[str, List[dict]]]:
    out: Dict[str, Dict[str, List[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.get("ok"):
            out[r["dataset"]][r["config"]].append(r)
    return out


def _mean_sd(values) -> str:
    v = [x for x in values if x is not None]
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "–"


def _paired_ratio(runs: Dict[str, List[dict]], config: str, peer: str) -> float:
    """Mean over the pairs both ran of this configuration's time over the peer's."""
    mine = {r["case"]: r["wall_s"] for r in runs.get(config, [])}
    theirs = {r["case"]: r["wall_s"] for r in runs.get(peer, [])}
    both = sorted(set(mine) & set(theirs))
    return float(np.mean([mine[c] / theirs[c] for c in both])) if both else float("nan")


def report(data: dict) -> str:
    lines = [f"Results file: `{data.get('file', '')}`, {data['date']}, machine: "
             f"{data['machine'].get('cpu', '?')}, {data['machine'].get('threads')} threads per run.", ""]
    for dataset, runs in _rows(data["results"]).items():
        n = max(len(v) for v in runs.values())
        peers = [p for p in PEERS if p in runs]
        lines += [f"**{dataset}** ({n} registrations)", "",
                  "| configuration | Dice | HD95 mm | folding % | SDlogJ | time s | "
                  + " | ".join(f"time / {p}" for p in peers) + " | peak RAM MB |",
                  "|---|---|---|---|---|---|" + "---|" * len(peers) + "---|"]
        for config, rs in runs.items():
            ratios = " | ".join(f"{_paired_ratio(runs, config, p):.2f}" for p in peers)
            lines.append(
                f"| {config} | {_mean_sd([r.get('dice_mean_after') for r in rs])} | "
                f"{_mean_sd([r.get('hd95_mean_after_mm') for r in rs])} | "
                f"{np.mean([r['folding_percent'] for r in rs]):.4f} | {np.mean([r['sdlogj'] for r in rs]):.3f} | "
                f"{np.mean([r['wall_s'] for r in rs]):.1f} | {ratios} | {max(r['peak_ram_mb'] for r in rs):.0f} |")
        lines += [""] + _targets(runs) + [""] + _paired(runs) + [""] + _stages(runs) + [""]
    return "\n".join(lines)


def _paired(runs: Dict[str, List[dict]], config: str = "preset-balanced") -> List[str]:
    """``config``'s Dice minus each other configuration's, paired over the cases both ran."""
    mine = {r["case"]: r.get("dice_mean_after") for r in runs.get(config, [])}
    out = [f"Paired over the registrations, {config}'s Dice minus each other's (mean ± sd, and how "
           "often it is ahead):", ""]
    for other, rs in runs.items():
        if other == config:
            continue
        diffs = [mine[r["case"]] - r["dice_mean_after"] for r in rs
                 if mine.get(r["case"]) is not None and r.get("dice_mean_after") is not None]
        if diffs:
            out.append(f"* {other}: {np.mean(diffs):+.4f} ± {np.std(diffs):.4f}, ahead in "
                       f"{sum(d > 0 for d in diffs)} of {len(diffs)}")
    return out


def _stages(runs: Dict[str, List[dict]]) -> List[str]:
    """Mean seconds of each stage of the presets' runs (the manifests' ``timings``)."""
    keys = ("initialize", "preprocess", "inference", "postprocess", "write", "total")
    out = ["| preset | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for config in PRESETS:
        rs = [r for r in runs.get(config, []) if r.get("timings")]
        if rs:
            out.append(f"| {config} | " + " | ".join(f"{np.mean([r['timings'].get(k, 0.0) for r in rs]):.2f}"
                                                   for k in keys) + " |")
    return out if len(out) > 2 else []


def _targets(runs: Dict[str, List[dict]]) -> List[str]:
    def mean(config, key):
        v = [r[key] for r in runs.get(config, []) if r.get(key) is not None]
        return float(np.mean(v)) if v else float("nan")

    out = ["Targets (issue 16):", ""]
    bal = "preset-balanced"
    for peer in PEERS:
        if peer in runs:
            d, p = mean(bal, "dice_mean_after"), mean(peer, "dice_mean_after")
            out.append(f"* balanced Dice >= {peer}: {d:.3f} vs {p:.3f}: {'met' if d >= p else f'missed by {p - d:.3f}'}")
    fold = mean(bal, "folding_percent")
    out.append(f"* balanced folding < 0.01 %: {fold:.4f} %: {'met' if fold < 0.01 else 'missed'}")
    if "ants-syn" in runs:
        s, a = mean(bal, "sdlogj"), mean("ants-syn", "sdlogj")
        out.append(f"* balanced SDlogJ <= SyN's + 0.05: {s:.3f} vs {a:.3f} + 0.05: "
                   f"{'met' if s <= a + 0.05 else f'missed by {s - a - 0.05:.3f}'}")
        r = _paired_ratio(runs, bal, "ants-syn")
        out.append(f"* balanced at least 3x faster than SyN: {1 / r:.2f}x: {'met' if r <= 1 / 3 else 'missed'}")
    t = mean(bal, "wall_s")
    out.append(f"* balanced <= 20 s end to end: {t:.1f} s: {'met' if t <= 20 else f'missed by {t - 20:.1f} s'}")
    t = mean("preset-fast", "wall_s")
    out.append(f"* fast <= 6 s: {t:.1f} s: {'met' if t <= 6 else f'missed by {t - 6:.1f} s'}")
    acc = mean("preset-accurate", "dice_mean_after")
    best = max((mean(c, "dice_mean_after"), c) for c in runs)
    out.append(f"* accurate the best Dice of all: {acc:.3f}, best {best[1]} {best[0]:.3f}: "
               f"{'met' if best[1] == 'preset-accurate' else 'missed'}")
    if "ants-syn" in runs:
        r = _paired_ratio(runs, "preset-accurate", "ants-syn")
        out.append(f"* accurate within SyN's time: {r:.2f} of it: {'met' if r <= 1 else 'missed'}")
    ram = max(r["peak_ram_mb"] for c in PRESETS for r in runs.get(c, []))
    out.append(f"* peak RAM <= 4 GB: {ram:.0f} MB: {'met' if ram <= 4096 else 'missed'}")
    if "greedy-affine" in runs:
        out.append(f"* --init auto no slower than greedy's affine: auto {mean_alignment(runs):.1f} s "
                   f"(manifest 'initialize'), greedy affine {mean('greedy-affine', 'wall_s'):.1f} s")
    return out


def mean_alignment(runs: Dict[str, List[dict]]) -> float:
    v = [r["timings"]["initialize"] for c in PRESETS for r in runs.get(c, []) if r.get("timings")]
    return float(np.mean(v)) if v else float("nan")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0])
    data = json.loads(path.read_text())
    data["file"] = str(path)
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
