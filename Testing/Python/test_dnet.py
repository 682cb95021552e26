"""D-Net (``dnet``): 6D -> SO(3), mutual non-local links, the network-coordinate -> LPS geometry,
the method and ``--init dnet`` (a network whose output is pinned to a known pose, so geometry is
checked exactly without trained weights), the training pair and a short training run."""
import argparse
import json
import math

import numpy as np
import pytest
import torch

from deepreglib.classic import initial as align
from deepreglib.core.geometry import Grid, voxel_grid_points
from deepreglib.methods.dnet.method import (DNetMethod, dnet_grid, dnet_initializer, normalized_to_index,
                                     normalized_to_physical, physical_rigid, rotation_error_deg)
from deepreglib.methods.dnet.training import DNET as DNET_RECIPE
from deepreglib.methods.dnet.training import (dnet_loss_terms, max_angle_at, rigid_training_pair,
                                              whole_volume_batch)
from deepreglib.run.initializers import register_learned_initializers
from deepreglib.methods.base import RunContext
from deepreglib.methods.weights import save_model
from deepreglib.methods.dnet.network import DNet, MutualNonLocal, rotation_to_sixd, sixd_to_rotation
from deepreglib.core.resample import resample_to_grid
from deepreglib.train.synth import rotation_matrix
from deepreglib.core.warp import identity_grid, sample_at

TINY = dict(channels=(1, 4, 8, 8, 8, 8, 8), decoder=(8, 8, 8, 8), hidden=16, pool=2)


def _check_rotations(r, atol=1e-5):
    eye = torch.eye(3, dtype=r.dtype).expand_as(r)
    assert torch.allclose(r.transpose(-1, -2) @ r, eye, atol=atol)
    assert torch.allclose(torch.linalg.det(r), torch.ones(r.shape[:-2], dtype=r.dtype), atol=atol)


# -- 6D -> SO(3) ------------------------------------------------------------------------------------
def test_sixd_to_rotation_is_orthonormal_with_det_one_also_for_degenerate_inputs():
    g = torch.Generator().manual_seed(0)
    random = torch.randn(2000, 6, generator=g) * torch.logspace(-6, 6, 2000)[:, None]
    a = torch.randn(6, 3, generator=g)
    degenerate = torch.cat([
        torch.cat([a, a], 1),  # a2 parallel to a1
        torch.cat([a, -3 * a], 1),  # antiparallel
        torch.cat([a, a + 1e-7 * torch.randn(6, 3, generator=g)], 1),  # nearly parallel
        torch.cat([torch.zeros(6, 3), a], 1),  # a1 = 0
        torch.cat([a, torch.zeros(6, 3)], 1),  # a2 = 0
        torch.zeros(1, 6),
        torch.tensor([[0.0, 0, 1, 0, 0, 1], [1e-30, 0, 0, 0, 1e-30, 0]]),  # axis-aligned, tiny
    ])
    for x in (random, degenerate):
        r = sixd_to_rotation(x)
        assert r.dtype == x.dtype and torch.isfinite(r).all()
        _check_rotations(r)
    # generic inputs: exactly the paper's Gram-Schmidt
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    b1 = x[:, :3] / x[:, :3].norm(dim=1, keepdim=True)
    b2 = x[:, 3:] - (b1 * x[:, 3:]).sum(1, keepdim=True) * b1
    b2 = b2 / b2.norm(dim=1, keepdim=True)
    expected = torch.stack([b1, b2, torch.cross(b1, b2, dim=1)], dim=-1)
    assert torch.allclose(sixd_to_rotation(x), expected, atol=1e-12)
    # the training target round-trips
    rots = torch.stack([torch.as_tensor(rotation_matrix(ax, ang)) for ax, ang in
                        zip(torch.randn(20, 3, generator=g).numpy(), np.linspace(-3.1, 3.1, 20))])
    assert torch.allclose(sixd_to_rotation(rotation_to_sixd(rots)), rots, atol=1e-12)
    with pytest.raises(ValueError):
        sixd_to_rotation(torch.zeros(3, 5))


# -- mutual non-local link --------------------------------------------------------------------------
def test_mutual_non_local_equals_a_naive_reference():
    torch.manual_seed(0)
    mnl = MutualNonLocal(3).double()
    x_f = torch.randn(2, 3, 2, 2, 3, dtype=torch.float64)
    x_m = torch.randn(2, 3, 2, 2, 3, dtype=torch.float64)
    out_f, out_m = mnl(x_f, x_m)
    w = mnl.w.weight[:, :, 0, 0, 0]  # (C_out, C_in)

    def naive(a, b):  # y(k) = sum_j softmax_j((W a_k) . (W b_j)) W b_j, loops over voxels
        n, c = a.shape[:2]
        a_flat, b_flat = a.reshape(n, c, -1), b.reshape(n, c, -1)
        y = torch.zeros_like(a_flat)
        weights = torch.zeros(n, a_flat.shape[2], b_flat.shape[2], dtype=a.dtype)
        for i in range(n):
            for k in range(a_flat.shape[2]):
                logits = torch.stack([(w @ a_flat[i, :, k]) @ (w @ b_flat[i, :, j]) for j in range(b_flat.shape[2])])
                p = torch.exp(logits - logits.max())
                p = p / p.sum()
                weights[i, k] = p
                y[i, :, k] = sum(p[j] * (w @ b_flat[i, :, j]) for j in range(b_flat.shape[2]))
        return y.reshape(a.shape), weights

    y_m2f, att = naive(x_f, x_m)
    y_f2m, _ = naive(x_m, x_f)
    assert torch.allclose(out_f, x_f + y_m2f, atol=1e-10)
    assert torch.allclose(out_m, x_m + y_f2m, atol=1e-10)
    assert torch.allclose(mnl.attention(x_f, x_m), att, atol=1e-12)
    with pytest.raises(ValueError):
        mnl(x_f, x_m[:, :, :1])


