"""Training recipe ``r2n2``: ``deepreg train r2n2 --out DIR [--r2n2-steps T ...]``.

Unsupervised, as in Sandkuehler et al. 2019::

    loss = (1/T) sum_t S(F, M o f_t) + lambda * TV(f_T)

``S`` is MSE or 1 - local NCC (window 9), ``TV`` the isotropic total variation of the final voxel
displacement (a dimensionless strain, so ``lambda`` means the same at any resolution); Adam with
AMSGrad; the network's recurrent convolutions carry multiplicative Gaussian weight noise in
training (:class:`~deepreglib.methods.r2n2.network.R2N2`, ``weight_noise``). Starting points: T = 25,
lambda = 0.1, s_max = 0.3, learning rate 1e-4.
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ...core.errors import BadInputError
from ...core.losses import TotalVariation
from .network import SIMILARITIES, R2N2, dissimilarity
from ...train.recipe import TrainingRecipe, label_dice_term
from ...core.warp import warp

DEFAULTS = {"steps": 25, "tv_weight": 0.1, "s_max": 0.3, "s_min": 0.0, "similarity": "mse", "weight_noise": 0.1,
            "bump_pairs": 0, "bump_voxels": 4.0, "readout_radius": 0.0, "supervised": 0.0,
            "teacher": 1.0, "init_width": 0.0, "flow_head": False}


def add_r2n2_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe's own options (ignored by other recipes)."""
    p.add_argument("--r2n2-steps", type=int, default=DEFAULTS["steps"],
                   help="r2n2: number of local deformations T per registration in training")
    p.add_argument("--r2n2-tv-weight", type=float, default=DEFAULTS["tv_weight"],
                   help="r2n2: lambda, weight of the total variation of the final field")
    p.add_argument("--r2n2-s-max", type=float, default=DEFAULTS["s_max"],
                   help="r2n2: largest Gaussian variance per axis (normalised units squared)")
    p.add_argument("--r2n2-s-min", type=float, default=DEFAULTS["s_min"],
                   help="r2n2: smallest Gaussian variance per axis (0: the paper's parameterisation)")
    p.add_argument("--r2n2-readout-radius", type=float, default=DEFAULTS["readout_radius"],
                   help="r2n2: read each deformation's shape and weight from the features within this "
                        "radius (normalised units) of its centre (0: pool the whole image, the paper)")
    p.add_argument("--r2n2-similarity", choices=SIMILARITIES, default=DEFAULTS["similarity"],
                   help="r2n2: image similarity (mse, or ncc = 1 - local NCC)")
    p.add_argument("--r2n2-weight-noise", type=float, default=DEFAULTS["weight_noise"],
                   help="r2n2: std of the multiplicative Gaussian noise on recurrent weights (0: off)")
    p.add_argument("--r2n2-bump-pairs", type=int, default=DEFAULTS["bump_pairs"], metavar="K",
                   help="r2n2: synthetic pairs deformed by K random local Gaussian deformations (the "
                        "method's own transformation class; a curriculum) instead of the smooth "
                        "generator's (0: off). The loss stays unsupervised.")
    p.add_argument("--r2n2-bump-voxels", type=float, default=DEFAULTS["bump_voxels"],
                   help="r2n2: largest weight of a bump-pair deformation per axis, voxels")
    p.add_argument("--r2n2-supervised", type=float, default=DEFAULTS["supervised"], metavar="W",
                   help="r2n2: weight of the supervised warm start on pairs with a known field (the "
                        "bump pairs): every step is told where the largest residual is and what "
                        "displacement it needs there (0: off, the paper's unsupervised loss alone)")
    p.add_argument("--r2n2-init-width", type=float, default=DEFAULTS["init_width"], metavar="S",
                   help="r2n2: the Gaussians' starting variance (normalised units squared; 0: half of "
                        "s_max, the paper's); e.g. 0.03 for the bump pairs' class")
    p.add_argument("--r2n2-flow-head", action="store_true",
                   help="r2n2, with --r2n2-supervised: a training-only head on the finest features told the "
                        "residual displacement at every voxel (dense supervision; the heads see one "
                        "point per step)")
    p.add_argument("--r2n2-teacher", type=float, default=DEFAULTS["teacher"], metavar="P",
                   help="r2n2, with --r2n2-supervised: the share of supervised steps (in every 10) whose "
                        "deformations are placed at the largest residual instead of the network's own "
                        "centres (teacher forcing; 0: always its own)")


