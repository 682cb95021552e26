"""Stage ``infer``: the method on its network grid (and ``refine`` when asked), with CUDA
out-of-memory falling back to the CPU."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import BadInputError
from ..core.geometry import Grid
from ..core.resample import resample_to_grid
from ..methods.base import Method, MethodResult
from ..methods.registry import create_method
from .load import Inputs
from .options import RegisterOptions
from .refine import refine
from .session import Session


@dataclass
class Inference:
    """The method's answer on its network grid ``net``; ``fixed``/``moving`` are the normalised
    images as it saw them there (the moving one through the initial matrix)."""

    method: Method
    net: Grid
    result: MethodResult
    fixed: torch.Tensor
    moving: torch.Tensor
    device: torch.device


def infer(opts: RegisterOptions, inputs: Inputs, matrix: np.ndarray, session: Session,
          device: torch.device) -> Inference:
    injected = _injected_fault() == "cuda_oom"
    try:
        if injected:  # tests only: the GPU path's out-of-memory, on any machine
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by DEEPREG_FAULT_INJECT)")
        out = _infer_on(device, opts, inputs, matrix, session)
    except torch.cuda.OutOfMemoryError:
        if (device.type != "cuda" and not injected) or not opts.cpu_fallback:
            raise BadInputError("the GPU ran out of memory; run with --device cpu (or free GPU memory)")
        session.warn(f"CUDA ran out of memory on {device}; retried on the CPU")
        session.details["device_fallback"] = {"from": str(device), "to": "cpu", "reason": "CUDA out of memory"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out = _infer_on(torch.device("cpu"), opts, inputs, matrix, session)
    session.check()
    return out


def _injected_fault() -> str:
    """``DEEPREG_FAULT_INJECT`` (fault-injection tests only; unset in normal use): ``cuda_oom``
    makes the first inference attempt raise CUDA's out-of-memory error."""
    return os.environ.get("DEEPREG_FAULT_INJECT", "")


def _infer_on(device: torch.device, opts: RegisterOptions, inputs: Inputs, matrix: np.ndarray,
              session: Session) -> Inference:
    with session.stage("preprocess"):
        method = _create(opts, device)
        net = method.grid_for(inputs.fixed_grid)
        f_net = resample_to_grid(inputs.fixed_n, inputs.fixed_grid, net).to(device)
        m_net = resample_to_grid(inputs.moving_n, inputs.moving_grid, net, matrix_lps=matrix).to(device)
        session.reporter.progress("preprocess", 1.0, f"network grid {list(reversed(net.shape))} at "
                                                     f"{net.spacing[0]:.2f} mm")
    with session.stage("inference"):
        result = method.run(f_net, m_net, net, session.context("inference"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = Inference(method, net, result, f_net, m_net, device)
    if opts.refine > 0:
        with session.stage("refine"):
            out.result = refine(out, opts.refine, inputs, matrix, session)
    return out


def _create(opts: RegisterOptions, device: torch.device) -> Method:
    options = dict(opts.method_options)
    if opts.weights:
        options["weights"] = opts.weights
    try:
        return create_method(opts.method, device, **options)
    except TypeError as e:  # an option the method does not take
        raise BadInputError(f"method {opts.method!r} does not accept these options "
                            f"{sorted(opts.method_options)}: {e}")
