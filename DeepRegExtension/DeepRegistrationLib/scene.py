"""MRML nodes <-> the worker's files (DESIGN.md, "Layers and the way data flows").

Inputs: a volume node becomes an image file in LPS (ITK's convention); a segmentation becomes a
label map on the fixed volume's grid; a point list becomes a markups JSON file in LPS. A linear
parent transform of an input is folded into the written geometry (the worker sees the volume
where Slicer shows it); a non-linear one must be hardened first.

Outputs: ``manifest.json`` lists every output (name, kind, path, grid). They are read with
Slicer's own storage nodes, so what Slicer shows is what Slicer would read from the files:

* ``volume``/``labels`` -> scalar / label-map volume nodes (method outputs: overlays);
* ``displacement_field`` -> a grid transform node whose FromParent maps fixed points to moving
  points (ITK's resampling transform; the moving volume placed under it appears registered);
* ``linear_transform`` -> a linear transform node (same sense);
* ``jacobian`` -> a volume shown with a diverging colour table centred on 1, window [0, 2], and
  folding (det <= 0) in its own colour;
* ``markups`` -> a point list.

Every output node gets provenance attributes (:data:`ATTRIBUTE_PREFIX` + ``Method``,
``WeightsSHA256``, ``Device``, ``Parameters``, ``Time``, ``EngineVersion``) and references to
the fixed and moving nodes (:data:`FIXED_REFERENCE_ROLE`, :data:`MOVING_REFERENCE_ROLE`).
Input nodes are never modified, except that with no warped-volume output the moving volume is
placed under the new transform (what SlicerElastix does, so the result shows at once).

This module does no image arithmetic: geometry is converted, never resampled.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ATTRIBUTE_PREFIX = "DeepReg."
FIXED_REFERENCE_ROLE = "DeepReg.fixedVolume"
MOVING_REFERENCE_ROLE = "DeepReg.movingVolume"
JACOBIAN_COLOR_NODE_NAME = "DeepReg Jacobian (folding, shrink, grow)"
#: Window of the Jacobian display: centred on 1 (no volume change), 0 = total collapse.
JACOBIAN_WINDOW = (0.0, 2.0)
#: RGB of folded voxels (det <= 0): bright yellow, unlike anything on the blue-white-red ramp.
FOLDING_RGB = (1.0, 0.9, 0.0)

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS: negate x and y (its own inverse)


def _slicer():
    import slicer  # lazily: this module is imported by the widget before dependencies exist
    return slicer


def _vtk():
    import vtk
    return vtk


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(a: np.ndarray):
    m = _vtk().vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


# -- inputs ----------------------------------------------------------------------------------------
def world_ijk_to_ras(volume_node) -> np.ndarray:
    """The node's IJK -> world RAS 4x4 (its IJKToRAS with a linear parent transform folded in).

    Raises:
        ValueError: the node is under a non-linear transform (harden it first).
    """
    m = _vtk().vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_ras = _matrix(m)
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError(f"'{volume_node.GetName()}' is under the non-linear transform "
                             f"'{parent.GetName()}'; harden it (Transforms module) or remove it "
                             "before registering")
        to_world = _vtk().vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = _matrix(to_world) @ ijk_to_ras
    return ijk_to_ras


def volume_to_sitk(volume_node):
    """A scalar (or label-map) volume node as a SimpleITK image in LPS with the same voxels.

    Slicer's voxel array is indexed (k, j, i) like SimpleITK's; only the physical side changes
    from RAS to LPS, and spacing/direction are the column norms/directions of IJK -> LPS.
    """
    import SimpleITK as sitk
    slicer = _slicer()
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("the volume node has no image data; load or select a volume")
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ValueError(f"'{volume_node.GetName()}' has several components per voxel (colour or "
                         "vector); registration needs a scalar volume")
    ijk_to_lps = _LPS_RAS @ world_ijk_to_ras(volume_node)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing
    img = sitk.GetImageFromArray(np.ascontiguousarray(slicer.util.arrayFromVolume(volume_node)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in ijk_to_lps[:3, 3]])
    img.SetDirection([float(d) for d in direction.ravel()])
    return img


def write_volume(volume_node, path) -> str:
    """Write a volume node for the worker (``.nrrd``/``.nii.gz``/``.mha``) in LPS; returns the
    path. The node is not changed (no storage node is attached to it)."""
    from deepreglib import io as dio
    dio.write_image(volume_to_sitk(volume_node), str(path))
    return str(path)


def write_segmentation_as_labels(segmentation_node, reference_volume_node, path) -> str:
    """Write a segmentation as a label map on the reference volume's grid (label = segment
    index + 1). A label-map volume node is written as it is."""
    slicer = _slicer()
    if segmentation_node.IsA("vtkMRMLLabelMapVolumeNode") or segmentation_node.IsA("vtkMRMLScalarVolumeNode"):
        return write_volume(segmentation_node, path)
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__deepreg_temp_labels__")
    try:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        ok = logic.ExportVisibleSegmentsToLabelmapNode(segmentation_node, labelmap, reference_volume_node)
        if not ok:
            raise ValueError(f"cannot export segmentation '{segmentation_node.GetName()}' as labels")
        return write_volume(labelmap, path)
    finally:
        display = labelmap.GetDisplayNode()
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(labelmap)


def write_points(markups_node, path) -> str:
    """Write a point list's placed control points (world coordinates) as markups JSON in LPS."""
    from deepreglib import io as dio
    from deepreglib.geometry import ras_to_lps
    names, points = [], []
    for i in range(markups_node.GetNumberOfControlPoints()):
        if not markups_node.GetNthControlPointPositionStatus(i) == markups_node.PositionDefined:
            continue
        p = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(i, p)
        points.append(p)
        names.append(markups_node.GetNthControlPointLabel(i) or str(i + 1))
    if not points:
        raise ValueError(f"point list '{markups_node.GetName()}' has no placed points")
    dio.write_markups_json(str(path), ras_to_lps(np.asarray(points)), names,
                           name=markups_node.GetName())
    return str(path)


