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
        expected_seconds: rough wall time for a 160x192x224 pair, per device kind.
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
