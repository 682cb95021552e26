"""SAME (``same``): affine fits (exact, and robust to 30% outliers), SAM-affine and SAM-coarse on
synthetic pairs with *oracle* embeddings (a positional code of the true corresponding fixed
point, so matching has a known answer), the body mask, correlation channels, the losses, the
method's outputs and geometry, and short training runs of SAM and SAM-VoxelMorph."""
import argparse
import math

import numpy as np
import pytest
import torch

from deepreglib.io import images as io
from deepreglib.core.errors import BadInputError
from deepreglib.core.geometry import Grid, voxel_grid_points
from deepreglib.methods.base import RunContext
from deepreglib.run.initializers import register_learned_initializers
from deepreglib.methods.same.method import SAMEMethod, parse_steps, write_same_outputs
from deepreglib.methods.same.training import SAM as SAM_RECIPE, same_vxm_loss
from deepreglib.methods.weights import save_model
from deepreglib.methods.same.network import PixelInfoNCE, SAMNet, correlation_features
from deepreglib.methods.same.network_voxelmorph import SAMSimilarityLoss, SAMVoxelMorph
from deepreglib.methods.same.matching import (body_mask, fit_affine, lattice_points, match_points, sam_affine, sam_coarse,
                             sparse_to_dense)
from deepreglib.train.synth import rotation_matrix, synth_pair

TINY_SAM = dict(encoder=(4, 8, 8, 8, 8), global_channels=8, local_channels=8)


def _random_affine(rng, scale=0.15, shift=10.0):
    a = np.eye(4)
    a[:3, :3] = rotation_matrix(rng.normal(size=3), 0.4) @ (np.eye(3) + scale * rng.uniform(-1, 1, (3, 3)))
    a[:3, 3] = rng.uniform(-shift, shift, 3)
    return a


def _apply(a, pts):
    return pts @ a[:3, :3].T + a[:3, 3]


# -- fits ---------------------------------------------------------------------------------------------
def test_fits_recover_an_affine_from_exact_correspondences():
    rng = np.random.default_rng(0)
    a = _random_affine(rng)
    src = rng.uniform(-50, 50, (60, 3))
    for method in ("lstsq", "ransac", "irls"):
        fit = fit_affine(src, _apply(a, src), method)
        assert np.allclose(fit.matrix, a, atol=1e-8), method
        assert fit.inliers.all() and fit.rms < 1e-8
    with pytest.raises(BadInputError, match="at least 4"):
        fit_affine(src[:3], src[:3])
    with pytest.raises(BadInputError, match="coplanar"):
        flat = src.copy()
        flat[:, 2] = 0
        fit_affine(flat, flat)
    with pytest.raises(ValueError):
        fit_affine(src, src, "median")


def test_robust_fits_survive_30_percent_outliers_where_least_squares_does_not():
    rng = np.random.default_rng(1)
    a = _random_affine(rng)
    src = rng.uniform(-50, 50, (100, 3))
    dst = _apply(a, src) + rng.normal(0, 0.3, (100, 3))  # matching noise
    bad = rng.choice(100, 30, replace=False)
    dst[bad] = rng.uniform(-60, 60, (30, 3))  # 30% wrong matches anywhere in the volume
    corners = np.array([[x, y, z] for x in (-50, 50) for y in (-50, 50) for z in (-50, 50)], float)

    def corner_error(m):
        return float(np.linalg.norm(_apply(m, corners) - _apply(a, corners), axis=1).mean())

    assert corner_error(fit_affine(src, dst, "lstsq").matrix) > 10.0
    for method in ("ransac", "irls"):
        fit = fit_affine(src, dst, method, inlier_threshold=2.0)
        assert corner_error(fit.matrix) < 1.0, method
        assert not fit.inliers[bad].any() and fit.inliers.sum() >= 65, method


# -- oracle embeddings ------------------------------------------------------------------------------
_FREQ = np.random.default_rng(7).normal(0.0, 1.0 / 12.0, (48, 3))  # 1/mm: a ~12 mm wide similarity peak


def _code(points_mm):
    """Unit positional code ``(C, ...)``: ``<code(p), code(q)> = mean cos(w (p - q))``, 1 iff p = q."""
    phase = np.einsum("kc,...c->k...", _FREQ, points_mm)
    return np.concatenate([np.cos(phase), np.sin(phase)], 0) / math.sqrt(len(_FREQ))


