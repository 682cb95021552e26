"""MRML nodes <-> the worker's files (DESIGN.md, "Layers and the way data flows").

Inputs: a volume node becomes an image file in LPS (ITK's convention); a segmentation becomes a
label map on the fixed volume's grid; a point list becomes a markups JSON file in LPS. A linear
parent transform of an input is folded into the written geometry (the worker sees the volume
where Slicer shows it); a non-linear one must be hardened first. The one exception: a transform
this module placed the moving volume under (an earlier result shown without a warped volume) is
left out, so a second run registers the original moving volume again.

Outputs: ``manifest.json`` lists every output (name, kind, path, grid). They are read with
Slicer's own storage nodes, so what Slicer shows is what Slicer would read from the files. Every
kind an engine method writes has a node type (:data:`deepreglib.io.protocol.OUTPUT_KINDS`):

* ``volume`` -> the warped volume, or a method map (attention, uncertainty, ROI mask, fusion
  weight, similarity...) as a scalar volume marked :data:`OVERLAY_ATTRIBUTE`, shown as a
  foreground overlay;
* ``labels`` -> a label-map volume;
* ``jacobian`` -> a volume shown with a diverging colour table centred on 1, window [0, 2], and
  folding (det <= 0) in its own colour;
* ``displacement_field`` -> a grid transform node whose FromParent maps fixed points to moving
  points (ITK's resampling transform; the moving volume placed under it appears registered);
* ``linear_transform`` -> a linear transform node (same sense);
* ``markups`` -> a locked point list (R2N2's local deformations, SAME's matched points);
* ``volume_sequence`` -> a sequence node with a sequence browser and its proxy volume, for
  step-by-step play-back (R2N2);
* ``qa_png`` -> not loaded (the command line's QA picture). A kind this version does not know is
  reported in :attr:`LoadedResults.messages`, never dropped silently.

Every output node gets provenance attributes (:data:`ATTRIBUTE_PREFIX` + ``Method``,
``WeightsSHA256``, ``Device``, ``Parameters``, ``Time``, ``DurationSeconds``, ``EngineVersion``,
``Output``, ``Description``) and references to the fixed and moving nodes
(:data:`FIXED_REFERENCE_ROLE`, :data:`MOVING_REFERENCE_ROLE`; swapped on the inverse).
Input nodes are never modified, except that with no warped-volume output the moving volume is
placed under the new transform (what SlicerElastix does, so the result shows at once); if it is
already under a transform of someone else's, the warped volume is loaded instead.

This module does no image arithmetic: geometry is converted, never resampled.
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from deepreglib.io import exchange
from deepreglib.io.protocol import FOLDING_RGB, JACOBIAN_WINDOW, OUTPUT_KINDS, read_manifest  # noqa: F401

ATTRIBUTE_PREFIX = "DeepReg."
FIXED_REFERENCE_ROLE = "DeepReg.fixedVolume"
MOVING_REFERENCE_ROLE = "DeepReg.movingVolume"
JACOBIAN_COLOR_NODE_NAME = "DeepReg Jacobian (folding, shrink, grow)"

_LPS_RAS = exchange.LPS_FROM_RAS  # RAS <-> LPS: negate x and y (its own inverse)


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
def world_ijk_to_ras(volume_node, ignore_parent: bool = False) -> np.ndarray:
    """The node's IJK -> world RAS 4x4 (its IJKToRAS with a linear parent transform folded in;
    with ``ignore_parent`` its own IJKToRAS).

    Raises:
        ValueError: the node is under a non-linear transform (harden it first).
    """
    m = _vtk().vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_ras = _matrix(m)
    parent = None if ignore_parent else volume_node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError(f"'{volume_node.GetName()}' is under the non-linear transform "
                             f"'{parent.GetName()}'; harden it (Transforms module) or remove it "
                             "before registering")
        to_world = _vtk().vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = _matrix(to_world) @ ijk_to_ras
    return ijk_to_ras


def volume_to_sitk(volume_node, ignore_parent: bool = False):
    """A scalar (or label-map) volume node as a SimpleITK image in LPS with the same voxels
    (``ignore_parent``: without its parent transform, see :func:`world_ijk_to_ras`).

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
    ijk_to_lps = _LPS_RAS @ world_ijk_to_ras(volume_node, ignore_parent)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing
    img = sitk.GetImageFromArray(np.ascontiguousarray(slicer.util.arrayFromVolume(volume_node)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in ijk_to_lps[:3, 3]])
    img.SetDirection([float(d) for d in direction.ravel()])
    return img


