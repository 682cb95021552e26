"""Regenerate ``docs/BENCHMARKS.md`` from the newest results files in ``benchmarks/results/``.

    python benchmarks/make_report.py

Every number in the document comes from a dated results file; nothing is typed by hand.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the study scripts beside this one

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "BENCHMARKS.md"


def newest(pattern: str):
    files = sorted(RESULTS.glob(pattern))
    return (files[-1], json.loads(files[-1].read_text())) if files else (None, None)


def fmt(x, digits=3):
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def timing_section(lines):
    for device in ("cpu", "cuda"):
        path, data = newest(f"timing-*-{device}.json")
        if data is None:
            lines += [f"### Stage timing, {device.upper()}", "", f"No `timing-*-{device}.json` results yet "
                      f"(`python benchmarks/stage_timing.py --device {device}`).", ""]
            continue
        s = data["summary"]
        target = 20.0 if device == "cpu" else 1.0
        lines += [f"### Stage timing, {device.upper()} ({data['date']}, `{path.relative_to(ROOT)}`)", "",
                  f"Pair: {data['pair']}, method `{data['method']}`, {data['machine']['cpu_count']} CPU cores; "
                  f"each run is a fresh worker process; medians of {len([r for r in data['runs'] if r['refine'] == 0])} runs.",
                  "", "| stage | seconds |", "|---|---|"]
        for k, v in s["stage_medians_s"].items():
            lines.append(f"| {k} | {v:.2f} |")
        ok = "meets" if s["network_plus_io_s_median"] < target else "misses"
        ram_ok = "meets" if s["peak_ram_mb_max"] < 4096 else "misses"
        lines += ["", f"- network inference plus I/O (read + preprocess + inference + postprocess + write): "
                      f"**{s['network_plus_io_s_median']:.1f} s** ({ok} the {target:g} s target)",
                  f"- peak RAM of the worker process: **{s['peak_ram_mb_max'] / 1024:.2f} GB** ({ram_ok} the 4 GB target)"]
        refined = [r for r in data["runs"] if r["refine"]]
        for r in refined:
            lines.append(f"- with `--refine {r['refine']}`: refine stage {r['timings'].get('refine', 0):.1f} s, "
                         f"total {r['timings']['total']:.1f} s")
        lines += [f"- network grid: {data['runs'][0]['network_grid']} voxels (x, y, z)", ""]


def attention_memory_section(lines):
    """Peak memory of the attention networks at clinical size (``attention_memory.py``)."""
    lines += ["### Attention at clinical size (issue 4)", ""]
    found = False
    for device in ("cpu", "cuda"):
        path, data = newest(f"attention-memory-*-{device}.json")
        if data is None:
            continue
        found = True
        gpu = device == "cuda"
        lines += [f"`{path.relative_to(ROOT)}` ({data['date']}, {device}, {data['threads']} thread(s)); inference "
                  "without gradients, each case in its own process. Memory: growth of the process's peak "
                  + ("GPU allocation" if gpu else "resident set") + " over the moment before the forward pass "
                  "(inputs and model already loaded). Explicit `S`: what the `L x L` float32 similarity matrix "
                  "alone would take.", "",
                  "| case | input (D x H x W) | tokens L | seconds | peak above inputs (MB) | process peak (MB) | explicit S (MB) |",
                  "|---|---|---|---|---|---|---|"]
        for r in data["results"]:
            shape = "x".join(str(n) for n in r["shape_dhw"])
            if not r.get("ok"):
                lines.append(f"| {r['case']} | {shape} | – | failed: {r.get('error', '')} | – | – | – |")
                continue
            peak = r.get("peak_gpu_above_inputs_mb") if gpu else r["peak_above_inputs_mb"]
            lines.append(f"| {r['case']} | {shape} | {r.get('tokens', '–')} | {r['seconds']:.1f} | {fmt(peak, 0)} | "
                         f"{r['peak_rss_mb']:.0f} | {fmt(r.get('explicit_S_mb'), 0)} |")
        lines.append("")
        ok = {(r["case"], tuple(r["shape_dhw"])): r for r in data["results"] if r.get("ok")}
        naive = [r for (c, _), r in ok.items() if c == "coattention-naive"]
        if naive and not gpu:
            n = naive[0]
            fused = ok.get(("coattention", tuple(n["shape_dhw"])))
            lines.append(f"- The explicit block grows by {n['peak_above_inputs_mb']:.0f} MB at "
                         f"L = {n['tokens']}, {n['peak_above_inputs_mb'] / n['explicit_S_mb']:.1f} x the size of `S` "
                         "(`S` and its softmax), as the quadratic estimate says"
                         + (f"; the fused path needs {fused['peak_above_inputs_mb']:.0f} MB there." if fused else "."))
        full = [r for (c, shape), r in ok.items() if c == "coattention" and r.get("tokens", 0) > 50000]
        if full:
            f = full[0]
            lines.append(f"- At {'x'.join(map(str, f['shape_dhw']))} (L = {f['tokens']}) the co-attention block "
                         f"needs {f['peak_above_inputs_mb']:.0f} MB where `S` alone would take "
                         f"{f['explicit_S_mb'] / 1024:.0f} GB: memory linear in L. These are network runs at the "
                         "full input size; the engine itself runs the networks on the 2 mm grid (80x96x112 for "
                         "this volume), where they are far cheaper (stage timing above).")
        lines.append("")
    if not found:
        lines += ["No `attention-memory-*.json` results yet (`python benchmarks/attention_memory.py`).", ""]


def _is_gpu_run(path: Path) -> bool:
    return path.stem.endswith(("-cuda", "-mps"))


def accuracy_section(lines):
    """The newest benchmark run (format 2 of ``evaluate.py``: engine methods and peers) with its
    tables and figures, GPU columns from the newest CUDA run; then every other dated results file,
    each on its own (runs differ in methods and datasets, so none is merged with another)."""
    import benchmark_report
    files = [f for f in sorted(RESULTS.glob("accuracy-*.json"), reverse=True) if not f.stem.endswith("equal-budget")]
    if not files:
        lines += ["No `accuracy-*.json` results yet (`python benchmarks/evaluate.py --quick`).", ""]
        return
    loaded = {p: json.loads(p.read_text()) for p in files}
    current = [p for p in files if loaded[p].get("format", 1) >= 2 and not _is_gpu_run(p)]
    gpu_runs = [p for p in files if loaded[p].get("format", 1) >= 2 and _is_gpu_run(p)]
    shown = set()
    if current:
        path = current[0]
        gpu_path = gpu_runs[0] if gpu_runs else None
        images = benchmark_report.figures(loaded[path], DOC.parent / "images")
        images = {k: f"images/{v}" for k, v in images.items()}
        lines += [f"### Methods and peers, run of {path.stem[len('accuracy-'):]}", ""]
        lines += benchmark_report.markdown_section(path, loaded[path], ROOT, gpu_path,
                                                   loaded[gpu_path] if gpu_path else None, images)
        shown = {path, gpu_path}
    for path in files:
        if path in shown:
            continue
        lines += [f"### Run of {path.stem[len('accuracy-'):]}", ""]
        if loaded[path].get("format", 1) >= 2:
            lines += benchmark_report.markdown_section(path, loaded[path], ROOT)
        else:
            _accuracy_run(lines, path, loaded[path])


def _budget_note(spec: dict) -> str:
    """What a configuration's weights were trained with, read from their model card (the
    ``--extra`` file's own card, else the shipped weights of the registry entry)."""
    from deepreglib.methods.registry import METHODS
    if spec.get("kind") != "engine":
        return "no registration" if spec.get("name") == "identity" else "peer"
    if spec.get("weights"):
        card_path = ROOT / "benchmarks" / "models" / (Path(spec["weights"]).stem + ".json")
    else:
        info = METHODS.get(spec["name"])
        card_path = ROOT / "Resources" / "Models" / f"{info.weights if info else spec['name']}.json"
    if not card_path.is_file():
        return f"{spec['name']} (model card {card_path.name} not found)"
    card = json.loads(card_path.read_text())
    shape = "x".join(str(n) for n in card["training"]["shape"])
    sps = card.get("training_log", {}).get("seconds_per_step")
    return (f"{card.get('network', spec['name'])}, {card['iterations']} steps at {shape}, lr {card['training']['lr']}"
            + (f", {sps:.2f} s/step on {card.get('threads')} thread(s)" if sps else "")
            + ("" if spec.get("weights") else " (shipped)"))