def _feature_points(grid, fshape):
    """LPS positions of a feature grid covering ``grid`` (ALIGN_CORNERS)."""
    axes = [np.linspace(0, n - 1, f) for n, f in zip(grid.shape, fshape)]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    return grid.index_to_physical(idx)


def _oracle(grid, fshape, to_fixed=None):
    """Embedding of an image on ``grid`` whose voxel at p shows fixed anatomy ``to_fixed(p)``."""
    p = _feature_points(grid, fshape)
    if to_fixed is not None:
        p = to_fixed(p)
    return torch.as_tensor(_code(p), dtype=torch.float32)[None]


def _ball_image(grid, centre, radius=36.0):
    pts = voxel_grid_points(grid, torch.float64)[0].permute(1, 2, 3, 0).numpy()
    inside = np.linalg.norm(pts - centre, axis=-1) < radius
    return torch.as_tensor(inside * 0.8 + 0.05, dtype=torch.float32)[None, None]


def test_sam_affine_recovers_a_known_affine_between_different_grids():
    rng = np.random.default_rng(2)
    fixed_grid = Grid((48, 48, 48), (2.0, 2.0, 2.0), (-47.0, -47.0, -47.0),
                      tuple(rotation_matrix((1, 2, 3), 0.3).ravel()))
    moving_grid = Grid((56, 56, 56), (2.2, 2.2, 2.2), (-40.0, -70.0, -55.0), tuple(np.eye(3).ravel()))
    a = _random_affine(rng, scale=0.1, shift=6.0)  # fixed point -> moving point (LPS)
    centre = fixed_grid.index_to_physical((np.asarray(fixed_grid.shape) - 1) / 2)
    a[:3, 3] += moving_grid.index_to_physical((np.asarray(moving_grid.shape) - 1) / 2) - _apply(a, centre)
    inv = np.linalg.inv(a)
    e_f = _oracle(fixed_grid, (12, 12, 12))
    e_m = _oracle(moving_grid, (14, 14, 14), lambda q: _apply(inv, q))
    points = lattice_points(body_mask(_ball_image(fixed_grid, centre)), 8)
    assert 20 <= len(points) < 216  # the mask keeps the ball's lattice points only (6^3 in all)
    res = sam_affine(e_f, fixed_grid, e_m, moving_grid, points)
    corners = fixed_grid.corners()
    err = np.linalg.norm(_apply(res.matrix, corners) - _apply(a, corners), axis=1)
    assert err.mean() < 1.0, err  # mm, with 2 mm voxels and 8 mm feature voxels
    assert np.allclose(_apply(a, res.fixed_points_lps), res.moving_points_lps, atol=2.0)
    assert res.info["matches_kept"] == len(points) and (res.similarity >= 0.7).all()
    wrong = sam_affine(e_f, fixed_grid, _oracle(moving_grid, (14, 14, 14)), moving_grid, points)
    assert np.linalg.norm(_apply(wrong.matrix, corners) - _apply(a, corners), axis=1).mean() > 5.0


def test_sam_coarse_recovers_a_smooth_displacement():
    grid = Grid.identity((32, 32, 32), (2.0, 2.0, 2.0))
    shift = np.array([3.0, -2.0, 1.5])  # voxels (k, j, i): moving_a(x + shift) = fixed(x)
    shift_mm = shift[::-1] * 2.0
    fs = (8, 8, 8)
    e_f = _oracle(grid, fs)
    e_m = _oracle(grid, fs, lambda q: q - shift_mm)
    points = lattice_points(torch.ones(1, 1, 32, 32, 32, dtype=torch.bool), 4)
    u, matches = sam_coarse(e_f, e_m, grid.shape, points, radius=16)
    assert u.shape == (1, 3, 32, 32, 32) and len(matches.fixed) > 100
    err = (u - torch.as_tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1)).abs()
    assert float(err[..., 4:-4, 4:-4, 4:-4].mean()) < 0.5
    # a search radius smaller than the displacement cannot find it: points on a moving feature
    # voxel match only themselves, points with no feature voxel in reach stay unmatched
    on_voxels = torch.tensor([[0.0, 0.0, 0.0], [31 / 7, 62 / 7, 31.0]])
    near = match_points(e_f, grid.shape, e_m, grid.shape, torch.cat([on_voxels, torch.tensor([[2.0, 2, 2]])]),
                        threshold=-1.0, radius=1.0)
    assert torch.allclose(near.moving[:2], near.fixed[:2], atol=1e-9) and near.kept[:2].all()
    assert torch.isinf(near.similarity[2]) and not near.kept[2] and torch.equal(near.moving[2], near.fixed[2])


