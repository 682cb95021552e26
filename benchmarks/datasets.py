"""Benchmark datasets: each yields cases written to disk as the worker reads them.

A case is a dict: name, fixed, moving (paths), optional fixed_labels / moving_labels (paths),
optional gt_displacement (path of an ITK displacement field on the fixed grid, LPS mm: the true
fixed->moving map) and labels_of_interest. Everything is generated deterministically from seeds,
and sets whose source folder is absent are skipped with a message.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import SimpleITK as sitk
import torch

from deepreglib.fields import integrate_velocity
from deepreglib.geometry import Grid
from deepreglib.io import tensor_to_image, write_displacement_field, write_image
from deepreglib.synth import random_velocity, synth_pair
from deepreglib.warp import warp

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _save(img, path: Path) -> str:
    write_image(img, str(path))
    return str(path)


def synthetic_cases(folder: Path, count: int = 4, shape=(96, 112, 96), spacing=2.0, max_std=3.0) -> Iterator[Dict]:
    """Known-answer pairs from the engine's generator (same contrast), 2 mm voxels."""
    grid = Grid(shape, (spacing,) * 3, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    for i in range(count):
        d = folder / f"synthetic_{i}"
        d.mkdir(parents=True, exist_ok=True)
        p = synth_pair(shape, seed=10_000 + i, max_std=max_std, same_contrast=True, full_resolution=True)
        case = {"dataset": "synthetic", "name": f"synthetic_{i}",
                "fixed": _save(tensor_to_image(p.fixed, grid), d / "fixed.nii.gz"),
                "moving": _save(tensor_to_image(p.moving, grid), d / "moving.nii.gz"),
                "fixed_labels": _save(tensor_to_image(p.fixed_labels.to(torch.int16), grid), d / "fixed_labels.nii.gz"),
                "moving_labels": _save(tensor_to_image(p.moving_labels.to(torch.int16), grid), d / "moving_labels.nii.gz")}
        gt = d / "gt_displacement.nii.gz"
        write_displacement_field(p.displacement, grid, str(gt))
        case["gt_displacement"] = str(gt)
        yield case


def brain_aseg_cases(folder: Path, count: int = 2, std_mm: float = 4.0) -> Iterator[Dict]:
    """The FreeSurfer-labelled brain warped by seeded random diffeomorphisms.

    moving(x) = fixed(x + w(x)) with w = exp(-v); the true registration field is u = exp(v),
    so that moving(x + u(x)) = fixed(x). Endpoint error against u; Dice over the 30 labels."""
    src = SHARED / "brain_aseg" / "test_scan.npz"
    if not src.is_file():
        print(f"skipping brain_aseg: {src} is absent", file=sys.stderr)
        return
    data = np.load(src)
    vol = torch.from_numpy(data["vol"].astype(np.float32))[None, None]
    seg = torch.from_numpy(data["seg"].astype(np.float32))[None, None]
    labels = [int(x) for x in np.load(SHARED / "brain_aseg" / "labels.npz")["labels"]]
    grid = Grid(vol.shape[2:], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    for i in range(count):
        d = folder / f"brain_aseg_{i}"
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(20_000 + i)
        # velocity on a half-resolution grid, then upsampled (smooth, brain-scale deformations)
        small = [s // 2 for s in vol.shape[2:]]
        v_small = random_velocity(small, g, std=std_mm / 2, scale=12)
        v = torch.nn.functional.interpolate(v_small, size=vol.shape[2:], mode="trilinear", align_corners=True) * 2
        u = integrate_velocity(v)
        w = integrate_velocity(-v)
        moving = warp(vol, w)
        moving_seg = warp(seg, w, interpolation="nearest")
        case = {"dataset": "brain_aseg", "name": f"brain_aseg_{i}", "labels_of_interest": labels,
                "fixed": _save(tensor_to_image(vol, grid), d / "fixed.nii.gz"),
                "moving": _save(tensor_to_image(moving, grid), d / "moving.nii.gz"),
                "fixed_labels": _save(tensor_to_image(seg.to(torch.int16), grid), d / "fixed_labels.nii.gz"),
                "moving_labels": _save(tensor_to_image(moving_seg.to(torch.int16), grid), d / "moving_labels.nii.gz")}
        gt = d / "gt_displacement.nii.gz"
        write_displacement_field(u, grid, str(gt))
        case["gt_displacement"] = str(gt)
        yield case


def oasis_pair_cases(folder: Path) -> Iterator[Dict]:
    """The two labelled OASIS subjects, in both directions."""
    src = SHARED / "oasis_pair"
    if not src.is_dir():
        print(f"skipping oasis_pair: {src} is absent", file=sys.stderr)
        return
    for a, b in (("A", "B"), ("B", "A")):
        yield {"dataset": "oasis_pair", "name": f"oasis_{b}_to_{a}", "labels_of_interest": [1, 2],
               "fixed": str(src / f"subject_{a}.nii.gz"), "moving": str(src / f"subject_{b}.nii.gz"),
               "fixed_labels": str(src / f"subject_{a}_seg.nii.gz"),
               "moving_labels": str(src / f"subject_{b}_seg.nii.gz")}


DATASETS = {"synthetic": synthetic_cases, "brain_aseg": brain_aseg_cases, "oasis_pair": oasis_pair_cases}


def build(names: List[str], folder: Path, quick: bool = False) -> List[Dict]:
    cases: List[Dict] = []
    for name in names:
        kwargs = {}
        if quick and name == "synthetic":
            kwargs["count"] = 2
        if quick and name == "brain_aseg":
            kwargs["count"] = 1
        cases.extend(DATASETS[name](folder, **kwargs))
    return cases
