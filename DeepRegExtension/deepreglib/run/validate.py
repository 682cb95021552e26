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


def validate(method: str, weights: Optional[str], cache, pairs: int = 10, device="cpu",
             options: Optional[Dict[str, object]] = None) -> Dict[str, float]:
    """Mean label Dice (over labels present, then pairs) and folding percent of ``method`` with
    ``weights`` (``None``: the shipped ones) on ``pairs`` pairs of the cache's ``val`` split; also
    the Dice of the affine alignment alone, the baseline every network must beat."""
    from ..methods.base import RunContext
    from ..methods.registry import create_method
    subjects, grid = load_cache(cache, "val")
    subjects = [s for s in subjects if s.labels is not None]
    if len(subjects) < 2:
        raise ValueError(f"{cache} has fewer than 2 labelled val subjects")
    options = {**(options or {}), **({"weights": weights} if weights else {})}  # e.g. SAME's steps
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


def native_views(paths, size: int, direction) -> list:
    """Scans as D-Net's inference shows a fixed image: each file read with its header, normalised
    and resampled in physical space onto the network's cube (``size``^3, facing ``direction``,
    centred on the scan, its longest side across the cube)."""
    import SimpleITK as sitk
    from ..core.geometry import Grid
    from ..methods.dnet.method import network_view, whole_scan_grid
    out = []
    for path in paths:
        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
        grid = Grid.from_sitk(img)
        out.append(network_view(torch.from_numpy(sitk.GetArrayFromImage(img)), grid,
                                whole_scan_grid(grid, size, direction)))
    return out


def validate_pose(weights: Optional[str], cache, poses: int = 40, device="cpu", data=None) -> Dict[str, float]:
    """D-Net's rotation error on ``poses`` new rigid poses over the full range (angle uniform in
    (-180, 180) degrees about a uniform axis) of the ixi_muse ``val`` subjects, unseen in
    training, each a whole scan on the network's cube (:func:`~deepreglib.methods.dnet.training.pose_errors`);
    the same poses every time. With ``data`` (the shared data folder) the scans are read natively,
    as inference shows them (:func:`native_views`: their own tilt and field of view); else as the
    cache holds them (aligned to its reference, laid out in the card's ``grid_direction``), which
    hides the native tilt: the same brains score 10.9 deg there and 21.3 deg natively (step 45175).
    The network runs as inference runs it: in the card's ``inference_passes`` (ledger views
    ``"native, 2 passes"`` from 2026-12-08). ``weights`` ``None``: the shipped ones."""
    import json
    from pathlib import Path
    from ..core.geometry import reorient_volume
    from ..methods.dnet.method import WEIGHTS_STEM, cube_direction, inference_passes, load_dnet
    from ..methods.dnet.training import pose_errors
    from ..methods.weights import shipped_weights
    model, card = load_dnet(weights or shipped_weights(WEIGHTS_STEM), torch.device(device))
    size = model.input_size
    if data is not None:
        folder = Path(data) / "ixi_muse"
        names = json.loads((folder / "splits.json").read_text())["val"]
        vols = native_views([folder / f"{n}_t1.nii.gz" for n in names], size, cube_direction(card))
        field_of_view = (1.0, 1.0)  # the view is the scan's own field of view already
    else:
        subjects, grid = load_cache(cache, "val", ["ixi_muse"])
        vols = [reorient_volume(s.image, grid.direction, cube_direction(card)).contiguous() for s in subjects]
        from ..methods.dnet.training import FIELD_OF_VIEW_RANGE as field_of_view
    passes = inference_passes(card)  # as inference runs the network
    found = pose_errors(model, vols, (size,) * 3, poses, field_of_view=field_of_view, passes=passes)
    err = found["error_deg"]
    views = ("native" if data is not None else "cache") + (f", {passes} passes" if passes > 1 else "")
    return {"poses": int(err.size), "subjects": len(vols), "views": views, "passes": passes,
            "rotation_median_deg": float(np.median(err)), "rotation_p90_deg": float(np.percentile(err, 90)),
            "within_10_percent": float(100.0 * np.mean(err <= 10.0)),
            "translation_error_median": float(np.median(found["translation_error"]))}


