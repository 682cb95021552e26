"""One registration run, end to end: read -> initialize -> preprocess -> method -> [refine] ->
postprocess -> write outputs + ``manifest.json``. Conventions: :mod:`deepreglib.conventions`.

The transform a run returns maps fixed points to moving points (ITK resampling convention)::

    phi(p) = A(p + u(p))

with ``A`` the initial (or rigid/affine method's) 4x4 physical map and ``u`` the deformable
method's field, in LPS mm on the fixed grid. Deformable runs export ``phi - id`` as one ITK
displacement field on the fixed grid; rigid/affine runs export ``A`` as an ITK affine transform.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .errors import BadInputError, CancelledError
from .fields import integrate_velocity, resize_field
from .geometry import Grid, displacement_mm_to_voxel, voxel_grid_points
from .jacobian import folding_fraction, jacobian_determinant, std_log_jacobian
from .methods.base import MethodResult, RunContext
from .preprocess import field_to_fixed_grid, normalize_intensity
from .progress import Reporter, SilentReporter
from .registry import create_method, get_method_info
from .resample import physical_field, resample_to_grid
from .warp import sample_at

MANIFEST_FORMAT = "deepreg-manifest/1"
INIT_CHOICES = ("none", "center", "moments", "rigid", "affine")  # always available


def init_choices() -> tuple:
    """Every ``--init`` name: the classic ones plus learned initialisers whose weights are shipped."""
    from .align import INITIALIZERS
    from .methods import learned_init  # noqa: F401  (registers dnet / same-affine when available)
    return tuple(INITIALIZERS)


@dataclass
class RegisterOptions:
    """Everything one run needs (the CLI's ``register`` arguments)."""

    fixed: str
    moving: str
    out: str
    method: str = "voxelmorph"
    device: str = "auto"
    refine: int = 0
    init: str = "none"
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


def check_output_folder(out: Path) -> None:
    """The output folder must be new or empty: a run never overwrites what the user has."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"output folder {out} already exists and is not empty; choose a new "
                            "folder (results are never written over existing files)")
    parent = out.resolve().parent
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInputError(f"cannot create the output folder's parent {parent}: {e}")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"cannot write into {parent}; choose an output folder you can write to")


def grid_dict(grid: Grid) -> dict:
    return {"size": list(reversed(grid.shape)), "spacing": list(grid.spacing),
            "origin": list(grid.origin), "direction": list(grid.direction)}


def overlap_fraction(fixed: Grid, moving: Grid, matrix: np.ndarray) -> float:
    """Fraction of fixed voxel centres (on a coarse 16^3 lattice) whose mapped point falls inside
    the moving image's box."""
    coarse = fixed.resized([min(16, s) for s in fixed.shape])
    pts = voxel_grid_points(coarse, torch.float64)[0].reshape(3, -1).T.numpy()
    mapped = pts @ matrix[:3, :3].T + matrix[:3, 3]
    idx = moving.physical_to_index(mapped)
    upper = np.asarray(moving.shape, dtype=np.float64) - 0.5
    inside = np.all((idx >= -0.5) & (idx <= upper), axis=1)
    return float(inside.mean())


class _Timer:
    def __init__(self):
        self.timings: Dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def _peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process in MB (``None`` where the system does not say)."""
    try:
        import resource  # Unix only: imported here so that the worker starts on Windows
    except ImportError:
        return _peak_rss_windows_mb()
    # ru_maxrss is KiB on Linux, bytes on macOS
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _peak_rss_windows_mb() -> Optional[float]:
    """``PeakWorkingSetSize`` of ``GetProcessMemoryInfo`` (Windows), else ``None``."""
    try:
        import ctypes
        from ctypes import wintypes

        class _Counters(ctypes.Structure):
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
                (name, ctypes.c_size_t) for name in (
                    "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage",
                    "QuotaPagedPoolUsage", "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage",
                    "PagefileUsage", "PeakPagefileUsage")]
        counters = _Counters()
        counters.cb = ctypes.sizeof(counters)
        psapi = ctypes.WinDLL("psapi")
        kernel32 = ctypes.WinDLL("kernel32")
        kernel32.GetCurrentProcess.restype = wintypes.HANDLE
        if not psapi.GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(counters),
                                          counters.cb):
            return None
        return counters.PeakWorkingSetSize / (1024 * 1024)
    except (AttributeError, OSError, ImportError):  # not Windows either
        return None


def _versions() -> dict:
    return {"deepreglib": __version__, "torch": torch.__version__, "SimpleITK": sitk.Version_VersionString(),
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform()}


def _to_grid(vol: torch.Tensor, src: Grid, dst: Grid, interpolation="linear") -> torch.Tensor:
    return resample_to_grid(vol, src, dst, interpolation=interpolation)


def register(opts: RegisterOptions, reporter: Optional[Reporter] = None,
             cancel: Callable[[], bool] = lambda: False) -> Path:
    """Run one registration; returns the path of the written ``manifest.json``.

    Raises BadInputError (exit 2) for input the user can fix, CancelledError (exit 3) when
    ``cancel()`` turns True or SIGTERM arrives; nothing is left in ``opts.out`` unless the run
    completed (outputs are written to a temporary folder and renamed at the end).
    """
    from . import io

    reporter = reporter or SilentReporter()
    timer = _Timer()
    t_total = time.perf_counter()
    out = Path(opts.out).resolve()
    info = get_method_info(opts.method)
    if opts.init not in INIT_CHOICES and opts.init not in init_choices():
        raise BadInputError(f"--init must be one of {', '.join(init_choices())}, got {opts.init!r}")
    if opts.refine < 0:
        raise BadInputError(f"--refine must be >= 0, got {opts.refine}")
    check_output_folder(out)
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    messages: List[str] = []

    def ctx_for(stage: str) -> RunContext:
        def progress(fraction, message=""):
            if cancel():
                raise CancelledError("registration cancelled")
            reporter.progress(stage, fraction, message)
        return RunContext(progress=progress, cancel=cancel)

    def check():
        if cancel():
            raise CancelledError("registration cancelled")

    # -- read -------------------------------------------------------------------------------------
    with timer.stage("read"):
        reporter.progress("read", 0.0, "reading images")
        fixed_img = io.read_image(opts.fixed)
        moving_img = io.read_image(opts.moving)
        fixed_t, fixed_grid = io.image_to_tensor(fixed_img)
        moving_t, moving_grid = io.image_to_tensor(moving_img)
        for name, g in (("fixed", fixed_grid), ("moving", moving_grid)):
            if min(g.shape) < 4:
                raise BadInputError(f"the {name} image is {list(reversed(g.shape))} voxels: at least "
                                    "4 voxels along every axis are needed for a 3D registration")
        labels = {}
        for key in ("fixed_labels", "moving_labels", "fixed_mask", "moving_mask"):
            path = getattr(opts, key)
            if path:
                lab_t, lab_grid = io.image_to_tensor(io.read_labels(path), dtype=torch.float32)
                labels[key] = (lab_t, lab_grid)
        landmarks = {}
        for key in ("fixed_landmarks", "moving_landmarks"):
            path = getattr(opts, key)
            if path:
                landmarks[key] = io.read_landmarks(path)[1]
        if len(landmarks) == 1:
            raise BadInputError("landmarks need both --fixed-landmarks and --moving-landmarks")
        if len(landmarks) == 2 and len(landmarks["fixed_landmarks"]) != len(landmarks["moving_landmarks"]):
            raise BadInputError("fixed and moving landmark files list a different number of points; "
                                "they must correspond one to one, in the same order")
        reporter.progress("read", 1.0, "images read")
    check()

    fixed_n = normalize_intensity(fixed_t)
    moving_n = normalize_intensity(moving_t)

    # -- initial alignment ------------------------------------------------------------------------
    with timer.stage("initialize"):
        matrix = np.eye(4)
        if opts.initial_transform:
            matrix = io.read_linear_transform(opts.initial_transform)
        if opts.init != "none":
            from .align import initial_transform
            extra = {}
            if opts.initial_transform:
                if opts.init not in ("rigid", "affine"):
                    raise BadInputError(f"--init {opts.init} would discard the --initial-transform; use "
                                        "--init rigid or affine to refine it, or --init none to use it as is")
                extra["init"] = matrix
            matrix = initial_transform(opts.init, fixed_n, fixed_grid, moving_n, moving_grid,
                                       progress=ctx_for("initialize").progress, cancel=cancel,
                                       device=device, **extra)
        overlap = overlap_fraction(fixed_grid, moving_grid, matrix)
        if overlap < 0.01:
            raise BadInputError(
                "the fixed and moving images do not overlap in physical space (less than 1% of the "
                "fixed image falls inside the moving one). Use --init center (or affine) to align "
                "them first, or give an --initial-transform.")
        if overlap < 0.5:
            messages.append(f"only {100 * overlap:.0f}% of the fixed image overlaps the moving image")
            reporter.log(messages[-1], "warning")
        reporter.progress("initialize", 1.0, "initial alignment done")

    # -- method, with CUDA out-of-memory falling back to the CPU ---------------------------------
    def run_method(dev: torch.device):
        with timer.stage("preprocess"):
            options = dict(opts.method_options)
            if opts.weights:
                options["weights"] = opts.weights
            try:
                method = create_method(opts.method, dev, **options)
            except TypeError as e:  # an option the method does not take
                raise BadInputError(f"method {opts.method!r} does not accept these options "
                                    f"{sorted(opts.method_options)}: {e}")
            net = method.grid_for(fixed_grid)
            f_net = _to_grid(fixed_n, fixed_grid, net).to(dev)
            m_net = resample_to_grid(moving_n, moving_grid, net, matrix_lps=matrix).to(dev)
            reporter.progress("preprocess", 1.0, f"network grid {list(reversed(net.shape))} at "
                                                 f"{net.spacing[0]:.2f} mm")
        with timer.stage("inference"):
            result = method.run(f_net, m_net, net, ctx_for("inference"))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        if opts.refine > 0:
            with timer.stage("refine"):
                result = _refine(result, f_net, m_net, net, opts, labels, landmarks, fixed_grid,
                                 moving_grid, matrix, ctx_for("refine"), messages, reporter)
        return method, net, result

    try:
        method, net, result = run_method(device)
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda" or not opts.cpu_fallback:
            raise BadInputError("the GPU ran out of memory; run with --device cpu (or free GPU memory)")
        messages.append(f"CUDA ran out of memory on {device}; retried on the CPU")
        reporter.log(messages[-1], "warning")
        torch.cuda.empty_cache()
        device = torch.device("cpu")
        method, net, result = run_method(device)
    check()

    # -- postprocess ----------------------------------------------------------------------------
    with timer.stage("postprocess"):
        if result.matrix is not None:
            matrix = matrix @ np.asarray(result.matrix, dtype=np.float64)
        u_mm = None
        if result.displacement is not None:
            u_mm = field_to_fixed_grid(result.displacement.detach().cpu(), net, fixed_grid)
        total_mm = physical_field(matrix, u_mm, fixed_grid)  # phi(p) - p, (1, 3, D, H, W) mm
        warped = resample_to_grid(moving_t, moving_grid, fixed_grid, matrix_lps=matrix, displacement_mm=u_mm)
        jac = jacobian_determinant(displacement_mm_to_voxel(total_mm.float(), fixed_grid))
        check()
        before = resample_to_grid(moving_t, moving_grid, fixed_grid)
        metrics = _metrics(fixed_t, before, warped, jac, fixed_grid, moving_grid, matrix, u_mm, labels,
                           landmarks, total_mm)
        inverse_mm = None
        if result.velocity is not None and info.kind == "deformable":
            inverse_mm = _inverse_on_moving_grid(result.velocity.detach().cpu(), net, moving_grid, matrix)

    # -- write (to a temporary folder, renamed when complete) ----------------------------------
    with timer.stage("write"):
        reporter.progress("write", 0.0, "writing outputs")
        t_write = time.perf_counter()
        tmp = out.resolve().parent / f".{out.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            outputs = []

            def add(name, kind, filename, grid, description, image=None, writer=None):
                path = tmp / filename
                if writer is not None:
                    writer(path)
                else:
                    io.write_image(image, str(path))
                outputs.append({"name": name, "kind": kind, "path": filename,
                                "grid": grid_dict(grid) if grid else None, "description": description})
                check()

            add("warped", "volume", "warped.nii.gz", fixed_grid, "moving image resampled onto the fixed grid",
                io.tensor_to_image(warped, fixed_grid))
            if info.kind == "deformable":
                add("transform", "displacement_field", "displacement.mha", fixed_grid,
                    "fixed->moving displacement (ITK vector image, LPS mm, on the fixed grid; the "
                    "initial transform is included)",
                    writer=lambda p: io.write_displacement_field(
                        displacement_mm_to_voxel(total_mm.double(), fixed_grid).float(), fixed_grid, str(p)))
                if inverse_mm is not None:
                    add("inverse_transform", "displacement_field", "inverse_displacement.mha",
                        moving_grid, "moving->fixed displacement on the moving grid (exact inverse of the "
                        "diffeomorphism, integrated from the negated velocity)",
                        writer=lambda p: io.write_displacement_field(
                            displacement_mm_to_voxel(inverse_mm.double(), moving_grid).float(), moving_grid, str(p)))
            else:
                add("transform", "linear_transform", "transform.tfm", None,
                    "fixed->moving affine transform (ITK, LPS)",
                    writer=lambda p: io.write_linear_transform(matrix, str(p)))
            if opts.init != "none" or opts.initial_transform:
                add("initial_transform", "linear_transform", "initial_transform.tfm", None,
                    "the initial alignment (already included in the transform)",
                    writer=lambda p: io.write_linear_transform(_initial_only(matrix, result), str(p)))
            add("jacobian", "jacobian", "jacobian.nii.gz", fixed_grid,
                "Jacobian determinant of the transform on the fixed grid (<= 0: folding)",
                io.tensor_to_image(jac, fixed_grid))
            if "moving_labels" in labels:
                lab_t, lab_grid = labels["moving_labels"]
                wl = resample_to_grid(lab_t, lab_grid, fixed_grid, matrix_lps=matrix, displacement_mm=u_mm,
                                      interpolation="nearest")
                add("warped_labels", "labels", "warped_labels.nii.gz", fixed_grid,
                    "moving labels resampled onto the fixed grid (nearest neighbour)",
                    io.tensor_to_image(wl.round().to(torch.int16), fixed_grid))
            outputs.extend(result.write_files(tmp))
            check()
            for name, vol in result.volumes.items():
                v = resample_to_grid(vol.detach().cpu().float(), net, fixed_grid)
                add(name, "volume", f"{name}.nii.gz", fixed_grid, f"{name} (method output)",
                    io.tensor_to_image(v, fixed_grid))
            reporter.progress("write", 0.7, "outputs written")
            timings = dict(timer.timings)
            timings["total"] = time.perf_counter() - t_total
            manifest = {
                "format": MANIFEST_FORMAT,
                "status": "done",
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "method": opts.method,
                "method_info": info.to_dict(),
                "inputs": {k: str(Path(v).resolve()) for k, v in asdict(opts).items()
                           if k in ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask",
                                    "moving_mask", "fixed_landmarks", "moving_landmarks",
                                    "initial_transform") and v},
                "grids": {"fixed": grid_dict(fixed_grid), "moving": grid_dict(moving_grid),
                          "network": grid_dict(net)},
                "parameters": {"refine": opts.refine, "init": opts.init, "device_requested": opts.device,
                               "method_options": opts.method_options},
                "device": str(device),
                "weights": {"path": method.weights_path, "sha256": method.weights_sha256},
                "matrix_lps": matrix.tolist(),
                "outputs": outputs,
                "metrics": metrics,
                "method_outputs": result.info,
                "timings": timings,
                "peak_memory_mb": {"ram": _peak_rss_mb(),
                                   "gpu": (torch.cuda.max_memory_allocated(device) / 2 ** 20
                                           if device.type == "cuda" else None)},
                "messages": messages,
                "versions": _versions(),
            }
            if opts.qa:
                from .report import render_qa_png
                sp = fixed_grid.spacing_kji
                render_qa_png(tmp / "qa.png", fixed_t[0, 0].numpy(), before[0, 0].numpy(),
                              warped[0, 0].numpy(), jac[0, 0].numpy(),
                              displacement=displacement_mm_to_voxel(total_mm.double(), fixed_grid)[0].numpy(),
                              spacing=tuple(sp), metrics=_qa_numbers(manifest),
                              title=f"{opts.method}: {Path(opts.moving).name} -> {Path(opts.fixed).name}")
                outputs.append({"name": "qa", "kind": "qa_png", "path": "qa.png", "grid": None,
                                "description": "QA picture"})
            timings["write"] = time.perf_counter() - t_write
            timings["total"] = time.perf_counter() - t_total
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            check()
            if out.exists():
                out.rmdir()  # checked empty at the start
            os.rename(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        reporter.progress("write", 1.0, "done")
    return out / "manifest.json"


def _initial_only(matrix: np.ndarray, result: MethodResult) -> np.ndarray:
    if result.matrix is None:
        return matrix
    return matrix @ np.linalg.inv(np.asarray(result.matrix, dtype=np.float64))


def _qa_numbers(manifest: dict) -> dict:
    m = dict(manifest["metrics"])
    m["method"] = manifest["method"]
    m["device"] = manifest["device"]
    m["time_s"] = round(manifest["timings"]["total"], 2)
    return m


def _refine(result, f_net, m_net, net, opts, labels, landmarks, fixed_grid, moving_grid, matrix,
            ctx, messages, reporter):
    from .refine import refine_velocity
    if result.displacement is None:
        messages.append("--refine applies to deformable methods; ignored for this linear method")
        reporter.log(messages[-1], "warning")
        return result
    if result.velocity is not None:
        v0 = resize_field(result.velocity, f_net.shape[2:])
    else:  # a plain DDF: use it as the starting velocity (exact for small deformations)
        v0 = result.displacement
    kwargs = {}
    if "fixed_labels" in labels and "moving_labels" in labels:
        kwargs["fixed_labels"] = _to_grid(labels["fixed_labels"][0], labels["fixed_labels"][1], net,
                                          "nearest").round().long().to(f_net.device)
        kwargs["moving_labels"] = resample_to_grid(labels["moving_labels"][0], labels["moving_labels"][1], net,
                                                   matrix_lps=matrix, interpolation="nearest").round().long().to(f_net.device)
    if landmarks:
        # fixed points -> network index; moving points -> the A-resampled moving space = fixed space
        inv = np.linalg.inv(matrix)
        q = landmarks["moving_landmarks"] @ inv[:3, :3].T + inv[:3, 3]
        kwargs["fixed_points"] = net.physical_to_index(landmarks["fixed_landmarks"])
        kwargs["moving_points"] = net.physical_to_index(q)
    # large grids are optimised at half resolution: 8x fewer voxels per step, and the smooth
    # update the network's answer needs is well represented there
    resolution = 2 if int(np.prod(f_net.shape[2:])) > 64 ** 3 else 1
    v = refine_velocity(f_net, m_net, velocity=v0, steps=opts.refine, resolution=resolution,
                        progress=ctx.progress, cancel=ctx.cancel, **kwargs)
    with torch.no_grad():
        u = integrate_velocity(v)
    info = dict(result.info)
    info["refine_steps"] = opts.refine
    info["refine_resolution"] = resolution
    return dataclasses.replace(result, displacement=u, velocity=v, info=info)  # keeps a subclass's extras


def _inverse_on_moving_grid(velocity: torch.Tensor, net: Grid, moving_grid: Grid, matrix: np.ndarray) -> torch.Tensor:
    """Inverse of ``phi(p) = A(p + u(p))`` as a physical field on the moving grid:
    ``phi^-1(q) = y + u_inv(y)`` with ``y = A^-1 q`` and ``u_inv`` from the negated velocity."""
    from .geometry import displacement_voxel_to_mm
    with torch.no_grad():
        u_inv = integrate_velocity(-velocity.double())
        u_inv = resize_field(u_inv, net.shape)
        u_inv_mm = displacement_voxel_to_mm(u_inv, net)
        q = voxel_grid_points(moving_grid, torch.float64)
        inv = torch.as_tensor(np.linalg.inv(matrix), dtype=torch.float64)
        y = torch.einsum("pc,ncdhw->npdhw", inv[:3, :3], q) + inv[:3, 3].view(1, 3, 1, 1, 1)
        m = torch.as_tensor(net.physical_to_index_matrix, dtype=torch.float64)
        idx = torch.einsum("pc,ncdhw->npdhw", m[:3, :3], y) + m[:3, 3].view(1, 3, 1, 1, 1)
        u_at_y = sample_at(u_inv_mm, idx, "linear", "border")
        return (y + u_at_y - q).float()


def _metrics(fixed_t, before, warped, jac, fixed_grid, moving_grid, matrix, u_mm, labels, landmarks,
             total_mm) -> dict:
    from .metrics import dice_per_label, ncc_metric
    m = {"ncc_before": ncc_metric(fixed_t, before), "ncc_after": ncc_metric(fixed_t, warped),
         "folding_percent": 100.0 * folding_fraction(jac), "sdlogj": std_log_jacobian(jac),
         "jacobian_min": float(jac.min()), "jacobian_max": float(jac.max())}
    if u_mm is not None:
        m["max_displacement_mm"] = float((u_mm * u_mm).sum(dim=1).max().sqrt())
    if "fixed_labels" in labels and "moving_labels" in labels:
        fl = _to_grid(labels["fixed_labels"][0], labels["fixed_labels"][1], fixed_grid, "nearest").round().long()
        ml, mg = labels["moving_labels"]
        lab_before = resample_to_grid(ml, mg, fixed_grid, interpolation="nearest").round().long()
        lab_after = resample_to_grid(ml, mg, fixed_grid, matrix_lps=matrix, displacement_mm=u_mm,
                                     interpolation="nearest").round().long()
        d0 = dice_per_label(fl, lab_before)
        d1 = dice_per_label(fl, lab_after)
        m["dice_before"] = {str(k): v for k, v in d0.items()}
        m["dice_after"] = {str(k): v for k, v in d1.items()}
        m["dice_mean_before"] = float(np.nanmean(list(d0.values()))) if d0 else None
        m["dice_mean_after"] = float(np.nanmean(list(d1.values()))) if d1 else None
    if landmarks:
        p = landmarks["fixed_landmarks"]
        q = landmarks["moving_landmarks"]
        idx = torch.as_tensor(fixed_grid.physical_to_index(p).T.reshape(1, 3, -1, 1, 1), dtype=torch.float64)
        disp = sample_at(total_mm.double(), idx, "linear", "border")[0, :, :, 0, 0].T.numpy()
        mapped = p + disp
        tre_before = np.linalg.norm(p - q, axis=1)
        tre_after = np.linalg.norm(mapped - q, axis=1)
        m["tre_before_mm"] = float(tre_before.mean())
        m["tre_after_mm"] = float(tre_after.mean())
    return m
