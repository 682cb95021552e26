"""Quality-assurance picture of one registration: the page a clinician looks at to judge it.

Conventions: :mod:`deepreglib.core.conventions`. All volumes are numpy ``(D, H, W)`` = ``(z, y, x)``
arrays on the FIXED grid (the moving image already resampled onto it); a displacement is
``(3, D, H, W)`` in voxels of that grid, components ``(k, j, i)``, and pulls from the moving image:
``warped(x) = moving(x + u(x))``.

Display is in the image's INDEX space, not in RAS or LPS: axial slices (fixed ``k``) show ``j``
down and ``i`` right; coronal (fixed ``j``) and sagittal (fixed ``i``) slices show ``k`` up, with
``i`` resp. ``j`` to the right. Pixel aspect follows the voxel spacing, so anatomy is not stretched.
Whether left is the patient's left depends on the image's direction matrix.

The page is painted by :mod:`deepreglib.report.qa_page` (numpy and Pillow, no matplotlib: no
global state, safe inside Slicer or a worker process, and 0.1 s instead of 1.7 s on 2 cores);
its text block is composed by :mod:`deepreglib.report.qa_text`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from ..core.errors import BadInputError
from ..core.geometry import Grid
from ..io.protocol import MANIFEST_FORMAT
from ..io.images import read_displacement_field, read_image, sitk_to_displacement
from ..core.jacobian import folding_fraction, jacobian_determinant, std_log_jacobian
from .qa_page import (FIXED_LABEL_COLOR, FOLDING_RGB, GRID_COLOR, WARPED_LABEL_COLOR,  # noqa: F401
                      draw_page, save_png)

PathLike = Union[str, "os.PathLike[str]"]


# -- public API ---------------------------------------------------------------------------------
def render_qa_png(out_path: PathLike, fixed, moving, warped, jacobian=None, displacement=None,
                  spacing: Sequence[float] = (1.0, 1.0, 1.0), metrics: Optional[Mapping] = None,
                  title: Optional[str] = None, slice_index=None, labels_fixed=None,
                  labels_warped=None) -> Path:
    """Write the QA picture of one registration as a PNG and return its path.

    One row per orthogonal plane (axial, coronal, sagittal through the centre or
    ``slice_index``), columns: fixed, moving (before), warped (after), ``|fixed - moving|`` and
    ``|fixed - warped|`` on one colour scale, a fixed/warped checkerboard, the deformed grid over
    the warped image, and the Jacobian determinant on a diverging map centred on 1 (blue <1
    shrinks, red >1 grows, magenta ``<= 0`` folds). A text block lists ``metrics`` and the
    Jacobian statistics of the map shown. Display is in index space (see the module docstring).

    Args:
        out_path: PNG to write; written to a temporary name and renamed, parents are created.
        fixed, moving, warped: ``(D, H, W)`` intensities on the fixed grid (numpy or torch; leading
            singleton axes are dropped). ``moving`` is the moving image resampled onto the fixed
            grid without registration.
        jacobian: ``(D, H, W)`` determinant of ``I + grad u`` (unitless), or ``None`` to compute it
            from ``displacement`` (or to leave the panel empty when that is ``None`` too).
        displacement: ``(3, D, H, W)`` or ``(1, 3, D, H, W)`` in voxels, components ``(k, j, i)``,
            or ``None`` (the grid panel then shows the warped image alone).
        spacing: voxel size in mm in tensor order ``(d, h, w)`` (``Grid.spacing_kji``).
        metrics: numbers to list (flat or nested dict); ``x_before``/``x_after`` pairs share a row.
        title: figure title.
        slice_index: ``None`` (centre), an int (axial ``k``; the others centred) or ``(k, j, i)``.
        labels_fixed, labels_warped: optional ``(D, H, W)`` integer label maps, drawn as contours
            on the warped panel (0 is background).
    Raises:
        ValueError: shapes disagree, spacing is not 3 positive numbers, or a slice is out of range.
    """
    if isinstance(fixed, Planes):  # streamed: every input is already Planes through one centre
        shape, centre = fixed.shape, fixed.centre
        fixed, moving, warped = (_checked_planes(n, v, fixed) for n, v in (
            ("fixed", fixed), ("moving", moving), ("warped", warped)))
        u, jac, lab_f, lab_w = (None if v is None else _checked_planes(n, v, fixed) for n, v in (
            ("displacement", displacement), ("jacobian", jacobian), ("labels_fixed", labels_fixed),
            ("labels_warped", labels_warped)))
    else:
        fixed = _as_volume("fixed", fixed)
        shape = fixed.shape
        moving = _as_volume("moving", moving, shape)
        warped = _as_volume("warped", warped, shape)
        u = _as_displacement(displacement, shape)
        if jacobian is None and u is not None:
            jacobian = jacobian_determinant(torch.from_numpy(u[None].astype(np.float64)))[0, 0].numpy()
        jac = None if jacobian is None else _as_volume("jacobian", jacobian, shape)
        lab_f = None if labels_fixed is None else _as_volume("labels_fixed", labels_fixed, shape)
        lab_w = None if labels_warped is None else _as_volume("labels_warped", labels_warped, shape)
        centre = _slice_indices(slice_index, shape)
        # from here on only three planes and a subsample of each volume are drawn from
        fixed, moving, warped, u, lab_f, lab_w = (None if v is None else Planes.of(v, centre) for v in (
            fixed, moving, warped, u, lab_f, lab_w))
        jac = None if jac is None else Planes.of(jac, centre, jacobian_stats(jac))
    sp = _as_spacing(spacing)

    title = title or "Registration QA"
    page = draw_page(fixed, moving, warped, jac, u, sp, lab_f, lab_w, metrics, title)
    return save_png(page, Path(out_path), title)


def report_from_manifest(manifest_path: PathLike, out_path: Optional[PathLike] = None) -> Path:
    """Render the QA picture of a finished run from its ``manifest.json``.

    Reads the fixed and moving inputs and the outputs listed in the manifest (paths relative to
    the manifest's folder unless absolute) with SimpleITK. The moving image is resampled onto the
    fixed grid through the identity in physical space for the "before" panels; other volumes not
    already on the fixed grid are resampled the same way (labels with nearest neighbour). The
    displacement (an ITK vector image in LPS mm, ``(x, y, z)``) becomes voxels through
    :func:`deepreglib.io.images.read_displacement_field` (which converts with :mod:`geometry`); a linear
    transform alone (rigid/affine methods) becomes its dense displacement on the fixed grid. The
    Jacobian is read, or computed from the displacement when the run wrote none.

    Args:
        manifest_path: the run's ``manifest.json`` (format ``deepreg-manifest/1``).
        out_path: PNG to write; default ``qa.png`` next to the manifest.
    Returns the PNG's path.
    Raises:
        BadInputError: the manifest is unreadable, of another format, or names missing files.
    """
    manifest_path = Path(manifest_path)
    manifest = _read_manifest(manifest_path)
    base = manifest_path.parent
    inputs = manifest.get("inputs") or {}
    for key in ("fixed", "moving"):
        if not inputs.get(key):
            raise BadInputError(f"manifest {manifest_path} has no inputs.{key}")
    fixed_img = sitk.Cast(read_image(_resolve(base, inputs["fixed"])), sitk.sitkFloat32)
    moving_img = sitk.Cast(read_image(_resolve(base, inputs["moving"])), sitk.sitkFloat32)
    grid = Grid.from_sitk(fixed_img)
    outputs = _outputs_by_kind(manifest)

    warped_entry = _pick(outputs, "volume", "warped")
    if warped_entry is None:
        raise BadInputError(f"manifest {manifest_path} lists no warped volume (kind 'volume')")
    warped_img = _on_grid(_read_scalar(_resolve(base, warped_entry["path"])), fixed_img)

    u = None
    field_entry = _pick(outputs, "displacement_field", "displacement", "transform")
    linear_entry = _pick(outputs, "linear_transform", "transform")
    if field_entry is not None:
        u = _read_displacement_voxels(_resolve(base, field_entry["path"]), grid)
    elif linear_entry is not None:
        u = _linear_transform_voxels(_resolve(base, linear_entry["path"]), fixed_img)

    jac = None
    jac_entry = _pick(outputs, "jacobian", "jacobian")
    if jac_entry is not None:
        jac = _array(_on_grid(_read_scalar(_resolve(base, jac_entry["path"])), fixed_img))
    elif u is not None:
        jac = jacobian_determinant(torch.from_numpy(u[None].astype(np.float64)))[0, 0].numpy()

    lab_f = lab_w = None
    if inputs.get("fixed_labels"):
        lab_f = _array(_on_grid(_read_scalar(_resolve(base, inputs["fixed_labels"])),
                                fixed_img, labels=True))
    labels_entry = _pick(outputs, "labels", "warped_labels")
    if labels_entry is not None:
        lab_w = _array(_on_grid(_read_scalar(_resolve(base, labels_entry["path"])),
                                fixed_img, labels=True))

    moving_on_fixed = sitk.Resample(moving_img, fixed_img, sitk.Transform(3, sitk.sitkIdentity),
                                    sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    method = manifest.get("method", "registration")
    title = (f"{method}: {_short_name(inputs['moving'])} \u2192 {_short_name(inputs['fixed'])}")
    out = Path(out_path) if out_path is not None else base / "qa.png"
    return render_qa_png(out, _array(fixed_img), _array(moving_on_fixed), _array(warped_img), jac,
                         displacement=u, spacing=tuple(grid.spacing_kji),
                         metrics=_manifest_metrics(manifest), title=title,
                         labels_fixed=lab_f, labels_warped=lab_w)


# -- what is drawn: three planes and a subsample ------------------------------------------------
#: At most this many voxels of a volume set its display window (percentiles of a subsample).
SAMPLE_VOXELS = 2_000_000


def _sample_step(n_voxels: int) -> int:
    return max(1, n_voxels // SAMPLE_VOXELS)


class Planes:
    """What the picture needs of one volume ``(D, H, W)`` (or ``(C, D, H, W)``, a displacement):
    its three orthogonal planes through ``centre`` (``planes[axis]``, the plane holding that axis
    fixed, channels first), ``sample``: every ``step``-th voxel in C order (display windows),
    and ``stats`` (e.g. the Jacobian's whole-volume min, max, folding, SDlogJ). Built from a
    whole volume (:meth:`of`) or slab by slab (:class:`PlaneCollector`), so a big scan never has
    to be in memory at once for its picture."""

    def __init__(self, shape, centre, planes, sample, stats=None):
        self.shape, self.centre = tuple(int(n) for n in shape), tuple(int(c) for c in centre)
        self.planes = {a: np.nan_to_num(np.asarray(v, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
                       for a, v in planes.items()}
        self.sample = np.nan_to_num(np.asarray(sample, dtype=np.float32).ravel(), nan=0.0, posinf=0.0, neginf=0.0)
        self.stats = dict(stats or {})

    @classmethod
    def of(cls, volume: np.ndarray, centre, stats=None) -> "Planes":
        v = np.asarray(volume)
        spatial = v.shape[-3:]
        planes = {a: np.take(v, centre[a], axis=v.ndim - 3 + a) for a in range(3)}
        sample = v.reshape(-1, int(np.prod(spatial)))[:, ::_sample_step(int(np.prod(spatial)))] if v.ndim == 4 \
            else v.ravel()[::_sample_step(v.size)]
        return cls(spatial, centre, planes, sample, stats)

    def take(self, axis: int) -> np.ndarray:
        return self.planes[axis]

    def __sub__(self, other: "Planes") -> "Planes":
        return Planes(self.shape, self.centre, {a: self.planes[a] - other.planes[a] for a in range(3)},
                      self.sample - other.sample)

    def __abs__(self) -> "Planes":
        return Planes(self.shape, self.centre, {a: np.abs(v) for a, v in self.planes.items()},
                      np.abs(self.sample))


class PlaneCollector:
    """Builds :class:`Planes` of a volume that arrives slab by slab (slices ``k0:k1`` of the
    slowest axis, any order): ``add(k0, slab)`` with ``slab`` ``(n, H, W)`` or ``(C, n, H, W)``;
    the subsample is the same as :meth:`Planes.of` would take of the whole volume."""

    def __init__(self, shape, centre, channels: int = 0):
        self.shape, self.centre, self.channels = tuple(shape), tuple(centre), channels
        d, h, w = self.shape
        lead = (channels,) if channels else ()
        self.planes = {0: np.zeros(lead + (h, w), np.float32), 1: np.zeros(lead + (d, w), np.float32),
                       2: np.zeros(lead + (d, h), np.float32)}
        self.step = _sample_step(d * h * w)
        self.samples = {}

    def add(self, k0: int, slab) -> None:
        a = slab.detach().cpu().numpy() if isinstance(slab, torch.Tensor) else np.asarray(slab)
        a = a.reshape(((self.channels,) if self.channels else ()) + a.shape[-3:])
        n = a.shape[-3]
        k, j, i = self.centre
        if k0 <= k < k0 + n:
            self.planes[0][...] = a[..., k - k0, :, :]
        self.planes[1][..., k0:k0 + n, :] = a[..., :, j, :]
        self.planes[2][..., k0:k0 + n, :] = a[..., :, :, i]
        per = self.shape[1] * self.shape[2]
        first = (-k0 * per) % self.step  # flat positions that are multiples of step
        flat = a.reshape(((self.channels,) if self.channels else ()) + (-1,))
        self.samples[k0] = flat[..., first::self.step].copy()

    def result(self, stats=None) -> "Planes":
        parts = [self.samples[k] for k in sorted(self.samples)]
        sample = np.concatenate(parts, axis=-1) if parts else np.zeros(0, np.float32)
        return Planes(self.shape, self.centre, self.planes, sample, stats)


def jacobian_stats(jac: np.ndarray) -> dict:
    """The whole-volume numbers the text block lists for a Jacobian map."""
    t = torch.from_numpy(np.asarray(jac, dtype=np.float64))
    return {"min": float(jac.min()), "max": float(jac.max()), "folding_fraction": folding_fraction(t),
            "sdlogj": std_log_jacobian(t)}


def _checked_planes(name: str, v, ref: "Planes") -> "Planes":
    if not isinstance(v, Planes) or v.shape != ref.shape or v.centre != ref.centre:
        raise ValueError(f"{name}: with Planes inputs every volume must be Planes of the fixed "
                         f"shape {ref.shape} through {ref.centre}")
    return v


# -- input checks -------------------------------------------------------------------------------
def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _as_volume(name: str, a, shape: Optional[Tuple[int, ...]] = None) -> np.ndarray:
    v = _to_numpy(a)
    while v.ndim > 3 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 3:
        raise ValueError(f"{name} must be a (D, H, W) volume, got shape {tuple(v.shape)}")
    if shape is not None and tuple(v.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(v.shape)}, expected the fixed shape "
                         f"{tuple(shape)}")
    if min(v.shape) < 1:
        raise ValueError(f"{name} is empty: shape {tuple(v.shape)}")
    # NaN/inf would make every window and colour scale undefined; show them as 0.
    return np.nan_to_num(v.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _as_displacement(u, shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    if u is None:
        return None
    v = _to_numpy(u)
    if v.ndim == 5 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 4 or v.shape[0] != 3 or tuple(v.shape[1:]) != tuple(shape):
        raise ValueError(f"displacement must be (3, D, H, W) = (3, {', '.join(map(str, shape))}) "
                         f"in voxels, got {tuple(v.shape)}")
    return np.nan_to_num(v.astype(np.float32))


def _as_spacing(spacing) -> np.ndarray:
    sp = np.asarray(_to_numpy(spacing), dtype=np.float64).ravel()
    if sp.size != 3 or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be 3 positive numbers (d, h, w) in mm, got {spacing!r}")
    return sp


def _slice_indices(slice_index, shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    centre = [s // 2 for s in shape]
    if slice_index is None:
        return tuple(centre)
    if isinstance(slice_index, (int, np.integer)):
        centre[0] = int(slice_index)
    else:
        idx = list(slice_index)
        if len(idx) != 3:
            raise ValueError(f"slice_index must be an int (axial k) or (k, j, i), got "
                             f"{slice_index!r}")
        centre = [int(i) for i in idx]
    for axis, (i, n) in enumerate(zip(centre, shape)):
        if not 0 <= i < n:
            raise ValueError(f"slice index {i} on axis {axis} is outside 0..{n - 1}")
    return tuple(centre)


# -- manifest reading ---------------------------------------------------------------------------
def _read_manifest(path: Path) -> Dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInputError(f"cannot read manifest {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise BadInputError(f"manifest {path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BadInputError(f"manifest {path} must hold a JSON object")
    fmt = manifest.get("format")
    if fmt != MANIFEST_FORMAT:
        raise BadInputError(f"manifest {path} has format {fmt!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def _resolve(base: Path, p: str) -> Path:
    path = Path(p)
    path = path if path.is_absolute() else base / path
    if not path.exists():  # a folder is a DICOM series
        raise BadInputError(f"file named in the manifest does not exist: {path}")
    return path


def _short_name(p: str) -> str:
    name = Path(p).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _outputs_by_kind(manifest: Mapping) -> Dict[str, List[Mapping]]:
    by_kind: Dict[str, List[Mapping]] = {}
    for entry in manifest.get("outputs") or []:
        if isinstance(entry, Mapping) and entry.get("path") and entry.get("kind"):
            by_kind.setdefault(str(entry["kind"]), []).append(entry)
    return by_kind


def _pick(by_kind: Mapping[str, List[Mapping]], kind: str, *preferred: str):
    """The output of ``kind`` named first in ``preferred``, else the first of that kind; inverse
    transforms live on the moving grid and are never picked."""
    entries = [e for e in by_kind.get(kind) or []
               if not str(e.get("name", "")).startswith("inverse")]
    for name in preferred:
        for e in entries:
            if e.get("name") == name:
                return e
    return entries[0] if entries else None


def _read_scalar(path: Path) -> sitk.Image:
    """A run's output volume as float32 (outputs may be constant, e.g. a rigid run's Jacobian,
    so :func:`deepreglib.io.images.read_image`'s checks for inputs do not apply)."""
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise BadInputError(f"cannot read {path}: {str(exc).strip().splitlines()[0]}") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise BadInputError(f"{path} must be a 3D scalar image, got {img.GetDimension()}D with "
                            f"{img.GetNumberOfComponentsPerPixel()} components")
    return sitk.Cast(img, sitk.sitkFloat32)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5, atol=1e-6)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))


