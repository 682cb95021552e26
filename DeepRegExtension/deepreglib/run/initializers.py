"""The ``--init`` choices of a run: the classic ones (:mod:`deepreglib.classic.initial`) and the
learned ones the methods' specs offer (``--init dnet``, ``same-affine``, and each refined by the
iterative registration, ``dnet+rigid``, ``same-affine+affine``), registered with
:func:`deepreglib.classic.initial.register_initializer` when their weights are shipped.

Nothing is registered at import: :func:`register_learned_initializers` does it, and
:func:`init_choices` calls it.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import List, Optional

from ..classic.initial import INITIALIZERS, register_initializer
from ..io.models import models_dir
from ..methods.registry import learned_initializers, resolve


def refined(first, second: str):
    """``first`` (an initializer), then the iterative initializer ``second`` started from its
    matrix (``init=``). ``options`` go to ``second`` (e.g. ``similarity="mi"``); progress is
    30 % / 70 %."""
    def run(fixed, fixed_grid, moving, moving_grid, device="cpu", progress=None, cancel=None, **options):
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
    :func:`deepreglib.io.models.models_dir`), and its refined form (``NAME+rigid`` or
    ``NAME+affine``); returns the names registered."""
    folder = Path(folder) if folder is not None else models_dir()
    names = []
    for name, spec in learned_initializers().items():
        path = next((folder / f"{stem}.pt" for stem in spec.weights if (folder / f"{stem}.pt").is_file()), None)
        if path is None:
            continue
        learned = partial(resolve(spec.function), weights=path)
        register_initializer(name, learned)
        names.append(name)
        if spec.refined_by:
            register_initializer(f"{name}+{spec.refined_by}", refined(learned, spec.refined_by))
            names.append(f"{name}+{spec.refined_by}")
    return names


def init_choices() -> tuple:
    """Every ``--init`` name: the classic ones plus learned initialisers whose weights are shipped."""
    register_learned_initializers()
    return tuple(INITIALIZERS)
