"""The QA page: three planes by eight columns of panels, two colour bars and the text block,
painted into an RGB canvas (:mod:`deepreglib.report.raster`) and written as a PNG.

Layout and display conventions are those of :mod:`deepreglib.report.qa` (index space; axial
``j`` down, coronal and sagittal ``k`` up; pixel aspect from the voxel spacing). Sizes are in
inches at :data:`DPI`, so a panel's pixels are ``inches * DPI``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .. import __version__
from ..io import protocol
from . import raster as R
from .qa_text import text_lines

#: Colour of folding (``det J <= 0``) in the Jacobian and grid panels; nothing else uses it. The
#: same colour as in Slicer (the protocol's).
FOLDING_RGB = protocol.FOLDING_RGB
#: Contour colours on the warped panel: fixed labels (target) and warped moving labels.
FIXED_LABEL_COLOR = "#ffd400"
WARPED_LABEL_COLOR = "#00e5ff"
#: Colour of the deformed grid lines.
GRID_COLOR = "#3cff3c"

# Layout in inches; the page is about 1900 px wide at DPI.
DPI = 100
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
_MAX_LABELS = 40
#: PNG compression: zlib level 3 writes 3x faster than the default 6 for 4 % more bytes.
_PNG_LEVEL = 3

COLUMNS = ("Fixed", "Moving (before)", "Warped (after)", "|Fixed \u2212 Moving|\nbefore",
           "|Fixed \u2212 Warped|\nafter", "Checkerboard\nfixed / warped",
           "Deformed grid\non warped", "Jacobian determinant")


@dataclass(frozen=True)
class _Plane:
    name: str
    axis: int      # the volume axis held fixed
    row_axis: int  # volume axis shown vertically
    col_axis: int  # volume axis shown horizontally
    origin: str    # "upper" puts row 0 at the top
    letters: str   # index letters of (held, row, col) for the row label


PLANES = (
    _Plane("Axial", 0, 1, 2, "upper", "kji"),
    _Plane("Coronal", 1, 0, 2, "lower", "jki"),
    _Plane("Sagittal", 2, 0, 1, "lower", "ikj"),
)


@dataclass(frozen=True)
class Layout:
    """Where the panels sit, in inches from the page's top-left corner."""

    fig_w: float
    fig_h: float
    row_h: Tuple[float, float, float]

    @classmethod
    def for_volume(cls, shape: Sequence[int], sp: np.ndarray) -> "Layout":
        # Each row is as tall as its plane's physical height-to-width ratio (clamped so a thin
        # slab still gets a usable strip), so images fill their cells at the true aspect.
        row_h = []
        for p in PLANES:
            ratio = (shape[p.row_axis] * sp[p.row_axis]) / (shape[p.col_axis] * sp[p.col_axis])
            row_h.append(_CELL_W * float(np.clip(ratio, 0.3, 3.0)))
        n = len(COLUMNS)
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

    def size_px(self) -> Tuple[int, int]:
        return int(round(self.fig_w * DPI)), int(round(self.fig_h * DPI))


def px(inches: float) -> int:
    return int(round(inches * DPI))