def _arg(args: argparse.Namespace, name: str):
    return getattr(args, f"r2n2_{name}", DEFAULTS[name])


def bump_pair_images(moving_labels: torch.Tensor, displacement: torch.Tensor, seed: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(fixed, moving, fixed_labels, moving_labels)``: the fixed label map is ``moving_labels``
    pulled through ``displacement`` (so ``fixed = moving o (x + u)``, the engine's convention), both
    images rendered with the same random per-label intensities (``seed``) and their own
    acquisition artefacts."""
    from ...train.synth import labels_to_image
    fixed_labels = warp(moving_labels.float(), displacement, "nearest").long()
    g = torch.Generator().manual_seed(seed)
    n = int(moving_labels.max()) + 1
    moving, means = labels_to_image(moving_labels, g, num_labels=n)
    fixed, _ = labels_to_image(fixed_labels, g, intensities=means, num_labels=n)
    return fixed, moving, fixed_labels, moving_labels


_BUMP_BANK: Dict[Tuple, Dict[str, torch.Tensor]] = {}


def bump_batch(shape, bank_seed: int, args: argparse.Namespace) -> Optional[Dict[str, torch.Tensor]]:
    """The synthetic batch of ``--r2n2-bump-pairs K`` (``None`` when it is 0): a synthetic label
    image warped by ``K`` random local Gaussian deformations, cached per ``(shape, seed, K, size)``."""
    from .gaussians import random_local_deformations
    from ...train.synth import synth_pair
    k, size = int(_arg(args, "bump_pairs")), float(_arg(args, "bump_voxels"))
    if k <= 0:
        return None
    key = (tuple(shape), bank_seed, k, size)
    if key not in _BUMP_BANK:
        base = synth_pair(tuple(shape), seed=bank_seed, max_std=0.0, same_contrast=True)
        u = random_local_deformations(shape, k, torch.Generator().manual_seed(bank_seed), size)
        fixed, moving, fl, ml = bump_pair_images(base.moving_labels, u, bank_seed + 1)
        _BUMP_BANK[key] = {"fixed": fixed, "moving": moving, "fixed_labels": fl.to(torch.uint8),
                           "moving_labels": ml.to(torch.uint8), "displacement": u}
    return dict(_BUMP_BANK[key])


def build_r2n2(args: argparse.Namespace) -> R2N2:
    """R2N2 from the recipe's options; ``--r2n2-init-width S`` starts every Gaussian at variance
    ``S`` (the width logits' bias) instead of half of ``s_max``: Adam moves a bias by about the
    learning rate a step, so from the paper's start (0.15 normalised units squared, a sigma of 6
    voxels at 32^3) to the bump class's widths (0.01-0.06) takes thousands of steps, in which
    every deformation spreads its displacement far beyond the place it should act."""
    model = R2N2(steps=_arg(args, "steps"), s_max=_arg(args, "s_max"), s_min=_arg(args, "s_min"),
                 weight_noise=_arg(args, "weight_noise"), readout_radius=_arg(args, "readout_radius"),
                 similarity=_arg(args, "similarity"), flow_head=bool(_arg(args, "flow_head")))
    init = _arg(args, "init_width")
    if init:
        from .gaussians import WIDTH_FLOOR
        lo, hi = model.s_min + WIDTH_FLOOR, model.s_max + WIDTH_FLOOR
        if not lo < init < hi:
            raise BadInputError(f"--r2n2-init-width must lie in ({lo:g}, {hi:g}) (the widths' range), got {init:g}")
        p = (init - lo) / (hi - lo)
        with torch.no_grad():
            model.parameter_net.fc.bias[6:9] = math.log(p / (1.0 - p))
    return model


def residual_target(residual: torch.Tensor, blur: int = 5) -> torch.Tensor:
    """Where the next local deformation should go: the normalised ``(k, j, i)`` ``(N, 3)`` of the
    largest residual displacement (its length, box-blurred over ``blur`` voxels so one stray
    voxel does not win)."""
    from .gaussians import index_to_normalized
    length = residual.norm(dim=1, keepdim=True)
    smooth = F.avg_pool3d(length, blur, stride=1, padding=blur // 2, count_include_pad=False)
    n, _, d, h, w = smooth.shape
    flat = smooth.flatten(1).argmax(1)
    index = torch.stack([flat // (h * w), (flat // w) % h, flat % w], dim=1).to(residual.dtype)
    return index_to_normalized(index, (d, h, w))


def warm_start_terms(out, target: torch.Tensor, strides) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The supervised warm start on a pair whose field ``target`` ``(N, 3, D, H, W)`` (voxels)
    is known, averaged over the steps ``t``. With ``r_t = target - f_{t-1}``, the residual the
    step faces, and ``c_t`` the largest residual (:func:`residual_target`):

    * ``position``: cross-entropy of the position network's maps (every resolution) against a
      Gaussian of one level voxel around ``c_t``, plus the squared distance of the network's
      centre to it (normalised units);
    * ``weight``: the squared error of the step's weight against ``r_t`` where the deformation
      was placed (normalised units): at ``c_t`` under teacher forcing (``out`` run with
      :func:`residual_guide`, so the target is never the zero of a wrong place), else at the
      network's centre, detached;
    * ``field``: the mean squared endpoint error of ``f_t`` (voxels).

    The first two do not vanish at the identity (weight 0), where the unsupervised loss's
    gradients of the centres and widths do (they scale with the weight): the saddle every
    unsupervised run of R2N2 stayed in (docs/BENCHMARKS.md)."""
    from .gaussians import voxel_scale
    from .network import level_coordinates
    params, fields = out.parameters, out.fields
    guided = out.predicted_centres is not None
    own = out.predicted_centres if guided else params.centres
    shape = tuple(target.shape[2:])
    scale = voxel_scale(shape, target.dtype, target.device)
    before = torch.zeros_like(target)
    position, weight, field, flow = [], [], [], []
    for t in range(out.steps):
        residual = (target - before).detach()
        goal = params.centres[:, t].detach() if guided else residual_target(residual)  # (N, 3)
        ce = []
        for level, stride in zip(out.position_maps[t], strides):
            level_shape = [-(-n // stride) for n in shape]
            grid = level_coordinates(shape, level_shape, stride, target.dtype, target.device)  # (V, 3)
            sigma = stride * 2.0 / (torch.tensor(shape, dtype=target.dtype) - 1).min()
            logits = -((grid.unsqueeze(0) - goal.unsqueeze(1)) ** 2).sum(-1) / (2 * sigma ** 2)
            q = torch.softmax(logits, dim=-1)
            ce.append(-(q * torch.log(level.clamp_min(1e-12))).sum(-1).mean())
        position.append(torch.stack(ce).mean() + ((own[:, t] - goal) ** 2).sum(-1).mean())
        at = params.centres[:, t].detach().flip(-1).view(-1, 1, 1, 1, 3)  # grid_sample: (x, y, z) = (i, j, k)
        wanted = F.grid_sample(residual, at, align_corners=True).view(-1, 3) / scale
        weight.append(((params.weights[:, t] - wanted) ** 2).sum(-1).mean())
        if out.flows is not None:  # the dense residual, on the finest features' grid (stride 2)
            dense = residual[:, :, ::strides[0], ::strides[0], ::strides[0]] / scale.view(1, 3, 1, 1, 1)
            flow.append(((out.flows[t] - dense) ** 2).sum(1).mean())
        before = fields[:, t]
        field.append(((before - target) ** 2).sum(1).mean())
    pos, wgt, fld = torch.stack(position).mean(), torch.stack(weight).mean(), torch.stack(field).mean()
    total = pos + WARM_WEIGHT_TERM * wgt + WARM_FIELD_TERM * fld
    terms = {"guide_position": float(pos.detach()), "guide_weight": float(wgt.detach()),
             "guide_field": float(fld.detach())}
    if flow:
        dense_term = torch.stack(flow).mean()
        total = total + WARM_FLOW_TERM * dense_term
        terms["guide_flow"] = float(dense_term.detach())
    return total, terms


#: the warm start's weights of its weight and field terms beside the position term (whose
#: cross-entropy starts near log of a level's voxel count): a weight error of 0.1 normalised
#: units (1.5 voxels at 32^3) then counts 0.3, a field error of 1 voxel 0.1
WARM_WEIGHT_TERM = 30.0
WARM_FIELD_TERM = 0.1
#: the flow head's dense term (normalised units squared): a residual of 0.1 everywhere counts 1
WARM_FLOW_TERM = 100.0


def residual_guide(target: torch.Tensor):
    """Teacher forcing for :class:`~deepreglib.methods.r2n2.network.R2N2`'s ``centre_guide``:
    each deformation goes where the residual ``target - field`` is largest."""
    return lambda field: residual_target((target - field).detach())


def r2n2_loss(model: R2N2, batch: Dict[str, torch.Tensor], args: argparse.Namespace
              ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """``(1/T) sum_t S(F, M o f_t) + lambda TV(f_T)`` (+ ``label_weight`` (1 - Dice) on synthetic
    pairs when asked). Returns the total and its terms: ``similarity`` (the mean over steps),
    ``final_similarity`` (``S(F, M o f_T)``), ``tv``."""
    fixed, moving = batch["fixed"], batch["moving"]
    weight = float(_arg(args, "supervised"))
    supervised = weight > 0 and "displacement" in batch
    step = int(getattr(args, "current_step", 0) or 0)
    forced = supervised and (step % 10) < round(10 * float(_arg(args, "teacher")))
    out = model(moving, fixed, return_warped=True, return_fields=supervised, return_position_maps=supervised,
                centre_guide=residual_guide(batch["displacement"]) if forced else None)
    metric = dissimilarity(model.similarity)
    per_step = torch.stack([metric(out.warped_steps[:, t], fixed) for t in range(out.steps)], dim=1)
    sim = per_step.mean()
    tv = TotalVariation()(out.displacement)
    total = sim + _arg(args, "tv_weight") * tv
    terms = {"similarity": float(sim.detach()), "final_similarity": float(per_step[:, -1].detach().mean()),
             "tv": float(tv.detach())}
    if supervised:
        guide, guide_terms = warm_start_terms(out, batch["displacement"], model.strides)
        total = total + weight * guide
        terms.update(guide_terms)
    label_weight = getattr(args, "label_weight", 0.0)
    if label_weight > 0 and "fixed_labels" in batch:
        dice = label_dice_term(batch, out.displacement)
        total = total + label_weight * dice
        terms["dice_loss"] = float(dice.detach())
    return total, terms


R2N2_RECIPE = TrainingRecipe(
    build=build_r2n2, loss=r2n2_loss, lr=1e-4, terms=("similarity", "final_similarity", "tv", "dice_loss", "guide_position", "guide_weight",
                                                 "guide_field", "guide_flow"),
    description="R2N2 in 3D: mean over the T steps of S(F, M o f_t) (MSE or 1 - local NCC) + "
                "r2n2_tv_weight * isotropic TV of the final voxel field; Adam with AMSGrad; "
                "Gaussian DropConnect on the recurrent units",
    optimizer_options={"amsgrad": True}, add_arguments=add_r2n2_arguments, synthetic=bump_batch)
