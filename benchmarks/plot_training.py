"""Plot a training run's loss curves (``RUN/loss.csv``) to a PNG for docs/BENCHMARKS.md.

    python benchmarks/plot_training.py RUN_DIR [--out docs/images/voxelmorph_loss.png]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def smooth(y: np.ndarray, n: int = 50) -> np.ndarray:
    if len(y) < n:
        return y
    return np.convolve(y, np.ones(n) / n, mode="valid")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images" / "voxelmorph_loss.png"))
    args = p.parse_args(argv)
    with open(Path(args.run) / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    step = np.array([int(r["step"]) for r in rows])
    real = np.array([int(r["real"]) for r in rows]).astype(bool)
    fig = Figure(figsize=(9, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, (mask, title) in zip(axes, ((~real, "synthetic pairs"), (real, "real OASIS pairs (unlabelled, 2 mm)"))):
        for key, colour in (("ncc_loss", "tab:blue"), ("dice_loss", "tab:orange"), ("grad", "tab:green")):
            vals = np.array([float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows])
            sel = mask & np.isfinite(vals)
            if sel.sum() < 2:
                continue
            y = smooth(vals[sel])
            ax.plot(step[sel][len(step[sel]) - len(y):], y, color=colour, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("loss term (moving average of 50 steps)")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
