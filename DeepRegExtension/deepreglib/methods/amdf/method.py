"""The ``amdf`` method: ROI masks, multi-scale fields fused by DFSA, and their explanation maps."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.conventions import ALIGN_CORNERS
from ...core.fields import resize_field
from ..base import Method, MethodResult, RunContext


class AmdfMethod(Method):
    def __init__(self, info, device, weights=None, **options):
        super().__init__(info, device, **options)
        self.model, _ = self.load_weights(weights, ("AMDF",), "AMDF weights")
        self.divisor = self.model.divisor

    def run(self, fixed, moving, grid, ctx: RunContext) -> MethodResult:
        """Volumes (network grid, ``(1, 1, D, H, W)``), ``s`` = a scale's downsampling factor:

        * ``roi_mask_fixed``, ``roi_mask_moving``: the 0/1 masks the inputs were multiplied by
          (the moving one on the moving image as the network saw it, not warped).
        * ``fusion_weight_s{s}`` (s = 1, 2, 4): DFSA weight in (0, 1), averaged over the three
          components, with which the coarser fused field enters scale ``s``.
        * ``field_s{s}_mm`` (s = 1, 2, 4, 8): length in mm of that scale's own branch field
          ``DF_k`` (before fusion), upsampled to the network grid.
        """
        shape = tuple(fixed.shape[2:])
        spacing = torch.as_tensor(grid.spacing_kji, dtype=fixed.dtype, device=fixed.device).view(1, 3, 1, 1, 1)
        ctx.check()
        ctx.progress(0.1, "segmentation and network forward pass")
        with torch.inference_mode():
            out = self.model(moving, fixed)
            ctx.check()
            ctx.progress(0.7, "explanation maps")
            volumes = {"roi_mask_fixed": out.mask_fixed, "roi_mask_moving": out.mask_moving}
            for k, w in enumerate(out.weights):
                volumes[f"fusion_weight_s{2 ** k}"] = F.interpolate(
                    w.mean(1, keepdim=True), size=shape, mode="trilinear", align_corners=ALIGN_CORNERS)
            for k, df in enumerate(out.fields):
                u = resize_field(df, shape) * spacing
                volumes[f"field_s{2 ** k}_mm"] = u.norm(dim=1, keepdim=True)
            info = {"scales": [2 ** k for k in range(len(out.fields))],
                    "use_masks": bool(self.model.use_masks),
                    "roi_fraction": {"fixed": float(out.mask_fixed.mean()),
                                     "moving": float(out.mask_moving.mean())},
                    "fusion_weight_mean": {f"s{2 ** k}": float(w.mean()) for k, w in enumerate(out.weights)},
                    "field_max_mm": {f"s{2 ** k}": float(volumes[f"field_s{2 ** k}_mm"].max())
                                     for k in range(len(out.fields))}}
        ctx.progress(1.0, "network done")
        return MethodResult(displacement=out.displacement, volumes=volumes, info=info)
