"""One registration end to end, in-process: preprocessing to the network grid and back, the
composition of the initial alignment with the deformable field, and that the written files
agree with each other and with SimpleITK."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepreglib.core.errors import BadInputError
from deepreglib.core.geometry import Grid
from deepreglib.methods.weights import save_model
from deepreglib.methods.voxelmorph.network import VoxelMorph
from deepreglib.run.pipeline import RegisterOptions, register, resolve_device
from deepreglib.core.preprocess import network_grid
from deepreglib.core.resample import field_to_fixed_grid, field_to_network_grid

ROT = sitk.VersorTransform((0.2, -0.1, 0.3), 0.4).GetMatrix()  # an oblique direction


def phantom(size_xyz, spacing, origin=(0.0, 0.0, 0.0), direction=None, shift_mm=(0.0, 0.0, 0.0)):
    """A smooth blob pattern defined in physical space, sampled on the given grid, so two grids
    of any geometry see the same anatomy (moved by ``shift_mm``)."""
    img = sitk.Image([int(s) for s in size_xyz], sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    grid = Grid.from_sitk(img)
    k, j, i = np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij")
    p = grid.index_to_physical(np.stack([k, j, i], -1)) - np.asarray(shift_mm)
    c = grid.index_to_physical((np.asarray(grid.shape) - 1) / 2.0)
    r2 = ((p - c) ** 2).sum(-1)
    arr = np.exp(-r2 / 120.0) + 0.6 * np.exp(-((p - c - [8, 5, 0]) ** 2).sum(-1) / 40.0)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(img)
    return out


@pytest.fixture(scope="module")
def identity_weights(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(VoxelMorph(), tmp_path_factory.mktemp("w") / "identity")


def test_network_grid_is_isotropic_covers_the_image_and_fits_the_unet():
    brain = Grid((224, 192, 160), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3).ravel())
    net = network_grid(brain)
    assert net.shape == (112, 96, 80) and net.spacing == (2.0, 2.0, 2.0)
    ct = Grid((300, 512, 512), (0.7, 0.7, 1.5), (10, -20, 5), np.asarray(ROT))
    net = network_grid(ct)
    assert all(s % 16 == 0 for s in net.shape) and max(net.shape) <= 128
    assert len(set(net.spacing)) == 1
    # the network grid's box contains the CT's corners, and it has the CT's direction
    idx = net.physical_to_index(ct.corners())
    assert (idx >= -0.5).all() and (idx <= np.asarray(net.shape) - 0.5).all()
    assert np.allclose(net.direction, ct.direction)
    prostate = Grid((60, 64, 64), (0.4, 0.4, 0.4), (0, 0, 0), np.eye(3).ravel())
    assert network_grid(prostate).spacing == (0.4, 0.4, 0.4)  # never coarser than needed


def test_field_round_trip_between_grids_keeps_a_smooth_physical_field():
    fixed = Grid((20, 24, 28), (1.2, 0.9, 2.0), (3.0, -4.0, 5.0), np.asarray(ROT))
    net = network_grid(fixed, max_size=32)
    # a physical translation field: the same (x, y, z) mm vector everywhere
    t = torch.tensor([1.5, -2.0, 0.7]).view(1, 3, 1, 1, 1)
    u_mm = t.expand(1, 3, *fixed.shape).contiguous()
    u_net = field_to_network_grid(u_mm, fixed, net)
    back = field_to_fixed_grid(u_net, net, fixed)
    assert torch.allclose(back, u_mm, atol=1e-4)


def test_anisotropic_oblique_inputs_of_different_grids(identity_weights, tmp_path):
    """A thick-slice oblique 'CT' and an isotropic 'MR' of another size: outputs on the fixed grid."""
    fdir = tmp_path / "in"
    fdir.mkdir()
    fixed = phantom((40, 36, 14), (0.8, 0.9, 2.5), (-10.0, 4.0, 2.0), ROT)
    moving = phantom((24, 26, 22), (1.5, 1.5, 1.5), (-12.0, 0.0, -3.0))
    sitk.WriteImage(fixed, str(fdir / "f.nrrd"))
    sitk.WriteImage(moving, str(fdir / "m.mha"))
    out = tmp_path / "run"
    manifest = json.loads(register(RegisterOptions(fixed=str(fdir / "f.nrrd"), moving=str(fdir / "m.mha"),
                                                   out=str(out), weights=str(identity_weights), device="cpu", init="none")).read_text())
    for name in ("warped.mha", "jacobian.mha", "displacement.mha"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == fixed.GetSize()
        assert np.allclose(img.GetSpacing(), fixed.GetSpacing()) and np.allclose(img.GetOrigin(), fixed.GetOrigin())
        assert np.allclose(img.GetDirection(), fixed.GetDirection(), atol=1e-6)
    inverse = sitk.ReadImage(str(out / "inverse_displacement.mha"))
    assert inverse.GetSize() == moving.GetSize()
    # identity network: the warped image is the moving image resampled in physical space
    expected = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0)
    diff = np.abs(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.mha"))) - sitk.GetArrayFromImage(expected))
    assert np.percentile(diff, 99) < 1e-3
    assert manifest["grids"]["network"]["size"][0] % 16 == 0


def test_init_is_composed_into_one_transform(identity_weights, tmp_path):
    """moving = fixed shifted by 6 mm: --init center finds it, and the one displacement file
    resamples the moving image onto the fixed one (SimpleITK reading our file)."""
    shift = (6.0, -4.0, 3.0)
    fixed = phantom((36, 36, 36), (1.5, 1.5, 1.5))
    moving = phantom((36, 36, 36), (1.5, 1.5, 1.5), shift_mm=shift)
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    out = tmp_path / "run"
    register(RegisterOptions(fixed=str(tmp_path / "f.nii.gz"), moving=str(tmp_path / "m.nii.gz"),
                             out=str(out), init="center", weights=str(identity_weights), device="cpu"))
    manifest = json.loads((out / "manifest.json").read_text())
    m = np.asarray(manifest["matrix_lps"])
    assert np.allclose(m[:3, 3], shift, atol=0.5)  # mm
    field = sitk.ReadImage(str(out / "displacement.mha"), sitk.sitkVectorFloat64)
    u = sitk.GetArrayFromImage(field)
    assert np.allclose(u.reshape(-1, 3).mean(0), shift, atol=0.5)
    tfm = sitk.DisplacementFieldTransform(field)
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tfm, sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.mha")))
    inner = (slice(6, -6),) * 3
    assert np.abs(by_sitk - ours)[inner].max() < 1e-3
    assert np.abs(ours - sitk.GetArrayFromImage(fixed))[inner].max() < 0.05
    assert (out / "initial_transform.tfm").is_file()
    assert manifest["metrics"]["ncc_after"] > manifest["metrics"]["ncc_before"]


def test_labels_and_landmarks_are_scored(identity_weights, tmp_path):
    fixed = phantom((24, 24, 24), (2.0, 2.0, 2.0))
    labels = sitk.Cast(fixed > 0.5, sitk.sitkInt16)
    for name, img in (("f.nii.gz", fixed), ("m.nii.gz", fixed), ("fl.nii.gz", labels), ("ml.nii.gz", labels)):
        sitk.WriteImage(img, str(tmp_path / name))
    pts = "x,y,z\n10,12,14\n20,22,24\n"
    (tmp_path / "fp.csv").write_text(pts)
    (tmp_path / "mp.csv").write_text("x,y,z\n11,12,14\n20,25,24\n")
    out = tmp_path / "run"
    register(RegisterOptions(fixed=str(tmp_path / "f.nii.gz"), moving=str(tmp_path / "m.nii.gz"), out=str(out),
                             fixed_labels=str(tmp_path / "fl.nii.gz"), moving_labels=str(tmp_path / "ml.nii.gz"),
                             fixed_landmarks=str(tmp_path / "fp.csv"), moving_landmarks=str(tmp_path / "mp.csv"),
                             weights=str(identity_weights), device="cpu", qa=False, init="none"))
    met = json.loads((out / "manifest.json").read_text())["metrics"]
    assert met["dice_after"]["1"] == pytest.approx(1.0)
    assert met["tre_before_mm"] == pytest.approx(2.0)  # (1 + 3) / 2 mm
    assert met["tre_after_mm"] == pytest.approx(2.0, abs=1e-3)  # identity network
    assert met["folding_percent"] == 0.0


def test_refine_improves_a_deformed_pair(identity_weights, tmp_path):
    fixed = phantom((32, 32, 32), (2.0, 2.0, 2.0))
    moving = phantom((32, 32, 32), (2.0, 2.0, 2.0), shift_mm=(3.0, 0.0, 0.0))
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    out = tmp_path / "run"
    register(RegisterOptions(fixed=str(tmp_path / "f.nii.gz"), moving=str(tmp_path / "m.nii.gz"), out=str(out),
                             refine=40, weights=str(identity_weights), device="cpu", qa=False, init="none"))
    met = json.loads((out / "manifest.json").read_text())["metrics"]
    assert met["ncc_after"] > met["ncc_before"] + 0.005
    u = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.mha")))
    centre = u[8:-8, 8:-8, 8:-8].reshape(-1, 3).mean(0)
    assert 1.0 < centre[0] < 4.0, centre  # toward the true +3 mm shift along x


def test_device_names_are_checked():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(BadInputError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="CUDA"):
            resolve_device("cuda:0")


def test_unknown_method_option_is_bad_input(identity_weights, tmp_path):
    fixed = phantom((16, 16, 16), (2.0, 2.0, 2.0))
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    with pytest.raises(BadInputError, match="no option"):
        register(RegisterOptions(fixed=str(tmp_path / "f.nii.gz"), moving=str(tmp_path / "f.nii.gz"),
                                 out=str(tmp_path / "run"), weights=str(identity_weights), device="cpu",
                                 method_options={"window": 3}, init="none"))
    assert not (tmp_path / "run").exists()


def test_method_options_parse_as_json():
    from deepreglib.cli import parse_method_options
    assert parse_method_options(["query_point=[1, -2.5, 3]", "samples=16", "fit=ransac"]) == \
        {"query_point": [1, -2.5, 3], "samples": 16, "fit": "ransac"}
    with pytest.raises(BadInputError):
        parse_method_options(["no-equals-sign"])
