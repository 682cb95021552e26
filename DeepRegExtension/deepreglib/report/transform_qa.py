"""``deepreg qa``: the numbers and maps of DeformationQA, for any transform file.

The Slicer module writes the transform node (this extension's, SlicerElastix's, SlicerANTs' or
one made by hand) with Slicer's own storage node, the reference volume and, when asked, point
lists and label maps; this worker command does the voxel work away from Slicer's GUI thread:

* the transform sampled at every reference voxel centre (ITK evaluates it, so the sense is the
  file's: a point of the fixed/reference space -> where it lands in moving space);
* Jacobian determinant (folding = det <= 0), SDlogJ, displacement magnitude (mm);
* inverse consistency ``|inverse(forward(p)) - p|`` with the given inverse, the exact inverse
  of a linear transform, or a numerical inverse of the sampled field;
* landmark TRE before and after, and Dice / HD95 of warped labels against fixed labels.

Cancelling (SIGTERM) raises in the middle of the work and leaves no output. Outputs, written to
a temporary folder and renamed when complete (as ``register`` does):
``jacobian.nrrd``, ``displacement_magnitude.nrrd`` and ``manifest.json`` (the outputs and a
``metrics`` dict). Conventions: :mod:`deepreglib.conventions`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk
import torch

from .. import __version__
from ..core.errors import BadInputError
from ..core.geometry import Grid, displacement_mm_to_voxel
from ..core.jacobian import jacobian_determinant
from ..core.metrics import dice_per_label, folding_percent, hd95_per_label, sdlogj, tre, tre_summary
from ..io import images as dio
from ..io import protocol as P
from ..io.exchange import check_output_folder, staged_folder, suffix
from ..io.progress import Reporter, SilentReporter


@dataclass
class QAOptions:
    transform: str
    reference: str
    out: str
    inverse: Optional[str] = None
    fixed_landmarks: Optional[str] = None
    moving_landmarks: Optional[str] = None
    fixed_labels: Optional[str] = None
    warped_labels: Optional[str] = None
    inverse_consistency: bool = True


def read_transform(path) -> sitk.Transform:
    """Any transform file Slicer, ANTs, elastix (ITK format) or this engine writes: an ITK
    transform file (linear, B-spline, displacement field or a composite in ``.h5``/``.tfm``), or
    a displacement-field image (``.nrrd``, ``.nii.gz``, ``.mha``: vectors in LPS mm)."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"transform file not found: '{p}'")
    if suffix(p, dio.IMAGE_EXTENSIONS):
        try:
            img = sitk.ReadImage(str(p))
        except RuntimeError as e:
            raise BadInputError(f"cannot read '{p}' as a displacement-field image: {e}") from None
        if img.GetNumberOfComponentsPerPixel() != 3 or img.GetDimension() != 3:
            raise BadInputError(f"'{p}' is not a 3D displacement field (3 components per voxel); "
                                "give a transform file or a displacement-field image")
        return sitk.DisplacementFieldTransform(sitk.Cast(img, sitk.sitkVectorFloat64))
    try:
        return sitk.ReadTransform(str(p))
    except RuntimeError as e:
        raise BadInputError(f"cannot read '{p}' as an ITK transform file: "
                            f"{str(e).strip().splitlines()[-1]}") from None


