"""Deformation quality of any transform node (the DeformationQA module's Logic, without Qt).

Works for transforms made by this extension, SlicerElastix, SlicerANTs or by hand: Slicer itself
evaluates the transform at the points asked for (``GetTransformFromWorld``: the resampling
direction, fixed -> moving, what a volume placed under the transform shows); every number is
then computed by the engine (:mod:`deepreglib.jacobian`, :mod:`deepreglib.metrics`) in its own
conventions (LPS, ``(N, 3, D, H, W)`` displacements in voxels, components ``(k, j, i)``).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from .scene import _LPS_RAS, _vtk_matrix, exported_labelmap, world_ijk_to_ras


def _numpy_support():
    from vtk.util import numpy_support
    return numpy_support


def reference_grid(volume_node):
    """The engine :class:`~deepreglib.geometry.Grid` of a volume node (world geometry, LPS)."""
    from deepreglib.geometry import Grid
    ijk_to_lps = _LPS_RAS @ world_ijk_to_ras(volume_node)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    dims = volume_node.GetImageData().GetDimensions()  # (i, j, k)
    return Grid((dims[2], dims[1], dims[0]), spacing, ijk_to_lps[:3, 3],
                (ijk_to_lps[:3, :3] / spacing).ravel())


def map_points_ras(transform_node, points_ras: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Points ``(P, 3)`` RAS through the node's world FromParent (fixed -> moving), or its
    ToParent with ``inverse`` (Slicer inverts non-linear transforms numerically)."""
    vtk = __import__("vtk")
    ns = _numpy_support()
    pts = np.ascontiguousarray(points_ras, dtype=np.float64).reshape(-1, 3)
    src = vtk.vtkPoints()
    src.SetData(ns.numpy_to_vtk(pts, deep=True))
    dst = vtk.vtkPoints()
    transform = vtk.vtkGeneralTransform()
    if inverse:
        transform_node.GetTransformToWorld(transform)
    else:
        transform_node.GetTransformFromWorld(transform)
    transform.TransformPoints(src, dst)
    return ns.vtk_to_numpy(dst.GetData()).astype(np.float64).reshape(-1, 3)


def displacement_on_grid(transform_node, reference_volume_node):
    """The transform sampled at the reference volume's voxel centres.

    Returns:
        ``(u_voxel, grid)``: ``(1, 3, D, H, W)`` float64 displacement ``phi(p) - p`` in voxels of
        ``grid`` (components ``(k, j, i)``), and the reference grid.
    """
    import torch
    from deepreglib.geometry import displacement_mm_to_voxel, voxel_grid_points
    grid = reference_grid(reference_volume_node)
    p_lps = voxel_grid_points(grid, torch.float64)  # (1, 3, D, H, W), (x, y, z)
    flat = p_lps[0].reshape(3, -1).T.numpy()
    mapped_lps = _LPS_RAS[:3, :3] @ map_points_ras(transform_node, flat @ _LPS_RAS[:3, :3]).T
    u_mm = torch.from_numpy(mapped_lps.reshape(p_lps.shape[1:])).unsqueeze(0) - p_lps
    return displacement_mm_to_voxel(u_mm, grid), grid


def deformation_maps(transform_node, reference_volume_node) -> Dict[str, object]:
    """Jacobian determinant and displacement magnitude on the reference grid, with statistics.

    Returns a dict: ``jacobian`` and ``magnitude_mm`` ``(D, H, W)`` float32 numpy arrays (k, j, i
    like Slicer's voxel arrays), ``folding_percent`` (0..100, det <= 0), ``sdlogj``,
    ``jacobian_min``, ``jacobian_max``, ``max_displacement_mm``, ``mean_displacement_mm``.
    """
    from deepreglib.geometry import displacement_voxel_to_mm
    from deepreglib.jacobian import jacobian_determinant
    from deepreglib.metrics import folding_percent, sdlogj
    u, grid = displacement_on_grid(transform_node, reference_volume_node)
    jac = jacobian_determinant(u)
    magnitude = displacement_voxel_to_mm(u, grid).norm(dim=1)[0]
    return {
        "jacobian": jac[0, 0].float().numpy(),
        "magnitude_mm": magnitude.float().numpy(),
        "folding_percent": folding_percent(jac),
        "sdlogj": sdlogj(jac),
        "jacobian_min": float(jac.min()),
        "jacobian_max": float(jac.max()),
        "max_displacement_mm": float(magnitude.max()),
        "mean_displacement_mm": float(magnitude.mean()),
    }


