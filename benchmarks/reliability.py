"""Reliability benchmark (issue 18): bad inputs, unusual valid inputs, faults, random kills and
big scans, each a real worker process (``python -m deepreglib register``), as Slicer starts it.

    python benchmarks/reliability.py [--quick] [--big] [--kills 20] [--out benchmarks/results]

Writes ``benchmarks/results/reliability-YYYY-MM-DD.json``: cases tried, clean exits (0, 2 or 3
with the protocol's last event, never a traceback or a signal death), outputs lost (a run that
said "result" but whose files are missing or unreadable: must be 0), orphans (temporary
folders or files left beside ``--out`` after the next run to it: must be 0), inputs modified
(sha256 before and after: must be 0), and with ``--big`` the wall time and peak RSS of a
512x512x300 and a 512x512x600 synthetic int16 CT pair. ``--quick`` runs one case of each kind
on small volumes (a minute or two); the default runs the whole matrix.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]


# -- inputs -------------------------------------------------------------------------------------
def write_ct_pair(folder: Path, slices: int, size: int = 512, spacing=(0.7, 0.7, 1.0)):
    """A CT-like int16 pair (air -1000, body ~40 HU with noise, lungs, a bony ring) of
    ``size x size x slices`` voxels; the moving one is shifted by a few mm and slightly
    squeezed. Built slice by slice (no whole-volume float64 array). Returns the two paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size].astype(np.float32)
    c = (size - 1) / 2.0
    paths = []
    for name, shift, squeeze in (("fixed", 0.0, 1.0), ("moving", 6.0, 0.96)):
        arr = np.empty((slices, size, size), dtype=np.int16)
        for k in range(slices):
            z = (k - slices / 2) / slices
            rx, ry = size * 0.42 * (1 - 0.2 * z * z), size * 0.30 * squeeze * (1 - 0.2 * z * z)
            xx, yy = x - c - shift, y - c
            r = (xx / rx) ** 2 + (yy / ry) ** 2
            s = np.full((size, size), -1000.0, np.float32)
            s[r < 1] = 40.0
            s[(r < 1) & (r > 0.85)] = 700.0  # ribs/skull-like ring
            for side in (-1, 1):  # lungs
                lr = ((xx - side * rx * 0.45) / (rx * 0.3)) ** 2 + (yy / (ry * 0.6)) ** 2
                s[lr < 1] = -800.0
            s += rng.normal(0, 15, s.shape).astype(np.float32)
            arr[k] = np.clip(s, -1024, 3000).astype(np.int16)
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing)
        p = folder / f"{name}.nii.gz"
        sitk.WriteImage(img, str(p))
        paths.append(str(p))
    return paths


def _volume(folder: Path, name: str, arr: np.ndarray, spacing=(1.0, 1.0, 1.0), direction=None, ext=".nrrd") -> str:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(tuple(np.ravel(direction)))
    p = folder / f"{name}{ext}"
    sitk.WriteImage(img, str(p))
    return str(p)


def _blob(shape, shift=0.0):
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    c = [(n - 1) / 2 for n in shape]
    r = max(shape) / 6
    return 100 * np.exp(-((x - c[2] - shift) ** 2 + (y - c[1]) ** 2 + (z - c[0]) ** 2) / (2 * r * r))


