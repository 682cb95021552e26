"""``--init dnet`` and ``--init same-affine`` (and ``dnet+rigid``, ``same-affine+affine``, each
refined by the iterative registration): learned initializers, registered with
:func:`deepreglib.align.register_initializer` only when their weights are shipped.

Importing this module registers whatever is available (call :func:`register_learned_initializers`
again after adding weights, or with another folder).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import List, Optional

from ..align import register_initializer
from ..modelio import models_dir
from .dnet import WEIGHTS_STEM as DNET_STEM, dnet_initializer
from .same import SAM_WEIGHTS_STEM, WEIGHTS_STEM as SAME_STEM, same_affine_initializer

#: ``--init`` name -> (initializer, model file stems it can use, first found wins)
LEARNED_INITIALIZERS = {
    "dnet": (dnet_initializer, (DNET_STEM,)),
    "same-affine": (same_affine_initializer, (SAM_WEIGHTS_STEM, SAME_STEM)),
}


#: learned initializer -> the iterative one that polishes its result: ``--init dnet+rigid`` is
#: D-Net's pose (any rotation, coarse) refined by the engine's multi-resolution rigid
#: registration started from it (precise, but only within its capture range of about +-70 deg)
REFINED_BY = {"dnet": "rigid", "same-affine": "affine"}


def refined(first, second: str):
    """``first`` (an initializer), then the iterative initializer ``second`` started from its
    matrix (``init=``). ``options`` go to ``second`` (e.g. ``similarity="mi"``); progress is
    30 % / 70 %."""
    def run(fixed, fixed_grid, moving, moving_grid, device="cpu", progress=None, cancel=None, **options):
        from ..align import INITIALIZERS

        def part(lo, hi):
            if progress is None:
                return None
            return lambda f, message="": progress(lo + (hi - lo) * f, message)
        start = first(fixed, fixed_grid, moving, moving_grid, device=device, progress=part(0.0, 0.3), cancel=cancel)
        return INITIALIZERS[second](fixed, fixed_grid, moving, moving_grid, device=device,
                                    progress=part(0.3, 1.0), cancel=cancel, init=start, **options)
    return run


def register_learned_initializers(folder: Optional[Path] = None) -> List[str]:
    """Register each learned initializer whose weights file exists in ``folder`` (default
    :func:`deepreglib.modelio.models_dir`), and its refined form (``NAME+rigid`` or
    ``NAME+affine``, :data:`REFINED_BY`); returns the names registered."""
    folder = Path(folder) if folder is not None else models_dir()
    names = []
    for name, (fn, stems) in LEARNED_INITIALIZERS.items():
        for stem in stems:
            path = folder / f"{stem}.pt"
            if path.is_file():
                learned = partial(fn, weights=path)
                register_initializer(name, learned)
                register_initializer(f"{name}+{REFINED_BY[name]}", refined(learned, REFINED_BY[name]))
                names += [name, f"{name}+{REFINED_BY[name]}"]
                break
    return names


register_learned_initializers()
