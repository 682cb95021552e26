"""The ``voxelmorph`` method: the shipped diffeomorphic VoxelMorph weights, one forward pass."""
from __future__ import annotations

import torch

from ..modelio import load_model, models_dir
from .base import Method, MethodResult, RunContext


class VoxelMorphMethod(Method):
    def __init__(self, info, device, weights=None, **options):
        super().__init__(info, device, **options)
        path = weights or (models_dir() / f"{info.weights}.pt")
        self.model, card = load_model(path, device=self.device)
        self.weights_path = str(path)
        self.weights_sha256 = card["sha256"]
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
