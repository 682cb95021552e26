"""How ``deepreg train voxelmorph`` trains the diffeomorphic VoxelMorph."""
from __future__ import annotations

from ...train.recipe import TrainingRecipe, add_label_term


def _build_voxelmorph(args):
    from .network import VoxelMorph
    return VoxelMorph()


def _voxelmorph_loss(model, batch, args):
    from ...core.losses import GradientSmoothness, LocalNCC
    out = model(batch["moving"], batch["fixed"])
    sim = LocalNCC(9)(out.warped, batch["fixed"])
    reg = GradientSmoothness("l2")(out.displacement)
    total = sim + args.reg_weight * reg
    terms = {"ncc_loss": float(sim.detach()), "grad": float(reg.detach())}
    return add_label_term(total, terms, batch, out.displacement, args)


VOXELMORPH = TrainingRecipe(
    build=_build_voxelmorph, loss=_voxelmorph_loss, lr=1e-4, terms=("ncc_loss", "grad", "dice_loss"), channels_last=True,
    description="diffeomorphic VoxelMorph: local NCC (window 9) + reg_weight * gradient smoothness of the "
                "displacement, + label_weight * (1 - Dice) of synthetic label maps when label_weight > 0")
