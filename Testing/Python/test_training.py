"""Model files and the training command: self-describing weights, checksums, the shipped model,
resumable and deterministic training that lowers the loss."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from deepreglib.cli import main as cli_main
from deepreglib.errors import BadInputError
from deepreglib.modelio import load_model, models_dir, save_model, sha256_file
from deepreglib.networks.voxelmorph import VoxelMorph
from deepreglib.registry import METHODS
from deepreglib.synth import synth_pair


def test_untrained_voxelmorph_is_the_identity():
    torch.manual_seed(0)
    net = VoxelMorph().eval()
    p = synth_pair((32, 32, 32), seed=3)
    with torch.no_grad():
        out = net(p.moving, p.fixed)
    assert out.displacement.shape == (1, 3, 32, 32, 32) and out.velocity.shape == (1, 3, 16, 16, 16)
    assert float(out.displacement.abs().max()) < 1e-2
    assert torch.allclose(out.warped, p.moving, atol=1e-2)


def test_model_file_round_trip_and_tamper_detection(tmp_path):
    torch.manual_seed(1)
    net = VoxelMorph(encoder=(8, 8), decoder=(8, 8, 8), int_steps=5)
    path = save_model(net, tmp_path / "m", {"note": "test"})
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["config"] == {"encoder": [8, 8], "decoder": [8, 8, 8], "int_steps": 5, "int_downsize": 2}
    assert card["sha256"] == sha256_file(path) and card["note"] == "test"
    loaded, _ = load_model(path)
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match="checksum"):
        load_model(path)
    with pytest.raises(BadInputError, match="missing"):
        load_model(tmp_path / "absent.pt")


def test_shipped_weights_match_their_model_cards():
    for info in METHODS.values():
        if info.weights is None:
            continue
        pt = models_dir() / f"{info.weights}.pt"
        assert pt.is_file(), f"{info.name}: {pt} is not shipped"
        model, card = load_model(pt)  # verifies the sha256
        assert card["iterations"] > 0 and "training" in card and "training_log" in card
        assert sum(p.numel() for p in model.parameters()) == card["parameters"]


def _train(tmp_path, steps, out="run", extra=()):
    args = ["train", "voxelmorph", "--out", str(tmp_path / out), "--steps", str(steps), "--shape", "32", "32", "32",
            "--threads", "1", "--checkpoint-every", "2", "--log-every", "100", "--lr", "1e-3", "--synth-bank", "4",
            *extra]
    assert cli_main(args) == 0


def test_training_resumes_exactly_and_exports_a_model_card(tmp_path):
    torch.manual_seed(0)
    _train(tmp_path, 4, "straight")
    torch.manual_seed(0)
    _train(tmp_path, 2, "resumed")
    torch.manual_seed(123)  # the resumed run must not depend on the global seed
    _train(tmp_path, 4, "resumed", extra=("--export", str(tmp_path / "exported")))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    rows = (tmp_path / "resumed" / "loss.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4  # header + one row per step, none repeated
    card = json.loads((tmp_path / "exported.json").read_text())
    assert card["iterations"] == 4 and card["training"]["shape"] == [32, 32, 32]
    load_model(tmp_path / "exported.pt")


def test_a_short_training_run_lowers_the_loss_on_a_fixed_pair():
    """Overfit one synthetic pair for a few Adam steps: the registration loss must fall."""
    from deepreglib.train import RECIPES
    import argparse
    torch.manual_seed(0)
    net = VoxelMorph()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    p = synth_pair((32, 32, 32), seed=7, max_std=3.0)
    batch = {"fixed": p.fixed, "moving": p.moving}
    args = argparse.Namespace(reg_weight=1.0)
    losses = []
    for _ in range(12):
        loss, _terms = RECIPES["voxelmorph"].loss(net, batch, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.01, losses


def test_gradient_clipping_is_logged_and_recorded_in_the_model_card(tmp_path):
    _train(tmp_path, 3, "clipped", extra=("--clip-grad", "0.5", "--export", str(tmp_path / "clipped_model")))
    import csv
    rows = list(csv.DictReader(open(tmp_path / "clipped" / "loss.csv")))
    assert len(rows) == 3 and all(float(r["grad_norm"]) > 0 for r in rows)  # the norm before clipping
    card = json.loads((tmp_path / "clipped_model.json").read_text())
    assert card["sessions"][0]["changed"]["clip_grad"] == 0.5
    _train(tmp_path, 2, "unclipped")
    header = (tmp_path / "unclipped" / "loss.csv").read_text().splitlines()[0]
    assert "grad_norm" not in header


def test_a_resumed_run_uses_the_learning_rate_of_its_own_session(tmp_path):
    _train(tmp_path, 2, "lr")
    _train(tmp_path, 3, "lr", extra=("--lr", "2e-4"))
    ckpt = torch.load(tmp_path / "lr" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert all(g["lr"] == pytest.approx(2e-4) for g in ckpt["optimizer"]["param_groups"])
