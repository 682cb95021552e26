"""CAR-Net: the co-attention block against a naive N x N reference, the SDPA path, identity at
start, the explanation maps (co-attention, query row, uncertainty), output geometry through the
Method and the pipeline, and a short training run that lowers the loss."""
import json
from argparse import Namespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from deepreglib.core.errors import BadInputError
from deepreglib.core.geometry import Grid
from deepreglib.methods.base import RunContext
from deepreglib.methods.carnet.method import CarNetMethod
from deepreglib.methods.carnet.training import carnet_loss
from deepreglib.methods.weights import load_model, save_model
from deepreglib.methods.carnet.network import CarNet, CoAttention3D
from deepreglib.methods.registry import METHODS, MethodInfo
from deepreglib.train.synth import synth_pair

TINY = dict(features=(4, 8), key_channels=4, value_channels=6, unet_encoder=(8, 8, 8),
            unet_decoder=(8, 8, 8, 8))


def tiny_carnet(seed=0, **kw):
    torch.manual_seed(seed)
    return CarNet(**{**TINY, **kw})


def naive_coattention(block, f_mov, f_fix):
    """The block's equations with S formed explicitly (N x L x L) and softmax written out."""
    n, _, d, h, w = f_mov.shape

    def tok(x):  # (N, C, d, h, w) -> (N, L, C), voxel order k, j, i
        return x.permute(0, 2, 3, 4, 1).reshape(n, d * h * w, -1)

    def vol(t):
        return t.reshape(n, d, h, w, -1).permute(0, 4, 1, 2, 3)

    q, k = tok(block.f(f_mov)), tok(block.g(f_fix))
    v1, v2 = block.h1(f_mov), block.h2(f_fix)
    s = q @ k.transpose(1, 2)  # S[n, moving l, fixed m]
    p_mov = torch.exp(s - s.amax(2, keepdim=True))
    p_mov = p_mov / p_mov.sum(2, keepdim=True)
    st = s.transpose(1, 2)
    p_fix = torch.exp(st - st.amax(2, keepdim=True))
    p_fix = p_fix / p_fix.sum(2, keepdim=True)
    att_mov, att_fix = vol(p_mov @ tok(v2)), vol(p_fix @ tok(v1))
    g_mov = torch.sigmoid(block.gate_mov(att_mov))
    g_fix = torch.sigmoid(block.gate_fix(att_fix))
    return v1 + block.a1 * g_mov * v1, v2 + block.a2 * g_fix * v2, g_mov, g_fix, p_fix


def random_block(dtype=torch.float32):
    torch.manual_seed(1)
    block = CoAttention3D(8, 4, 6).to(dtype)
    with torch.no_grad():
        block.a1.fill_(0.7)
        block.a2.fill_(-0.3)
    f_mov = torch.randn(2, 8, 3, 4, 5, dtype=dtype)
    f_fix = torch.randn(2, 8, 3, 4, 5, dtype=dtype)
    return block, f_mov, f_fix


def test_coattention_block_equals_the_naive_reference():
    block, f_mov, f_fix = random_block()
    with torch.no_grad():
        out = block(f_mov, f_fix)
        o_mov, o_fix, g_mov, g_fix, _ = naive_coattention(block, f_mov, f_fix)
    for a, b in ((out.o_mov, o_mov), (out.o_fix, o_fix), (out.gate_mov, g_mov), (out.gate_fix, g_fix)):
        assert a.shape == (2, 6, 3, 4, 5)
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    # with a1 = a2 = 0 (the initial state) the block passes h1(F_mov), h2(F_fix) through
    fresh = CoAttention3D(8, 4, 6)
    with torch.no_grad():
        out0 = fresh(f_mov, f_fix)
        assert torch.equal(out0.o_mov, fresh.h1(f_mov)) and torch.equal(out0.o_fix, fresh.h2(f_fix))
    with pytest.raises(ValueError, match="F_mov and F_fix"):
        block(f_mov, f_fix[:, :, :2])