def test_sparse_to_dense_interpolates_and_falls_back_to_the_mean():
    pts = torch.tensor([[4.0, 4, 4], [4, 4, 12], [12, 12, 4]])
    const = torch.tensor([[1.0, -2.0, 0.5]]).expand(3, 3)
    u = sparse_to_dense(pts, const, (40, 16, 16), sigma=3)
    assert torch.allclose(u, const[0].view(1, 3, 1, 1, 1).expand_as(u), atol=1e-5)
    d = torch.tensor([[0.0, 0, 0], [0, 0, 4], [0, 0, 8]])
    u = sparse_to_dense(pts, d, (40, 16, 16), sigma=2)
    assert float(u[0, 2, 4, 4, 4]) == pytest.approx(0.0, abs=0.1)
    assert float(u[0, 2, 4, 4, 12]) == pytest.approx(4.0, abs=0.1)
    assert float(u[0, 2, 39, 8, 8]) == pytest.approx(4.0, abs=0.05)  # far from all: the mean


def test_body_mask_fills_holes_and_drops_specks():
    img = torch.zeros(1, 1, 24, 24, 24)
    img[0, 0, 4:20, 4:20, 4:20] = 0.8
    img[0, 0, 10:14, 10:14, 10:14] = 0.0  # a dark hole inside the body
    img[0, 0, 1, 1, 22] = 1.0  # a bright speck outside
    m = body_mask(img)
    assert m.dtype == torch.bool and m[0, 0, 12, 12, 12] and not m[0, 0, 1, 1, 22]
    assert 0.9 * 16 ** 3 < int(m.sum()) <= 16 ** 3  # the opening may round the cube's edges
    assert not m[0, 0, :3].any() and not m[0, 0, 21:].any()
    pts = lattice_points(m, 6)  # lattice 3, 9, 15, 21 per axis; 9 and 15 are inside
    assert pts.tolist() == [[k, j, i] for k in (9.0, 15.0) for j in (9.0, 15.0) for i in (9.0, 15.0)]
    assert len(lattice_points(torch.zeros_like(m), 6)) == 64  # no body: the whole lattice


# -- features and losses ------------------------------------------------------------------------------
def test_correlation_channels_peak_at_the_true_shift():
    torch.manual_seed(0)
    e_f = torch.nn.functional.normalize(torch.randn(1, 16, 10, 10, 10), dim=1)
    e_m = torch.roll(e_f, shifts=2, dims=2)  # e_m(x + (2, 0, 0)) = e_f(x)
    corr = correlation_features(e_f, e_m)
    assert corr.shape == (1, 27, 10, 10, 10)
    channel = (2 * 3 + 1) * 3 + 1  # offsets (+2, 0, 0), k slowest
    assert torch.allclose(corr[0, channel, :8], torch.ones(8, 10, 10), atol=1e-5)
    assert float(corr[0, 13, :8].abs().mean()) < 0.5  # zero shift does not match
    assert float(corr[0, 26, -2:].abs().max()) == 0.0  # shifted outside the grid


def test_sam_similarity_loss_sign_and_range():
    torch.manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(1, 8, 8, 8, 8), dim=1)
    zero = torch.zeros(1, 3, 32, 32, 32)
    loss = SAMSimilarityLoss()
    assert float(loss(e, e, zero)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(e, -e, zero)) == pytest.approx(2.0, abs=1e-6)
    shifted = torch.roll(e, shifts=1, dims=4)  # moving(x + 1 feature voxel along i) = fixed(x)
    u = torch.zeros(1, 3, 32, 32, 32)
    u[:, 2] = 31 / 7  # one feature voxel in image voxels (ALIGN_CORNERS)
    assert float(loss(e, shifted, u)) < 0.3 < float(loss(e, shifted, zero))


