"""The training cache (``deepreg train-cache``), its labelled real pairs and the campaign's
validation (issue 17)."""
import argparse
import json

import numpy as np
import pytest
import torch

from deepreglib.core.errors import BadInputError
from deepreglib.core.metrics import dice_per_label
from deepreglib.train.cache import build_cache, load_cache, sample_labels
from deepreglib.train.loop import draw_batch, real_pair


def test_the_reference_aligned_to_itself_is_the_identity(small_cache):
    manifest = json.loads((small_cache / "cache.json").read_text())
    ref = manifest["reference"]["subject"]
    m = np.asarray(manifest["subjects"][f"ixi_muse/train/{ref}"]["matrix_lps"])
    assert np.abs(m[:3, :3] - np.eye(3)).max() < 0.03
    assert np.linalg.norm(m[:3, 3]) < 1.5  # mm, half a voxel of the 3 mm grid


def test_cached_subjects_are_aligned_well_beyond_their_native_overlap(small_cache, shared_data):
    import SimpleITK as sitk
    train, grid = load_cache(small_cache, "train")
    val, _ = load_cache(small_cache, "val")
    assert grid.shape == (48, 64, 48) and grid.spacing == (3.0, 3.0, 3.0)
    assert len(train) == 2 and len(val) == 2
    assert all(s.labels is not None and s.labels.shape == s.image.shape for s in train + val)
    assert 0.0 <= float(train[0].image.min()) and float(train[0].image.max()) <= 1.0
    aligned = np.mean(list(dice_per_label(train[0].labels, val[0].labels).values()))
    # the same two label maps resampled onto the grid without any alignment (native geometry)
    from deepreglib.core.geometry import Grid
    from deepreglib.core.resample import resample_to_grid
    maps = []
    for name in (train[0].name, val[0].name):
        img = sitk.ReadImage(str(shared_data / "ixi_muse" / f"{name.split('/')[1]}_labels.nii.gz"))
        t = torch.from_numpy(sitk.GetArrayFromImage(img).astype(np.float32))[None, None]
        maps.append(resample_to_grid(t, Grid.from_sitk(img), grid, interpolation="nearest").long())
    native = np.mean(list(dice_per_label(maps[0], maps[1]).values()))
    assert aligned > 0.4 and aligned > native + 0.1


def test_a_cache_with_other_settings_is_never_overwritten(small_cache, shared_data):
    before = (small_cache / "cache.json").read_text()
    with pytest.raises(BadInputError, match="new --out"):
        build_cache(shared_data, small_cache, shape=(64, 80, 64), spacing=2.5, datasets=["ixi_muse"], limit=1)
    assert (small_cache / "cache.json").read_text() == before


def test_missing_cache_says_how_to_build_one(tmp_path):
    with pytest.raises(BadInputError, match="deepreg train-cache"):
        load_cache(tmp_path)


def test_sampled_labels_keep_the_correspondence_and_stay_few():
    rng = np.random.default_rng(0)
    fixed = torch.from_numpy(rng.integers(0, 150, size=(1, 1, 8, 8, 8)))
    moving = fixed.roll(1, dims=2)
    f, m = sample_labels(fixed, moving, 16, np.random.default_rng(1))
    assert int(f.max()) <= 16 and len(np.unique(f.numpy())) == 17  # background + 16 labels
    orig = {int(a): int(b) for a, b in zip(fixed.flatten(), f.flatten())}
    for a, b in zip(moving.flatten(), m.flatten()):
        assert orig.get(int(a), 0) == int(b)  # each original label maps to one new number


def test_real_pairs_from_the_cache_carry_labels_and_are_logged_as_real(small_cache):
    train, _ = load_cache(small_cache, "train")
    vols, labels = [s.image for s in train], [s.labels for s in train]
    batch = real_pair(vols, (32, 32, 32), np.random.default_rng(0), labels, 8)
    assert batch["fixed"].shape == batch["fixed_labels"].shape == (1, 1, 32, 32, 32)
    assert int(batch["fixed_labels"].max()) <= 8
    args = argparse.Namespace(seed=0, real_fraction=1.0, shape=(32, 32, 32), synth_bank=4, max_std=3.0,
                              label_sample=8)
    batch, real = draw_batch(3, args, vols, None, labels)
    assert real and "moving_labels" in batch
    again, _ = draw_batch(3, args, vols, None, labels)
    assert torch.equal(batch["fixed"], again["fixed"]) and torch.equal(batch["moving_labels"], again["moving_labels"])


def test_validation_scores_the_method_as_it_runs_at_inference(small_cache):
    from deepreglib.run.validate import validate, validation_pairs
    assert validation_pairs(3, 4) == [(0, 1), (1, 2), (2, 0), (0, 2)]
    score = validate("voxelmorph", None, small_cache, pairs=2)
    assert score["pairs"] == 2
    assert 0.3 < score["dice_affine"] < 0.8
    assert score["dice"] > score["dice_affine"]  # the shipped network improves on the affine
    assert score["folding_percent"] < 1.0