def _on_grid(img: sitk.Image, fixed: sitk.Image, labels: bool = False) -> sitk.Image:
    """``img`` on the fixed grid: unchanged when it already is, else resampled through the
    identity in physical space (nearest neighbour for labels)."""
    if _same_grid(img, fixed):
        return img
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(img, fixed, sitk.Transform(3, sitk.sitkIdentity), interp, 0.0,
                         img.GetPixelID())


def _array(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img).astype(np.float32)


def _read_displacement_voxels(path: Path, fixed_grid: Grid) -> np.ndarray:
    """ITK displacement field (LPS mm) -> ``(3, D, H, W)`` voxels of the fixed grid."""
    u, grid = read_displacement_field(path)
    if grid.shape != fixed_grid.shape or not np.allclose(grid.spacing, fixed_grid.spacing,
                                                         rtol=1e-5):
        raise BadInputError(f"displacement field {path} is on grid {grid.shape} with spacing "
                            f"{grid.spacing}, expected the fixed grid {fixed_grid.shape} with "
                            f"spacing {fixed_grid.spacing}")
    return _to_numpy(u)[0].astype(np.float32)


def _linear_transform_voxels(path: Path, fixed: sitk.Image) -> np.ndarray:
    """Dense displacement of an ITK linear transform (fixed -> moving points) on the fixed grid,
    ``(3, D, H, W)`` in voxels."""
    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise BadInputError(f"cannot read transform {path}: {exc}") from exc
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(fixed)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    u, _ = sitk_to_displacement(to_field.Execute(tx))
    return _to_numpy(u)[0].astype(np.float32)


def _manifest_metrics(manifest: Mapping) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key in ("method", "device"):
        if manifest.get(key) is not None:
            out[key] = manifest[key]
    timings = manifest.get("timings")
    if isinstance(timings, Mapping) and "total" in timings:
        out["time"] = timings["total"]
    metrics = manifest.get("metrics")
    if isinstance(metrics, Mapping):
        out.update(metrics)
    return out