def test_sdpa_path_matches_the_naive_one_in_float64(monkeypatch):
    block, f_mov, f_fix = random_block(torch.float64)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("scale"))
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        out = block(f_mov, f_fix)
        o_mov, o_fix, _, _, _ = naive_coattention(block, f_mov, f_fix)
    assert calls == [1.0, 1.0]  # both attentions go through torch's SDPA, unscaled
    assert out.o_mov.dtype == torch.float64
    assert torch.allclose(out.o_mov, o_mov, atol=1e-12, rtol=0)
    assert torch.allclose(out.o_fix, o_fix, atol=1e-12, rtol=0)


@pytest.mark.filterwarnings("ignore:Flash attention")
def test_the_block_runs_on_the_memory_efficient_kernel():
    """With the math fallback (which forms L x L) disabled, the block still runs: its inputs
    qualify for torch's blockwise CPU kernel, so memory stays linear in the voxel count."""
    attention = pytest.importorskip("torch.nn.attention")
    for dtype in (torch.float32, torch.float64):
        block, f_mov, f_fix = random_block(dtype)
        with torch.no_grad():
            with attention.sdpa_kernel([attention.SDPBackend.FLASH_ATTENTION]):
                out = block(f_mov, f_fix)
            reference = block(f_mov, f_fix)
        assert torch.allclose(out.o_fix, reference.o_fix)
    with pytest.raises(RuntimeError):  # the check can fail: a value width unlike the keys' does
        q = torch.randn(1, 1, 10, 4)
        with attention.sdpa_kernel([attention.SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, q, torch.randn(1, 1, 10, 6), scale=1.0)


def test_untrained_carnet_is_the_identity():
    torch.manual_seed(0)
    net = CarNet().eval()
    p = synth_pair((32, 32, 32), seed=3)
    with torch.no_grad():
        out = net(p.moving, p.fixed)
    assert out.displacement.shape == (1, 3, 32, 32, 32)
    assert out.velocity.shape == out.velocity_mean.shape == out.log_var.shape == (1, 3, 16, 16, 16)
    assert out.attention_fixed.shape == out.attention_moving.shape == (1, 1, 8, 8, 8)
    assert torch.equal(out.velocity, out.velocity_mean)  # inference uses the mean
    assert float(out.displacement.abs().max()) < 1e-2
    assert torch.allclose(out.warped, p.moving, atol=1e-2)
    assert float(net.coattention.a1.detach()) == 0.0 == float(net.coattention.a2.detach())
    with pytest.raises(ValueError, match="divisible by 16"):
        net(p.moving[..., :24], p.fixed[..., :24])


def test_query_attention_is_one_softmax_row_summing_to_one():
    net = tiny_carnet(2).eval()
    torch.manual_seed(9)
    moving, fixed = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():  # larger f, g weights: a peaked, clearly non-uniform row
        torch.nn.init.normal_(net.coattention.f.weight, std=5.0)
        torch.nn.init.normal_(net.coattention.g.weight, std=5.0)
    point = (13.0, 6.2, 21.9)  # image voxel (k, j, i) -> feature voxel (3, 2, 5)
    with torch.no_grad():
        row = net.query_attention(moving, fixed, point, image_grid=False)
        f_mov, f_fix = net.features(moving, fixed)
        *_, p_fix = naive_coattention(net.coattention, f_mov, f_fix)
        dense = net.query_attention(moving, fixed, point)
    assert net.feature_index(point, (32, 32, 32)) == (3, 2, 5)
    assert row.shape == (1, 1, 8, 8, 8) and float(row.min()) >= 0
    assert float(row.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(row.max()) > 2.0 / 512  # not the uniform row (1 / 512 everywhere)
    expected = p_fix[0, (3 * 8 + 2) * 8 + 5].view(1, 1, 8, 8, 8)
    assert torch.allclose(row, expected, atol=1e-6)
    # on the image grid it is a density per image voxel: still sums to about 1
    assert dense.shape == (1, 1, 32, 32, 32) and float(dense.min()) >= 0
    assert float(dense.sum()) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="outside"):
        net.query_attention(moving, fixed, (40.0, 0.0, 0.0))


def test_uncertainty_vanishes_with_the_posterior_variance():
    net = tiny_carnet(3).eval()
    p = synth_pair((32, 32, 32), seed=5)
    with torch.no_grad():
        net.mean_head.bias.copy_(torch.tensor([0.8, -0.5, 0.3]))  # a non-zero mean field
        net.log_var_head.bias.fill_(-60.0)  # std e^-30 half-resolution voxels
        tiny = net.uncertainty(p.moving, p.fixed, samples=4, generator=torch.Generator().manual_seed(0))
        net.log_var_head.bias.fill_(0.0)  # std 1 half-resolution voxel
        wide = net.uncertainty(p.moving, p.fixed, samples=4, generator=torch.Generator().manual_seed(0))
        again = net.uncertainty(p.moving, p.fixed, samples=4, generator=torch.Generator().manual_seed(0))
        moved = net(p.moving, p.fixed).displacement
    assert tiny.shape == (1, 1, 32, 32, 32)
    assert float(moved.abs().amax()) > 0.5  # the mean field is far from zero
    assert float(tiny.max()) < 1e-6
    assert float(wide.mean()) > 0.3
    assert torch.equal(wide, again)  # reproducible from the generator
    with pytest.raises(ValueError, match="samples"):
        net.uncertainty(p.moving, p.fixed, samples=1)


def _info(name="carnet_test"):
    return MethodInfo(name=name, title="CAR-Net (test)", description="test", kind="deformable",
                      weights=None, implementation="deepreglib.methods.carnet.method:CarNetMethod",
                      outputs=("attention_fixed", "attention_moving", "uncertainty_mm"))


def test_method_outputs_have_the_network_grid_and_units(tmp_path):
    net = tiny_carnet(4)
    path = save_model(net, tmp_path / "carnet")
    grid = Grid.identity((32, 32, 32), spacing=(2.0, 2.0, 2.0))
    p = synth_pair((32, 32, 32), seed=6)
    query = grid.index_to_physical([16.0, 8.0, 20.0])
    method = CarNetMethod(_info(), "cpu", weights=str(path), uncertainty_samples=3, seed=7)
    fractions = []
    result = method.run(p.fixed, p.moving, grid,
                        RunContext(progress=lambda f, m="": fractions.append(f),
                                   options={"query_point": query.tolist()}))
    assert result.displacement.shape == (1, 3, 32, 32, 32) and result.velocity.shape == (1, 3, 16, 16, 16)
    assert set(result.volumes) == {"attention_fixed", "attention_moving", "uncertainty_mm", "query_attention"}
    for v in result.volumes.values():
        assert v.shape == (1, 1, 32, 32, 32)
    att = result.volumes["attention_fixed"]
    assert 0.0 < float(att.min()) and float(att.max()) < 1.0
    # mm on a 2 mm grid = twice the spread in voxels, for the same draws
    loaded, _ = load_model(path)
    with torch.no_grad():
        mean, log_var, _ = loaded.posterior(p.moving, p.fixed)
        vox = loaded.displacement_spread(mean, log_var, (32, 32, 32), 3, torch.Generator().manual_seed(7))
    assert torch.allclose(result.volumes["uncertainty_mm"], 2.0 * vox, atol=1e-6)
    assert result.info["query_feature_index"] == [4, 2, 5]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    with pytest.raises(BadInputError, match="outside"):
        method.run(p.fixed, p.moving, grid, RunContext(options={"query_point": [500.0, 0.0, 0.0]}))


def _blob_image(size_xyz, spacing, origin, direction, centre_shift=0.0):
    img = sitk.Image([int(s) for s in size_xyz], sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    grid = Grid.from_sitk(img)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), -1)
    pts = grid.index_to_physical(idx)
    c = grid.index_to_physical((np.asarray(grid.shape) - 1) / 2.0) + centre_shift
    arr = np.exp(-((pts - c) ** 2).sum(-1) / 60.0)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(img)
    return out


