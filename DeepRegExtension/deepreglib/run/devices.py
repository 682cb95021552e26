"""``deepreg devices``: what a run can use, with free GPU memory (the Slicer module's device list).

Run in the worker so that Slicer's own process never loads torch nor opens a CUDA context.
"""
from __future__ import annotations

from typing import Dict, List

import torch


def list_devices() -> List[Dict[str, object]]:
    """``[{"value": "--device value", "label": "what the user reads", ...}]``: Auto, CPU, every
    CUDA device (with ``free_bytes``/``total_bytes`` when the driver says) and Apple's MPS."""
    out: List[Dict[str, object]] = [{"value": "auto", "label": "Auto (GPU if available)"},
                                    {"value": "cpu", "label": "CPU"}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            entry: Dict[str, object] = {"value": f"cuda:{i}", "name": torch.cuda.get_device_name(i)}
            label = f"cuda:{i} {entry['name']}"
            try:
                free, total = torch.cuda.mem_get_info(i)
                entry.update(free_bytes=int(free), total_bytes=int(total))
                label += f" ({free / 2 ** 30:.1f} of {total / 2 ** 30:.1f} GB free)"
            except RuntimeError:
                pass
            entry["label"] = label
            out.append(entry)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append({"value": "mps", "label": "Apple GPU (MPS)"})
    return out
