"""Raster drawing for the QA picture: colour maps, panels resampled to pixels, level lines and
outlines painted into pixel masks, and text, with numpy and Pillow only.

Why not matplotlib: the QA picture is written at the end of every registration, and on 2 CPU
cores matplotlib's import (0.67 s) plus 27 axes (1.0 s to build, draw and save) were a sixth of
a whole ``balanced`` run. Painting the same page into a numpy canvas takes about 0.1 s
(benchmarks/cpu_kernels.py). Every panel is a lookup into a pixel grid, so what a pixel shows
is exact: voxel ``(r, c)`` of a plane covers pixels ``[r * h / rows, (r + 1) * h / rows)``.

Conventions: a canvas is ``(height, width, 3)`` uint8 RGB, ``y`` down; a plane ``(rows, cols)``
is drawn with row 0 at the top (``origin="upper"``) or at the bottom (``"lower"``).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional, Sequence, Tuple

import numpy as np

RGB = Tuple[int, int, int]


# -- colours ------------------------------------------------------------------------------------
def hex_rgb(colour: str) -> RGB:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def _ramp(anchors: Sequence[Tuple[float, str]], n: int = 256) -> np.ndarray:
    """``(n, 3)`` uint8 table interpolated linearly between ``(position, colour)`` anchors."""
    pos = np.array([p for p, _ in anchors])
    cols = np.array([hex_rgb(c) for _, c in anchors], dtype=np.float64)
    t = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(t, pos, cols[:, k]) for k in range(3)], axis=1).round().astype(np.uint8)


#: Grey levels.
GRAY = _ramp([(0.0, "#000000"), (1.0, "#ffffff")])
#: Differences: black through dark red and orange to pale yellow (dark = no difference).
HEAT = _ramp([(0.0, "#000004"), (0.25, "#56106e"), (0.5, "#bb3754"), (0.75, "#f98e09"),
              (1.0, "#fcffa4")])
#: Jacobian: blue below 1 (shrinks), white at 1, red above (grows); ColorBrewer RdBu anchors.
DIVERGING = _ramp([(0.0, "#053061"), (0.15, "#2166ac"), (0.35, "#92c5de"), (0.5, "#f7f7f7"),
                   (0.65, "#f4a582"), (0.85, "#b2182b"), (1.0, "#67001f")])


def apply_lut(values01: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped; NaN as 0) -> ``(..., 3)`` uint8 through a colour table."""
    v = np.nan_to_num(np.asarray(values01, dtype=np.float32), nan=0.0)
    idx = np.clip(v * (len(lut) - 1) + 0.5, 0, len(lut) - 1).astype(np.intp)
    return lut[idx]


def two_slope(values: np.ndarray, vmax: float) -> np.ndarray:
    """``[0, 1] -> [0, 0.5]`` and ``[1, vmax] -> [0.5, 1]`` (a diverging scale centred on 1)."""
    v = np.asarray(values, dtype=np.float32)
    return np.where(v <= 1.0, 0.5 * v, 0.5 + 0.5 * (v - 1.0) / max(vmax - 1.0, 1e-6)).clip(0.0, 1.0)


# -- panels: planes on pixels -------------------------------------------------------------------
def pixel_index(n_px: int, n_vox: int) -> np.ndarray:
    """For each of ``n_px`` pixels, the voxel (of ``n_vox``) whose cell holds its centre."""
    return np.minimum(((np.arange(n_px) + 0.5) * n_vox / n_px).astype(np.intp), n_vox - 1)


def to_pixels(plane: np.ndarray, height: int, width: int, origin: str) -> np.ndarray:
    """Nearest-neighbour resampling of a ``(rows, cols, ...)`` plane to ``(height, width, ...)``,
    row 0 on top for ``origin="upper"``, at the bottom for ``"lower"``."""
    rows, cols = plane.shape[:2]
    r = pixel_index(height, rows)
    if origin == "lower":
        r = r[::-1]
    return plane[r][:, pixel_index(width, cols)]


def coordinates(height: int, width: int, rows: int, cols: int, origin: str) -> Tuple[np.ndarray, np.ndarray]:
    """The continuous voxel ``(row, col)`` at the centre of every pixel ``(height, width)``
    (voxel centres at integers)."""
    r = (np.arange(height) + 0.5) * rows / height - 0.5
    if origin == "lower":
        r = r[::-1]
    c = (np.arange(width) + 0.5) * cols / width - 0.5
    return np.broadcast_to(r[:, None], (height, width)), np.broadcast_to(c[None, :], (height, width))


