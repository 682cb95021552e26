"""R2N2 in 3D: the Gaussian transformation model, the recursion, the adaptive stop, training,
and the explanation outputs (Slicer point list and volume sequence)."""
import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepreglib.cli import main as cli_main
from deepreglib.core.geometry import Grid
from deepreglib.io.images import read_landmarks
from deepreglib.methods.r2n2.method import R2N2Method, R2N2Result
from deepreglib.methods.r2n2.outputs import (describe_deformations, write_deformations_markups,
                                             write_volume_sequence)
from deepreglib.methods.r2n2.training import r2n2_loss
from deepreglib.methods.base import RunContext
from deepreglib.methods.weights import load_model, save_model
from deepreglib.methods.r2n2.network import R2N2, AdaptiveStop
from deepreglib.methods.r2n2.gaussians import (GaussianParameters, bspline_parameter_count, covariance,
                                                local_deformation, rotation_from_6d,
                                                transformation_parameter_count)
from deepreglib.methods.registry import training_recipes
from deepreglib.core.warp import warp
from helpers import rotation

#: float32 evaluation of exp(-q/2) against a float64 closed form, in voxels
FIELD_TOL = 1e-5


def blob(shape, centre, sigma=2.5):
    g = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    c = torch.tensor(centre, dtype=torch.float32).view(3, 1, 1, 1)
    return torch.exp(-((g - c) ** 2).sum(0) / (2 * sigma ** 2))[None, None]


def tiny_model(steps=3, **kw):
    return R2N2(channels=(4, 4, 4), res_blocks=1, pooled=4, steps=steps, **kw)


def random_parameters(n, t, seed=0, weight_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return GaussianParameters(
        centres=torch.rand(n, t, 3, generator=g) * 1.2 - 0.6,
        rotations=rotation_from_6d(torch.randn(n, t, 6, generator=g)),
        widths=torch.rand(n, t, 3, generator=g) * 0.25 + 0.02,
        weights=(torch.rand(n, t, 3, generator=g) * 2 - 1) * weight_scale)


# -- transformation model ------------------------------------------------------------------------
def test_one_local_deformation_equals_its_closed_form_at_sample_points():
    shape = (9, 11, 13)
    p = random_parameters(1, 1, seed=3)
    u = local_deformation(p.centres[:, 0], p.rotations[:, 0], p.widths[:, 0], p.weights[:, 0], shape)
    assert u.shape == (1, 3) + shape
    c = p.centres[0, 0].double().numpy()
    sigma = (p.rotations[0, 0].double() @ torch.diag(p.widths[0, 0].double())
             @ p.rotations[0, 0].double().T).numpy()
    inv = np.linalg.inv(sigma)
    v = p.weights[0, 0].double().numpy()
    half = (np.asarray(shape) - 1) / 2.0
    rng = np.random.default_rng(0)
    for idx in [(0, 0, 0), (8, 10, 12), (4, 5, 6)] + [tuple(rng.integers(0, shape)) for _ in range(20)]:
        x = np.asarray(idx) / half - 1.0  # normalised (k, j, i)
        d = x - c
        expected = v * np.exp(-0.5 * d @ inv @ d) * half  # normalised -> voxels per axis
        got = u[0, :, idx[0], idx[1], idx[2]].double().numpy()
        np.testing.assert_allclose(got, expected, atol=FIELD_TOL)
    # centred on voxel (4, 5, 6) (normalised 0, 0, 0): there the displacement is the whole weight
    # in voxels, and nowhere is it larger
    u = local_deformation(torch.zeros(1, 3), p.rotations[:, 0], p.widths[:, 0], p.weights[:, 0], shape)
    np.testing.assert_allclose(u[0, :, 4, 5, 6].numpy(), p.weights[0, 0].numpy() * half, rtol=1e-6)
    assert float(u[0].norm(dim=0).max()) == pytest.approx(float(u[0, :, 4, 5, 6].norm()), rel=1e-6)


def test_rotated_covariance_is_symmetric_positive_definite():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 6, generator=g, dtype=torch.float64)
    r = rotation_from_6d(a)
    eye = torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    assert torch.allclose(r.transpose(-1, -2) @ r, eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(50, dtype=torch.float64), atol=1e-12)
    widths = torch.rand(50, 3, generator=g, dtype=torch.float64) * 0.3 + 1e-3
    s = covariance(r, widths)
    assert torch.allclose(s, s.transpose(-1, -2), atol=1e-14)
    eig = torch.linalg.eigvalsh(s)
    assert bool((eig > 0).all())
    assert torch.allclose(eig, widths.sort(dim=-1).values, atol=1e-12)  # rotation keeps the widths
    torch.linalg.cholesky(s)  # raises unless positive definite
    # the first 6D vector gives the first axis direction
    assert torch.allclose(r[..., 0], a[:, :3] / a[:, :3].norm(dim=-1, keepdim=True), atol=1e-12)


