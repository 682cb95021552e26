"""The numbers of a run's manifest: similarity before and after, the transform's regularity, and
Dice and landmark errors when labels and landmarks were given."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from ..core.jacobian import folding_fraction, std_log_jacobian
from ..core.metrics import dice_per_label, ncc_metric
from ..core.resample import resample_to_grid
from ..core.warp import sample_at
from .load import Inputs
from .to_fixed_grid import FixedGridResult


def scores(inputs: Inputs, fx: FixedGridResult) -> Dict[str, object]:
    jac = fx.jacobian
    m = {"ncc_before": ncc_metric(inputs.fixed, fx.before), "ncc_after": ncc_metric(inputs.fixed, fx.warped),
         "folding_percent": 100.0 * folding_fraction(jac), "sdlogj": std_log_jacobian(jac),
         "jacobian_min": float(jac.min()), "jacobian_max": float(jac.max())}
    if fx.u_mm is not None:
        m["max_displacement_mm"] = float((fx.u_mm * fx.u_mm).sum(dim=1).max().sqrt())
    if "fixed_labels" in inputs.labels and "moving_labels" in inputs.labels:
        m.update(_dice(inputs, fx))
    if inputs.landmarks:
        m.update(_landmark_errors(inputs, fx))
    return m


def _dice(inputs: Inputs, fx: FixedGridResult) -> Dict[str, object]:
    grid = inputs.fixed_grid
    fl = resample_to_grid(*inputs.labels["fixed_labels"], grid, interpolation="nearest").round().long()
    ml, mg = inputs.labels["moving_labels"]
    lab_before = resample_to_grid(ml, mg, grid, interpolation="nearest").round().long()
    lab_after = resample_to_grid(ml, mg, grid, matrix_lps=fx.matrix, displacement_mm=fx.u_mm,
                                 interpolation="nearest").round().long()
    d0 = dice_per_label(fl, lab_before)
    d1 = dice_per_label(fl, lab_after)
    return {"dice_before": {str(k): v for k, v in d0.items()},
            "dice_after": {str(k): v for k, v in d1.items()},
            "dice_mean_before": float(np.nanmean(list(d0.values()))) if d0 else None,
            "dice_mean_after": float(np.nanmean(list(d1.values()))) if d1 else None}


def _landmark_errors(inputs: Inputs, fx: FixedGridResult) -> Dict[str, float]:
    p = inputs.landmarks["fixed_landmarks"]
    q = inputs.landmarks["moving_landmarks"]
    idx = torch.as_tensor(inputs.fixed_grid.physical_to_index(p).T.reshape(1, 3, -1, 1, 1), dtype=torch.float64)
    disp = sample_at(fx.total_mm, idx, "linear", "border")[0, :, :, 0, 0].T.numpy()
    mapped = p + disp
    return {"tre_before_mm": float(np.linalg.norm(p - q, axis=1).mean()),
            "tre_after_mm": float(np.linalg.norm(mapped - q, axis=1).mean())}