def _rotation_of(m: np.ndarray) -> np.ndarray:
    """The rotation of the polar decomposition of ``m``'s linear part (an affine's nearest rotation)."""
    u, _, vt = np.linalg.svd(np.asarray(m, dtype=np.float64)[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:  # a reflection is the nearest orthogonal map: no rotation is close
        u[:, -1] *= -1
        r = u @ vt
    return r


def validate_sam_affine(weights: Optional[str], cache, poses: int = 20, max_angle_deg: float = 45.0,
                        max_translation_mm: float = 10.0) -> Dict[str, float]:
    """SAM-affine (``--init same-affine``, no polishing) scored by :func:`pose_recovery` on the
    cache's ``val`` subjects. ``weights`` ``None``: the shipped SAM."""
    from ..methods.same.method import same_affine_initializer

    def align(fixed, grid, moving):
        return same_affine_initializer(fixed, grid, moving, grid, weights=weights)
    return pose_recovery(align, cache, poses, max_angle_deg, max_translation_mm)


def pose_recovery(align, cache, poses: int = 20, max_angle_deg: float = 45.0,
                  max_translation_mm: float = 10.0) -> Dict[str, float]:
    """An initial alignment ``align(fixed, grid, moving) -> 4x4`` (LPS, fixed point -> moving
    point; images ``(D, H, W)`` on one ``grid``) on ``poses`` known rigid poses of the
    cache's ``val`` subjects: pose ``s`` turns subject ``s mod n`` (padded to a cube, so no brain
    leaves the field) by an angle uniform in ``+-max_angle_deg`` about a uniform axis through its
    centre and shifts it by up to ``max_translation_mm`` per axis; the score is the rotation
    error (degrees) of the estimated matrix's nearest rotation against the pose's, and the
    error at the centre (mm). The same poses every time."""
    import math
    import torch.nn.functional as F
    from ..core.geometry import Grid
    from ..train.draws import sample_through
    from ..train.synth import random_rigid, rigid_matrix
    subjects, grid = load_cache(cache, "val", ["ixi_muse"])
    side = max(grid.shape)
    cube = Grid((side,) * 3, grid.spacing, (0.0, 0.0, 0.0), grid.direction)
    # the cube's origin puts the subject's grid centre at the cube's centre
    shift = (np.asarray(cube.shape, dtype=np.float64) - np.asarray(grid.shape)) / 2.0
    origin = grid.index_to_physical(-shift)
    cube = Grid(cube.shape, cube.spacing, tuple(float(v) for v in origin), cube.direction)
    centre = (np.asarray(cube.shape, dtype=np.float64) - 1) / 2.0
    g_phys = cube.index_to_physical_matrix
    rot_err, centre_err = [], []
    for s in range(poses):
        v = subjects[s % len(subjects)].image
        pad = []
        for n in reversed(v.shape[2:]):
            lo = (side - n) // 2
            pad += [lo, side - n - lo]
        fixed = F.pad(v, pad)
        g = torch.Generator().manual_seed(20_000 + s)
        r, unit_t = random_rigid(g, math.radians(max_angle_deg), 1.0)
        m = rigid_matrix(r, unit_t * max_translation_mm / np.asarray(cube.spacing_kji), centre)
        moving = sample_through(fixed, m)  # moving(x) = fixed(M x): fixed point M x <-> moving x
        truth = g_phys @ np.linalg.inv(m) @ np.linalg.inv(g_phys)  # fixed point -> moving point (LPS)
        est = np.asarray(align(fixed[0, 0], cube, moving[0, 0]), dtype=np.float64)
        rot_err.append(float(np.degrees(np.arccos(np.clip(
            (np.trace(_rotation_of(est).T @ _rotation_of(truth)) - 1.0) / 2.0, -1.0, 1.0)))))
        c = cube.centre
        centre_err.append(float(np.linalg.norm((est[:3, :3] @ c + est[:3, 3]) - (truth[:3, :3] @ c + truth[:3, 3]))))
    e = np.asarray(rot_err)
    return {"poses": int(e.size), "subjects": len(subjects), "max_angle_deg": float(max_angle_deg),
            "rotation_median_deg": float(np.median(e)), "rotation_p90_deg": float(np.percentile(e, 90)),
            "within_3_percent": float(100.0 * np.mean(e <= 3.0)),
            "centre_error_median_mm": float(np.median(centre_err))}