def write_volume(volume_node, path, ignore_parent: bool = False) -> str:
    """Write a volume node for the worker (``.nrrd``/``.nii.gz``/``.mha``) in LPS; returns the
    path. The node is not changed (no storage node is attached to it)."""
    exchange.write_image(volume_to_sitk(volume_node, ignore_parent), str(path))
    return str(path)


def placed_by_registration(volume_node) -> bool:
    """True when the volume's parent transform is a result of this module that it placed the
    volume under (a transform output whose moving reference is this volume, itself not under
    another transform): the volume's own geometry is then the original moving volume's."""
    parent = volume_node.GetParentTransformNode()
    return (parent is not None
            and parent.GetAttribute(ATTRIBUTE_PREFIX + "Output") == "transform"
            and parent.GetNodeReferenceID(MOVING_REFERENCE_ROLE) == volume_node.GetID()
            and parent.GetParentTransformNode() is None)


@contextmanager
def exported_labelmap(segmentation_node, reference_volume_node):
    """A temporary label-map node holding the segmentation's visible segments on the reference
    volume's grid (label = segment index + 1); removed afterwards with everything the export
    made for it (display node, colour table), so the scene is left as it was.

    Raises:
        ValueError: no segments, or nothing could be exported.
    """
    slicer = _slicer()
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segments")
    scene = segmentation_node.GetScene()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__deepreg_temp_labels__")
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    try:
        ok = logic.ExportVisibleSegmentsToLabelmapNode(segmentation_node, labelmap, reference_volume_node)
        image = labelmap.GetImageData()
        # the export can report success and leave no voxels (e.g. no labelmap representation)
        if not ok or image is None or image.GetPointData().GetScalars() is None:
            raise ValueError(f"cannot export segmentation '{segmentation_node.GetName()}' as labels on "
                             f"the grid of '{reference_volume_node.GetName()}'")
        yield labelmap
    finally:
        logic.SetMRMLScene(None)
        made = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in made:
            if node.GetID() not in before:
                scene.RemoveNode(node)


def write_segmentation_as_labels(segmentation_node, reference_volume_node, path) -> str:
    """Write a segmentation as a label map on the reference volume's grid (label = segment
    index + 1, :func:`exported_labelmap`). A label-map volume node is written as it is."""
    if segmentation_node.IsA("vtkMRMLLabelMapVolumeNode") or segmentation_node.IsA("vtkMRMLScalarVolumeNode"):
        return write_volume(segmentation_node, path)
    with exported_labelmap(segmentation_node, reference_volume_node) as labelmap:
        return write_volume(labelmap, path)


def write_points(markups_node, path) -> str:
    """Write a point list's placed control points (world coordinates) as markups JSON in LPS."""
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
    exchange.write_markups_json(str(path), exchange.ras_to_lps(points), names,
                                name=markups_node.GetName())
    return str(path)


def query_point_lps(markups_node) -> List[float]:
    """The first placed point of a point list (world RAS) as LPS ``[x, y, z]`` mm: the
    ``query_point`` method option of the methods that draw a query point's attention or
    similarity map."""
    for i in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(i) == markups_node.PositionDefined:
            p = [0.0, 0.0, 0.0]
            markups_node.GetNthControlPointPositionWorld(i, p)
            return [float(v) for v in exchange.ras_to_lps([p])[0]]
    raise ValueError(f"point list '{markups_node.GetName()}' has no placed point to use as the query point")


def write_linear_transform_node(transform_node, path) -> str:
    """Write a linear transform node's FromParent (world) as an ITK file in LPS (the worker's
    ``--initial-transform``, fixed -> moving)."""
    if not transform_node.IsTransformToWorldLinear():
        raise ValueError(f"the initial transform '{transform_node.GetName()}' must be linear")
    m = _vtk().vtkMatrix4x4()
    transform_node.GetMatrixTransformFromWorld(m)
    exchange.write_linear_transform(_LPS_RAS @ _matrix(m) @ _LPS_RAS, str(path))
    return str(path)


