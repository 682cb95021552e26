"""Stage ``load``: read the images, labels, masks and landmarks of a run and check they can be
registered. Images become ``(1, 1, D, H, W)`` tensors on their own grids (no resampling yet)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from ..core.errors import BadInputError
from ..core.geometry import Grid
from ..core.preprocess import normalize_intensity
from ..io import images as io
from .memory import check_memory
from .options import RegisterOptions
from .session import Session

LABEL_INPUTS = ("fixed_labels", "moving_labels", "fixed_mask", "moving_mask")
LANDMARK_INPUTS = ("fixed_landmarks", "moving_landmarks")


@dataclass
class Inputs:
    """A run's inputs. ``fixed``/``moving``: intensities as read; ``*_n``: normalised to [0, 1]
    (what initialisers and networks see). ``labels``: key of :data:`LABEL_INPUTS` -> (tensor,
    grid); ``landmarks``: key of :data:`LANDMARK_INPUTS` -> ``(N, 3)`` LPS mm."""

    fixed: torch.Tensor
    fixed_grid: Grid
    moving: torch.Tensor
    moving_grid: Grid
    fixed_n: torch.Tensor = None
    moving_n: torch.Tensor = None
    labels: Dict[str, Tuple[torch.Tensor, Grid]] = field(default_factory=dict)
    landmarks: Dict[str, np.ndarray] = field(default_factory=dict)
    #: what the input checks found, for the manifest (:func:`input_checks`)
    checks: Dict[str, object] = field(default_factory=dict)


#: The policy for NaN/infinite voxels, written once: refused at load time (exit 2, the message
#: names the image, the count and how to fix it), for images, masks and label maps alike; so a
#: run that starts has only finite voxels and nothing non-finite reaches an output.
NON_FINITE_POLICY = "refused"


def input_checks(read: Sequence[str]) -> Dict[str, object]:
    """The manifest's ``input_checks``: the non-finite policy and, per input read, the number of
    non-finite voxels found (0 for every run that got past ``load``)."""
    return {"non_finite": NON_FINITE_POLICY, "non_finite_voxels": {k: 0 for k in read}}


def load(opts: RegisterOptions, session: Session) -> Inputs:
    with session.stage("read"):
        session.reporter.progress("read", 0.0, "reading images")
        _check_memory(opts, session)
        fixed, fixed_grid = io.image_to_tensor(_read("fixed image", io.read_image, opts.fixed))
        moving, moving_grid = io.image_to_tensor(_read("moving image", io.read_image, opts.moving))
        for name, g in (("fixed", fixed_grid), ("moving", moving_grid)):
            if min(g.shape) < 4:
                raise BadInputError(f"the {name} image is {list(reversed(g.shape))} voxels: at least "
                                    "4 voxels along every axis are needed for a 3D registration")
        inputs = Inputs(fixed, fixed_grid, moving, moving_grid)
        for key in LABEL_INPUTS:
            if getattr(opts, key):
                img = _read(f"--{key.replace('_', '-')}", io.read_labels, getattr(opts, key))
                inputs.labels[key] = io.image_to_tensor(img, dtype=torch.float32)
        for key in LANDMARK_INPUTS:
            if getattr(opts, key):
                inputs.landmarks[key] = io.read_landmarks(getattr(opts, key))[1]
        _check_landmarks(inputs.landmarks)
        inputs.checks = input_checks(["fixed", "moving", *inputs.labels])
        session.reporter.progress("read", 1.0, "images read")
    session.check()
    inputs.fixed_n = normalize_intensity(fixed)
    inputs.moving_n = normalize_intensity(moving)
    return inputs


def _check_memory(opts: RegisterOptions, session: Session) -> None:
    """Refuse, before reading the voxels, a pair too big for this machine (exit 2 with the
    estimate); the estimate goes to the manifest (``memory``)."""
    fixed, moving = io.image_size(opts.fixed), io.image_size(opts.moving)
    if fixed is None or moving is None:  # DICOM folders or unreadable files: reading says more
        return
    labels = [io.image_size(getattr(opts, k)) for k in LABEL_INPUTS if getattr(opts, k)]
    session.details["memory"] = check_memory(fixed[:3], moving[:3], [s[:3] for s in labels if s])


def _read(role: str, reader, path):
    """``reader(path)``; a non-finite refusal names the image's role (fixed, moving, a mask)."""
    try:
        return reader(path)
    except io.NonFiniteVoxelsError as e:
        raise BadInputError(f"the {role}: {e}") from None


def _check_landmarks(landmarks: Dict[str, np.ndarray]) -> None:
    if len(landmarks) == 1:
        raise BadInputError("landmarks need both --fixed-landmarks and --moving-landmarks")
    if len(landmarks) == 2 and len(landmarks["fixed_landmarks"]) != len(landmarks["moving_landmarks"]):
        raise BadInputError("fixed and moving landmark files list a different number of points; "
                            "they must correspond one to one, in the same order")