def test_zero_weights_give_a_zero_field():
    p = random_parameters(2, 4, seed=2)
    p.weights.zero_()
    assert float(p.field((8, 9, 10)).abs().max()) == 0.0
    net = tiny_model(steps=3).eval()
    with torch.no_grad():
        net.parameter_net.fc.weight[9:].zero_()
        net.parameter_net.fc.bias[9:].zero_()
        m = blob((12, 12, 12), (5.0, 6.0, 7.0))
        out = net(m, blob((12, 12, 12), (6.0, 6.0, 6.0)))
    assert float(out.displacement.abs().max()) == 0.0
    assert torch.equal(out.warped, warp(m, torch.zeros(1, 3, 12, 12, 12)))


def test_the_recursion_sees_the_moving_image_warped_by_the_previous_field():
    torch.manual_seed(0)
    net = tiny_model(steps=4).eval()
    with torch.no_grad():  # make the untrained network deform visibly
        net.parameter_net.fc.weight[9:].normal_(0.0, 2.0)
        net.parameter_net.fc.bias[9:] = torch.tensor([0.3, -0.2, 0.4])
    shape = (14, 12, 16)
    moving = blob(shape, (6.0, 5.0, 9.0), 3.0)
    fixed = blob(shape, (7.0, 6.0, 7.0), 3.0)
    seen = []
    net.units[0].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0][:, 1:2].clone()))
    with torch.no_grad():
        out = net(moving, fixed, return_fields=True, return_warped=True)
    p = out.parameters
    assert out.steps == p.steps == 4 and len(seen) == 4
    assert torch.equal(seen[0], moving)  # step 1 sees M o f_0 = M
    for t in range(1, 5):
        summed = p.field(shape, t)  # sum of the closed-form deformations l_1..l_t
        assert torch.allclose(out.fields[:, t - 1], summed, atol=1e-5)
        assert torch.allclose(out.warped_steps[:, t - 1], warp(moving, summed), atol=1e-5)
        if t < 4:
            assert torch.allclose(seen[t], warp(moving, summed), atol=1e-5)
    assert torch.allclose(out.displacement, p.field(shape), atol=1e-5)
    assert float(out.displacement.abs().max()) > 0.5  # the check above is about a real field
    assert not torch.allclose(out.fields[:, 0], out.fields[:, -1], atol=0.1)


def test_outputs_have_the_image_geometry():
    net = tiny_model(steps=2).eval()
    shape = (13, 10, 17)
    moving = torch.rand(2, 1, *shape)
    with torch.no_grad():
        out = net(moving, torch.rand(2, 1, *shape), return_fields=True, return_warped=True,
                  stop=AdaptiveStop(threshold=-1.0))
    assert out.displacement.shape == (2, 3) + shape and out.warped.shape == (2, 1) + shape
    assert out.fields.shape == (2, 2, 3) + shape and out.warped_steps.shape == (2, 2, 1) + shape
    assert out.parameters.centres.shape == (2, 2, 3) and out.parameters.rotations.shape == (2, 2, 3, 3)
    assert out.position_certainty.shape == (2, 2, 3) and out.dissimilarity.shape == (2, 3)
    assert bool(((out.position_certainty >= 0) & (out.position_certainty <= 2)).all())
    assert bool((out.parameters.centres.abs() <= 1).all())
    assert bool((out.parameters.widths <= net.s_max + 1e-6).all())
    with pytest.raises(ValueError, match="N, 1, D, H, W"):
        net(moving, torch.rand(2, 1, 13, 10, 16))