def test_deepreg_train_on_the_cache_learns_from_labelled_real_pairs(small_cache, tmp_path):
    import csv
    from deepreglib.cli import main
    out = tmp_path / "run"
    rc = main(["train", "voxelmorph", "--out", str(out), "--cache", str(small_cache), "--steps", "3",
               "--shape", "32", "32", "32", "--real-fraction", "1", "--label-weight", "1",
               "--label-sample", "8", "--threads", "1", "--export", str(tmp_path / "m" / "vxm.pt")])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert len(rows) == 3 and all(r["real"] == "1" and 0.0 < float(r["dice_loss"]) <= 1.0 for r in rows)
    card = json.loads((tmp_path / "m" / "vxm.json").read_text())
    assert card["training"]["cache"] == str(small_cache) and card["training"]["real_fraction"] == 1.0
    with pytest.raises(BadInputError, match="either --cache or --real-dir"):
        from deepreglib.train.loop import load_training_scans
        load_training_scans(argparse.Namespace(cache=str(small_cache), real_dir=str(tmp_path)))


def test_the_campaign_ledger_gains_new_columns_without_losing_a_row(tmp_path, monkeypatch):
    """A ledger written before D-Net's pose columns existed is rewritten in the new layout when
    the first row of the new kind arrives; every old row and value is kept."""
    import csv
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "campaign", Path(__file__).resolve().parents[2] / "benchmarks" / "campaign.py")
    campaign = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(campaign)
    ledger = tmp_path / "ledger.csv"
    old_fields = campaign.FIELDS[:campaign.FIELDS.index("sha256") + 1]
    with open(ledger, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        w.writerow({k: ("carnet" if k == "method" else "0.5") for k in old_fields})
    monkeypatch.setattr(campaign, "LEDGER", ledger)
    campaign.append_ledger({"method": "dnet", "val_rotation_median_deg": "15.40"})
    rows = list(csv.DictReader(open(ledger)))
    assert list(rows[0].keys()) == campaign.FIELDS
    assert rows[0]["method"] == "carnet" and rows[0]["val_dice"] == "0.5" and rows[0]["val_rotation_median_deg"] == ""
    assert rows[1]["method"] == "dnet" and rows[1]["val_rotation_median_deg"] == "15.40"
    assert campaign.primary("dnet", {"rotation_median_deg": 15.4}) == -15.4  # lower error, higher score
    assert campaign.primary("carnet", {"dice": 0.57}) == 0.57


def test_whole_head_scans_are_cached_through_their_skull_stripped_scan(tmp_path):
    """A whole-head IXI scan is aligned through the same subject's skull-stripped scan (the same
    scanner space): on the cache grid the two agree inside the brain. Registration recipes
    train on the skull-stripped sets only; D-Net and SAM, which see one scan at a time, take
    the whole heads too."""
    from conftest import SHARED_DATA
    from deepreglib.core.resample import resample_to_grid
    from deepreglib.io.images import image_to_tensor, read_image
    from deepreglib.core.preprocess import normalize_intensity
    from deepreglib.methods.registry import training_recipes
    from deepreglib.train.cache import TRAINING_SETS
    if not (SHARED_DATA / "ixi_muse").is_dir():
        pytest.skip(f"{SHARED_DATA / 'ixi_muse'} is absent")
    out = tmp_path / "cache"
    build_cache(SHARED_DATA, out, shape=(48, 64, 48), spacing=3.0, datasets=["ixi_muse_wholehead"], limit=1,
                log=lambda m: None)
    (subject,), grid = load_cache(out, "train", ["ixi_muse_wholehead"])
    name = subject.name.split("/")[1]
    assert (SHARED_DATA / "ixi_muse" / f"{name}_t1_wholehead.nii.gz").is_file() and subject.labels is None
    matrix = np.asarray(json.loads((out / "cache.json").read_text())["subjects"][
        f"ixi_muse_wholehead/train/{name}"]["matrix_lps"])
    brain, bgrid = image_to_tensor(read_image(SHARED_DATA / "ixi_muse" / f"{name}_t1.nii.gz"))
    brain = resample_to_grid(normalize_intensity(brain.float()), bgrid, grid, matrix_lps=matrix)
    inside = brain > 0.05
    assert float(inside.float().mean()) > 0.1
    corr = np.corrcoef(subject.image[inside].numpy(), brain[inside].numpy())[0, 1]
    assert corr > 0.9
    assert "ixi_muse_wholehead" not in TRAINING_SETS
    recipes = training_recipes()
    assert "ixi_muse_wholehead" in recipes["dnet"].cache_sets and "ixi_muse_wholehead" in recipes["sam"].cache_sets
    assert recipes["voxelmorph"].cache_sets is None and recipes["carnet"].cache_sets is None
    from deepreglib.train.loop import load_training_scans
    vols, _ = load_training_scans(argparse.Namespace(cache=str(out), real_dir=None), recipes["dnet"].cache_sets)
    assert len(vols) == 1
    with pytest.raises(BadInputError, match="no cached subjects"):  # only whole heads here
        load_training_scans(argparse.Namespace(cache=str(out), real_dir=None))