def test_pixel_info_nce_known_values():
    g = torch.Generator().manual_seed(0)
    const = torch.nn.functional.normalize(torch.ones(1, 4, 6, 6, 6), dim=1)
    pts = torch.tensor([[1.0, 2, 3], [4, 4, 1]])
    crit = PixelInfoNCE(num_hard=5, num_diverse=7, min_distance=0.0)
    assert float(crit(const, const, pts, pts, g)) == pytest.approx(math.log(13), abs=1e-5)  # no information
    code = torch.as_tensor(_code(np.stack(np.meshgrid(*[np.arange(6.0) * 8] * 3, indexing="ij"), -1)),
                           dtype=torch.float32)[None]
    crit = PixelInfoNCE(temperature=0.1, num_hard=5, num_diverse=7, min_distance=1.5)
    assert float(crit(code, code, pts, pts, g)) < 0.5 * math.log(13)


# -- the method ------------------------------------------------------------------------------------------
class _QueuedSAM(torch.nn.Module):
    """Stand-in SAM returning given embeddings in call order (fixed, moving, affinely moved)."""

    divisor = 16

    def __init__(self, embeddings):
        super().__init__()
        self.queue = list(embeddings)

    def embed(self, image, shape):
        e = self.queue.pop(0)
        assert tuple(e.shape[2:]) == tuple(shape)
        return e


def _same_file(tmp_path, sam_only=False):
    torch.manual_seed(0)
    model = SAMNet(**TINY_SAM) if sam_only else SAMVoxelMorph(sam=TINY_SAM, encoder=(8, 8, 8, 8),
                                                              decoder=(8, 8, 8, 8, 8, 8))
    return save_model(model, tmp_path / ("sam" if sam_only else "same"))


def test_same_method_affine_step_recovers_the_affine_on_the_network_grid(tmp_path):
    grid = Grid((48, 48, 48), (2.0, 2.0, 2.0), (-47.0, -47.0, -47.0), tuple(np.eye(3).ravel()))
    a = np.eye(4)
    a[:3, :3] = rotation_matrix((0, 0, 1), 0.2) * 1.05
    a[:3, 3] = (3.0, -4.0, 2.0)
    inv = np.linalg.inv(a)
    fixed = _ball_image(grid, np.zeros(3))
    method = SAMEMethod(None, "cpu", weights=_same_file(tmp_path), steps="affine")
    method.model.sam = _QueuedSAM([_oracle(grid, (12,) * 3), _oracle(grid, (12,) * 3, lambda q: _apply(inv, q))])
    res = method.run(fixed, torch.rand_like(fixed), grid, RunContext())
    corners = grid.corners()
    assert np.linalg.norm(_apply(res.matrix, corners) - _apply(a, corners), axis=1).mean() < 1.0
    assert res.displacement is None and res.velocity is None and res.coarse_displacement is None
    f_pts, m_pts, sim = res.point_pairs["affine"]
    assert f_pts.shape == m_pts.shape and f_pts.shape[1] == 3 and len(sim) == len(f_pts)
    assert np.allclose(_apply(a, f_pts), m_pts, atol=2.0)
    assert res.volumes["embedding_similarity"].shape == (1, 1, 48, 48, 48)
    sim_map = res.volumes["embedding_similarity"][0, 0]
    peak = np.unravel_index(int(sim_map.argmax()), sim_map.shape)  # centre query -> A(centre) in moving
    assert np.linalg.norm(grid.index_to_physical(np.asarray(peak, float)) - _apply(a, np.zeros(3))) < 5.0


