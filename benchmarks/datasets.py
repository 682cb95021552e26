"""Benchmark datasets: each yields cases written to disk as the worker reads them.

A case is a dict: dataset, name, fixed, moving (paths), optional fixed_labels / moving_labels
(paths of integer label maps), optional fixed_landmarks / moving_landmarks (paths of
corresponding point lists, LPS mm, read by ``deepreglib.io.images.read_landmarks``), optional
gt_displacement (path of an ITK displacement field on the fixed grid, LPS mm: the true
fixed->moving map), labels_of_interest and a note on how the pair was made. Everything is
generated deterministically from seeds, and sets whose source folder is absent are skipped with
a message.

``--pairs-dir DIR`` (:func:`folder_cases`) reads a user's own pairs, one sub-folder per pair::

    DIR/<case>/fixed.<ext>              fixed image (any format SimpleITK reads: .nii.gz, .nrrd, .mha, ...)
    DIR/<case>/moving.<ext>             moving image
    DIR/<case>/fixed_labels.<ext>       optional integer label map on the fixed image's grid
    DIR/<case>/moving_labels.<ext>      optional, the same label numbers on the moving image's grid
    DIR/<case>/fixed_landmarks.<ext>    optional corresponding points (.csv label,x,y,z LPS mm, or
    DIR/<case>/moving_landmarks.<ext>   Slicer .mrk.json / .fcsv), same count and order in both

Labels give Dice per label and HD95; landmarks give the target registration error (TRE, mm).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import SimpleITK as sitk
import torch

from deepreglib.core.fields import integrate_velocity
from deepreglib.core.geometry import Grid
from deepreglib.io.images import (displacement_to_sitk, image_to_tensor, tensor_to_image, write_displacement_field,
                           write_image, write_landmarks_csv)
from deepreglib.train.synth import random_velocity, synth_pair
from deepreglib.core.warp import warp

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _save(img, path: Path) -> str:
    write_image(img, str(path))
    return str(path)


def downsampled(img: sitk.Image, factor: int, labels: bool = False) -> sitk.Image:
    """``img`` on a grid ``factor`` times coarser with the same origin and direction (voxel
    centres on every ``factor``-th original centre): images are Gaussian-smoothed first (sigma
    half the new spacing, against aliasing), label maps are sampled by nearest neighbour."""
    if factor == 1:
        return img
    size = [max(1, n // factor) for n in img.GetSize()]
    spacing = [s * factor for s in img.GetSpacing()]
    if not labels:
        img = sitk.SmoothingRecursiveGaussian(sitk.Cast(img, sitk.sitkFloat32), [s / 2 for s in spacing])
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                         img.GetOrigin(), spacing, img.GetDirection(), 0,
                         img.GetPixelID())


def _central_block(img: sitk.Image, size_kji, margin: int = 0) -> sitk.Image:
    """The central block of ``size_kji`` voxels (plus ``margin`` on every side, within the image),
    keeping its physical position (SimpleITK slicing updates the origin)."""
    lo, hi = [], []
    for n, want in zip(img.GetSize(), reversed(size_kji)):
        start = (n - want) // 2 - margin
        lo.append(max(0, start))
        hi.append(min(n, start + want + 2 * margin))
    return img[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]


def synthetic_cases(folder: Path, count: int = 4, shape=(96, 112, 96), spacing=2.0, max_std=3.0,
                    crop=None, seed: int = 10_000, prefix: str = "synthetic") -> Iterator[Dict]:
    """Known-answer pairs from the engine's generator (same contrast), 2 mm voxels; pair ``i`` is
    drawn from seed ``seed + i`` (10 000 on: the benchmark's pairs; tuning uses other seeds).

    ``crop`` (D, H, W): keep only the central block of each pair (the same pairs, smaller): the
    fixed image, its labels and the true field are cut to the block, the moving image and labels
    to the block plus 8 voxels on every side, so that what the fixed block maps to is still there."""
    grid = Grid(shape, (spacing,) * 3, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    for i in range(count):
        d = folder / f"{prefix}_{i}"
        d.mkdir(parents=True, exist_ok=True)
        p = synth_pair(shape, seed=seed + i, max_std=max_std, same_contrast=True, full_resolution=True)
        images = {"fixed": tensor_to_image(p.fixed, grid), "moving": tensor_to_image(p.moving, grid),
                  "fixed_labels": tensor_to_image(p.fixed_labels.to(torch.int16), grid),
                  "moving_labels": tensor_to_image(p.moving_labels.to(torch.int16), grid),
                  "gt_displacement": displacement_to_sitk(p.displacement, grid)}
        if crop:
            images = {k: _central_block(img, crop, margin=8 if k.startswith("moving") else 0)
                      for k, img in images.items()}
        case = {"dataset": "synthetic", "name": f"{prefix}_{i}",
                "note": f"central {'x'.join(str(n) for n in reversed(crop))} block" if crop else ""}
        for key, img in images.items():
            if key == "gt_displacement":  # float32 components, as write_displacement_field writes them
                img = sitk.Cast(img, sitk.sitkVectorFloat32)
            case[key] = _save(img, d / f"{key}.nii.gz")
        yield case


def brain_aseg_cases(folder: Path, count: int = 2, std_mm: float = 4.0, spacing: int = 1) -> Iterator[Dict]:
    """The FreeSurfer-labelled brain warped by seeded random diffeomorphisms
    (:func:`known_deformation_cases`, seeds 20 000 on); Dice over its 30 usual labels."""
    src = SHARED / "brain_aseg" / "test_scan.npz"
    if not src.is_file():
        print(f"skipping brain_aseg: {src} is absent", file=sys.stderr)
        return
    data = np.load(src)
    vol_img = sitk.GetImageFromArray(data["vol"].astype(np.float32))  # 1 mm, no header: identity geometry
    seg_img = sitk.GetImageFromArray(data["seg"].astype(np.int16))
    labels = [int(x) for x in np.load(SHARED / "brain_aseg" / "labels.npz")["labels"]]
    yield from known_deformation_cases(folder, vol_img, seg_img, "brain_aseg", range(20_000, 20_000 + count),
                                       names=[f"brain_aseg_{i}" for i in range(count)],
                                       std_mm=std_mm, spacing=spacing, labels_of_interest=labels)


def known_deformation(shape, seed: int, std_mm: float = 4.0, spacing: int = 1):
    """The seeded random diffeomorphism of :func:`known_deformation_cases` on a grid of ``shape``
    at ``spacing`` mm: ``(u, w)`` = ``(exp(v), exp(-v))``, voxels ``(1, 3, D, H, W)``, so that
    ``moving = warp(fixed, w)`` is registered back by ``u``. The velocity is drawn on a
    half-resolution grid and upsampled (smooth, brain-scale deformations); its std and
    correlation length are given in voxels of that half grid (2 * spacing mm)."""
    g = torch.Generator().manual_seed(int(seed))
    small = [s // 2 for s in shape]
    v_small = random_velocity(small, g, std=std_mm / (2 * spacing), scale=12 / spacing)
    v = torch.nn.functional.interpolate(v_small, size=tuple(shape), mode="trilinear", align_corners=True) * 2
    return integrate_velocity(v), integrate_velocity(-v)


def known_deformation_cases(folder: Path, vol_img: sitk.Image, seg_img: Optional[sitk.Image], dataset: str,
                            seeds, std_mm: float = 4.0, spacing: int = 1,
                            labels_of_interest: Optional[List[int]] = None,
                            names: Optional[List[str]] = None) -> Iterator[Dict]:
    """One brain warped by seeded random diffeomorphisms, a case per seed, named ``names`` (else
    ``<dataset>_<seed>``).

    moving(x) = fixed(x + w(x)) with w = exp(-v); the true registration field is u = exp(v),
    so that moving(x + u(x)) = fixed(x). Endpoint error against u; Dice over the labels when
    ``seg_img`` is given. ``spacing`` 2 first downsamples the scan to 2 mm (:func:`downsampled`)
    and draws the same kind of deformation (same size and smoothness in mm) on that grid."""
    vol, grid = image_to_tensor(downsampled(vol_img, spacing))
    seg = None
    if seg_img is not None:
        seg = image_to_tensor(downsampled(seg_img, spacing, labels=True), dtype=torch.float32)[0]
    for index, seed in enumerate(seeds):
        name = names[index] if names else f"{dataset}_{seed}"
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        u, w = known_deformation(vol.shape[2:], seed, std_mm, spacing)
        case = {"dataset": dataset, "name": name,
                "note": f"{spacing} mm" + (" (downsampled)" if spacing > 1 else ""),
                "fixed": _save(tensor_to_image(vol, grid), d / "fixed.nii.gz"),
                "moving": _save(tensor_to_image(warp(vol, w), grid), d / "moving.nii.gz")}
        if seg is not None:
            moving_seg = warp(seg, w, interpolation="nearest")
            case["fixed_labels"] = _save(tensor_to_image(seg.to(torch.int16), grid), d / "fixed_labels.nii.gz")
            case["moving_labels"] = _save(tensor_to_image(moving_seg.to(torch.int16), grid), d / "moving_labels.nii.gz")
            if labels_of_interest:
                case["labels_of_interest"] = labels_of_interest
        gt = d / "gt_displacement.nii.gz"
        write_displacement_field(u, grid, str(gt))
        case["gt_displacement"] = str(gt)
        yield case


def oasis_pair_cases(folder: Path, directions: int = 2, spacing: int = 1) -> Iterator[Dict]:
    """The two labelled OASIS subjects, in both directions (``directions`` 1: B to A only);
    ``spacing`` 2 downsamples both to 2 mm first (:func:`downsampled`)."""
    src = SHARED / "oasis_pair"
    if not src.is_dir():
        print(f"skipping oasis_pair: {src} is absent", file=sys.stderr)
        return
    for a, b in (("A", "B"), ("B", "A"))[:directions]:
        case = {"dataset": "oasis_pair", "name": f"oasis_{b}_to_{a}", "labels_of_interest": [1, 2],
                "note": f"{spacing} mm" + (" (downsampled)" if spacing > 1 else ""),
                "fixed": str(src / f"subject_{a}.nii.gz"), "moving": str(src / f"subject_{b}.nii.gz"),
                "fixed_labels": str(src / f"subject_{a}_seg.nii.gz"),
                "moving_labels": str(src / f"subject_{b}_seg.nii.gz")}
        if spacing > 1:
            d = folder / case["name"]
            d.mkdir(parents=True, exist_ok=True)
            for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
                img = sitk.ReadImage(case[key])
                case[key] = _save(downsampled(img, spacing, labels=key.endswith("labels")), d / f"{key}.nii.gz")
        yield case


# -- IXI brains in native scanner geometry ----------------------------------------------------------
def ixi_muse_cases(folder: Path, pairs: int = 10, seed: int = 2026) -> Iterator[Dict]:
    """Inter-subject pairs of the ixi_muse **test** split (2 mm T1, skull-stripped, native
    unaligned scanner geometry, ~145 DLMUSE labels scored over the labels of the fixed map):
    ``pairs`` distinct subject pairs drawn with ``seed``, each in both directions."""
    src = SHARED / "ixi_muse"
    if not (src / "splits.json").is_file():
        print(f"skipping ixi_muse: {src} is absent", file=sys.stderr)
        return
    import itertools
    import json
    test = json.loads((src / "splits.json").read_text())["test"]
    combos = list(itertools.combinations(sorted(test), 2))
    rng = np.random.default_rng(seed)
    for i in sorted(rng.choice(len(combos), size=min(pairs, len(combos)), replace=False)):
        a, b = combos[i]
        for f, m in ((a, b), (b, a)):
            yield {"dataset": "ixi_muse", "name": f"ixi_{m}_to_{f}", "note": "2 mm, native geometry",
                   "fixed": str(src / f"{f}_t1.nii.gz"), "moving": str(src / f"{m}_t1.nii.gz"),
                   "fixed_labels": str(src / f"{f}_labels.nii.gz"),
                   "moving_labels": str(src / f"{m}_labels.nii.gz")}


# -- prostate MR to transrectal ultrasound ------------------------------------------------------------
def _channels(path: Path) -> List[np.ndarray]:
    """A one-hot label file (4D, channels last in the file; or 3D: one channel) -> a list of
    (D, H, W) boolean masks."""
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    arr = arr[None] if arr.ndim == 3 else arr  # 4D files read as (C, D, H, W)
    return [a > 0.5 for a in arr]


def _mask_image(mask: np.ndarray, like: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(like)
    return img


def _box_centre(img: sitk.Image) -> np.ndarray:
    return np.asarray(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()]))


def _centroid(mask: np.ndarray, img: sitk.Image) -> np.ndarray:
    """Physical (LPS mm) centroid of a (D, H, W) mask on ``img``'s grid."""
    kji = np.argwhere(mask).mean(axis=0)
    return np.asarray(img.TransformContinuousIndexToPhysicalPoint([float(c) for c in kji[::-1]]))


def prostate_cases(folder: Path, split: str = "test", sample: Optional[int] = None) -> Iterator[Dict]:
    """MR (moving) to transrectal ultrasound (fixed) pairs of ``prostate_mr_trus/<split>``.

    The two images of a pair do not share a physical space (both headers put their first voxel
    at the same corner, but the boxes differ: 64x64x60 vs 44x59x41 voxels of 0.4 mm), so both go
    onto one common grid first, without looking at the labels: the ultrasound's own grid (its
    physical box at its 0.4 mm spacing) is the common grid, the MR's box is translated so that its
    centre is the ultrasound box's centre, and the MR (and its labels) is resampled onto the
    common grid (linear; labels channel by channel, thresholded at 0.5). The MR's wider field of
    view outside the ultrasound box is cropped away, for every method alike.

    Scores: Dice of the gland (label channel 0, written as label 1) and the centroid error of the
    landmark blobs (channels 1 and 2 where both images have them), as corresponding points
    (``fixed_landmarks.csv`` / ``moving_landmarks.csv``, LPS mm) mapped through the transform.
    ``sample``: every n-th case only (train split)."""
    src = SHARED / "prostate_mr_trus" / split
    if not (src / "fixed_images").is_dir():
        print(f"skipping prostate_mr_trus/{split}: {src} is absent", file=sys.stderr)
        return
    names = sorted(p.name for p in (src / "fixed_images").glob("*.nii.gz"))
    if sample:
        names = names[::sample]
    for fname in names:
        stem = fname[:-len(".nii.gz")]
        d = folder / f"prostate_{split}_{stem}"
        d.mkdir(parents=True, exist_ok=True)
        fixed = sitk.ReadImage(str(src / "fixed_images" / fname))
        moving = sitk.ReadImage(str(src / "moving_images" / fname))
        moving = sitk.Image(moving)
        moving.SetOrigin(tuple(np.asarray(moving.GetOrigin()) + _box_centre(fixed) - _box_centre(moving)))
        moving_common = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, sitk.Transform(),
                                      sitk.sitkLinear, 0.0)
        fixed_ch = _channels(src / "fixed_labels" / fname)
        moving_ch = []
        for mask in _channels(src / "moving_labels" / fname):
            m = sitk.Resample(sitk.Cast(_mask_image(mask, moving), sitk.sitkFloat32), fixed, sitk.Transform(),
                              sitk.sitkLinear, 0.0)
            moving_ch.append(sitk.GetArrayFromImage(m) > 0.5)
        if not fixed_ch[0].any() or not moving_ch[0].any():
            print(f"skipping prostate {split}/{stem}: a gland label is empty", file=sys.stderr)
            continue
        case = {"dataset": "prostate_mr_trus", "name": f"prostate_{split}_{stem}", "labels_of_interest": [1],
                "note": split,
                "fixed": _save(sitk.Cast(fixed, sitk.sitkFloat32), d / "fixed.nii.gz"),
                "moving": _save(moving_common, d / "moving.nii.gz"),
                "fixed_labels": _save(_mask_image(fixed_ch[0], fixed), d / "fixed_labels.nii.gz"),
                "moving_labels": _save(_mask_image(moving_ch[0], fixed), d / "moving_labels.nii.gz")}
        pairs = [(str(c), _centroid(fixed_ch[c], fixed), _centroid(moving_ch[c], fixed))
                 for c in range(1, min(len(fixed_ch), len(moving_ch))) if fixed_ch[c].any() and moving_ch[c].any()]
        if pairs:
            case["fixed_landmarks"] = str(write_landmarks_csv(d / "fixed_landmarks.csv", [p[1] for p in pairs],
                                                              [f"blob{p[0]}" for p in pairs]))
            case["moving_landmarks"] = str(write_landmarks_csv(d / "moving_landmarks.csv", [p[2] for p in pairs],
                                                               [f"blob{p[0]}" for p in pairs]))
        yield case


