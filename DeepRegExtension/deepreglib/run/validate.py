"""Validation of a trained model on the training cache's ``val`` split (issue 17's campaign):
the method as it runs at inference (:meth:`Method.run`, images only), on fixed pairs of unseen
subjects already aligned affinely by the cache, scored by the Dice of their label maps."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from ..core.jacobian import folding_fraction, jacobian_determinant
from ..core.metrics import dice_per_label
from ..core.warp import warp
from ..train.cache import load_cache


def validation_pairs(n: int, count: int):
    """``count`` ordered pairs ``(i, j)``, ``i != j``, of ``n`` subjects, the same every time."""
    pairs = [(i, (i + s) % n) for s in range(1, n) for i in range(n)]
    return pairs[:count]


def validate(method: str, weights: Optional[str], cache, pairs: int = 10, device="cpu") -> Dict[str, float]:
    """Mean label Dice (over labels present, then pairs) and folding percent of ``method`` with
    ``weights`` (``None``: the shipped ones) on ``pairs`` pairs of the cache's ``val`` split; also
    the Dice of the affine alignment alone, the baseline every network must beat."""
    from ..methods.base import RunContext
    from ..methods.registry import create_method
    subjects, grid = load_cache(cache, "val")
    subjects = [s for s in subjects if s.labels is not None]
    if len(subjects) < 2:
        raise ValueError(f"{cache} has fewer than 2 labelled val subjects")
    options = {"weights": weights} if weights else {}
    m = create_method(method, torch.device(device), **options)
    before, after, folding = [], [], []
    with torch.no_grad():
        for i, j in validation_pairs(len(subjects), pairs):
            f, mv = subjects[i], subjects[j]
            res = m.run(f.image.to(device), mv.image.to(device), grid, RunContext())
            if res.displacement is None:
                raise ValueError(f"{method} gives no displacement field; validate a deformable method")
            u = res.displacement.to("cpu", torch.float32)
            warped = warp(mv.labels.float(), u, "nearest")
            before.append(np.mean(list(dice_per_label(f.labels, mv.labels).values())))
            after.append(np.mean(list(dice_per_label(f.labels, warped.long()).values())))
            folding.append(100.0 * folding_fraction(jacobian_determinant(u)))
    return {"pairs": len(after), "dice_affine": float(np.mean(before)), "dice": float(np.mean(after)),
            "folding_percent": float(np.mean(folding))}
