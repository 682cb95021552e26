"""The one list of registration methods. The CLI's ``--method`` choices, ``deepreg methods``, the
Slicer module's method selector and the tests all read :data:`METHODS`.

Entries are plain data; the implementation is imported only when a method is run, so listing
methods is instant and needs no torch model code.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from .errors import BadInputError

KINDS = ("rigid", "affine", "deformable")


@dataclass(frozen=True)
class MethodInfo:
    """What a method is and what it gives back.

    Attributes:
        name: the ``--method`` value.
        title: human name shown in the GUI.
        description: one or two sentences for the GUI and ``deepreg methods``.
        kind: ``rigid``, ``affine`` or ``deformable`` (what its transform output is).
        weights: model file stem under ``Resources/Models`` (``None``: needs no weights).
        implementation: ``"module:Class"`` of its :class:`~deepreglib.methods.base.Method`.
        outputs: names of the outputs it writes besides the common ones (warped, transform,
            jacobian, manifest, qa picture).
        expected_seconds: rough wall time for a 160x192x224 pair, per device kind (CPU: whole
            ``register`` calls in ``benchmarks/results``; CUDA: an estimate until a GPU run lands).
        input_note: what inputs it expects (intra/inter-subject, modality, pre-alignment).
        supports_refine: whether ``--refine N`` applies (instance optimisation of its field).
        reference: the paper it follows.
    """

    name: str
    title: str
    description: str
    kind: str
    weights: Optional[str]
    implementation: str
    outputs: Tuple[str, ...] = ()
    expected_seconds: Dict[str, float] = field(default_factory=dict)
    input_note: str = ""
    supports_refine: bool = True
    reference: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["outputs"] = list(self.outputs)
        return d


METHODS: Dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> MethodInfo:
    if info.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {info.kind!r}")
    METHODS[info.name] = info
    return info


def get_method_info(name: str) -> MethodInfo:
    if name not in METHODS:
        raise BadInputError(f"unknown method {name!r}; available: {', '.join(METHODS)} "
                            "(run `deepreg methods` for descriptions)")
    return METHODS[name]


def method_names() -> List[str]:
    return list(METHODS)


def create_method(name: str, device, **options):
    """Instantiate the method's implementation (imports it on first use)."""
    info = get_method_info(name)
    module_name, cls_name = info.implementation.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(info=info, device=device, **options)


DEFAULT_METHOD = "voxelmorph"

register_method(MethodInfo(
    name="voxelmorph",
    title="VoxelMorph (diffeomorphic)",
    description="U-Net predicting a stationary velocity field, integrated by scaling and squaring "
                "into a diffeomorphic deformation. The baseline the attention methods extend.",
    kind="deformable",
    weights="voxelmorph",
    implementation="deepreglib.methods.voxelmorph:VoxelMorphMethod",
    outputs=("displacement", "inverse_displacement", "velocity"),
    expected_seconds={"cpu": 8.0, "cuda": 0.5},
    input_note="Same-modality 3D pair, roughly (affinely) aligned: use --init affine otherwise.",
    reference="Dalca et al., MICCAI 2018 / MedIA 2019; Balakrishnan et al., TMI 2019",
))

register_method(MethodInfo(
    name="iterative",
    title="Iterative diffeomorphic (no network)",
    description="Classic multi-resolution optimisation of a stationary velocity field (local NCC "
                "plus smoothness) on the given pair; needs no trained weights.",
    kind="deformable",
    weights=None,
    implementation="deepreglib.methods.iterative:IterativeMethod",
    outputs=("displacement", "inverse_displacement", "velocity"),
    expected_seconds={"cpu": 25.0, "cuda": 3.0},
    input_note="Same-modality 3D pair, roughly aligned (use --init affine otherwise).",
    supports_refine=False,
    reference="instance optimisation as in Learn2Reg baselines",
))