def write_linear_transform_node(transform_node, path) -> str:
    """Write a linear transform node's FromParent (world) as an ITK file in LPS (the worker's
    ``--initial-transform``, fixed -> moving)."""
    from deepreglib import io as dio
    if not transform_node.IsTransformToWorldLinear():
        raise ValueError(f"the initial transform '{transform_node.GetName()}' must be linear")
    m = _vtk().vtkMatrix4x4()
    transform_node.GetMatrixTransformFromWorld(m)
    dio.write_linear_transform(_LPS_RAS @ _matrix(m) @ _LPS_RAS, str(path))
    return str(path)


@dataclass
class WorkerInputs:
    """Files written for one run, as worker CLI options (``{"fixed": path, ...}``)."""

    files: Dict[str, str] = field(default_factory=dict)

    def options(self) -> Dict[str, str]:
        """The optional inputs as ``register_command(options=...)`` (CLI names)."""
        return {k.replace("_", "-"): v for k, v in self.files.items() if k not in ("fixed", "moving")}


def write_worker_inputs(folder, fixed, moving, fixed_mask=None, moving_mask=None,
                        fixed_labels=None, moving_labels=None, fixed_landmarks=None,
                        moving_landmarks=None, initial_transform=None) -> WorkerInputs:
    """Write every given input node into ``folder`` (created) for the worker. Masks and
    segmentations are written on their own volume's grid (fixed or moving)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = WorkerInputs()
    out.files["fixed"] = write_volume(fixed, folder / "fixed.nrrd")
    out.files["moving"] = write_volume(moving, folder / "moving.nrrd")
    for key, node, ref in (("fixed_mask", fixed_mask, fixed), ("moving_mask", moving_mask, moving),
                           ("fixed_labels", fixed_labels, fixed),
                           ("moving_labels", moving_labels, moving)):
        if node is not None:
            out.files[key] = write_segmentation_as_labels(node, ref, folder / f"{key}.nrrd")
    for key, node in (("fixed_landmarks", fixed_landmarks), ("moving_landmarks", moving_landmarks)):
        if node is not None:
            out.files[key] = write_points(node, folder / f"{key}.mrk.json")
    if initial_transform is not None:
        out.files["initial_transform"] = write_linear_transform_node(initial_transform,
                                                                     folder / "initial.tfm")
    return out


# -- provenance ------------------------------------------------------------------------------------
def read_manifest(path) -> dict:
    """The worker's ``manifest.json`` with ``_folder`` added (its directory)."""
    p = Path(path)
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "outputs" not in data:
        raise ValueError(f"'{p}' is not a deepreg manifest (no 'outputs' list)")
    data["_folder"] = str(p.parent)
    return data


def provenance_attributes(manifest: dict) -> Dict[str, str]:
    """Attributes stored on every output node (all strings, as MRML attributes are)."""
    weights = manifest.get("weights") or {}
    versions = manifest.get("versions") or {}
    params = dict(manifest.get("parameters") or {})
    return {
        ATTRIBUTE_PREFIX + "Method": str(manifest.get("method", "")),
        ATTRIBUTE_PREFIX + "WeightsSHA256": str(weights.get("sha256") or "none (no trained weights)"),
        ATTRIBUTE_PREFIX + "Device": str(manifest.get("device", "")),
        ATTRIBUTE_PREFIX + "Parameters": json.dumps(params, sort_keys=True),
        ATTRIBUTE_PREFIX + "Time": str(manifest.get("created", "")),
        ATTRIBUTE_PREFIX + "DurationSeconds": "%.2f" % float((manifest.get("timings") or {}).get("total", float("nan"))),
        ATTRIBUTE_PREFIX + "EngineVersion": str(versions.get("deepreglib", "")),
    }