def _oblique():
    a = 0.4
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def input_cases(folder: Path, quick: bool):
    """``[(name, fixed, moving, expected exit code)]`` for bad and unusual valid inputs, and the
    plain pair (fixed, moving) the fault and kill cases use."""
    folder.mkdir(parents=True, exist_ok=True)
    f = _volume(folder, "f", _blob((32, 32, 32)).astype(np.float32))
    m = _volume(folder, "m", _blob((32, 32, 32), 2).astype(np.float32))
    nan = _blob((32, 32, 32), 2).astype(np.float32)
    nan[5] = np.nan
    cases = [("nan_nifti", f, _volume(folder, "nan", nan, ext=".nii.gz"), 2),
             ("nan_nrrd", f, _volume(folder, "nan", nan, ext=".nrrd"), 2)]
    trunc = Path(_volume(folder, "trunc", _blob((32, 32, 32), 2).astype(np.float32), ext=".nii.gz"))
    trunc.write_bytes(trunc.read_bytes()[:3000])
    cases += [("truncated_nii_gz", f, str(trunc), 2), ("missing_file", f, str(folder / "nope.nii.gz"), 2),
              ("two_slices", f, _volume(folder, "thin", _blob((2, 32, 32)).astype(np.float32)), 2),
              ("constant", f, _volume(folder, "const", np.ones((32, 32, 32), np.float32)), 2)]
    if quick:
        return cases + [("oblique", f, _volume(folder, "obl", _blob((32, 32, 32), 2).astype(np.float32),
                                                 direction=_oblique()), 0)], f, m
    flip = np.diag([-1.0, 1.0, 1.0])
    return cases + [
        ("anisotropic", f, _volume(folder, "aniso", _blob((12, 40, 40), 2).astype(np.float32), (0.8, 0.8, 3.0)), 0),
        ("oblique", f, _volume(folder, "obl", _blob((32, 32, 32), 2).astype(np.float32), direction=_oblique()), 0),
        ("lr_flipped", f, _volume(folder, "flip", _blob((32, 32, 32), 2).astype(np.float32), direction=flip), 0),
        ("tiny_4", _volume(folder, "t4f", _blob((4, 4, 4)).astype(np.float32)),
         _volume(folder, "t4m", _blob((4, 4, 4), 0.5).astype(np.float32)), 0),
        ("int8", f, _volume(folder, "i8", (_blob((32, 32, 32), 2)).astype(np.int8)), 0),
        ("uint16", f, _volume(folder, "u16", (_blob((32, 32, 32), 2) * 300).astype(np.uint16)), 0),
        ("float64", f, _volume(folder, "f64", _blob((32, 32, 32), 2)), 0)], f, m


def _cmd(fixed, moving, out, *extra):
    return [sys.executable, "-m", "deepreglib", "register", "--fixed", fixed, "--moving", moving, "--out", str(out),
            "--device", "cpu", "--progress", "json", "--method", "voxelmorph", "--init", "none", *extra]


def _events(text: str):
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"event": "garbage", "line": line[:200]})
    return out


def _complete(out: Path) -> bool:
    try:
        m = json.loads((out / "manifest.json").read_text())
        return all((out / o["path"]).is_file() for o in m["outputs"])
    except (OSError, ValueError):
        return False


def _sha(paths):
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).is_file()}


class Tally:
    def __init__(self):
        self.cases, self.results = 0, []

    def add(self, name, rc, events, out: Path, expected=None, **extra):
        last = events[-1] if events else {}
        protocol = last.get("event") in ("result", "error") and not any(e["event"] == "garbage" for e in events)
        clean = (rc == 0 and last.get("event") == "result") or (rc in (1, 2, 3) and protocol and rc != 1)
        said_result = any(e.get("event") == "result" for e in events)
        lost = said_result and not _complete(out)
        half = out.exists() and not _complete(out)
        self.cases += 1
        r = {"case": name, "rc": rc, "clean": bool(clean), "lost": bool(lost), "half_written": bool(half),
             "expected": expected, "as_expected": expected is None or rc == expected,
             "last": (last.get("message") or last.get("event") or "")[:160], **extra}
        self.results.append(r)
        print(json.dumps(r), flush=True)


def run_case(tally, name, cmd, out, expected=None, env=None, preexec=None):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, **(env or {})},
                       preexec_fn=preexec)
    tally.add(name, p.returncode, _events(p.stdout), out, expected, wall_s=round(time.perf_counter() - t0, 1))


