"""Synthetic data generator: determinism, ranges, ground-truth consistency, rigid poses."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from deepreglib.train import synth
from deepreglib.core.fields import affine_to_field, compose, integrate_velocity
from deepreglib.core.jacobian import jacobian_determinant
from deepreglib.core.warp import identity_grid, warp

SHAPE = (24, 28, 24)
CLEAN = dict(texture_std=0.0, bias_std=0.0, blur_max=0.0, noise_std=0.0, gamma_std=0.0)
TENSORS = ("fixed", "moving", "fixed_labels", "moving_labels", "displacement", "velocity")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ncc(a, b, mask=None):
    a, b = a.double().flatten(), b.double().flatten()
    if mask is not None:
        a, b = a[mask.flatten()], b[mask.flatten()]
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# -- smooth noise ----------------------------------------------------------------------------------
def test_smooth_noise_shape_determinism_and_statistics():
    n = synth.smooth_noise((32, 32, 32), gen(1), 8, channels=4)
    assert n.shape == (1, 4, 32, 32, 32) and n.dtype == torch.float32
    assert torch.equal(n, synth.smooth_noise((32, 32, 32), gen(1), 8, channels=4))
    assert not torch.equal(n, synth.smooth_noise((32, 32, 32), gen(2), 8, channels=4))
    # unit variance on average (4 channels x ~8^3 independent nodes: +-20 % is many sigmas)
    assert 0.8 < float(n.std()) < 1.2
    assert abs(float(n.mean())) < 0.15

    def neighbour_corr(x):
        return ncc(x[..., 1:], x[..., :-1])
    # nodes every 8 voxels: neighbours nearly equal; nodes every voxel: almost independent
    assert neighbour_corr(n) > 0.95
    assert neighbour_corr(synth.smooth_noise((32, 32, 32), gen(1), 1)) < 0.75
    # the cubic B-spline is the blurred variant: smoother than trilinear at the same scale
    cubic = synth.smooth_noise((32, 32, 32), gen(1), 4, order=3)
    linear = synth.smooth_noise((32, 32, 32), gen(1), 4, order=1)
    assert neighbour_corr(cubic) > neighbour_corr(linear)


@pytest.mark.parametrize("kwargs", [dict(scale=0), dict(scale=(4, 4)), dict(order=2),
                                    dict(channels=0), dict(shape=(8, 8))])
def test_smooth_noise_rejects_bad_input(kwargs):
    args = dict(shape=(8, 8, 8), generator=gen(), scale=4)
    args.update(kwargs)
    with pytest.raises(ValueError):
        synth.smooth_noise(**args)


# -- label maps and images -------------------------------------------------------------------------
def test_random_label_map_has_background_head_and_many_labels():
    for seed in range(3):
        lab = synth.random_label_map((32, 32, 32), gen(seed), num_labels=16)
        assert lab.shape == (1, 1, 32, 32, 32) and lab.dtype == torch.long
        assert int(lab.min()) == 0 and int(lab.max()) <= 15
        assert len(torch.unique(lab)) >= 10
        # outside the ellipsoidal head (radii <= 0.9 of the half-extent) is background
        corners = lab[0, 0, [0, 0, 0, 0, -1, -1, -1, -1], [0, 0, -1, -1] * 2, [0, -1] * 4]
        assert torch.all(corners == 0)
        assert int(lab[0, 0, 16, 16, 16]) > 0
        background = float((lab == 0).float().mean())
        # ellipsoid volume fraction for radii 0.6..0.9: pi/6 * r^3 = 0.11..0.38
        assert 0.5 < background < 0.92
    assert torch.equal(synth.random_label_map(SHAPE, gen(5)), synth.random_label_map(SHAPE, gen(5)))
    assert not torch.equal(synth.random_label_map(SHAPE, gen(5)),
                           synth.random_label_map(SHAPE, gen(6)))
    with pytest.raises(ValueError):
        synth.random_label_map(SHAPE, gen(), num_labels=1)


def test_labels_to_image_range_and_contrast_reuse():
    lab = synth.random_label_map(SHAPE, gen(0), num_labels=8)
    img, means = synth.labels_to_image(lab, gen(1), num_labels=8)
    assert img.shape == lab.shape and img.dtype == torch.float32
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    assert means.shape == (8,) and 0.0 <= float(means[0]) <= 0.05
    assert float(means[1:].min()) >= 0.0 and float(means[1:].max()) <= 1.0

    # without artefacts the image is exactly the min-max normalised label means
    clean, means = synth.labels_to_image(lab, gen(2), num_labels=8, **CLEAN)
    expected = means[lab]
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert torch.allclose(clean, expected, atol=1e-6)

    again, means2 = synth.labels_to_image(lab, gen(3), same_as=(clean, means), **CLEAN)
    assert torch.equal(means2, means) and torch.allclose(again, clean, atol=1e-6)
    _, means3 = synth.labels_to_image(lab, gen(3), intensities=means)
    assert torch.equal(means3, means)
    _, other = synth.labels_to_image(lab, gen(3), num_labels=8)
    assert not torch.equal(other, means)


def test_labels_to_image_rejects_bad_input():
    lab = synth.random_label_map(SHAPE, gen(0), num_labels=8)
    with pytest.raises(ValueError):
        synth.labels_to_image(lab.float(), gen())
    with pytest.raises(ValueError):
        synth.labels_to_image(lab[0], gen())
    with pytest.raises(ValueError):
        synth.labels_to_image(lab, gen(), num_labels=4)  # labels up to 7
    with pytest.raises(ValueError):
        synth.labels_to_image(lab, gen(), intensities=torch.zeros(3))
    with pytest.raises(ValueError):
        synth.labels_to_image(lab, gen(), same_as=(lab, torch.zeros(8)), intensities=torch.zeros(8))


# -- deformations ----------------------------------------------------------------------------------
def test_random_velocity_std_and_displacement_shapes():
    v = synth.random_velocity((64, 64, 64), gen(0), std=2.0)
    assert v.shape == (1, 3, 64, 64, 64)
    assert 1.6 < float(v.std()) < 2.4  # 3 x ~8^3 cubic-spline nodes: +-20 % is many sigmas
    stds = [float(synth.random_velocity((16, 16, 16), gen(s), max_std=1.0).std())
            for s in range(20)]
    assert max(stds) < 1.5 and min(stds) < 0.5  # std drawn uniformly in [0, max_std]
    u, v = synth.random_displacement(SHAPE, gen(0))
    assert u.shape == v.shape == (1, 3) + SHAPE


def test_random_displacement_is_diffeomorphic_at_the_strongest_default():
    for seed in range(8):
        u, _ = synth.random_displacement((32, 32, 32), gen(seed), std=3.0)
        assert float(u.abs().max()) > 1.0  # a real deformation, not the identity
        assert float(jacobian_determinant(u).min()) > 0.0


def test_displacement_is_the_integrated_velocity():
    u, v = synth.random_displacement((32, 32, 32), gen(4), std=3.0, full_resolution=True)
    assert torch.equal(u, integrate_velocity(v))
    # half-resolution integration: stated bound mean 0.1, max 0.6 voxel at std 3
    u, v = synth.random_displacement((32, 32, 32), gen(4), std=3.0)
    err = (u - integrate_velocity(v)).abs()
    assert float(err.mean()) < 0.1 and float(err.max()) < 0.6


# -- rigid poses -----------------------------------------------------------------------------------
def test_rotation_matrix_known_answer():
    r = synth.rotation_matrix([2.0, 0.0, 0.0], math.pi / 2)  # about the k axis, any length
    assert np.allclose(r @ [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], atol=1e-12)
    assert np.allclose(r @ [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], atol=1e-12)
    assert r.dtype == np.float64
    with pytest.raises(ValueError):
        synth.rotation_matrix([0.0, 0.0, 0.0], 1.0)


def test_rigid_matrix_rotates_about_the_centre():
    r = synth.rotation_matrix([0.3, -1.0, 0.5], 1.1)
    c, t = np.array([5.0, 6.0, 7.0]), np.array([1.0, -2.0, 0.5])
    m = synth.rigid_matrix(r, t, c)
    assert m.shape == (4, 4) and np.allclose(m[3], [0, 0, 0, 1])
    assert np.allclose(m @ np.append(c, 1.0), np.append(c + t, 1.0))
    p = np.array([1.0, 2.0, 3.0])
    assert np.allclose((m @ np.append(p, 1.0))[:3], r @ (p - c) + c + t)


def test_random_rigid_distribution():
    g = gen(0)
    angles, axes = [], []
    for _ in range(2000):
        r, t = synth.random_rigid(g)
        assert np.allclose(r @ r.T, np.eye(3), atol=1e-10)
        assert abs(np.linalg.det(r) - 1.0) < 1e-10
        assert np.all(t == 0.0)
        theta = math.acos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))  # |angle| in [0, pi]
        skew = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
        angles.append(theta)
        axes.append(skew / np.linalg.norm(skew))
    angles, axes = np.array(angles), np.array(axes)
    # |angle| uniform in [0, pi): mean pi/2 (sd of the mean 0.02) and draws near +-pi
    assert abs(angles.mean() - math.pi / 2) < 0.1
    assert angles.max() > 0.97 * math.pi
    # axis uniform on the sphere: mean near 0 and second moment I/3 (a fixed axis gives diag(1,0,0))
    assert np.all(np.abs(axes.mean(0)) < 0.1)
    assert np.allclose(axes.T @ axes / len(axes), np.eye(3) / 3, atol=0.05)

    for _ in range(200):
        r, t = synth.random_rigid(g, max_angle=0.3, max_translation=4.0)
        assert math.acos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)) <= 0.3 + 1e-9
        assert np.all(np.abs(t) <= 4.0)
    with pytest.raises(ValueError):
        synth.random_rigid(g, max_angle=-1.0)


# -- pairs -----------------------------------------------------------------------------------------
def test_synth_pair_determinism_shapes_and_ranges():
    p = synth.synth_pair(SHAPE, seed=3)
    q = synth.synth_pair(SHAPE, seed=3)
    r = synth.synth_pair(SHAPE, seed=4)
    for name in TENSORS:
        assert torch.equal(getattr(p, name), getattr(q, name)), name
        assert not torch.equal(getattr(p, name), getattr(r, name)), name
    assert p.seed == 3 and p.rigid_kji is None
    for name in ("fixed", "moving"):
        img = getattr(p, name)
        assert img.shape == (1, 1) + SHAPE and img.dtype == torch.float32
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    for name in ("fixed_labels", "moving_labels"):
        lab = getattr(p, name)
        assert lab.shape == (1, 1) + SHAPE and lab.dtype == torch.long
        assert int(lab.min()) == 0 and len(torch.unique(lab)) >= 6
    assert p.displacement.shape == p.velocity.shape == (1, 3) + SHAPE
    # global RNG state is neither used nor changed
    state = torch.get_rng_state()
    synth.synth_pair(SHAPE, seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_pair_ground_truth_relates_moving_to_fixed():
    for seed in range(3):
        p = synth.synth_pair((32, 32, 32), seed=seed)
        pulled = warp(p.moving_labels.float(), p.displacement, "nearest").long()
        assert torch.equal(pulled, p.fixed_labels)
        assert float(jacobian_determinant(p.displacement).min()) > 0.0

        # no artefacts: only interpolation at label boundaries differs (measured >= 0.95)
        c = synth.synth_pair((32, 32, 32), seed=seed, image_options=CLEAN)
        assert ncc(warp(c.moving, c.displacement), c.fixed) > 0.9
        # default artefacts (independent noise, bias, blur, gamma): measured >= 0.87
        assert ncc(warp(p.moving, p.displacement), p.fixed) > 0.75


def test_same_contrast_shares_label_means():
    def label_means(img, lab, labels):
        return np.array([float(img[lab == k].mean()) for k in labels])
    for same, check in ((True, lambda r: r > 0.999), (False, lambda r: r < 0.99)):
        p = synth.synth_pair(SHAPE, seed=1, same_contrast=same, image_options=CLEAN)
        common = sorted(set(torch.unique(p.fixed_labels).tolist())
                        & set(torch.unique(p.moving_labels).tolist()))
        a = label_means(p.fixed, p.fixed_labels, common)
        b = label_means(p.moving, p.moving_labels, common)
        assert check(np.corrcoef(a, b)[0, 1]), (same, np.corrcoef(a, b)[0, 1])


def test_rigid_pair_composes_pose_after_deformation():
    base = synth.synth_pair((32, 32, 32), seed=2)
    p = synth.synth_pair((32, 32, 32), seed=2, rigid_angle=1.0, rigid_translation=2.0)
    m = p.rigid_kji
    assert m.shape == (4, 4)
    centre = np.full(3, 15.5)
    r, t = m[:3, :3], m[:3, 3] - centre + m[:3, :3] @ centre
    assert np.allclose(r @ r.T, np.eye(3), atol=1e-10) and np.all(np.abs(t) <= 2.0)
    # the same seed draws the same anatomy and deformation before the pose
    assert torch.equal(p.velocity, base.velocity)
    assert torch.equal(p.moving_labels, base.moving_labels)
    x = identity_grid((32, 32, 32), torch.float64)
    mapped = torch.einsum("pc,ncdhw->npdhw", torch.as_tensor(r), x + base.displacement.double())
    expected = mapped + torch.as_tensor(m[:3, 3]).view(1, 3, 1, 1, 1) - x
    assert torch.allclose(p.displacement.double(), expected, atol=1e-4)
    # and equals compose() wherever the deformed point stays inside the grid (no padding there)
    composed = compose(affine_to_field(m, (32, 32, 32)), base.displacement)
    inside = ((x + base.displacement) >= 0).all(1) & ((x + base.displacement) <= 31).all(1)
    diff = (composed - p.displacement).abs().amax(1)
    assert float(diff[inside].max()) < 1e-3
    assert torch.equal(warp(p.moving_labels.float(), p.displacement, "nearest").long(),
                       p.fixed_labels)


@pytest.mark.parametrize("seed", [1, 2, 4])  # poses of 2.9, 1.4 and 2.1 rad for this shape
def test_rigid_pair_moves_a_blob_where_the_matrix_says(seed):
    shape = (32, 32, 32)
    p = synth.synth_pair(shape, seed=seed, max_std=0.0, rigid_angle=math.pi, rigid_translation=3.0)
    m = p.rigid_kji
    assert math.acos(np.clip((np.trace(m[:3, :3]) - 1) / 2, -1, 1)) > 1.0  # a real rotation
    x = identity_grid(shape, torch.float64)
    blob_at = torch.tensor([12.0, 19.0, 14.0], dtype=torch.float64)
    blob = torch.exp(-((x - blob_at.view(1, 3, 1, 1, 1)) ** 2).sum(1, keepdim=True) / 8.0)
    fixed_blob = warp(blob.float(), p.displacement).double()
    centroid = (fixed_blob * x).sum((2, 3, 4)) / fixed_blob.sum()
    # fixed(x) = moving(A x): the blob appears at A^-1 (blob centre) in the fixed image
    expected = np.linalg.solve(m, np.append(blob_at.numpy(), 1.0))[:3]
    assert np.allclose(centroid[0].numpy(), expected, atol=0.2)
    # the wrong direction (A instead of A^-1) would be far off
    assert np.linalg.norm((m @ np.append(blob_at.numpy(), 1.0))[:3] - expected) > 2.0


def test_synth_pair_rejects_bad_input():
    with pytest.raises(ValueError):
        synth.synth_pair((2, 32, 32), seed=0)
    with pytest.raises(ValueError):
        synth.synth_pair(SHAPE, seed=0, max_std=-1.0)
    with pytest.raises(ValueError):
        synth.synth_pair(SHAPE, seed=0, rigid_angle=-0.1)


# -- dataset ---------------------------------------------------------------------------------------
class _Worker:
    def __init__(self, wid, num):
        self.id, self.num_workers = wid, num


def test_dataset_is_deterministic_resumable_and_worker_aware(monkeypatch):
    shape = (8, 8, 8)
    ds = synth.SyntheticPairs(shape, seed=11, length=5)
    assert len(ds) == 5
    items = list(ds)
    assert [p.seed for p in items] == [synth.pair_seed(11, i) for i in range(5)]
    assert len(set(p.seed for p in items)) == 5
    assert torch.equal(items[3].fixed, ds.pair(3).fixed)
    assert torch.equal(items[3].fixed, synth.synth_pair(shape, items[3].seed).fixed)

    resumed = list(synth.SyntheticPairs(shape, seed=11, length=5, start=3))
    assert [p.seed for p in resumed] == [p.seed for p in items[3:]]
    other = next(iter(synth.SyntheticPairs(shape, seed=12)))  # infinite stream: take one
    assert other.seed != items[0].seed

    seen = []
    for wid in range(2):
        monkeypatch.setattr(synth, "get_worker_info", lambda wid=wid: _Worker(wid, 2))
        seen.append([p.seed for p in ds])
    assert seen[0] == [items[i].seed for i in (0, 2, 4)]
    assert seen[1] == [items[i].seed for i in (1, 3)]
    with pytest.raises(TypeError):
        len(synth.SyntheticPairs(shape))


def test_collate_pairs_batches_along_n():
    ds = synth.SyntheticPairs((8, 8, 8), seed=0, length=4, rigid_angle=0.5)
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=synth.collate_pairs)))
    assert batch.fixed.shape == (2, 1, 8, 8, 8) and batch.displacement.shape == (2, 3, 8, 8, 8)
    assert batch.rigid_kji.shape == (2, 4, 4) and len(batch.seed) == 2
    assert torch.equal(batch.moving[1:], ds.pair(1).moving)


# -- phantom ---------------------------------------------------------------------------------------
def test_brain_phantom_tissues_and_determinism():
    shape = (40, 48, 40)
    img, lab = synth.brain_phantom(shape, seed=0)
    img2, lab2 = synth.brain_phantom(shape, seed=0)
    assert torch.equal(img, img2) and torch.equal(lab, lab2)
    assert not torch.equal(synth.brain_phantom(shape, seed=1)[0], img)
    assert img.shape == lab.shape == (1, 1) + shape and lab.dtype == torch.long
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert torch.unique(lab).tolist() == [0, 1, 2, 3]
    # T1-like: white > grey > CSF (medians: thin CSF blurs with the skull at this size)
    med = {k: float(img[lab == k].median()) for k in range(4)}
    assert med[2] > med[1] + 0.15 and med[1] > med[3] + 0.1
    assert int(lab[0, 0, 20, 24, 20]) != 0 and int(lab[0, 0, 0, 0, 0]) == 0
    # a bright skull ring labelled background, between the brain and the outside
    row = img[0, 0, 20, 24, :10]
    brightest = int(row.argmax())
    assert float(row[brightest]) > 0.6 and float(row[0]) < 0.05
    assert int(lab[0, 0, 20, 24, brightest]) == 0 and int(lab[0, 0, 20, 24, 9]) != 0


def test_example_pair_is_related_by_its_displacement():
    shape = (32, 40, 32)
    p = synth.example_pair(shape, seed=0)
    assert torch.equal(p.fixed, synth.example_pair(shape, seed=0).fixed)
    assert torch.equal(warp(p.moving_labels.float(), p.displacement, "nearest").long(),
                       p.fixed_labels)
    assert float(jacobian_determinant(p.displacement).min()) > 0.0
    assert float(p.displacement.abs().max()) > 1.5
    aligned = ncc(warp(p.moving, p.displacement), p.fixed)
    assert aligned > 0.95 and aligned > ncc(p.moving, p.fixed) + 0.02