def prostate_mr_trus_cases(folder: Path, train_sample: Optional[int] = 5) -> Iterator[Dict]:
    """``test/`` (2 pairs) and every ``train_sample``-th ``train/`` pair (``None``: test only)."""
    yield from prostate_cases(folder, "test")
    if train_sample:
        yield from prostate_cases(folder, "train", sample=train_sample)


# -- a user's own folder of pairs ----------------------------------------------------------------------
def _one(folder: Path, stem: str) -> Optional[str]:
    found = sorted(p for p in folder.glob(f"{stem}.*") if p.is_file())
    if len(found) > 1:
        raise SystemExit(f"{folder}: more than one {stem}.* file ({', '.join(p.name for p in found)}); keep one")
    return str(found[0]) if found else None


def folder_cases(pairs_dir: Path) -> Iterator[Dict]:
    """A user's pairs, ``pairs_dir/<case>/fixed.*`` and ``moving.*`` with optional labels and
    landmarks (layout in this module's docstring). Labels are scored over every non-zero label
    of the fixed label map."""
    pairs_dir = Path(pairs_dir)
    if not pairs_dir.is_dir():
        print(f"skipping --pairs-dir: {pairs_dir} is not a folder", file=sys.stderr)
        return
    for d in sorted(p for p in pairs_dir.iterdir() if p.is_dir()):
        case = {"dataset": pairs_dir.name, "name": d.name, "fixed": _one(d, "fixed"), "moving": _one(d, "moving")}
        if not case["fixed"] or not case["moving"]:
            print(f"skipping {d}: it needs a fixed.* and a moving.* image", file=sys.stderr)
            continue
        for key in ("fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks"):
            path = _one(d, key)
            if path:
                case[key] = path
        for kind in ("labels", "landmarks"):
            if (f"fixed_{kind}" in case) != (f"moving_{kind}" in case):
                print(f"{d}: {kind} ignored, they need both fixed_{kind}.* and moving_{kind}.*", file=sys.stderr)
                case.pop(f"fixed_{kind}", None)
                case.pop(f"moving_{kind}", None)
        yield case


