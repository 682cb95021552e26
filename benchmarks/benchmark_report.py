"""The BENCHMARKS.md section of one ``accuracy-DATE.json`` of ``evaluate.py`` (format 2): a table
per dataset (method x figures, means over the pairs), per-label Dice where there are few labels,
a time-vs-accuracy scatter and box plots of Dice per method (matplotlib, Agg backend, PNGs under
``docs/images/``). A CUDA run of the same methods (``accuracy-DATE-cuda.json``) adds GPU columns.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

SCATTER = "benchmark_time_vs_dice.png"
BOXPLOT = "benchmark_dice_boxplot.png"


def fmt(x, digits=3):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def machine_line(data: dict) -> str:
    m = data["machine"]
    load = m.get("load_average_at_start")
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"run of {data['date']} ({'quick' if data['quick'] else 'full'}) on {m.get('cpu', 'a CPU')} "
            f"({m['cpu_count']} cores, {m['threads']} threads per run{gpu}; engine device {m['device']}; "
            f"load average {load[0]:.1f} at the start)" if load else
            f"run of {data['date']} on {m['cpu_count']} cores, engine device {m['device']}")


def _datasets(results: List[dict]) -> List[str]:
    out: List[str] = []
    for r in results:
        if r["dataset"] not in out:
            out.append(r["dataset"])
    return out


def _configs(results: List[dict], ds: str) -> List[str]:
    out: List[str] = []
    for r in results:
        if r["dataset"] == ds and r["config"] not in out:
            out.append(r["config"])
    return out


def _mean(rs: List[dict], get, partial: bool = False) -> Optional[float]:
    """Mean over the pairs; ``None`` unless every pair has the figure (``partial``: those that do,
    e.g. landmarks, which some prostate pairs lack)."""
    values = [get(r) for r in rs]
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values and (partial or len(values) == len(rs)) else None


def summarise(data: dict, gpu: Optional[dict] = None) -> Dict[str, Dict[str, dict]]:
    """dataset -> config -> means over its pairs (only where every pair of that config ran)."""
    gpu_by = defaultdict(list)
    for r in (gpu or {}).get("results", []):
        if r.get("ok"):
            gpu_by[(r["dataset"], r["config"])].append(r)
    out: Dict[str, Dict[str, dict]] = {}
    for ds in _datasets(data["results"]):
        out[ds] = {}
        for cfg in _configs(data["results"], ds):
            rows = [r for r in data["results"] if r["dataset"] == ds and r["config"] == cfg]
            ok = [r for r in rows if r.get("ok")]
            s = {"group": rows[0]["group"], "pairs": len(rows), "failed": len(rows) - len(ok),
                 "errors": sorted({r["error"].splitlines()[0][:160] for r in rows if not r.get("ok")})}
            if ok and len(ok) == len(rows):
                s.update({
                    "dice_before": _mean(ok, lambda r: r.get("dice_mean_before")),
                    "dice_after": _mean(ok, lambda r: r.get("dice_mean_after")),
                    "hd95": _mean(ok, lambda r: r.get("hd95_mean_after_mm")),
                    "epe": _mean(ok, lambda r: r["epe_mm"]["mean"] if "epe_mm" in r else None),
                    "epe_p95": _mean(ok, lambda r: r["epe_mm"]["p95"] if "epe_mm" in r else None),
                    "tre_before": _mean(ok, lambda r: r.get("tre_before_mm"), partial=True),
                    "tre": _mean(ok, lambda r: r.get("tre_after_mm"), partial=True),
                    "folding": _mean(ok, lambda r: r["folding_percent"]),
                    "sdlogj": _mean(ok, lambda r: r["sdlogj"]),
                    "wall_s": _mean(ok, lambda r: r["wall_s"]),
                    "ratio": _mean(ok, lambda r: r.get("ratio_to_fastest_peer")),
                    "ram_mb": _mean(ok, lambda r: r["peak_ram_mb"]),
                    "gpu_mb": _mean(ok, lambda r: r.get("peak_gpu_mb")),
                    "dice_values": [v for r in ok for v in r.get("dice_after", {}).values()
                                    if v is not None and np.isfinite(v)]})
                g = gpu_by.get((ds, cfg), [])
                if g and len(g) == len(rows):
                    s["gpu_wall_s"] = _mean(g, lambda r: r["wall_s"])
                    s["gpu_peak_mb"] = _mean(g, lambda r: r.get("peak_gpu_mb"))
            out[ds][cfg] = s
    return out


def markdown_section(path: Path, data: dict, root: Path, gpu_path: Optional[Path] = None,
                     gpu: Optional[dict] = None, images: Optional[Dict[str, str]] = None) -> List[str]:
    summary = summarise(data, gpu)
    cases = data.get("cases", {})
    refined = any(c.get("refine") for c in data.get("configs", {}).values())
    lines = [f"Results file `{path.relative_to(root)}`: {machine_line(data)}. "
             + (f"`+refine` runs {data.get('refine_steps')} refinement steps for every method that has them. "
                if refined else "")
             + "Time is the wall time of the registration call in its own fresh process (reading the images to "
             "writing the transform; the process start-up and imports are not counted); peak RAM is that "
             "process's peak resident memory; × fastest peer is the time over the fastest peer's on the "
             "same pair (identity left out). Peers always run on the CPU.", ""]
    for name, why in data.get("skipped_in_quick", {}).items():
        lines += [f"Left out of this quick run: `{name}`, because {why}; it runs in the full mode.", ""]
    if gpu is not None:
        lines += [f"GPU columns: `{gpu_path.relative_to(root)}`, {machine_line(gpu)}.", ""]
    for name in ("scatter", "boxplot"):
        if images and images.get(name):
            title = {"scatter": "time against Dice", "boxplot": "Dice per method"}[name]
            lines += [f"![{title}]({images[name]})", ""]
    for ds, configs in summary.items():
        names = [c for c, info in cases.items() if info["dataset"] == ds] or \
            sorted({r["case"] for r in data["results"] if r["dataset"] == ds})
        notes = sorted({cases[c].get("note", "") for c in names if c in cases} - {""})
        has_epe = any(s.get("epe") is not None for s in configs.values())
        has_tre = any(s.get("tre") is not None for s in configs.values())
        has_gpu = any(s.get("gpu_wall_s") is not None for s in configs.values())
        cols = ["method", "Dice before", "Dice after", "HD95 (mm)"]
        cols += ["EPE mean (mm)", "EPE p95 (mm)"] if has_epe else []
        with_points = {r["case"] for r in data["results"] if r["dataset"] == ds and "tre_after_mm" in r}
        tre_note = "" if len(with_points) == len(names) else f", {len(with_points)} pairs with landmarks"
        cols += [f"TRE before (mm{tre_note})", "TRE after (mm)"] if has_tre else []
        cols += ["folding %", "SDlogJ", "time (s)", "× fastest peer", "peak RAM (MB)"]
        cols += ["GPU time (s)", "peak GPU (MB)"] if has_gpu else []
        lines += [f"### {ds} ({len(names)} pair{'s' if len(names) != 1 else ''}: {', '.join(names)}"
                  f"{'; ' + ', '.join(notes) if notes else ''})", "",
                  f"{machine_line(data)[0].upper()}{machine_line(data)[1:]}; means over the pairs.", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for cfg, s in configs.items():
            label = f"{cfg} (peer)" if s["group"] == "peer" else f"**{cfg}**"
            if s["failed"]:
                lines.append(f"| {label} | failed on {s['failed']} of {s['pairs']} pairs: "
                             f"{'; '.join(s['errors'])[:300]} |" + " |" * (len(cols) - 2))
                continue
            row = [label, fmt(s["dice_before"]), fmt(s["dice_after"]), fmt(s["hd95"], 2)]
            row += [fmt(s["epe"], 2), fmt(s["epe_p95"], 2)] if has_epe else []
            row += [fmt(s["tre_before"], 2), fmt(s["tre"], 2)] if has_tre else []
            row += [fmt(s["folding"], 4), fmt(s["sdlogj"], 3), fmt(s["wall_s"], 1), fmt(s["ratio"], 2),
                    fmt(s["ram_mb"], 0)]
            row += [fmt(s.get("gpu_wall_s"), 2), fmt(s.get("gpu_peak_mb"), 0)] if has_gpu else []
            lines.append("| " + " | ".join(row) + " |")
        before = [r["epe_before_mm"] for r in data["results"] if r["dataset"] == ds and "epe_before_mm" in r]
        if before:
            lines += ["", "Mean true displacement inside the anatomy (the EPE of doing nothing): "
                          f"{np.mean(before):.2f} mm."]
        lines += _per_label(data, ds)
        lines.append("")
    return lines


def _per_label(data: dict, ds: str) -> List[str]:
    """Dice per label and pair, where a dataset has at most three labels (the others are in the
    results file and the box plot)."""
    rows = [r for r in data["results"] if r["dataset"] == ds and r.get("ok") and "dice_after" in r]
    if not rows:
        return []
    labels = list(rows[0]["dice_after"])
    if len(labels) > 3:
        return []
    out = ["", f"Dice per label ({', '.join(labels)}) and pair, before → after:", "",
           "| pair | method | " + " | ".join(f"label {k}" for k in labels) + " |", "|---|---|" + "---|" * len(labels)]
    for r in rows:
        cells = [f"{fmt(r['dice_before'].get(k))} → {fmt(r['dice_after'].get(k))}" for k in labels]
        out.append(f"| {r['case']} | {r['config']} | " + " | ".join(cells) + " |")
    return out


def figures(data: dict, folder: Path) -> Dict[str, str]:
    """Write the scatter and the box plots into ``folder``; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(data)
    datasets = [ds for ds, c in summary.items() if any(s.get("dice_after") is not None for s in c.values())]
    if not datasets:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    n = len(datasets)
    colours = {"engine": "tab:blue", "peer": "tab:orange"}

    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.8 * rows + 0.6), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax, ds in zip(axes.ravel(), datasets):
        for cfg, s in summary[ds].items():
            if s.get("dice_after") is None or s.get("wall_s") is None:
                continue
            x = max(s["wall_s"], 1e-2)  # identity takes ~0 s: keep it on the log axis
            ax.scatter(x, s["dice_after"], color=colours[s["group"]], marker="o" if s["group"] == "engine" else "s",
                       s=36, zorder=3)
            ax.annotate(cfg, (x, s["dice_after"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("wall time per pair (s, log)")
        ax.set_ylabel("mean Dice after")
        ax.set_title(ds)
        ax.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], color=colours["engine"], marker="o", ls="", label="engine method"),
               plt.Line2D([], [], color=colours["peer"], marker="s", ls="", label="peer")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    fig.suptitle(f"Time against accuracy, {data['date']} ({'quick' if data['quick'] else 'full'} run, "
                 f"{data['machine']['cpu_count']}-core CPU, {data['machine']['threads']} threads)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(folder / SCATTER, dpi=110)
    plt.close(fig)

    height = 0.3 * max(len(summary[d]) for d in datasets) + 1.4
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, height * rows + 0.4), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    rng = np.random.default_rng(0)  # jitter of the dots only
    for ax, ds in zip(axes.ravel(), datasets):
        names = [c for c, s in summary[ds].items() if s.get("dice_values")]
        values = [summary[ds][c]["dice_values"] for c in names]
        box = ax.boxplot(values, vert=False, patch_artist=True, widths=0.6, showfliers=False)
        for i, (patch, c) in enumerate(zip(box["boxes"], names)):
            patch.set_facecolor(colours[summary[ds][c]["group"]])
            patch.set_alpha(0.45)
            v = values[i]  # every value as a dot: a pair with one label has no box to speak of
            ax.scatter(v, i + 1 + rng.uniform(-0.18, 0.18, len(v)), s=6, color="k", alpha=0.5, zorder=3)
        ax.set_yticks(range(1, len(names) + 1))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("Dice after (per label and pair)")
        ax.set_title(ds)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"Dice per method (per label and pair; blue: engine, orange: peers), {data['date']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(folder / BOXPLOT, dpi=110)
    plt.close(fig)
    return {"scatter": SCATTER, "boxplot": BOXPLOT}
