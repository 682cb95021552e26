"""How much memory a run will need, said before the work starts.

The peak of a run is its inputs at full resolution (each image as read, as float32, and
normalised to [0, 1]), plus what does not grow with the scan: Python, torch and the method on
its network grid (at most 112 voxels a side), and the slabs the outputs are made in
(:data:`deepreglib.run.to_fixed_grid.SLAB_VOXELS`). The coefficients are measured
(benchmarks/reliability.py; docs/BENCHMARKS.md, "Reliability"): they overestimate a little.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from ..core.errors import BadInputError

#: bytes that do not grow with the scan: interpreter, torch, a network and its grid, slabs
BASE_BYTES = 1_500 * 2 ** 20
#: bytes per voxel of the fixed and moving images: float32 as read + float32 normalised, and
#: the reader's own copy while converting, and the alignment's full-resolution work
BYTES_PER_IMAGE_VOXEL = 14
#: bytes per voxel of a label map or mask (float32 on its grid, and its copy while converting)
BYTES_PER_LABEL_VOXEL = 8


def estimate_peak_bytes(fixed_voxels: int, moving_voxels: int, label_voxels: Sequence[int] = ()) -> int:
    """Estimated peak resident memory of a run on these inputs (bytes)."""
    return int(BASE_BYTES + BYTES_PER_IMAGE_VOXEL * (fixed_voxels + moving_voxels)
               + BYTES_PER_LABEL_VOXEL * sum(label_voxels))


def available_memory_bytes() -> Optional[int]:
    """Memory the system can give this process now without swapping (bytes), or None where it
    does not say. Linux: ``MemAvailable`` of /proc/meminfo; Windows: ``GlobalMemoryStatusEx``;
    other POSIX systems: free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if sys.platform == "win32":
        return _windows_available()
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _windows_available() -> Optional[int]:
    try:
        import ctypes

        class _Status(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong)] + [
                (n, ctypes.c_ulonglong) for n in ("ullTotalPhys", "ullAvailPhys", "ullTotalPageFile",
                                                  "ullAvailPageFile", "ullTotalVirtual", "ullAvailVirtual",
                                                  "ullAvailExtendedVirtual")]
        status = _Status()
        status.dwLength = ctypes.sizeof(status)
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return None
        return int(status.ullAvailPhys)
    except (AttributeError, OSError, ImportError):
        return None


def check_memory(fixed_size: Sequence[int], moving_size: Sequence[int], label_sizes: Sequence[Sequence[int]] = (),
                 available: Optional[int] = None) -> dict:
    """The estimate for these image sizes (x, y, z) against the memory available; returns the
    manifest's ``memory`` section (MiB).

    Raises:
        BadInputError: the estimate exceeds what is available (exit 2), with the numbers and
            what to do.
    """
    def voxels(size):
        n = 1
        for s in size:
            n *= int(s)
        return n
    need = estimate_peak_bytes(voxels(fixed_size), voxels(moving_size), [voxels(s) for s in label_sizes])
    have = available_memory_bytes() if available is None else available
    info = {"estimate_mb": round(need / 2 ** 20), "available_mb": None if have is None else round(have / 2 ** 20)}
    if have is not None and need > have:
        raise BadInputError(
            f"this registration needs about {need / 2 ** 30:.1f} GB of memory (fixed "
            f"{'x'.join(map(str, fixed_size))}, moving {'x'.join(map(str, moving_size))} voxels) but only "
            f"{have / 2 ** 30:.1f} GB is available. Close other programs, crop the scans to the region "
            "of interest or resample them to a coarser spacing (e.g. in 3D Slicer: Crop Volume), or run "
            "on a machine with more memory; --device does not reduce this (it is the full-resolution "
            "images and outputs, held in main memory).")
    return info