register_method(MethodInfo(
    name="carnet",
    title="CAR-Net (co-attention, diffeomorphic)",
    description="Co-attention between fixed and moving features guides a probabilistic U-Net that "
                "predicts a stationary velocity field (mean used at inference), integrated into a "
                "diffeomorphism. Shows where each image attended and how certain the field is.",
    kind="deformable",
    weights="carnet",
    implementation="deepreglib.methods.carnet:CarNetMethod",
    outputs=("displacement", "inverse_displacement", "velocity", "attention_fixed", "attention_moving",
             "uncertainty_mm", "query_attention"),
    expected_seconds={"cpu": 12.0, "cuda": 1.0},
    input_note="Same-modality 3D pair, roughly (affinely) aligned: use --init affine otherwise. "
               "Option query_point=x,y,z (LPS mm) adds the attention row of that fixed point.",
    reference="Shi et al., CAR-Net: co-attention guided diffeomorphic registration (2022)",
))

register_method(MethodInfo(
    name="amdf",
    title="Attention-guided multi-scale fusion",
    description="A segmentation net masks each image to its region of interest; a U-Net predicts "
                "fields at 4 scales that are fused coarse to fine by learned attention weights.",
    kind="deformable",
    weights="amdf",
    implementation="deepreglib.methods.amdf:AmdfMethod",
    outputs=("displacement", "roi_mask_fixed", "roi_mask_moving", "fusion_weight_s1", "fusion_weight_s2",
             "fusion_weight_s4", "fusion_weight_s8", "field_s1_mm", "field_s2_mm", "field_s4_mm", "field_s8_mm"),
    expected_seconds={"cpu": 21.0, "cuda": 1.0},
    input_note="Same-modality 3D pair, roughly aligned (use --init affine otherwise).",
    reference="Attention-guided fusion of multi-scale deformation fields (DFSA)",
))

register_method(MethodInfo(
    name="r2n2",
    title="R2N2 (recurrent local deformations)",
    description="A recurrent network adds one local Gaussian deformation at a time (centre, "
                "oriented extent, weight), stopping when the similarity no longer improves; the "
                "sequence can be played back step by step.",
    kind="deformable",
    weights="r2n2",
    implementation="deepreglib.methods.r2n2:R2N2Method",
    outputs=("displacement", "r2n2_deformations", "r2n2_steps"),
    expected_seconds={"cpu": 8.0, "cuda": 1.5},
    input_note="Same-modality 3D pair, roughly aligned; options max_steps, stop_threshold.",
    reference="Sandkühler et al., Recurrent Registration Neural Networks for Deformable Image "
              "Registration, NeurIPS 2019 (extended to 3D)",
))

register_method(MethodInfo(
    name="dnet",
    title="D-Net (rigid, any rotation)",
    description="Siamese encoder-decoder with mutual non-local attention regresses a rigid pose "
                "(6D rotation + translation) in one pass, over the full rotation range. Also "
                "available as --init dnet in front of any deformable method.",
    kind="rigid",
    weights="dnet",
    implementation="deepreglib.methods.dnet:DNetMethod",
    outputs=("transform", "mutual_attention"),
    expected_seconds={"cpu": 1.0, "cuda": 0.2},
    input_note="Same subject, any pose (intra-subject rigid). Option query_point=x,y,z for the map.",
    supports_refine=False,
    reference="D-Net: Siamese encoder-decoder with mutual non-local links for rigid registration",
))

register_method(MethodInfo(
    name="same",
    title="SAME (anatomical embeddings)",
    description="Self-supervised anatomical embeddings match points between the scans: "
                "SAM-affine, then SAM-coarse, then SAM-VoxelMorph. Robust to large offsets; "
                "each step can be run alone (option steps=affine,coarse,voxelmorph).",
    kind="deformable",
    weights="same",
    implementation="deepreglib.methods.same:SAMEMethod",
    outputs=("displacement", "same_affine", "same_coarse_displacement", "same_affine_fixed_points",
             "same_affine_moving_points", "same_coarse_fixed_points", "same_coarse_moving_points",
             "embedding_similarity", "body_mask"),
    expected_seconds={"cpu": 18.0, "cuda": 1.5},
    input_note="Unaligned or aligned pairs of the same body region; option fit=lstsq|ransac|irls for SAM-affine.",
    reference="Liu et al., SAME: Deformable Image Registration based on Self-supervised Anatomical "
              "Embeddings, MICCAI 2021",
))
