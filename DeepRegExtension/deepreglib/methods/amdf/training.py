"""Training recipes ``amdf_seg``, ``amdf_ae`` and ``amdf`` (see :mod:`deepreglib.train.loop`), run in
that order::

    deepreg train amdf_seg --out runs/seg --export models/amdf_seg
    deepreg train amdf_ae  --out runs/ae  --export models/amdf_ae
    deepreg train amdf --out runs/amdf --seg-model models/amdf_seg.pt --ae-model models/amdf_ae.pt

The first two need label maps: the synthetic pairs' (no ``--real-dir``) or, with ``--cache
CACHE --label-sample 0``, the cache's MUSE label maps in 16 anatomical classes
(:mod:`deepreglib.train.label_groups`), the same classes in every scan, as the auto-encoder's
anatomical prior needs; ``amdf_ae`` and ``amdf`` then train on real pairs alone
(``--real-fraction 1``), whose classes the synthetic maps do not share. The label maps are weak
supervision at training time only; inference needs the images alone. The registration loss is
``-(l_ncc NCC + l_ssim SSIM) + l_ce CE(warped moving labels, fixed labels)
+ l_ae ||enc(warped labels) - enc(fixed labels)||^2 + l_df TV(field)`` with the paper's weights
(1, 1, 1, 0.1, 3.5); NCC and SSIM enter as ``1 - NCC`` and ``1 - SSIM`` (the same gradients,
non-negative values), and the label terms are skipped on real (unlabelled) pairs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ...core.errors import BadInputError
from ...io.models import read_model_card
from ...core.losses import LocalNCC, SSIMLoss, TotalVariation, one_hot
from ..weights import load_model
from ...core.segmentation_losses import LaplacianContourLoss, SoftCrossEntropy
from ...train.label_groups import MUSE_CLASSES, MUSE_GROUPS, group_muse_labels
from ...train.recipe import TrainingRecipe
from ...core.warp import warp

#: weight of the contour loss beside cross-entropy: segmentation net, label auto-encoder
SEG_CONTOUR_WEIGHT = 1.75
AE_CONTOUR_WEIGHT = 2.0
#: fraction of voxels whose label is replaced at random in the auto-encoder's input
AE_NOISE = 0.1
#: registration loss weights (the paper's)
WEIGHTS = {"ncc": 1.0, "ssim": 1.0, "ce": 1.0, "ae": 0.1, "tv": 3.5}


def _labels(batch, recipe: str) -> torch.Tensor:
    """Fixed and moving label maps stacked along N, ``(2, 1, D, H, W)`` long."""
    if "fixed_labels" not in batch:
        raise BadInputError(f"{recipe} trains on the synthetic pairs' label maps; real scans have "
                            "none: run it without --real-dir")
    return torch.cat([batch["fixed_labels"], batch["moving_labels"]]).long()


# -- the cache's label maps -------------------------------------------------------------------------
def _cache_labels(recipe: str, real_only: bool):
    """The ``card_entries`` and ``prepare_scans`` hooks of a recipe on ``--cache``: the MUSE labels
    in :data:`~deepreglib.train.label_groups.MUSE_GROUPS`' classes, checked before any step."""
    def card_entries(cfg):
        if not cfg.get("cache"):
            return {}
        if cfg.get("label_sample", 16) != 0:
            raise BadInputError(f"{recipe} on --cache needs every label map in the same "
                                f"{MUSE_CLASSES - 1} classes (the MUSE labels grouped), not "
                                f"{cfg.get('label_sample')} labels drawn at random per pair: "
                                "give --label-sample 0")
        if real_only and float(cfg.get("real_fraction", 0.5)) < 1.0:
            raise BadInputError(f"{recipe} on --cache trains on its real pairs alone: the synthetic "
                                "pairs' label maps have other classes than the grouped MUSE labels; "
                                "give --real-fraction 1")
        return {"label_classes": {str(c): name for c, (name, _) in MUSE_GROUPS.items()}}

    def prepare_scans(vols, labels, direction, args):
        if not getattr(args, "cache", None) or labels is None:
            return vols, labels
        return vols, group_muse_labels(labels)
    return {"card_entries": card_entries, "prepare_scans": prepare_scans}


# -- segmentation network ------------------------------------------------------------------------
def build_segmenter(args):
    from .network import RoiSegmentationUNet
    return RoiSegmentationUNet()


