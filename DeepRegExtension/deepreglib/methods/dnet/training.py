"""Training recipe ``dnet``: supervised rigid poses of one volume (``deepreg train dnet``).

Every training batch (:func:`deepreglib.train.loop.make_batch`, synthetic or real) supplies a volume
``V`` (its ``fixed`` image). Two views of it make the pair, sampled straight from ``V`` (one
interpolation each), in the network-normalised coordinates of :mod:`deepreglib.methods.dnet.method`:

* ``fixed(x) = V(P x)`` with ``P`` a random rotation about the centre (any angle), so the
  network does not learn one canonical pose;
* ``moving(T x) = fixed(x)`` with the target ``T x = R x + t``: ``R`` a rotation by an angle
  uniform in ``(-pi, pi)`` about an axis uniform on the sphere, ``t`` uniform per axis up to 1/4
  of the extent; so ``moving(y) = V(P T^-1 y)``;
* each image is multiplied by a factor uniform in ``[0.95, 1.05]`` and gets Gaussian noise
  (std uniform in ``[0, 0.02]``).

Loss (minimise, 0 at a perfect pose): ``0.5 |t - t^|^2 / (|t|^2 + 0.01) + 0.5 |r6 - r^6|^2`` with
``t`` in normalised units, ``r6`` the first two columns of ``R`` and ``r^6`` the network's raw 6D
output (before Gram-Schmidt), averaged over the batch.

The random draws come from a generator seeded by ``(args.seed, checksum of the batch, step)``: the
batch of step ``i`` is a pure function of ``(seed, i)``, so a resumed run repeats them exactly.

Schedule options (beyond the paper, for short CPU budgets; the defaults are the paper's):

* ``--dnet-angle-warmup N``: the largest rotation angle grows linearly from
  ``--dnet-start-angle`` (degrees) to 180 over the first ``N`` steps (a curriculum; 0: always 180);
* ``--dnet-fixed-pose canonical``: the fixed view keeps the volume's own orientation (``P = I``),
  so the network learns poses relative to the scans' usual orientation rather than between two
  arbitrary poses (``random``, the default); batches are then not mirrored (a flipped scan has no
  usual orientation); ``--dnet-fixed-tilt DEG`` turns that fixed view by up to ``DEG`` degrees,
  as heads lie in scanners (the training cache aligns every brain to one reference, so without
  it the network only sees fixed views of exactly that pose);
* the generic ``--clip-grad`` of :mod:`deepreglib.train.loop` bounds the spikes of the normalised
  translation term, whose denominator ``|t|^2 + 0.01`` makes small translations steep.
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, Tuple

import numpy as np
import torch

from .network import rotation_to_sixd
from ...train.synth import random_rigid, rigid_matrix
from ...train.loop import training_scan_direction
from .method import CUBE_DIRECTION
from ...train.recipe import TrainingRecipe
from ...train.draws import batch_generator, sample_through, uniform_draw

MAX_TRANSLATION_FRACTION = 0.25
INTENSITY_SCALE = (0.95, 1.05)
MAX_NOISE_STD = 0.02


def _augment_intensity(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    scale = uniform_draw(g, *INTENSITY_SCALE)
    std = uniform_draw(g, 0.0, MAX_NOISE_STD)
    noise = torch.randn(image.shape, generator=g, dtype=image.dtype)
    return image * scale + std * noise.to(image.device)


def rigid_training_pair(volume: torch.Tensor, g: torch.Generator, max_angle: float = math.pi,
                        max_translation_fraction: float = MAX_TRANSLATION_FRACTION,
                        random_fixed_pose: bool = True, augment: bool = True, fixed_tilt: float = 0.0
                        ) -> Dict[str, torch.Tensor]:
    """One supervised D-Net example from ``volume`` ``(1, 1, D, H, W)``.

    Returns ``fixed``, ``moving`` ``(1, 1, D, H, W)``, ``rotation`` ``(1, 3, 3)``,
    ``translation`` ``(1, 3)`` (normalised ``(k, j, i)``) and ``sixd`` ``(1, 6)`` such that
    ``moving(R x + t) = fixed(x)`` in normalised coordinates (up to the field of view).
    """
    if volume.ndim != 5 or volume.shape[:2] != (1, 1):
        raise ValueError(f"volume must be (1, 1, D, H, W), got {tuple(volume.shape)}")
    shape = np.asarray(volume.shape[2:], dtype=np.float64)
    centre = (shape - 1) / 2.0
    h = (shape.max() - 1) / 2.0
    pose = np.eye(4)
    if random_fixed_pose:
        r_f, _ = random_rigid(g, math.pi, 0.0)
        pose = rigid_matrix(r_f, np.zeros(3), centre)
    elif fixed_tilt > 0:  # near the scan's own pose: a head is never quite straight in the scanner
        r_f, _ = random_rigid(g, fixed_tilt, 0.0)
        pose = rigid_matrix(r_f, np.zeros(3), centre)
    r, unit_t = random_rigid(g, max_angle, 1.0)
    t_vox = unit_t * shape * max_translation_fraction  # up to 1/4 of the extent per axis
    target = rigid_matrix(r, t_vox, centre)  # voxel indices; same R, t / h in normalised units
    fixed = sample_through(volume, pose)
    moving = sample_through(volume, pose @ np.linalg.inv(target))
    if augment:
        fixed, moving = _augment_intensity(fixed, g), _augment_intensity(moving, g)
    rot = torch.as_tensor(r, dtype=torch.float32)[None]
    return {"fixed": fixed, "moving": moving, "rotation": rot,
            "translation": torch.as_tensor(t_vox / h, dtype=torch.float32)[None],
            "sixd": rotation_to_sixd(rot)}


def dnet_loss_terms(sixd_pred: torch.Tensor, t_pred: torch.Tensor, sixd_true: torch.Tensor,
                    t_true: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(translation term, rotation term)``, each ``(N,)``: ``0.5 |t - t^|^2 / (|t|^2 + 0.01)``
    and ``0.5 |r6 - r^6|^2``. Shapes ``(N, 6)`` and ``(N, 3)``."""
    if sixd_pred.shape != sixd_true.shape or t_pred.shape != t_true.shape:
        raise ValueError(f"prediction and target shapes differ: {tuple(sixd_pred.shape)} vs "
                         f"{tuple(sixd_true.shape)}, {tuple(t_pred.shape)} vs {tuple(t_true.shape)}")
    lt = 0.5 * ((t_true - t_pred) ** 2).sum(-1) / ((t_true ** 2).sum(-1) + 0.01)
    lr = 0.5 * ((sixd_true - sixd_pred) ** 2).sum(-1)
    return lt, lr