def test_same_method_all_steps_output_geometry_and_files(tmp_path):
    grid = Grid((32, 32, 32), (2.0, 2.0, 2.0), (-31.0, -31.0, -31.0), tuple(np.eye(3).ravel()))
    p = synth_pair((32, 32, 32), seed=1)
    path = _same_file(tmp_path)
    method = SAMEMethod(None, "cpu", weights=path, threshold=-1.0, fit="ransac")
    res = method.run(p.fixed, p.moving, grid, RunContext())
    assert res.matrix.shape == (4, 4) and np.isfinite(res.matrix).all()
    assert res.displacement.shape == (1, 3, 32, 32, 32) and res.velocity is None  # composed field
    assert res.coarse_displacement.shape == (1, 3, 32, 32, 32)
    assert set(res.point_pairs) == {"affine", "coarse"} and res.info["steps"] == ["affine", "coarse", "voxelmorph"]
    fixed_grid = Grid((30, 34, 28), (2.1, 1.9, 2.2), (-30.0, -32.0, -30.0), tuple(np.eye(3).ravel()))
    init = np.eye(4)
    init[:3, 3] = (5.0, 0.0, -3.0)
    files = write_same_outputs(res, tmp_path / "out", grid, fixed_grid, init)
    names, pts = io.read_landmarks(files["affine_moving_points"])
    f_pts, m_pts, _ = res.point_pairs["affine"]
    assert np.allclose(pts, m_pts + init[:3, 3], atol=1e-6) and names[0] == "affine-1"
    assert np.allclose(io.read_landmarks(files["affine_fixed_points"])[1], f_pts, atol=1e-6)
    u, g = io.read_displacement_field(files["coarse_displacement"])
    assert g.shape == fixed_grid.shape and np.allclose(g.spacing, fixed_grid.spacing)
    # the affine alone, with the init in front, as an ITK linear transform (fixed -> moving)
    assert np.allclose(io.read_linear_transform(files["affine"]), init @ res.matrix, atol=1e-6)
    entries = res.write_files(tmp_path / "hook")  # what the pipeline calls
    assert {e["name"] for e in entries} == {"same_affine_fixed_points", "same_affine_moving_points",
                                            "same_coarse_fixed_points", "same_coarse_moving_points",
                                            "same_coarse_displacement", "same_affine"}
    assert {e["kind"] for e in entries if e["name"] == "same_affine"} == {"linear_transform"}
    assert all((tmp_path / "hook" / e["path"]).is_file() for e in entries)
    vxm_only = SAMEMethod(None, "cpu", weights=path, steps="voxelmorph").run(p.fixed, p.moving, grid, RunContext())
    assert vxm_only.matrix is None and vxm_only.velocity is not None
    assert float(vxm_only.displacement.abs().max()) < 0.05  # untrained: the identity


def test_steps_option_and_sam_only_weights(tmp_path):
    assert parse_steps("all") == ("affine", "coarse", "voxelmorph")
    assert parse_steps("coarse, affine") == ("affine", "coarse")
    assert parse_steps(["voxelmorph"]) == ("voxelmorph",)
    for bad in ("", "affine,warp"):
        with pytest.raises(BadInputError):
            parse_steps(bad)
    sam_path = _same_file(tmp_path, sam_only=True)
    with pytest.raises(BadInputError, match="SAM only"):
        SAMEMethod(None, "cpu", weights=sam_path)
    SAMEMethod(None, "cpu", weights=sam_path, steps="affine,coarse")


def test_same_affine_initializer_is_registered_only_with_weights(tmp_path, monkeypatch):
    from deepreglib.classic import initial as align
    monkeypatch.setattr(align, "INITIALIZERS", dict(align.INITIALIZERS))
    assert register_learned_initializers(tmp_path) == []
    _same_file(tmp_path, sam_only=True)
    assert register_learned_initializers(tmp_path) == ["same-affine", "same-affine+affine"]
    grid_f = Grid((32, 32, 32), (2.0, 2.0, 2.0), (-31.0, -31.0, -31.0), tuple(np.eye(3).ravel()))
    grid_m = Grid((28, 30, 32), (2.2, 2.0, 1.8), (-20.0, -35.0, -25.0), tuple(np.eye(3).ravel()))
    p = synth_pair((32, 32, 32), seed=2)
    m = align.initial_transform("same-affine", p.fixed, grid_f, p.moving[..., :28, :30, :32], grid_m,
                                threshold=-1.0, fit="ransac")
    assert m.shape == (4, 4) and np.isfinite(m).all()


# -- training -------------------------------------------------------------------------------------------
def _short_run(model, loss_fn, steps, lr):
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        total, terms = loss_fn()
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    return losses, terms


def test_short_sam_training_lowers_the_loss():
    torch.manual_seed(0)
    model = SAMNet(**TINY_SAM)
    batch = {"fixed": synth_pair((32, 32, 32), seed=3).fixed}
    losses, terms = _short_run(model, lambda: SAM_RECIPE.loss(model, batch, argparse.Namespace(seed=0)), 20, 3e-3)
    assert set(terms) == {"global_nce", "local_nce"}
    assert np.mean(losses[-3:]) < 0.85 * losses[0]  # about 0.77 after 20 steps


def test_short_sam_voxelmorph_training_lowers_the_loss_and_keeps_sam_frozen():
    torch.manual_seed(0)
    model = SAMVoxelMorph(sam=TINY_SAM, encoder=(8, 8, 8, 8), decoder=(8, 8, 8, 8, 8, 8)).train()
    frozen = {k: v.clone() for k, v in model.sam.state_dict().items()}
    p = synth_pair((32, 32, 32), seed=4, max_std=2.0)
    batch = {"fixed": p.fixed, "moving": p.moving}
    losses, terms = _short_run(model, lambda: same_vxm_loss(model, batch), 15, 3e-3)
    assert set(terms) == {"ncc_loss", "sam_loss", "grad"}
    assert np.mean(losses[-3:]) < losses[0] - 0.02  # 0.61 -> about 0.56
    assert all(torch.equal(frozen[k], v) for k, v in model.sam.state_dict().items())