def tag_output(node, manifest: dict, fixed_node, moving_node, output_name: str) -> None:
    """Provenance attributes plus references to the fixed and moving nodes."""
    for key, value in provenance_attributes(manifest).items():
        node.SetAttribute(key, value)
    node.SetAttribute(ATTRIBUTE_PREFIX + "Output", output_name)
    if fixed_node is not None:
        node.SetNodeReferenceID(FIXED_REFERENCE_ROLE, fixed_node.GetID())
    if moving_node is not None:
        node.SetNodeReferenceID(MOVING_REFERENCE_ROLE, moving_node.GetID())


# -- display ---------------------------------------------------------------------------------------
def jacobian_color_node(scene):
    """The diverging colour table for Jacobian maps (one per scene, reused): entry 0 (values at
    or below the window's lower end, i.e. det <= 0 with :data:`JACOBIAN_WINDOW`) is
    :data:`FOLDING_RGB`; then blue (shrinking) -> white (det = 1) -> red (growing)."""
    slicer = _slicer()
    existing = scene.GetFirstNodeByName(JACOBIAN_COLOR_NODE_NAME)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(JACOBIAN_COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetAttribute("Category", "DeepReg")
    n = 256
    node.SetNumberOfColors(n)
    node.SetColor(0, "folding (det <= 0)", *FOLDING_RGB, 1.0)
    for i in range(1, n):
        t = (i - 1) / (n - 2)  # 0..1 across the window; 0.5 is det = 1
        if t < 0.5:
            s = t / 0.5
            rgb = (0.05 + 0.95 * s, 0.25 + 0.75 * s, 0.85 + 0.15 * s)  # blue -> white
        else:
            s = (t - 0.5) / 0.5
            rgb = (1.0, 1.0 - 0.85 * s, 1.0 - 0.9 * s)  # white -> red
        node.SetColor(i, f"{JACOBIAN_WINDOW[0] + t * (JACOBIAN_WINDOW[1] - JACOBIAN_WINDOW[0]):.3f}", *rgb, 1.0)
    node.SetSaveWithScene(True)
    scene.AddNode(node)
    return node


def show_as_jacobian(volume_node) -> None:
    """Display a Jacobian-determinant volume with :func:`jacobian_color_node`, window
    :data:`JACOBIAN_WINDOW` (centred on 1) and no automatic window/level."""
    scene = volume_node.GetScene()
    display = _ensure_display(volume_node)
    display.SetAndObserveColorNodeID(jacobian_color_node(scene).GetID())
    display.SetAutoWindowLevel(0)
    display.SetWindowLevelMinMax(*JACOBIAN_WINDOW)
    display.SetInterpolate(0)  # a folded voxel must not be smeared into its neighbours


def _ensure_display(volume_node):
    display = volume_node.GetDisplayNode()
    if display is None:
        volume_node.CreateDefaultDisplayNodes()
        display = volume_node.GetDisplayNode()
    return display


# -- outputs ---------------------------------------------------------------------------------------
def _read_into(node, storage_node, path: str) -> None:
    """Read ``path`` into ``node`` with a storage node that is then dropped: the temporary files
    are deleted after a run, and a node without storage node is saved into the scene's folder."""
    storage_node.SetFileName(path)
    ok = storage_node.ReadData(node)
    if not ok:
        raise ValueError(f"Slicer could not read '{path}': "
                         f"{storage_node.GetUserMessages().GetAllMessagesAsString()}")


def _field_file_for_slicer(path: str, scratch: Path) -> str:
    """Slicer reads a NIfTI displacement field correctly but warns that it expected intent 1006
    (SimpleITK writes 1007); hand it a MetaImage copy (same LPS vector image) instead."""
    if not path.lower().endswith((".nii", ".nii.gz")):
        return path
    import SimpleITK as sitk
    out = scratch / (Path(path).name.split(".")[0] + "_for_slicer.mha")
    img = sitk.ReadImage(path)
    for key in img.GetMetaDataKeys():  # NIfTI header fields MetaImage cannot hold (and warns about)
        img.EraseMetaData(key)
    sitk.WriteImage(img, str(out))
    return str(out)


@dataclass
class OutputChoices:
    """Which outputs to load and into which nodes.

    ``None`` node: make a new node named after the inputs and method (a second run never
    overwrites the first); a given node is overwritten. ``create_*`` False: skip that output.
    """

    warped_volume: object = None
    transform: object = None
    create_warped: bool = True
    create_transform: bool = True
    create_inverse: bool = True
    create_jacobian: bool = True
    create_method_outputs: bool = True
    apply_to_moving_without_warped: bool = True


@dataclass
class LoadedResults:
    nodes: Dict[str, object] = field(default_factory=dict)
    metrics: Dict[str, object] = field(default_factory=dict)
    overlays: List[object] = field(default_factory=list)
    messages: List[str] = field(default_factory=list)


def output_base_name(fixed_node, moving_node, method: str) -> str:
    return f"{moving_node.GetName()} to {fixed_node.GetName()} ({method})"


_TITLES = {"warped": "warped", "transform": "transform", "inverse_transform": "inverse transform",
           "jacobian": "Jacobian", "warped_labels": "warped labels",
           "initial_transform": "initial transform"}


def load_results(manifest_path, fixed_node, moving_node, choices: Optional[OutputChoices] = None) -> LoadedResults:
    """Turn a finished run's outputs into nodes in the fixed node's scene (see module doc).

    Returns the nodes by output name (``warped``, ``transform``, ``inverse_transform``,
    ``jacobian``, ``warped_labels`` and the method's own), the run's metrics, and the method
    volumes meant as overlays.
    """
    slicer = _slicer()
    choices = choices or OutputChoices()
    manifest = read_manifest(manifest_path)
    folder = Path(manifest["_folder"])
    scene = fixed_node.GetScene()
    base = output_base_name(fixed_node, moving_node, str(manifest.get("method", "")))
    results = LoadedResults(metrics=dict(manifest.get("metrics") or {}))
    results.messages.extend(str(m) for m in manifest.get("messages") or [])
    scratch = folder / "_slicer"
    scratch.mkdir(exist_ok=True)

    def new_node(cls: str, title: str):
        return scene.AddNewNodeByClass(cls, scene.GenerateUniqueName(f"{base} {title}"))

    for out in manifest["outputs"]:
        name, kind = out["name"], out["kind"]
        path = str(folder / out["path"])
        title = _TITLES.get(name, name.replace("_", " "))
        node = None
        if kind == "volume" and name == "warped":
            if not choices.create_warped and choices.warped_volume is None:
                continue
            node = choices.warped_volume or new_node("vtkMRMLScalarVolumeNode", title)
            _read_into(node, slicer.vtkMRMLVolumeArchetypeStorageNode(), path)
            _ensure_display(node)
        elif kind == "volume":
            if not choices.create_method_outputs:
                continue
            node = new_node("vtkMRMLScalarVolumeNode", title)
            _read_into(node, slicer.vtkMRMLVolumeArchetypeStorageNode(), path)
            display = _ensure_display(node)
            display.SetAndObserveColorNodeID(
                slicer.vtkMRMLColorLogic.GetColorTableNodeID(slicer.vtkMRMLColorTableNode.Rainbow))
            results.overlays.append(node)
        elif kind == "labels":
            node = new_node("vtkMRMLLabelMapVolumeNode", title)
            _read_into(node, slicer.vtkMRMLVolumeArchetypeStorageNode(), path)
            _ensure_display(node)
        elif kind == "jacobian":
            if not choices.create_jacobian:
                continue
            node = new_node("vtkMRMLScalarVolumeNode", title)
            _read_into(node, slicer.vtkMRMLVolumeArchetypeStorageNode(), path)
            show_as_jacobian(node)
        elif kind in ("displacement_field", "linear_transform"):
            inverse = name == "inverse_transform"
            if name == "initial_transform" or (inverse and not choices.create_inverse):
                continue
            if name == "transform" and not choices.create_transform and choices.transform is None:
                continue
            cls = "vtkMRMLGridTransformNode" if kind == "displacement_field" else "vtkMRMLLinearTransformNode"
            given = choices.transform if name == "transform" else None
            node = given or new_node(cls, title)
            if kind == "displacement_field":
                path = _field_file_for_slicer(path, scratch)
            _read_into(node, slicer.vtkMRMLTransformStorageNode(), path)
            if inverse:  # moving -> fixed: its fixed/moving roles are swapped
                tag_output(node, manifest, moving_node, fixed_node, name)
                results.nodes[name] = node
                continue
        elif kind == "markups":
            node = new_node("vtkMRMLMarkupsFiducialNode", title)
            _read_into(node, slicer.vtkMRMLMarkupsJsonStorageNode(), path)
        else:
            continue  # qa picture, or a kind this version does not show
        tag_output(node, manifest, fixed_node, moving_node, name)
        results.nodes[name] = node

    transform = results.nodes.get("transform")
    if (transform is not None and "warped" not in results.nodes
            and choices.apply_to_moving_without_warped):
        # SlicerElastix's behaviour: no warped volume asked for, so show the result at once
        moving_node.SetAndObserveTransformNodeID(transform.GetID())
    shutil.rmtree(scratch, ignore_errors=True)
    return results
