"""Compare two runs' transforms: ``python benchmarks/compare_runs.py RUN_A RUN_B [--tol MM]``.

Reads each run's manifest, and for every displacement field and linear transform the two have
in common prints the largest difference (mm); exits 1 when one exceeds ``--tol`` (default
1e-4 mm). Used to show that a restructuring left ``deepreg register``'s answer unchanged."""
import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepreglib.io.protocol import OUTPUT_DISPLACEMENT_FIELD, OUTPUT_LINEAR_TRANSFORM, outputs_of_kind, read_manifest


def _read(folder: Path, entry: dict) -> np.ndarray:
    path = folder / entry["path"]
    if entry["kind"] == OUTPUT_DISPLACEMENT_FIELD:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)
    t = sitk.ReadTransform(str(path))
    return np.asarray(t.GetParameters(), dtype=np.float64)


def compare(a: Path, b: Path) -> dict:
    ma, mb = read_manifest(a / "manifest.json"), read_manifest(b / "manifest.json")
    kinds = (OUTPUT_DISPLACEMENT_FIELD, OUTPUT_LINEAR_TRANSFORM)
    entries_b = {e["name"]: e for e in outputs_of_kind(mb, kinds)}
    out = {}
    for ea in outputs_of_kind(ma, kinds):
        if ea["name"] in entries_b:
            out[ea["name"]] = float(np.abs(_read(a, ea) - _read(b, entries_b[ea["name"]])).max())
    out["matrix_lps"] = float(np.abs(np.asarray(ma["matrix_lps"]) - np.asarray(mb["matrix_lps"])).max())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args()
    diffs = compare(args.a, args.b)
    for name, d in diffs.items():
        print(f"{name:<20} max |difference| = {d:.3g}")
    return 0 if all(d <= args.tol for d in diffs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