# -- the network ------------------------------------------------------------------------------------
def test_untrained_dnet_gives_a_valid_rotation_near_the_identity():
    torch.manual_seed(0)
    net = DNet().eval()  # the paper's channels on a 64^3 input
    f, m = torch.rand(1, 1, 64, 64, 64), torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        out = net(m, f)
    assert out.rotation.shape == (1, 3, 3) and out.translation.shape == (1, 3) and out.sixd.shape == (1, 6)
    _check_rotations(out.rotation)
    assert rotation_error_deg(out.rotation[0].numpy(), np.eye(3)) < 1.0
    assert float(out.translation.abs().max()) < 0.05
    with pytest.raises(ValueError):
        net(m, f[:, :, :32])
    with torch.no_grad():
        amap = DNet(**TINY).eval().attention_map(m[..., :32, :32, :32], f[..., :32, :32, :32], (10, 20, 5))
    assert amap.shape == (1, 1, 32, 32, 32) and float(amap.min()) >= 0 and float(amap.max()) == pytest.approx(1.0)


# -- geometry: normalised network coordinates -> LPS mm --------------------------------------------
def test_normalized_coordinates_map_to_millimetres_as_documented():
    g = dnet_grid((10.0, -20.0, 30.0), 17, 2.5)  # h = 8 voxels = 20 mm
    p = normalized_to_physical(g)
    apply = lambda v: p[:3, :3] @ np.asarray(v, float) + p[:3, 3]  # noqa: E731
    assert np.allclose(apply([0, 0, 0]), [10, -20, 30])
    assert np.allclose(apply([1, 0, 0]), [10, -20, 50])  # +k is +z (LPS superior)
    assert np.allclose(apply([0, -1, 0]), [10, -40, 30])  # -j is -y
    assert np.allclose(apply([0, 0, 1]), [30, -20, 30])  # +i is +x
    assert np.allclose(normalized_to_index((9, 5, 3)) @ [0, 0, 0, 1], [4, 2, 1, 1])
    assert np.allclose(normalized_to_index((9, 5, 3)) @ [1, 1, 1, 1], [8, 6, 5, 1])  # one scalar h = 4


def _index_points(m, shape):
    """``(1, 3, *shape)`` float64: ``M x`` for every voxel index ``x`` of ``shape``."""
    x = identity_grid(shape, torch.float64)
    m = torch.as_tensor(m, dtype=torch.float64)
    return torch.einsum("pc,ncdhw->npdhw", m[:3, :3], x) + m[:3, 3].view(1, 3, 1, 1, 1)


def _pinned_dnet(rotation, translation, input_size=16):
    """A tiny D-Net whose output is the given pose for any input (zero last-layer weights)."""
    net = DNet(input_size=input_size, **TINY)
    with torch.no_grad():
        net.fc2.weight.zero_()
        r = torch.as_tensor(rotation, dtype=torch.float32)
        net.fc2.bias.copy_(torch.cat([rotation_to_sixd(r), torch.as_tensor(translation, dtype=torch.float32)]))
    return net.eval()


def _blob(points_lps, centre=(0.0, 0.0, 0.0)):
    """Smooth asymmetric test object as a function of physical position."""
    p = np.asarray(points_lps) - np.asarray(centre)
    out = np.exp(-((p / np.array([14.0, 10.0, 8.0])) ** 2).sum(-1))
    out += 0.7 * np.exp(-(((p - np.array([6.0, 3.0, -2.0])) / 7.0) ** 2).sum(-1))
    return out


def test_physical_matrix_equals_the_pose_in_network_coordinates():
    r = rotation_matrix((1.0, -2.0, 0.5), 2.0)
    t = np.array([0.1, -0.2, 0.05])
    g_f = dnet_grid((5.0, -3.0, 12.0), 16, 3.0)
    g_m = dnet_grid((-20.0, 8.0, 2.0), 16, 3.0)
    a = physical_rigid(r, t, g_f, g_m)
    assert np.allclose(a[:3, :3].T @ a[:3, :3], np.eye(3), atol=1e-12) and np.linalg.det(a[:3, :3]) > 0
    pts = voxel_grid_points(g_m, torch.float64)[0].permute(1, 2, 3, 0).numpy()
    moving = torch.as_tensor(_blob(pts, (-20.0, 8.0, 2.0)), dtype=torch.float32)[None, None]
    via_lps = resample_to_grid(moving, g_m, g_f, a)
    # the same pull done in network index space: fixed index -> normalised -> T -> moving index
    n = normalized_to_index(g_f.shape)
    t4 = np.eye(4)
    t4[:3, :3], t4[:3, 3] = r, t
    m_idx = n @ t4 @ np.linalg.inv(n)
    direct = sample_at(moving, _index_points(m_idx, g_f.shape).float())
    assert float((via_lps - direct).abs().max()) < 1e-4
    assert float(direct.abs().max()) > 0.5  # the object is in view, so the comparison means something


