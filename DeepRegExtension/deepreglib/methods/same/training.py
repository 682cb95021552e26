"""Training recipes ``sam`` (self-supervised embeddings) and ``same_vxm`` (SAM-VoxelMorph).

``sam``: from each batch's ``fixed`` volume ``V`` (synthetic or real, no annotation used), two
views ``view(x) = V(M x)`` with random affine maps ``M`` of voxel indices (crop shift up to 15%
of the extent per axis, scale 0.8-1.25 per axis, rotation up to 15 degrees) and random intensity
changes (gamma 0.7-1.5, scale 0.9-1.1, offset +-0.05, noise std up to 0.03). A view-A voxel ``x``
corresponds to ``M_B^-1 M_A x`` in view B. The loss is :class:`~deepreglib.methods.same.network.PixelInfoNCE`
on the global (1/8) plus the local (1/2) embedding at 256 anchor points inside both views.

``same_vxm``: unsupervised SAM-VoxelMorph on the ordinary training pairs with the frozen SAM
from ``--same-vxm-sam-model``, ``$DEEPREG_SAM_WEIGHTS`` or ``Resources/Models/sam.pt``::

    loss = (1 - local NCC, window 9) + reg_weight * Grad(u) + sam_weight * (1 - <e_f, e_m o phi>)

with SAME's weights read as ``lambda = --reg-weight = 1`` (smoothness) and
``gamma = --same-vxm-sam-weight = 0.5`` (SAM similarity: the inner product is maximised, so the
loss term is one minus it).
Random draws come from :func:`~deepreglib.train.draws.batch_generator` (exact resume).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from ...core.errors import BadInputError
from .network import PixelInfoNCE, to_feature_coords
from ...train.synth import random_rigid
from ...train.recipe import TrainingRecipe, add_label_term
from ...train.draws import batch_generator, sample_through, uniform_draw

ANCHORS = 256
SHIFT_FRACTION = 0.15
SCALE_RANGE = (0.8, 1.25)
MAX_ANGLE = math.pi / 12
#: SAME's weight of the SAM similarity term (gamma)
SAM_WEIGHT = 0.5


def random_view_matrix(shape, g: torch.Generator, max_angle: float = MAX_ANGLE) -> np.ndarray:
    """4x4 map view index ``(k, j, i)`` -> volume index: about the centre, scale, rotate (by up to
    ``max_angle`` radians), shift."""
    shape = np.asarray(shape, dtype=np.float64)
    c = (shape - 1) / 2
    scale = np.exp([uniform_draw(g, math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1])) for _ in range(3)])
    rot, unit_shift = random_rigid(g, max_angle, 1.0)
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag(scale)
    m[:3, 3] = c + unit_shift * SHIFT_FRACTION * shape - m[:3, :3] @ c
    return m


def _intensity(view: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    gamma = uniform_draw(g, 0.7, 1.5)
    out = view.clamp(0, 1) ** gamma * uniform_draw(g, 0.9, 1.1) + uniform_draw(g, -0.05, 0.05)
    noise = torch.randn(view.shape, generator=g, dtype=view.dtype).to(view.device)
    return out + uniform_draw(g, 0.0, 0.03) * noise


def contrastive_views(volume: torch.Tensor, g: torch.Generator, anchors: int = ANCHORS,
                      foreground: float = 0.05, max_angle: float = MAX_ANGLE) -> Dict[str, torch.Tensor]:
    """Two augmented views of ``volume`` ``(1, 1, D, H, W)`` (each turned by up to ``max_angle``
    radians) and ``anchors`` corresponding voxel pairs: returns ``view_a``, ``view_b`` ``(1, 1, D, H, W)`` and ``points_a``, ``points_b``
    ``(P, 3)`` voxel indices ``(k, j, i)`` (inside both views, on foreground of ``V`` when there
    is enough of it)."""
    if volume.ndim != 5 or volume.shape[:2] != (1, 1):
        raise ValueError(f"volume must be (1, 1, D, H, W), got {tuple(volume.shape)}")
    shape = np.asarray(volume.shape[2:])
    ma, mb = random_view_matrix(shape, g, max_angle), random_view_matrix(shape, g, max_angle)
    a_to_b = np.linalg.inv(mb) @ ma
    cand = (torch.rand((8 * anchors, 3), generator=g, dtype=torch.float64) * torch.as_tensor(shape - 1.0)).round()
    pa = cand.numpy()
    in_v = pa @ ma[:3, :3].T + ma[:3, 3]
    pb = pa @ a_to_b[:3, :3].T + a_to_b[:3, 3]
    ok = np.all((pb >= 0) & (pb <= shape - 1), axis=1) & np.all((in_v >= 0) & (in_v <= shape - 1), axis=1)
    idx = np.clip(np.round(in_v).astype(int), 0, shape - 1)
    fg = volume[0, 0].cpu().numpy()[idx[:, 0], idx[:, 1], idx[:, 2]] > foreground
    sel = np.flatnonzero(ok & fg)
    if len(sel) < anchors // 4:
        sel = np.flatnonzero(ok) if ok.sum() >= 4 else np.arange(len(pa))
    sel = sel[:anchors]
    return {"view_a": _intensity(sample_through(volume, ma), g),
            "view_b": _intensity(sample_through(volume, mb), g),
            "points_a": torch.as_tensor(pa[sel]), "points_b": torch.as_tensor(pb[sel])}


def sam_contrastive_loss(model, views: Dict[str, torch.Tensor], g: torch.Generator,
                         criterion_global: PixelInfoNCE, criterion_local: PixelInfoNCE
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(global InfoNCE, local InfoNCE)`` of :class:`~deepreglib.methods.same.network.SAMNet` on two views."""
    device = next(model.parameters()).device
    out_a = model(views["view_a"].to(device))
    out_b = model(views["view_b"].to(device))
    full = views["view_a"].shape[2:]
    losses = []
    for crit, ea, eb in ((criterion_global, out_a.global_embedding, out_b.global_embedding),
                         (criterion_local, out_a.local_embedding, out_b.local_embedding)):
        fa = to_feature_coords(views["points_a"].to(device), full, ea.shape[2:])
        fb = to_feature_coords(views["points_b"].to(device), full, eb.shape[2:])
        losses.append(crit(ea, eb, fa, fb, generator=g))
    return losses[0], losses[1]


