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


def validate_pose(weights: Optional[str], cache, poses: int = 40, device="cpu") -> Dict[str, float]:
    """D-Net's rotation error on ``poses`` new rigid poses over the full range (angle uniform in
    (-180, 180) degrees about a uniform axis) of the cache's ``val`` subjects, unseen in training:
    each a whole scan on the network's cube, laid out in the model card's ``grid_direction`` as
    inference shows it (:func:`~deepreglib.methods.dnet.training.pose_errors`); the same poses
    every time. ``weights`` ``None``: the shipped ones."""
    from ..core.geometry import reorient_volume
    from ..methods.dnet.method import WEIGHTS_STEM, cube_direction, load_dnet
    from ..methods.dnet.training import pose_errors
    from ..methods.weights import shipped_weights
    model, card = load_dnet(weights or shipped_weights(WEIGHTS_STEM), torch.device(device))
    subjects, grid = load_cache(cache, "val")
    vols = [reorient_volume(s.image, grid.direction, cube_direction(card)).contiguous() for s in subjects]
    # pose s shows subject s mod n (not a random one): every subject gets the same share
    found = {"true_deg": [], "error_deg": [], "translation_error": []}
    for s in range(poses):
        r = pose_errors(model, [vols[s % len(vols)]], (model.input_size,) * 3, 1, seed=10_000 + s)
        for k in found:
            found[k].extend(r[k].tolist())
    err = np.asarray(found["error_deg"])
    return {"poses": int(err.size), "subjects": len(vols),
            "rotation_median_deg": float(np.median(err)), "rotation_p90_deg": float(np.percentile(err, 90)),
            "within_10_percent": float(100.0 * np.mean(err <= 10.0)),
            "translation_error_median": float(np.median(found["translation_error"]))}
