"""What a method gives the training loop: a :class:`TrainingRecipe` (network, loss, defaults and
hooks), and :func:`label_dice_term`, the label supervision several recipes share."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..core.losses import DiceLoss, one_hot
from ..core.warp import warp


@dataclass
class TrainingRecipe:
    """How to train one method.

    Attributes:
        build: ``(args) -> nn.Module`` (the module's ``.config`` is what gets saved).
        loss: ``(model, batch) -> (total, {term: value})``; ``batch`` is a dict of tensors with
            ``fixed``, ``moving`` ``(N, 1, D, H, W)`` in [0, 1] and, for synthetic pairs,
            ``fixed_labels``, ``moving_labels``, ``displacement``.
        description: one line for ``--help``.
    """

    build: Callable[[argparse.Namespace], nn.Module]
    loss: Callable[[nn.Module, Dict[str, torch.Tensor], argparse.Namespace],
                   Tuple[torch.Tensor, Dict[str, float]]]
    description: str
    lr: float = 1e-4
    #: names of the loss terms ``loss`` may report (the columns of ``loss.csv``)
    terms: Tuple[str, ...] = ()
    #: extra keyword arguments of ``torch.optim.Adam`` (e.g. ``{"amsgrad": True}``)
    optimizer_options: Dict[str, object] = field(default_factory=dict)
    #: adds the recipe's own command-line options (named ``--METHOD-...``, with defaults)
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    #: ``(vols, shape, rng) -> batch`` replacing :func:`real_pair` for the real batches (e.g.
    #: D-Net, which sees whole volumes at inference, trains on whole volumes, not crops)
    real_batch: Optional[Callable[[List[torch.Tensor], Sequence[int], np.random.Generator],
                                  Dict[str, torch.Tensor]]] = None
    #: ``(args) -> bool``: whether batches get random axis flips (default yes); D-Net learning poses
    #: relative to the scans' own orientation must not see mirrored scans
    flips: Optional[Callable[[argparse.Namespace], bool]] = None
    #: ``(shape, bank_seed, args) -> batch or None`` replacing :func:`synthetic_batch` for the
    #: synthetic batches when it returns a batch (e.g. R2N2's curriculum of pairs from its own
    #: transformation class); it should cache, as :func:`synthetic_batch` does
    synthetic: Optional[Callable[[Sequence[int], int, argparse.Namespace],
                                 Optional[Dict[str, torch.Tensor]]]] = None
    #: ``(run args as a dict) -> entries`` added to the exported model card (e.g. D-Net's
    #: ``grid_direction``, the orientation its real scans were seen in); also called once before
    #: training, so data it refuses (:class:`BadInputError`) stops the run before any step
    card_entries: Optional[Callable[[Dict[str, object]], Dict[str, object]]] = None
    #: ``(vols, labels, direction, args) -> (vols, labels)``: the real scans (and their label maps
    #: or ``None``) once before training, given the direction they are stored in
    #: (:func:`~deepreglib.train.loop.training_scan_direction`); e.g. D-Net lays them out in its
    #: cube's direction
    prepare_scans: Optional[Callable[[List[torch.Tensor], Optional[List], Optional[Sequence[float]],
                                      argparse.Namespace], Tuple[List[torch.Tensor], Optional[List]]]] = None
    #: the training cache's sets the recipe trains on (``--cache``; names of
    #: :data:`deepreglib.train.cache.DATASETS`); None: :data:`~deepreglib.train.cache.TRAINING_SETS`,
    #: the skull-stripped brains (a registration pair must be two images of one kind); D-Net and
    #: SAM, which see one scan at a time, also take the whole-head scans
    cache_sets: Optional[Tuple[str, ...]] = None
    #: on the CPU, train with the network's weights and the batch's volumes in channels-last
    #: layout (oneDNN's 3D convolutions are faster so; the loss is the same). Only for recipes
    #: whose code never ``.view``s a 5D tensor, which a channels-last tensor refuses.
    channels_last: bool = False
    #: ``(model, args) -> message or None``, called after ``--init-from`` loaded a model file into
    #: a new run (not on resume): e.g. SAM-VoxelMorph swaps in the current frozen SAM, which the
    #: model file holds an older copy of
    after_init_from: Optional[Callable[[nn.Module, argparse.Namespace], Optional[str]]] = None


def label_dice_term(batch, displacement):
    """``1 - Dice`` of the moving labels warped by ``displacement`` against the fixed labels:
    the synthetic pairs' label maps (SynthMorph's anatomy-agnostic supervision) or the cached
    real scans' sampled labels (VoxelMorph's semi-supervised variant); training only."""
    n = int(max(batch["fixed_labels"].max(), batch["moving_labels"].max())) + 1
    warped = warp(one_hot(batch["moving_labels"].long(), n), displacement)
    return DiceLoss()(warped, one_hot(batch["fixed_labels"].long(), n))


def add_label_term(total, terms, batch, displacement, args):
    """``total + label_weight * (1 - Dice)`` when ``args.label_weight > 0`` and the pair has
    label maps (logged as ``dice_loss``); ``(total, terms)`` unchanged otherwise."""
    label_weight = getattr(args, "label_weight", 0.0)
    if label_weight > 0 and "fixed_labels" in batch:
        dice = label_dice_term(batch, displacement)
        total = total + label_weight * dice
        terms = {**terms, "dice_loss": float(dice.detach())}
    return total, terms