def test_dnet_initializer_and_composition_with_a_second_transform(tmp_path, monkeypatch):
    fixed_grid = Grid((20, 24, 22), (2.0, 1.5, 2.5), (-15.0, -20.0, -25.0), tuple(np.eye(3).ravel()))
    moving_grid = Grid((22, 22, 18), (1.8, 1.8, 2.2), (-30.0, -10.0, -12.0), tuple(np.eye(3).ravel()))
    r, t = rotation_matrix((0.0, 1.0, 1.0), 0.7), np.array([0.05, 0.0, -0.1])
    path = save_model(_pinned_dnet(r, t), tmp_path / "models" / "dnet")
    monkeypatch.setattr(align, "INITIALIZERS", dict(align.INITIALIZERS))
    assert register_learned_initializers(tmp_path / "empty") == []
    assert register_learned_initializers(tmp_path / "models") == ["dnet", "dnet+rigid"]
    pts = voxel_grid_points(moving_grid, torch.float64)[0].permute(1, 2, 3, 0).numpy()
    moving = torch.as_tensor(_blob(pts, (-10.0, 8.0, 8.0)), dtype=torch.float32)[None, None]
    fixed = torch.rand(1, 1, *fixed_grid.shape)
    m_init = align.initial_transform("dnet", fixed, fixed_grid, moving, moving_grid)
    # expected: cubes centred on each image, common spacing = longest side of either / 16
    spacing = max(fixed_grid.extent_mm.max(), moving_grid.extent_mm.max()) / 16
    centre = lambda g: g.index_to_physical((np.asarray(g.shape) - 1) / 2.0)  # noqa: E731
    expected = physical_rigid(r, t, dnet_grid(centre(fixed_grid), 16, spacing),
                              dnet_grid(centre(moving_grid), 16, spacing))
    assert np.allclose(m_init, expected, atol=1e-5)
    assert np.allclose(m_init, dnet_initializer(fixed, fixed_grid, moving, moving_grid, weights=path))
    # init then a second transform B (what the method adds) == one pull through init @ B
    b = np.eye(4)
    b[:3, :3] = rotation_matrix((1, 0, 0), 0.1) * 1.05
    b[:3, 3] = (1.0, -2.0, 0.5)
    once = resample_to_grid(moving, moving_grid, fixed_grid, m_init @ b)
    step1 = resample_to_grid(moving, moving_grid, fixed_grid, m_init)
    twice = resample_to_grid(step1, fixed_grid, fixed_grid, b)
    inside = once > 0.05
    assert int(inside.sum()) > 100
    assert float((once - twice)[inside].abs().mean()) < 0.01
    wrong = resample_to_grid(step1, fixed_grid, fixed_grid, np.linalg.inv(b))  # order matters
    assert float((once - wrong)[inside].abs().mean()) > 0.03


def test_dnet_method_recovers_a_pinned_pose_through_the_pipeline(tmp_path, monkeypatch):
    from deepreglib.io import images as io
    from deepreglib.methods import registry
    from deepreglib.run.pipeline import RegisterOptions, register

    oblique = rotation_matrix((0.3, 1.0, 0.2), 0.4)
    fixed_grid = Grid((24, 26, 28), (2.0, 2.0, 2.0), (-25.0, -30.0, -20.0), tuple(oblique.ravel()))
    centre = fixed_grid.index_to_physical((np.asarray(fixed_grid.shape) - 1) / 2.0)
    # a known physical rigid pose fixed -> moving, about the fixed centre
    m_true = np.eye(4)
    m_true[:3, :3] = rotation_matrix((1.0, 1.0, 0.0), 1.3)
    m_true[:3, 3] = centre + np.array([4.0, -3.0, 2.0]) - m_true[:3, :3] @ centre
    moving_grid = fixed_grid
    pts_f = voxel_grid_points(fixed_grid, torch.float64)[0].permute(1, 2, 3, 0).numpy()
    pts_m = pts_f @ np.linalg.inv(m_true)[:3, :3].T + np.linalg.inv(m_true)[:3, 3]
    fixed_t = torch.as_tensor(_blob(pts_f, centre), dtype=torch.float32)[None, None]
    moving_t = torch.as_tensor(_blob(pts_m, centre), dtype=torch.float32)[None, None]  # moving(M p) = fixed(p)
    io.write_image(io.tensor_to_image(fixed_t, fixed_grid), str(tmp_path / "f.nii.gz"))
    io.write_image(io.tensor_to_image(moving_t, moving_grid), str(tmp_path / "m.nii.gz"))

    info = registry.MethodInfo(name="dnet_test", title="D-Net (test)", description="", kind="rigid", weights=None,
                               implementation="deepreglib.methods.dnet.method:DNetMethod", supports_refine=False)
    monkeypatch.setitem(registry.METHODS, "dnet_test", info)
    size = 16
    net_grid = dnet_grid(centre, size, fixed_grid.extent_mm.max() / size)
    p = normalized_to_physical(net_grid)
    pose = np.linalg.inv(p) @ m_true @ p  # what a perfect D-Net predicts
    path = save_model(_pinned_dnet(pose[:3, :3], pose[:3, 3], size), tmp_path / "dnet")
    method = DNetMethod(info, "cpu", weights=path)
    assert method.grid_for(fixed_grid) == net_grid
    manifest = json.loads(register(RegisterOptions(fixed=str(tmp_path / "f.nii.gz"), moving=str(tmp_path / "m.nii.gz"),
                                                   out=str(tmp_path / "out"), method="dnet_test", device="cpu",
                                                   weights=str(path), qa=False)).read_text())
    written = io.read_linear_transform(tmp_path / "out" / "transform.tfm")
    assert np.allclose(written, m_true, atol=1e-3)
    assert manifest["method_outputs"]["rotation_deg"] == pytest.approx(math.degrees(1.3), abs=1e-3)
    warped, _ = io.image_to_tensor(io.read_image(str(tmp_path / "out" / "warped.mha")))
    src = moving_grid.physical_to_index(pts_f @ m_true[:3, :3].T + m_true[:3, 3])
    in_view = torch.as_tensor(np.all((src >= 0) & (src <= np.asarray(moving_grid.shape) - 1), axis=-1))[None, None]
    assert int(in_view.sum()) > 1000
    err = (warped - fixed_t)[in_view].abs()
    assert float(err.max()) < 0.08 and float(err.mean()) < 0.01  # trilinear error of the blob only
    direct = resample_to_grid(moving_t, moving_grid, fixed_grid, m_true)
    assert float((warped - direct).abs().max()) < 1e-3
    att_img = io.read_image(str(tmp_path / "out" / "mutual_attention.mha"))
    att, att_grid = io.image_to_tensor(att_img)
    assert att_grid.shape == fixed_grid.shape and np.allclose(att_grid.direction, fixed_grid.direction)
    assert 0.0 <= float(att.min()) and float(att.max()) <= 1.0 + 1e-6
    result = method.run(torch.rand(1, 1, size, size, size), torch.rand(1, 1, size, size, size), net_grid, RunContext())
    assert np.allclose(result.matrix, m_true, atol=1e-4)


