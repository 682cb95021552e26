"""One benchmark run in a fresh process: an engine method or a peer on one pair.

    python benchmarks/run_one.py SPEC.json RESULT.json

``benchmarks/evaluate.py`` starts this script once per method and pair, so every run starts from
the same empty process and its peak RAM is its own: the process's maximum resident set size
(``VmHWM`` on Linux, else ``ru_maxrss``), which includes the interpreter and whatever the method imports (torch and the
model for engine methods, the peer's library for a peer), as its users would pay. The peak GPU
memory is ``torch.cuda.max_memory_allocated`` of an engine run on CUDA. ``wall_s`` is the
registration call alone (reading the images to writing the transform); ``process_s`` in the
result of ``evaluate.py`` adds the start-up and imports.

SPEC keys: ``kind`` (``engine`` or ``peer``), ``name`` (method or peer name; None for a preset),
``fixed``, ``moving``, ``out`` (a new folder), and for engine runs ``preset``, ``refine``,
``device``, ``threads``, ``qa`` (presets run as users run them: QA picture drawn), ``contrast``
(``same`` or ``different``, the run's ``--contrast``), ``init`` (the run's ``--init``; the
preset's when absent).
Imports are kept inside the branches: a peer's process never imports torch.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

# as deepreglib's CLI (main), before torch is imported: idle OpenMP threads spin only when the
# cores are free (with spinning threads, another busy process made --init auto 25x slower)
from deepreglib.run.cpu_policy import apply_wait_policy  # noqa: E402

apply_wait_policy(int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else None)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process, MB. On Linux ``VmHWM`` of ``/proc/self/status``:
    ``ru_maxrss`` there also counts the parent's pages when it was started by vfork + exec (as
    ``subprocess`` does), so it would report the benchmark's own size for a small child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def run_engine(spec: dict) -> dict:
    from deepreglib.run.pipeline import RegisterOptions, register
    opts = RegisterOptions(fixed=spec["fixed"], moving=spec["moving"], out=spec["out"], method=spec.get("name"),
                           preset=spec.get("preset"), device=spec.get("device", "cpu"),
                           refine=int(spec.get("refine", 0)), qa=bool(spec.get("qa", False)),
                           threads=spec.get("threads"), weights=spec.get("weights"),
                           contrast=spec.get("contrast", "same"), init=spec.get("init"))
    t0 = time.perf_counter()
    manifest_path = register(opts)
    wall = time.perf_counter() - t0
    manifest = json.loads(Path(manifest_path).read_text())
    transform = next(o for o in manifest["outputs"] if o["name"] == "transform")
    return {"wall_s": wall, "transform": str(Path(manifest_path).parent / transform["path"]),
            "transform_kind": transform["kind"], "device": manifest["device"],
            "peak_gpu_mb": manifest["peak_memory_mb"]["gpu"], "timings": manifest["timings"],
            "weights_sha256": manifest["weights"]["sha256"], "manifest_metrics": manifest["metrics"],
            "messages": manifest["messages"]}


def run_peer(spec: dict) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers
    threads = spec.get("threads")
    if threads:
        import SimpleITK as sitk
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    t0 = time.perf_counter()
    path = peers.run_peer(spec["name"], spec["fixed"], spec["moving"], Path(spec["out"]))
    wall = time.perf_counter() - t0
    kind = "linear_transform" if path.suffix in (".tfm", ".txt", ".mat") else "displacement_field"
    return {"wall_s": wall, "transform": str(path), "transform_kind": kind, "device": "cpu", "peak_gpu_mb": None}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    try:
        result = run_engine(spec) if spec["kind"] == "engine" else run_peer(spec)
        result["ok"] = True
    except Exception as e:  # reported to the benchmark, which records it and goes on
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result["peak_ram_mb"] = _peak_rss_mb()
    Path(argv[1]).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