def segmenter_loss(model, batch, args):
    """Cross-entropy + 1.75 * contour loss of the ROI (label > 0: the synthetic head) of both images."""
    roi = (_labels(batch, "amdf_seg") > 0).long()
    logits = model(torch.cat([batch["fixed"], batch["moving"]]))
    ce = F.cross_entropy(logits, roi[:, 0])
    contour = LaplacianContourLoss()(torch.softmax(logits, 1), one_hot(roi, model.num_classes))
    total = ce + SEG_CONTOUR_WEIGHT * contour
    return total, {"ce": float(ce.detach()), "contour": float(contour.detach())}


# -- label auto-encoder ----------------------------------------------------------------------------
def build_autoencoder(args):
    from .network import LabelAutoEncoder
    return LabelAutoEncoder(num_classes=MUSE_CLASSES) if getattr(args, "cache", None) else LabelAutoEncoder()


def _check_label_range(labels: torch.Tensor, n: int) -> None:
    if int(labels.max()) >= n:
        raise BadInputError(f"label value {int(labels.max())} does not fit the auto-encoder's "
                            f"{n} classes; train it with as many classes as the label maps have")


def autoencoder_loss(model, batch, args):
    """Denoising: labels with ``AE_NOISE`` of the voxels replaced at random -> clean labels;
    cross-entropy + 2 * contour loss. (The noise uses torch's global random state.)"""
    from .network import corrupt_labels
    labels = _labels(batch, "amdf_ae")
    n = model.num_classes
    _check_label_range(labels, n)
    noisy = corrupt_labels(labels, n, AE_NOISE)
    logits = model(one_hot(noisy, n))
    ce = F.cross_entropy(logits, labels[:, 0])
    contour = LaplacianContourLoss()(torch.softmax(logits, 1), one_hot(labels, n))
    total = ce + AE_CONTOUR_WEIGHT * contour
    return total, {"ce": float(ce.detach()), "contour": float(contour.detach())}


# -- registration ----------------------------------------------------------------------------------
_FROZEN: Dict[Tuple[str, str], torch.nn.Module] = {}


def frozen_autoencoder(path, device) -> torch.nn.Module:
    """The trained :class:`LabelAutoEncoder` from ``path`` (checksum verified), in eval mode with
    gradients off, loaded once per path and device."""
    from .network import LabelAutoEncoder
    if not path:
        raise BadInputError("amdf needs --ae-model: the model file of a trained amdf_ae")
    key = (str(path), str(device))
    if key not in _FROZEN:
        model, _ = load_model(path, device=device)
        if not isinstance(model, LabelAutoEncoder):
            raise BadInputError(f"--ae-model {path} holds a {type(model).__name__}, not a LabelAutoEncoder")
        _FROZEN[key] = model.requires_grad_(False).eval()
    return _FROZEN[key]


def _checkpoint_config(out):
    """The architecture saved in ``out``'s checkpoint (``None`` without one): a resumed run needs
    neither ``--seg-model`` nor ``--init-from`` again. An older checkpoint without it: the
    config of the model file the run was started from (its ``config.json``)."""
    if not out or not (Path(out) / "checkpoint.pt").is_file():
        return None
    ckpt = torch.load(Path(out) / "checkpoint.pt", map_location="cpu", weights_only=True)
    if "config" in ckpt:
        return ckpt["config"]
    started = json.loads((Path(out) / "config.json").read_text()).get("initialised_from") or {}
    return read_model_card(started["path"])["config"] if started.get("path") else None


def build_amdf(args):
    """AMDF with the trained segmentation net from ``--seg-model`` (frozen, saved inside the
    model), or, with ``--init-from`` a trained AMDF and no ``--seg-model``, the architecture of
    that model (its weights, segmenter included, are loaded by the training loop);
    ``--ae-model`` is checked here so a bad path fails before training starts."""
    from .network import AMDF, RoiSegmentationUNet
    seg_path = getattr(args, "seg_model", None)
    init_from = getattr(args, "init_from", None)
    resumed = _checkpoint_config(getattr(args, "out", None))
    if not seg_path and resumed is not None:  # a resumed run: its checkpoint holds the segmenter
        frozen_autoencoder(getattr(args, "ae_model", None), "cpu")
        return AMDF(**resumed)
    if not seg_path and init_from:  # the trained AMDF carries its frozen segmenter
        from ...io.models import read_model_card
        frozen_autoencoder(getattr(args, "ae_model", None), "cpu")
        return AMDF(**read_model_card(init_from)["config"])
    if not seg_path:
        raise BadInputError("amdf needs --seg-model: the model file of a trained amdf_seg "
                            "(or --init-from a trained amdf, which carries its segmenter)")
    seg, _ = load_model(seg_path)
    if not isinstance(seg, RoiSegmentationUNet):
        raise BadInputError(f"--seg-model {seg_path} holds a {type(seg).__name__}, not a RoiSegmentationUNet")
    frozen_autoencoder(getattr(args, "ae_model", None), "cpu")
    model = AMDF(seg_channels=seg.config["channels"], seg_classes=seg.config["num_classes"])
    model.segmenter.load_state_dict(seg.state_dict())
    return model


