"""Known-answer tests for deepreglib.core.metrics."""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from deepreglib.core import metrics as M
from deepreglib.core.jacobian import jacobian_determinant


# -- Dice ----------------------------------------------------------------------------------------
def test_dice_per_label_identical_disjoint_and_partial():
    a = np.zeros((10, 10, 10), dtype=np.int16)
    b = np.zeros_like(a)
    a[1:5, 1:5, 1:5] = 1  # 64 voxels
    b[3:7, 1:5, 1:5] = 1  # 64 voxels, 32 shared
    a[7:9, 7:9, 7:9] = 2  # label 2 only in a
    b[0, 9, 9] = 3        # label 3 only in b
    a[8, 0, 0] = b[8, 0, 0] = 4  # label 4 identical
    d = M.dice_per_label(a, b)
    assert sorted(d) == [1, 2, 3, 4]
    assert d[1] == pytest.approx(2 * 32 / 128)
    assert d[2] == 0.0 and d[3] == 0.0 and d[4] == 1.0
    chosen = M.dice_per_label(torch.from_numpy(a), torch.from_numpy(b), labels=[1, 7])
    assert chosen[1] == pytest.approx(0.5) and math.isnan(chosen[7])  # 7 is in neither map


# -- surface distances ---------------------------------------------------------------------------
def nested_boxes(axis, n=20):
    """A 2-layer box inside a 4-layer box of the same lateral extent: they differ by one voxel
    on each side along ``axis`` only. Returns (inner, outer) masks."""
    inner = np.zeros((8, n + 6, n + 6), dtype=bool)
    outer = np.zeros_like(inner)
    inner[3:5, 3:3 + n, 3:3 + n] = True
    outer[2:6, 3:3 + n, 3:3 + n] = True
    return np.moveaxis(inner, 0, axis), np.moveaxis(outer, 0, axis)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_and_assd_of_nested_boxes_with_anisotropic_spacing(axis):
    n = 20
    inner, outer = nested_boxes(axis, n)
    spacing = [1.5, 2.5]
    spacing.insert(axis, 0.8)  # the offset axis has the finest spacing, so the offset is nearest
    # Inner surface: both layers (2 n^2); its rim (2 (4n - 4)) lies on the outer's side faces
    # (distance 0), the rest is one voxel from the outer's caps (0.8 mm). Outer surface: the two
    # caps (2 n^2, each 0.8 mm from the inner) and the rims of its two middle layers (0 mm).
    # Both directed 95th percentiles are therefore 0.8 mm.
    rim = 2 * (4 * n - 4)
    assert M.hd95(inner, outer, spacing) == pytest.approx(0.8, abs=1e-12)
    assert M.hd95(outer, inner, spacing) == pytest.approx(0.8, abs=1e-12)
    at_offset = (2 * n * n - rim) + 2 * n * n
    expected_assd = 0.8 * at_offset / (2 * n * n + 2 * n * n + rim)
    assert M.assd(inner, outer, spacing) == pytest.approx(expected_assd, rel=1e-12)
    # spacing given in ITK (x, y, z) order by mistake puts 2.5 or 1.5 mm on the offset axis
    if axis != 1:
        assert M.hd95(inner, outer, spacing[::-1]) > 1.0


def test_surface_distance_of_single_voxels_uses_dhw_spacing():
    a = np.zeros((8, 8, 12), dtype=bool)
    b = np.zeros_like(a)
    a[2, 3, 4] = True
    b[5, 1, 9] = True
    spacing = (2.0, 0.5, 1.2)  # (d, h, w) mm
    expected = math.sqrt((3 * 2.0) ** 2 + (2 * 0.5) ** 2 + (5 * 1.2) ** 2)
    assert M.hd95(a, b, spacing) == pytest.approx(expected)
    assert M.assd(a, b, spacing) == pytest.approx(expected)
    assert M.hd95(a, a, spacing) == 0.0 and M.assd(a, a, spacing) == 0.0
    assert M.hd95(a, b, None) == pytest.approx(math.sqrt(9 + 4 + 25))  # voxels


def brute_force_surface(mask):
    """Voxels of ``mask`` with a face neighbour outside it or outside the volume."""
    p = np.pad(mask, 1)
    inside = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            inside &= np.roll(p, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~inside)


def test_hd95_and_assd_match_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    spacing = (1.7, 0.6, 1.1)
    grid = np.indices((12, 13, 14)).transpose(1, 2, 3, 0) * np.array(spacing)
    a = np.linalg.norm(grid - [9.0, 4.0, 7.0], axis=-1) < 4.5
    b = (np.linalg.norm(grid - [11.0, 3.5, 8.0], axis=-1) < 4.0) | (rng.random(a.shape) > 0.97)
    sa, sb = brute_force_surface(a) * spacing, brute_force_surface(b) * spacing
    d = cdist(sa, sb)
    ab, ba = d.min(axis=1), d.min(axis=0)
    expected_hd95 = max(np.percentile(ab, 95), np.percentile(ba, 95))
    expected_assd = (ab.sum() + ba.sum()) / (ab.size + ba.size)
    assert M.hd95(a, b, spacing) == pytest.approx(expected_hd95, rel=1e-9)
    assert M.assd(a, b, spacing) == pytest.approx(expected_assd, rel=1e-9)