def test_same_affine_sees_a_moving_file_in_another_voxel_order_unmirrored(tmp_path):
    """The same moving scene stored with the identity direction and with a reflected one (axes
    +x, -z, -y, as the OASIS files) reaches SAM as the same tensor, so SAM-affine returns the
    same matrix; each view faces the fixed image's direction."""
    from deepreglib.core.geometry import voxel_grid_points
    from deepreglib.methods.same.method import embed_on_own_grids, sam_of, load_same_model, same_affine_initializer
    path = _same_file(tmp_path, sam_only=True)
    sam = sam_of(load_same_model(path, "cpu")[0])

    def scene(grid):
        p = voxel_grid_points(grid, torch.float64)[0].permute(1, 2, 3, 0).numpy()
        v = np.exp(-(((p - (3.0, -2.0, 1.0)) / np.array([14.0, 9.0, 7.0])) ** 2).sum(-1))
        v += 0.6 * np.exp(-(((p - (9.0, 4.0, -3.0)) / 5.0) ** 2).sum(-1))
        return torch.as_tensor(v, dtype=torch.float32)[None, None]

    fixed_grid = Grid((24, 26, 28), (2.0, 2.0, 2.0), (-27.0, -25.0, -23.0), tuple(np.eye(3).ravel()))
    a = Grid((22, 24, 20), (2.0, 2.0, 2.0), (-19.0, -23.0, -21.0), tuple(np.eye(3).ravel()))
    lo, hi = a.index_to_physical(np.zeros(3)), a.index_to_physical(np.asarray(a.shape, float) - 1)
    b = Grid((a.shape[1], a.shape[0], a.shape[2]), (2.0, 2.0, 2.0), (lo[0], hi[1], hi[2]),
             (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0))
    assert np.allclose(b.index_to_physical(np.asarray(b.shape, float) - 1), (hi[0], lo[1], lo[2]))
    fixed = scene(fixed_grid)
    views = [embed_on_own_grids(sam, fixed, fixed_grid, scene(g), g, 112, "cpu") for g in (a, b)]
    assert views[0][3] == views[1][3]  # the same moving grid, facing the fixed direction
    assert np.allclose(np.asarray(views[1][3].direction), np.eye(3).ravel())
    assert float((views[0][4] - views[1][4]).abs().max()) < 1e-4  # the same embeddings
    mats = [same_affine_initializer(fixed, fixed_grid, scene(g), g, weights=path, threshold=-1.0) for g in (a, b)]
    # (a random tiny SAM has near-ties in its matching, so equal inputs up to float rounding give
    # matrices equal to ~1e-3; a mirrored view gives a different problem altogether)
    assert np.allclose(mats[0][:3, :3], mats[1][:3, :3], atol=5e-3)
    assert np.allclose(mats[0][:3, 3], mats[1][:3, 3], atol=0.1)
    own = b.centered_like(views[1][3].shape, views[1][3].spacing)  # b's own direction: mirrored
    from deepreglib.core.resample import resample_to_grid
    seen_own = resample_to_grid(scene(b), b, own)
    seen_facing = resample_to_grid(scene(b), b, views[1][3])
    assert float((seen_own - seen_facing).abs().max()) > 0.2


def test_sam_training_views_turn_by_at_most_the_chosen_angle():
    import math
    from deepreglib.methods.same.training import random_view_matrix
    for angle_deg in (0.0, 25.0):
        for seed in range(8):
            m = random_view_matrix((32, 32, 32), torch.Generator().manual_seed(seed), math.radians(angle_deg))
            u, _, vt = np.linalg.svd(m[:3, :3])  # the rotation of the polar decomposition
            turn = math.degrees(math.acos(np.clip((np.trace(u @ vt) - 1) / 2, -1, 1)))
            assert turn <= angle_deg + 1e-6


