"""What a method is, as plain data: :class:`MethodInfo` (what the GUI, ``deepreg methods`` and the
manifest show) and :class:`MethodSpec` (the one ``SPEC`` of a method folder: its info, networks,
training recipes and the initial alignments it offers).

Torch-free and import-free: a spec names code as ``"module:attribute"`` strings, which the
registry (:mod:`deepreglib.methods.registry`) imports only when that code is used. So listing
methods needs no torch model code, and reading a spec changes no state anywhere.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

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


    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class LearnedInitializer:
    """An ``--init`` choice a method offers (e.g. D-Net's pose in front of any deformable method).

    Attributes:
        function: ``"module:function"`` with the signature of
            :data:`deepreglib.classic.initial.INITIALIZERS`'s values plus ``weights=PATH``.
        weights: model file stems it can use, first found wins; the choice is offered only when
            one of them is in the models folder.
        refined_by: a classic initializer (``rigid`` or ``affine``) that polishes its answer; adds
            the choice ``NAME+refined_by``.
        label, refined_label: what the Slicer module's "Initial alignment" list shows.
    """

    function: str
    weights: Tuple[str, ...]
    refined_by: Optional[str] = None
    label: str = ""
    refined_label: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """Everything the engine knows about one method folder.

    Attributes:
        info: the method as ``--method`` offers it.
        networks: network class names that model files may name -> ``"module:Class"``
            (:func:`deepreglib.methods.weights.load_model` rebuilds only these).
        recipes: ``deepreg train`` names -> ``"module:RECIPE"``
            (a :class:`deepreglib.train.recipe.TrainingRecipe`).
        initializers: ``--init`` names -> :class:`LearnedInitializer`.
        order: place in the method lists (smaller first; built-in methods use 10..70).
    """

    info: MethodInfo
    networks: Dict[str, str] = field(default_factory=dict)
    recipes: Dict[str, str] = field(default_factory=dict)
    initializers: Dict[str, LearnedInitializer] = field(default_factory=dict)
    order: int = 100