def write_transform_node(transform_node, path) -> str:
    """Write any transform node (linear, grid, B-spline, composite; this extension's or another
    tool's) with Slicer's own storage node, as ITK writes it: LPS, FromParent (fixed -> moving).
    ``.h5`` holds every kind. The node is not changed (no storage node is attached to it).

    Raises:
        ValueError: the node is under another transform: its own file would not say where
            Slicer shows it.
    """
    parent = transform_node.GetParentTransformNode()
    if parent is not None:
        raise ValueError(f"'{transform_node.GetName()}' is under the transform '{parent.GetName()}'; "
                         "harden that parent (Transforms module) or check the parent instead")
    scene = transform_node.GetScene()
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    try:
        storage.SetFileName(str(path))
        if not storage.WriteData(transform_node):
            raise ValueError(f"Slicer could not write the transform '{transform_node.GetName()}' to {path}")
    finally:
        scene.RemoveNode(storage)
    return str(path)


@dataclass
class WorkerInputs:
    """Files written for one run, as worker CLI options (``{"fixed": path, ...}``)."""

    files: Dict[str, str] = field(default_factory=dict)
    messages: List[str] = field(default_factory=list)

    def options(self) -> Dict[str, str]:
        """The optional inputs as ``register_command(options=...)`` (CLI names)."""
        return {k.replace("_", "-"): v for k, v in self.files.items() if k not in ("fixed", "moving")}


def write_worker_inputs(folder, fixed, moving, fixed_mask=None, moving_mask=None,
                        fixed_labels=None, moving_labels=None, fixed_landmarks=None,
                        moving_landmarks=None, initial_transform=None) -> WorkerInputs:
    """Write every given input node into ``folder`` (created) for the worker. Masks and
    segmentations are written on their own volume's grid (fixed or moving). A moving volume this
    module placed under an earlier result (:func:`placed_by_registration`) is written without
    that transform, so the original moving volume is registered again."""
    if fixed is None or moving is None:
        raise ValueError("choose a fixed and a moving volume")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = WorkerInputs()
    out.files["fixed"] = write_volume(fixed, folder / "fixed.nrrd")
    earlier = placed_by_registration(moving)
    out.files["moving"] = write_volume(moving, folder / "moving.nrrd", ignore_parent=earlier)
    if earlier:
        out.messages.append(f"'{moving.GetName()}' is shown under the earlier result "
                            f"'{moving.GetParentTransformNode().GetName()}'; the original moving "
                            "volume is registered")
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
def provenance_attributes(manifest: dict) -> Dict[str, str]:
    """Attributes stored on every output node (all strings, as MRML attributes are)."""
    weights = manifest.get("weights") or {}
    versions = manifest.get("versions") or {}
    params = dict(manifest.get("parameters") or {})
    return {
        ATTRIBUTE_PREFIX + "Method": str(manifest.get("method", "")),
        ATTRIBUTE_PREFIX + "WeightsSHA256": str(weights.get("sha256") or "none (no trained weights)"),
        ATTRIBUTE_PREFIX + "WeightsFile": Path(str(weights.get("path") or "")).name,
        ATTRIBUTE_PREFIX + "Device": str(manifest.get("device", "")),
        ATTRIBUTE_PREFIX + "Parameters": json.dumps(params, sort_keys=True),
        ATTRIBUTE_PREFIX + "Time": str(manifest.get("created", "")),
        ATTRIBUTE_PREFIX + "DurationSeconds": "%.2f" % float((manifest.get("timings") or {}).get("total", float("nan"))),
        ATTRIBUTE_PREFIX + "EngineVersion": str(versions.get("deepreglib", "")),
    }


def tag_output(node, manifest: dict, fixed_node, moving_node, output_name: str,
               description: str = "") -> None:
    """Provenance attributes, the output's name and description (what the map means, from the
    manifest) plus references to the fixed and moving nodes."""
    for key, value in provenance_attributes(manifest).items():
        node.SetAttribute(key, value)
    node.SetAttribute(ATTRIBUTE_PREFIX + "Output", output_name)
    if description:
        node.SetAttribute(ATTRIBUTE_PREFIX + "Description", str(description))
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


