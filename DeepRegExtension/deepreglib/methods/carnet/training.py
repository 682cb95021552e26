"""Training recipe ``carnet``: ``deepreg train carnet --out DIR ...`` (see :mod:`deepreglib.train.loop`).

Loss (CAR-Net): ``l0 * (1 - NCC) + l1 * KL(q(v | F, M) || p(v))`` with the paper's weights
``l0 = 20``, ``l1 = 0.1`` as the starting point; NCC is the local NCC (window 9) of the warped
moving image and the fixed image, the velocity ``v`` is a posterior sample, the KL is
:class:`~deepreglib.core.losses.KLDivergence` with the Laplacian smoothness prior. Adam at 1e-4.
"""
from __future__ import annotations

import math

from ...core.losses import KLDivergence, LocalNCC
from ...train.recipe import TrainingRecipe, add_label_term

#: the paper's loss weights
NCC_WEIGHT = 20.0
KL_WEIGHT = 0.1
#: precision of the Laplacian prior on the velocity (VoxelMorph-diff's prior_lambda)
PRIOR_LAMBDA = 20.0


def build_carnet(args):
    """CAR-Net with the log-variance starting at the KL's optimum for an interior voxel,
    ``-log(6 * PRIOR_LAMBDA)``: VoxelMorph-diff's -10 would take ~10^5 Adam steps at 1e-4 to
    climb there through the head's bias, and the uncertainty map would show the initialisation."""
    from .network import CarNet
    return CarNet(init_log_var=-math.log(6.0 * PRIOR_LAMBDA))


def carnet_loss(model, batch, args):
    """``(total, terms)`` for one batch; ``args.reg_weight`` scales the KL weight (1: the
    paper's 0.1) and ``args.label_weight > 0`` adds ``1 - Dice`` of the synthetic label maps, as
    for ``voxelmorph``, so the two can be trained with the same supervision."""
    out = model(batch["moving"], batch["fixed"])
    sim = LocalNCC(9)(out.warped, batch["fixed"])
    kl = KLDivergence(PRIOR_LAMBDA)(out.velocity_mean, out.log_var)
    total = NCC_WEIGHT * sim + KL_WEIGHT * getattr(args, "reg_weight", 1.0) * kl
    terms = {"ncc_loss": float(sim.detach()), "kl": float(kl.detach())}
    return add_label_term(total, terms, batch, out.displacement, args)


CARNET = TrainingRecipe(
    build=build_carnet, loss=carnet_loss, lr=1e-4, terms=("ncc_loss", "kl", "dice_loss"), channels_last=True,
    description=f"CAR-Net: {NCC_WEIGHT:g} * (1 - local NCC, window 9) + {KL_WEIGHT:g} * reg_weight * "
                f"KL(posterior || Laplacian prior, lambda {PRIOR_LAMBDA:g}) of a sampled velocity, "
                "+ label_weight * (1 - Dice) of synthetic label maps when label_weight > 0")