def amdf_loss(model, batch, args):
    """``(total, terms)``; ``args.reg_weight`` scales the TV weight (1: the paper's 3.5)."""
    out = model(batch["moving"], batch["fixed"])
    fixed = batch["fixed"] * out.mask_fixed
    ncc = LocalNCC(9)(out.warped, fixed)
    ssim = SSIMLoss()(out.warped, fixed)
    tv = TotalVariation()(out.displacement)
    total = (WEIGHTS["ncc"] * ncc + WEIGHTS["ssim"] * ssim
             + WEIGHTS["tv"] * getattr(args, "reg_weight", 1.0) * tv)
    terms = {"ncc_loss": float(ncc.detach()), "ssim_loss": float(ssim.detach()), "tv": float(tv.detach())}
    if "fixed_labels" in batch:
        ae = frozen_autoencoder(getattr(args, "ae_model", None), out.displacement.device)
        n = ae.num_classes
        _check_label_range(_labels(batch, "amdf"), n)
        # border padding: a one-hot map pulled from outside the image stays a distribution
        warped_labels = warp(one_hot(batch["moving_labels"].long(), n), out.displacement, padding="border")
        fixed_labels = one_hot(batch["fixed_labels"].long(), n)
        ce = SoftCrossEntropy()(warped_labels, fixed_labels)
        code = ae.encode(warped_labels) - ae.encode(fixed_labels)
        anat = (code * code).mean()
        total = total + WEIGHTS["ce"] * ce + WEIGHTS["ae"] * anat
        terms.update({"ce": float(ce.detach()), "ae": float(anat.detach())})
    return total, terms


#: on --cache, the labelled scans only (the ROI and the classes come from the label maps; for amdf
#: itself, its label terms: an unlabelled pair would train on the image terms alone)
LABELLED_SETS = ("ixi_muse",)

AMDF_SEG = TrainingRecipe(
    build=build_segmenter, loss=segmenter_loss, lr=1e-4, terms=("ce", "contour"),
    cache_sets=LABELLED_SETS, **_cache_labels("amdf_seg", real_only=False),
    description=f"AMDF ROI segmentation U-Net: cross-entropy + {SEG_CONTOUR_WEIGHT:g} * Laplacian "
                "contour loss, ROI = label > 0 of synthetic label maps")
AMDF_AE = TrainingRecipe(
    build=build_autoencoder, loss=autoencoder_loss, lr=1e-4, terms=("ce", "contour"),
    cache_sets=LABELLED_SETS, **_cache_labels("amdf_ae", real_only=True),
    description=f"AMDF denoising label auto-encoder: cross-entropy + {AE_CONTOUR_WEIGHT:g} * Laplacian "
                f"contour loss, {AE_NOISE:g} of input voxels relabelled at random")
def _amdf_hooks():
    """AMDF's cache hooks, its card also naming the label auto-encoder its anatomical term used
    (file name, sha256 and steps), so the card says which prior shaped the weights."""
    hooks = _cache_labels("amdf", real_only=True)
    cache_entries = hooks["card_entries"]

    def card_entries(cfg):
        entries = dict(cache_entries(cfg))
        if cfg.get("ae_model"):
            card = read_model_card(cfg["ae_model"])
            entries["anatomy_autoencoder"] = {"file": Path(str(cfg["ae_model"])).name, "sha256": card.get("sha256"),
                                              "iterations": card.get("iterations"),
                                              "label_classes": len(card.get("label_classes", {})) or None}
        return entries
    return {**hooks, "card_entries": card_entries}


AMDF_RECIPE = TrainingRecipe(
    build=build_amdf, loss=amdf_loss, lr=1e-4, terms=("ncc_loss", "ssim_loss", "tv", "ce", "ae"),
    cache_sets=LABELLED_SETS, **_amdf_hooks(),
    description="AMDF multi-scale registration: (1 - local NCC) + (1 - SSIM) + 3.5 * reg_weight * TV(field) "
                "+ CE(warped labels, fixed labels) + 0.1 * ||enc(warped labels) - enc(fixed labels)||^2 "
                "(label terms on synthetic pairs; needs --seg-model and --ae-model)")