def read_volume_node(scene, path, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node (unique name) read from ``path`` with Slicer's own storage node."""
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    _read_into(node, _slicer().vtkMRMLVolumeArchetypeStorageNode(), str(path))
    _ensure_display(node)
    return node


def read_transform_node(scene, path, name: str, class_name: str = "vtkMRMLGridTransformNode"):
    """A new transform node (unique name) read from an ITK transform or displacement-field file."""
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    _read_into(node, _slicer().vtkMRMLTransformStorageNode(), str(path))
    return node


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
    ``create_method_outputs`` covers everything that is not a common output
    (:data:`COMMON_OUTPUTS`): attention maps, masks, point lists, play-back sequences, a
    method's extra transforms.
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
    """What :func:`load_results` made.

    Attributes:
        nodes: output name (as in the manifest) -> node; a play-back sequence is the sequence
            node, its browser is in :attr:`browsers`.
        metrics: the run's metrics (``folding_percent``, ``sdlogj``, ``ncc_after``...).
        overlays: method volumes meant as foreground overlays, in manifest order (play-back
            proxies last).
        point_lists: the method's point lists (markups nodes).
        browsers: output name -> sequence browser node of a play-back sequence.
        messages: notes for the user (the worker's, and what was not shown and why).
        moving_placed_under: the transform the moving volume was placed under, or ``None``.
    """

    nodes: Dict[str, object] = field(default_factory=dict)
    metrics: Dict[str, object] = field(default_factory=dict)
    overlays: List[object] = field(default_factory=list)
    point_lists: List[object] = field(default_factory=list)
    browsers: Dict[str, object] = field(default_factory=dict)
    messages: List[str] = field(default_factory=list)
    moving_placed_under: object = None


#: Outputs every run may write (pipeline); all other names are the method's own.
COMMON_OUTPUTS = frozenset({"warped", "transform", "inverse_transform", "jacobian", "warped_labels",
                            "initial_transform", "qa"})

#: Marks a method volume meant as a foreground overlay (the module's overlay list shows these).
OVERLAY_ATTRIBUTE = ATTRIBUTE_PREFIX + "Overlay"
#: Colour table of method overlays (a Slicer built-in: present in every application scene).
OVERLAY_COLOR_NODE_ID = "vtkMRMLColorTableNodeRainbow"
#: Play-back speed of step-by-step sequences (frames per second): slow enough to see each step.
PLAYBACK_FPS = 2.0
#: Point-list colours: points in the fixed image, points in the moving image, other points.
FIXED_POINTS_RGB = (0.2, 0.6, 1.0)
MOVING_POINTS_RGB = (1.0, 0.55, 0.0)
METHOD_POINTS_RGB = (0.9, 0.2, 0.9)


def output_base_name(fixed_node, moving_node, method: str) -> str:
    return f"{moving_node.GetName()} to {fixed_node.GetName()} ({method})"


_TITLES = {"warped": "warped", "transform": "transform", "inverse_transform": "inverse transform",
           "jacobian": "Jacobian", "warped_labels": "warped labels",
           "initial_transform": "initial transform"}


def check_output_nodes(fixed_node, moving_node, warped_volume=None, transform=None,
                       other_inputs=()) -> None:
    """Refuse output nodes that are inputs (the inputs are never overwritten).

    Raises:
        ValueError: saying which output node is an input and what to choose instead.
    """
    inputs = [n for n in (fixed_node, moving_node) + tuple(other_inputs) if n is not None]
    if warped_volume is not None and any(warped_volume is n for n in inputs):
        raise ValueError(f"the output volume '{warped_volume.GetName()}' is one of the inputs; "
                         "choose 'Create new volume' (inputs are never overwritten)")
    if transform is not None:
        if any(transform is n for n in inputs):
            raise ValueError(f"the output transform '{transform.GetName()}' is one of the inputs; "
                             "choose 'Create new transform'")
        for node in (fixed_node, moving_node):
            parent = node.GetParentTransformNode() if node is not None else None
            if parent is transform and not (node is moving_node and placed_by_registration(node)):
                raise ValueError(f"'{node.GetName()}' is under the output transform "
                                 f"'{transform.GetName()}'; choose 'Create new transform'")


def _display_overlay(volume_node) -> None:
    display = _ensure_display(volume_node)
    display.SetAndObserveColorNodeID(OVERLAY_COLOR_NODE_ID)
    display.SetAutoWindowLevel(1)
    volume_node.SetAttribute(OVERLAY_ATTRIBUTE, "true")


def _sequences_logic(scene):
    """The application's Sequences logic when it serves ``scene``, else a new one (``owned``)."""
    slicer = _slicer()
    module = getattr(getattr(slicer, "modules", None), "sequences", None)
    logic = module.logic() if module is not None else None
    if logic is not None and logic.GetMRMLScene() is scene:
        return logic, False
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)
    return logic, True