def kills(tally, f, m, folder: Path, n: int, sig, seed: int):
    rng = random.Random(seed)
    for i in range(n):
        out = folder / f"{sig.name.lower()}{i}"
        p = subprocess.Popen(_cmd(f, m, out, "--no-qa"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        t = rng.uniform(0.0, 8.0)
        time.sleep(t)
        p.send_signal(sig)
        text, _ = p.communicate(timeout=120)
        events = _events(text)
        if sig == signal.SIGKILL:  # no last word expected: only that nothing is half-written
            tally.add(f"sigkill@{t:.1f}s", p.returncode, [{"event": "result"}] if _complete(out) else
                      [{"event": "error"}], out)
            tally.results[-1]["clean"] = not tally.results[-1]["half_written"]
            if not out.exists():  # the next run to the same folder must succeed
                run_case(tally, f"after_sigkill{i}", _cmd(f, m, out, "--no-qa"), out, 0)
        else:
            tally.add(f"sigterm@{t:.1f}s", p.returncode, events, out)


def faults(tally, f, m, folder: Path):
    import shutil
    if os.name != "nt":
        import resource

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
        run_case(tally, "disk_full", _cmd(f, m, folder / "full"), folder / "full", 2, preexec=limit)
    sys.path.insert(0, str(ROOT / "DeepRegExtension"))
    from deepreglib.io.models import models_dir
    wdir = folder / "weights"
    wdir.mkdir()
    for name in ("voxelmorph.pt", "voxelmorph.json"):
        shutil.copy(models_dir() / name, wdir / name)
    data = bytearray((wdir / "voxelmorph.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (wdir / "voxelmorph.pt").write_bytes(bytes(data))
    run_case(tally, "corrupted_weights", _cmd(f, m, folder / "w", "--weights", str(wdir / "voxelmorph.pt")),
             folder / "w", 2)
    run_case(tally, "cuda_oom_fallback", _cmd(f, m, folder / "oom"), folder / "oom", 0,
             env={"DEEPREG_FAULT_INJECT": "cuda_oom"})
    out = folder / "both"
    procs = [subprocess.Popen(_cmd(f, m, out), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    got = [(p.wait(timeout=600), p.stdout.read()) for p in procs]
    for i, (rc, text) in enumerate(got):
        tally.add(f"concurrent{i}", rc, _events(text), out)
    tally.results[-1]["as_expected"] = sorted(rc for rc, _ in got) == [0, 2]


def big_scan(slices: int, folder: Path) -> dict:
    f, m = write_ct_pair(folder / f"ct{slices}", slices)
    out = folder / f"big{slices}"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "deepreglib", "register", "--fixed", f, "--moving", m, "--out", str(out),
                        "--device", "cpu", "--progress", "json"], capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    r = {"size": [512, 512, slices], "rc": p.returncode, "wall_s": round(wall, 1),
         "last": (_events(p.stdout)[-1:] or [{}])[0].get("message", "")[:300]}
    if p.returncode == 0:
        man = json.loads((out / "manifest.json").read_text())
        r.update(peak_rss_mb=round(man["peak_memory_mb"]["ram"]), estimate_mb=man["memory_estimate_mb"],
                 timings={k: round(v, 1) for k, v in man["timings"].items()}, method=man["method"],
                 preset=man.get("preset"))
    import shutil
    shutil.rmtree(str(out), ignore_errors=True)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one case of each kind, 2 kills of each signal")
    ap.add_argument("--big", action="store_true", help="also the 512x512x300 and x600 CT pairs (heavy)")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="deepreg-reliability-") as tmp:
        folder = Path(tmp)
        cases, f, m = input_cases(folder / "in", args.quick)
        inputs = sorted({c[1] for c in cases} | {c[2] for c in cases} | {f, m})
        before = _sha(inputs)
        for name, fx, mv, expected in cases:
            run_case(tally, name, _cmd(fx, mv, folder / f"out_{name}"), folder / f"out_{name}", expected)
        (folder / "faults").mkdir()
        faults(tally, f, m, folder / "faults")
        n = 2 if args.quick else args.kills
        (folder / "k").mkdir()
        kills(tally, f, m, folder / "k", n, signal.SIGKILL, args.seed)
        kills(tally, f, m, folder / "k", max(2, n // 2), signal.SIGTERM, args.seed + 1)
        after = _sha(inputs)
        orphans = [str(p.relative_to(folder)) for p in folder.rglob(".*") if ".partial" in p.name or
                   p.name.startswith(".deepreg-tmp")]
        big = [big_scan(s, folder / "big") for s in (300, 600)] if args.big else []
    res = tally.results
    summary = {"cases": tally.cases, "clean_exits": sum(r["clean"] for r in res),
               "as_expected": sum(r["as_expected"] for r in res), "outputs_lost": sum(r["lost"] for r in res),
               "half_written": sum(r["half_written"] for r in res), "orphans": len(orphans),
               "inputs_modified": sum(before[p] != after.get(p) for p in before)}
    report = {"date": datetime.date.today().isoformat(), "kind": "reliability", "quick": args.quick,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
              "summary": summary, "orphan_paths": orphans, "big_scans": big, "cases": res}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"reliability-{report['date']}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary), "->", path)


if __name__ == "__main__":
    main()
