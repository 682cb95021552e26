"""The presets a clinician picks first (``--preset``, the Slicer module's first choice): each a
whole recipe of initial alignment, method and optimisation, with its measured time.

Plain data, torch-free (the Slicer side lists them through ``deepreg methods --json``).

``expected_seconds`` are measured, not estimated: the mean end-to-end time (reading to the last
file written, the manifest's ``timings.total``) of ``deepreg register --preset NAME`` over the
pairs of the results file named in ``measured``, on 2 CPU cores (docs/BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

from ..core.errors import BadInputError


@dataclass(frozen=True)
class Preset:
    """``init``, ``method`` and ``method_options`` are the run's defaults under this preset
    (options given explicitly on the command line win)."""

    name: str
    title: str
    description: str
    init: str
    method: str
    method_options: Dict[str, object] = field(default_factory=dict)
    expected_seconds: Dict[str, float] = field(default_factory=dict)
    measured: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("fast", "Fast", "Automatic alignment, then the VoxelMorph network: a first look in seconds.",
           init="auto", method="voxelmorph",
           expected_seconds={"cpu": 3.4}, measured="benchmarks/results/accuracy-2026-12-07-real-pairs-40-fast-accurate.json"),
    Preset("balanced", "Balanced (recommended)",
           "Automatic alignment, then the fast instance optimiser on the pair: on 40 unaligned "
           "brain registrations more accurate than greedy and ANTs SyN, in under a third of SyN's time. "
           "On 1 mm scans it adds a last level at 1 mm: 12-16 s on 1 mm brains "
           "(benchmarks/results/accuracy-2026-12-07-other-datasets-fine-level.json).",
           init="auto", method="instance", method_options={"schedule": "balanced"},
           expected_seconds={"cpu": 3.9}, measured="benchmarks/results/accuracy-2026-12-07-real-pairs-40-image-gradient.json"),
    Preset("accurate", "Accurate",
           "Automatic alignment, then more optimisation with the field on the full network grid, and on "
           "1 mm scans a dense last level at 1 mm (24-28 s on 1 mm brains).",
           init="auto", method="instance", method_options={"schedule": "accurate"},
           expected_seconds={"cpu": 5.4}, measured="benchmarks/results/accuracy-2026-12-07-real-pairs-40-fast-accurate.json"),
)}

#: The preset of a run that names neither a preset nor a method.
DEFAULT_PRESET = "balanced"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise BadInputError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def preset_defaults(preset: Optional[str], method: Optional[str]) -> Optional[Preset]:
    """The preset that applies: the named one, else :data:`DEFAULT_PRESET` when no method is
    named either, else none (``--method X`` alone runs X as it is)."""
    if preset:
        return get_preset(preset)
    return None if method else PRESETS[DEFAULT_PRESET]