# -- training -----------------------------------------------------------------------------------------
def _compact_volume(n=24):
    """The blob at 2 voxels per mm unit: about 7 voxels wide, nearly 0 at the edges."""
    coords = identity_grid((n, n, n), torch.float64)[0].permute(1, 2, 3, 0).numpy() - (n - 1) / 2
    return torch.as_tensor(_blob(2.0 * coords), dtype=torch.float32)[None, None]


def test_training_pair_has_the_stated_pose_and_ranges():
    vol = _compact_volume()
    g = torch.Generator().manual_seed(3)
    ex = rigid_training_pair(vol, g, augment=False)
    r, t = ex["rotation"][0].double().numpy(), ex["translation"][0].double().numpy()
    _check_rotations(ex["rotation"])
    assert np.all(np.abs(t) <= 0.25 * 24 / 11.5 + 1e-9)  # 1/4 extent in units of h = 11.5 voxels
    assert torch.allclose(ex["sixd"][0], rotation_to_sixd(ex["rotation"])[0])
    # moving(R x + t) == fixed(x) in normalised coordinates, checked where both are in view
    n = normalized_to_index((24, 24, 24))
    t4 = np.eye(4)
    t4[:3, :3], t4[:3, 3] = r, t
    m = n @ t4 @ np.linalg.inv(n)
    pts = _index_points(m, (24, 24, 24))
    pulled = sample_at(ex["moving"], pts.float())
    inside = ((pts >= 1) & (pts <= 22)).all(dim=1, keepdim=True) & (ex["fixed"] > 0.05)
    assert int(inside.sum()) > 50
    assert float((pulled - ex["fixed"])[inside].abs().max()) < 0.06
    draws = [rigid_training_pair(vol, torch.Generator().manual_seed(s), augment=False) for s in range(30)]
    angles = [rotation_error_deg(np.eye(3), d["rotation"][0].numpy()) for d in draws]
    assert max(angles) > 90  # the full range is drawn, not small angles only


def test_dnet_loss_terms_have_known_values():
    lt, lr = dnet_loss_terms(torch.zeros(1, 6), torch.zeros(1, 3), torch.ones(1, 6), torch.tensor([[1.0, 0, 0]]))
    assert float(lt) == pytest.approx(0.5 / 1.01) and float(lr) == pytest.approx(3.0)
    lt, lr = dnet_loss_terms(torch.ones(1, 6), torch.ones(1, 3), torch.ones(1, 6), torch.ones(1, 3))
    assert float(lt) == 0 and float(lr) == 0


def test_short_dnet_training_lowers_the_loss():
    torch.manual_seed(0)
    model = DNet(input_size=24, **TINY)
    vol = _compact_volume()
    batch = {"fixed": vol, "moving": vol}
    args = argparse.Namespace(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        total, terms = DNET_RECIPE.loss(model, batch, args)
        assert set(terms) == {"translation_loss", "rotation_loss", "max_angle_deg"}
        assert terms["max_angle_deg"] == pytest.approx(180.0)  # no warm-up asked: the paper's range
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert np.mean(losses[-3:]) < 0.5 * losses[0]


def test_angle_warm_up_grows_linearly_to_the_full_range():
    assert max_angle_at(0, 0, 30.0) == pytest.approx(math.pi)  # no warm-up: always +-180
    assert math.degrees(max_angle_at(0, 100, 30.0)) == pytest.approx(30.0)
    assert math.degrees(max_angle_at(50, 100, 30.0)) == pytest.approx(105.0)
    assert max_angle_at(100, 100, 30.0) == pytest.approx(math.pi)
    assert max_angle_at(10_000, 100, 30.0) == pytest.approx(math.pi)
    with pytest.raises(ValueError, match="start angle"):
        max_angle_at(0, 100, 200.0)
    # the draws respect the bound of the step
    vol = _compact_volume()
    for s in range(20):
        ex = rigid_training_pair(vol, torch.Generator().manual_seed(s), max_angle=math.radians(20), augment=False)
        assert rotation_error_deg(np.eye(3), ex["rotation"][0].numpy()) <= 20.0 + 1e-6


def test_canonical_fixed_pose_keeps_the_volume_as_the_fixed_view():
    vol = _compact_volume()
    ex = rigid_training_pair(vol, torch.Generator().manual_seed(1), random_fixed_pose=False, augment=False)
    assert float((ex["fixed"] - vol).abs().max()) < 1e-5
    ex = rigid_training_pair(vol, torch.Generator().manual_seed(1), random_fixed_pose=True, augment=False)
    assert float((ex["fixed"] - vol).abs().max()) > 0.05  # the default turns the fixed view too


def test_real_dnet_volumes_are_whole_scans_in_a_centred_cube():
    """Like the method's input (the whole field of view in a cube), not a crop."""
    v = torch.zeros(1, 1, 20, 40, 10)
    v[:, :, 5:15, 2:38, 2:8] = 1.0
    batch = whole_volume_batch([v], (16, 16, 16), np.random.default_rng(0))
    f = batch["fixed"]
    assert tuple(f.shape) == (1, 1, 16, 16, 16) and torch.equal(batch["moving"], f)
    idx = torch.nonzero(f[0, 0] > 0.5).double()
    assert torch.allclose(idx.mean(0), torch.full((3,), 7.5, dtype=torch.float64), atol=0.5)  # centred
    extent = idx.max(0).values - idx.min(0).values
    assert float(extent[1]) >= 13  # the longest axis (40 voxels, 36 of them filled) spans the cube
    assert float(extent[0]) <= 5 and float(extent[2]) <= 3  # the others keep their proportions


def test_a_repeated_training_volume_gets_a_new_pose_at_every_step():
    """Whole scans and the synthetic bank repeat images; the draws must not (else D-Net memorises
    one pose per image), and must still be a pure function of (seed, step) for resuming."""
    vol = _compact_volume()
    batch = {"fixed": vol, "moving": vol}
    from deepreglib.train.draws import batch_generator

    def pose(step):
        ex = rigid_training_pair(vol, batch_generator(batch, 0, step), augment=False)
        return ex["rotation"][0]

    assert torch.equal(pose(7), pose(7))
    assert not torch.allclose(pose(7), pose(8), atol=1e-3)
    assert torch.equal(rigid_training_pair(vol, batch_generator(batch, 0), augment=False)["rotation"],
                       rigid_training_pair(vol, batch_generator(batch, 0), augment=False)["rotation"])


def test_canonical_pose_training_never_mirrors_the_scans():
    from deepreglib.cli import build_parser
    from deepreglib.methods.registry import training_recipes
    from deepreglib.train.loop import make_batch
    vol = torch.zeros(1, 1, 12, 12, 12)
    vol[:, :, 2:5, 3:9, 1:4] = 1.0  # asymmetric along every axis
    def batches(pose):
        args = build_parser().parse_args(["train", "dnet", "--out", "unused", "--shape", "12", "12", "12",
                                          "--real-fraction", "1", "--dnet-fixed-pose", pose])
        return [make_batch(s, args, [vol], training_recipes()["dnet"])["fixed"] for s in range(12)]

    def mirrored(b):  # the bright block's centre on the other side of the cube's centre on some axis
        c = torch.nonzero(b[0, 0] > 0.5).double().mean(0) - 5.5
        return bool(((c * (torch.nonzero(vol[0, 0] > 0.5).double().mean(0) - 5.5)) < 0).any())
    assert not any(mirrored(b) for b in batches("canonical"))  # (only the field of view varies)
    assert any(mirrored(b) for b in batches("random"))


def test_anatomy_variation_is_off_by_default_and_keeps_the_scan_recognisable():
    from deepreglib.methods.dnet.training import vary_anatomy
    vol = _compact_volume()
    assert torch.equal(vary_anatomy(vol, torch.Generator().manual_seed(0), 0.0), vol)
    varied = vary_anatomy(vol, torch.Generator().manual_seed(0), 2.0)
    assert varied.shape == vol.shape
    diff = float((varied - vol).abs().mean())
    assert 1e-4 < diff < 0.5 * float(vol.abs().mean())  # changed, but the same object
    com = lambda v: (torch.nonzero(v[0, 0] > 0.5).double().mean(0))  # noqa: E731
    assert float((com(varied) - com(vol)).norm()) < 2.0  # about the centre: no pose change


OASIS_DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)  # the real training scans'


