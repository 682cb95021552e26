"""Deformation quality of any transform node (the DeformationQA module's Logic, without Qt).

Works for transforms made by this extension, SlicerElastix, SlicerANTs or by hand. Nothing is
computed here, and torch is never imported into Slicer's process: the transform node is written
with Slicer's own storage node (ITK's file, LPS, FromParent: fixed -> moving), the reference
volume, point lists and label maps beside it, and the worker command ``deepreg qa``
(:mod:`deepreglib.report.transform_qa`) samples the transform at every reference voxel and computes
every number in a background process. Its manifest lists the maps (Jacobian determinant,
displacement magnitude), which are read back with Slicer's storage nodes, and the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from deepreglib.io.protocol import read_manifest

from . import scene as dscene
from .process import default_python, worker_command


def write_qa_inputs(folder, transform_node, reference_volume_node, inverse_node=None,
                    fixed_landmarks=None, moving_landmarks=None, fixed_segmentation=None,
                    warped_segmentation=None) -> Dict[str, str]:
    """Write the nodes for ``deepreg qa`` into ``folder`` (created); returns its options by CLI
    name without dashes (``{"transform": path, "reference": path, ...}``).

    Raises:
        ValueError: a missing transform or reference, a transform under another transform, only
            one of a pair of point lists or segmentations.
    """
    if transform_node is None or reference_volume_node is None:
        raise ValueError("choose a transform and a reference volume")
    for a, b, what in ((fixed_landmarks, moving_landmarks, "point lists"),
                       (fixed_segmentation, warped_segmentation, "segmentations")):
        if (a is None) != (b is None):
            raise ValueError(f"choose both {what} (fixed and moving/warped), or neither")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"transform": dscene.write_transform_node(transform_node, folder / "transform.h5"),
             "reference": dscene.write_volume(reference_volume_node, folder / "reference.nrrd")}
    if inverse_node is not None:
        files["inverse"] = dscene.write_transform_node(inverse_node, folder / "inverse.h5")
    if fixed_landmarks is not None:
        files["fixed-landmarks"] = dscene.write_points(fixed_landmarks, folder / "fixed_points.mrk.json")
        files["moving-landmarks"] = dscene.write_points(moving_landmarks, folder / "moving_points.mrk.json")
    if fixed_segmentation is not None:
        for key, node in (("fixed-labels", fixed_segmentation), ("warped-labels", warped_segmentation)):
            files[key] = dscene.write_segmentation_as_labels(node, reference_volume_node,
                                                             folder / f"{key}.nrrd")
    return files


def qa_command(files: Dict[str, str], out, python: Optional[str] = None,
               inverse_consistency: bool = True) -> List[str]:
    """The worker's command line for the files of :func:`write_qa_inputs`."""
    args: List[str] = ["--out", str(out)]
    for name, path in files.items():
        args += [f"--{name}", str(path)]
    if not inverse_consistency:
        args.append("--no-inverse-consistency")
    return worker_command("qa", args, python=python or default_python())


@dataclass
class QAResults:
    """What a finished QA run put into the scene: ``nodes`` (``jacobian``,
    ``displacement_magnitude``), the numbers (``metrics``) and notes for the user."""

    nodes: Dict[str, object] = field(default_factory=dict)
    metrics: Dict[str, object] = field(default_factory=dict)
    messages: List[str] = field(default_factory=list)


_MAP_TITLES = {"jacobian": "Jacobian", "displacement_magnitude": "displacement (mm)"}


def load_qa_results(manifest_path, transform_node, outputs: Sequence[str] = ("jacobian", "displacement_magnitude")) -> QAResults:
    """Read a ``deepreg qa`` manifest: the maps named in ``outputs`` become volume nodes named
    after the transform and referencing it (the Jacobian shown with the folding colour table);
    every number goes to :attr:`QAResults.metrics`."""
    manifest = read_manifest(manifest_path)
    folder = Path(manifest["_folder"])
    scene = transform_node.GetScene()
    results = QAResults(metrics=dict(manifest.get("metrics") or {}))
    for out in manifest["outputs"]:
        name = str(out["name"])
        if name not in outputs:
            continue
        node = dscene.read_volume_node(scene, folder / out["path"],
                                       f"{transform_node.GetName()} {_MAP_TITLES.get(name, name)}")
        if out["kind"] == "jacobian":
            dscene.show_as_jacobian(node)
        node.SetNodeReferenceID("DeepReg.transform", transform_node.GetID())
        node.SetAttribute(dscene.ATTRIBUTE_PREFIX + "Output", name)
        node.SetAttribute(dscene.ATTRIBUTE_PREFIX + "Description", str(out.get("description") or ""))
        results.nodes[name] = node
    return results


def jacobian_summary(metrics: Dict[str, object]) -> str:
    return (f"Folding: {metrics['folding_percent']:.3f}% of voxels (det <= 0); SDlogJ "
            f"{metrics['sdlogj']:.3f}; det range {metrics['jacobian_min']:.3f} .. {metrics['jacobian_max']:.3f}")


def magnitude_summary(metrics: Dict[str, object]) -> str:
    return (f"Displacement: max {metrics['max_displacement_mm']:.2f} mm, "
            f"mean {metrics['mean_displacement_mm']:.2f} mm")


def inverse_summary(metrics: Dict[str, object]) -> str:
    s = metrics["inverse_consistency_mm"]
    return f"mean {s['mean']:.3f} mm, max {s['max']:.3f} mm ({metrics.get('inverse', '')} inverse)"


def tre_summary_text(metrics: Dict[str, object]) -> str:
    b, a = metrics["tre_before_mm"], metrics["tre_after_mm"]
    return f"TRE {b['mean']:.2f} -> {a['mean']:.2f} mm (max {a['max']:.2f} mm, {int(a['count'])} points)"


def overlap_summary(metrics: Dict[str, object]) -> str:
    dice = [v for v in metrics["dice"].values() if v == v]
    hd = [v for v in metrics["hd95_mm"].values() if v == v]
    return (f"Dice mean {sum(dice) / max(1, len(dice)):.3f}; "
            f"HD95 mean {sum(hd) / max(1, len(hd)):.2f} mm ({len(dice)} labels)")


def report_rows(stats: Dict[str, object]) -> List[Tuple[str, str]]:
    """(metric, value) rows for the report table (nested dicts flattened as ``outer.inner``;
    lists and arrays skipped)."""
    rows: List[Tuple[str, str]] = []

    def add(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, bool):
            rows.append((prefix, "yes" if value else "no"))
        elif isinstance(value, (float, int, np.floating, np.integer)):
            rows.append((prefix, f"{float(value):.4g}"))
        elif isinstance(value, str):
            rows.append((prefix, value))
    add("", {k: v for k, v in stats.items() if not isinstance(v, (np.ndarray, list))})
    return rows


def fill_table(table_node, rows: List[Tuple[str, str]]) -> None:
    """Replace the table's content with two string columns, Metric and Value."""
    vtk = __import__("vtk")
    table = table_node.GetTable()
    table.Initialize()
    for title in ("Metric", "Value"):
        col = vtk.vtkStringArray()
        col.SetName(title)
        table.AddColumn(col)
    table.SetNumberOfRows(len(rows))
    for r, (metric, value) in enumerate(rows):
        table.SetValue(r, 0, metric)
        table.SetValue(r, 1, value)
    table_node.Modified()
