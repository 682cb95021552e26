"""Quality-assurance picture of one registration: the page a clinician looks at to judge it.

Conventions: :mod:`deepreglib.core.conventions`. All volumes are numpy ``(D, H, W)`` = ``(z, y, x)``
arrays on the FIXED grid (the moving image already resampled onto it); a displacement is
``(3, D, H, W)`` in voxels of that grid, components ``(k, j, i)``, and pulls from the moving image:
``warped(x) = moving(x + u(x))``.

Display is in the image's INDEX space, not in RAS or LPS: axial slices (fixed ``k``) show ``j``
down and ``i`` right; coronal (fixed ``j``) and sagittal (fixed ``i``) slices show ``k`` up, with
``i`` resp. ``j`` to the right. Pixel aspect follows the voxel spacing, so anatomy is not stretched.
Whether left is the patient's left depends on the image's direction matrix.

Rendering uses matplotlib's object API with the Agg canvas only (``Figure`` + ``FigureCanvasAgg``):
no pyplot, no global backend or rcParams change, so it is safe inside Slicer or a worker process.
"""
from __future__ import annotations

import io as _bytesio
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import matplotlib
import numpy as np
import SimpleITK as sitk
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .. import __version__
from ..core.errors import BadInputError
from ..core.geometry import Grid
from ..io import protocol
from ..io.protocol import MANIFEST_FORMAT
from ..io.images import read_displacement_field, read_image, sitk_to_displacement
from ..core.jacobian import folding_fraction, jacobian_determinant, std_log_jacobian

PathLike = Union[str, "os.PathLike[str]"]

#: Colour of folding (``det J <= 0``) in the Jacobian and grid panels; nothing else uses it. The
#: same colour as in Slicer (the protocol's).
FOLDING_RGB = protocol.FOLDING_RGB
#: Contour colours on the warped panel: fixed labels (target) and warped moving labels.
FIXED_LABEL_COLOR = "#ffd400"
WARPED_LABEL_COLOR = "#00e5ff"
#: Colour of the deformed grid lines.
GRID_COLOR = "#3cff3c"


# Layout in inches; the figure is about 1900 px wide at DPI.
_DPI = 100
_CELL_W = 1.9
_GAP_W = 0.07
_GAP_H = 0.12
_LEFT = 0.42
_TOP = 0.8
_BOTTOM = 0.95
_TEXT_GAP = 0.3
_TEXT_W = 3.0
_RIGHT = 0.12
_TEXT_FONT = 8.5
_TEXT_CHARS = 44
_MAX_LABELS = 40

_COLUMNS = ("Fixed", "Moving (before)", "Warped (after)", "|Fixed \u2212 Moving|\nbefore",
            "|Fixed \u2212 Warped|\nafter", "Checkerboard\nfixed / warped",
            "Deformed grid\non warped", "Jacobian determinant")


@dataclass(frozen=True)
class _Plane:
    name: str
    axis: int      # the volume axis held fixed
    row_axis: int  # volume axis shown vertically
    col_axis: int  # volume axis shown horizontally
    origin: str    # imshow origin: "upper" puts row 0 at the top
    letters: str   # index letters of (held, row, col) for the row label


_PLANES = (
    _Plane("Axial", 0, 1, 2, "upper", "kji"),
    _Plane("Coronal", 1, 0, 2, "lower", "jki"),
    _Plane("Sagittal", 2, 0, 1, "lower", "ikj"),
)


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

    fig = _draw(fixed, moving, warped, jac, u, sp, centre, lab_f, lab_w, metrics,
                title or "Registration QA")
    return _save_atomically(fig, Path(out_path), title or "Registration QA")


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