# -- recipe: sam ----------------------------------------------------------------------------------
_GLOBAL_NCE = PixelInfoNCE(min_distance=1.0)  # one 1/8 voxel = 8 image voxels
_LOCAL_NCE = PixelInfoNCE(min_distance=2.0)  # two 1/2 voxels = 4 image voxels


def _build_sam(args):
    from .network import SAMNet
    return SAMNet()


def _sam_loss(model, batch, args):
    g = batch_generator(batch, args.seed, getattr(args, "current_step", None))
    views = contrastive_views(batch["fixed"].detach().cpu().float(), g,
                              max_angle=math.radians(float(getattr(args, "sam_max_angle", math.degrees(MAX_ANGLE)))))
    lg, ll = sam_contrastive_loss(model, views, g, _GLOBAL_NCE, _LOCAL_NCE)
    return lg + ll, {"global_nce": float(lg.detach()), "local_nce": float(ll.detach())}


def add_sam_arguments(p) -> None:
    """The recipe's own options (ignored by other recipes)."""
    p.add_argument("--sam-max-angle", type=float, default=math.degrees(MAX_ANGLE),
                   help="sam: largest rotation (degrees) of each of the two views (default 15: two views "
                        "differ by up to 30; SAM-affine's range needs the relative turns it should undo)")