def _load_volume_sequence(scene, path: str, name: str):
    """A volume sequence file -> (sequence node, browser node, proxy volume node).

    The browser starts at frame 0 (before any step) and plays at :data:`PLAYBACK_FPS`, looped;
    the proxy (the volume the views show) is named ``name``."""
    slicer = _slicer()
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(name + " sequence"))
    storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    scene.AddNode(storage)  # it creates the frame nodes through the scene
    try:
        _read_into(sequence, storage, path)
    finally:
        scene.RemoveNode(storage)
    if sequence.GetNumberOfDataNodes() < 1:
        raise ValueError(f"the sequence '{path}' has no frames")
    browser = slicer.vtkMRMLSequenceBrowserNode()
    browser.SetName(scene.GenerateUniqueName(name + " browser"))
    scene.AddNode(browser)
    if hasattr(browser, "SetAndObservePrimarySequenceNodeID"):
        browser.SetAndObservePrimarySequenceNodeID(sequence.GetID())
    else:  # Slicer < 5.6
        browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetPlaybackRateFps(PLAYBACK_FPS)
    browser.SetPlaybackLooped(True)
    browser.SetSelectedItemNumber(0)
    logic, owned = _sequences_logic(scene)
    try:
        logic.UpdateProxyNodesFromSequences(browser)
    finally:
        if owned:
            logic.SetMRMLScene(None)
    proxy = browser.GetProxyNode(sequence)
    if proxy is None:
        raise ValueError(f"Slicer made no play-back volume for '{path}'")
    proxy.SetName(scene.GenerateUniqueName(name))
    _ensure_display(proxy)
    return sequence, browser, proxy


def _point_list_colour(name: str):
    if name.endswith("_fixed_points"):
        return FIXED_POINTS_RGB
    if name.endswith("_moving_points"):
        return MOVING_POINTS_RGB
    return METHOD_POINTS_RGB


def load_results(manifest_path, fixed_node, moving_node, choices: Optional[OutputChoices] = None) -> LoadedResults:
    """Turn a finished run's outputs into nodes in the fixed node's scene (see module doc).

    Returns the nodes by output name (``warped``, ``transform``, ``inverse_transform``,
    ``jacobian``, ``warped_labels`` and the method's own), the run's metrics, the method volumes
    meant as overlays, the point lists and play-back browsers, and messages.

    Raises:
        ValueError: a chosen output node is an input (:func:`check_output_nodes`), or a file
            could not be read; then no node of this run is left in the scene.
    """
    choices = choices or OutputChoices()
    check_output_nodes(fixed_node, moving_node, choices.warped_volume, choices.transform)
    manifest = read_manifest(manifest_path)
    folder = Path(manifest["_folder"])
    scene = fixed_node.GetScene()
    base = output_base_name(fixed_node, moving_node, str(manifest.get("method", "")))
    results = LoadedResults(metrics=dict(manifest.get("metrics") or {}))
    results.messages.extend(str(m) for m in manifest.get("messages") or [])
    scratch = folder / "_slicer"
    scratch.mkdir(exist_ok=True)

    # The moving volume can be shown under the new transform only if it is not under a
    # transform of someone else's (replacing that would move it elsewhere): load the warped
    # volume instead, which the worker always writes.
    want_warped = choices.warped_volume is not None or choices.create_warped
    apply_to_moving = not want_warped and choices.apply_to_moving_without_warped
    foreign_parent = (moving_node.GetParentTransformNode() is not None
                      and not placed_by_registration(moving_node))
    if apply_to_moving and foreign_parent:
        want_warped, apply_to_moving = True, False
        results.messages.append(
            f"'{moving_node.GetName()}' is under the transform "
            f"'{moving_node.GetParentTransformNode().GetName()}', so it was left there and the "
            "warped volume was added instead")

    def new_node(cls: str, title: str):
        return scene.AddNewNodeByClass(cls, scene.GenerateUniqueName(f"{base} {title}"))

    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        _load_outputs(manifest, folder, scratch, scene, fixed_node, moving_node, choices, want_warped,
                      results, base, new_node)
    except Exception:
        # a half-loaded result is worse than none: remove what this call added (never a node
        # that was there before, such as a chosen output node), then say what went wrong
        for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
            if node.GetID() not in before:
                scene.RemoveNode(node)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    # play-back proxies after the maps: the first overlay shown is a map when there is one
    results.overlays.sort(key=lambda n: n.GetAttribute(ATTRIBUTE_PREFIX + "Output") in results.browsers)
    transform = results.nodes.get("transform")
    if transform is not None and "warped" not in results.nodes and apply_to_moving:
        # SlicerElastix's behaviour: no warped volume asked for, so show the result at once
        moving_node.SetAndObserveTransformNodeID(transform.GetID())
        results.moving_placed_under = transform
    return results