# -- adaptive stop --------------------------------------------------------------------------------
def test_the_adaptive_stop_stops_early_on_an_identical_pair():
    torch.manual_seed(0)
    net = tiny_model(steps=10).eval()
    img = blob((16, 16, 16), (7.0, 8.0, 7.5))
    with torch.no_grad():
        out = net(img, img, stop=AdaptiveStop(threshold=0.005, window=2, min_steps=2))
        full = net(img, img)
    assert out.stopped_early and out.steps == 2 and out.parameters.steps == 2
    assert out.dissimilarity.shape == (1, 3)
    assert full.steps == 10 and not full.stopped_early


def test_the_adaptive_stop_waits_while_steps_still_pay():
    """A scripted step that translates by half a voxel each time, on a pair 3 voxels apart: the
    match improves for 6 steps and then overshoots; the stop must fire there, not earlier."""
    net = tiny_model(steps=20).eval()
    shape = (16, 16, 16)
    fixed = blob(shape, (7.5, 7.5, 7.5))
    moving = blob(shape, (7.5, 7.5, 10.5))

    def half_voxel_step(fixed_, warped_, state, place=None):
        n = fixed_.shape[0]
        return (torch.zeros(n, 3), torch.eye(3).expand(n, 3, 3), torch.full((n, 3), 1e4),
                torch.tensor([[0.0, 0.0, 0.5 / 7.5]]).expand(n, 3), torch.full((n, 3), 2.0), state, [], None)

    net.step = half_voxel_step
    with torch.no_grad():
        out = net(moving, fixed, stop=AdaptiveStop(threshold=0.01, window=2, min_steps=2))
    assert out.stopped_early and 6 <= out.steps <= 8, out.dissimilarity
    s = out.dissimilarity[0]
    assert float(s[6]) < 0.05 * float(s[0])  # six half-voxel steps did align the pair


