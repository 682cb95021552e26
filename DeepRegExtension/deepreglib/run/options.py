"""What a run is asked to do (:class:`RegisterOptions`, the CLI's ``register`` arguments) and the
checks made before any work: the device and the output folder."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional

import torch

from ..core.errors import BadInputError
from ..io.exchange import check_output_folder  # noqa: F401 (part of the run's checks)
from ..io.protocol import CLASSIC_INIT_CHOICES
from ..methods.presets import preset_defaults
from .initializers import init_choices


@dataclass
class RegisterOptions:
    """Everything one run needs (the CLI's ``register`` arguments)."""

    fixed: str
    moving: str
    out: str
    #: None: the preset's method (see :func:`apply_preset`)
    method: Optional[str] = None
    #: ``fast``, ``balanced`` or ``accurate`` (:mod:`deepreglib.methods.presets`); None: balanced
    #: when no method is named, else none
    preset: Optional[str] = None
    device: str = "auto"
    refine: int = 0
    #: None: ``auto`` before a deformable method, ``none`` before a rigid/affine one (which is
    #: itself the alignment); see :func:`apply_preset`
    init: Optional[str] = None
    initial_transform: Optional[str] = None
    fixed_mask: Optional[str] = None
    moving_mask: Optional[str] = None
    fixed_labels: Optional[str] = None
    moving_labels: Optional[str] = None
    fixed_landmarks: Optional[str] = None
    moving_landmarks: Optional[str] = None
    weights: Optional[str] = None
    method_options: Dict[str, object] = field(default_factory=dict)
    qa: bool = True
    cpu_fallback: bool = True
    threads: Optional[int] = None
    #: ``same`` (one contrast, e.g. two T1 MRs from any scanners) or ``different`` (MR to
    #: ultrasound, MR to CT): the alignment then uses mutual information and the instance
    #: optimiser MIND-SSC (see :data:`CONTRASTS`)
    contrast: str = "same"


#: ``--contrast`` values.
CONTRASTS = ("same", "different")


def apply_preset(opts: RegisterOptions) -> RegisterOptions:
    """``opts`` with the preset's method and method options filled in where not given
    (:func:`deepreglib.methods.presets.preset_defaults`), and the default ``--init``: ``auto``
    before a deformable method, ``none`` before a rigid or affine method. Returns a new object.
    ``--weights`` with neither a method nor a preset names weights of the default network method
    (:data:`~deepreglib.methods.registry.DEFAULT_METHOD`), which then runs without a preset."""
    if opts.weights and not opts.method and not opts.preset:
        from ..methods.registry import DEFAULT_METHOD
        opts = replace(opts, method=DEFAULT_METHOD)
    preset = preset_defaults(opts.preset, opts.method)
    if preset is None:
        opts = replace(opts, method_options=_contrast_options(opts.method, {}, opts))
        if opts.init is None:
            from ..methods.registry import get_method_info
            kind = get_method_info(opts.method).kind if opts.method else "deformable"
            return replace(opts, init="auto" if kind == "deformable" else "none")
        return opts
    method = opts.method or preset.method
    options = dict(preset.method_options) if method == preset.method else {}
    return replace(opts, method=method, method_options=_contrast_options(method, options, opts),
                   preset=preset.name, init=opts.init or preset.init)


def _contrast_options(method: Optional[str], defaults: Dict[str, object], opts: RegisterOptions) -> dict:
    """``defaults``, then what ``--contrast different`` implies for the method (the instance
    optimiser on MIND-SSC, with or without a preset), then the user's own method options."""
    options = dict(defaults)
    if opts.contrast == "different" and method == "instance":
        options["similarity"] = "mind"
    options.update(opts.method_options)
    return options


def check_options(opts: RegisterOptions) -> None:
    """Refuse options no run can use (BadInputError), before anything is read."""
    classic = [value for _label, value in CLASSIC_INIT_CHOICES]
    if opts.init is None:
        opts = apply_preset(opts)
    if opts.init not in classic and opts.init not in init_choices():
        raise BadInputError(f"--init must be one of {', '.join(init_choices())}, got {opts.init!r}")
    if opts.refine < 0:
        raise BadInputError(f"--refine must be >= 0, got {opts.refine}")
    check_contrast(opts.contrast)
    check_output_folder(Path(opts.out).resolve())


def check_contrast(value: str) -> None:
    """Refuse a ``--contrast`` (or a batch table's ``contrast`` cell) that is not in :data:`CONTRASTS`."""
    if value not in CONTRASTS:
        raise BadInputError(f"--contrast must be one of {', '.join(CONTRASTS)} (different: MR to ultrasound "
                            f"or CT), got {value!r}")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; explicit names are checked to exist."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BadInputError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError("device cuda was asked for but torch sees no CUDA GPU; use --device cpu "
                                "or auto (or install a CUDA build of PyTorch)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInputError(f"device {name} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise BadInputError("device mps was asked for but is not available; use --device cpu or auto")
    elif dev.type != "cpu":
        raise BadInputError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