def read_reference(path) -> sitk.Image:
    """The reference image, used for its grid only (so a blank volume is fine)."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"reference image not found: '{p}'")
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as e:
        raise BadInputError(f"cannot read the reference image '{p}': "
                            f"{str(e).strip().splitlines()[-1]}") from None
    if img.GetDimension() != 3:
        raise BadInputError(f"the reference image '{p}' is {img.GetDimension()}D; choose a 3D volume")
    return img


def sampled_displacement(transform: sitk.Transform, reference: sitk.Image) -> np.ndarray:
    """``transform(p) - p`` at every voxel centre ``p`` of ``reference``: ``(3, D, H, W)`` float64
    LPS mm, components ``(x, y, z)``."""
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(),
        reference.GetSpacing(), reference.GetDirection())
    return np.moveaxis(sitk.GetArrayFromImage(field), -1, 0)


def inverse_transform(transform: sitk.Transform, reference: sitk.Image, u_mm: np.ndarray) -> sitk.Transform:
    """The exact inverse of a linear transform; else the numerical inverse of its field sampled
    on the reference grid (ITK's fixed-point inversion)."""
    if transform.IsLinear():
        return transform.GetInverse()
    img = sitk.GetImageFromArray(np.moveaxis(u_mm, 0, -1), isVector=True)
    img.CopyInformation(reference)
    inv = sitk.InvertDisplacementField(img, maximumNumberOfIterations=50,
                                       maxErrorToleranceThreshold=0.01,
                                       meanErrorToleranceThreshold=0.0001,
                                       enforceBoundaryCondition=False)
    return sitk.DisplacementFieldTransform(inv)


def inverse_consistency(forward: sitk.Transform, inverse: sitk.Transform, reference: sitk.Image,
                        stride: int = 2) -> Dict[str, float]:
    """``|inverse(forward(p)) - p|`` (mm) at every ``stride``-th reference voxel centre."""
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(inverse)   # ITK applies the last added first: forward, then inverse
    composite.AddTransform(forward)
    coarse = sitk.Image([max(1, (s + stride - 1) // stride) for s in reference.GetSize()], sitk.sitkUInt8)
    coarse.SetOrigin(reference.GetOrigin())
    coarse.SetSpacing([sp * stride for sp in reference.GetSpacing()])
    coarse.SetDirection(reference.GetDirection())
    err = np.linalg.norm(sampled_displacement(composite, coarse), axis=0)
    return tre_summary(err.ravel())


def landmark_errors(transform: sitk.Transform, fixed_points, moving_points) -> Dict[str, object]:
    """TRE (mm) before and after: each fixed landmark is mapped to moving space by the transform
    and compared with its moving landmark (same order)."""
    names, p = dio.read_landmarks(fixed_points)
    _, q = dio.read_landmarks(moving_points)
    if len(p) != len(q) or len(p) == 0:
        raise BadInputError(f"the two point lists must have the same number of points (>= 1); got "
                            f"{len(p)} fixed and {len(q)} moving")
    mapped = np.array([transform.TransformPoint([float(v) for v in x]) for x in p])
    before, after = tre(p, q), tre(mapped, q)
    return {"before": tre_summary(before), "after": tre_summary(after),
            "per_point": [[n, float(b), float(a)] for n, b, a in zip(names, before, after)]}


def label_overlap(fixed_labels, warped_labels, reference: sitk.Image) -> Dict[str, Dict[str, float]]:
    """Dice and HD95 (mm) per label of warped labels against fixed labels, both resampled
    (nearest neighbour, no transform) onto the reference grid when they are not on it."""
    def on_reference(path):
        lab = dio.read_labels(path)
        return sitk.GetArrayFromImage(sitk.Resample(lab, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    a, b = on_reference(fixed_labels), on_reference(warped_labels)
    spacing_kji = tuple(reversed(reference.GetSpacing()))
    return {"dice": {str(k): v for k, v in dice_per_label(a, b).items()},
            "hd95_mm": {str(k): v for k, v in hd95_per_label(a, b, spacing_kji).items()}}


def deformation_maps(transform: sitk.Transform, reference: sitk.Image):
    """``(jacobian, magnitude_mm, u_mm, stats)``: det J and |u| as ``(D, H, W)`` float32 arrays on
    the reference grid, the sampled displacement and the summary numbers."""
    grid = Grid.from_sitk(reference)
    u_mm = sampled_displacement(transform, reference)
    u_vox = displacement_mm_to_voxel(torch.from_numpy(u_mm).unsqueeze(0), grid)
    jac = jacobian_determinant(u_vox)
    magnitude = np.linalg.norm(u_mm, axis=0)
    stats = {"folding_percent": folding_percent(jac), "sdlogj": sdlogj(jac),
             "jacobian_min": float(jac.min()), "jacobian_max": float(jac.max()),
             "max_displacement_mm": float(magnitude.max()),
             "mean_displacement_mm": float(magnitude.mean()), "linear": bool(transform.IsLinear())}
    return jac[0, 0].float().numpy(), magnitude.astype(np.float32), u_mm, stats


def _write_map(array: np.ndarray, reference: sitk.Image, path: Path) -> None:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.CopyInformation(reference)
    sitk.WriteImage(img, str(path), useCompression=False)  # Slicer reads raw .nrrd at once


def run_qa(opts: QAOptions, reporter: Optional[Reporter] = None) -> Path:
    """Compute every QA number that has its inputs and write the maps; returns the manifest.

    Raises:
        BadInputError: missing or unreadable inputs, an output folder that is not empty, only
            one of a pair of landmark or label files.
    """
    reporter = reporter or SilentReporter()
    t0 = time.perf_counter()
    out = Path(opts.out)
    check_output_folder(out)
    for a, b, what in ((opts.fixed_landmarks, opts.moving_landmarks, "landmarks"),
                       (opts.fixed_labels, opts.warped_labels, "labels")):
        if (a is None) != (b is None):
            raise BadInputError(f"give both the fixed and the moving/warped {what}, or neither")
    reporter.progress("read", 0.0, "reading the transform and the reference")
    reference = read_reference(opts.reference)
    transform = read_transform(opts.transform)
    reporter.progress("maps", 0.1, "sampling the transform at every reference voxel")
    jac, magnitude, u_mm, stats = deformation_maps(transform, reference)
    metrics: Dict[str, object] = dict(stats)
    if opts.inverse_consistency:
        reporter.progress("inverse", 0.5, "inverse consistency")
        given = read_transform(opts.inverse) if opts.inverse else None
        inverse = given or inverse_transform(transform, reference, u_mm)
        metrics["inverse_consistency_mm"] = inverse_consistency(transform, inverse, reference)
        metrics["inverse"] = "given" if given is not None else ("exact" if transform.IsLinear() else "numerical")
    if opts.fixed_landmarks:
        reporter.progress("landmarks", 0.7, "landmark errors")
        tre_result = landmark_errors(transform, opts.fixed_landmarks, opts.moving_landmarks)
        metrics["tre_before_mm"], metrics["tre_after_mm"] = tre_result["before"], tre_result["after"]
        metrics["tre_per_point"] = tre_result["per_point"]
    if opts.fixed_labels:
        reporter.progress("labels", 0.8, "label overlap")
        metrics.update(label_overlap(opts.fixed_labels, opts.warped_labels, reference))
    reporter.progress("write", 0.9, "writing the maps")
    with staged_folder(out) as tmp:
        _write_map(jac, reference, tmp / "jacobian.nrrd")
        _write_map(magnitude, reference, tmp / "displacement_magnitude.nrrd")
        manifest = {
            "format": P.MANIFEST_FORMAT, "command": "qa", "engine_version": __version__,
            "transform": str(opts.transform), "reference": str(opts.reference), "metrics": metrics,
            "timings": {"total": time.perf_counter() - t0},
            "outputs": [
                P.output_entry("jacobian", P.OUTPUT_JACOBIAN, "jacobian.nrrd", None,
                               "Jacobian determinant of the transform on the reference grid (<= 0: folding)"),
                P.output_entry("displacement_magnitude", P.OUTPUT_VOLUME, "displacement_magnitude.nrrd", None,
                               "length of the displacement (mm) on the reference grid")]}
        (tmp / P.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    reporter.progress("write", 1.0, "done")
    return out / P.MANIFEST_NAME
