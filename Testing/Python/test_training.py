"""Model files and the training command: self-describing weights, checksums, the shipped model,
resumable and deterministic training that lowers the loss."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from deepreglib.cli import build_parser, main as cli_main
from deepreglib.core.errors import BadInputError
from deepreglib.methods.weights import load_model, models_dir, save_model, sha256_file
from deepreglib.methods.voxelmorph.network import VoxelMorph
from deepreglib.methods.registry import METHODS
from deepreglib.train.synth import synth_pair


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
    # every model file shipped has its card and matches it, the training-only ones too (amdf_ae)
    for pt in sorted(models_dir().glob("*.pt")):
        model, card = load_model(pt)
        assert card["iterations"] > 0 and sum(p.numel() for p in model.parameters()) == card["parameters"], pt


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
    from deepreglib.methods.registry import training_recipes
    RECIPES = training_recipes()
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


def test_the_weight_average_follows_its_formula():
    """``min(decay, (1 + n) / (10 + n))`` after ``n`` updates: 0.1 first, then the decay."""
    from deepreglib.train.loop import WeightAverage
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = WeightAverage.start(net, 0.5)
    expected = 1.0
    for n, w in enumerate([3.0, 5.0, 7.0, 9.0]):
        with torch.no_grad():
            net.weight.fill_(w)
        ema.update(net)
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
        assert float(ema.average["weight"]) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(8.2)  # 2.8, 4.6, 6.4, 8.2 by hand: the decay stays below 0.5
    with ema.applied(net) as averaged:
        assert float(averaged.weight) == pytest.approx(expected)
    assert float(net.weight) == 9.0  # the model's own weights come back
    assert WeightAverage.start(net, 0.0) is None


def test_training_exports_the_weight_average_and_resumes_it_exactly(tmp_path, capsys):
    torch.manual_seed(0)
    _train(tmp_path, 6, "straight", extra=("--ema", "0.5"))
    torch.manual_seed(0)
    _train(tmp_path, 4, "resumed", extra=("--ema", "0.5"))
    _train(tmp_path, 6, "resumed", extra=("--ema", "0.5", "--export", str(tmp_path / "model")))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["ema_updates"] == b["ema_updates"] == 6 and b["ema_decay"] == 0.5
    exported, card = load_model(tmp_path / "model.pt")
    moved = 0
    for k, v in exported.state_dict().items():
        assert torch.allclose(a["ema"][k], b["ema"][k], atol=1e-6), k
        assert torch.allclose(v, b["ema"][k]), k  # the average is exported, not the last weights
        moved += not torch.allclose(b["ema"][k], b["model"][k])
    assert moved > 0
    assert card["training"]["weight_average_decay"] == 0.5
    # a checkpoint without an average starts one from its weights
    _train(tmp_path, 2, "late")
    _train(tmp_path, 3, "late", extra=("--ema", "0.9"))
    c = torch.load(tmp_path / "late" / "checkpoint.pt", weights_only=True)
    assert c["ema_updates"] == 1
    args = ["train", "voxelmorph", "--out", str(tmp_path / "bad"), "--steps", "2", "--ema", "1.5"]
    assert cli_main(args) != 0
    assert "--ema 1.5" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_resumed_run_uses_the_learning_rate_of_its_own_session(tmp_path):
    _train(tmp_path, 2, "lr")
    _train(tmp_path, 3, "lr", extra=("--lr", "2e-4"))
    ckpt = torch.load(tmp_path / "lr" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert all(g["lr"] == pytest.approx(2e-4) for g in ckpt["optimizer"]["param_groups"])


def test_a_run_can_start_from_trained_weights_and_keeps_their_history(tmp_path, capsys):
    """--init-from: a new run folder goes on training a model file (e.g. the shipped weights whose
    run folder is gone) from its step count, and the exported card keeps the earlier sessions."""
    _train(tmp_path, 3, "first", extra=("--export", str(tmp_path / "first_model")))
    first, first_card = load_model(tmp_path / "first_model.pt")
    # no steps left: the exported weights are the starting weights, unchanged
    _train(tmp_path, 3, "again", extra=("--init-from", str(tmp_path / "first_model.pt"),
                                        "--export", str(tmp_path / "again_model")))
    again, again_card = load_model(tmp_path / "again_model.pt")
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert again_card["initialised_from"]["sha256"] == first_card["sha256"]
    # two more steps, at a new learning rate: the step count goes on, both sessions are on the card
    _train(tmp_path, 5, "more", extra=("--init-from", str(tmp_path / "first_model.pt"), "--lr", "2e-4",
                                       "--export", str(tmp_path / "more_model")))
    ckpt = torch.load(tmp_path / "more" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 5
    rows = (tmp_path / "more" / "loss.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["4", "5"]
    card = json.loads((tmp_path / "more_model.json").read_text())
    assert card["iterations"] == 5
    assert [s["from_step"] for s in card["sessions"]] == [0, 3]
    assert card["sessions"][1]["changed"]["lr"] == 2e-4
    assert card["initialised_from"]["iterations"] == 3
    assert card["initialised_from"]["training_log"] == first_card["training_log"]
    assert any(not torch.equal(v, load_model(tmp_path / "more_model.pt")[0].state_dict()[k])
               for k, v in first.state_dict().items())
    # rerunning the same command resumes the run folder's checkpoint, not the model file
    _train(tmp_path, 6, "more", extra=("--init-from", str(tmp_path / "first_model.pt")))
    assert torch.load(tmp_path / "more" / "checkpoint.pt", weights_only=True)["step"] == 6


def test_starting_from_weights_of_another_network_is_refused(tmp_path, capsys):
    from deepreglib.methods.amdf.network import LabelAutoEncoder
    save_model(LabelAutoEncoder(num_classes=3, channels=(4,), latent_channels=2), tmp_path / "ae")
    args = ["train", "voxelmorph", "--out", str(tmp_path / "run"), "--steps", "2", "--shape", "32", "32", "32",
            "--threads", "1", "--synth-bank", "2", "--init-from", str(tmp_path / "ae.pt")]
    assert cli_main(args) != 0
    err = capsys.readouterr().err
    assert "LabelAutoEncoder" in err and "VoxelMorph" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # a folder with another run's log (but no checkpoint) is not overwritten
    _train(tmp_path, 2, "vm", extra=("--export", str(tmp_path / "vm_model")))
    (tmp_path / "vm" / "checkpoint.pt").unlink()
    log = (tmp_path / "vm" / "loss.csv").read_text()
    args[3] = str(tmp_path / "vm")
    args[-1] = str(tmp_path / "vm_model.pt")
    assert cli_main(args) != 0
    assert "new --out" in capsys.readouterr().err
    assert (tmp_path / "vm" / "loss.csv").read_text() == log


@pytest.mark.parametrize("method", ["voxelmorph", "carnet"])
def test_channels_last_training_gives_the_weights_of_the_plain_layout(tmp_path, method, monkeypatch):
    """The recipes that train in channels-last layout on the CPU (faster convolutions) reach the
    weights the plain layout reaches, step for step; the exported model loads as any other."""
    import dataclasses
    from deepreglib.methods import registry
    recipes = registry.training_recipes()
    assert recipes[method].channels_last
    results = {}
    for flag in (True, False):
        patched = dict(recipes)
        seen = []

        def loss(model, batch, args, _loss=recipes[method].loss, _seen=seen):
            # (a 1-channel volume is the same in both layouts: the weights say which one runs)
            weight = next(p for p in model.parameters() if p.ndim == 5 and p.shape[1] > 1)
            _seen.append(weight.is_contiguous(memory_format=torch.channels_last_3d)
                         and not weight.is_contiguous())
            return _loss(model, batch, args)

        patched[method] = dataclasses.replace(recipes[method], channels_last=flag, loss=loss)
        monkeypatch.setattr(registry, "training_recipes", lambda p=patched: p)
        out = tmp_path / f"run-{flag}"
        torch.manual_seed(0)
        assert cli_main(["train", method, "--out", str(out), "--steps", "2", "--shape", "32", "32", "32",
                         "--threads", "1", "--checkpoint-every", "2", "--log-every", "100", "--lr", "1e-3",
                         "--synth-bank", "2", "--export", str(tmp_path / f"model-{flag}")]) == 0
        assert seen == [flag, flag]  # the network trained in the layout asked for
        results[flag] = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
        load_model(tmp_path / f"model-{flag}.pt")
    for k, v in results[False].items():
        assert torch.allclose(results[True][k], v, rtol=0, atol=1e-5), k


def test_bf16_convolutions_run_a_narrow_input_in_float32():
    """A stride-2 3x3x3 convolution of an input one voxel wide along the last axis gets garbage
    weight gradients under CPU bf16 autocast in about half the calls (torch 2.13); under
    ``convolutions_in_bf16`` it runs in float32 and gives float32's gradient every time, while a
    wide input still runs in bf16 (its output differs from float32's by bf16 rounding)."""
    import copy
    from deepreglib.train.loop import convolutions_in_bf16
    torch.manual_seed(0)
    for trial in range(12):
        ref = torch.nn.Conv3d(32, 32, 3, stride=2, padding=1)
        patched = convolutions_in_bf16(copy.deepcopy(ref))
        x = torch.randn(1, 32, 8, 8, 1)
        ref(x).sum().backward()
        patched(x).sum().backward()
        assert torch.equal(patched.weight.grad, ref.weight.grad), trial
    wide = torch.randn(1, 32, 8, 8, 8)
    with torch.no_grad():
        diff = (patched(wide) - ref(wide)).abs().max()
    assert 0 < float(diff) < 0.1


@pytest.mark.parametrize("method", ["voxelmorph", "dnet"])
def test_bf16_convolutions_give_float32_s_gradient(tmp_path, method):
    """``--bf16-conv`` (the convolutions under bf16 autocast, the rest in float32) gives the
    gradient float32 training gives on the same batch: cosine > 0.99 over all weights and > 0.95
    for every weight tensor whose gradient is not negligible, the same loss to 1 %; the weights,
    checkpoint and exported model stay float32, and the model loads and runs without the patch."""
    import argparse
    import copy
    from deepreglib.methods.registry import training_recipes
    from deepreglib.train.loop import convolutions_in_bf16, make_batch
    recipe = training_recipes()[method]
    args = build_parser().parse_args(["train", method, "--out", "unused", "--shape", "32", "32", "32",
                                      "--synth-bank", "2", "--real-fraction", "0"])
    args.current_step = 0
    torch.manual_seed(0)
    base = recipe.build(args).train()
    batch = make_batch(0, args, [], recipe)
    grads, losses = {}, {}
    for flag in (False, True):
        model = copy.deepcopy(base)
        if flag:
            convolutions_in_bf16(model)
        torch.manual_seed(0)
        total, _ = recipe.loss(model, batch, args)
        total.backward()
        losses[flag] = float(total.detach())
        grads[flag] = {n: p.grad.detach().flatten().clone() for n, p in model.named_parameters()
                       if p.grad is not None}  # (a copy: the next model may reuse the buffers)
    assert abs(losses[True] - losses[False]) <= 0.01 * abs(losses[False])

    def cosine(a, b):  # in float64, no floor on the norms (torch's eps would swamp tiny gradients)
        a, b = a.double(), b.double()
        return float(a @ b / (a.norm() * b.norm()))
    whole = [torch.cat(list(grads[f].values())) for f in (False, True)]
    assert cosine(*whole) > 0.99
    scale = max(float(g.norm()) for g in grads[False].values())
    for name, g32 in grads[False].items():
        if float(g32.norm()) > 1e-3 * scale:
            assert cosine(grads[True][name], g32) > 0.95, name
    out = tmp_path / "run"
    assert cli_main(["train", method, "--out", str(out), "--steps", "2", "--shape", "32", "32", "32",
                     "--threads", "1", "--checkpoint-every", "2", "--log-every", "100", "--synth-bank", "2",
                     "--bf16-conv", "--export", str(tmp_path / "model")]) == 0
    assert all(v.dtype == torch.float32 for v in torch.load(out / "checkpoint.pt", weights_only=True)["model"].values()
               if v.is_floating_point())
    model, _ = load_model(tmp_path / "model.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(getattr(m, "_bf16_conv", False) for m in model.modules())
