"""The worker protocol, written once (DESIGN.md, "Worker protocol"): exit codes, event names,
error kinds, output kinds, the manifest format and its reader, and the ``--init`` choices the
worker always has.

Both sides read this module: the engine writes by it, the Slicer side parses by it. It imports
only the standard library (never torch, nor anything that imports torch), so Slicer's own
process can import it; ``Testing/Python/test_protocol.py`` holds it to that.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union

# -- exit codes of ``deepreg`` ---------------------------------------------------------------------
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2  # the message says what is wrong and how to fix it
EXIT_CANCELLED = 3

# -- ``--progress json``: one JSON object per line on stdout, ``{"event": NAME, ...}`` --------------
EVENT_PROGRESS = "progress"  # stage, fraction (of the whole run, 0..1), message
EVENT_LOG = "log"  # level, message
EVENT_RESULT = "result"  # manifest (path of manifest.json)
EVENT_ERROR = "error"  # kind (ERROR_KINDS), message
EVENTS = (EVENT_PROGRESS, EVENT_LOG, EVENT_RESULT, EVENT_ERROR)
ERROR_BAD_INPUT = "bad_input"
ERROR_CANCELLED = "cancelled"
ERROR_INTERNAL = "internal"
ERROR_KINDS = (ERROR_BAD_INPUT, ERROR_CANCELLED, ERROR_INTERNAL)
#: exit code of each error kind
EXIT_CODES = {ERROR_BAD_INPUT: EXIT_BAD_INPUT, ERROR_CANCELLED: EXIT_CANCELLED, ERROR_INTERNAL: EXIT_INTERNAL}

# -- the manifest ----------------------------------------------------------------------------------
MANIFEST_FORMAT = "deepreg-manifest/1"
MANIFEST_NAME = "manifest.json"
#: ``kind`` of a manifest output: how the Slicer side loads it
OUTPUT_VOLUME = "volume"  # scalar image (warped image, method maps)
OUTPUT_LABELS = "labels"  # label map
OUTPUT_JACOBIAN = "jacobian"  # Jacobian determinant on the fixed grid
OUTPUT_DISPLACEMENT_FIELD = "displacement_field"  # ITK displacement field image, LPS mm
OUTPUT_LINEAR_TRANSFORM = "linear_transform"  # ITK .tfm, fixed -> moving, LPS
OUTPUT_MARKUPS = "markups"  # Slicer .mrk.json point list
OUTPUT_VOLUME_SEQUENCE = "volume_sequence"  # .seq.nrrd play-back
OUTPUT_QA_PNG = "qa_png"  # the QA picture
OUTPUT_KINDS = (OUTPUT_VOLUME, OUTPUT_LABELS, OUTPUT_JACOBIAN, OUTPUT_DISPLACEMENT_FIELD,
                OUTPUT_LINEAR_TRANSFORM, OUTPUT_MARKUPS, OUTPUT_VOLUME_SEQUENCE, OUTPUT_QA_PNG)

#: Folded voxels (det J <= 0) have this colour everywhere: the QA picture and Slicer's Jacobian
#: colour table. Magenta is nothing on the blue-white-red ramp of det J, nor the yellow of the
#: picture's fixed-label contours.
FOLDING_RGB = (1.0, 0.0, 1.0)
#: Window of the Jacobian display: centred on 1 (no volume change), 0 = total collapse.
JACOBIAN_WINDOW = (0.0, 2.0)

# -- ``--init`` --------------------------------------------------------------------------------------
#: the initial alignments the worker always has: ``(label, --init value)``; learned ones come
#: from the methods' specs (:func:`deepreglib.methods.registry.learned_initializers`, also torch-free)
CLASSIC_INIT_CHOICES: Tuple[Tuple[str, str], ...] = (
    ("Automatic (recommended)", "auto"), ("None", "none"), ("Centre of mass", "center"),
    ("Centres of the image boxes", "box-centres"), ("Moments", "moments"), ("Rigid", "rigid"), ("Affine", "affine"))


def grid_entry(grid) -> Dict[str, list]:
    """A grid as the manifest writes it: ``size`` (x, y, z voxels), ``spacing``, ``origin``,
    ``direction`` (row-major 3x3), all in ITK/LPS order; ``grid`` is a
    :class:`deepreglib.core.geometry.Grid` (``shape`` is its array order z, y, x)."""
    return {"size": list(reversed(grid.shape)), "spacing": list(grid.spacing),
            "origin": list(grid.origin), "direction": list(grid.direction)}


def output_entry(name: str, kind: str, path: str, grid=None, description: str = "") -> dict:
    """One entry of the manifest's ``outputs``: ``path`` relative to the manifest's folder."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    return {"name": name, "kind": kind, "path": path, "grid": grid_entry(grid) if grid is not None else None,
            "description": description}


def read_manifest(path: Union[str, Path]) -> dict:
    """A run's ``manifest.json`` with ``_folder`` added (its directory, where output paths start).

    Raises ValueError when the file is not a deepreg manifest."""
    p = Path(path)
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("outputs"), list):
        raise ValueError(f"'{p}' is not a deepreg manifest (no 'outputs' list)")
    fmt = data.get("format", MANIFEST_FORMAT)
    if fmt != MANIFEST_FORMAT:
        raise ValueError(f"'{p}' is a {fmt!r} manifest; this engine reads {MANIFEST_FORMAT!r}")
    data["_folder"] = str(p.parent)
    return data


def outputs_of_kind(manifest: Mapping, kinds: Sequence[str]) -> List[dict]:
    """The manifest's outputs whose ``kind`` is one of ``kinds``, in the written order."""
    return [o for o in manifest.get("outputs", []) if o.get("kind") in kinds]
