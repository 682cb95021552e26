"""AMDF: DFSA fusion with known weights, identity at start, ROI masking, the contour and soft
cross-entropy losses, the three training recipes, and output geometry through the Method and the
pipeline."""
import json
from argparse import Namespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepreglib.core.errors import BadInputError
from deepreglib.core.fields import resize_field
from deepreglib.core.geometry import Grid
from deepreglib.core.losses import one_hot
from deepreglib.methods.amdf.method import AmdfMethod
from deepreglib.methods.amdf.training import (amdf_loss, autoencoder_loss, build_amdf, segmenter_loss)
from deepreglib.methods.weights import load_model, save_model
from deepreglib.methods.amdf.network import (AMDF, LabelAutoEncoder, RoiSegmentationUNet, corrupt_labels,
                                      fuse_fields)
from deepreglib.methods.registry import METHODS, MethodInfo
from deepreglib.core.segmentation_losses import LaplacianContourLoss, SoftCrossEntropy, laplacian_edges
from deepreglib.train.synth import synth_pair
from deepreglib.core.warp import warp

TINY = dict(encoder=(4, 8, 8, 8), decoder=(8, 8, 8, 4), seg_channels=(4, 8), dfsa_hidden=4)


def tiny_amdf(seed=0, **kw):
    torch.manual_seed(seed)
    return AMDF(**{**TINY, **kw})


def set_dfsa(net, bias):
    with torch.no_grad():
        for m in net.dfsa:
            m.weight.weight.zero_()
            m.weight.bias.fill_(bias)


def randomise_branches(net):
    with torch.no_grad():
        for head in net.registration.heads:
            torch.nn.init.normal_(head.weight, std=0.05)
            torch.nn.init.normal_(head.bias, std=0.5)