def volume_like(reference_volume_node, array: np.ndarray, name: str, class_name="vtkMRMLScalarVolumeNode"):
    """A new volume node with the reference's geometry (world, so a linear parent transform of
    the reference is folded in) and ``array`` (k, j, i) as voxels."""
    import slicer
    scene = reference_volume_node.GetScene()
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(_vtk_matrix(world_ijk_to_ras(reference_volume_node)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.CreateDefaultDisplayNodes()
    return node


def _points_ras(markups_node) -> Tuple[List[str], np.ndarray]:
    names, pts = [], []
    for i in range(markups_node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(i, p)
        pts.append(p)
        names.append(markups_node.GetNthControlPointLabel(i))
    return names, np.asarray(pts, dtype=np.float64).reshape(-1, 3)


def landmark_errors(transform_node, fixed_points_node, moving_points_node) -> Dict[str, object]:
    """Target registration error before and after, in mm: each fixed landmark ``p`` is mapped
    to moving space by the transform and compared with its moving landmark ``q`` (same order).

    Returns ``{"before": summary, "after": summary, "per_point": [(name, before, after)]}`` with
    :func:`deepreglib.metrics.tre_summary` summaries.
    """
    from deepreglib.metrics import tre, tre_summary
    names, p = _points_ras(fixed_points_node)
    _, q = _points_ras(moving_points_node)
    if len(p) != len(q) or len(p) == 0:
        raise ValueError(f"the two point lists must have the same number of points (>= 1); got "
                         f"{len(p)} fixed and {len(q)} moving")
    before = tre(p, q)
    after = tre(map_points_ras(transform_node, p), q)
    return {"before": tre_summary(before), "after": tre_summary(after),
            "per_point": [(n, float(b), float(a)) for n, b, a in zip(names, before, after)]}


def _labels_on(node, reference_node) -> np.ndarray:
    """Label voxels of a label-map volume or segmentation on the reference's grid."""
    import slicer
    if node.IsA("vtkMRMLSegmentationNode"):
        with exported_labelmap(node, reference_node) as lab:
            return np.array(slicer.util.arrayFromVolume(lab))
    if not np.allclose(world_ijk_to_ras(node), world_ijk_to_ras(reference_node), atol=1e-4):
        raise ValueError(f"'{node.GetName()}' is not on the grid of '{reference_node.GetName()}'; "
                         "resample it first (or use segmentations, which are exported on that grid)")
    return np.array(slicer.util.arrayFromVolume(node))


def label_overlap(fixed_labels_node, warped_labels_node, reference_volume_node=None) -> Dict[str, Dict[int, float]]:
    """Dice and 95th-percentile Hausdorff distance (mm) per label of a warped segmentation
    against the fixed one, on the reference grid (default: the fixed labels' grid)."""
    from deepreglib.metrics import dice_per_label, hd95_per_label
    ref = reference_volume_node or fixed_labels_node
    if ref.IsA("vtkMRMLSegmentationNode"):
        raise ValueError("choose a reference volume for segmentations")
    a = _labels_on(fixed_labels_node, ref)
    b = _labels_on(warped_labels_node, ref)
    spacing_kji = tuple(reversed(reference_grid(ref).spacing))
    return {"dice": dice_per_label(a, b), "hd95_mm": hd95_per_label(a, b, spacing_kji)}


def inverse_consistency(forward_node, reference_volume_node, inverse_node=None, stride: int = 2) -> Dict[str, float]:
    """Inverse-consistency error ``|inverse(forward(p)) - p|`` (mm) at every ``stride``-th
    reference voxel centre. ``inverse_node``: an explicit inverse (e.g. the engine's inverse
    displacement; its FromParent maps moving -> fixed); default: Slicer's inverse of
    ``forward_node``. Returns :func:`deepreglib.metrics.tre_summary` of the errors."""
    from deepreglib.metrics import tre, tre_summary
    ijk_to_ras = world_ijk_to_ras(reference_volume_node)
    dims = reference_volume_node.GetImageData().GetDimensions()
    i, j, k = np.meshgrid(*(np.arange(0, d, max(1, int(stride))) for d in dims), indexing="ij")
    ijk = np.c_[i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]
    p = (ijk @ ijk_to_ras.T)[:, :3]
    q = map_points_ras(forward_node, p)
    back = map_points_ras(inverse_node, q) if inverse_node is not None else map_points_ras(forward_node, q, inverse=True)
    return tre_summary(tre(back, p))


def report_rows(stats: Dict[str, object]) -> List[Tuple[str, str]]:
    """(metric, value) rows for the report table from the dicts above (nested dicts flattened
    as ``outer.inner``; arrays skipped)."""
    rows: List[Tuple[str, str]] = []

    def add(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (float, int, np.floating, np.integer)):
            rows.append((prefix, f"{float(value):.4g}"))
        elif isinstance(value, str):
            rows.append((prefix, value))
    add("", {k: v for k, v in stats.items() if not isinstance(v, np.ndarray)})
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
