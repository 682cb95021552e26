"""Copy the evaluation numbers of the newest accuracy results into the shipped model cards.

    python benchmarks/update_model_cards.py

For every method with weights, the card ``Resources/Models/NAME.json`` gets an ``evaluation``
entry: per dataset and configuration (with and without ``--refine``), mean Dice before/after,
endpoint error, folding % and SDlogJ, plus the results file and date they come from. Only
results produced with the card's own weights (same sha256) are used. The weights file is not
touched, so its checksum stays valid.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from make_report import RESULTS, ROOT, newest


def _figure(r: dict, key: str) -> float:
    """Scored from the written transform (results format 2), else the manifest's (format 1)."""
    return r[key] if key in r else r["metrics"][key]


def main():
    path, data = newest("accuracy-*.json")
    if data is None:
        raise SystemExit("no accuracy results; run benchmarks/evaluate.py first")
    for card_path in sorted((ROOT / "Resources" / "Models").glob("*.json")):
        card = json.loads(card_path.read_text())
        method = card.get("method")
        groups = defaultdict(list)
        for r in data["results"]:
            if r.get("weights_sha256") == card["sha256"] and r["config"].split("+")[0] == method \
                    and r.get("ok", True):
                groups[(r["dataset"], r["config"])].append(r)
        if not groups:
            print(f"{card_path.name}: no results made with these weights")
            continue
        evaluation = {"results_file": str(path.relative_to(ROOT)), "date": data["date"], "datasets": {}}
        for (ds, cfg), rs in sorted(groups.items()):
            entry = {"pairs": len(rs),
                     "folding_percent": float(np.mean([_figure(r, "folding_percent") for r in rs])),
                     "sdlogj": float(np.mean([_figure(r, "sdlogj") for r in rs])),
                     "wall_s": float(np.mean([r["wall_s"] for r in rs]))}
            if all("dice_mean_after" in r for r in rs):
                entry["dice_mean_before"] = float(np.mean([r["dice_mean_before"] for r in rs]))
                entry["dice_mean_after"] = float(np.mean([r["dice_mean_after"] for r in rs]))
            if all("epe_mm" in r for r in rs):
                entry["epe_mean_mm"] = float(np.mean([r["epe_mm"]["mean"] for r in rs]))
                entry["epe_before_mm"] = float(np.mean([r["epe_before_mm"] for r in rs]))
            evaluation["datasets"].setdefault(ds, {})[cfg] = entry
        card["evaluation"] = evaluation
        card_path.write_text(json.dumps(card, indent=2))
        print(f"updated {card_path}")


if __name__ == "__main__":
    main()
