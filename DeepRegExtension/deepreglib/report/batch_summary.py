"""The summary of a batch (``deepreg batch``): ``summary.csv``, one row per pair with its status
and the numbers of its ``manifest.json`` (Dice, NCC, folding, SDlogJ, TRE, per-stage timings,
peak memory), and ``summary.png``, their distributions over the pairs with the outliers named,
so that a researcher sees at once which pairs need a look.

Reads manifests only (:func:`deepreglib.io.protocol.read_manifest`); imports no torch.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Sequence

from ..io import protocol as P

#: the stages of a run in their order (docs/ARCHITECTURE.md); others a manifest has follow
STAGE_ORDER = ("read", "initialize", "preprocess", "inference", "refine", "postprocess", "write")
#: the columns before the per-stage timings
COLUMNS = ("id", "status", "error_kind", "error", "attempts", "resumed", "fixed", "moving", "method", "preset",
           "device", "dice_before", "dice_after", "ncc_before", "ncc_after", "folding_percent", "sdlogj",
           "jacobian_min", "tre_before_mm", "tre_after_mm")
#: the columns after them
TAIL = ("total_s", "peak_ram_mb", "peak_gpu_mb", "folder")
_METRICS = {"dice_before": "dice_mean_before", "dice_after": "dice_mean_after", "ncc_before": "ncc_before",
            "ncc_after": "ncc_after", "folding_percent": "folding_percent", "sdlogj": "sdlogj",
            "jacobian_min": "jacobian_min", "tre_before_mm": "tre_before_mm", "tre_after_mm": "tre_after_mm"}


def summary_rows(records: Sequence[dict]) -> List[dict]:
    """One row per pair: ``records`` (id, status, error_kind, error, attempts, resumed, fixed,
    moving, seconds, folder) with the numbers of each finished pair's manifest added."""
    rows = []
    for rec in records:
        row = {k: rec.get(k) for k in ("id", "status", "error_kind", "error", "attempts", "resumed",
                                        "fixed", "moving", "folder")}
        row["total_s"] = rec.get("seconds")
        folder = rec.get("folder")
        if rec.get("status") == "done" and folder:
            try:
                m = P.read_manifest(Path(folder) / P.MANIFEST_NAME)
            except (OSError, ValueError) as e:
                row["error"] = f"manifest unreadable: {e}"
                m = None
            if m is not None:
                metrics = m.get("metrics") or {}
                row.update(method=m.get("method"), preset=m.get("preset"), device=m.get("device"))
                for col, key in _METRICS.items():
                    row[col] = metrics.get(key)
                timings = m.get("timings") or {}
                for stage, seconds in timings.items():
                    if stage != "total":
                        row[f"time_{stage}_s"] = seconds
                row["total_s"] = timings.get("total", row["total_s"])
                peak = m.get("peak_memory_mb") or {}
                row["peak_ram_mb"], row["peak_gpu_mb"] = peak.get("ram"), peak.get("gpu")
        rows.append(row)
    return rows


def _columns(rows: Sequence[dict]) -> List[str]:
    stages = []
    for r in rows:
        stages += [k for k in r if k.startswith("time_") and k not in stages]
    known = [f"time_{s}_s" for s in STAGE_ORDER]
    stages = [s for s in known if s in stages] + sorted(s for s in stages if s not in known)
    return [*COLUMNS, *stages, *TAIL]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return " ".join(str(value).split())  # one line per row


def write_summary_csv(path, rows: Sequence[dict]) -> Path:
    """``summary.csv`` (written whole: a temporary name, then renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    columns = _columns(rows)
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in columns])
    tmp.replace(path)
    return path


def outliers(values: Dict[str, float], worse: str, worst: int = 3, limit: int = 10) -> List[str]:
    """Ids to name on a plot: beyond 1.5 IQR on the bad side (``worse``: ``low`` or ``high``),
    and the ``worst`` most extreme; at most ``limit``."""
    import numpy as np
    if not values:
        return []
    ids = sorted(values, key=lambda k: values[k], reverse=worse == "high")
    v = np.array([values[k] for k in ids], dtype=np.float64)
    q1, q3 = np.percentile(v, [25, 75])
    iqr = q3 - q1
    median = float(np.median(v))
    beyond = [k for k in ids if (values[k] < q1 - 1.5 * iqr if worse == "low" else values[k] > q3 + 1.5 * iqr)]
    # the worst few, where worse than the median (nothing is named when all pairs are alike)
    bad = [k for k in ids[:worst] if (values[k] < median if worse == "low" else values[k] > median)]
    return list(dict.fromkeys(beyond + bad))[:limit]


def _name_points(ax, points, color="tab:red") -> None:
    """Label ``(id, x, y)`` points to their right, spread apart vertically so that labels of
    close values stay readable (a thin line joins a moved label to its point)."""
    if not points:
        return
    ax.autoscale_view()
    to_px, to_data = ax.transData, ax.transData.inverted()
    gap = 10.0  # pixels between label baselines
    placed = []
    for name, x, y in sorted(points, key=lambda p: p[2]):
        px, py = to_px.transform((x, y))
        ty = max(py, placed[-1] + gap) if placed else py
        placed.append(ty)
        tx, ty_data = to_data.transform((px + 14, ty))
        ax.annotate(name, (x, y), xytext=(tx, ty_data), textcoords="data", fontsize=7, color=color,
                    va="center", arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.6})


def draw_summary_png(path, rows: Sequence[dict]) -> Path:
    """``summary.png``: Dice before/after, folding % and time per pair as box plots over strips
    of the pairs, outliers named by pair id; failed pairs listed below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    done = [r for r in rows if r.get("status") == "done"]
    failed = [r for r in rows if r.get("status") != "done"]

    def series(key):
        return {r["id"]: float(r[key]) for r in done if isinstance(r.get(key), (int, float))}

    panels = [("Dice (mean over labels)", [("before", series("dice_before")), ("after", series("dice_after"))], "low"),
              ("folding (% voxels, det J <= 0)", [("", series("folding_percent"))], "high"),
              ("time per pair (s)", [("", series("total_s"))], "high")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    rng = np.random.default_rng(0)
    for ax, (title, groups, worse) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        groups = [(name, vals) for name, vals in groups if vals]
        if not groups:
            ax.text(0.5, 0.5, "no values\n(labels give Dice)" if "Dice" in title else "no values",
                    ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_xticks([])
            continue
        ax.boxplot([list(v.values()) for _, v in groups], widths=0.5, showfliers=False,
                   medianprops={"color": "black"})
        for i, (name, vals) in enumerate(groups, start=1):
            ids = list(vals)
            x = i + rng.uniform(-0.12, 0.12, len(ids))
            y = np.array([vals[k] for k in ids])
            ax.scatter(x, y, s=14, alpha=0.7, color="tab:blue" if name != "before" else "tab:grey", zorder=3)
            if name != "before":  # name the outliers of the result, not of the input
                _name_points(ax, [(k, x[ids.index(k)], y[ids.index(k)]) for k in outliers(vals, worse)])
        ax.set_xticks(range(1, len(groups) + 1))
        ax.set_xticklabels([name for name, _ in groups])
        ax.grid(axis="y", alpha=0.3)
    total = len(rows)
    fig.suptitle(f"deepreg batch: {len(done)}/{total} pairs done, {len(failed)} not done", fontsize=11)
    if failed:
        text = "not done: " + "; ".join(f"{r['id']} ({r.get('status')}: {r.get('error_kind') or ''})"
                                        for r in failed[:8]) + (" ..." if len(failed) > 8 else "")
        fig.text(0.01, 0.01, text, fontsize=8, color="tab:red")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