DEFAULTS = {"angle_warmup": 0, "start_angle": 180.0, "fixed_pose": "random", "anatomy_augment": 0.0,
            "fixed_tilt": 0.0}


def add_dnet_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe's own options (ignored by other recipes)."""
    p.add_argument("--dnet-angle-warmup", type=int, default=DEFAULTS["angle_warmup"],
                   help="dnet: steps over which the largest training rotation grows linearly from "
                        "--dnet-start-angle to 180 degrees (0: 180 from the start, as in the paper)")
    p.add_argument("--dnet-start-angle", type=float, default=DEFAULTS["start_angle"],
                   help="dnet: largest rotation angle (degrees) at step 0 of the warm-up")
    p.add_argument("--dnet-fixed-pose", choices=("random", "canonical"), default=DEFAULTS["fixed_pose"],
                   help="dnet: fixed view under a random rotation (paper) or in the volume's own orientation")
    p.add_argument("--dnet-fixed-tilt", type=float, default=DEFAULTS["fixed_tilt"],
                   help="dnet, with --dnet-fixed-pose canonical: the fixed view turned by up to this many "
                        "degrees about a random axis (heads lie a little tilted in the scanner; the training "
                        "cache aligns them all to one reference)")
    p.add_argument("--dnet-anatomy-augment", type=float, default=DEFAULTS["anatomy_augment"],
                   help="dnet: new anatomy from the few real scans: per-axis scaling up to 1 +- STD/20 and a "
                        "random smooth deformation of std up to STD voxels before the views (0: off)")


def _arg(args: argparse.Namespace, name: str):
    return getattr(args, f"dnet_{name}", DEFAULTS[name])


def max_angle_at(step: int, warmup: int, start_degrees: float) -> float:
    """Largest rotation angle (radians) of the training draws at ``step``: ``start_degrees``
    growing linearly to 180 over ``warmup`` steps, then 180 (``warmup <= 0``: always 180)."""
    if start_degrees < 0 or start_degrees > 180:
        raise ValueError(f"the start angle must be in [0, 180] degrees, got {start_degrees}")
    if warmup <= 0:
        return math.pi
    frac = min(max(step, 0) / float(warmup), 1.0)
    return math.radians(start_degrees + (180.0 - start_degrees) * frac)


#: the field of view of D-Net's real training views, as a factor of the scan's longest side:
#: the cube shows a margin of up to 35 % around the stored scan, because at inference it holds
#: the fixed image's whole field of view, and clinical fields of view are larger than the
#: training cache's brain-centred box (160 x 200 x 160 mm) by up to about that much
FIELD_OF_VIEW_RANGE = (1.0, 1.35)