SAM = TrainingRecipe(
    build=_build_sam, loss=_sam_loss, lr=1e-4, terms=("global_nce", "local_nce"), add_arguments=add_sam_arguments,
    cache_sets=("ixi_muse", "openneuro_ds002748", "ixi_muse_wholehead"),
    description="SAM self-supervised embeddings: pixel InfoNCE (tau 0.5, 64 hard + 64 diverse negatives) "
                "between two augmented views (crop/scale/rotation/intensity) on global (1/8) + local (1/2) "
                "embeddings")


# -- recipe: same_vxm -----------------------------------------------------------------------------
def sam_weights_path(args=None) -> Path:
    """``--same-vxm-sam-model``, else ``$DEEPREG_SAM_WEIGHTS``, else ``Resources/Models/sam.pt``."""
    from ...io.models import models_dir
    given = getattr(args, "same_vxm_sam_model", None) or os.environ.get("DEEPREG_SAM_WEIGHTS")
    return Path(given) if given else models_dir() / "sam.pt"


def _same_vxm_arguments(p) -> None:
    p.add_argument("--same-vxm-sam-model", default=None,
                   help="same_vxm: trained SAM model file (.pt); default $DEEPREG_SAM_WEIGHTS or sam.pt")
    p.add_argument("--same-vxm-sam-weight", type=float, default=SAM_WEIGHT,
                   help="same_vxm: weight gamma of the SAM similarity loss (SAME: 0.5)")
    p.add_argument("--same-vxm-unet-from", default=None, metavar="VOXELMORPH.pt",
                   help="same_vxm, a new run: start the U-Net from a trained voxelmorph (the SAM "
                        "correlation's input weights at zero, so it starts as that voxelmorph and "
                        "learns what the correlation adds)")


def _build_same_vxm(args):
    from ..weights import load_model
    from .network_voxelmorph import SAMVoxelMorph
    path = sam_weights_path(args)
    if not path.is_file():
        raise BadInputError(f"SAM-VoxelMorph needs trained SAM weights: {path} is missing. Train them first "
                            "(`deepreg train sam --export Resources/Models/sam`) or set DEEPREG_SAM_WEIGHTS.")
    sam, _ = load_model(path)
    sam = getattr(sam, "sam", sam)
    model = SAMVoxelMorph(sam=sam.config)
    model.sam.load_state_dict(sam.state_dict())
    out = getattr(args, "out", None)
    resumed = bool(out) and (Path(out) / "checkpoint.pt").is_file()  # the checkpoint's weights win
    if getattr(args, "same_vxm_unet_from", None) and not resumed:
        unet_from_voxelmorph(model, args.same_vxm_unet_from)
    return model


def unet_from_voxelmorph(model, path) -> None:
    """Copy a trained :class:`~deepreglib.methods.voxelmorph.network.VoxelMorph`'s U-Net and flow
    head into ``model`` (a :class:`SAMVoxelMorph` of the same channels). The injected block has
    the correlation's channels besides the voxelmorph's: their input weights start at zero, so
    the model's output starts exactly as the voxelmorph's."""
    from ..voxelmorph.network import VoxelMorph
    from ..weights import load_model
    vxm, _ = load_model(path)
    if not isinstance(vxm, VoxelMorph):
        raise BadInputError(f"--same-vxm-unet-from {path} holds a {type(vxm).__name__}, not a VoxelMorph")
    theirs, ours = vxm.state_dict(), {k: v for k, v in model.state_dict().items() if not k.startswith("sam.")}
    if set(theirs) != set(ours):
        raise BadInputError(f"--same-vxm-unet-from {path}: its layers differ from this SAM-VoxelMorph's; "
                            "give a voxelmorph with the same encoder and decoder channels")
    with torch.no_grad():
        for name, value in ours.items():
            src = theirs[name]
            if src.shape == value.shape:
                value.copy_(src)
            elif src.ndim == 5 and src.shape[0] == value.shape[0] and src.shape[1] < value.shape[1]:
                value.zero_()  # the injected block: the correlation's input weights start at zero
                value[:, :src.shape[1]].copy_(src)
            else:
                raise BadInputError(f"--same-vxm-unet-from {path}: {name} is {tuple(src.shape)} there and "
                                    f"{tuple(value.shape)} here; give a voxelmorph of the same channels")


