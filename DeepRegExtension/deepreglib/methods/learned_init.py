"""``--init dnet`` and ``--init same-affine``: learned initializers, registered with
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


def register_learned_initializers(folder: Optional[Path] = None) -> List[str]:
    """Register each learned initializer whose weights file exists in ``folder`` (default
    :func:`deepreglib.modelio.models_dir`); returns the names registered."""
    folder = Path(folder) if folder is not None else models_dir()
    names = []
    for name, (fn, stems) in LEARNED_INITIALIZERS.items():
        for stem in stems:
            path = folder / f"{stem}.pt"
            if path.is_file():
                register_initializer(name, partial(fn, weights=path))
                names.append(name)
                break
    return names


register_learned_initializers()
