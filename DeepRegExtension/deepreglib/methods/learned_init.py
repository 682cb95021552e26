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
from ..protocol import REFINED_BY, learned_initialization_weights
from .dnet import dnet_initializer
from .same import same_affine_initializer

#: ``--init`` name -> initializer; which weights each one uses, and which iterative
#: initializer polishes its result (:data:`REFINED_BY`), is the protocol's table, which the Slicer
#: module reads too (:data:`deepreglib.protocol.LEARNED_INITIALIZER_WEIGHTS`)
LEARNED_INITIALIZERS = {"dnet": dnet_initializer, "same-affine": same_affine_initializer}


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
    weights = learned_initialization_weights(folder)
    for name, fn in LEARNED_INITIALIZERS.items():
        if name in weights:
            learned = partial(fn, weights=weights[name])
            polished = f"{name}+{REFINED_BY[name]}"
            register_initializer(name, learned)
            register_initializer(polished, refined(learned, REFINED_BY[name]))
            names += [name, polished]
    return names


register_learned_initializers()
