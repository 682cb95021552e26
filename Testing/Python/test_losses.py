"""Known-answer tests for deepreglib.core.losses (small volumes, CPU)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from deepreglib.core import losses as L
from deepreglib.core.warp import identity_grid


def smooth_image(shape=(1, 1, 16, 16, 16), seed=0):
    """Random blobs in [0, 1]: texture at several scales, like a small scan."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    for _ in range(3):
        x = F.avg_pool3d(x, 3, 1, 1, count_include_pad=False)
    return (x - x.min()) / (x.max() - x.min())


def noise(shape=(1, 1, 16, 16, 16), seed=1, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- NCC -----------------------------------------------------------------------------------------
def test_ncc_of_affine_intensity_map_is_plus_or_minus_one():
    img = smooth_image((2, 1, 12, 12, 12))
    assert torch.allclose(L.ncc(img, 2 * img + 3), torch.ones(2), atol=1e-5)
    assert torch.allclose(L.ncc(img, -img), -torch.ones(2), atol=1e-5)
    assert L.GlobalNCC()(img, 2 * img + 3).abs() < 1e-5
    per_item = L.GlobalNCC(reduction="none")(img, -img)
    assert torch.allclose(per_item, torch.full((2,), 2.0), atol=1e-5)


def test_ncc_of_independent_noise_is_near_zero_and_mask_restricts_voxels():
    a, b = noise(seed=1), noise(seed=2)
    assert abs(float(L.ncc(a, b)[0])) < 0.05  # 4096 samples: std of r is about 1/64
    # b equals a inside the mask and is noise outside: masked NCC sees only the equal part
    mask = torch.zeros_like(a, dtype=torch.bool)
    mask[..., :8] = True
    mixed = torch.where(mask, a, b)
    assert float(L.ncc(a, mixed, mask)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(L.ncc(a, mixed)[0]) < 0.8


def test_local_ncc_of_identical_noise_is_one_and_of_inverted_is_minus_one():
    a = noise()
    r = L.local_ncc(a, a, window=5)
    assert r.shape == (1, 1, 16, 16, 16)
    # eps / var = 1e-5 / (1/12) bounds the shortfall from 1
    assert float(r.min()) > 0.999
    assert float(L.local_ncc(a, 1 - a, window=(3, 5, 7)).max()) < -0.999
    assert float(L.LocalNCC(5)(a, a)) < 1e-3


def test_local_ncc_is_local_and_window_is_clamped():
    a, b = noise(seed=1), noise(seed=2)
    # identical in the first half along w, independent in the second half
    b = torch.cat([a[..., :8], b[..., 8:]], dim=-1)
    r = L.local_ncc(a, b, window=3)
    assert float(r[..., :7].min()) > 0.999  # windows wholly inside the equal half
    assert abs(float(r[..., 9:].mean())) < 0.1
    # a window larger than the image is clamped to the image size; the window centred on voxel
    # (1, 2, 2) then spans the whole 4x5x6 image (an even side reaches one further forward), so
    # there local NCC equals global NCC
    small_a, small_b = noise((1, 1, 4, 5, 6), seed=3), noise((1, 1, 4, 5, 6), seed=4)
    r = L.local_ncc(small_a, small_b, window=99, eps=0.0)
    assert torch.equal(r, L.local_ncc(small_a, small_b, window=(4, 5, 6), eps=0.0))
    assert float(r[0, 0, 1, 2, 2]) == pytest.approx(float(L.ncc(small_a, small_b, eps=0.0)[0]),
                                                    abs=1e-5)
    assert float((r - r[0, 0, 1, 2, 2]).abs().max()) > 0.01  # and elsewhere it does not


def test_local_ncc_loss_gradcheck_float64():
    a = noise((1, 1, 3, 4, 5), seed=5, dtype=torch.float64).requires_grad_()
    b = noise((1, 1, 3, 4, 5), seed=6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: L.LocalNCC(3)(x, y), (a, b), fast_mode=True)


def test_local_ncc_gradient_is_finite_on_flat_regions():
    a = torch.zeros(1, 1, 8, 8, 8, requires_grad=True)
    b = noise((1, 1, 8, 8, 8))
    L.LocalNCC(3)(a, b).backward()
    assert torch.isfinite(a.grad).all()


def test_mse_known_value_and_mask():
    a = torch.zeros(2, 1, 4, 4, 4)
    b = torch.full_like(a, 3.0)
    b[1] = 1.0
    assert torch.allclose(L.MSE(reduction="none")(a, b), torch.tensor([9.0, 1.0]))
    assert float(L.MSE()(a, b)) == pytest.approx(5.0)
    b2 = b.clone()
    b2[:, :, 0] = 100.0
    mask = torch.ones(1, 1, 4, 4, 4)
    mask[:, :, 0] = 0
    assert float(L.MSE()(a, b2, mask)) == pytest.approx(5.0)


# -- SSIM ----------------------------------------------------------------------------------------
def test_ssim_identical_is_one_and_decreases_with_noise():
    img = smooth_image()
    n = torch.randn(img.shape, generator=torch.Generator().manual_seed(3))
    s_same = float(L.ssim(img, img)[0])
    s_low = float(L.ssim(img, img + 0.05 * n)[0])
    s_high = float(L.ssim(img, img + 0.2 * n)[0])
    assert s_same == pytest.approx(1.0, abs=1e-6)
    assert 1.0 > s_low > s_high
    assert float(L.SSIMLoss(kernel="box")(img, img)) == pytest.approx(0.0, abs=1e-6)
    # data_range 1 vs the inputs' own range (about 2 with this noise): C1, C2 are small either
    # way, so the two values stay close
    loss_fixed_range = float(L.SSIMLoss(data_range=1.0)(img, img + 0.2 * n))
    assert loss_fixed_range == pytest.approx(1 - s_high, abs=0.05)


def test_ssim_of_constant_images_matches_the_luminance_formula():
    # constant images have no variance: SSIM = (2 a b + C1) / (a^2 + b^2 + C1), C2 cancels
    a = torch.full((1, 1, 8, 8, 8), 0.2, dtype=torch.float64)
    b = torch.full((1, 1, 8, 8, 8), 0.6, dtype=torch.float64)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1)
    assert float(L.ssim(a, b, data_range=1.0)[0]) == pytest.approx(expected, rel=1e-9)


def test_ssim_loss_gradcheck_float64():
    a = noise((1, 1, 5, 5, 5), seed=7, dtype=torch.float64).requires_grad_()
    b = noise((1, 1, 5, 5, 5), seed=8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: L.SSIMLoss(window=3, data_range=1.0)(x, b), (a,),
                                    fast_mode=True)


# -- MIND ----------------------------------------------------------------------------------------
def test_mind_descriptor_shape_range_and_pairs():
    img = smooth_image()
    d = L.mind_ssc(img, radius=1, dilation=2)
    assert d.shape == (1, 12, 16, 16, 16)
    assert float(d.min()) > 0 and float(d.max()) == pytest.approx(1.0)
    assert len(L.SSC_PAIRS) == 12
    for p, q in L.SSC_PAIRS:  # neighbours on two different axes, never opposite
        assert sum(abs(x) for x in p) == 1 and sum(abs(x - y) for x, y in zip(p, q)) == 2


def test_mind_loss_is_modality_robust():
    img = smooth_image()
    mind = L.MINDLoss(radius=1, dilation=2)
    inverted = float(mind(img, 1.0 - img))  # same structure, other "modality"
    rescaled = float(mind(img, 5.0 * img - 2.0))
    shifted = float(mind(img, torch.roll(img, shifts=2, dims=4)))  # misaligned by 2 voxels
    assert inverted < 1e-6 and rescaled < 1e-6
    assert shifted > 0.01
    # NCC by contrast calls the inverted copy the worst possible match
    assert float(L.GlobalNCC()(img, 1.0 - img)) == pytest.approx(2.0, abs=1e-5)


# -- mutual information --------------------------------------------------------------------------
def test_mutual_information_self_beats_noise_and_tolerates_monotone_maps():
    img = smooth_image()
    mi_self = float(L.mutual_information(img, img)[0])
    mi_noise = float(L.mutual_information(img, noise(seed=9))[0])
    mi_affine = float(L.mutual_information(img, 3.0 * img + 7.0)[0])
    mi_square = float(L.mutual_information(img, img ** 2)[0])
    assert mi_self > 1.0 and mi_noise < 0.05
    assert mi_affine == pytest.approx(mi_self, rel=1e-4)  # exact: per-image min/max scaling
    # a monotone but non-linear map moves voxels between Parzen bins: close, not equal
    assert mi_square == pytest.approx(mi_self, rel=0.2)
    loss = L.MutualInformation()
    assert float(loss(img, img)) == pytest.approx(-mi_self, rel=1e-5)
    nmi_self = float(L.MutualInformation(normalized=True)(img, img))
    nmi_noise = float(L.MutualInformation(normalized=True)(img, noise(seed=9)))
    assert -2.0 - 1e-5 <= nmi_self < -1.3 and -1.05 < nmi_noise <= -1.0 + 1e-6


def test_mutual_information_is_differentiable_and_subsampling_is_close():
    img = smooth_image()
    moving = torch.roll(img, 1, dims=2).requires_grad_()
    L.MutualInformation()(moving, img).backward()
    assert torch.isfinite(moving.grad).all() and float(moving.grad.abs().sum()) > 0
    full = float(L.mutual_information(img, img)[0])
    torch.manual_seed(0)
    sub = float(L.mutual_information(img, img, max_voxels=2000)[0])
    assert sub == pytest.approx(full, rel=0.1)


# -- regularisers --------------------------------------------------------------------------------
def affine_field(matrix, shape=(6, 7, 8)):
    """``u(x) = A x + t`` on the grid, components (k, j, i)."""
    x = identity_grid(shape, dtype=torch.float64)
    a = torch.as_tensor(matrix, dtype=torch.float64)
    return torch.einsum("ca,nadhw->ncdhw", a, x) + 0.3


def test_constant_field_has_zero_smoothness_bending_and_tv_floor():
    u = torch.full((2, 3, 5, 6, 7), 1.7)
    assert float(L.GradientSmoothness()(u)) == 0.0
    assert float(L.GradientSmoothness("l1")(u)) == 0.0
    assert float(L.BendingEnergy()(u)) == 0.0
    assert float(L.TotalVariation(eps=1e-6)(u)) == pytest.approx(1e-3, rel=1e-4)


def test_affine_field_has_zero_bending_but_known_gradient_loss():
    a = [[0.5, 0.1, 0.0], [0.0, -0.2, 0.3], [0.2, 0.0, 0.1]]
    u = affine_field(a)
    assert float(L.BendingEnergy()(u)) == pytest.approx(0.0, abs=1e-20)
    frob2 = sum(v * v for row in a for v in row)
    assert float(L.GradientSmoothness()(u)) == pytest.approx(frob2 / 9.0, rel=1e-12)
    l1 = sum(abs(v) for row in a for v in row) / 9.0
    assert float(L.GradientSmoothness("l1")(u)) == pytest.approx(l1, rel=1e-12)


def test_bending_energy_of_quadratic_fields():
    x = identity_grid((5, 6, 7), dtype=torch.float64)
    u = torch.zeros(1, 3, 5, 6, 7, dtype=torch.float64)
    u[:, 0] = 0.5 * x[:, 0] ** 2  # d2/dk2 = 1 in one of three components
    assert float(L.BendingEnergy()(u)) == pytest.approx(1.0 / 3.0, rel=1e-12)
    u[:, 0] = x[:, 0] * x[:, 2]  # d2/dk di = 1, counted twice (u_ki and u_ik)
    assert float(L.BendingEnergy()(u)) == pytest.approx(2.0 / 3.0, rel=1e-12)


def test_total_variation_of_a_step():
    d, h, w, step, eps = 4, 5, 6, 2.0, 1e-8
    x = torch.zeros(1, 1, d, h, w, dtype=torch.float64)
    x[..., 3:] = step  # step between i = 2 and i = 3
    # on the (d-1, h-1, w-1) grid only the i = 2 plane sees the step
    n = (d - 1) * (h - 1) * (w - 1)
    on_step = (d - 1) * (h - 1)
    expected = (on_step * (step ** 2 + eps) ** 0.5 + (n - on_step) * eps ** 0.5) / n
    assert float(L.TotalVariation(eps=eps)(x)) == pytest.approx(expected, rel=1e-12)


# -- KL ------------------------------------------------------------------------------------------
def test_kl_normal_prior_is_zero_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(2, 3, 4, 4, 4)
    kl = L.KLDivergence(prior="normal")
    assert float(kl(zeros, zeros)) == pytest.approx(0.0, abs=1e-7)
    # KL(N(1, e) || N(0, 1)) = 0.5 (e + 1 - 1 - 1) per variable
    expected = 0.5 * (torch.e + 1.0 - 1.0 - 1.0)
    assert float(kl(zeros + 1.0, zeros + 1.0)) == pytest.approx(expected, rel=1e-6)


def test_kl_laplacian_matches_the_explicit_precision_matrix():
    shape = (2, 3, 2)
    g = torch.Generator().manual_seed(11)
    mean = torch.randn(1, 3, *shape, generator=g, dtype=torch.float64)
    log_var = torch.randn(1, 3, *shape, generator=g, dtype=torch.float64)
    lam = 20.0
    voxels = list(itertools.product(*[range(s) for s in shape]))
    index = {v: n for n, v in enumerate(voxels)}
    lap = torch.zeros(len(voxels), len(voxels), dtype=torch.float64)
    for v in voxels:
        for axis in range(3):
            for step in (-1, 1):
                nb = list(v)
                nb[axis] += step
                if tuple(nb) in index:
                    lap[index[v], index[tuple(nb)]] -= 1
                    lap[index[v], index[v]] += 1
    total = 0.0
    for c in range(3):
        mu = mean[0, c].reshape(-1)
        s2 = log_var[0, c].reshape(-1).exp()
        total += lam * torch.trace(lap @ torch.diag(s2)) - s2.log().sum() + lam * mu @ lap @ mu
    expected = 0.5 * total / (3 * len(voxels))
    got = L.KLDivergence(prior_lambda=lam)(mean, log_var)
    assert float(got) == pytest.approx(float(expected), rel=1e-10)


def test_kl_laplacian_variance_optimum_is_one_over_lambda_degree():
    lam = 20.0
    mean = torch.zeros(1, 3, 4, 4, 4, dtype=torch.float64)
    deg = torch.full((4, 4, 4), 6.0, dtype=torch.float64)
    for axis in range(3):
        deg.select(axis, 0).sub_(1)
        deg.select(axis, 3).sub_(1)
    log_var = (-torch.log(lam * deg)).expand(1, 3, 4, 4, 4).clone().requires_grad_()
    L.KLDivergence(prior_lambda=lam)(mean, log_var).backward()
    assert float(log_var.grad.abs().max()) < 1e-12


# -- Dice ----------------------------------------------------------------------------------------
def test_one_hot_and_dice():
    labels = torch.zeros(1, 1, 6, 6, 6, dtype=torch.long)
    labels[..., :3] = 1
    labels[..., 3:, :, 4:] = 2
    oh = L.one_hot(labels, 3)
    assert oh.shape == (1, 3, 6, 6, 6) and oh.dtype == torch.float32
    assert torch.equal(oh.argmax(1, keepdim=True), labels)
    assert float(L.DiceLoss()(oh, oh)) == pytest.approx(0.0, abs=1e-6)
    # disjoint: class 1 in the first half along d only, the second half only
    a = torch.zeros(1, 1, 6, 6, 6)
    b = torch.zeros(1, 1, 6, 6, 6)
    a[:, :, :3] = 1
    b[:, :, 3:] = 1
    assert float(L.DiceLoss()(a, b)) == pytest.approx(1.0, abs=1e-6)


def test_dice_of_overlapping_cubes_is_the_exact_fraction():
    a = torch.zeros(1, 1, 10, 10, 10)
    b = torch.zeros(1, 1, 10, 10, 10)
    a[:, :, 1:5, 1:5, 1:5] = 1  # 64 voxels
    b[:, :, 3:7, 1:5, 1:5] = 1  # 64 voxels, 32 shared
    dice = 1.0 - float(L.DiceLoss(eps=1e-12)(a, b))
    assert dice == pytest.approx(2 * 32 / 128, abs=1e-6)
    per_class = L.DiceLoss(eps=1e-12, reduction="none")(torch.cat([a, a], 1), torch.cat([a, b], 1))
    assert per_class.shape == (1, 2)
    assert torch.allclose(per_class, torch.tensor([[0.0, 0.5]]), atol=1e-6)
    no_bg = L.DiceLoss(eps=1e-12, include_background=False)(torch.cat([a, a], 1),
                                                            torch.cat([a, b], 1))
    assert float(no_bg) == pytest.approx(0.5, abs=1e-6)


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda: L.ncc(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5)),
    lambda: L.local_ncc(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)),
    lambda: L.local_ncc(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), window=0),
    lambda: L.LocalNCC(window=(3, 3)),
    lambda: L.LocalNCC()(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4),
                         torch.ones(1, 1, 4, 4, 3)),
    lambda: L.MSE(reduction="avg"),
    lambda: L.SSIMLoss(kernel="disk"),
    lambda: L.mind_ssc(torch.zeros(1, 2, 4, 4, 4)),
    lambda: L.MINDLoss()(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 5, 4, 4)),
    lambda: L.MutualInformation(bins=1),
    lambda: L.GradientSmoothness()(torch.zeros(1, 2, 4, 4, 4)),
    lambda: L.GradientSmoothness(penalty="l3"),
    lambda: L.BendingEnergy()(torch.zeros(1, 3, 2, 4, 4)),
    lambda: L.TotalVariation()(torch.zeros(4, 4, 4)),
    lambda: L.KLDivergence(prior="uniform"),
    lambda: L.KLDivergence()(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 3)),
    lambda: L.DiceLoss()(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4)),
    lambda: L.one_hot(torch.zeros(1, 1, 4, 4, 4), 2),
    lambda: L.one_hot(torch.full((1, 1, 4, 4, 4), 2, dtype=torch.long), 2),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_reduction_none_gives_one_value_per_item():
    a, b = noise((3, 1, 6, 6, 6), seed=1), noise((3, 1, 6, 6, 6), seed=2)
    u = noise((3, 3, 6, 6, 6), seed=3)
    for loss, args in [(L.LocalNCC(3, reduction="none"), (a, b)), (L.MSE(reduction="none"), (a, b)),
                       (L.SSIMLoss(3, reduction="none"), (a, b)),
                       (L.MINDLoss(reduction="none"), (a, b)),
                       (L.MutualInformation(reduction="none"), (a, b)),
                       (L.GradientSmoothness(reduction="none"), (u,)),
                       (L.BendingEnergy(reduction="none"), (u,)),
                       (L.TotalVariation(reduction="none"), (u,)),
                       (L.KLDivergence(reduction="none"), (u, u))]:
        per_item = loss(*args)
        assert per_item.shape == (3,), type(loss).__name__
        loss.reduction = "mean"
        assert float(loss(*args)) == pytest.approx(float(per_item.mean()), rel=1e-5)
