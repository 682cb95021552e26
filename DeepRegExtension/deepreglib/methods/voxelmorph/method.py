"""The ``voxelmorph`` method: the shipped diffeomorphic VoxelMorph weights, one forward pass."""
from __future__ import annotations

import copy
import weakref

import torch

from ..base import Method, MethodResult, RunContext


class VoxelMorphMethod(Method):
    def __init__(self, info, device, weights=None, **options):
        super().__init__(info, device, **options)
        self.model, _ = self.load_weights(weights)
        self.divisor = self.model.divisor
        # on the CPU, oneDNN's 3D convolutions are faster on channels-last tensors (the forward
        # pass 1.56 s against 1.88 s at 96x112x112 on 2 cores, equal to 1.4e-6; docs/BENCHMARKS.md)
        self.channels_last = torch.device(device).type == "cpu"

    def run(self, fixed, moving, grid, ctx: RunContext) -> MethodResult:
        ctx.check()
        ctx.progress(0.1, "network forward pass")
        with torch.inference_mode():
            model = self.model
            if self.channels_last:
                fmt = torch.channels_last_3d
                model = _channels_last_copy(self.model)
                moving, fixed = moving.contiguous(memory_format=fmt), fixed.contiguous(memory_format=fmt)
            v = model.predict_velocity(moving, fixed).contiguous()
            ctx.check()
            ctx.progress(0.6, "integrating the velocity field")
            u = self.model.velocity_to_displacement(v, fixed.shape[2:])
        ctx.progress(1.0, "network done")
        return MethodResult(displacement=u, velocity=v,
                            info={"int_steps": self.model.int_steps,
                                  "int_downsize": self.model.int_downsize})


#: loaded model -> its channels-last copy (the loaded model may be cached and shared, so it is not
#: changed in place; the copy goes when the model does)
_CHANNELS_LAST: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def _channels_last_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its 5D weights in channels-last order, made once per loaded model."""
    if model not in _CHANNELS_LAST:
        _CHANNELS_LAST[model] = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    return _CHANNELS_LAST[model]
