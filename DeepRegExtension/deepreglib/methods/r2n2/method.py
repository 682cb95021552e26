"""The ``r2n2`` method: a trained R2N2 network builds the field as a sequence of local Gaussian
deformations, stopping early when further steps stop improving the match.

Besides the field, a run gives the deformations themselves (a Slicer point list with the
ellipsoid axes, extents and weight vectors) and a step-by-step play-back (a Slicer volume
sequence of the moving image warped after each step); see :mod:`.r2n2_outputs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from ...core.geometry import Grid
from .network import AdaptiveStop
from .gaussians import transformation_parameter_count
from ...io.protocol import grid_entry
from ..base import Method, MethodResult, RunContext
from .outputs import (cumulative_frames, describe_deformations, write_deformations_markups,
                           write_volume_sequence)

#: Default relative gain over ``stop_window`` steps below which inference stops.
DEFAULT_STOP_THRESHOLD = 0.005
MARKUPS_FILE = "r2n2_deformations.mrk.json"
SEQUENCE_FILE = "r2n2_steps.seq.nrrd"


@dataclass
class R2N2Result(MethodResult):
    """:class:`MethodResult` plus R2N2's explanation outputs.

    Attributes:
        deformations: :func:`~.r2n2_outputs.describe_deformations` of the steps taken.
        sequence: ``(steps + 1, D, H, W)`` play-back frames on ``grid``: the moving image, then the
            moving image warped by each cumulative field ``f_1..f_T`` (``None``: not asked for).
        grid: the network grid the frames and the field live on.
    """

    deformations: List[Dict[str, object]] = field(default_factory=list)
    sequence: Optional[torch.Tensor] = None
    grid: Optional[Grid] = None

    def write_files(self, folder: Union[str, Path]) -> List[Dict[str, object]]:
        """Write the point list and the play-back into ``folder``; returns manifest entries
        (``name``, ``kind``, ``path`` relative to ``folder``, ``grid``, ``description``)."""
        folder = Path(folder)
        entries = []
        if self.deformations:
            write_deformations_markups(folder / MARKUPS_FILE, self.deformations)
            entries.append({"name": "r2n2_deformations", "kind": "markups", "path": MARKUPS_FILE, "grid": None,
                            "description": "R2N2 local deformations: centres (LPS mm), ellipsoid axes and "
                                           "extents, weight vectors, in the order applied"})
        if self.sequence is not None and self.grid is not None:
            write_volume_sequence(folder / SEQUENCE_FILE, self.sequence, self.grid)
            entries.append({"name": "r2n2_steps", "kind": "volume_sequence", "path": SEQUENCE_FILE,
                            "grid": grid_entry(self.grid),
                            "description": "moving image (intensities normalised to [0, 1], network grid) "
                                           "warped after each step; frame 0 is before any step"})
        return entries


class R2N2Method(Method):
    """Options: ``max_steps`` (default: the T the model was trained with), ``stop_threshold``
    (relative dissimilarity gain over ``stop_window`` steps; ``None`` or 0 disables the adaptive
    stop), ``stop_window`` (3), ``stop_similarity`` (default: the training similarity),
    ``sequence`` (write the play-back frames, default True)."""

    divisor = 8

    OPTIONS = ("max_steps", "stop_threshold", "stop_window", "stop_similarity", "sequence")

    def __init__(self, info, device, weights=None, **options):
        super().__init__(info, device, **options)
        self.model, _ = self.load_weights(weights)
        self.max_steps = int(options.get("max_steps") or self.model.steps)
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        threshold = options.get("stop_threshold", DEFAULT_STOP_THRESHOLD)
        window = int(options.get("stop_window", 3))
        self.stop = (AdaptiveStop(float(threshold), window, window, options.get("stop_similarity"))
                     if threshold else None)
        self.sequence = bool(options.get("sequence", True))

    def run(self, fixed, moving, grid: Grid, ctx: RunContext) -> R2N2Result:
        ctx.check()

        def on_step(t, total):
            ctx.progress(0.05 + 0.85 * t / total, f"local deformation {t} of at most {total}")
            ctx.check()

        with torch.inference_mode():
            out = self.model(moving, fixed, steps=self.max_steps, stop=self.stop, on_step=on_step)
            ctx.progress(0.92, "describing the local deformations")
            deformations = describe_deformations(out.parameters, grid, certainty=out.position_certainty)
            frames = cumulative_frames(moving, out.parameters).cpu() if self.sequence else None
        info = {"steps_used": out.steps, "max_steps": self.max_steps, "stopped_early": out.stopped_early,
                "stop": (None if self.stop is None else
                         {"threshold": self.stop.threshold, "window": self.stop.window,
                          "similarity": self.stop.similarity or self.model.similarity}),
                "transformation_parameters": transformation_parameter_count(out.steps)}
        if out.dissimilarity is not None:
            info["dissimilarity_per_step"] = [float(x) for x in out.dissimilarity[0]]
        ctx.progress(1.0, f"network done after {out.steps} steps")
        return R2N2Result(displacement=out.displacement, info=info, deformations=deformations,
                          sequence=frames, grid=grid)