# -- training -------------------------------------------------------------------------------------
def test_a_short_training_run_lowers_the_loss():
    """A few Adam (AMSGrad) steps of the recipe's loss on one pair, with weight noise on: the
    noise-free loss after training is lower than before."""
    torch.manual_seed(0)
    net = tiny_model(steps=3, weight_noise=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, **training_recipes()["r2n2"].optimizer_options)
    shape = (16, 16, 16)
    batch = {"fixed": blob(shape, (7.5, 7.5, 7.5)), "moving": blob(shape, (7.5, 7.5, 10.5))}
    args = argparse.Namespace(r2n2_tv_weight=0.1)

    def eval_loss():
        net.eval()
        with torch.no_grad():
            value = float(r2n2_loss(net, batch, args)[0])
        net.train()
        return value

    before = eval_loss()
    for _ in range(30):
        loss, terms = r2n2_loss(net, batch, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(terms) == {"similarity", "final_similarity", "tv"}
    after = eval_loss()
    assert after < 0.95 * before, (before, after)


def test_train_command_uses_amsgrad_and_the_recipe_options(tmp_path):
    args = ["train", "r2n2", "--out", str(tmp_path / "run"), "--steps", "2", "--shape", "16", "16", "16",
            "--threads", "1", "--checkpoint-every", "1", "--log-every", "100", "--synth-bank", "2",
            "--r2n2-steps", "2", "--r2n2-similarity", "ncc", "--export", str(tmp_path / "r2n2")]
    assert cli_main(args) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["amsgrad"] is True
    header = (tmp_path / "run" / "loss.csv").read_text().splitlines()[0].split(",")
    assert {"similarity", "final_similarity", "tv"} <= set(header)
    card = json.loads((tmp_path / "r2n2.json").read_text())
    assert card["network"] == "R2N2" and card["config"]["steps"] == 2
    assert card["config"]["similarity"] == "ncc" and card["config"]["s_max"] == 0.3
    model, _ = load_model(tmp_path / "r2n2.pt")
    assert isinstance(model, R2N2) and not model.training


def test_a_width_floor_keeps_every_gaussian_from_vanishing():
    from deepreglib.methods.r2n2.gaussians import widths_from_logits
    logits = torch.tensor([[-1e4, 0.0, 1e4]])
    paper = widths_from_logits(logits, 0.3)
    assert float(paper[0, 0]) < 1e-5 and float(paper[0, 2]) == pytest.approx(0.3, abs=1e-5)
    floored = widths_from_logits(logits, 0.3, 0.01)
    assert float(floored[0, 0]) == pytest.approx(0.01, abs=1e-5)
    assert float(floored[0, 1]) == pytest.approx(0.155, abs=1e-5)
    assert float(floored[0, 2]) == pytest.approx(0.3, abs=1e-5)
    with pytest.raises(ValueError, match="s_min"):
        R2N2(s_max=0.3, s_min=0.3)
    net = R2N2(channels=(4, 4, 4), res_blocks=0, pooled=2, steps=2, s_min=0.02)
    with torch.no_grad():
        net.parameter_net.fc.bias[6:9] = -1e4  # every width logit at -inf
        net.parameter_net.fc.bias[9:12] = 0.5  # and a non-zero weight
        out = net(torch.rand(1, 1, 12, 12, 12), torch.rand(1, 1, 12, 12, 12))
    assert torch.all(out.parameters.widths >= 0.02 - 1e-6)
    assert float(out.displacement.abs().max()) > 0.1  # the deformation does not vanish


def test_a_local_readout_reads_the_features_at_the_centre(tmp_path):
    from deepreglib.methods.r2n2.network import ParameterNetwork, level_coordinates
    full, strides = (16, 16, 16), [2, 4, 8]
    net = ParameterNetwork([2, 2, 2], pooled=1, readout_radius=1e-3)
    with torch.no_grad():
        for conv in net.convs:  # gate 0 everywhere, value = the feature's channel 0
            conv.weight.zero_(); conv.bias.zero_()
            conv.weight[1, 0, 1, 1, 1] = 1.0
        net.fc.weight.zero_(); net.fc.bias.zero_()
        net.fc.weight[:3, :3] = torch.eye(3)  # outputs 0..2: the pooled value per level
    g = torch.Generator().manual_seed(0)
    features = [torch.rand(1, 2, n, n, n, generator=g) for n in (8, 4, 2)]
    coarse = level_coordinates(full, (2, 2, 2), 8)
    centre = coarse[5:6]  # a voxel of the coarsest map, which lies on the finer maps' grids too
    out = net(features, centre, full, strides)
    for level, (feat, stride) in enumerate(zip(features, strides)):
        grid = level_coordinates(full, feat.shape[2:], stride)
        v = int(((grid - centre) ** 2).sum(-1).argmin())
        assert float(out[0, level]) == pytest.approx(float(feat[0, 0].flatten()[v]), abs=1e-5)
    # without a window the same network pools the mean over the whole map (the paper's readout)
    net.readout_radius = 0.0
    out = net(features)
    for level, feat in enumerate(features):
        assert float(out[0, level]) == pytest.approx(float(feat[0, 0].mean()), abs=1e-5)
    with pytest.raises(ValueError, match="centre"):
        ParameterNetwork([2, 2, 2], pooled=1, readout_radius=0.2)(features)
    with pytest.raises(ValueError, match="readout_radius"):
        R2N2(readout_radius=-1.0)
    # an untrained network with the window is still the identity, and its radius is saved with it
    model = R2N2(channels=(4, 4, 4), res_blocks=0, pooled=2, steps=2, readout_radius=0.25)
    x = torch.rand(1, 1, 12, 12, 12, generator=g)
    assert float(model(x, x.flip(2)).displacement.abs().max()) < 0.05
    save_model(model, tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt")[0].parameter_net.readout_radius == 0.25


def test_bump_pair_curriculum_draws_pairs_from_the_methods_own_class(tmp_path):
    """--r2n2-bump-pairs K: the fixed labels are the moving labels pulled through a sum of K local
    Gaussian deformations (recomputed here from the same draws), and the card records K."""
    from deepreglib.methods.r2n2.training import bump_batch
    from deepreglib.methods.r2n2.gaussians import random_local_deformations
    shape = (16, 18, 20)
    args = argparse.Namespace(r2n2_bump_pairs=3, r2n2_bump_voxels=3.0)
    batch = bump_batch(shape, 11, args)
    u = random_local_deformations(shape, 3, torch.Generator().manual_seed(11), 3.0)
    assert 1.0 < float(u.abs().max()) <= 3 * 3.0  # a real deformation, within K bumps' reach
    expected = warp(batch["moving_labels"].float(), u, "nearest").long()
    assert torch.equal(batch["fixed_labels"].long(), expected)
    assert not torch.equal(batch["fixed_labels"], batch["moving_labels"])
    assert batch["fixed"].shape == (1, 1) + shape and 0 <= float(batch["fixed"].min())
    assert bump_batch(shape, 11, argparse.Namespace(r2n2_bump_pairs=0)) is None  # off: the smooth generator
    cmd = ["train", "r2n2", "--out", str(tmp_path / "run"), "--steps", "2", "--shape", "16", "16", "16",
           "--threads", "1", "--synth-bank", "2", "--r2n2-steps", "2", "--r2n2-bump-pairs", "2",
           "--export", str(tmp_path / "bumps")]
    assert cli_main(cmd) == 0
    card = json.loads((tmp_path / "bumps.json").read_text())
    assert card["sessions"][0]["changed"]["r2n2_bump_pairs"] == 2


def test_augmentation_keeps_a_known_field_the_pairs_own():
    """A known displacement through the training loop's flips and fixed/moving swap still maps
    the pair: ``fixed = moving o (x + u)`` after every combination (to interpolation error); a
    folding field, which has no inverse, is dropped from a swapped pair instead of given wrong."""
    from deepreglib.core.jacobian import jacobian_determinant
    from deepreglib.methods.r2n2.gaussians import random_local_deformations
    from deepreglib.train.loop import augment
    shape = (20, 22, 24)
    u = random_local_deformations(shape, 3, torch.Generator().manual_seed(5), 1.5, width_range=(0.04, 0.08))
    assert float(jacobian_determinant(u).min()) > 0.2 and float(u.abs().max()) > 0.8
    moving = blob(shape, (8.0, 10.0, 13.0), 4.0) + 0.5 * blob(shape, (13.0, 12.0, 9.0), 3.0)
    batch = {"fixed": warp(moving, u), "moving": moving, "displacement": u}
    swaps = []
    for seed in range(16):
        out = augment(batch, np.random.default_rng(seed))
        swaps.append(not torch.allclose(out["moving"].sum(), moving.sum(), rtol=1e-5))  # a flip keeps the sum
        err = (warp(out["moving"], out["displacement"]) - out["fixed"]).abs().max()
        assert float(err) < 0.05, (seed, float(err))  # a wrong target (e.g. -u when swapped): 0.1-0.3
    assert any(swaps) and not all(swaps)  # both were checked
    folding = random_local_deformations(shape, 3, torch.Generator().manual_seed(5), 6.0, width_range=(0.01, 0.02))
    assert float(jacobian_determinant(folding).min()) < 0
    for seed in range(16):
        out = augment({"fixed": warp(moving, folding), "moving": moving, "displacement": folding},
                      np.random.default_rng(seed))
        assert ("displacement" in out) == (not swaps[seed])


def test_the_warm_start_s_gradients_reach_the_heads_at_the_identity():
    """The unsupervised loss gives the centre heads no gradient at the identity (a weight of 0:
    the saddle R2N2 stayed in); the supervised warm start does, and it points the first centre
    at the largest residual."""
    from deepreglib.methods.r2n2.training import residual_guide, residual_target, warm_start_terms
    torch.manual_seed(0)
    shape = (24, 24, 24)
    model = tiny_model(steps=2)
    with torch.no_grad():  # the identity: every weight exactly 0
        model.parameter_net.fc.weight[9:].zero_()
    centre = torch.tensor([[0.3, -0.2, 0.1]])
    u = local_deformation(centre, torch.eye(3)[None], torch.full((1, 3), 0.02), torch.tensor([[0.2, 0.0, 0.0]]),
                          shape)
    goal = residual_target(u)
    voxel = 2.0 / (shape[0] - 1)
    assert torch.allclose(goal, centre, atol=voxel)  # the largest residual is the bump's centre
    moving = blob(shape, (12.0, 12.0, 12.0), 5.0)
    fixed = warp(moving, u)
    heads = list(model.position.parameters())

    def grads(supervised):
        model.zero_grad()
        out = model(moving, fixed, return_warped=True, return_fields=True, return_position_maps=True)
        loss = ((out.warped - fixed) ** 2).mean()
        if supervised:
            loss = loss + warm_start_terms(out, u, model.strides)[0]
        loss.backward()
        return sum(float(p.grad.abs().sum()) for p in heads if p.grad is not None)

    assert grads(False) == 0.0
    assert grads(True) > 1e-3
    # teacher forcing: the deformation goes to the largest residual, the network's own centre is
    # kept beside it, and the weight head is told the displacement there (not the zero of a
    # wrong place), so its gradient does not vanish at the identity either
    model.zero_grad()
    out = model(moving, fixed, return_warped=True, return_fields=True, return_position_maps=True,
                centre_guide=residual_guide(u))
    assert torch.allclose(out.parameters.centres[:, 0], goal) and out.predicted_centres.shape == (1, 2, 3)
    loss, terms = warm_start_terms(out, u, model.strides)
    loss.backward()
    assert terms["guide_weight"] > 0.02  # (0.2 normalised units)^2 from the weight 0 at the bump
    assert float(model.parameter_net.fc.weight.grad[9:].abs().sum()) > 1e-4


def test_a_short_warm_start_moves_the_field_towards_a_known_bump():
    """Trained on one bump pair with the warm start, R2N2 leaves the identity: its endpoint error
    falls below the identity's (doing nothing)."""
    from deepreglib.methods.r2n2.training import warm_start_terms
    torch.manual_seed(0)
    shape = (24, 24, 24)
    model = tiny_model(steps=1)
    u = local_deformation(torch.tensor([[0.1, -0.1, 0.2]]), torch.eye(3)[None], torch.full((1, 3), 0.04),
                          torch.tensor([[0.0, 0.25, 0.0]]), shape)
    moving = blob(shape, (12.0, 11.0, 13.0), 4.0)
    fixed = warp(moving, u)
    identity = float((u ** 2).sum(1).mean())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model(moving, fixed, return_warped=True, return_fields=True, return_position_maps=True)
        loss = warm_start_terms(out, u, model.strides)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = float(((model(moving, fixed).displacement - u) ** 2).sum(1).mean())
    assert err < 0.5 * identity, (err, identity)


# -- outputs --------------------------------------------------------------------------------------
def oblique_grid(shape=(10, 12, 14)):
    return Grid(shape, (0.9, 1.3, 2.1), (-30.0, 12.5, 4.0), rotation(0.35, -0.2, 0.8).ravel())


def test_physical_description_of_an_axis_aligned_deformation():
    grid = Grid((11, 21, 31), (1.0, 2.0, 3.0), (5.0, -4.0, 2.0), np.eye(3).ravel())  # shape (z, y, x)
    p = GaussianParameters(centres=torch.tensor([[[0.0, 0.5, -1.0]]]), rotations=torch.eye(3)[None, None],
                           widths=torch.tensor([[[0.04, 0.01, 0.09]]]),
                           weights=torch.tensor([[[0.2, -0.1, 0.4]]]))
    d = describe_deformations(p, grid)[0]
    # normalised (k, j, i) = (0, 0.5, -1) is index (5, 15, 0) -> x = 5 + 0 * 1, y = -4 + 15 * 2, z = 2 + 5 * 3
    np.testing.assert_allclose(d["centre_lps"], [5.0, 26.0, 17.0], atol=1e-9)
    # weight: k 0.2 * 5 voxels * 3 mm (z), j -0.1 * 10 * 2 (y), i 0.4 * 15 * 1 (x)
    np.testing.assert_allclose(d["weight_mm_lps"], [6.0, -2.0, 3.0], atol=1e-6)
    np.testing.assert_allclose(d["weight_voxel_kji"], [1.0, -1.0, 6.0], atol=1e-6)
    # sd: k sqrt(.04) * 5 * 3 = 3 (z), j sqrt(.01) * 10 * 2 = 2 (y), i sqrt(.09) * 15 * 1 = 4.5 (x)
    np.testing.assert_allclose(d["extents_mm"], [4.5, 3.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(np.abs(d["axes_lps"]), np.eye(3)[[0, 2, 1]], atol=1e-9)


def test_markups_json_is_valid_and_its_points_are_at_the_physical_centres(tmp_path):
    grid = oblique_grid()
    p = random_parameters(1, 5, seed=4)
    deformations = describe_deformations(p, grid, certainty=torch.rand(1, 5, 3))
    path = write_deformations_markups(tmp_path / "d.mrk.json", deformations)
    data = json.loads(path.read_text())
    assert data["@schema"].endswith("markups-schema-v1.0.3.json#")
    markup = data["markups"][0]
    assert markup["coordinateSystem"] == "LPS" and len(markup["controlPoints"]) == 5
    half = (np.asarray(grid.shape) - 1) / 2.0
    expected = grid.index_to_physical((p.centres[0].double().numpy() + 1.0) * half)
    names, points = read_landmarks(path)
    assert names == ["l1", "l2", "l3", "l4", "l5"]
    np.testing.assert_allclose(points, expected, atol=1e-6)
    m = grid.index_to_physical_matrix[:3, :3] @ np.diag(half)
    for cp, d, t in zip(markup["controlPoints"], deformations, range(5)):
        axes = np.asarray(cp["orientation"]).reshape(3, 3)  # columns are the axes
        np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-9)
        assert np.linalg.det(axes) == pytest.approx(1.0, abs=1e-9)
        # the axes and extents rebuild the physical covariance A Sigma A^T
        sigma = (p.rotations[0, t].double() @ torch.diag(p.widths[0, t].double())
                 @ p.rotations[0, t].double().T).numpy()
        ext = np.asarray(cp["r2n2"]["extents_mm"])
        np.testing.assert_allclose(axes @ np.diag(ext ** 2) @ axes.T, m @ sigma @ m.T, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(cp["r2n2"]["weight_mm_lps"], m @ p.weights[0, t].double().numpy(), atol=1e-6)
        assert cp["r2n2"]["step"] == t + 1 and len(cp["r2n2"]["position_certainty"]) == 3


def test_slicer_reads_the_point_list_and_the_volume_sequence(tmp_path):
    slicer = pytest.importorskip("slicer")
    vtk = pytest.importorskip("vtk")
    from vtk.util.numpy_support import vtk_to_numpy
    grid = oblique_grid((6, 7, 8))
    p = random_parameters(1, 3, seed=5)
    path = write_deformations_markups(tmp_path / "d.mrk.json", describe_deformations(p, grid))
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    assert node.GetNumberOfControlPoints() == 3
    _, lps = read_landmarks(path)
    ras = [node.GetNthControlPointPosition(i) for i in range(3)]
    np.testing.assert_allclose(np.asarray(ras), lps * [-1, -1, 1], atol=1e-6)
    for i, cp in enumerate(json.loads(path.read_text())["markups"][0]["controlPoints"]):
        axes_lps = np.asarray(cp["orientation"]).reshape(3, 3)
        axes_ras = np.asarray(node.GetNthControlPointOrientationMatrix(i)).reshape(3, 3)
        np.testing.assert_allclose(axes_ras, np.diag([-1.0, -1.0, 1.0]) @ axes_lps, atol=1e-6)

    frames = torch.rand(3, *grid.shape)
    seq_path = write_volume_sequence(tmp_path / "s.seq.nrrd", frames, grid)
    seq = slicer.vtkMRMLSequenceNode()
    scene.AddNode(seq)
    seq_storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    scene.AddNode(seq_storage)
    seq_storage.SetFileName(str(seq_path))
    assert seq_storage.ReadData(seq) == 1
    assert seq.GetNumberOfDataNodes() == 3 and seq.GetNthIndexValue(2) == "2"
    vol = seq.GetNthDataNode(1)
    arr = vtk_to_numpy(vol.GetImageData().GetPointData().GetScalars()).reshape(grid.shape)
    np.testing.assert_allclose(arr, frames[1].numpy(), atol=0)
    m = vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    reverse = np.eye(4)[[2, 1, 0, 3]]
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ grid.index_to_physical_matrix @ reverse
    np.testing.assert_allclose(ijk_to_ras, expected, atol=1e-6)


def test_volume_sequence_geometry_through_simpleitk(tmp_path):
    grid = oblique_grid((5, 6, 7))
    frames = torch.rand(4, *grid.shape)
    img = sitk.ReadImage(str(write_volume_sequence(tmp_path / "s.seq.nrrd", frames, grid)))
    # ITK reads the sequence (list) axis as the components of a 3D vector image
    assert img.GetSize() == (7, 6, 5) and img.GetNumberOfComponentsPerPixel() == 4
    read = Grid.from_sitk(img)
    assert read.shape == grid.shape
    np.testing.assert_allclose(read.index_to_physical_matrix, grid.index_to_physical_matrix, atol=1e-9)
    np.testing.assert_allclose(np.moveaxis(sitk.GetArrayFromImage(img), -1, 0), frames.numpy(), atol=0)
    with pytest.raises(ValueError, match="frames must be"):
        write_volume_sequence(tmp_path / "t.seq.nrrd", frames[:, :-1], grid)


def test_method_runs_a_saved_model_and_writes_its_explanations(tmp_path):
    torch.manual_seed(0)
    net = tiny_model(steps=5)
    with torch.no_grad():
        net.parameter_net.fc.weight[9:].normal_(0.0, 1.0)
    path = save_model(net, tmp_path / "r2n2")
    grid = Grid.identity((12, 14, 16), spacing=(2.0, 2.0, 2.0))
    moving, fixed = blob(grid.shape, (5.0, 6.0, 8.0)), blob(grid.shape, (6.0, 7.0, 7.0))
    method = R2N2Method(SimpleNamespace(weights="unused"), "cpu", weights=path, stop_threshold=None)
    seen = []
    result = method.run(fixed, moving, grid, RunContext(progress=lambda f, m="": seen.append(f)))
    assert isinstance(result, R2N2Result) and result.displacement.shape == (1, 3) + grid.shape
    assert result.info["steps_used"] == 5 and result.info["transformation_parameters"] == 60
    assert len(result.deformations) == 5 and result.sequence.shape == (6,) + grid.shape
    assert torch.equal(result.sequence[0], moving[0, 0])
    assert torch.allclose(result.sequence[-1], warp(moving, result.displacement)[0, 0], atol=1e-5)
    assert seen == sorted(seen) and seen[-1] == 1.0
    entries = result.write_files(tmp_path / "out")
    assert [e["kind"] for e in entries] == ["markups", "volume_sequence"]
    for e in entries:
        assert (tmp_path / "out" / e["path"]).is_file()
    stopping = R2N2Method(SimpleNamespace(weights="unused"), "cpu", weights=path, stop_window=2)
    same = stopping.run(fixed, fixed, grid, RunContext())
    assert same.info["stopped_early"] and same.info["steps_used"] == 2
    assert len(same.info["dissimilarity_per_step"]) == 3


def test_compactness_counts():
    assert transformation_parameter_count(25) == 300
    img = sitk.Image(40, 50, 30, sitk.sitkFloat32)
    for mesh in ((4, 5, 3), (8, 8, 8)):
        t = sitk.BSplineTransformInitializer(img, list(mesh), 3)
        assert bspline_parameter_count(mesh) == t.GetNumberOfParameters()


def test_init_width_starts_every_gaussian_at_the_given_variance():
    from deepreglib.core.errors import BadInputError
    from deepreglib.methods.r2n2.gaussians import widths_from_logits
    from deepreglib.methods.r2n2.training import build_r2n2
    model = build_r2n2(argparse.Namespace(r2n2_init_width=0.03, r2n2_s_min=0.005, r2n2_steps=2))
    torch.manual_seed(0)
    out = model(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16))
    assert torch.allclose(out.parameters.widths, torch.full_like(out.parameters.widths, 0.03), atol=2e-3)
    assert torch.allclose(widths_from_logits(model.parameter_net.fc.bias[6:9], model.s_max, model.s_min),
                          torch.full((3,), 0.03))
    for bad in (0.001, 0.5):
        with pytest.raises(BadInputError, match="init-width"):
            build_r2n2(argparse.Namespace(r2n2_init_width=bad, r2n2_s_min=0.005))


def test_the_flow_head_is_told_the_dense_residual_in_training_only():
    from deepreglib.methods.r2n2.training import bump_batch, build_r2n2, r2n2_loss
    args = argparse.Namespace(r2n2_steps=2, r2n2_flow_head=True, r2n2_supervised=1.0, r2n2_bump_pairs=2,
                              r2n2_bump_voxels=3.0, current_step=0)
    model = build_r2n2(args).train()
    assert model.config["flow_head"] is True and "flow_head" not in build_r2n2(argparse.Namespace()).config
    total, terms = r2n2_loss(model, bump_batch((24, 24, 24), 3, args), args)
    total.backward()
    assert terms["guide_flow"] > 0 and float(model.flow_head.weight.grad.abs().sum()) > 0
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 1, 24, 24, 24), torch.rand(1, 1, 24, 24, 24),
                            return_position_maps=True).flows is None  # inference never runs it
