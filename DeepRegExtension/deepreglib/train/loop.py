"""Resumable unsupervised training: ``deepreg train METHOD --out DIR ...``.

A run folder holds ``checkpoint.pt`` (weights, optimiser, step; plain tensors and numbers, loaded
with ``weights_only=True``), ``loss.csv`` (one row per step) and ``config.json``. Starting the
same command again continues from the checkpoint; batch ``i`` is a pure function of
``(seed, i)``, so a resumed run sees the same data as an uninterrupted one.

Each method's folder holds its :class:`~deepreglib.train.recipe.TrainingRecipe` (network, loss,
defaults), named in its spec; the command line hands the loop the recipes of
:func:`deepreglib.methods.registry.training_recipes`. The loop knows no method.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import BadInputError
from ..io.models import read_weights, save_model
from .recipe import TrainingRecipe


# -- data ------------------------------------------------------------------------------------
def load_real_volumes(folder: Optional[str], spacing_mm: float = 2.0) -> List[torch.Tensor]:
    """Unlabelled real scans for training, resampled to isotropic ``spacing_mm`` (block averaging
    of the 1 mm OASIS volumes) and scaled to [0, 1] by robust percentiles; ``[]`` if no folder."""
    if not folder:
        return []
    from ..io.images import read_image
    from ..core.preprocess import normalize_intensity
    vols = []
    for p in sorted(Path(folder).glob("*.nii*")):
        img = read_image(str(p))
        arr = torch.from_numpy(np.asarray(
            __import__("SimpleITK").GetArrayFromImage(img), dtype=np.float32))[None, None]
        factors = [max(1, int(round(spacing_mm / s))) for s in img.GetSpacing()[::-1]]
        arr = F.avg_pool3d(arr, kernel_size=factors, stride=factors)
        vols.append(normalize_intensity(arr))
    if not vols:
        raise BadInputError(f"no NIfTI volumes (*.nii, *.nii.gz) in {folder}")
    return vols


def load_training_scans(args: argparse.Namespace, cache_sets: Optional[Sequence[str]] = None
                        ) -> Tuple[List[torch.Tensor], Optional[List]]:
    """The real scans of a run: the training cache's ``train`` split of ``cache_sets`` (default
    :data:`~deepreglib.train.cache.TRAINING_SETS`; ``--cache``, with its label maps) or the
    NIfTI files of ``--real-dir``; ``([], None)`` when neither is given."""
    if getattr(args, "cache", None):
        if args.real_dir:
            raise BadInputError("give either --cache or --real-dir, not both")
        from .cache import TRAINING_SETS, load_cache
        subjects, _ = load_cache(args.cache, "train", list(cache_sets or TRAINING_SETS))
        return [s.image for s in subjects], [s.labels for s in subjects]
    return load_real_volumes(args.real_dir, args.real_spacing), None


def training_scan_direction(cfg: Dict[str, object]) -> Optional[List[float]]:
    """The direction (row-major) the real scans of a run (``cfg``: its arguments as a dict) are
    stored in as tensors: the training cache's grid for ``cache``, the NIfTI headers of
    ``real_dir`` (:func:`scan_direction`); ``None`` without real scans."""
    if cfg.get("cache"):
        from .cache import cache_grid
        return [float(v) for v in cache_grid(str(cfg["cache"])).direction]
    if cfg.get("real_dir"):
        return scan_direction(str(cfg["real_dir"]))
    return None


def scan_direction(folder: str) -> Optional[List[float]]:
    """The direction (row-major, as SimpleITK's ``GetDirection``) shared by every NIfTI scan in
    ``folder``, read from the headers; ``None`` if there are none. :func:`load_real_volumes`
    gives the scans as their voxel arrays, so this is the anatomical orientation a network
    trained on them saw. Raises :class:`BadInputError` when the scans disagree."""
    import SimpleITK as sitk
    found = {}
    for p in sorted(Path(folder).glob("*.nii*")):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
        found[p.name] = tuple(round(float(v), 6) for v in reader.GetDirection())
    if not found:
        return None
    if len(set(found.values())) > 1:
        raise BadInputError(f"the scans in {folder} are stored in different orientations ({found}); "
                            "resample them to one direction first (e.g. SimpleITK.DICOMOrient)")
    return [float(v) for v in next(iter(found.values()))]


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def real_pair(vols: List[torch.Tensor], shape: Sequence[int], rng: np.random.Generator,
              labels: Optional[List[Optional[torch.Tensor]]] = None, label_sample: int = 16
              ) -> Dict[str, torch.Tensor]:
    """Two different subjects (inter-subject registration), the same random crop of both. With
    ``labels`` (the cache's label maps, parallel to ``vols``) the pair also gets
    ``fixed_labels``/``moving_labels``: ``label_sample`` of the fixed subject's labels drawn at
    random, renumbered ``1..k`` (:func:`~deepreglib.train.cache.sample_labels`), for a cheap Dice
    term (VoxelMorph's semi-supervised variant: labels at training only); ``label_sample`` 0: the
    maps as they are (recipes that need the same classes in every pair, e.g. AMDF's, which groups
    them in its ``prepare_scans``)."""
    i, j = rng.choice(len(vols), size=2, replace=len(vols) < 2)
    a, b = vols[i], vols[j]
    starts = []
    for n, s in zip(a.shape[2:], shape):
        starts.append(int(rng.integers(0, max(n - s, 0) + 1)))

    def crop(v):
        sl = [slice(None), slice(None)] + [slice(st, st + s) for st, s in zip(starts, shape)]
        c = v[tuple(sl)]
        pad = []
        for n, s in zip(reversed(c.shape[2:]), reversed(shape)):
            pad += [0, s - n]
        return F.pad(c, pad) if any(pad) else c

    scale = float(rng.uniform(0.9, 1.1))
    out = {"fixed": crop(a).clamp(0, 1), "moving": (crop(b) * scale).clamp(0, 1)}
    if labels is not None and labels[i] is not None and labels[j] is not None:
        from .cache import sample_labels
        if label_sample == 0:
            out["fixed_labels"], out["moving_labels"] = crop(labels[i]), crop(labels[j])
        else:
            out["fixed_labels"], out["moving_labels"] = sample_labels(crop(labels[i]), crop(labels[j]),
                                                                      label_sample, rng)
    return out


_SYNTH_BANK: Dict[Tuple, Dict[str, torch.Tensor]] = {}


def synthetic_batch(shape: Sequence[int], seed: int, max_std: float) -> Dict[str, torch.Tensor]:
    """A synthetic pair, cached: training draws from a bank of ``--synth-bank`` pairs (with random
    flips), because generating a pair costs about as much as a training step on a CPU."""
    key = (tuple(shape), seed, max_std)
    if key not in _SYNTH_BANK:
        from .synth import synth_pair
        p = synth_pair(tuple(shape), seed=seed, max_std=max_std, same_contrast=True)
        _SYNTH_BANK[key] = {"fixed": p.fixed, "moving": p.moving, "fixed_labels": p.fixed_labels.to(torch.uint8),
                            "moving_labels": p.moving_labels.to(torch.uint8)}
    return dict(_SYNTH_BANK[key])


def augment(batch: Dict[str, torch.Tensor], rng: np.random.Generator, flips: bool = True) -> Dict[str, torch.Tensor]:
    """Random axis flips of every tensor of the pair (unless ``flips`` is off) and a random swap
    of fixed and moving (both keep the pair's correspondence). A known ``displacement``
    ``(N, 3, D, H, W)`` (``fixed = moving o (x + u)``, e.g. R2N2's supervised warm start) stays
    the pair's: a flip also negates its component along the flipped axis, a swap inverts it (and
    drops it when it folds, so has no inverse)."""
    dims = [d for d in (2, 3, 4) if rng.random() < 0.5]  # drawn either way: later draws stay the same
    if not flips:
        dims = []
    out = {k: (v.flip(dims) if dims else v) for k, v in batch.items()}
    if dims and "displacement" in out:
        sign = torch.ones(3, dtype=out["displacement"].dtype)
        sign[[d - 2 for d in dims]] = -1.0
        out["displacement"] = out["displacement"] * sign.view(1, 3, 1, 1, 1)
    if rng.random() < 0.5:
        out["fixed"], out["moving"] = out["moving"], out["fixed"]
        if "fixed_labels" in out:
            out["fixed_labels"], out["moving_labels"] = out["moving_labels"], out["fixed_labels"]
        if "displacement" in out:
            inverse = _inverse_or_none(out.pop("displacement"))
            if inverse is not None:
                out["displacement"] = inverse
    return out


def _inverse_or_none(u: torch.Tensor, tol: float = 0.05) -> Optional[torch.Tensor]:
    """The inverse of the displacement ``u`` (voxels), or ``None`` where it has none (a folding
    field, or one whose fixed-point inversion does not converge to within ``tol`` voxels), so a
    swapped pair is never given a wrong target."""
    from ..core.fields import invert_displacement
    from ..core.jacobian import jacobian_determinant
    from ..core.warp import warp
    if float(jacobian_determinant(u).min()) <= 0:
        return None
    w = invert_displacement(u)
    residual = (w + warp(u, w, padding="border")).abs().max()
    return w if float(residual) <= tol else None


def make_batch(step: int, args: argparse.Namespace, vols: List[torch.Tensor],
               recipe: Optional[TrainingRecipe] = None,
               labels: Optional[List[Optional[torch.Tensor]]] = None) -> Dict[str, torch.Tensor]:
    """Batch ``step`` of a run: a pure function of ``(args.seed, step)``; ``recipe`` may replace
    how real and synthetic pairs are made."""
    return draw_batch(step, args, vols, recipe, labels)[0]


def draw_batch(step: int, args: argparse.Namespace, vols: List[torch.Tensor],
               recipe: Optional[TrainingRecipe] = None,
               labels: Optional[List[Optional[torch.Tensor]]] = None) -> Tuple[Dict[str, torch.Tensor], bool]:
    """:func:`make_batch` and whether the pair is real (the loss log keeps the two apart)."""
    rng = _rng(args.seed, step)
    real = bool(vols) and rng.random() < args.real_fraction
    if real:
        if recipe is not None and recipe.real_batch is not None:
            batch = recipe.real_batch(vols, args.shape, rng)
        else:
            batch = real_pair(vols, args.shape, rng, labels, getattr(args, "label_sample", 16))
    else:
        bank_seed = args.seed * 100_003 + int(rng.integers(0, max(1, args.synth_bank)))
        batch = recipe.synthetic(args.shape, bank_seed, args) if recipe is not None and recipe.synthetic else None
        if batch is None:
            batch = synthetic_batch(args.shape, seed=bank_seed, max_std=args.max_std)
    flips = recipe.flips(args) if recipe is not None and recipe.flips is not None else True
    return augment(batch, rng, flips), real


# -- the loop ----------------------------------------------------------------------------------
def train(args: argparse.Namespace, recipes: Dict[str, TrainingRecipe],
          log: Callable[[str], None] = print) -> Path:
    """Run or resume training of ``recipes[args.method]``; returns the checkpoint path. Writes the
    model card and exports ``NAME.pt`` / ``NAME.json`` with :func:`save_model` when ``--export``
    is given. ``recipes``: :func:`deepreglib.methods.registry.training_recipes`."""
    if args.method not in recipes:
        raise BadInputError(f"no training recipe for {args.method!r}; choose one of {sorted(recipes)}")
    recipe = recipes[args.method]
    if recipe.card_entries is not None:
        recipe.card_entries(vars(args))  # what the card will record is checked before any step
    WeightAverage.check(getattr(args, "ema", 0.0))
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    dist = _Distributed.from_environment(args.device)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    ckpt_path = out / "checkpoint.pt"
    device = dist.device
    model = recipe.build(args).to(device)
    layout = _layout(recipe, device)
    if layout is not None:
        model = model.to(memory_format=layout)
    if getattr(args, "bf16_conv", False) and device.type == "cpu":
        convolutions_in_bf16(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr or recipe.lr, **recipe.optimizer_options)
    step = 0
    ckpt = None
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        for group in opt.param_groups:  # the optimiser state keeps its lr: this session's --lr wins
            group["lr"] = args.lr or recipe.lr
        step = int(ckpt["step"])
        log(f"resumed {args.method} from {ckpt_path} at step {step}")
    elif getattr(args, "init_from", None):
        if dist.main:
            step = _start_from_model(model, args, out)
            if recipe.after_init_from is not None:
                message = recipe.after_init_from(model, args)
                if message:
                    log(message)
        else:  # the other processes get rank 0's weights by broadcast; only the step is needed
            step = int(read_weights(Path(args.init_from))[1].get("iterations", 0))
        log(f"started {args.method} from the weights of {args.init_from} at step {step}")
    dist.broadcast_model(model)  # every process starts from rank 0's weights
    ema = WeightAverage.start(model, getattr(args, "ema", 0.0), ckpt)
    if step < args.steps and dist.main:
        _record_session(out / "config.json", args, step)
    vols, labels = (load_training_scans(args, recipe.cache_sets) if step < args.steps else ([], None))
    if vols and recipe.prepare_scans is not None:
        vols, labels = recipe.prepare_scans(vols, labels, training_scan_direction(vars(args)), args)
    csv_path = out / "loss.csv"
    if step < args.steps and dist.main:
        _truncate_log(csv_path, step)  # rows past the checkpoint are redone after a resume
    fieldnames = ["step", "loss", *recipe.terms, *(["grad_norm"] if getattr(args, "clip_grad", 0.0) else []),
                  "seconds", "real"]
    if dist.main:
        _ensure_header(csv_path, fieldnames)
    t_start = time.time()
    # only rank 0 writes the log, the checkpoint and the model file
    with (open(csv_path, "a", newline="") if dist.main else open(os.devnull, "w")) as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore", restval="")
        if f.tell() == 0:
            writer.writeheader()
        model.train()
        while step < args.steps:
            # process r of N draws batch step * N + r: distinct pairs, the same for a resumed run
            batch, is_real = draw_batch(step * dist.world_size + dist.rank, args, vols, recipe, labels)
            batch = {k: v.to(device) for k, v in batch.items()}
            if layout is not None:
                batch = {k: v.contiguous(memory_format=layout) if v.ndim == 5 and v.is_floating_point() else v
                         for k, v in batch.items()}
            t0 = time.time()
            args.current_step = step  # recipes with a schedule (e.g. dnet's angle warm-up) read it
            total, terms = recipe.loss(model, batch, args)
            opt.zero_grad(set_to_none=True)
            total.backward()
            dist.average_gradients(model)
            if getattr(args, "clip_grad", 0.0) and args.clip_grad > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad))
                terms = {**terms, "grad_norm": grad_norm}
            opt.step()
            if ema is not None:
                ema.update(model)
            step += 1
            row = {"step": step, "loss": float(total.detach()), **terms, "seconds": time.time() - t0,
                   "real": int(is_real)}
            writer.writerow(row)
            f.flush()
            if step % args.log_every == 0 and dist.main:
                log(f"step {step}/{args.steps} loss {float(total.detach()):.4f} " +
                    " ".join(f"{k} {v:.4f}" for k, v in terms.items()))
            if (step % args.checkpoint_every == 0 or step == args.steps) and dist.main:
                _save_checkpoint(ckpt_path, model, opt, step, ema)
    dist.record_agreement(model, out / "distributed.json")
    if dist.main:
        log(f"trained to step {step} in {time.time() - t_start:.0f} s this session"
            + (f" on {dist.world_size} processes" if dist.world_size > 1 else ""))
        if args.export:
            with (ema.applied(model) if ema is not None else contextlib.nullcontext(model)) as exported:
                export(exported, args, csv_path, step, recipe)
    dist.close()
    return ckpt_path


def convolutions_in_bf16(model: nn.Module) -> nn.Module:
    """Run every 3D (transposed) convolution of ``model`` under CPU bf16 autocast, its output cast
    back to float32 (``--bf16-conv``): the convolutions, most of a step, run at bf16 speed, and
    everything after them (normalisation, attention, the warp, local NCC's running sums) stays in
    float32, as do the weights, the optimiser and the saved model. Autocast over the whole loss
    is as fast but changes it: local NCC's box sums lose their precision. On two real cached
    brains at 64x80x64, 1 thread, the gradient's cosine to float32's over the whole loss was
    -0.29 for voxelmorph and 0.90 for carnet, against 0.99998 and 0.994 for the convolutions
    alone, whose steps were 1.8x (voxelmorph), 2.0x (carnet), 2.2x (D-Net, 48^3) and 1.8x (SAM)
    faster (``benchmarks/training_step_layout.py``, docs/BENCHMARKS.md). Patches the modules in
    place (their ``forward``); returns ``model``.

    A convolution whose input is narrower than its kernel along any axis runs in float32: on
    torch 2.13's CPU kernels, a stride-2 3x3x3 convolution of an input one voxel wide along the
    last axis gets a weight gradient of uninitialised memory (1e22 or NaN) in about half the
    calls under bf16 autocast (D-Net's deepest block at 32^3). Such convolutions cost nothing."""
    for m in model.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and not getattr(m, "_bf16_conv", False):
            def forward(x, _orig=m.forward, _kernel=tuple(m.kernel_size)):
                if any(n < k for n, k in zip(x.shape[2:], _kernel)):
                    return _orig(x)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = _orig(x)
                return out.float()
            m.forward = forward
            m._bf16_conv = True
    return model


def _layout(recipe: TrainingRecipe, device) -> Optional[torch.memory_format]:
    """``torch.channels_last_3d`` for a recipe that asks for it on the CPU, else ``None``.
    At 64x80x64 on 1 thread of an idle machine, a carnet step took 2.34 s instead of 2.71 s and a
    voxelmorph step 2.59 s instead of 2.62 s, with the same loss
    (``benchmarks/training_step_layout.py``, docs/BENCHMARKS.md)."""
    return torch.channels_last_3d if recipe.channels_last and torch.device(device).type == "cpu" else None


class _Distributed:
    """Data-parallel training under ``torchrun --nproc_per_node N`` (gloo on the CPU, nccl on
    GPUs): every process draws its own batches, the gradients are averaged across processes after
    each backward pass, and rank 0 writes the log, checkpoints and the model file.

    The gradients are all-reduced by hand rather than through ``DistributedDataParallel``: the
    recipes call their networks' own methods and attributes, which a DDP wrapper hides, and a
    method's loss may leave some parameters without a gradient in one step. Averaged gradients
    on identical weights with the same optimiser keep the weights identical (checked at the end,
    ``distributed.json``). Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything is a no-op."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str) -> "_Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dev = torch.device(device)
        if world <= 1:
            return cls(0, 1, dev)
        import torch.distributed as tdist
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(tdist.get_rank(), tdist.get_world_size(), dev)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as tdist
            tdist.barrier()

    def broadcast_model(self, model: nn.Module) -> None:
        if self.world_size > 1:
            import torch.distributed as tdist
            for t in list(model.parameters()) + list(model.buffers()):
                tdist.broadcast(t.data, src=0)

    def average_gradients(self, model: nn.Module) -> None:
        if self.world_size <= 1:
            return
        import torch.distributed as tdist
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:  # unused in this process's loss: contributes zero
                p.grad = torch.zeros_like(p)
            tdist.all_reduce(p.grad, op=tdist.ReduceOp.SUM)
            p.grad /= self.world_size

    def record_agreement(self, model: nn.Module, path: Path) -> None:
        """Rank 0 writes each process's weight checksum and the largest difference from rank 0's
        weights (0 when data parallelism kept them identical)."""
        if self.world_size <= 1:
            return
        import torch.distributed as tdist
        flat = torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in model.parameters()])
        ref = flat.clone().to(self.device)
        tdist.broadcast(ref, src=0)
        diff = torch.tensor([float((flat.to(self.device) - ref).abs().max())], device=self.device)
        total = torch.tensor([float(flat.sum())], device=self.device)
        diffs = [torch.zeros_like(diff) for _ in range(self.world_size)]
        sums = [torch.zeros_like(total) for _ in range(self.world_size)]
        tdist.all_gather(diffs, diff)
        tdist.all_gather(sums, total)
        if self.main:
            path.write_text(json.dumps({"world_size": self.world_size,
                                        "max_abs_difference_from_rank0": [float(d) for d in diffs],
                                        "weight_sums": [float(x) for x in sums]}, indent=1))

    def close(self) -> None:
        """Wait for every process (rank 0 may still be exporting), then leave the group: a
        process leaving while another still talks to it aborts that one."""
        if self.world_size > 1:
            import torch.distributed as tdist
            tdist.barrier()
            tdist.destroy_process_group()


def _start_from_model(model: nn.Module, args: argparse.Namespace, out: Path) -> int:
    """Load a trained model file (``NAME.pt`` + card) into ``model`` to go on training it in a
    new run folder (e.g. the shipped weights, whose own run folder is gone). The step count goes
    on from the card's ``iterations``; the card's sessions become the run's first sessions and its
    training log is kept, so the exported card still tells the whole history. The optimiser
    starts fresh. Returns the starting step."""
    src = Path(args.init_from)
    stale = [name for name in ("config.json", "loss.csv") if (out / name).exists()]
    if stale:
        raise BadInputError(f"--init-from starts a new run, but {out} already holds {', '.join(stale)} of another "
                            "run (and no checkpoint): give a new --out folder")
    state, card = read_weights(src)
    config = json.loads(json.dumps(getattr(model, "config", None)))  # as a model card stores it
    if card.get("network") != type(model).__name__ or card.get("config") != config:
        raise BadInputError(
            f"--init-from {src} holds a {card.get('network')} with config {card.get('config')}; "
            f"{args.method} builds a {type(model).__name__} with config {getattr(model, 'config', None)}: "
            "give the model file of this method, trained with the same architecture")
    model.load_state_dict(state)
    step = int(card.get("iterations", 0))
    earlier = [{"from_step": x.get("from_step", 0), "args": dict(x.get("changed", {}), method=args.method)}
               for x in card.get("sessions", [])]
    (out / "config.json").write_text(json.dumps({
        "sessions": earlier,
        "initialised_from": {"path": str(src), "sha256": card.get("sha256"), "iterations": step,
                             "training_log": card.get("training_log"),
                             "earlier": card.get("initialised_from")}}, indent=2, default=str))
    return step


def _record_session(path: Path, args: argparse.Namespace, step: int) -> None:
    """``config.json`` keeps the settings of every session of a run (a resumed run may change
    them, e.g. add a loss term); the model card reports them all."""
    sessions, old = [], {}
    if path.is_file():
        old = json.loads(path.read_text())
        sessions = old.get("sessions", [{"from_step": 0, "args": old}])
    sessions.append({"from_step": step, "args": {k: v for k, v in vars(args).items() if k not in ("func", "current_step")}})
    kept = {k: v for k, v in old.items() if k != "sessions"} if "sessions" in old else {}
    path.write_text(json.dumps({"sessions": sessions, **kept}, indent=2, default=str))


def _ensure_header(csv_path: Path, fieldnames: List[str]) -> None:
    """Give an existing ``loss.csv`` the current header (a resumed run may log new terms)."""
    if not csv_path.is_file():
        return
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
        f.seek(0)
        header = next(csv.reader(f), [])
    if header == fieldnames:
        return
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)


def _truncate_log(csv_path: Path, step: int) -> None:
    if not csv_path.is_file():
        return
    with open(csv_path) as f:
        lines = f.readlines()
    keep = lines[:1] + [ln for ln in lines[1:] if ln.split(",", 1)[0].isdigit() and int(ln.split(",", 1)[0]) <= step]
    if len(keep) != len(lines):
        with open(csv_path, "w") as f:
            f.writelines(keep)


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int,
                     ema: Optional["WeightAverage"] = None) -> None:
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
    if isinstance(getattr(model, "config", None), dict):  # the architecture, for recipes that rebuild it
        state["config"] = json.loads(json.dumps(model.config))
    if ema is not None:
        state.update(ema.state())
    torch.save(state, tmp)
    os.replace(tmp, path)


class WeightAverage:
    """An exponential moving average of a model's weights (``--ema DECAY``), the weights exported
    and validated; training itself goes on with the raw weights. The first updates average with a
    smaller decay, ``min(DECAY, (1 + n) / (10 + n))`` after ``n`` updates, so an average started
    late (from a checkpoint without one) is not dominated by its first weights. Kept in the
    checkpoint (``ema``, ``ema_updates``, ``ema_decay``) so a resumed run goes on averaging; a
    checkpoint whose average used another decay restarts it from the current weights."""

    def __init__(self, decay: float, average: Dict[str, torch.Tensor], updates: int = 0):
        self.decay, self.average, self.updates = float(decay), average, int(updates)

    @classmethod
    def start(cls, model: nn.Module, decay: float, checkpoint: Optional[dict] = None
              ) -> Optional["WeightAverage"]:
        if not cls.check(decay):
            return None
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if checkpoint and "ema" in checkpoint and checkpoint.get("ema_decay") == float(decay) \
                and set(checkpoint["ema"]) == set(current):
            return cls(decay, {k: v.to(current[k].device) for k, v in checkpoint["ema"].items()},
                       int(checkpoint.get("ema_updates", 0)))
        return cls(decay, current)

    @staticmethod
    def check(decay: float) -> bool:
        """Whether an average is asked for (``decay`` not 0); a decay outside (0, 1) is refused."""
        if decay and not 0.0 < decay < 1.0:
            raise BadInputError(f"--ema {decay}: the decay of the weight average must lie in (0, 1), "
                                "e.g. 0.999 (an average over about the last 1000 steps), or 0 for none")
        return bool(decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for k, v in model.state_dict().items():
            a = self.average[k]
            if a.is_floating_point():
                a.mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:  # counters and the like: the current value
                a.copy_(v)
        self.updates += 1

    def state(self) -> Dict[str, object]:
        return {"ema": self.average, "ema_updates": self.updates, "ema_decay": self.decay}

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """``model`` holding the averaged weights inside the block, its own ones after it (the
        weights are swapped rather than the model copied: a copy would share the patched
        ``forward`` of ``--bf16-conv``, bound to the original)."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.average)
        try:
            yield model
        finally:
            model.load_state_dict(own)


def loss_summary(csv_path: Path, window: int = 100, last_step: Optional[int] = None) -> Dict[str, object]:
    """Mean of every logged term over the first and the last ``window`` steps of a run's
    ``loss.csv``, separately for synthetic and real pairs (their losses are not comparable),
    counting only steps up to ``last_step`` (the checkpoint exported)."""
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if last_step is None or int(r["step"]) <= last_step]
    if not rows:
        return {}
    out: Dict[str, object] = {"steps_logged": len(rows),
                              "seconds_per_step": float(np.mean([float(r["seconds"]) for r in rows]))}
    terms = [k for k in rows[0] if k not in ("step", "seconds", "real")]
    for kind, flag in (("synthetic", "0"), ("real", "1")):
        sel = [r for r in rows if r.get("real") == flag]
        if not sel:
            continue
        summary = {}
        for term in terms:
            vals = [(int(r["step"]), float(r[term])) for r in sel if r.get(term) not in (None, "")]
            if len(vals) < 2:
                continue
            first, last = vals[:window], vals[-window:]
            summary[term] = {"first": float(np.mean([v for _, v in first])),
                             "last": float(np.mean([v for _, v in last])),
                             "first_steps": [first[0][0], first[-1][0]], "last_steps": [last[0][0], last[-1][0]]}
        out[kind] = summary
    return out


def export(model: nn.Module, args: argparse.Namespace, csv_path: Path, step: int,
           recipe: TrainingRecipe) -> Path:
    """Write the model and its card; the card's training settings come from the run folder's
    ``config.json`` (what the run was trained with), not from the exporting command line."""
    cfg_path = Path(args.out) / "config.json"
    run_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    sessions = run_cfg.get("sessions", [])
    cfg = sessions[-1]["args"] if sessions else vars(args)
    card = {"method": args.method, "iterations": step, "device": str(cfg.get("device")),
            "threads": cfg.get("threads"),
            "training": {"shape": list(cfg.get("shape")), "batch": 1,
                         "lr": cfg.get("lr") or recipe.lr, "seed": cfg.get("seed"),
                         "synthetic_max_std": cfg.get("max_std"), "synthetic_bank": cfg.get("synth_bank"),
                         "reg_weight": cfg.get("reg_weight"), "label_weight": cfg.get("label_weight", 0.0),
                         "weight_average_decay": cfg.get("ema") or None,
                         "real_dir": str(cfg.get("real_dir")) if cfg.get("real_dir") else None,
                         "cache": str(cfg.get("cache")) if cfg.get("cache") else None,
                         "label_sample": cfg.get("label_sample") if cfg.get("cache") else None,
                         "real_fraction": cfg.get("real_fraction") if cfg.get("real_dir") or cfg.get("cache") else 0.0,
                         "real_spacing_mm": cfg.get("real_spacing"),
                         "loss": recipe.description},
            "training_log": loss_summary(csv_path, last_step=step),
            "sessions": [{"from_step": x["from_step"],
                          "changed": {k: v for k, v in x["args"].items()
                                      if k in ("lr", "label_weight", "reg_weight", "real_fraction", "shape", "cache", "real_dir",
                                               "max_std", "threads", "device", "clip_grad", "init_from", "ema")
                                      or k.startswith(args.method + "_")}} for x in sessions]}
    if run_cfg.get("initialised_from"):
        card["initialised_from"] = run_cfg["initialised_from"]  # the earlier steps' log and weights
    if recipe.card_entries is not None:
        card.update(recipe.card_entries(dict(cfg)))
    return save_model(model, args.export, card)


def add_arguments(p: argparse.ArgumentParser, recipes: Dict[str, TrainingRecipe]) -> None:
    p.add_argument("method", help="method to train: " + ", ".join(sorted(recipes)) if recipes else "method")
    p.add_argument("--out", required=True, help="run folder (checkpoint, loss.csv); reused to resume")
    p.add_argument("--steps", type=int, default=2000, help="total optimiser steps (including resumed)")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 64, 64), metavar=("D", "H", "W"),
                   help="training patch size (tensor order z y x)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (recipe default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-std", type=float, default=3.0, help="synthetic deformation strength (voxels)")
    p.add_argument("--synth-bank", type=int, default=256, help="number of distinct synthetic pairs")
    p.add_argument("--real-dir", default=None, help="folder of unlabelled real NIfTI scans to mix in")
    p.add_argument("--cache", default=None,
                   help="training cache (deepreg train-cache): its train split's aligned real scans, "
                        "with their label maps when they have them")
    p.add_argument("--label-sample", type=int, default=16,
                   help="labels drawn at random per real pair for the Dice term (of the ~145 MUSE ones); "
                        "0: every label as it is (amdf, amdf_ae: the MUSE labels in 16 groups)")
    p.add_argument("--real-fraction", type=float, default=0.5)
    p.add_argument("--real-spacing", type=float, default=2.0, help="mm; real scans are resampled to it")
    p.add_argument("--reg-weight", type=float, default=1.0, help="smoothness weight")
    p.add_argument("--label-weight", type=float, default=0.0,
                   help="weight of 1 - Dice of the pairs' label maps: synthetic pairs (SynthMorph-style) "
                        "and, with --cache, the real scans' sampled labels (0: off)")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="export an exponential moving average of the weights with this decay per step "
                        "(e.g. 0.999: about the last 1000 steps); 0: the last weights")
    p.add_argument("--clip-grad", type=float, default=0.0,
                   help="clip the gradient's global L2 norm to this value before each step (0: off); "
                        "logged as grad_norm")
    p.add_argument("--bf16-conv", action="store_true",
                   help="CPU: run the convolutions in bf16 (the loss, weights and saved model stay float32); "
                        "about 2x faster steps where the CPU has bf16 instructions (AVX512-BF16, AMX)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--export", default=None, help="write NAME.pt + NAME.json (model card) here at the end")
    p.add_argument("--init-from", default=None, metavar="MODEL.pt",
                   help="start a new run from these trained weights (e.g. the shipped ones) and go on "
                        "counting their steps; ignored when the run folder already has a checkpoint")
    for recipe in recipes.values():
        if recipe.add_arguments is not None:
            recipe.add_arguments(p)
    p.add_argument("--seg-model", default=None,
                   help="amdf: model file (.pt) of the trained amdf_seg ROI segmentation net")
    p.add_argument("--ae-model", default=None,
                   help="amdf: model file (.pt) of the trained amdf_ae label auto-encoder")
