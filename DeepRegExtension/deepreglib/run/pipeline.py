"""One registration run, as named stages (docs/ARCHITECTURE.md)::

    load -> align -> infer [-> refine] -> to_fixed_grid -> write

The transform a run returns maps fixed points to moving points (ITK resampling convention)::

    phi(p) = A(p + u(p))

with ``A`` the initial (or rigid/affine method's) 4x4 physical map and ``u`` the deformable
method's field, in LPS mm on the fixed grid. Deformable runs export ``phi - id`` as one ITK
displacement field on the fixed grid; rigid/affine runs export ``A`` as an ITK affine transform.
Conventions: docs/CONVENTIONS.md and :mod:`deepreglib.core.conventions`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ..io.progress import Reporter
from ..methods.registry import get_method_info
from .align import align
from .infer import infer
from .load import load
from .options import RegisterOptions, apply_preset, check_options, resolve_device
from .scores import scores
from .session import Session
from .to_fixed_grid import to_fixed_grid
from .write import write


def register(opts: RegisterOptions, reporter: Optional[Reporter] = None,
             cancel: Callable[[], bool] = lambda: False) -> Path:
    """Run one registration; returns the path of the written ``manifest.json``.

    Raises BadInputError (exit 2) for input the user can fix, CancelledError (exit 3) when
    ``cancel()`` turns True or SIGTERM arrives; nothing is left in ``opts.out`` unless the run
    completed (outputs are written to a temporary folder and renamed at the end).
    """
    session = Session(reporter, cancel)
    opts = apply_preset(opts)
    info = get_method_info(opts.method)
    check_options(opts)
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    inputs = load(opts, session)
    matrix = align(opts, inputs, session, device)
    inference = infer(opts, inputs, matrix, session, device)
    with session.stage("postprocess"):
        fx = to_fixed_grid(inputs, matrix, inference, deformable=info.kind == "deformable")
        session.check()
        metrics = scores(inputs, fx)
    return write(opts, info, inputs, inference, fx, metrics, session)
