"""The ``carnet`` method: CAR-Net weights, the posterior-mean field and its explanation maps.

Options (constructor keywords, overridden by ``RunContext.options``):
    uncertainty_samples: posterior draws for the uncertainty map (default 8; 0 skips the map).
    seed: seed of those draws (default 0), so a run is reproducible.
    query_point: optional fixed-image point, LPS mm ``(x, y, z)``: adds the ``query_attention`` map.
"""
from __future__ import annotations

import numpy as np
import torch

from ...core.errors import BadInputError
from ..base import Method, MethodResult, RunContext


class CarNetMethod(Method):
    OPTIONS = ("uncertainty_samples", "seed", "query_point")

    def __init__(self, info, device, weights=None, **options):
        super().__init__(info, device, **options)
        self.model, _ = self.load_weights(weights, ("CarNet",), "CAR-Net weights")
        self.divisor = self.model.divisor

    def _options(self, ctx: RunContext) -> dict:
        opts = {"uncertainty_samples": 8, "seed": 0, "query_point": None}
        opts.update(self.options)
        opts.update(ctx.options or {})
        samples = int(opts["uncertainty_samples"])
        if samples == 1 or samples < 0:
            raise BadInputError(f"uncertainty_samples must be 0 (off) or >= 2, got {samples}")
        return opts

    def run(self, fixed, moving, grid, ctx: RunContext) -> MethodResult:
        """Volumes (network grid, ``(1, 1, D, H, W)``):

        * ``attention_fixed``, ``attention_moving``: co-attention gates averaged over channels,
          in (0, 1). The moving map is on the moving image as the network saw it (resampled onto
          the network grid through the initial transform, not warped).
        * ``uncertainty_mm``: voxelwise std of the displacement over posterior draws, in mm.
        * ``query_attention`` (with ``query_point``): where in the moving image that fixed point
          attends, a density per voxel.
        """
        opts = self._options(ctx)
        model = self.model
        shape = tuple(fixed.shape[2:])
        ctx.check()
        ctx.progress(0.05, "network forward pass")
        with torch.inference_mode():
            mean, log_var, co = model.posterior(moving, fixed)
            ctx.check()
            ctx.progress(0.3, "integrating the velocity field")
            u = model.velocity_to_displacement(mean, shape)
            volumes = {"attention_fixed": model.gate_map(co.gate_fix, shape),
                       "attention_moving": model.gate_map(co.gate_mov, shape)}
            info = {"int_steps": model.int_steps, "velocity_grid": list(mean.shape[2:]),
                    "attention_grid": list(co.gate_fix.shape[2:]),
                    "attention_strength": {"a1_moving": float(model.coattention.a1),
                                           "a2_fixed": float(model.coattention.a2)}}
            samples = int(opts["uncertainty_samples"])
            if samples:
                gen = torch.Generator(device=mean.device).manual_seed(int(opts["seed"]))

                def step(i, n):
                    ctx.check()
                    ctx.progress(0.4 + 0.5 * i / n, f"uncertainty: posterior sample {i}/{n}")
                volumes["uncertainty_mm"] = model.displacement_spread(
                    mean, log_var, shape, samples, gen, tuple(grid.spacing_kji), step)
                info.update(uncertainty_samples=samples, uncertainty_seed=int(opts["seed"]),
                            uncertainty_mm_max=float(volumes["uncertainty_mm"].max()))
            if opts["query_point"] is not None:
                point = np.asarray(opts["query_point"], dtype=np.float64).reshape(-1)
                if point.size != 3:
                    raise BadInputError(f"query_point must be 3 numbers (x, y, z) in LPS mm, got {point}")
                idx = grid.physical_to_index(point)
                if any(not -0.5 <= c <= n - 0.5 for c, n in zip(idx, shape)):
                    raise BadInputError(f"query_point {point.tolist()} (LPS mm) is outside the fixed image")
                volumes["query_attention"] = model.query_attention(moving, fixed, idx.tolist())
                info.update(query_point_lps=point.tolist(),
                            query_feature_index=list(model.feature_index(idx.tolist(), shape)))
        ctx.progress(1.0, "network done")
        return MethodResult(displacement=u, velocity=mean, volumes=volumes, info=info)