def test_the_cube_faces_the_training_orientation_whatever_the_files_voxel_order(tmp_path):
    """One physical scene stored in two voxel orders (identity direction, and the OASIS scans'
    direction, which is a reflection of it) must reach the network as the same tensors, and give
    the same physical pose; the cube faces the card's grid_direction."""
    r, t = rotation_matrix((1.0, 0.0, 1.0), 0.9), np.array([0.05, -0.1, 0.0])
    path = save_model(_pinned_dnet(r, t), tmp_path / "dnet", card={"grid_direction": list(OASIS_DIRECTION)})
    d = np.asarray(OASIS_DIRECTION).reshape(3, 3)
    a = Grid((20, 22, 18), (2.0, 2.0, 2.0), (-18.0, -20.0, -16.0), tuple(np.eye(3).ravel()))
    # b covers the same box: its index axes run along +x, -z, -y
    corner = a.index_to_physical(np.zeros(3))
    far = a.index_to_physical(np.asarray(a.shape, float) - 1)
    b_origin = (corner[0], far[1], far[2])  # first voxel at max y and max z
    b = Grid((a.shape[1], a.shape[0], a.shape[2]), (2.0, 2.0, 2.0), b_origin, OASIS_DIRECTION)
    assert np.allclose(b.index_to_physical(np.asarray(b.shape, float) - 1), (far[0], corner[1], corner[2]))

    def scene(grid, centre):
        pts = voxel_grid_points(grid, torch.float64)[0].permute(1, 2, 3, 0).numpy()
        return torch.as_tensor(_blob(pts, centre), dtype=torch.float32)[None, None]

    mats = [dnet_initializer(scene(g, (2.0, -3.0, 1.0)), g, scene(g, (-1.0, 2.0, 0.0)), g, weights=path)
            for g in (a, b)]
    assert np.allclose(mats[0], mats[1], atol=1e-6)
    method = DNetMethod(None, "cpu", weights=path)
    cube = method.grid_for(a)
    assert np.allclose(np.asarray(cube.direction).reshape(3, 3), d)
    assert np.allclose(cube.index_to_physical((np.asarray(cube.shape) - 1) / 2.0),
                       a.index_to_physical((np.asarray(a.shape) - 1) / 2.0))
    seen = [resample_to_grid(scene(g, (2.0, -3.0, 1.0)), g, cube) for g in (a, b)]
    assert float(seen[0].abs().max()) > 0.5
    assert float((seen[0] - seen[1]).abs().max()) < 1e-3
    # an identity-direction cube shows the same scene mirrored: not what the network learned
    mirrored = resample_to_grid(scene(a, (2.0, -3.0, 1.0)), a, dnet_grid(cube.index_to_physical(
        (np.asarray(cube.shape) - 1) / 2.0), cube.shape[0], cube.spacing[0]))
    assert float((mirrored - seen[0]).abs().max()) > 0.3
    with pytest.raises(ValueError, match="grid_direction"):
        from deepreglib.methods.dnet.method import cube_direction
        cube_direction({"grid_direction": [1, 0, 0, 0, 2, 0, 0, 0, 1]})