def equal_budget_section(lines):
    """The papers' claim, attention (or anatomy embeddings) beat the plain U-Net at equal budget:
    each new method beside VoxelMorph trained with the same steps, patch, lr, data and seed."""
    files = sorted(RESULTS.glob("accuracy-*-equal-budget.json"))
    if not files:
        return
    path = files[-1]
    data = json.loads(path.read_text())
    res = [r for r in data["results"] if r.get("ok")]
    datasets = []
    for r in res:
        if r["dataset"] not in datasets:
            datasets.append(r["dataset"])
    configs = []
    for r in res:
        if r["config"] not in configs:
            configs.append(r["config"])
    lines += ["## Equal training budget: attention and anatomy embeddings vs the plain U-Net (issues 4, 5)", "",
              f"Results file: `{path.relative_to(ROOT)}` (quick run, {data['machine'].get('cpu_count', '?')} CPU cores, "
              f"{data['machine'].get('threads', 1)} thread per run; "
              f"`+refine` = {data['refine_steps']} instance-optimisation steps, the same for all). The baselines were "
              "trained with `deepreg train voxelmorph --shape 48 48 48 --lr 5e-4 --label-weight 1 --real-dir "
              "oasis_unlabeled --real-fraction 0.5 --seed 0`, the settings of the new methods, and exported at 600 "
              "and 1600 steps (`benchmarks/models/`).", ""]
    for c in configs:
        if not c.endswith("+refine") and c in data.get("configs", {}):
            lines.append(f"- `{c}`: {_budget_note(data['configs'][c])}")
    lines.append("")
    head = "| configuration | " + " | ".join(f"{d} Dice | {d} EPE (mm)" for d in datasets) + " | folding % (max) | SDlogJ (max) | CPU s (mean) |"
    lines += [head, "|" + "---|" * (1 + 2 * len(datasets) + 3)]
    for c in configs:
        cells = []
        rs_c = [r for r in res if r["config"] == c]
        for d in datasets:
            rs = [r for r in rs_c if r["dataset"] == d]
            dice = [r["dice_mean_after"] for r in rs if "dice_mean_after" in r]
            epe = [r["epe_mm"]["mean"] for r in rs if "epe_mm" in r]
            cells += [fmt(float(np.mean(dice)) if dice else None), fmt(float(np.mean(epe)) if epe else None, 2)]
        fold = max(r["folding_percent"] for r in rs_c)
        sd = max(r["sdlogj"] for r in rs_c)
        wall = float(np.mean([r["wall_s"] for r in rs_c]))
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {fmt(fold, 4)} | {fmt(sd, 3)} | {fmt(wall, 1)} |")
    before = {d: [r for r in res if r["dataset"] == d and r["config"] == configs[0]] for d in datasets}
    lines += ["", "Before registration: " + "; ".join(
        f"{d} Dice {fmt(float(np.mean([r['dice_mean_before'] for r in rs if 'dice_mean_before' in r])))}"
        + (f", EPE {fmt(float(np.mean([r['epe_before_mm'] for r in rs if 'epe_before_mm' in r])), 2)} mm"
           if any('epe_before_mm' in r for r in rs) else "")
        for d, rs in before.items() if rs) + ".", ""]
    notes = RESULTS.parent / "EQUAL_BUDGET.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]