DATASETS = {"synthetic": synthetic_cases, "brain_aseg": brain_aseg_cases, "oasis_pair": oasis_pair_cases,
            "prostate_mr_trus": prostate_mr_trus_cases, "ixi_muse": ixi_muse_cases}

#: the --quick selection: one case per set (the central 64x80x64 block of the first synthetic pair),
#: brains at 2 mm, one OASIS direction, one prostate test pair
QUICK = {"synthetic": {"count": 1, "crop": (64, 80, 64)}, "brain_aseg": {"count": 1, "spacing": 2},
         "oasis_pair": {"directions": 1, "spacing": 2}, "prostate_mr_trus": {"train_sample": None},
         "ixi_muse": {"pairs": 1}}


def build(names: List[str], folder: Path, quick: bool = False, pairs_dir: Optional[str] = None,
          options: Optional[Dict[str, Dict]] = None) -> List[Dict]:
    """The cases of the named datasets; ``options``: dataset name -> keyword arguments of its
    case builder (e.g. ``{"ixi_muse": {"pairs": 10}}``), over the ``--quick`` ones."""
    cases: List[Dict] = []
    for name in names:
        kwargs = dict(QUICK.get(name, {})) if quick else {}
        kwargs.update((options or {}).get(name, {}))
        found = list(DATASETS[name](folder, **kwargs))
        if quick and name == "prostate_mr_trus":
            found = found[:1]
        cases.extend(found)
    if pairs_dir:
        cases.extend(folder_cases(Path(pairs_dir)))
    return cases