# -- scales -------------------------------------------------------------------------------------
def robust_range(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> Tuple[float, float]:
    flat = values.ravel()
    step = max(1, flat.size // 2_000_000)  # percentiles of a subsample: fast on big CT volumes
    lo, hi = (float(x) for x in np.percentile(flat[::step], [low, high]))
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:  # constant image: centre it in the window instead of dividing by zero
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def normalised(v: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


def jacobian_vmax(jac) -> float:
    """The top of the Jacobian scale: 2, beyond only when the map really goes there (so ordinary
    runs share one scale), at most 10."""
    if jac is None:
        return 2.0
    return float(np.clip(robust_range(jac.sample, 0.0, 99.5)[1], 2.0, 10.0))


def jacobian_ticks(vmax: float) -> List[float]:
    ticks = [0.0, 0.5, 1.0]
    top = [1.5, 2.0] if vmax <= 2.0 + 1e-9 else [round(1 + (vmax - 1) / 2, 1), round(vmax, 1)]
    return ticks + top


def nice_ticks(vmax: float, most: int = 6) -> List[float]:
    """Round ticks from 0 to ``vmax``: steps of 1, 2, 2.5 or 5 times a power of ten."""
    if not vmax > 0:
        return [0.0]
    raw = vmax / most
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return [round(k * step, 10) for k in range(int(vmax / step + 1e-9) + 1)]


def folding_overlay(j2: np.ndarray, alpha: float) -> np.ndarray:
    """``(rows, cols, 4)`` RGBA in [0, 1]: the folding colour where ``det J <= 0``, else clear."""
    rgba = np.zeros(j2.shape + (4,), dtype=np.float32)
    fold = j2 <= 0
    rgba[fold, :3] = FOLDING_RGB
    rgba[fold, 3] = alpha
    return rgba


def checkerboard(a: np.ndarray, b: np.ndarray, sp_row: float, sp_col: float) -> np.ndarray:
    rows, cols = a.shape
    # Squares of equal size in mm, about 8 across the larger side of the slice.
    tile_mm = max(rows * sp_row, cols * sp_col) / 8.0
    tr = max(tile_mm / sp_row, 1.0)
    tc = max(tile_mm / sp_col, 1.0)
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    mask = ((rr // tr).astype(int) + (cc // tc).astype(int)) % 2 == 0
    return np.where(mask, a, b)


@dataclass(frozen=True)
class _Scales:
    fixed_win: Tuple[float, float]
    moving_win: Tuple[float, float]
    diff_max: float
    jac_vmax: float


_FOLDING_U8 = tuple(int(round(255 * c)) for c in FOLDING_RGB)
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)


# -- the page -----------------------------------------------------------------------------------
def draw_page(fixed, moving, warped, jac, u, sp, lab_f, lab_w, metrics, title):
    """The page as a Pillow image. Every volume is a :class:`~deepreglib.report.qa.Planes`
    through one centre (``u``: the displacement's, channels ``(k, j, i)`` in voxels)."""
    from PIL import Image, ImageDraw
    lay = Layout.for_volume(fixed.shape, sp)
    width, height = lay.size_px()
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)

    diff_before, diff_after = abs(fixed - moving), abs(fixed - warped)
    diff_max = robust_range(np.concatenate([diff_before.sample, diff_after.sample]), 0, 99.5)[1]
    scales = _Scales(robust_range(fixed.sample),
                     # one window for moving and warped: the same intensities before and after
                     robust_range(np.concatenate([moving.sample, warped.sample])),
                     max(diff_max, 1e-6), jacobian_vmax(jac))
    vols = (fixed, moving, warped, diff_before, diff_after, jac, lab_f, lab_w)
    marks: List[Tuple[str, Any]] = []  # drawn after the canvas becomes an image
    boxes: Dict[Tuple[int, int], Tuple[int, int, int, int]] = {}
    for r, plane in enumerate(PLANES):
        for c in range(len(COLUMNS)):
            boxes[r, c] = _image_box(lay.cell(r, c), fixed.shape, plane, sp)
        marks += _paint_row(canvas, boxes, r, plane, sp, vols, u, scales)

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for (r, c), (x0, y0, x1, y1) in boxes.items():  # thin frames, as axes spines
        draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=(60, 60, 60), width=1)
    for kind, args in marks:
        if kind == "ring":
            x, y, radius = args
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=_FOLDING_U8, width=2)
        elif kind == "note":
            _note(draw, *args)
    _titles(image, draw, lay, boxes, fixed.centre, title)
    _colour_bars(image, draw, lay, scales, jac is not None)
    _text_block(draw, lay, text_lines(metrics, jac, lab_f is not None, lab_w is not None, u is not None))
    return image


def _image_box(cell, shape, plane: _Plane, sp) -> Tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` pixels (exclusive ends) of the plane's image inside its cell: as
    large as fits at the true aspect, centred."""
    x, y, w, h = cell
    aspect = (shape[plane.row_axis] * sp[plane.row_axis]) / (shape[plane.col_axis] * sp[plane.col_axis])
    if aspect > h / w:
        iw, ih = h / aspect, h
    else:
        iw, ih = w, w * aspect
    x0, y0 = px(x + (w - iw) / 2), px(y + (h - ih) / 2)
    return x0, y0, max(x0 + 1, px(x + (w + iw) / 2)), max(y0 + 1, px(y + (h + ih) / 2))


def _paint_row(canvas, boxes, r: int, plane: _Plane, sp, vols, u, s: _Scales) -> list:
    """Paint one row of panels into ``canvas``; returns the marks to draw on top (rings around
    sparse folding, notes)."""
    fixed, moving, warped, diff_before, diff_after, jac, lab_f, lab_w = vols
    sp_r, sp_c = sp[plane.row_axis], sp[plane.col_axis]
    f2, m2, w2 = (v.take(plane.axis) for v in (fixed, moving, warped))
    x0, y0, x1, y1 = boxes[r, 0]
    hh, ww = y1 - y0, x1 - x0

    def pix(plane2d):
        return R.to_pixels(plane2d, hh, ww, plane.origin)

    def put(col, rgb):
        bx0, by0, bx1, by1 = boxes[r, col]
        canvas[by0:by1, bx0:bx1] = rgb[: by1 - by0, : bx1 - bx0]

    gray_f = R.apply_lut(pix(normalised(f2, s.fixed_win)), R.GRAY)
    gray_w = R.apply_lut(pix(normalised(w2, s.moving_win)), R.GRAY)
    put(0, gray_f)
    put(1, R.apply_lut(pix(normalised(m2, s.moving_win)), R.GRAY))
    warped_rgb = gray_w.copy()
    # Fixed labels wide underneath, warped labels thin on top: where they agree both stay visible.
    for lab, colour, width in ((lab_f, FIXED_LABEL_COLOR, 3), (lab_w, WARPED_LABEL_COLOR, 1)):
        if lab is not None:
            edges = R.grow(_label_edges(pix(np.rint(lab.take(plane.axis)))), width - 1)
            R.blend(warped_rgb, edges, R.hex_rgb(colour))
    put(2, warped_rgb)
    put(3, R.apply_lut(pix(diff_before.take(plane.axis) / s.diff_max), R.HEAT))
    put(4, R.apply_lut(pix(diff_after.take(plane.axis) / s.diff_max), R.HEAT))
    board = checkerboard(normalised(f2, s.fixed_win), normalised(w2, s.moving_win), sp_r, sp_c)
    put(5, R.apply_lut(pix(board), R.GRAY))
    marks: list = []
    grid_rgb = gray_w.copy()
    if u is not None:
        u2 = u.take(plane.axis)
        R.blend(grid_rgb, _grid_lines(u2[plane.row_axis], u2[plane.col_axis], hh, ww, plane.origin,
                                      sp_r, sp_c), R.hex_rgb(GRID_COLOR))
    else:
        marks.append(("note", (boxes[r, 6], "no displacement field")))
    if jac is not None:
        j2 = jac.take(plane.axis)
        jac_rgb = R.apply_lut(pix(R.two_slope(j2, s.jac_vmax)), R.DIVERGING)
        fold = pix(j2 <= 0)
        R.blend(jac_rgb, fold, _FOLDING_U8, 1.0)
        R.blend(grid_rgb, fold, _FOLDING_U8, 0.6)
        put(7, jac_rgb)
        marks += _rings(j2, boxes[r, 6], plane.origin) + _rings(j2, boxes[r, 7], plane.origin)
    else:
        marks.append(("note", (boxes[r, 7], "no Jacobian")))
    put(6, grid_rgb)
    return marks


def _kept(lab_px: np.ndarray) -> np.ndarray:
    """Foreground of a label plane (pixels): the labels outlined (the largest ``_MAX_LABELS``)."""
    values, counts = np.unique(lab_px.astype(np.int64), return_counts=True)
    keep = values != 0
    values, counts = values[keep], counts[keep]
    if values.size > _MAX_LABELS:  # many small structures: outline the largest only
        values = values[np.argsort(counts)[::-1][:_MAX_LABELS]]
    return np.isin(lab_px, values)


def _label_edges(lab_px: np.ndarray) -> np.ndarray:
    """Pixels of an outlined label next to a pixel of another label (or background): every
    label's outline at once, one pixel wide."""
    lab = lab_px.astype(np.int64)
    differs = np.zeros(lab.shape, dtype=bool)
    differs[1:, :] |= lab[1:, :] != lab[:-1, :]
    differs[:-1, :] |= lab[:-1, :] != lab[1:, :]
    differs[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    differs[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return differs & _kept(lab_px)


def _grid_lines(u_row, u_col, height: int, width: int, origin: str, sp_row: float, sp_col: float):
    """Pixels of the moving image's regular grid as the registration carries it onto the fixed
    grid: level sets of the in-plane deformation ``phi = x + u`` (the row line ``phi_row = c`` is
    where the moving image's row ``c`` lands after warping), so the grid lies on the warped
    anatomy: straight lines for the identity, crossing lines where the map folds. The
    out-of-plane component is not shown."""
    rows, cols = u_row.shape
    lines = np.zeros((height, width), dtype=bool)
    if rows < 2 or cols < 2:
        return lines
    rr, cc = R.coordinates(height, width, rows, cols, origin)
    step_mm = max(rows * sp_row, cols * sp_col) / 16.0  # about 16 squares across, square in mm
    for field, base, n, sp, along in ((u_row, rr, rows, sp_row, (-1, 1)), (u_col, cc, cols, sp_col, (1, -1))):
        phi_vox = np.arange(n, dtype=np.float64).reshape(along) + field  # at the voxel centres
        lo, hi = float(phi_vox.min()), float(phi_vox.max())
        step = max(step_mm / sp, 2.0)
        offset = ((n - 1) % step) / 2.0  # centre the lattice in the slice
        first = offset + math.ceil((lo - offset) / step) * step
        phi = base + R.bilinear(field, rr, cc)
        # only inside the voxel centres' hull, as a contour of the voxel values would be
        inside = (rr >= 0) & (rr <= rows - 1) & (cc >= 0) & (cc <= cols - 1)
        lines |= R.level_lines(phi, first, step, lo, hi) & inside
    return lines


def _rings(j2: np.ndarray, box, origin: str, limit: int = 60) -> list:
    """A few folded voxels are a pixel or two wide on the page; ring them so they are not missed."""
    rows, cols = np.nonzero(j2 <= 0)
    if not 0 < rows.size <= limit:
        return []
    x0, y0, x1, y1 = box
    n_r, n_c = j2.shape
    ys = (rows + 0.5) * (y1 - y0) / n_r
    if origin == "lower":
        ys = (y1 - y0) - ys
    xs = (cols + 0.5) * (x1 - x0) / n_c
    return [("ring", (x0 + float(x), y0 + float(y), 6)) for x, y in zip(xs, ys)]


def _note(draw, box, text: str) -> None:
    x0, y0, x1, y1 = box
    fnt = R.font(R.points(8.5, DPI))
    w, h = R.text_size(draw, text, fnt)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    draw.rectangle([cx - w // 2 - 4, cy - h // 2 - 4, cx + w // 2 + 4, cy + h // 2 + 6], fill=(40, 40, 40))
    draw.text((cx - w // 2, cy - h // 2), text, font=fnt, fill=_WHITE)


def _titles(image, draw, lay: Layout, boxes, centre, title: str) -> None:
    draw.text((px(_LEFT), px(0.12)), title, font=R.font(R.points(14, DPI), bold=True), fill=_BLACK)
    head = R.font(R.points(9.5, DPI))
    for c, name in enumerate(COLUMNS):
        x0, y0, x1, _ = boxes[0, c]
        w, h = R.text_size(draw, name, head)
        draw.multiline_text(((x0 + x1 - w) // 2, y0 - h - 8), name, font=head, fill=_BLACK,
                            spacing=2, align="center")
    side = R.font(R.points(9, DPI))
    for r, plane in enumerate(PLANES):
        x0, y0, _, y1 = boxes[r, 0]
        text = (f"{plane.name}  {plane.letters[0]} = {centre[plane.axis]}\n"
                f"({plane.letters[1]} {'down' if plane.origin == 'upper' else 'up'}, {plane.letters[2]} right)")
        R.rotated_text(image, x0 - 4, (y0 + y1) // 2, text, side)


def _colour_bars(image, draw, lay: Layout, s: _Scales, with_jacobian: bool) -> None:
    bar_y = lay.images_bottom + 0.3
    x3 = lay.cell(0, 3)[0]
    _bar(image, draw, (x3 + 0.15, bar_y, 2 * _CELL_W + _GAP_W - 0.3, 0.13), R.HEAT,
         [(t / s.diff_max, _tick(t)) for t in nice_ticks(s.diff_max)],
         "absolute intensity difference (same scale before and after)", extend=False)
    if with_jacobian:
        x7 = lay.cell(0, 7)[0]
        ticks = [(float(R.two_slope(np.float32(t), s.jac_vmax)), _tick(t)) for t in jacobian_ticks(s.jac_vmax)]
        _bar(image, draw, (x7 + 0.12, bar_y, _CELL_W - 0.24, 0.13), R.DIVERGING, ticks,
             "det J  (magenta: \u2264 0, folding)", extend=True)


def _tick(t: float) -> str:
    return f"{t:g}"


def _bar(image, draw, box, lut, ticks, label: str, extend: bool) -> None:
    """A horizontal colour bar: the table left to right, ticks ``(position 0..1, text)`` below,
    and, with ``extend``, triangles for values beyond the scale (folding colour below)."""
    x, y, w, h = (px(v) for v in box)
    strip = R.apply_lut(np.linspace(0.0, 1.0, max(w, 2))[None, :].repeat(h, axis=0), lut)
    image.paste(_image(strip), (x, y))
    draw.rectangle([x - 1, y - 1, x + w, y + h], outline=(60, 60, 60), width=1)
    if extend:
        draw.polygon([(x - 2, y - 1), (x - 2, y + h), (x - 2 - h, y + h // 2)], fill=_FOLDING_U8,
                     outline=(60, 60, 60))
        top = tuple(int(v) for v in lut[-1])
        draw.polygon([(x + w + 1, y - 1), (x + w + 1, y + h), (x + w + 1 + h, y + h // 2)], fill=top,
                     outline=(60, 60, 60))
    small = R.font(R.points(8, DPI))
    for pos, text in ticks:
        tx = x + int(round(pos * (w - 1)))
        draw.line([(tx, y + h), (tx, y + h + 4)], fill=_BLACK, width=1)
        tw, _ = R.text_size(draw, text, small)
        draw.text((tx - tw // 2, y + h + 6), text, font=small, fill=_BLACK)
    lw, _ = R.text_size(draw, label, R.font(R.points(8.5, DPI)))
    draw.text((x + (w - lw) // 2, y + h + 24), label, font=R.font(R.points(8.5, DPI)), fill=_BLACK)


def _image(rgb: np.ndarray):
    from PIL import Image
    return Image.fromarray(np.ascontiguousarray(rgb))


def _text_block(draw, lay: Layout, lines: List[Tuple[str, str]]) -> None:
    x = px(lay.fig_w - _RIGHT - _TEXT_W)
    height_in = lay.fig_h - _TOP - 0.15
    step_in = _TEXT_FONT * 1.45 / 72.0
    max_lines = int(height_in / step_in)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [("body", "\u2026 (more in manifest.json)")]
    colours = {"fixed": FIXED_LABEL_COLOR, "warped": WARPED_LABEL_COLOR}
    body = R.font(R.points(_TEXT_FONT, DPI), mono=True)
    head = R.font(R.points(_TEXT_FONT + 0.5, DPI), bold=True, mono=True)
    for n, (style, text) in enumerate(lines):
        y = px(_TOP + n * step_in)
        if style in colours:
            # Yellow/cyan text is unreadable on white: draw the legend line on a dark box.
            w, h = R.text_size(draw, text, body)
            draw.rectangle([x - 1, y - 1, x + w + 2, y + h + 4], fill=(32, 32, 32))
            draw.text((x, y), text, font=body, fill=R.hex_rgb(colours[style]))
        else:
            draw.text((x, y), text, font=head if style == "head" else body, fill=_BLACK)


# -- writing ------------------------------------------------------------------------------------
def save_png(image, out: Path, title: str) -> Path:
    """Write ``image`` to ``out`` through a temporary name (no half-written PNG), with its title
    and the software in the PNG's text chunks."""
    from PIL import PngImagePlugin
    out.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title)
    info.add_text("Software", f"deepreglib {__version__}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info, compress_level=_PNG_LEVEL)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
