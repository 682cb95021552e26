"""Stage ``refine`` (``--refine N``): instance optimisation of the method's field on its network
grid (:func:`deepreglib.classic.optimise.refine_velocity`), started from the network's answer
and guided by labels and landmarks when given."""
from __future__ import annotations

import dataclasses
from typing import Dict

import numpy as np
import torch

from ..classic.optimise import refine_velocity
from ..core.fields import integrate_velocity, resize_field
from ..core.geometry import Grid
from ..core.resample import resample_to_grid
from .load import Inputs
from .session import Session


def refine(inference, steps: int, inputs: Inputs, matrix: np.ndarray, session: Session):
    """``inference``: the stage ``infer``'s :class:`~deepreglib.run.infer.Inference`; returns its
    result with the refined field (a linear method's result is returned as it is)."""
    result, f_net, net = inference.result, inference.fixed, inference.net
    if result.displacement is None:
        session.warn("--refine applies to deformable methods; ignored for this linear method")
        return result
    if result.velocity is not None:
        v0 = resize_field(result.velocity, f_net.shape[2:])
    else:  # a plain DDF: use it as the starting velocity (exact for small deformations)
        v0 = result.displacement
    kwargs = _guides(inputs, net, matrix, f_net.device)
    # large grids are optimised at half resolution: 8x fewer voxels per step, and the smooth
    # update the network's answer needs is well represented there
    resolution = 2 if int(np.prod(f_net.shape[2:])) > 64 ** 3 else 1
    ctx = session.context("refine")
    v = refine_velocity(f_net, inference.moving, velocity=v0, steps=steps, resolution=resolution,
                        progress=ctx.progress, cancel=ctx.cancel, **kwargs)
    with torch.no_grad():
        u = integrate_velocity(v)
    info = dict(result.info)
    info["refine_steps"] = steps
    info["refine_resolution"] = resolution
    return dataclasses.replace(result, displacement=u, velocity=v, info=info)  # keeps a subclass's extras


def _guides(inputs: Inputs, net: Grid, matrix: np.ndarray, device) -> Dict[str, object]:
    """Labels on the network grid and landmarks as network indices, for the optimiser."""
    labels, landmarks, kwargs = inputs.labels, inputs.landmarks, {}
    if "fixed_labels" in labels and "moving_labels" in labels:
        kwargs["fixed_labels"] = resample_to_grid(*labels["fixed_labels"], net, interpolation="nearest"
                                                  ).round().long().to(device)
        kwargs["moving_labels"] = resample_to_grid(*labels["moving_labels"], net, matrix_lps=matrix,
                                                   interpolation="nearest").round().long().to(device)
    if landmarks:
        # fixed points -> network index; moving points -> the A-resampled moving space = fixed space
        inv = np.linalg.inv(matrix)
        q = landmarks["moving_landmarks"] @ inv[:3, :3].T + inv[:3, 3]
        kwargs["fixed_points"] = net.physical_to_index(landmarks["fixed_landmarks"])
        kwargs["moving_points"] = net.physical_to_index(q)
    return kwargs
