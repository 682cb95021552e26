"""What every registration method implements. Conventions: :mod:`deepreglib.core.conventions`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from ..core.errors import BadInputError, CancelledError
from ..core.geometry import Grid
from ..core.preprocess import network_grid
from .weights import load_network, shipped_weights


@dataclass
class RunContext:
    """Callbacks and options handed to :meth:`Method.run`.

    ``progress(fraction, message)`` reports progress of the method's own stage (0..1);
    ``cancel()`` returns True when the user asked to stop (methods call :meth:`check`).
    """

    progress: Callable[[float, str], None] = lambda f, m="": None
    cancel: Callable[[], bool] = lambda: False
    options: Dict[str, object] = field(default_factory=dict)

    def check(self) -> None:
        if self.cancel():
            raise CancelledError("registration cancelled")


@dataclass
class MethodResult:
    """A method's answer on its network grid.

    Attributes:
        displacement: ``(1, 3, D, H, W)`` voxel DDF on the network grid (deformable methods);
            ``warped = moving(x + u(x))``.
        velocity: ``(1, 3, d, h, w)`` SVF when the method is diffeomorphic (enables the exact
            inverse and refinement from the network's answer), voxels of its own grid.
        matrix: 4x4 physical (LPS) map fixed point -> moving point (rigid/affine methods).
        volumes: extra scalar maps ``(1, 1, D, H, W)`` on the network grid (attention, ROI
            masks, uncertainty); written resampled to the fixed grid.
        info: small JSON-able facts for the manifest.
    """

    displacement: Optional[torch.Tensor] = None
    velocity: Optional[torch.Tensor] = None
    matrix: Optional[np.ndarray] = None
    volumes: Dict[str, torch.Tensor] = field(default_factory=dict)
    info: Dict[str, object] = field(default_factory=dict)

    def write_files(self, folder) -> list:
        """Write method-specific outputs (point lists, sequences) into ``folder``; return their
        manifest entries (``name``, ``kind``, ``path`` relative to ``folder``, ``description``).
        The run's common outputs are written by the pipeline; most methods add nothing here."""
        return []


class Method:
    """Base class: a method sees the fixed and moving images already resampled onto the grid it
    asked for (:meth:`grid_for`) and intensity-normalised to [0, 1]."""

    #: longest side of the network grid, in voxels
    max_size = 112
    #: multiple every network-grid size must be
    divisor = 16

    #: names of the options (``--method-option KEY=VALUE``) the method reads from ``self.options``
    OPTIONS: tuple = ()

    def __init__(self, info, device: torch.device, **options):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            name = getattr(info, "name", type(self).__name__)
            raise BadInputError(f"method {name!r} has no option {', '.join(unknown)}; its options are: "
                                f"{', '.join(self.OPTIONS) or 'none'}")
        self.info = info
        self.device = torch.device(device)
        self.options = options
        self.weights_path = None
        self.weights_sha256 = None

    def load_weights(self, weights=None, networks: Sequence[str] = (), what: str = "",
                     default_stem: str = "", cached: bool = False):
        """Load the method's network: ``weights`` (a ``.pt`` path) or the shipped
        ``info.weights`` (``default_stem`` when the method runs without registry info); check it
        is one of ``networks``; record path and checksum for the manifest. Returns ``(model, card)``."""
        stem = getattr(self.info, "weights", None) or default_stem
        path = Path(weights) if weights else shipped_weights(stem)
        model, card = load_network(path, self.device, networks, what, cached)
        self.weights_path = str(path)
        self.weights_sha256 = card["sha256"]
        return model, card

    def grid_for(self, fixed: Grid) -> Grid:
        return network_grid(fixed, self.max_size, self.divisor)

    def run(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid, ctx: RunContext) -> MethodResult:
        raise NotImplementedError