def whole_volume(v: torch.Tensor, shape, field_of_view: float = 1.0) -> torch.Tensor:
    """``v`` ``(1, 1, D, H, W)`` as D-Net sees a scan: padded to a centred cube of its longest
    side times ``field_of_view`` (>= 1) and resampled (trilinear) to ``shape``, in [0, 1]."""
    import torch.nn.functional as F
    if field_of_view < 1.0:
        raise ValueError(f"field_of_view must be >= 1 (the whole scan), got {field_of_view}")
    side = int(round(max(v.shape[2:]) * field_of_view))
    pad = []
    for n in reversed(v.shape[2:]):
        lo = (side - n) // 2
        pad += [lo, side - n - lo]
    cube = F.pad(v, pad)
    return F.interpolate(cube, size=tuple(int(s) for s in shape), mode="trilinear",
                         align_corners=True).clamp(0, 1)


def whole_volume_batch(vols, shape, rng, field_of_view=(1.0, 1.0)) -> Dict[str, torch.Tensor]:
    """A real D-Net training volume as the method sees one at inference: one of ``vols``, whole
    (:func:`whole_volume`, with a field of view drawn uniformly in ``field_of_view``); ``fixed``
    only (the recipe makes both views from it)."""
    v = vols[int(rng.integers(0, len(vols)))]
    lo, hi = field_of_view
    fixed = whole_volume(v, shape, float(rng.uniform(lo, hi)) if hi > lo else float(lo))
    return {"fixed": fixed, "moving": fixed}


def _real_views(vols, shape, rng) -> Dict[str, torch.Tensor]:
    return whole_volume_batch(vols, shape, rng, FIELD_OF_VIEW_RANGE)


def pose_errors(model, vols, shape, poses: int, seed: int = 10_000,
                field_of_view=FIELD_OF_VIEW_RANGE, passes: int = 1) -> Dict[str, np.ndarray]:
    """D-Net's rotation error on ``poses`` new rigid poses of ``vols`` (each a whole scan in the
    network's cube, a field of view drawn in ``field_of_view``, the fixed view in the scan's own
    orientation, no intensity augmentation): pose ``s`` shows scan ``s mod len(vols)`` (every scan
    the same share) and is drawn from ``seed + s`` (seeds past training's), so two calls score the
    same poses. ``passes`` > 1: as inference runs the network (each later pass sees the moving
    view turned by the pose so far and adds the residual pose). Returns per pose the true angle,
    the rotation error (degrees, trace formula) and the translation error (normalised units)."""
    true, err, terr = [], [], []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for s in range(poses):
        view = whole_volume_batch([vols[s % len(vols)]], shape, np.random.default_rng(seed + s),
                                  field_of_view)["fixed"]
        ex = rigid_training_pair(view, torch.Generator().manual_seed(seed + s), random_fixed_pose=False,
                                 augment=False)
        shape_ = np.asarray(view.shape[2:], dtype=np.float64)
        centre, h = (shape_ - 1) / 2.0, (shape_.max() - 1) / 2.0
        total, moving = np.eye(4), ex["moving"]
        for _ in range(passes):
            with torch.inference_mode():
                out = model(moving.to(device), ex["fixed"].to(device))
            total = total @ rigid_matrix(out.rotation[0].detach().cpu().double().numpy(),
                                         out.translation[0].detach().cpu().double().numpy() * h, centre)
            moving = sample_through(ex["moving"], total)
        r, rh = ex["rotation"][0].double(), torch.as_tensor(total[:3, :3])
        th = torch.as_tensor(total[:3, 3] - (centre - total[:3, :3] @ centre)) / h  # back to normalised units
        true.append(_angle_deg(r))
        err.append(_angle_deg(rh.T @ r))
        terr.append(float((th - ex["translation"][0].double()).norm()))
    model.train(was_training)
    return {"true_deg": np.asarray(true), "error_deg": np.asarray(err), "translation_error": np.asarray(terr)}


def _angle_deg(r: torch.Tensor) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, (float(torch.trace(r)) - 1.0) / 2.0))))


def vary_anatomy(volume: torch.Tensor, g: torch.Generator, max_std: float) -> torch.Tensor:
    """A plausible other subject from ``volume`` ``(1, 1, D, H, W)``: per-axis scaling about the
    centre by factors uniform in ``1 +- max_std / 20`` and a random smooth diffeomorphism (std up
    to ``max_std`` voxels, control nodes every 8 voxels). Identity for ``max_std <= 0``."""
    if max_std <= 0:
        return volume
    from ...train.synth import random_displacement
    from ...core.warp import warp
    shape = np.asarray(volume.shape[2:], dtype=np.float64)
    centre = (shape - 1) / 2.0
    factors = np.array([uniform_draw(g, 1 - max_std / 20.0, 1 + max_std / 20.0) for _ in range(3)])
    m = np.eye(4)
    m[:3, :3] = np.diag(1.0 / factors)
    m[:3, 3] = centre - m[:3, :3] @ centre
    scaled = sample_through(volume, m)
    u, _ = random_displacement(tuple(int(n) for n in shape), g, max_std, 8)
    return warp(scaled, u.to(scaled.dtype))


