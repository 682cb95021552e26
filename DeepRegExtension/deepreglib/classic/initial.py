"""The ``--init`` step: every initial alignment by name, and the registry that learned
initialisers join (:func:`register_initializer`).

Each entry returns a 4x4 LPS matrix (fixed -> moving points, :mod:`deepreglib.classic.align`'s
convention). The classical ones live in :mod:`~deepreglib.classic.align` (centre of mass,
moments, rigid, affine) and :mod:`~deepreglib.classic.auto` (the default ``auto``); this module
only names them, so that neither imports the other's dispatcher.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from ..core.errors import BadInputError
from ..core.geometry import Grid
from .align import (CancelFn, ProgressFn, affine_register, box_centres_transform, center_of_mass_transform,
                    check_cancel, moments_transform)
from .auto import auto_transform


# -- the --init dispatcher -------------------------------------------------------------------
def _none(fixed, fixed_grid, moving, moving_grid, **_):
    return np.eye(4)


def _center(fixed, fixed_grid, moving, moving_grid, device="cpu", **_):
    return center_of_mass_transform(fixed, fixed_grid, moving, moving_grid, device=device)


def _box_centres(fixed, fixed_grid, moving, moving_grid, **_):
    return box_centres_transform(fixed_grid, moving_grid)


def _moments_init(fixed, fixed_grid, moving, moving_grid, device="cpu", **_):
    return moments_transform(fixed, fixed_grid, moving, moving_grid, device=device)


def _auto(fixed, fixed_grid, moving, moving_grid, device="cpu", progress=None, cancel=None,
          init=None, **options):
    return auto_transform(fixed, fixed_grid, moving, moving_grid, device=device, progress=progress,
                          cancel=cancel, init=init, **options)


def _optimised(rigid: bool):
    def run(fixed, fixed_grid, moving, moving_grid, device="cpu", progress=None, cancel=None,
            init=None, **options):
        start = init if init is not None else center_of_mass_transform(
            fixed, fixed_grid, moving, moving_grid, device=device)
        return affine_register(fixed, fixed_grid, moving, moving_grid, init=start, rigid=rigid,
                               progress=progress, cancel=cancel, device=device, **options)
    return run


#: ``--init`` name -> ``fn(fixed, fixed_grid, moving, moving_grid, device=..., progress=...,
#: cancel=..., **options) -> 4x4``. ``auto`` (:mod:`deepreglib.classic.auto`, the default: a
#: search over starting poses, rigid then affine on coarse levels, with a quality check),
#: ``affine`` and ``rigid`` start from ``init=`` (a 4x4) when given, else from the centre of
#: mass (``auto``: from its own search). ``box-centres`` matches the centres of the two images'
#: boxes (what ``auto`` does for a small field of view of different contrasts: run/align.py).
#: Learned initialisers are added with :func:`register_initializer`.
INITIALIZERS: Dict[str, Callable[..., np.ndarray]] = {
    "auto": _auto,
    "none": _none,
    "center": _center,
    "box-centres": _box_centres,
    "moments": _moments_init,
    "affine": _optimised(rigid=False),
    "rigid": _optimised(rigid=True),
}


def register_initializer(name: str, fn: Callable[..., np.ndarray]) -> None:
    """Add an ``--init`` choice (e.g. a learned affine network) with the signature of
    :data:`INITIALIZERS`'s values."""
    if not name or not callable(fn):
        raise ValueError("an initializer needs a name and a callable")
    INITIALIZERS[name] = fn


def initial_transform(kind: str, fixed, fixed_grid: Grid, moving, moving_grid: Grid,
                      device="cpu", progress: ProgressFn = None, cancel: CancelFn = None,
                      **options) -> np.ndarray:
    """The ``--init`` step: a 4x4 LPS matrix (fixed -> moving points) by the named method.

    ``options`` go to the method (e.g. ``similarity="mi"`` for ``affine``/``rigid``).
    """
    if kind not in INITIALIZERS:
        raise BadInputError(f"--init must be one of {sorted(INITIALIZERS)}, got {kind!r}")
    check_cancel(cancel, "initial alignment")
    out = INITIALIZERS[kind](fixed, fixed_grid, moving, moving_grid, device=device,
                             progress=progress, cancel=cancel, **options)
    out = np.asarray(out, dtype=np.float64)
    if out.shape != (4, 4) or not np.all(np.isfinite(out)):
        raise ValueError(f"initializer {kind!r} returned an invalid matrix: {out}")
    return out