def _load_outputs(manifest, folder, scratch, scene, fixed_node, moving_node, choices, want_warped,
                  results, base, new_node) -> None:
    """The body of :func:`load_results`: one node (or sequence) per manifest output."""
    slicer = _slicer()
    for out in manifest["outputs"]:
        name, kind = str(out["name"]), str(out["kind"])
        path = str(folder / out["path"])
        description = str(out.get("description") or "")
        title = _TITLES.get(name, name.replace("_", " "))
        method_output = name not in COMMON_OUTPUTS
        if kind not in OUTPUT_KINDS:
            results.messages.append(f"output '{name}' is of kind '{kind}', which this version of the "
                                    "module does not show (keep the temporary files to see it)")
            continue
        if kind == "qa_png" or name == "initial_transform":
            continue  # the QA picture; the initial alignment (already in the transform)
        if method_output and not choices.create_method_outputs:
            continue
        fixed_ref, moving_ref = fixed_node, moving_node
        if kind == "volume" and name == "warped":
            if not want_warped:
                continue
            node = choices.warped_volume or new_node("vtkMRMLScalarVolumeNode", title)
            _read_into(node, slicer.vtkMRMLVolumeArchetypeStorageNode(), path)
            _ensure_display(node)
        elif kind == "volume":
            node = new_node("vtkMRMLScalarVolumeNode", title)
            _read_into(node, slicer.vtkMRMLVolumeArchetypeStorageNode(), path)
            _display_overlay(node)
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
            if name == "inverse_transform" and not choices.create_inverse:
                continue
            if name == "transform" and not choices.create_transform and choices.transform is None:
                continue
            cls = "vtkMRMLGridTransformNode" if kind == "displacement_field" else "vtkMRMLLinearTransformNode"
            given = choices.transform if name == "transform" else None
            node = given or new_node(cls, title)
            if kind == "displacement_field":
                path = _field_file_for_slicer(path, scratch)
            _read_into(node, slicer.vtkMRMLTransformStorageNode(), path)
            if name == "inverse_transform":  # moving -> fixed: its fixed/moving roles are swapped
                fixed_ref, moving_ref = moving_node, fixed_node
        elif kind == "markups":
            node = new_node("vtkMRMLMarkupsFiducialNode", title)
            _read_into(node, slicer.vtkMRMLMarkupsJsonStorageNode(), path)
            node.SetName(scene.GenerateUniqueName(f"{base} {title}"))  # the file names it too
            node.SetLocked(True)  # a result, not something to edit by accident
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor(*_point_list_colour(name))
            results.point_lists.append(node)
        else:  # volume_sequence
            node, browser, proxy = _load_volume_sequence(scene, path, f"{base} {title}")
            for extra in (browser, proxy):
                tag_output(extra, manifest, fixed_node, moving_node, name, description)
            results.browsers[name] = browser
            results.overlays.append(proxy)
            proxy.SetAttribute(OVERLAY_ATTRIBUTE, "true")
        tag_output(node, manifest, fixed_ref, moving_ref, name, description)
        results.nodes[name] = node


def metrics_summary(metrics: Dict[str, object]) -> str:
    """One line for the module: folding %, SDlogJ, and NCC, TRE and Dice before -> after, as
    the run's manifest gives them (``"(no metrics)"`` when there are none)."""
    def number(key):
        v = metrics.get(key)
        return float(v) if isinstance(v, (int, float)) and v == v else None

    parts = []
    if number("folding_percent") is not None:
        parts.append(f"folding {number('folding_percent'):.3f}% (det <= 0)")
    if number("sdlogj") is not None:
        parts.append(f"SDlogJ {number('sdlogj'):.3f}")
    pairs = (("NCC", "ncc_before", "ncc_after", "{:.3f}"),
             ("TRE", "tre_before_mm", "tre_after_mm", "{:.2f} mm"),
             ("Dice", "dice_mean_before", "dice_mean_after", "{:.3f}"))
    for label, before, after, fmt in pairs:
        b, a = number(before), number(after)
        if b is not None and a is not None:
            parts.append(f"{label} {fmt.format(b).split(' ')[0]} -> {fmt.format(a)}")
    return "; ".join(parts) or "(no metrics)"