def _build(args):
    from .network import DNet
    return DNet(input_size=max(int(s) for s in args.shape))


def _loss(model, batch, args):
    g = batch_generator(batch, args.seed, getattr(args, "current_step", None))
    max_angle = max_angle_at(int(getattr(args, "current_step", 0)), int(_arg(args, "angle_warmup")),
                             float(_arg(args, "start_angle")))
    volume = batch["fixed"].detach().cpu().float()
    if "fixed_labels" not in batch:  # a real scan: vary its anatomy (synthetic volumes vary already)
        volume = vary_anatomy(volume, g, float(_arg(args, "anatomy_augment")))
    ex = rigid_training_pair(volume, g, max_angle=max_angle,
                             random_fixed_pose=_arg(args, "fixed_pose") == "random",
                             fixed_tilt=math.radians(float(_arg(args, "fixed_tilt"))))
    device = next(model.parameters()).device
    out = model(ex["moving"].to(device), ex["fixed"].to(device))
    lt, lr = dnet_loss_terms(out.sixd, out.translation, ex["sixd"].to(device), ex["translation"].to(device))
    total = (lt + lr).mean()
    return total, {"translation_loss": float(lt.mean().detach()), "rotation_loss": float(lr.mean().detach()),
                   "max_angle_deg": math.degrees(max_angle)}


def _check_direction(direction) -> None:
    from ...core.geometry import axis_reorientation
    axis_reorientation(direction, CUBE_DIRECTION)  # BadInputError for an oblique scan


def _prepare_scans(vols, labels, direction, args):
    """The real scans laid out in :data:`~deepreglib.methods.dnet.method.CUBE_DIRECTION` (axis
    permutation and flips, exact), the orientation D-Net learns poses in, whatever direction
    the cache or the scans' files store them in."""
    if direction is None:
        return vols, labels
    from ...core.geometry import reorient_volume
    vols = [reorient_volume(v, direction, CUBE_DIRECTION) for v in vols]
    if labels is not None:
        labels = [None if lab is None else reorient_volume(lab, direction, CUBE_DIRECTION) for lab in labels]
    return vols, labels


def _card_entries(cfg) -> dict:
    """``grid_direction``: the orientation the real scans were shown to the network in
    (:data:`~deepreglib.methods.dnet.method.CUBE_DIRECTION`, into which :func:`_prepare_scans`
    lays them out), so that inference shows every input to the network in that orientation
    (:func:`~deepreglib.methods.dnet.cube_direction`); the identity when there were no real
    scans (synthetic volumes have no anatomy to orient). Raises :class:`BadInputError` for scans
    that disagree or are oblique to it."""
    d = training_scan_direction(cfg)
    if d is None:
        return {"grid_direction": [float(v) for v in np.eye(3).ravel()], "inference_passes": INFERENCE_PASSES}
    _check_direction(d)
    return {"grid_direction": [float(v) for v in CUBE_DIRECTION], "inference_passes": INFERENCE_PASSES}


#: the passes inference runs (the card's ``inference_passes``; :func:`~deepreglib.methods.dnet.method.pose_in_passes`):
#: each later pass sees the moving scan turned by the pose so far and adds the residual pose.
#: Chosen on the 40 native val poses of step 90625 (benchmarks/results/dnet-subjects-2026-12-07-passes.json):
#: median 7.94 / 6.96 / 7.65 deg and 55 / 77.5 / 75 % within 10 deg for 1 / 2 / 3 passes.
INFERENCE_PASSES = 2


DNET = TrainingRecipe(
    build=_build, loss=_loss, lr=1e-4, terms=("translation_loss", "rotation_loss", "max_angle_deg"),
    add_arguments=add_dnet_arguments, real_batch=_real_views, prepare_scans=_prepare_scans,
    cache_sets=("ixi_muse", "openneuro_ds002748", "ixi_muse_wholehead"),
    flips=lambda args: _arg(args, "fixed_pose") == "random",
    card_entries=_card_entries,
    description="D-Net supervised rigid pose: one volume under a random rigid pose (angle uniform in "
                "(-pi, pi) about a uniform axis, translation up to 1/4 extent), intensity scale 0.95-1.05 "
                "and noise; loss 0.5|t-t^|^2/(|t|^2+0.01) + 0.5|r6-r^6|^2 (normalised units)")