def test_dnet_training_records_the_orientation_of_its_real_scans(tmp_path, capsys):
    import SimpleITK as sitk
    from deepreglib.core.errors import BadInputError
    from deepreglib.methods.registry import training_recipes
    from deepreglib.train.loop import scan_direction
    RECIPES = training_recipes()
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(2):
        img = sitk.GetImageFromArray(np.random.rand(6, 7, 8).astype(np.float32))
        img.SetDirection(OASIS_DIRECTION)
        sitk.WriteImage(img, str(folder / f"s{i}.nii.gz"))
    assert scan_direction(str(folder)) == list(OASIS_DIRECTION)
    entries = RECIPES["dnet"].card_entries({"real_dir": str(folder)})
    assert entries["grid_direction"] == list(OASIS_DIRECTION)
    assert RECIPES["dnet"].card_entries({"real_dir": None})["grid_direction"] == list(np.eye(3).ravel())
    odd = sitk.GetImageFromArray(np.random.rand(6, 7, 8).astype(np.float32))
    sitk.WriteImage(odd, str(folder / "s2.nii.gz"))  # identity direction
    with pytest.raises(BadInputError, match="different orientations"):
        scan_direction(str(folder))
    # the training command refuses them before it trains or writes anything
    from deepreglib.cli import main as cli_main
    run = tmp_path / "run"
    code = cli_main(["train", "dnet", "--out", str(run), "--steps", "1", "--shape", "16", "16", "16",
                     "--threads", "1", "--real-dir", str(folder)])
    assert code != 0 and not run.exists()
    assert "different orientations" in capsys.readouterr().err


def test_dnet_plus_rigid_polishes_a_coarse_pose_that_rigid_alone_cannot_reach(tmp_path, monkeypatch):
    """A D-Net pinned 20 deg off the truth (a coarse learned pose), refined by the iterative
    rigid registration started from it, recovers a 150 deg rotation within 2 deg; the iterative
    registration alone, from the centre of mass, does not."""
    from deepreglib.methods.dnet.method import cube_direction, grid_centre, longest_side_mm
    grid = Grid((28, 28, 28), (2.0, 2.0, 2.0), (-27.0, -27.0, -27.0), tuple(np.eye(3).ravel()))
    centre = grid_centre(grid)
    m_true = np.eye(4)
    m_true[:3, :3] = rotation_matrix((1.0, 1.0, 1.0), math.radians(150))
    pts = voxel_grid_points(grid, torch.float64)[0].permute(1, 2, 3, 0).numpy()
    inv = np.linalg.inv(m_true)
    fixed = torch.as_tensor(_blob(pts), dtype=torch.float32)[None, None]
    moving = torch.as_tensor(_blob(pts @ inv[:3, :3].T + inv[:3, 3]), dtype=torch.float32)[None, None]
    off = np.eye(4)
    off[:3, :3] = rotation_matrix((1.0, -1.0, 0.0), math.radians(20))
    coarse = m_true @ off  # what the pinned network will say, 20 deg from the truth
    cube = dnet_grid(centre, 16, longest_side_mm(grid) / 16, cube_direction(None))
    p = normalized_to_physical(cube)
    pose = np.linalg.inv(p) @ coarse @ p
    folder = tmp_path / "models"
    save_model(_pinned_dnet(pose[:3, :3], pose[:3, 3]), folder / "dnet")
    monkeypatch.setattr(align, "INITIALIZERS", dict(align.INITIALIZERS))
    register_learned_initializers(folder)
    first = align.initial_transform("dnet", fixed, grid, moving, grid)
    assert rotation_error_deg(first[:3, :3], m_true[:3, :3]) == pytest.approx(20.0, abs=0.5)
    seen = []
    polished = align.initial_transform("dnet+rigid", fixed, grid, moving, grid,
                                       progress=lambda f, msg="": seen.append(f))
    assert rotation_error_deg(polished[:3, :3], m_true[:3, :3]) < 2.0
    assert seen and max(seen) <= 1.0 and seen == sorted(seen)
    alone = align.initial_transform("rigid", fixed, grid, moving, grid)
    assert rotation_error_deg(alone[:3, :3], m_true[:3, :3]) > 30.0