def _accuracy_run(lines, path, data):
    lines += [f"Results file: `{path.relative_to(ROOT)}` ({data['date']}; {'quick' if data['quick'] else 'full'} run; "
              f"machine: {data['machine']['cpu_count']} CPU cores, torch {data['machine']['torch']}, device "
              f"{data['machine']['device']}). Times are wall time of the whole `register` call on that machine.", ""]
    by = defaultdict(list)
    for r in data["results"]:
        by[(r["dataset"], r["config"])].append(r)
    datasets = []
    for r in data["results"]:
        if r["dataset"] not in datasets:
            datasets.append(r["dataset"])
    for ds in datasets:
        cases = sorted({r["case"] for r in data["results"] if r["dataset"] == ds})
        lines += [f"### {ds} ({len(cases)} pair{'s' if len(cases) > 1 else ''}: {', '.join(cases)})", "",
                  "| method | Dice before | Dice after | EPE mean (mm) | EPE p95 (mm) | HD95 after (mm) | folding % | SDlogJ | time (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (d, cfg), rs in by.items():
            if d != ds:
                continue
            mean = lambda key: float(np.mean([r[key] for r in rs])) if all(key in r for r in rs) else None  # noqa: E731
            epe = [r["epe_mm"]["mean"] for r in rs if "epe_mm" in r]
            p95 = [r["epe_mm"]["p95"] for r in rs if "epe_mm" in r]
            lines.append(f"| {cfg} | {fmt(mean('dice_mean_before'))} | {fmt(mean('dice_mean_after'))} | "
                         f"{fmt(float(np.mean(epe)) if epe else None, 2)} | {fmt(float(np.mean(p95)) if p95 else None, 2)} | "
                         f"{fmt(mean('hd95_mean_after_mm'), 2)} | "
                         f"{fmt(float(np.mean([r['metrics']['folding_percent'] for r in rs])), 4)} | "
                         f"{fmt(float(np.mean([r['metrics']['sdlogj'] for r in rs])), 3)} | "
                         f"{fmt(float(np.mean([r['wall_s'] for r in rs])), 1)} |")
        before = [r.get("epe_before_mm") for r in data["results"] if r["dataset"] == ds and "epe_before_mm" in r]
        if before:
            lines.append(f"\nMean true displacement inside the image (the EPE of doing nothing): {np.mean(before):.2f} mm.")
        if ds == "oasis_pair":
            lines += ["", "Dice per label (1 grey-matter-like, 2 white-matter-like), per direction:", "",
                      "| pair | method | label 1 before | label 1 after | label 2 before | label 2 after |", "|---|---|---|---|---|---|"]
            for r in data["results"]:
                if r["dataset"] == ds:
                    lines.append(f"| {r['case']} | {r['config']} | {fmt(r['dice_before']['1'])} | {fmt(r['dice_after']['1'])} | "
                                 f"{fmt(r['dice_before']['2'])} | {fmt(r['dice_after']['2'])} |")
        lines.append("")


def model_section(lines):
    cards = sorted((ROOT / "Resources" / "Models").glob("*.json"))
    lines += ["## Shipped models", ""]
    for c in cards:
        card = json.loads(c.read_text())
        log = card.get("training_log", {})
        lines += [f"### `{c.stem}`", "",
                  f"- {card.get('iterations')} iterations on {card.get('device')} ({card.get('threads')} threads, "
                  f"{fmt(log.get('seconds_per_step'), 2)} s/step), patch {card['training']['shape']}, "
                  f"lr {card['training']['lr']}, sha256 `{card['sha256']}`",
                  f"- loss: {card['training'].get('loss', '')}"]
        for kind in ("synthetic", "real"):
            for term, v in log.get(kind, {}).items():
                lines.append(f"- {kind} pairs, `{term}`: {fmt(v['first'])} (steps {v['first_steps'][0]}–{v['first_steps'][1]}) "
                             f"→ {fmt(v['last'])} (steps {v['last_steps'][0]}–{v['last_steps'][1]})")
        for sess in card.get("sessions", []):
            lines.append(f"- from step {sess['from_step']}: {sess['changed']}")
        lines.append("")
    if (ROOT / "docs" / "images" / "voxelmorph_loss.png").is_file():
        lines += ["![voxelmorph training loss](images/voxelmorph_loss.png)", ""]


def _latest(prefix: str):
    files = sorted((ROOT / "benchmarks" / "results").glob(f"{prefix}-*.json"))
    return json.loads(files[-1].read_text()) if files else None


def study_sections(lines):
    """The method-specific studies (pose range for D-Net / SAM-affine, R2N2 steps and compactness)."""
    import pose_range
    import r2n2_study
    pose = _latest("pose")
    if pose is not None:
        lines += ["## Rigid and affine alignment over the full rotation range (issue 5)", ""]
        lines += pose_range.markdown_section(pose)
    small = _latest("affine-range")
    if small is not None:
        lines += ["### Learned and iterative affine alignment at moderate rotations (issue 5)", ""]
        lines += pose_range.markdown_section(small)
    subj = _latest("dnet-subjects")
    if subj is not None:
        lines += ["### D-Net: training subjects under new poses vs an unseen subject", "",
                  f"`benchmarks/dnet_subjects.py` ({subj['date']}, {subj['sets'][next(iter(subj['sets']))]['pairs']} random "
                  "poses over the full range per set, whole scans on the 48³ cube as in training).", "",
                  "| weights | set | true angle (median) | rotation error median | mean | within 30° |", "|---|---|---|---|---|---|"]
        rows = [(f"{subj['weights']} ({subj['iterations']} steps)", subj["sets"])]
        if "first_weights" in subj:
            rows.append((subj["first_weights"]["weights"], subj["first_weights"]["sets"]))
        for label, sets in rows:
            for name, v in sets.items():
                lines.append(f"| {label} | {name} | {v['true_angle_median_deg']:.0f}° | {v['rotation_error_median_deg']:.1f}° | "
                             f"{v['rotation_error_mean_deg']:.1f}° | {v['within_30_deg_percent']:.0f} % |")
        lines.append("")
    r2 = _latest("r2n2")
    if r2 is not None:
        lines += ["## R2N2: steps, adaptive stop and compactness (issue 6)", ""]
        lines += r2n2_study.markdown_section(r2)


def main():
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/make_report.py` from the results files in `benchmarks/results/`; "
             "rerun `benchmarks/stage_timing.py` and `benchmarks/evaluate.py` (`--quick`: about 10 minutes on 2 "
             "cores) to refresh them. Every registered method runs beside the peers people use today (ANTs SyN "
             "and SyNCC, elastix affine + B-spline, SimpleITK affine + demons, the SimpleITK affine alone, "
             "identity), each in its own fresh process with the same threads, the peers with their documented "
             "defaults (settings in `benchmarks/peers.py`). Datasets: "
             "`synthetic` = the engine's generator with known deformations (96×112×96, 2 mm); `brain_aseg` = the "
             "FreeSurfer-labelled brain warped by seeded random diffeomorphisms (EPE against the known field, Dice "
             "over the 30 usual labels); `oasis_pair` = two real subjects, both directions (Dice of the two labels); "
             "`prostate_mr_trus` = MR to transrectal ultrasound (gland Dice, landmark-blob centroid error as TRE), "
             "both put on the ultrasound's grid with the MR's box centred on it, without using the labels. "
             "EPE (endpoint error of the fixed->moving map, mm) is measured inside the fixed label map's "
             "foreground, where the images carry information. Labels and landmarks are never given to the "
             "registration: the moving labels are carried through the transform file each run wrote "
             "(displacement field or linear `.tfm`) with SimpleITK (nearest neighbour) and scored against the "
             "fixed labels; landmarks are mapped through the same transform. Folding % and SDlogJ are those of "
             "that transform on the fixed grid, computed the same way for every method and peer. `+refine` is "
             "instance-optimisation steps (local NCC + smoothness) after the network, the same number for "
             "every method. In older runs (format 1), `identity` was an untrained network whose flow head "
             "starts at zero.", "",
             "## Speed and memory (issue 2 targets)", ""]
    timing_section(lines)
    attention_memory_section(lines)
    lines += ["## Accuracy", ""]
    accuracy_section(lines)
    equal_budget_section(lines)
    study_sections(lines)
    model_section(lines)
    notes = ROOT / "benchmarks" / "NOTES.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    sys.exit(main())