def test_pipeline_writes_the_maps_on_the_fixed_grid(tmp_path, monkeypatch):
    from deepreglib.run.pipeline import RegisterOptions, register
    direction = sitk.VersorTransform((0.1, 0.2, 0.3), 0.3).GetMatrix()
    fixed = _blob_image((20, 18, 14), (1.5, 1.5, 2.0), (3.0, -4.0, 7.0), direction)
    moving = _blob_image((20, 18, 14), (1.5, 1.5, 2.0), (3.0, -4.0, 7.0), direction, 1.5)
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    path = save_model(tiny_carnet(5), tmp_path / "carnet")
    monkeypatch.setitem(METHODS, "carnet_test", _info())
    out = tmp_path / "out"
    register(RegisterOptions(fixed=str(tmp_path / "f.nii.gz"), moving=str(tmp_path / "m.nii.gz"), out=str(out),
                             method="carnet_test", weights=str(path), device="cpu", qa=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method_outputs"]["uncertainty_samples"] == 8
    for name in ("attention_fixed", "attention_moving", "uncertainty_mm"):
        img = sitk.ReadImage(str(out / f"{name}.mha"))
        assert img.GetSize() == fixed.GetSize()
        assert np.allclose(img.GetSpacing(), fixed.GetSpacing()) and np.allclose(img.GetOrigin(), fixed.GetOrigin())
        assert np.allclose(img.GetDirection(), fixed.GetDirection(), atol=1e-6)


def test_a_short_training_run_lowers_the_loss_on_a_fixed_pair():
    net = tiny_carnet(6, init_log_var=-4.8)
    p = synth_pair((32, 32, 32), seed=8, max_std=2.0)
    batch = {"fixed": p.fixed, "moving": p.moving}
    args = Namespace(reg_weight=1.0, label_weight=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def evaluate():  # the posterior mean: no sampling noise in the comparison
        net.eval()
        with torch.no_grad():
            total, terms = carnet_loss(net, batch, args)
        net.train()
        return float(total), terms["ncc_loss"]
    before = evaluate()
    torch.manual_seed(0)
    for _ in range(12):
        total, _ = carnet_loss(net, batch, args)  # training mode: a sampled velocity
        opt.zero_grad()
        total.backward()
        opt.step()
    after = evaluate()
    assert after[0] < before[0] - 0.2
    assert after[1] < before[1] - 0.01  # the images match better
    assert float(net.coattention.a1.detach().abs()) > 0  # the attention strength is learned


def test_training_recipe_runs_and_exports_a_loadable_model(tmp_path):
    from deepreglib.cli import main as cli_main
    from deepreglib.methods.carnet.training import PRIOR_LAMBDA, build_carnet
    net = build_carnet(Namespace())
    assert float(net.log_var_head.bias[0].detach()) == pytest.approx(-np.log(6 * PRIOR_LAMBDA))
    args = ["train", "carnet", "--out", str(tmp_path / "run"), "--steps", "1", "--shape", "32", "32", "32",
            "--threads", "1", "--synth-bank", "1", "--log-every", "100", "--export", str(tmp_path / "carnet")]
    assert cli_main(args) == 0
    model, card = load_model(tmp_path / "carnet.pt")
    assert isinstance(model, CarNet) and card["method"] == "carnet" and card["iterations"] == 1
    header = (tmp_path / "run" / "loss.csv").read_text().splitlines()[0]
    assert "ncc_loss" in header and "kl" in header
