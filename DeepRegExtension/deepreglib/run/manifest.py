"""The manifest of a run (format: :mod:`deepreglib.io.protocol`): inputs, grids, parameters,
device, weights, the whole matrix, outputs, metrics, timings, memory and versions (provenance)."""
from __future__ import annotations

import datetime
import os
import platform
import sys
from typing import Optional
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import torch

from .. import __version__
from ..io import protocol as P
from .infer import Inference
from .load import LABEL_INPUTS, LANDMARK_INPUTS, Inputs
from .options import RegisterOptions
from .session import Session
from .to_fixed_grid import FixedGridResult

_INPUT_KEYS = ("fixed", "moving", *LABEL_INPUTS, *LANDMARK_INPUTS, "initial_transform")


def build_manifest(opts: RegisterOptions, info, inputs: Inputs, inference: Inference, fx: FixedGridResult,
                   metrics: dict, outputs: list, session: Session) -> dict:
    """The manifest; ``outputs`` and ``session.timings`` are the live list and dict (entries and
    times added later still land in it)."""
    session.timings["total"] = session.elapsed()
    device = inference.device
    return {
        "format": P.MANIFEST_FORMAT,
        "status": "done",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": opts.method,
        "preset": opts.preset,
        "method_info": info.to_dict(),
        "inputs": {k: str(Path(v).resolve()) for k, v in asdict(opts).items() if k in _INPUT_KEYS and v},
        "grids": {"fixed": P.grid_entry(inputs.fixed_grid), "moving": P.grid_entry(inputs.moving_grid),
                  "network": P.grid_entry(inference.net)},
        "parameters": {"refine": opts.refine, "init": opts.init, "contrast": opts.contrast,
                       "device_requested": opts.device,
                       "method_options": opts.method_options},
        "device": str(device),
        "device_fallback": session.details.get("device_fallback"),
        "weights": {"path": inference.method.weights_path, "sha256": inference.method.weights_sha256},
        "matrix_lps": fx.matrix.tolist(),
        "alignment": session.details.get("alignment"),
        "input_checks": inputs.checks,
        "outputs": outputs,
        "metrics": metrics,
        "method_outputs": inference.result.info,
        "timings": session.timings,
        "memory_estimate_mb": session.details.get("memory"),
        "peak_memory_mb": {"ram": peak_rss_mb(),
                           "gpu": (torch.cuda.max_memory_allocated(device) / 2 ** 20
                                   if device.type == "cuda" else None)},
        "messages": session.messages,
        "versions": versions(),
    }


def qa_numbers(manifest: dict) -> dict:
    """The numbers the QA picture prints."""
    m = dict(manifest["metrics"])
    m["method"] = manifest["method"]
    m["device"] = manifest["device"]
    m["time_s"] = round(manifest["timings"]["total"], 2)
    checks = manifest.get("input_checks") or {}
    if checks.get("non_finite") == "refused":  # a run that got this far had none
        m["inputs"] = "all voxels finite"
    alignment = manifest.get("alignment")
    if alignment and alignment.get("local_ncc") is None:  # no intensity alignment was made
        m["alignment"] = alignment["message"]
    elif alignment:
        m["alignment"] = f"{'POOR, check it' if alignment['quality'] == 'poor' else 'ok'} " \
                         f"(LNCC {alignment['local_ncc']:.2f})"
    return m


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process in MiB (``None`` where the system does not say)."""
    try:
        import resource  # Unix only: imported here so the engine imports on Windows
    except ImportError:
        return _peak_working_set_mb()
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _peak_working_set_mb() -> Optional[float]:
    """``PeakWorkingSetSize`` of ``GetProcessMemoryInfo`` (Windows), else ``None``."""
    try:
        import ctypes
        from ctypes import wintypes

        class _Counters(ctypes.Structure):
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
                (name, ctypes.c_size_t) for name in (
                    "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage",
                    "QuotaPagedPoolUsage", "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage",
                    "PagefileUsage", "PeakPagefileUsage")]
        counters = _Counters()
        counters.cb = ctypes.sizeof(counters)
        kernel32 = ctypes.WinDLL("kernel32")
        kernel32.GetCurrentProcess.restype = wintypes.HANDLE
        if not ctypes.WinDLL("psapi").GetProcessMemoryInfo(kernel32.GetCurrentProcess(),
                                                           ctypes.byref(counters), counters.cb):
            return None
        return counters.PeakWorkingSetSize / (1024 * 1024)
    except (AttributeError, OSError, ImportError):  # not Windows either
        return None


def versions() -> dict:
    return {"deepreglib": __version__, "torch": torch.__version__, "SimpleITK": sitk.Version_VersionString(),
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