def test_same_vxm_from_a_model_file_trains_on_the_current_sam_with_the_label_term(tmp_path):
    """``deepreg train same_vxm --init-from OLD.pt``: the frozen SAM inside the model file is
    replaced by ``--same-vxm-sam-model`` (the campaign's newer embeddings), the U-Net's weights
    start from the file, the SAM stays frozen while training, and ``--label-weight`` adds the
    label Dice term on pairs with label maps (the synthetic ones here)."""
    import csv
    from deepreglib.cli import main as cli_main
    from deepreglib.methods.weights import load_model
    torch.manual_seed(0)
    old = save_model(SAMVoxelMorph(sam=TINY_SAM), tmp_path / "same_old")
    torch.manual_seed(1)
    new_sam = SAMNet(**TINY_SAM)
    sam_path = save_model(new_sam, tmp_path / "sam_new")
    old_model, _ = load_model(old)
    assert any(not torch.equal(old_model.sam.state_dict()[k], v) for k, v in new_sam.state_dict().items())
    args = ["train", "same_vxm", "--out", str(tmp_path / "run"), "--shape", "32", "32", "32", "--threads", "1",
            "--synth-bank", "2", "--log-every", "100", "--init-from", str(old), "--same-vxm-sam-model", str(sam_path),
            "--label-weight", "1.0", "--steps", str(int(json_iterations(old)) + 2), "--export", str(tmp_path / "out")]
    assert cli_main(args) == 0
    trained, card = load_model(tmp_path / "out.pt")
    for k, v in new_sam.state_dict().items():  # the new SAM, unchanged by training
        assert torch.equal(trained.sam.state_dict()[k], v), k
    unet_old = {k: v for k, v in old_model.state_dict().items() if not k.startswith("sam.")}
    assert any(not torch.equal(trained.state_dict()[k], v) for k, v in unet_old.items())  # the U-Net trained
    with open(tmp_path / "run" / "loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["dice_loss"]) > 0 for r in rows)


def json_iterations(model_file):
    import json
    return json.loads(model_file.with_suffix(".json").read_text()).get("iterations", 0)


def test_a_sam_voxelmorph_started_from_a_voxelmorph_gives_its_field_and_learns_the_correlation(tmp_path):
    """``--same-vxm-unet-from``: the U-Net and flow head are the voxelmorph's, the correlation's
    input weights zero, so the field is the voxelmorph's to float error; training then moves
    those weights (the correlation reaches the loss); a network of other channels is refused."""
    from deepreglib.core.errors import BadInputError
    from deepreglib.methods.same.training import unet_from_voxelmorph
    from deepreglib.methods.voxelmorph.network import VoxelMorph
    torch.manual_seed(0)
    vxm = VoxelMorph()
    with torch.no_grad():
        vxm.flow.weight.normal_(0.0, 0.05)  # a field worth comparing
    path = save_model(vxm, tmp_path / "vxm")
    model = SAMVoxelMorph(sam=TINY_SAM)
    unet_from_voxelmorph(model, path)
    p = synth_pair((32, 32, 32), seed=4, max_std=2.0)
    with torch.no_grad():
        ours, theirs = model(p.moving, p.fixed).displacement, vxm.eval()(p.moving, p.fixed).displacement
    assert float(theirs.abs().max()) > 0.05 and float((ours - theirs).abs().max()) < 1e-5
    injected = model.unet.down[2].conv.weight
    assert float(injected[:, 32:].abs().max()) == 0.0
    total, _ = same_vxm_loss(model, {"fixed": p.fixed, "moving": p.moving})
    total.backward()
    assert float(injected.grad[:, 32:].abs().sum()) > 0
    with pytest.raises(BadInputError, match="same encoder and decoder|same channels"):
        unet_from_voxelmorph(SAMVoxelMorph(sam=TINY_SAM, encoder=(8, 8, 8, 8), decoder=(8, 8, 8, 8, 8, 8)), path)


def test_validation_passes_method_options_so_same_can_be_scored_on_its_trained_step(small_cache, tmp_path):
    """``validate(..., options=)`` reaches the method: SAME validated on SAM-VoxelMorph alone
    gives a field; its affine step alone gives none, which validation refuses."""
    from deepreglib.run.validate import validate
    path = _same_file(tmp_path)
    score = validate("same", str(path), small_cache, pairs=2, options={"steps": "voxelmorph"})
    assert score["pairs"] == 2 and 0.0 < score["dice"] <= 1.0
    with pytest.raises(ValueError, match="no displacement"):
        validate("same", str(path), small_cache, pairs=2, options={"steps": "affine"})