def _tiny_cache(folder, direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), shape=(12, 16, 10)):
    """A training cache of 3 train and 2 val subjects (asymmetric blobs), as ``train-cache``
    lays one out: ``cache.json`` and one ``.npz`` per subject."""
    rng = np.random.default_rng(0)
    subjects = {}
    for split, n in (("train", 3), ("val", 2)):
        (folder / "ixi_muse" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.zeros(shape, np.float32)
            img[2:9, 3:13, 2:7] = 0.6
            img[3:5, 4:7, 5:7] = 1.0  # an off-centre bright part: the pose is observable
            img += 0.05 * rng.random(shape)
            np.savez_compressed(folder / "ixi_muse" / split / f"s{i}.npz",
                                image=np.round(255 * np.clip(img, 0, 1)).astype(np.uint8))
            subjects[f"ixi_muse/{split}/s{i}"] = {"matrix_lps": np.eye(4).tolist()}
    grid = {"shape": list(shape), "spacing": [2.5] * 3, "origin": [0.0] * 3, "direction": list(direction)}
    (folder / "cache.json").write_text(json.dumps({"reference": {"dataset": "ixi_muse", "subject": "s0",
                                                                 "grid": grid}, "subjects": subjects}))
    return folder


def test_dnet_trains_on_the_cache_in_its_cube_direction_and_records_it(tmp_path, capsys):
    """The cache stores LPS-axis-aligned arrays; D-Net's training lays them out in the cube's
    direction (exact axis moves), and its card records that direction for inference. An oblique
    cache is refused before any step, and nothing is written."""
    from deepreglib.cli import main as cli_main
    from deepreglib.core.geometry import reorient_volume
    from deepreglib.methods.dnet.method import CUBE_DIRECTION
    from deepreglib.train.cache import load_cache
    cache = _tiny_cache(tmp_path / "cache")
    subjects, grid = load_cache(cache, "train")
    vols, labels = DNET_RECIPE.prepare_scans([s.image for s in subjects], None, grid.direction, None)
    assert labels is None and vols[0].shape[2:] == (16, 12, 10)  # (k, j, i): anterior, inferior, left
    assert torch.equal(vols[0], reorient_volume(subjects[0].image, grid.direction, CUBE_DIRECTION))
    assert torch.equal(vols[0][0, 0, 15 - 4, 11 - 3, 6], subjects[0].image[0, 0, 3, 4, 6])
    assert DNET_RECIPE.card_entries({"cache": str(cache)})["grid_direction"] == list(CUBE_DIRECTION)
    run, model = tmp_path / "run", tmp_path / "m" / "dnet.pt"
    rc = cli_main(["train", "dnet", "--out", str(run), "--cache", str(cache), "--steps", "2", "--shape", "16",
                   "16", "16", "--real-fraction", "1", "--threads", "1", "--dnet-fixed-pose", "canonical",
                   "--export", str(model)])
    assert rc == 0
    card = json.loads(model.with_suffix(".json").read_text())
    assert card["grid_direction"] == list(CUBE_DIRECTION) and card["training"]["cache"] == str(cache)
    c, s = math.cos(0.4), math.sin(0.4)
    oblique = _tiny_cache(tmp_path / "oblique", direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    rc = cli_main(["train", "dnet", "--out", str(tmp_path / "run2"), "--cache", str(oblique), "--steps", "1",
                   "--shape", "16", "16", "16", "--threads", "1"])
    assert rc != 0 and not (tmp_path / "run2").exists()
    assert "not axis-aligned" in capsys.readouterr().err


def test_pose_validation_scores_the_rotation_error_of_what_the_network_says(tmp_path):
    """A D-Net pinned to the identity makes an error of exactly each pose's own angle; the poses
    are new (full range), the same on every call, and shared out evenly over the val subjects."""
    from deepreglib.methods.dnet.method import CUBE_DIRECTION
    from deepreglib.methods.dnet.training import pose_errors
    from deepreglib.run.validate import validate_pose
    cache = _tiny_cache(tmp_path / "cache")
    path = save_model(_pinned_dnet(np.eye(3), np.zeros(3)), tmp_path / "dnet",
                      card={"grid_direction": list(CUBE_DIRECTION)})
    score = validate_pose(str(path), cache, poses=12)
    assert score["poses"] == 12 and score["subjects"] == 2
    vols = [torch.zeros(1, 1, 8, 8, 8)]
    r = pose_errors(_pinned_dnet(np.eye(3), np.zeros(3)), vols, (16,) * 3, 12)
    assert np.allclose(r["error_deg"], r["true_deg"], atol=1e-3)
    assert score["rotation_median_deg"] == pytest.approx(float(np.median(r["true_deg"])), abs=1e-3)
    assert r["true_deg"].max() > 120 and score["within_10_percent"] == 0.0  # new poses over the full range
    assert validate_pose(str(path), cache, poses=12) == score
    # the network runs as inference runs it: in the card's passes (an identity net adds nothing)
    two = save_model(_pinned_dnet(np.eye(3), np.zeros(3)), tmp_path / "dnet2",
                     card={"grid_direction": list(CUBE_DIRECTION), "inference_passes": 2})
    score2 = validate_pose(str(two), cache, poses=12)
    assert score["passes"] == 1 and score2["passes"] == 2 and score2["views"] == "cache, 2 passes"
    assert score2["rotation_median_deg"] == pytest.approx(score["rotation_median_deg"], abs=1e-3)


def test_dnet_training_views_jitter_the_field_of_view():
    """A field of view of 1.3 shows the scan 1/1.3 as large in the cube, still centred."""
    from deepreglib.methods.dnet.training import whole_volume
    v = torch.zeros(1, 1, 40, 40, 40)
    v[:, :, 2:38, 2:38, 2:38] = 1.0
    extent = {}
    for fov in (1.0, 1.3):
        idx = torch.nonzero(whole_volume(v, (33, 33, 33), fov)[0, 0] > 0.5).double()
        extent[fov] = float((idx.max(0).values - idx.min(0).values)[0])
        assert torch.allclose(idx.mean(0), torch.full((3,), 16.0, dtype=torch.float64), atol=0.6)
    assert extent[1.3] == pytest.approx(extent[1.0] / 1.3, abs=1.5)
    with pytest.raises(ValueError, match="field_of_view"):
        whole_volume(v, (8, 8, 8), 0.9)


def test_pose_recovery_scores_an_aligner_against_the_poses_it_drew(tmp_path, monkeypatch):
    """The engine's rigid registration recovers the known poses (the score's truth is the right
    way round); the identity scores each pose's own angle; SAM-affine's validation runs the
    initializer with the weights it is given on the same poses."""
    from deepreglib.classic.initial import initial_transform
    from deepreglib.run.validate import pose_recovery, validate_sam_affine
    cache = _tiny_cache(tmp_path / "cache", shape=(20, 24, 18))
    rigid = pose_recovery(lambda f, g, m: initial_transform("rigid", f, g, m, g), cache, poses=2,
                          max_angle_deg=20.0, max_translation_mm=5.0)
    assert rigid["rotation_median_deg"] < 2.0 and rigid["centre_error_median_mm"] < 1.5
    still = pose_recovery(lambda f, g, m: np.eye(4), cache, poses=2, max_angle_deg=20.0)
    assert 1.0 < still["rotation_median_deg"] <= 20.0 and still["within_3_percent"] <= 50.0
    sam = validate_sam_affine(None, cache, poses=2)  # the shipped sam.pt runs end to end
    assert sam["poses"] == 2 and 0.0 <= sam["rotation_median_deg"] <= 180.0
    seen = []

    def identity_sam(fixed, fixed_grid, moving, moving_grid, weights=None, **_):
        seen.append(weights)
        return np.eye(4)
    import deepreglib.methods.same.method as same_method
    monkeypatch.setattr(same_method, "same_affine_initializer", identity_sam)
    assert validate_sam_affine("some.pt", cache, poses=2, max_angle_deg=20.0) == still
    assert seen == ["some.pt", "some.pt"]


def test_the_fixed_view_tilts_by_at_most_the_chosen_angle_and_the_target_stays_exact():
    """``fixed_tilt`` turns the canonical fixed view a little; the pair's target still maps the
    fixed view onto the moving one (``moving(R x + t) = fixed(x)``), so the label is unchanged in
    meaning; 0 keeps the scan's own pose exactly."""
    vol = _compact_volume()
    still = rigid_training_pair(vol, torch.Generator().manual_seed(3), random_fixed_pose=False, augment=False)
    assert float((still["fixed"] - vol).abs().max()) < 1e-5
    tilted = rigid_training_pair(vol, torch.Generator().manual_seed(3), random_fixed_pose=False, augment=False,
                                 fixed_tilt=math.radians(15))
    assert float((tilted["fixed"] - vol).abs().max()) > 0.05
    # the fixed view is the volume turned by at most 15 degrees: its best match among turns of
    # the volume about the centre by the drawn axis is within that angle (checked by its moments)
    def axes(v):
        idx = torch.nonzero(v[0, 0] > 0.5).double()
        c = idx - idx.mean(0)
        return torch.linalg.eigh(c.T @ c / len(c)).eigenvectors
    a, b = axes(vol), axes(tilted["fixed"])
    cos = torch.abs((a * b).sum(0))  # each principal axis turned by at most the tilt
    assert float(torch.rad2deg(torch.arccos(cos.clamp(max=1.0))).max()) < 15.0 + 3.0
    # the target maps fixed to moving
    from deepreglib.train.draws import sample_through
    shape = np.asarray(vol.shape[2:], dtype=np.float64)
    h = (shape.max() - 1) / 2.0
    from deepreglib.train.synth import rigid_matrix
    t = rigid_matrix(tilted["rotation"][0].double().numpy(), tilted["translation"][0].double().numpy() * h,
                     (shape - 1) / 2.0)
    back = sample_through(tilted["moving"], t)  # moving(T x) = fixed(x)
    inside = tilted["fixed"] > 0.5
    assert float((back - tilted["fixed"]).abs()[inside].mean()) < 0.1


def test_pose_validation_reads_the_val_brains_natively_when_given_the_data(tmp_path):
    """With the data folder, the val brains are read with their headers and shown as inference
    shows a fixed image; a network pinned to the identity still scores each pose's own angle."""
    import SimpleITK as sitk
    from deepreglib.methods.dnet.method import CUBE_DIRECTION
    from deepreglib.run.validate import validate_pose
    folder = tmp_path / "data" / "ixi_muse"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        arr = np.zeros((20, 24, 18), np.float32)
        arr[4:16, 5:19, 4:14] = 100.0 + 20 * rng.random((12, 14, 10))
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((2.0, 2.0, 2.0))
        img.SetDirection((0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0))  # any header: read physically
        sitk.WriteImage(img, str(folder / f"{name}_t1.nii.gz"))
    (folder / "splits.json").write_text(json.dumps({"train": [], "val": ["a", "b"], "test": []}))
    path = save_model(_pinned_dnet(np.eye(3), np.zeros(3)), tmp_path / "dnet",
                      card={"grid_direction": list(CUBE_DIRECTION)})
    score = validate_pose(str(path), None, poses=6, data=tmp_path / "data")
    assert score["views"] == "native" and score["subjects"] == 2 and score["poses"] == 6
    from deepreglib.methods.dnet.training import pose_errors
    r = pose_errors(_pinned_dnet(np.eye(3), np.zeros(3)), [torch.zeros(1, 1, 8, 8, 8)], (16,) * 3, 6)
    assert score["rotation_median_deg"] == pytest.approx(float(np.median(r["true_deg"])), abs=1e-3)


def test_later_passes_see_the_moving_scan_turned_by_the_pose_so_far_and_compose_the_residual():
    """``pose_in_passes``: pass 2 is shown the moving image resampled through pass 1's pose onto
    the fixed cube, and the result is ``A_1 A_2``; one pass is the plain prediction; a card
    without ``inference_passes`` runs one pass, the recipe's cards say 2."""
    from types import SimpleNamespace
    from deepreglib.methods.dnet.method import inference_passes, pose_in_passes
    from deepreglib.methods.dnet.training import INFERENCE_PASSES, _card_entries
    poses = [(rotation_matrix((0.0, 1.0, 1.0), 0.7), np.array([0.05, 0.0, -0.1])),
             (rotation_matrix((1.0, 0.0, 0.2), -0.15), np.array([-0.02, 0.03, 0.0]))]
    seen = []

    def stub(moving_view, fixed_view):
        r, t = poses[len(seen)]
        seen.append(moving_view.clone())
        rt = torch.as_tensor(r, dtype=torch.float32)[None]
        return SimpleNamespace(rotation=rt, translation=torch.as_tensor(t, dtype=torch.float32)[None],
                               sixd=rotation_to_sixd(rt))
    f_net = dnet_grid((5.0, -3.0, 12.0), 16, 3.0)
    m_net = dnet_grid((-20.0, 8.0, 2.0), 16, 3.0)
    moving_grid = Grid((20, 22, 18), (2.5, 2.2, 2.8), (-45.0, -20.0, -20.0), tuple(np.eye(3).ravel()))
    pts = voxel_grid_points(moving_grid, torch.float64)[0].permute(1, 2, 3, 0).numpy()
    moving = torch.as_tensor(_blob(pts, (-20.0, 8.0, 2.0)), dtype=torch.float32)[None, None]
    fixed_view, moving_view = torch.rand(1, 1, 16, 16, 16), resample_to_grid(moving, moving_grid, m_net)
    a1 = physical_rigid(*poses[0], f_net, m_net)
    one, _ = pose_in_passes(stub, fixed_view, f_net, moving_view, m_net, moving, moving_grid, 1)
    assert np.allclose(one, a1) and len(seen) == 1
    seen.clear()
    two, first = pose_in_passes(stub, fixed_view, f_net, moving_view, m_net, moving, moving_grid, 2)
    assert np.allclose(two, a1 @ physical_rigid(*poses[1], f_net, f_net))
    assert torch.equal(seen[0], moving_view) and torch.allclose(first[0], torch.as_tensor(poses[0][0], dtype=torch.float32))
    assert torch.allclose(seen[1], resample_to_grid(moving, moving_grid, f_net, a1), atol=1e-6)
    assert float(seen[1].abs().sum()) > 1.0
    assert inference_passes({}) == 1 and inference_passes({"inference_passes": 3}) == 3
    assert _card_entries({})["inference_passes"] == INFERENCE_PASSES == 2