# -- drawing ------------------------------------------------------------------------------------
def _robust_range(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> Tuple[float, float]:
    flat = values.ravel()
    step = max(1, flat.size // 2_000_000)  # percentiles of a subsample: fast on big CT volumes
    lo, hi = (float(x) for x in np.percentile(flat[::step], [low, high]))
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:  # constant image: centre it in the window instead of dividing by zero
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _normalised(v: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


def _take(v: "Planes", plane: _Plane, index: int) -> np.ndarray:
    return v.take(plane.axis)


@dataclass(frozen=True)
class _Layout:
    """Where the panels sit, in inches from the figure's top-left corner."""

    fig_w: float
    fig_h: float
    row_h: Tuple[float, float, float]

    @classmethod
    def for_volume(cls, shape: Sequence[int], sp: np.ndarray) -> "_Layout":
        # Each row is as tall as its plane's physical height-to-width ratio (clamped so a thin
        # slab still gets a usable strip), so images fill their cells at the true aspect.
        row_h = []
        for p in _PLANES:
            ratio = (shape[p.row_axis] * sp[p.row_axis]) / (shape[p.col_axis] * sp[p.col_axis])
            row_h.append(_CELL_W * float(np.clip(ratio, 0.3, 3.0)))
        n = len(_COLUMNS)
        fig_w = _LEFT + n * _CELL_W + (n - 1) * _GAP_W + _TEXT_GAP + _TEXT_W + _RIGHT
        fig_h = max(_TOP + sum(row_h) + 2 * _GAP_H + _BOTTOM, 6.0)
        return cls(fig_w, fig_h, tuple(row_h))

    def cell(self, row: int, col: int) -> Tuple[float, float, float, float]:
        """``(x, y_top, width, height)`` of panel ``(row, col)``."""
        y = _TOP + sum(self.row_h[:row]) + row * _GAP_H
        return (_LEFT + col * (_CELL_W + _GAP_W), y, _CELL_W, self.row_h[row])

    @property
    def images_bottom(self) -> float:
        return _TOP + sum(self.row_h) + 2 * _GAP_H

    def box(self, x: float, y_top: float, w: float, h: float) -> List[float]:
        """Inches from the top-left -> matplotlib's ``[left, bottom, width, height]`` fractions."""
        return [x / self.fig_w, 1 - (y_top + h) / self.fig_h, w / self.fig_w, h / self.fig_h]


@dataclass(frozen=True)
class _Scales:
    fixed_win: Tuple[float, float]
    moving_win: Tuple[float, float]
    diff_max: float
    jac_norm: TwoSlopeNorm
    jac_cmap: Any


def _draw(fixed, moving, warped, jac, u, sp, centre, lab_f, lab_w, metrics, title) -> Figure:
    lay = _Layout.for_volume(fixed.shape, sp)
    fig = Figure(figsize=(lay.fig_w, lay.fig_h), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    fig.suptitle(title, x=_LEFT / lay.fig_w, ha="left", y=1 - 0.12 / lay.fig_h, va="top",
                 fontsize=14, fontweight="bold")

    diff_before = abs(fixed - moving)
    diff_after = abs(fixed - warped)
    diff_max = _robust_range(np.concatenate([diff_before.sample, diff_after.sample]), 0, 99.5)[1]
    jac_norm, jac_cmap = _jacobian_colours(jac)
    scales = _Scales(_robust_range(fixed.sample),
                     # one window for moving and warped: the same intensities before and after
                     _robust_range(np.concatenate([moving.sample, warped.sample])),
                     max(diff_max, 1e-6), jac_norm, jac_cmap)

    images = None
    for r, plane in enumerate(_PLANES):
        axes = []
        for c in range(len(_COLUMNS)):
            ax = fig.add_axes(lay.box(*lay.cell(r, c)))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_linewidth(0.4)
            if r == 0:
                ax.set_title(_COLUMNS[c], fontsize=9.5, pad=4)
            axes.append(ax)
        vols = (fixed, moving, warped, diff_before, diff_after, jac, lab_f, lab_w)
        images = _draw_row(axes, plane, centre[plane.axis], sp, vols, u, scales)

    bar_y = lay.images_bottom + 0.3
    x3 = lay.cell(0, 3)[0]
    cax = fig.add_axes(lay.box(x3 + 0.15, bar_y, 2 * _CELL_W + _GAP_W - 0.3, 0.13))
    cb = fig.colorbar(images["diff"], cax=cax, orientation="horizontal")
    cb.set_label("absolute intensity difference (same scale before and after)", fontsize=8.5)
    cb.ax.tick_params(labelsize=8)
    if images.get("jac") is not None:
        x7 = lay.cell(0, 7)[0]
        jax = fig.add_axes(lay.box(x7 + 0.12, bar_y, _CELL_W - 0.24, 0.13))
        jb = fig.colorbar(images["jac"], cax=jax, orientation="horizontal", extend="both")
        jb.set_ticks(_jacobian_ticks(jac_norm.vmax))
        jb.ax.tick_params(labelsize=8)
        jb.set_label("det J  (magenta: \u2264 0, folding)", fontsize=8.5)
        # Minor ticks of a two-slope bar land at uneven places; they only add clutter.
        jb.ax.minorticks_off()

    text_h = lay.fig_h - _TOP - 0.15
    text_ax = fig.add_axes(lay.box(lay.fig_w - _RIGHT - _TEXT_W, _TOP, _TEXT_W, text_h))
    text_ax.axis("off")
    _write_lines(text_ax, _text_lines(metrics, jac, lab_f is not None, lab_w is not None,
                                      u is not None), text_h)
    return fig


def _draw_row(axes, plane: _Plane, idx: int, sp: np.ndarray, vols, u, s: _Scales) -> Dict[str, Any]:
    """Fill one row of panels; returns the images that carry the colour bars."""
    fixed, moving, warped, diff_before, diff_after, jac, lab_f, lab_w = vols
    axes[0].set_ylabel(f"{plane.name}  {plane.letters[0]} = {idx}\n"
                       f"({plane.letters[1]} {'down' if plane.origin == 'upper' else 'up'},"
                       f" {plane.letters[2]} right)", fontsize=9)
    sp_r, sp_c = sp[plane.row_axis], sp[plane.col_axis]
    kw = dict(origin=plane.origin, aspect=sp_r / sp_c, interpolation="nearest")
    f2, m2, w2 = (_take(v, plane, idx) for v in (fixed, moving, warped))
    axes[0].imshow(f2, cmap="gray", vmin=s.fixed_win[0], vmax=s.fixed_win[1], **kw)
    axes[1].imshow(m2, cmap="gray", vmin=s.moving_win[0], vmax=s.moving_win[1], **kw)
    axes[2].imshow(w2, cmap="gray", vmin=s.moving_win[0], vmax=s.moving_win[1], **kw)
    # Fixed labels wide underneath, warped labels thin on top: where they agree both stay visible.
    if lab_f is not None:
        _label_contours(axes[2], _take(lab_f, plane, idx), FIXED_LABEL_COLOR, 1.8)
    if lab_w is not None:
        _label_contours(axes[2], _take(lab_w, plane, idx), WARPED_LABEL_COLOR, 0.8)
    out: Dict[str, Any] = {"jac": None}
    out["diff"] = axes[3].imshow(_take(diff_before, plane, idx), cmap="inferno", vmin=0,
                                 vmax=s.diff_max, **kw)
    axes[4].imshow(_take(diff_after, plane, idx), cmap="inferno", vmin=0, vmax=s.diff_max, **kw)
    axes[5].imshow(_checkerboard(_normalised(f2, s.fixed_win), _normalised(w2, s.moving_win),
                                 sp_r, sp_c), cmap="gray", vmin=0, vmax=1, **kw)
    axes[6].imshow(w2, cmap="gray", vmin=s.moving_win[0], vmax=s.moving_win[1], **kw)
    if u is not None:
        u2 = _take(u, plane, idx)
        _deformed_grid(axes[6], u2[plane.row_axis], u2[plane.col_axis], sp_r, sp_c)
    else:
        _note(axes[6], "no displacement field")
    if jac is not None:
        j2 = _take(jac, plane, idx)
        out["jac"] = axes[7].imshow(j2, cmap=s.jac_cmap, norm=s.jac_norm, **kw)
        axes[7].imshow(_folding_overlay(j2, 1.0), **kw)
        axes[6].imshow(_folding_overlay(j2, 0.6), **kw)
        _circle_sparse_folding(axes[7], j2)
        _circle_sparse_folding(axes[6], j2)
    else:
        _note(axes[7], "no Jacobian")
    rows, cols = f2.shape
    for ax in axes:  # contours and markers must not widen the view beyond the image
        ax.set_xlim(-0.5, cols - 0.5)
        ax.set_ylim((rows - 0.5, -0.5) if plane.origin == "upper" else (-0.5, rows - 0.5))
    return out


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8.5,
            color="white", bbox=dict(facecolor="black", alpha=0.6, edgecolor="none"))


def _jacobian_colours(jac: Optional[np.ndarray]):
    vmax = 2.0
    if jac is not None:
        # Beyond 2 only when the map really goes there, so ordinary runs share one scale.
        vmax = float(np.clip(_robust_range(jac.sample, 0.0, 99.5)[1], 2.0, 10.0))
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=vmax)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(under=FOLDING_RGB)
    return norm, cmap


def _jacobian_ticks(vmax: float) -> List[float]:
    ticks = [0.0, 0.5, 1.0]
    top = [1.5, 2.0] if vmax <= 2.0 + 1e-9 else [round(1 + (vmax - 1) / 2, 1), round(vmax, 1)]
    return ticks + top


def _folding_overlay(j2: np.ndarray, alpha: float) -> np.ndarray:
    rgba = np.zeros(j2.shape + (4,), dtype=np.float32)
    fold = j2 <= 0
    rgba[fold, :3] = FOLDING_RGB
    rgba[fold, 3] = alpha
    return rgba


def _circle_sparse_folding(ax, j2: np.ndarray, limit: int = 60) -> None:
    # A few folded voxels are a pixel or two wide on the page; ring them so they are not missed.
    rows, cols = np.nonzero(j2 <= 0)
    if 0 < rows.size <= limit:
        ax.scatter(cols, rows, s=70, facecolors="none", edgecolors=[FOLDING_RGB], linewidths=1.2)


def _checkerboard(a: np.ndarray, b: np.ndarray, sp_row: float, sp_col: float) -> np.ndarray:
    rows, cols = a.shape
    # Squares of equal size in mm, about 8 across the larger side of the slice.
    tile_mm = max(rows * sp_row, cols * sp_col) / 8.0
    tr = max(tile_mm / sp_row, 1.0)
    tc = max(tile_mm / sp_col, 1.0)
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    mask = ((rr // tr).astype(int) + (cc // tc).astype(int)) % 2 == 0
    return np.where(mask, a, b)


def _deformed_grid(ax, u_row: np.ndarray, u_col: np.ndarray, sp_row: float, sp_col: float) -> None:
    """Draw the moving image's regular grid as the registration carries it onto the fixed grid.

    The lines are level sets of the in-plane deformation ``phi = x + u``: the row line ``phi_row
    = c`` is where the moving image's row ``c`` lands after warping. This is the grid pulled by
    the same field as the warped image, so it lies on the warped anatomy (straight lines for the
    identity, crossing lines where the map folds). The out-of-plane component is not shown.
    """
    rows, cols = u_row.shape
    if rows < 2 or cols < 2:
        return
    rr, cc = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64),
                         indexing="ij")
    phi_row = rr + u_row
    phi_col = cc + u_col
    step_mm = max(rows * sp_row, cols * sp_col) / 16.0  # about 16 squares across, square in mm
    for phi, n, sp in ((phi_row, rows, sp_row), (phi_col, cols, sp_col)):
        step = max(step_mm / sp, 2.0)
        offset = ((n - 1) % step) / 2.0  # centre the lattice in the slice
        lo, hi = float(phi.min()), float(phi.max())
        first = offset + math.ceil((lo - offset) / step) * step
        levels = np.arange(first, hi, step)
        levels = levels[(levels > lo) & (levels < hi)]
        if levels.size:
            ax.contour(cc, rr, phi, levels=levels, colors=[GRID_COLOR], linewidths=0.6,
                       linestyles="solid")


def _label_contours(ax, lab2d: np.ndarray, color: str, width: float) -> None:
    if min(lab2d.shape) < 2:
        return
    values, counts = np.unique(np.rint(lab2d).astype(np.int64), return_counts=True)
    keep = values != 0
    values, counts = values[keep], counts[keep]
    if values.size > _MAX_LABELS:  # many small structures: outline the largest only
        values = values[np.argsort(counts)[::-1][:_MAX_LABELS]]
    rounded = np.rint(lab2d)
    for v in values:
        mask = (rounded == v).astype(np.float32)
        if mask.min() == mask.max():
            continue
        ax.contour(mask, levels=[0.5], colors=[color], linewidths=width)


# -- the text block -----------------------------------------------------------------------------
_NAMES = {
    "method": "Method", "device": "Device", "time": "Time", "time_s": "Time",
    "ncc": "NCC", "lncc": "LNCC", "mse": "MSE", "mi": "MI", "nmi": "NMI", "ssim": "SSIM",
    "dice": "Dice", "dice_mean": "Dice (mean)", "mean_dice": "Dice (mean)", "hd95": "HD95",
    "hd95_mm": "HD95", "tre": "TRE", "tre_mm": "TRE", "sdlogj": "SDlogJ", "sd_log_j": "SDlogJ",
    "std_log_jacobian": "SDlogJ", "folding_fraction": "Folding", "folding_percent": "Folding",
    "folding": "Folding", "jacobian_min": "min det J", "jacobian_max": "max det J",
    "jac_min": "min det J", "jac_max": "max det J", "max_displacement_mm": "max |u|",
    "weights_sha256": "Weights sha256",
}
#: Rows listed first, in this order; the rest keep the order of the metrics dict.
_FIRST = ("method", "device", "time", "time_s")
#: A nested dict of more numbers than this (e.g. Dice of 35 labels) is not listed value by value.
_MAX_PER_KEY = 8
_STAGE = re.compile(r"(^|_)(before|after)(?=_|$)")


def _flatten(d: Mapping, prefix: str = "") -> Tuple[List[Tuple[str, Any]], List[str]]:
    """``(dotted key, value)`` leaves, and the keys of long numeric dicts that were left out."""
    out: List[Tuple[str, Any]] = []
    skipped: List[str] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            if len(v) > _MAX_PER_KEY:
                skipped.append(key)
                continue
            leaves, more = _flatten(v, key + ".")
            out.extend(leaves)
            skipped.extend(more)
        else:
            out.append((key, v))
    return out, skipped


def _split_stage(key: str) -> Tuple[str, Optional[int]]:
    """``"dice_before.3"`` -> ``("dice.3", 0)``; ``"tre_after_mm"`` -> ``("tre_mm", 1)``."""
    parts = key.split(".")
    slot = None
    for n, part in enumerate(parts):
        m = _STAGE.search(part.lower())
        if m:
            slot = 0 if m.group(2) == "before" else 1
            parts[n] = (part[: m.start()] + part[m.end():]).strip("_")
    base = ".".join(p for p in parts if p)
    return (base, slot) if base else (key, None)


def _pretty_name(key: str) -> str:
    parts = key.lower().split(".")
    if parts[0] in ("timings", "timing", "times") and len(parts) > 1:
        return "Time " + " ".join(parts[1:]).replace("_", " ")
    words = []
    for part in parts:
        if part in _NAMES:
            words.append(_NAMES[part])
        elif part.isdigit():
            words.append(f"label {part}")
        else:
            words.append(part.replace("_", " "))
    return " ".join(words)


def _format_value(key: str, v: Any) -> str:
    k = key.lower()
    if v is None:
        return "\u2013"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        nums = [x for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if len(nums) == len(v) and len(v) > 4:
            return f"mean {_num(float(np.mean(nums)))} (n={len(v)})"
        return ", ".join(_format_value(key, x) for x in v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        x = float(v)
        if not math.isfinite(x):
            return str(x)
        if "fold" in k and ("percent" in k or "pct" in k):
            return f"{_num(x)} %"
        if "fold" in k or "fraction" in k:
            return f"{_num(100.0 * x)} %"
        if "time" in k or "timing" in k or k.endswith("_s") or k.endswith("seconds"):
            return f"{x:.2f} s" if x < 100 else f"{x:.0f} s"
        if k.endswith("_mm") or "_mm." in k:
            return f"{_num(x)} mm"
        if isinstance(v, (int, np.integer)):
            return str(int(v))
        return _num(x)
    s = str(v)
    return s if len(s) <= 28 else s[:12] + "\u2026" + s[-12:]


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.3g}"
    return f"{x:.4g}"


def _metric_rows(metrics: Optional[Mapping]) -> List[Tuple[str, str]]:
    """``(name, value)`` rows; ``x_before``/``x_after`` (anywhere in a key, e.g. ``tre_before_mm``
    or ``dice_before.3``) share one row ``before -> after``. Method, device and time come first."""
    if not metrics:
        return []
    leaves, skipped = _flatten(metrics)
    rows: Dict[str, List[Any]] = {}  # base -> [base, plain, before, after]
    for key, value in leaves:
        base, slot = _split_stage(key)
        entry = rows.setdefault(base.lower(), [base, None, None, None])
        entry[1 if slot is None else 2 + slot] = _format_value(key, value)
    order = sorted(rows, key=lambda b: _FIRST.index(b) if b in _FIRST else len(_FIRST))
    out = []
    dash = "\u2013"
    for b in order:
        base, plain, before, after = rows[b]
        name = _pretty_name(base)
        if before is not None or after is not None:
            out.append((name, f"{before or dash} \u2192 {after or dash}"))
        if plain is not None:
            out.append((name, plain))
    for key in dict.fromkeys(_split_stage(k)[0] for k in skipped):
        out.append((_pretty_name(key), "per label: see manifest"))
    return out


def _text_lines(metrics, jac, has_lab_f, has_lab_w, has_field) -> List[Tuple[str, str]]:
    """(style, text) lines; style is "head" or "body"."""
    width = _TEXT_CHARS
    lines: List[Tuple[str, str]] = []

    def row(name: str, value: str) -> None:
        name = name if len(name) <= 16 else name[:15] + "\u2026"
        text = f"{name:<16} {value}"
        lines.append(("body", text if len(text) <= width else text[: width - 1] + "\u2026"))

    rows = _metric_rows(metrics)
    if rows:
        lines.append(("head", "Run and metrics (before \u2192 after)"))
        for name, value in rows:
            row(name, value)
        lines.append(("body", ""))
    if jac is not None and jac.stats:
        st = jac.stats
        lines.append(("head", "Jacobian map shown (all voxels)"))
        row("min det J", _num(float(st["min"])))
        row("max det J", _num(float(st["max"])))
        row("Folding", f"{_num(100.0 * st['folding_fraction'])} % (det J \u2264 0)")
        row("SDlogJ", _num(st["sdlogj"]))
        lines.append(("body", ""))
    lines.append(("head", "How to read"))
    for text in (
            "Before/after: |difference| should fade",
            "  from column 4 to column 5.",
            "Checkerboard: edges should run on",
            "  across square borders.",
            "Grid: the moving image's regular grid",
            "  as the registration bends it." if has_field else "  (no field in this run).",
            "Jacobian: blue shrinks, white keeps,",
            "  red grows volume; magenta folds.",
    ):
        lines.append(("body", text))
    if has_lab_f or has_lab_w:
        lines.append(("body", "Contours on Warped:"))
        if has_lab_f:
            lines.append(("fixed", "  \u2014 fixed labels"))
        if has_lab_w:
            lines.append(("warped", "  \u2014 warped moving labels"))
    lines.append(("body", ""))
    lines.append(("head", "Orientation"))
    lines.append(("body", "Image index space, not RAS/LPS."))
    lines.append(("body", "Axial: j down, i right."))
    lines.append(("body", "Coronal/sagittal: k up."))
    return lines


def _write_lines(ax, lines: List[Tuple[str, str]], height_in: float) -> None:
    step_in = _TEXT_FONT * 1.45 / 72.0
    max_lines = int(height_in / step_in)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [("body", "\u2026 (more in manifest.json)")]
    colours = {"fixed": FIXED_LABEL_COLOR, "warped": WARPED_LABEL_COLOR}
    for n, (style, text) in enumerate(lines):
        y = 1.0 - n * step_in / height_in
        if style in colours:
            # Yellow/cyan text is unreadable on white: draw the legend line as a dark box.
            ax.text(0.0, y, text, transform=ax.transAxes, va="top", ha="left",
                    family="monospace", fontsize=_TEXT_FONT, color=colours[style],
                    bbox=dict(facecolor="#202020", edgecolor="none", pad=1.0))
        else:
            ax.text(0.0, y, text, transform=ax.transAxes, va="top", ha="left",
                    family="monospace", fontsize=_TEXT_FONT + (0.5 if style == "head" else 0),
                    fontweight="bold" if style == "head" else "normal")


# -- writing ------------------------------------------------------------------------------------
def _save_atomically(fig: Figure, out: Path, title: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = _bytesio.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor="white",
                metadata={"Title": title, "Software": f"deepreglib {__version__}"})
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(buf.getvalue())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


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