def _same_vxm_card(cfg):
    """The card of a run started from a voxelmorph names it (file, sha256, steps)."""
    from ...io.models import read_model_card
    path = cfg.get("same_vxm_unet_from")
    if not path:
        return {}
    card = read_model_card(path)
    return {"unet_from_voxelmorph": {"file": Path(str(path)).name, "sha256": card.get("sha256"),
                                     "iterations": card.get("iterations")}}


def _same_vxm_terms(model, batch, reg_weight: float, sam_weight: float):
    from ...core.losses import GradientSmoothness, LocalNCC
    from .network_voxelmorph import SAMSimilarityLoss
    out = model(batch["moving"], batch["fixed"])
    ncc = LocalNCC(9)(out.warped, batch["fixed"])
    sam = SAMSimilarityLoss()(out.fixed_embedding, out.moving_embedding, out.displacement)
    grad = GradientSmoothness("l2")(out.displacement)
    total = ncc + reg_weight * grad + sam_weight * sam
    return total, {"ncc_loss": float(ncc.detach()), "sam_loss": float(sam.detach()), "grad": float(grad.detach())}, out


def _fresh_sam(model, args):
    """After ``--init-from``: the frozen SAM of ``--same-vxm-sam-model`` (or ``sam.pt``) replaces
    the copy the model file holds, so a run that goes on from shipped SAM-VoxelMorph weights
    trains on the current embeddings (e.g. the campaign's, trained on real brains since)."""
    from ..weights import load_model
    path = sam_weights_path(args)
    sam, card = load_model(path)
    sam = getattr(sam, "sam", sam)
    if sam.config != model.sam.config:
        raise BadInputError(f"{path} holds a SAM with config {sam.config}; this SAM-VoxelMorph's is "
                            f"{model.sam.config}: give SAM weights of the same architecture")
    model.sam.load_state_dict(sam.state_dict())
    return f"same_vxm: the frozen SAM is now {path} (sha256 {card.get('sha256')}, step {card.get('iterations')})"


def same_vxm_loss(model, batch, reg_weight: float = 1.0, sam_weight: float = SAM_WEIGHT):
    """SAM-VoxelMorph's loss on a batch; returns ``(total, terms)`` (see the module text)."""
    total, terms, _ = _same_vxm_terms(model, batch, reg_weight, sam_weight)
    return total, terms


def _same_vxm_loss(model, batch, args):
    """:func:`same_vxm_loss`, plus ``--label-weight`` times ``1 - Dice`` of the warped labels when
    the pair has label maps (VoxelMorph's semi-supervised term, as the campaign trains voxelmorph:
    SAME against voxelmorph at equal budget means the same supervision)."""
    total, terms, out = _same_vxm_terms(model, batch, args.reg_weight, getattr(args, "same_vxm_sam_weight", SAM_WEIGHT))
    return add_label_term(total, terms, batch, out.displacement, args)


SAME_VXM = TrainingRecipe(
    build=_build_same_vxm, loss=_same_vxm_loss, lr=1e-4, terms=("ncc_loss", "sam_loss", "grad", "dice_loss"),
    add_arguments=_same_vxm_arguments,
    after_init_from=_fresh_sam, card_entries=_same_vxm_card,
    description="SAM-VoxelMorph: (1 - local NCC) + reg_weight (lambda=1) * Grad(u) + 0.5 (gamma) * "
                "(1 - <e_f, warped e_m>), frozen SAM correlation (27 channels) before the third U-Net block, "
                "+ label_weight * (1 - Dice) of the pair's label maps when label_weight > 0")