def bilinear(plane: np.ndarray, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
    """``plane`` ``(rows, cols)`` sampled bilinearly at continuous ``(rr, cc)``, edges clamped."""
    rows, cols = plane.shape
    r = np.clip(rr, 0, rows - 1)
    c = np.clip(cc, 0, cols - 1)
    r0 = np.minimum(np.floor(r).astype(np.intp), max(rows - 2, 0))
    c0 = np.minimum(np.floor(c).astype(np.intp), max(cols - 2, 0))
    r1, c1 = np.minimum(r0 + 1, rows - 1), np.minimum(c0 + 1, cols - 1)
    tr, tc = r - r0, c - c0
    top = plane[r0, c0] * (1 - tc) + plane[r0, c1] * tc
    bottom = plane[r1, c0] * (1 - tc) + plane[r1, c1] * tc
    return top * (1 - tr) + bottom * tr


def level_lines(phi: np.ndarray, first: float, step: float, lo: float, hi: float) -> np.ndarray:
    """Pixels where the field ``phi`` (per pixel) crosses a level ``first + n * step`` that lies
    strictly inside ``(lo, hi)``: a one-pixel line along every such level set."""
    band = np.floor((phi - first) / step)
    line = np.zeros(phi.shape, dtype=bool)
    for a, b, sl_a, sl_b in ((band[:, :-1], band[:, 1:], np.s_[:, :-1], np.s_[:, 1:]),
                             (band[:-1, :], band[1:, :], np.s_[:-1, :], np.s_[1:, :])):
        cross = a != b
        # the level crossed between two neighbours: the larger band's lower edge
        level = first + np.maximum(a, b) * step
        cross &= (level > lo) & (level < hi)
        # mark the pixel whose value lies nearer the level, so a line is one pixel wide
        near_a = np.abs(phi[sl_a] - level) <= np.abs(phi[sl_b] - level)
        line[sl_a] |= cross & near_a
        line[sl_b] |= cross & ~near_a
    return line


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` (bool) grown by ``pixels`` in the four axis directions (a line made wider)."""
    out = np.asarray(mask, dtype=bool)
    for _ in range(max(pixels, 0)):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def blend(canvas: np.ndarray, mask: np.ndarray, colour: RGB, alpha: float = 1.0) -> None:
    """Paint ``colour`` over ``canvas`` ``(h, w, 3)`` where ``mask``, with opacity ``alpha``."""
    if not mask.any():
        return
    c = np.asarray(colour, dtype=np.float32)
    px = canvas[mask].astype(np.float32)
    canvas[mask] = np.clip(px * (1.0 - alpha) + c * alpha + 0.5, 0, 255).astype(np.uint8)


# -- text ---------------------------------------------------------------------------------------
def _font_folder() -> Optional[str]:
    """matplotlib's bundled DejaVu fonts, found without importing matplotlib."""
    try:
        spec = importlib.util.find_spec("matplotlib")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    folder = os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf")
    return folder if os.path.isdir(folder) else None


_FONT_FILES = {(False, False): "DejaVuSans.ttf", (True, False): "DejaVuSans-Bold.ttf",
               (False, True): "DejaVuSansMono.ttf", (True, True): "DejaVuSansMono-Bold.ttf"}


@functools.lru_cache(maxsize=None)
def font(size_px: int, bold: bool = False, mono: bool = False):
    """A TrueType font ``size_px`` pixels high: DejaVu when matplotlib's copy is installed, else
    Pillow's own scalable default, else its bitmap default."""
    from PIL import ImageFont
    folder = _font_folder()
    if folder:
        path = os.path.join(folder, _FONT_FILES[(bold, mono)])
        if os.path.exists(path):
            return ImageFont.truetype(path, size_px)
    try:
        return ImageFont.load_default(size=size_px)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def points(pt: float, dpi: int) -> int:
    """A font size in points -> pixels at ``dpi``."""
    return max(6, int(round(pt * dpi / 72.0)))


def text_size(draw, text: str, fnt) -> Tuple[int, int]:
    box = draw.multiline_textbbox((0, 0), text, font=fnt, spacing=2)
    return box[2] - box[0], box[3] - box[1]


def rotated_text(image, x: int, y_centre: int, text: str, fnt, fill=(0, 0, 0)) -> None:
    """Paste ``text`` turned 90 degrees anticlockwise, its right edge at ``x``, centred on
    ``y_centre`` (a y-axis label)."""
    from PIL import Image, ImageDraw
    probe = ImageDraw.Draw(image)
    w, h = text_size(probe, text, fnt)
    tile = Image.new("L", (w + 4, h + 6), 0)
    ImageDraw.Draw(tile).multiline_text((2, 0), text, font=fnt, fill=255, spacing=2, align="center")
    tile = tile.rotate(90, expand=True)
    colour = Image.new("RGB", tile.size, fill)
    image.paste(colour, (x - tile.size[0], y_centre - tile.size[1] // 2), tile)