def test_dfsa_with_zero_weights_returns_the_finest_field():
    net = tiny_amdf(1, use_masks=False).eval()
    randomise_branches(net)
    p = synth_pair((32, 32, 32), seed=1)
    set_dfsa(net, -1e4)  # sigmoid(-1e4) == 0 exactly
    with torch.no_grad():
        out = net(p.moving, p.fixed)
    assert [tuple(f.shape[2:]) for f in out.fields] == [(32,) * 3, (16,) * 3, (8,) * 3, (4,) * 3]
    assert len(out.weights) == 3 and all(float(w.abs().max()) == 0.0 for w in out.weights)
    assert float(out.fields[3].abs().max()) > 0.1  # the coarse branches are not zero
    assert torch.equal(out.displacement, out.fields[0])
    # weights of 1: plain coarse-to-fine sum, DF_0 + up(DF_1 + up(DF_2 + up(DF_3)))
    set_dfsa(net, 1e4)
    with torch.no_grad():
        out = net(p.moving, p.fixed)
    expected = out.fields[3]
    for k in (2, 1, 0):
        expected = out.fields[k] + resize_field(expected, out.fields[k].shape[2:])
    assert torch.allclose(out.displacement, expected, atol=1e-5)
    assert out.fused[0] is out.displacement
    # the functional form with zero weights, any fields
    fields = [torch.randn(1, 3, 8 // 2 ** k, 8 // 2 ** k, 8 // 2 ** k) for k in range(3)]
    fused, weights = fuse_fields(fields, [None, None], [lambda u, f: (0 * u, 0 * u)] * 2)
    assert torch.equal(fused[0], fields[0]) and len(weights) == 2


def test_untrained_amdf_is_the_identity():
    torch.manual_seed(0)
    net = AMDF().eval()
    p = synth_pair((32, 32, 32), seed=3)
    with torch.no_grad():
        out = net(p.moving, p.fixed)
    assert out.displacement.shape == (1, 3, 32, 32, 32)
    assert float(out.displacement.abs().max()) < 1e-2
    assert torch.allclose(out.warped, p.moving * out.mask_moving, atol=1e-2)
    for w in out.weights:
        assert 0.0 < float(w.min()) and float(w.max()) < 1.0
    n_seg = sum(p.numel() for p in RoiSegmentationUNet().parameters())
    assert 1.5e6 < n_seg < 2.5e6  # "about 2M parameters"
    with pytest.raises(ValueError, match="divisible by 16"):
        net(p.moving[..., :24], p.fixed[..., :24])


def test_inputs_are_multiplied_by_their_roi_masks():
    net = tiny_amdf(2).eval()
    randomise_branches(net)
    p = synth_pair((32, 32, 32), seed=4)
    with torch.no_grad():
        net.segmenter.head.bias.copy_(torch.tensor([0.0, 50.0]))  # everything is ROI
        full = net(p.moving, p.fixed)
        net.segmenter.head.bias.copy_(torch.tensor([50.0, 0.0]))  # nothing is ROI
        empty = net(p.moving, p.fixed)
        net.use_masks = False
        unmasked = net(p.moving, p.fixed)
    assert torch.equal(full.mask_fixed, torch.ones_like(p.fixed)) and float(empty.mask_moving.max()) == 0.0
    assert float(empty.warped.abs().max()) == 0.0
    assert torch.allclose(full.warped, warp(p.moving, full.displacement))
    assert torch.allclose(full.displacement, unmasked.displacement)
    assert not torch.allclose(empty.displacement, full.displacement)


def test_laplacian_contour_and_soft_cross_entropy_known_values():
    x = torch.zeros(1, 1, 5, 5, 5)
    assert float(laplacian_edges(x + 0.3).abs().max()) < 1e-6  # constant: no edges, borders too
    x[0, 0, 2, 2, 2] = 1.0
    edges = laplacian_edges(x)
    assert float(edges[0, 0, 2, 2, 2]) == -6.0 and float(edges[0, 0, 1, 2, 2]) == 1.0
    assert float(edges.sum()) == 0.0
    loss = LaplacianContourLoss()
    assert float(loss(x, x)) == 0.0
    assert float(loss(x, torch.zeros_like(x))) == pytest.approx(42.0 / 125)  # 6^2 + 6 * 1^2
    labels = torch.randint(0, 4, (1, 1, 4, 4, 4))
    oh = one_hot(labels, 4)
    assert float(SoftCrossEntropy()(oh, oh)) == pytest.approx(0.0, abs=1e-6)
    assert float(SoftCrossEntropy()(torch.full_like(oh, 0.25), oh)) == pytest.approx(np.log(4.0))
    with pytest.raises(ValueError, match="same shape"):
        loss(x, x[:, :, :4])
    same = corrupt_labels(labels, 4, 0.0)
    assert torch.equal(same, labels)
    flipped = corrupt_labels(torch.zeros(1, 1, 16, 16, 16, dtype=torch.long), 4, 1.0)
    assert 0.65 < float((flipped != 0).float().mean()) < 0.85  # 3/4 change class


def _fit(model, loss_fn, batch, args, steps, lr):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        total, terms = loss_fn(model, batch, args)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append((float(total.detach()), terms))
    return losses


@pytest.fixture(scope="module")
def pair():
    p = synth_pair((32, 32, 32), seed=8, max_std=2.0)
    return {"fixed": p.fixed, "moving": p.moving, "fixed_labels": p.fixed_labels.to(torch.uint8),
            "moving_labels": p.moving_labels.to(torch.uint8)}


def test_segmenter_and_autoencoder_recipes_lower_their_losses(pair):
    torch.manual_seed(0)
    seg = RoiSegmentationUNet((4, 8))
    hist = _fit(seg, segmenter_loss, pair, Namespace(), 8, 1e-2)
    assert hist[-1][0] < 0.8 * hist[0][0]
    ae = LabelAutoEncoder(16, (8, 8), 8)
    hist = _fit(ae, autoencoder_loss, pair, Namespace(), 8, 1e-2)
    assert hist[-1][0] < 0.8 * hist[0][0]
    with pytest.raises(BadInputError, match="--real-dir"):
        segmenter_loss(seg, {"fixed": pair["fixed"], "moving": pair["moving"]}, Namespace())


def test_amdf_recipe_uses_the_trained_nets_and_lowers_the_loss(pair, tmp_path):
    torch.manual_seed(1)
    seg = RoiSegmentationUNet((4, 8))
    with torch.no_grad():
        seg.head.bias.copy_(torch.tensor([0.0, 50.0]))  # ROI everywhere: the whole pair is registered
    seg_path = save_model(seg, tmp_path / "seg")
    ae_path = save_model(LabelAutoEncoder(16, (8, 8), 8), tmp_path / "ae")
    with pytest.raises(BadInputError, match="--seg-model"):
        build_amdf(Namespace(seg_model=None, ae_model=str(ae_path)))
    with pytest.raises(BadInputError, match="not a RoiSegmentationUNet"):
        build_amdf(Namespace(seg_model=str(ae_path), ae_model=str(ae_path)))
    args = Namespace(seg_model=str(seg_path), ae_model=str(ae_path), reg_weight=1.0)
    torch.manual_seed(2)
    model = build_amdf(args)
    assert model.config["seg_channels"] == [4, 8]
    for k, v in seg.state_dict().items():
        assert torch.equal(model.segmenter.state_dict()[k], v), k
    seg_before = {k: v.clone() for k, v in model.segmenter.state_dict().items()}
    # the default registration net, on a 32^3 pair
    hist = _fit(model, amdf_loss, pair, args, 6, 3e-3)
    assert set(hist[0][1]) == {"ncc_loss", "ssim_loss", "tv", "ce", "ae"}
    assert hist[-1][0] < hist[0][0] - 0.01
    assert hist[-1][1]["ce"] < hist[0][1]["ce"]  # the warped labels match better
    for k, v in model.segmenter.state_dict().items():
        assert torch.equal(v, seg_before[k]), k  # frozen
    # unlabelled (real) pairs: image terms only
    total, terms = amdf_loss(model, {"fixed": pair["fixed"], "moving": pair["moving"]}, args)
    assert set(terms) == {"ncc_loss", "ssim_loss", "tv"}


def test_going_on_from_a_trained_amdf_keeps_its_segmenter(pair, tmp_path):
    """``deepreg train amdf --init-from MODEL`` needs no --seg-model: the model carries its own."""
    from deepreglib.cli import main as cli_main
    from deepreglib.methods.weights import load_model
    torch.manual_seed(3)
    seg = RoiSegmentationUNet((4, 8))
    trained = AMDF(seg_channels=[4, 8], seg_classes=2)
    trained.segmenter.load_state_dict(seg.state_dict())
    model_path = save_model(trained, tmp_path / "amdf", {"method": "amdf", "iterations": 7})
    ae_path = save_model(LabelAutoEncoder(), tmp_path / "ae")
    assert build_amdf(Namespace(seg_model=None, init_from=str(model_path), ae_model=str(ae_path))).config \
        == trained.config
    args = ["train", "amdf", "--out", str(tmp_path / "run"), "--steps", "8", "--shape", "32", "32", "32",
            "--threads", "1", "--synth-bank", "2", "--init-from", str(model_path), "--ae-model", str(ae_path),
            "--export", str(tmp_path / "more")]
    assert cli_main(args) == 0
    more, card = load_model(tmp_path / "more.pt")
    assert card["iterations"] == 8 and card["initialised_from"]["iterations"] == 7
    for k, v in seg.state_dict().items():
        assert torch.equal(more.segmenter.state_dict()[k], v), k


def _info():
    return MethodInfo(name="amdf_test", title="AMDF (test)", description="test", kind="deformable",
                      weights=None, implementation="deepreglib.methods.amdf.method:AmdfMethod")


VOLUMES = {"roi_mask_fixed", "roi_mask_moving", "fusion_weight_s1", "fusion_weight_s2", "fusion_weight_s4",
           "field_s1_mm", "field_s2_mm", "field_s4_mm", "field_s8_mm"}


def test_method_outputs_have_the_network_grid_and_units(tmp_path):
    net = tiny_amdf(3)
    randomise_branches(net)
    path = save_model(net, tmp_path / "amdf")
    grid = Grid.identity((32, 32, 32), spacing=(1.5, 1.5, 1.5))
    p = synth_pair((32, 32, 32), seed=6)
    result = AmdfMethod(_info(), "cpu", weights=str(path)).run(p.fixed, p.moving, grid, _ctx())
    assert result.displacement.shape == (1, 3, 32, 32, 32) and result.velocity is None
    assert set(result.volumes) == VOLUMES
    for name, v in result.volumes.items():
        assert v.shape == (1, 1, 32, 32, 32), name
    for name in ("roi_mask_fixed", "roi_mask_moving"):
        assert set(torch.unique(result.volumes[name]).tolist()) <= {0.0, 1.0}
    w = result.volumes["fusion_weight_s2"]
    assert 0.0 < float(w.min()) and float(w.max()) < 1.0
    loaded, _ = load_model(path)
    with torch.no_grad():
        coarse = loaded(p.moving, p.fixed).fields[3]
    # the coarsest branch's own field (before fusion), upsampled, in mm on the 1.5 mm grid
    expected = (resize_field(coarse, (32, 32, 32)) * 1.5).norm(dim=1, keepdim=True)
    assert torch.allclose(result.volumes["field_s8_mm"], expected, atol=1e-5)
    assert result.info["scales"] == [1, 2, 4, 8]
    with pytest.raises(BadInputError, match="not AMDF"):
        AmdfMethod(_info(), "cpu", weights=str(save_model(RoiSegmentationUNet((4, 8)), tmp_path / "seg")))


def _ctx():
    from deepreglib.methods.base import RunContext
    return RunContext()


def _blob_image(size_xyz, spacing, origin, direction, centre_shift=0.0):
    img = sitk.Image([int(s) for s in size_xyz], sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    grid = Grid.from_sitk(img)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), -1)
    pts = grid.index_to_physical(idx)
    c = grid.index_to_physical((np.asarray(grid.shape) - 1) / 2.0) + centre_shift
    out = sitk.GetImageFromArray(np.exp(-((pts - c) ** 2).sum(-1) / 60.0).astype(np.float32))
    out.CopyInformation(img)
    return out


def test_pipeline_writes_the_maps_on_the_fixed_grid(tmp_path, monkeypatch):
    from deepreglib.run.pipeline import RegisterOptions, register
    direction = sitk.VersorTransform((0.3, -0.2, 0.1), 0.4).GetMatrix()
    fixed = _blob_image((18, 20, 14), (1.4, 1.4, 2.0), (-3.0, 4.0, 1.0), direction)
    moving = _blob_image((18, 20, 14), (1.4, 1.4, 2.0), (-3.0, 4.0, 1.0), direction, 1.5)
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    path = save_model(tiny_amdf(4), tmp_path / "amdf")
    monkeypatch.setitem(METHODS, "amdf_test", _info())
    out = tmp_path / "out"
    register(RegisterOptions(fixed=str(tmp_path / "f.nii.gz"), moving=str(tmp_path / "m.nii.gz"), out=str(out),
                             method="amdf_test", weights=str(path), device="cpu", qa=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method_outputs"]["scales"] == [1, 2, 4, 8]
    for name in VOLUMES:
        img = sitk.ReadImage(str(out / f"{name}.mha"))
        assert img.GetSize() == fixed.GetSize()
        assert np.allclose(img.GetSpacing(), fixed.GetSpacing()) and np.allclose(img.GetOrigin(), fixed.GetOrigin())
        assert np.allclose(img.GetDirection(), fixed.GetDirection(), atol=1e-6)
