"""The training cache: real scans aligned affinely to one reference once, on the coarse training
grid (``deepreg train-cache``; issue 17's campaign).

Every subject of a ``train`` (or ``val``) split is registered affinely, with the engine's own
alignment (:func:`deepreglib.classic.initial.initial_transform`, ``affine``), to one reference
subject of the IXI ``train`` split, and resampled onto the reference grid: an axis-aligned LPS
grid of ``shape`` voxels at ``spacing`` mm centred on the reference brain. Any two cached subjects
are then roughly aligned, as the pipeline's ``--init affine`` leaves a pair, and a network
trained on them learns the remaining deformation.

Layout of a cache folder (never committed; rebuilt by the command)::

    cache.json                       reference, grid, settings, one entry per subject
    <dataset>/<split>/<subject>.npz  image (uint8, 0..255 after robust scaling) and, for IXI,
                                     labels (int16 MUSE indices, nearest-neighbour)

Only the ``train`` split is ever read for training; ``val`` is for choosing what to export.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.errors import BadInputError
from ..core.geometry import Grid

@dataclass(frozen=True)
class CacheSet:
    """A set of scans the cache knows: its ``folder`` under the data root, the image and label
    file suffixes (``labels`` None: unlabelled) and the splits cached. ``align_with``: the
    suffix of another scan of the same subject in the same scanner space (the skull-stripped
    scan of a whole-head one), aligned in its place and its matrix applied to this image, for
    scans the alignment to the (skull-stripped) reference would handle badly; ``optional``:
    subjects without this file are skipped (only some IXI subjects have a whole-head scan)."""

    folder: str
    image: str
    labels: Optional[str]
    splits: Tuple[str, ...]
    align_with: Optional[str] = None
    optional: bool = False


#: the sets the cache knows
DATASETS = {
    "ixi_muse": CacheSet("ixi_muse", "_t1.nii.gz", "_labels.nii.gz", ("train", "val")),
    "openneuro_ds002748": CacheSet("openneuro_ds002748", "_t1.nii.gz", None, ("train",)),
    # the 16 IXI train subjects also scanned whole-head: whole heads for the networks that see a
    # scan whole (D-Net, SAM); aligned through their skull-stripped scan (same space)
    "ixi_muse_wholehead": CacheSet("ixi_muse", "_t1_wholehead.nii.gz", None, ("train",),
                                   align_with="_t1.nii.gz", optional=True),
}
#: what ``deepreg train-cache`` builds by default
DEFAULT_SETS = ("ixi_muse", "openneuro_ds002748", "ixi_muse_wholehead")
#: what a recipe trains on unless it names its own (TrainingRecipe.cache_sets): the skull-stripped
#: brains, so that a pair of two subjects is two images of one kind
TRAINING_SETS = ("ixi_muse", "openneuro_ds002748")
CACHE_VERSION = 1


@dataclass
class CachedSubject:
    name: str
    image: torch.Tensor                # (1, 1, D, H, W) float32 in [0, 1]
    labels: Optional[torch.Tensor]     # (1, 1, D, H, W) int64, or None


def reference_grid(image: torch.Tensor, grid: Grid, shape: Sequence[int], spacing: float) -> Grid:
    """An axis-aligned (LPS) grid of ``shape`` (D, H, W) at ``spacing`` mm, centred on the
    intensity centroid of ``image`` (on ``grid``)."""
    w = image[0, 0].double().clamp(min=0)
    if float(w.sum()) <= 0:
        raise BadInputError("the reference image is empty")
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in w.shape],
                                     indexing="ij"))
    kji = (idx * w).flatten(1).sum(1) / w.sum()
    centre = grid.index_to_physical(kji.numpy())
    size_xyz = np.asarray(shape[::-1], dtype=np.float64)
    origin = np.asarray(centre) - (size_xyz - 1) / 2.0 * spacing
    return Grid(tuple(shape), (spacing,) * 3, tuple(origin), tuple(np.eye(3).ravel()))


def _split(root: Path, folder: str, split: str) -> List[str]:
    path = root / folder / "splits.json"
    if not path.is_file():
        raise BadInputError(f"{path} is missing: the cache takes its subjects from the dataset's splits")
    splits = json.loads(path.read_text())
    if split not in splits:
        raise BadInputError(f"{path} has no split {split!r} (it has {sorted(splits)})")
    return list(splits[split])


def build_cache(data_root, out, shape: Sequence[int] = (64, 80, 64), spacing: float = 2.5,
                datasets: Sequence[str] = DEFAULT_SETS,
                limit: Optional[int] = None, log: Callable[[str], None] = print) -> Path:
    """Align and cache the subjects of ``datasets``; subjects already cached (same settings) are
    kept, so an interrupted build resumes. Returns the path of ``cache.json``."""
    import SimpleITK as sitk
    from ..classic.initial import initial_transform
    from ..core.preprocess import normalize_intensity
    from ..core.resample import resample_to_grid
    from ..io.images import image_to_tensor, read_image, read_labels

    root, out = Path(data_root), Path(out)
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        raise BadInputError(f"unknown dataset(s) {unknown}; the cache knows {sorted(DATASETS)}")
    if not (root / "ixi_muse").is_dir():
        raise BadInputError(f"{root} has no ixi_muse folder: give --data the shared data folder "
                            "(../shared/data)")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "cache.json"
    settings = {"version": CACHE_VERSION, "shape": list(shape), "spacing_mm": spacing}
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest and manifest.get("settings") != settings:
        raise BadInputError(f"{out} holds a cache built with {manifest.get('settings')}, not {settings}: "
                            "give a new --out folder (nothing there is overwritten)")

    ref_name = sorted(_split(root, "ixi_muse", "train"))[0]
    ref_img = read_image(root / "ixi_muse" / f"{ref_name}_t1.nii.gz")
    ref_t, ref_grid_native = image_to_tensor(ref_img)
    ref_t = normalize_intensity(ref_t.float())
    grid = reference_grid(ref_t, ref_grid_native, shape, spacing)
    ref_on_grid = resample_to_grid(ref_t, ref_grid_native, grid)
    manifest.setdefault("settings", settings)
    manifest["reference"] = {"dataset": "ixi_muse", "subject": ref_name,
                             "grid": {"shape": list(grid.shape), "spacing": list(grid.spacing),
                                      "origin": list(grid.origin), "direction": list(grid.direction)}}
    subjects = manifest.setdefault("subjects", {})
    for ds in datasets:
        cset = DATASETS[ds]
        folder, img_suffix, lab_suffix = cset.folder, cset.image, cset.labels
        for split in cset.splits:
            names = _split(root, folder, split)
            if cset.optional:
                names = [n for n in names if (root / folder / f"{n}{img_suffix}").is_file()]
            names = names[: limit or None]
            for k, name in enumerate(names):
                key = f"{ds}/{split}/{name}"
                target = out / ds / split / f"{name}.npz"
                if key in subjects and target.is_file():
                    continue
                t0 = time.time()
                img = read_image(root / folder / f"{name}{img_suffix}")
                mov, mgrid = image_to_tensor(img)
                mov = normalize_intensity(mov.float())
                if cset.align_with:  # aligned through the same subject's other scan (same space)
                    same, sgrid = image_to_tensor(read_image(root / folder / f"{name}{cset.align_with}"))
                    matrix = initial_transform("affine", ref_on_grid, grid, normalize_intensity(same.float()), sgrid)
                else:
                    matrix = initial_transform("affine", ref_on_grid, grid, mov, mgrid)
                warped = resample_to_grid(mov, mgrid, grid, matrix_lps=matrix)
                arrays = {"image": np.round(warped[0, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)}
                if lab_suffix:
                    lab = read_labels(root / folder / f"{name}{lab_suffix}")
                    lab_t = torch.from_numpy(sitk.GetArrayFromImage(lab).astype(np.float32))[None, None]
                    lab_w = resample_to_grid(lab_t, Grid.from_sitk(lab), grid, matrix_lps=matrix,
                                             interpolation="nearest")
                    arrays["labels"] = lab_w[0, 0].round().numpy().astype(np.int16)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.stem + ".tmp.npz")
                np.savez_compressed(tmp, **arrays)
                tmp.replace(target)
                subjects[key] = {"matrix_lps": np.asarray(matrix).tolist(), "seconds": time.time() - t0,
                                 "labels": bool(lab_suffix)}
                _write_json(manifest_path, manifest)
                log(f"{key}: {k + 1}/{len(names)} aligned in {time.time() - t0:.1f} s")
    _write_json(manifest_path, manifest)
    return manifest_path


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _manifest(folder: Path) -> dict:
    path = folder / "cache.json"
    if not path.is_file():
        raise BadInputError(f"{folder} is not a training cache (no cache.json); build one with "
                            "`deepreg train-cache --data ../shared/data --out DIR`")
    return json.loads(path.read_text())


def _grid(manifest: dict) -> Grid:
    g = manifest["reference"]["grid"]
    return Grid(tuple(g["shape"]), tuple(g["spacing"]), tuple(g["origin"]), tuple(g["direction"]))


def cache_grid(folder) -> Grid:
    """The grid every cached subject is stored on (read from ``cache.json`` alone)."""
    return _grid(_manifest(Path(folder)))


def load_cache(folder, split: str = "train", datasets: Optional[Sequence[str]] = None) -> Tuple[List[CachedSubject], Grid]:
    """The cached subjects of ``split`` (every dataset, or those named) and the cache grid."""
    folder = Path(folder)
    manifest = _manifest(folder)
    grid = _grid(manifest)
    out = []
    for key in sorted(manifest["subjects"]):
        ds, sp, name = key.split("/")
        if sp != split or (datasets and ds not in datasets):
            continue
        f = folder / ds / sp / f"{name}.npz"
        if not f.is_file():
            continue
        with np.load(f) as z:
            image = torch.from_numpy(z["image"].astype(np.float32) / 255.0)[None, None]
            labels = torch.from_numpy(z["labels"].astype(np.int64))[None, None] if "labels" in z else None
        out.append(CachedSubject(f"{ds}/{name}", image, labels))
    if not out:
        raise BadInputError(f"{folder} has no cached subjects of split {split!r}")
    return out, grid


def sample_labels(fixed: torch.Tensor, moving: torch.Tensor, k: int, rng: np.random.Generator):
    """Relabel a pair's label maps to ``0..k``: ``k`` labels drawn at random among those present
    in the fixed map (the rest become background), so the Dice term's one-hot stays ``k + 1``
    channels however many labels the atlas has (MUSE: about 145)."""
    present = np.unique(fixed.numpy())
    present = present[present > 0]
    if present.size == 0:
        return torch.zeros_like(fixed, dtype=torch.uint8), torch.zeros_like(moving, dtype=torch.uint8)
    chosen = rng.choice(present, size=min(k, present.size), replace=False)
    lut = torch.zeros(int(max(fixed.max(), moving.max())) + 1, dtype=torch.uint8)
    lut[torch.as_tensor(chosen, dtype=torch.long)] = torch.arange(1, len(chosen) + 1, dtype=torch.uint8)
    return lut[fixed.clamp(min=0)], lut[moving.clamp(min=0)]
