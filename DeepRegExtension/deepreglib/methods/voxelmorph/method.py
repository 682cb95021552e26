"""The ``voxelmorph`` method: the shipped diffeomorphic VoxelMorph weights, one forward pass."""
from __future__ import annotations

import torch

from ..base import Method, MethodResult, RunContext


class VoxelMorphMethod(Method):
    def __init__(self, info, device, weights=None, **options):
        super().__init__(info, device, **options)
        self.model, _ = self.load_weights(weights)
        self.divisor = self.model.divisor

    def run(self, fixed, moving, grid, ctx: RunContext) -> MethodResult:
        ctx.check()
        ctx.progress(0.1, "network forward pass")
        with torch.inference_mode():
            v = self.model.predict_velocity(moving, fixed)
            ctx.check()
            ctx.progress(0.6, "integrating the velocity field")
            u = self.model.velocity_to_displacement(v, fixed.shape[2:])
        ctx.progress(1.0, "network done")
        return MethodResult(displacement=u, velocity=v,
                            info={"int_steps": self.model.int_steps,
                                  "int_downsize": self.model.int_downsize})
