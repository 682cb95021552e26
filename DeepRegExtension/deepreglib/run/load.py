"""Stage ``load``: read the images, labels, masks and landmarks of a run and check they can be
registered. Images become ``(1, 1, D, H, W)`` tensors on their own grids (no resampling yet)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np
import torch

from ..core.errors import BadInputError
from ..core.geometry import Grid
from ..core.preprocess import normalize_intensity
from ..io import images as io
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


def load(opts: RegisterOptions, session: Session) -> Inputs:
    with session.stage("read"):
        session.reporter.progress("read", 0.0, "reading images")
        fixed, fixed_grid = io.image_to_tensor(io.read_image(opts.fixed))
        moving, moving_grid = io.image_to_tensor(io.read_image(opts.moving))
        for name, g in (("fixed", fixed_grid), ("moving", moving_grid)):
            if min(g.shape) < 4:
                raise BadInputError(f"the {name} image is {list(reversed(g.shape))} voxels: at least "
                                    "4 voxels along every axis are needed for a 3D registration")
        inputs = Inputs(fixed, fixed_grid, moving, moving_grid)
        for key in LABEL_INPUTS:
            if getattr(opts, key):
                inputs.labels[key] = io.image_to_tensor(io.read_labels(getattr(opts, key)), dtype=torch.float32)
        for key in LANDMARK_INPUTS:
            if getattr(opts, key):
                inputs.landmarks[key] = io.read_landmarks(getattr(opts, key))[1]
        _check_landmarks(inputs.landmarks)
        session.reporter.progress("read", 1.0, "images read")
    session.check()
    inputs.fixed_n = normalize_intensity(fixed)
    inputs.moving_n = normalize_intensity(moving)
    return inputs


def _check_landmarks(landmarks: Dict[str, np.ndarray]) -> None:
    if len(landmarks) == 1:
        raise BadInputError("landmarks need both --fixed-landmarks and --moving-landmarks")
    if len(landmarks) == 2 and len(landmarks["fixed_landmarks"]) != len(landmarks["moving_landmarks"]):
        raise BadInputError("fixed and moving landmark files list a different number of points; "
                            "they must correspond one to one, in the same order")
