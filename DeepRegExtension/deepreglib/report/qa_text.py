"""The QA picture's text block: the run's numbers as ``(name, value)`` rows (``x_before`` and
``x_after`` on one row), the Jacobian's statistics, and how to read the page."""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

#: Characters a text line may have before it is cut with an ellipsis.
_TEXT_CHARS = 44


_NAMES = {
    "method": "Method", "device": "Device", "time": "Time", "time_s": "Time",
    "ncc": "NCC", "lncc": "LNCC", "mse": "MSE", "mi": "MI", "nmi": "NMI", "ssim": "SSIM",
    "dice": "Dice", "dice_mean": "Dice (mean)", "mean_dice": "Dice (mean)", "hd95": "HD95",
    "hd95_mm": "HD95", "tre": "TRE", "tre_mm": "TRE", "sdlogj": "SDlogJ", "sd_log_j": "SDlogJ",
    "std_log_jacobian": "SDlogJ", "folding_fraction": "Folding", "folding_percent": "Folding",
    "folding": "Folding", "jacobian_min": "min det J", "jacobian_max": "max det J",
    "jac_min": "min det J", "jac_max": "max det J", "max_displacement_mm": "max |u|",
    "weights_sha256": "Weights sha256",
}
#: Rows listed first, in this order; the rest keep the order of the metrics dict.
_FIRST = ("method", "device", "time", "time_s")
#: A nested dict of more numbers than this (e.g. Dice of 35 labels) is not listed value by value.
_MAX_PER_KEY = 8
_STAGE = re.compile(r"(^|_)(before|after)(?=_|$)")


def _flatten(d: Mapping, prefix: str = "") -> Tuple[List[Tuple[str, Any]], List[str]]:
    """``(dotted key, value)`` leaves, and the keys of long numeric dicts that were left out."""
    out: List[Tuple[str, Any]] = []
    skipped: List[str] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            if len(v) > _MAX_PER_KEY:
                skipped.append(key)
                continue
            leaves, more = _flatten(v, key + ".")
            out.extend(leaves)
            skipped.extend(more)
        else:
            out.append((key, v))
    return out, skipped


def _split_stage(key: str) -> Tuple[str, Optional[int]]:
    """``"dice_before.3"`` -> ``("dice.3", 0)``; ``"tre_after_mm"`` -> ``("tre_mm", 1)``."""
    parts = key.split(".")
    slot = None
    for n, part in enumerate(parts):
        m = _STAGE.search(part.lower())
        if m:
            slot = 0 if m.group(2) == "before" else 1
            parts[n] = (part[: m.start()] + part[m.end():]).strip("_")
    base = ".".join(p for p in parts if p)
    return (base, slot) if base else (key, None)


def _pretty_name(key: str) -> str:
    parts = key.lower().split(".")
    if parts[0] in ("timings", "timing", "times") and len(parts) > 1:
        return "Time " + " ".join(parts[1:]).replace("_", " ")
    words = []
    for part in parts:
        if part in _NAMES:
            words.append(_NAMES[part])
        elif part.isdigit():
            words.append(f"label {part}")
        else:
            words.append(part.replace("_", " "))
    return " ".join(words)


def _format_value(key: str, v: Any) -> str:
    k = key.lower()
    if v is None:
        return "\u2013"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        nums = [x for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if len(nums) == len(v) and len(v) > 4:
            return f"mean {_num(float(np.mean(nums)))} (n={len(v)})"
        return ", ".join(_format_value(key, x) for x in v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        x = float(v)
        if not math.isfinite(x):
            return str(x)
        if "fold" in k and ("percent" in k or "pct" in k):
            return f"{_num(x)} %"
        if "fold" in k or "fraction" in k:
            return f"{_num(100.0 * x)} %"
        if "time" in k or "timing" in k or k.endswith("_s") or k.endswith("seconds"):
            return f"{x:.2f} s" if x < 100 else f"{x:.0f} s"
        if k.endswith("_mm") or "_mm." in k:
            return f"{_num(x)} mm"
        if isinstance(v, (int, np.integer)):
            return str(int(v))
        return _num(x)
    s = str(v)
    return s if len(s) <= 28 else s[:12] + "\u2026" + s[-12:]


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.3g}"
    return f"{x:.4g}"


def metric_rows(metrics: Optional[Mapping]) -> List[Tuple[str, str]]:
    """``(name, value)`` rows; ``x_before``/``x_after`` (anywhere in a key, e.g. ``tre_before_mm``
    or ``dice_before.3``) share one row ``before -> after``. Method, device and time come first."""
    if not metrics:
        return []
    leaves, skipped = _flatten(metrics)
    rows: Dict[str, List[Any]] = {}  # base -> [base, plain, before, after]
    for key, value in leaves:
        base, slot = _split_stage(key)
        entry = rows.setdefault(base.lower(), [base, None, None, None])
        entry[1 if slot is None else 2 + slot] = _format_value(key, value)
    order = sorted(rows, key=lambda b: _FIRST.index(b) if b in _FIRST else len(_FIRST))
    out = []
    dash = "\u2013"
    for b in order:
        base, plain, before, after = rows[b]
        name = _pretty_name(base)
        if before is not None or after is not None:
            out.append((name, f"{before or dash} \u2192 {after or dash}"))
        if plain is not None:
            out.append((name, plain))
    for key in dict.fromkeys(_split_stage(k)[0] for k in skipped):
        out.append((_pretty_name(key), "per label: see manifest"))
    return out


def text_lines(metrics, jac, has_lab_f, has_lab_w, has_field) -> List[Tuple[str, str]]:
    """(style, text) lines; style is "head" or "body"."""
    width = _TEXT_CHARS
    lines: List[Tuple[str, str]] = []

    def row(name: str, value: str) -> None:
        name = name if len(name) <= 16 else name[:15] + "\u2026"
        text = f"{name:<16} {value}"
        lines.append(("body", text if len(text) <= width else text[: width - 1] + "\u2026"))

    rows = metric_rows(metrics)
    if rows:
        lines.append(("head", "Run and metrics (before \u2192 after)"))
        for name, value in rows:
            row(name, value)
        lines.append(("body", ""))
    if jac is not None and jac.stats:
        st = jac.stats
        lines.append(("head", "Jacobian map shown (all voxels)"))
        row("min det J", _num(float(st["min"])))
        row("max det J", _num(float(st["max"])))
        row("Folding", f"{_num(100.0 * st['folding_fraction'])} % (det J \u2264 0)")
        row("SDlogJ", _num(st["sdlogj"]))
        lines.append(("body", ""))
    lines.append(("head", "How to read"))
    for text in (
            "Before/after: |difference| should fade",
            "  from column 4 to column 5.",
            "Checkerboard: edges should run on",
            "  across square borders.",
            "Grid: the moving image's regular grid",
            "  as the registration bends it." if has_field else "  (no field in this run).",
            "Jacobian: blue shrinks, white keeps,",
            "  red grows volume; magenta folds.",
    ):
        lines.append(("body", text))
    if has_lab_f or has_lab_w:
        lines.append(("body", "Contours on Warped:"))
        if has_lab_f:
            lines.append(("fixed", "  \u2014 fixed labels"))
        if has_lab_w:
            lines.append(("warped", "  \u2014 warped moving labels"))
    lines.append(("body", ""))
    lines.append(("head", "Orientation"))
    lines.append(("body", "Image index space, not RAS/LPS."))
    lines.append(("body", "Axial: j down, i right."))
    lines.append(("body", "Coronal/sagittal: k up."))
    return lines