def test_empty_masks_give_nan_or_inf_and_per_label_dicts():
    empty = np.zeros((6, 6, 6), dtype=bool)
    full = empty.copy()
    full[2:4, 2:4, 2:4] = True
    assert math.isnan(M.hd95(empty, empty, (1, 1, 1))) and math.isnan(M.assd(empty, empty, None))
    assert M.hd95(full, empty, (1, 1, 1)) == math.inf and M.assd(empty, full, None) == math.inf
    labels = full.astype(np.uint8)
    moved = np.roll(labels, 1, axis=2)  # a 2x2x2 cube moved 1 voxel along w
    spacing = (1.0, 1.0, 3.0)
    # every surface voxel of a 2-voxel-thick cube is surface; each half moved by 1 w-voxel is
    # 3 mm from the other's nearest surface voxel, the shared half 0 mm: percentile 95 is 3 mm
    assert M.hd95_per_label(labels, moved, spacing) == {1: pytest.approx(3.0)}
    per_label = M.assd_per_label(labels[None, None], moved[None, None], spacing)
    assert per_label == {1: pytest.approx(1.5)}
    assert math.isnan(M.hd95_per_label(labels, moved, spacing, labels=[2])[2])


# -- landmarks, images, fields -------------------------------------------------------------------
def test_tre_and_summary():
    a = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [10.0, 0.0, 0.0]])
    b = np.array([[3.0, 4.0, 0.0], [1.0, 2.0, 2.0], [10.0, 0.0, -12.0]])
    d = M.tre(a, torch.from_numpy(b))
    assert np.allclose(d, [5.0, 0.0, 12.0])
    s = M.tre_summary(d)
    assert s["mean"] == pytest.approx(17.0 / 3) and s["median"] == 5.0 and s["max"] == 12.0
    assert s["count"] == 3 and s["std"] == pytest.approx(np.std([5.0, 0.0, 12.0]))


def test_ncc_metric():
    rng = np.random.default_rng(1)
    img = rng.random((8, 9, 10))
    assert M.ncc_metric(img, 2 * img + 3) == pytest.approx(1.0, abs=1e-12)
    inverted = M.ncc_metric(torch.from_numpy(img), torch.from_numpy(-img))
    assert inverted == pytest.approx(-1.0, abs=1e-12)
    other = np.where(np.arange(10) < 5, img, rng.random((8, 9, 10)))
    mask = np.broadcast_to(np.arange(10) < 5, img.shape)
    assert M.ncc_metric(img, other, mask) == pytest.approx(1.0, abs=1e-12)
    assert M.ncc_metric(img, other) < 0.9
    assert math.isnan(M.ncc_metric(img, np.ones_like(img)))  # undefined, not a perfect 0


def test_folding_and_sdlogj():
    jac = jacobian_determinant(torch.zeros(1, 3, 6, 6, 6))
    assert M.folding_percent(jac) == 0.0 and M.sdlogj(jac) == 0.0
    values = np.array([1.0, math.e, -0.5, 1 / math.e]).reshape(1, 1, 1, 2, 2)
    assert M.folding_percent(values) == pytest.approx(25.0)
    mask = np.array([True, True, False, True]).reshape(1, 1, 1, 2, 2)
    assert M.folding_percent(values, mask) == 0.0
    assert M.sdlogj(values, mask) == pytest.approx(np.std([0.0, 1.0, -1.0], ddof=1))


def test_endpoint_error_of_a_known_shift():
    u_true = torch.zeros(2, 3, 4, 5, 6)
    u_pred = u_true.clone()
    u_pred[:, 0] = 1.0
    u_pred[:, 1] = 2.0
    e = M.endpoint_error(u_pred, u_true, spacing=(2.0, 1.5, 1.0))  # (2 mm, 3 mm, 0 mm)
    for key in ("mean", "median", "p95", "max"):
        assert e[key] == pytest.approx(math.sqrt(13.0))
    assert M.endpoint_error(u_pred, u_true)["max"] == pytest.approx(math.sqrt(5.0))
    u_pred[:, :, :, :, 3:] = 0.0  # correct in half of the voxels
    mask = np.zeros((4, 5, 6), dtype=bool)
    mask[..., 3:] = True
    assert M.endpoint_error(u_pred.numpy(), u_true.numpy(), mask=mask)["max"] == 0.0
    e = M.endpoint_error(u_pred, u_true)
    assert e["mean"] == pytest.approx(math.sqrt(5.0) / 2)
    assert e["max"] == pytest.approx(math.sqrt(5.0))


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda: M.dice_per_label(np.zeros((4, 4, 4)), np.zeros((4, 4, 5))),
    lambda: M.hd95(np.zeros((4, 4)), np.zeros((4, 4)), (1, 1, 1)),
    lambda: M.hd95(np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1, 1)),
    lambda: M.assd(np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1, 0, 1)),
    lambda: M.assd(np.ones((2, 4, 4, 4)), np.ones((2, 4, 4, 4)), (1, 1, 1)),
    lambda: M.tre(np.zeros((3, 2)), np.zeros((3, 2))),
    lambda: M.tre(np.zeros((3, 3)), np.zeros((4, 3))),
    lambda: M.tre_summary([]),
    lambda: M.ncc_metric(np.zeros((4, 4, 4)), np.zeros((4, 4, 3))),
    lambda: M.folding_percent(np.ones((1, 1, 4, 4, 4)), np.ones((3, 3))),
    lambda: M.endpoint_error(np.zeros((1, 2, 4, 4, 4)), np.zeros((1, 2, 4, 4, 4))),
    lambda: M.endpoint_error(np.zeros((1, 3, 4, 4, 4)), np.zeros((1, 3, 4, 4, 4)),
                             mask=np.ones((4, 4, 5))),
    lambda: M.endpoint_error(np.zeros((1, 3, 4, 4, 4)), np.zeros((1, 3, 4, 4, 4)),
                             mask=np.zeros((4, 4, 4))),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
