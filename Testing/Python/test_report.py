"""The QA picture: valid PNG, panels where the layout says, colours that mean what they claim, and
a manifest read back into the right arrays (geometry with a non-identity direction)."""
import json
import math
import warnings
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepreglib.report import qa as report
from deepreglib.report import qa_page, qa_text
from deepreglib.core.errors import BadInputError
from deepreglib.core.geometry import Grid, displacement_voxel_to_mm

SHAPE = (24, 28, 20)  # (D, H, W)


def _blob(shape=SHAPE, centre=None, radius=0.35):
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    k, j, i = np.meshgrid(*axes, indexing="ij")
    c = [n / 2.0 for n in shape] if centre is None else centre
    r2 = sum(((a - ca) / (radius * n)) ** 2 for a, ca, n in zip((k, j, i), c, shape))
    return np.exp(-r2).astype(np.float32)


def _smooth_field(shape=SHAPE, amplitude=2.0):
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    k, j, i = np.meshgrid(*axes, indexing="ij")
    return amplitude * np.stack([np.sin(2 * math.pi * j / shape[1]),
                                 np.sin(2 * math.pi * i / shape[2]),
                                 np.sin(2 * math.pi * k / shape[0])]).astype(np.float32)


def _read(path):
    a = mpimg.imread(str(path))
    assert a.ndim == 3 and a.shape[2] in (3, 4)
    return a[..., :3]


def _cell_px(shape, spacing, row, col, margin=3):
    """Pixel rows/cols of panel (row, col) as the report lays it out, shrunk by ``margin``."""
    lay = qa_page.Layout.for_volume(shape, np.asarray(spacing, dtype=np.float64))
    x, y, w, h = (v * qa_page.DPI for v in lay.cell(row, col))
    return (slice(int(math.ceil(y)) + margin, int(y + h) - margin),
            slice(int(math.ceil(x)) + margin, int(x + w) - margin))


def _magenta(rgb):
    return (rgb[..., 0] > 0.85) & (rgb[..., 1] < 0.2) & (rgb[..., 2] > 0.85)


def _cyan(rgb):
    return (rgb[..., 0] < 0.2) & (rgb[..., 1] > 0.75) & (rgb[..., 2] > 0.85)


def _grid_green(rgb):
    return (rgb[..., 1] > 0.8) & (rgb[..., 0] < 0.5) & (rgb[..., 2] < 0.5)


def _render(tmp_path, name, **kw):
    img = kw.pop("img", _blob())
    args = dict(fixed=img, moving=img, warped=img, jacobian=np.ones(SHAPE, np.float32))
    args.update(kw)
    return report.render_qa_png(tmp_path / name, **args)


# -- the PNG ------------------------------------------------------------------------------------
def test_png_is_written_atomically_with_a_sensible_size(tmp_path):
    u = _smooth_field()
    out = report.render_qa_png(tmp_path / "sub" / "qa.png", _blob(), _blob(centre=(11, 15, 9)),
                               _blob(), None, displacement=u, spacing=(1.5, 0.9, 1.2),
                               metrics={"method": "voxelmorph", "ncc_before": 0.5,
                                        "ncc_after": 0.9, "timings": {"total": 1.25}},
                               title="test")
    assert out == tmp_path / "sub" / "qa.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = _read(out)
    h, w, _ = rgb.shape
    assert 500 <= h <= 1500 and 1500 <= w <= 2500, (h, w)
    assert [p.name for p in out.parent.iterdir()] == ["qa.png"]  # no temp file left behind
    assert rgb.std() > 0.1  # not a blank page


def _all_cells(shape=SHAPE, spacing=(1, 1, 1), cols=range(8)):
    return [_cell_px(shape, spacing, r, c) for r in range(3) for c in cols]


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    """The renders several tests look at (rendering is the slow part, so do each once)."""
    tmp = tmp_path_factory.mktemp("renders")
    zero_u = np.zeros((3,) + SHAPE, np.float32)
    jac = np.ones(SHAPE, np.float32)
    jac[10:15, 12:17, 8:13] = -0.5  # folding around the centre slices (12, 14, 10)
    jac[-3:] = 0.2                  # highest k: top of the coronal and sagittal panels
    jac[:, :3, :] = 0.2             # lowest j: top of the axial panel
    labels = (_blob() > 0.5).astype(np.int32)
    labels[_blob(centre=(12, 10, 10), radius=0.15) > 0.5] = 2
    return {
        "identity": _read(_render(tmp, "id1.png", displacement=zero_u)),
        "deformed": _read(_render(tmp, "def.png", displacement=_smooth_field())),
        "folded": _read(_render(tmp, "fold.png", jacobian=jac, displacement=None,
                                labels_fixed=labels, labels_warped=labels)),
    }


def test_only_the_grid_panel_sees_the_field(renders):
    a, c = renders["identity"], renders["deformed"]
    changed = np.abs(a - c).max(axis=-1) > 0.1
    # the Jacobian is passed explicitly (all ones), so the deformed-grid column alone may change
    col6 = np.zeros_like(changed)
    for r in range(3):
        col6[_cell_px(SHAPE, (1, 1, 1), r, 6, margin=-3)] = True
    assert changed[col6].sum() > 300
    assert not changed[~col6].any()


def test_identity_grid_lines_are_straight_and_absent_without_a_field(renders):
    rows, cols = _cell_px(SHAPE, (1, 1, 1), 0, 6)
    green = _grid_green(renders["identity"][rows, cols])
    # a straight line fills (almost) a whole pixel column / row of the axial panel
    assert green.mean(axis=0).max() > 0.95
    assert green.mean(axis=1).max() > 0.95
    assert not _grid_green(renders["folded"][rows, cols]).any()


def test_folding_voxels_show_magenta_in_the_jacobian_panel(renders):
    for r in range(3):
        assert _magenta(renders["folded"][_cell_px(SHAPE, (1, 1, 1), r, 7)]).sum() > 200, r
    # det = 1 everywhere: the folding colour appears in no panel (only in the colour bar's key)
    assert not any(_magenta(renders["identity"][cell]).any() for cell in _all_cells())


def test_folding_overlay_includes_det_equal_zero():
    rgba = qa_page.folding_overlay(np.array([[-1.0, 0.0], [1e-6, 2.0]]), 1.0)
    np.testing.assert_array_equal(rgba[..., 3], [[1, 1], [0, 0]])
    np.testing.assert_array_equal(rgba[0, 1, :3], report.FOLDING_RGB)


def test_orientation_axial_j_down_coronal_and_sagittal_k_up(renders):
    for r in range(3):
        cell = renders["folded"][_cell_px(SHAPE, (1, 1, 1), r, 7)]
        blue = cell[..., 2] > cell[..., 0] + 0.3
        n = cell.shape[0]
        assert blue[: n // 12].mean() > 0.8 and blue[n // 2:].mean() < 0.2, r


def test_label_contours_on_warped_panel(renders):
    for r in range(3):
        cell = _cell_px(SHAPE, (1, 1, 1), r, 2)
        assert _cyan(renders["folded"][cell]).sum() > 40, r
    assert not any(_cyan(renders["identity"][cell]).any() for cell in _all_cells())


def test_jacobian_computed_from_displacement_torch_inputs_and_slice_index(tmp_path):
    img = torch.from_numpy(_blob())[None, None]
    u = torch.zeros((1, 3) + SHAPE)
    u[0, 2] = -1.5 * torch.arange(SHAPE[2], dtype=torch.float32)  # d u_i / d i = -1.5: det -0.5
    out = report.render_qa_png(tmp_path / "t.png", img, img, img, None, displacement=u,
                               slice_index=(3, 4, 5))
    rgb = _read(out)
    for r in range(3):
        assert _magenta(rgb[_cell_px(SHAPE, (1, 1, 1), r, 7)]).mean() > 0.9, r


def test_constant_and_nan_images_do_not_warn_and_aspect_follows_spacing(tmp_path):
    shape, spacing = (10, 40, 40), (3.0, 1.0, 1.0)  # coronal/sagittal are 30 mm x 40 mm
    const = np.full(shape, 7.0, np.float32)  # constant: mid grey, while the figure is white
    nan = np.full(shape, np.nan, np.float32)
    zeros = np.zeros(shape, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = report.render_qa_png(tmp_path / "c.png", const, nan, zeros, np.ones(shape),
                                   displacement=np.zeros((3,) + shape), spacing=spacing,
                                   metrics={}, labels_fixed=zeros, labels_warped=zeros)
    rgb = _read(out)
    for r, expected in enumerate((1.0, 0.75, 0.75)):
        cell = rgb[_cell_px(shape, spacing, r, 0, margin=-5)]
        grey = (np.abs(cell - 0.5) < 0.06).all(axis=-1)
        ys, xs = np.nonzero(grey)
        ratio = (ys.max() - ys.min() + 1) / (xs.max() - xs.min() + 1)
        assert abs(ratio - expected) < 0.04, (r, ratio)


@pytest.mark.parametrize("kwargs, match", [
    (dict(moving=np.zeros((24, 28, 21))), "moving"),
    (dict(displacement=np.zeros((2,) + SHAPE)), "displacement"),
    (dict(spacing=(1.0, 0.0, 1.0)), "spacing"),
    (dict(spacing=(1.0, 1.0)), "spacing"),
    (dict(slice_index=(0, 28, 0)), "outside"),
    (dict(jacobian=np.ones((24, 28))), "jacobian"),
])
def test_bad_input_raises_value_error(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _render(tmp_path, "bad.png", **kwargs)
    assert not (tmp_path / "bad.png").exists()


def test_metric_rows_pair_before_and_after_and_format_units():
    rows = dict(qa_text.metric_rows({
        "ncc_before": 0.51234, "ncc_after": 0.9,
        "dice": {"before": 0.7, "after": 0.85}, "folding_fraction": 0.0025,
        "time": 12.345, "method": "carnet", "sdlogj": 0.0812, "tre_before_mm": 5.25,
        "tre_after_mm": 1.5,
        "hd95": {"before": {str(i): 1.0 for i in range(20)}}}))
    assert rows["Method"] == "carnet"
    assert rows["NCC"] == "0.5123 \u2192 0.9"
    assert rows["Dice"] == "0.7 \u2192 0.85"
    assert rows["Folding"] == "0.25 %"
    assert rows["Time"] == "12.35 s"
    assert rows["SDlogJ"] == "0.0812"
    assert rows["TRE"] == "5.25 mm \u2192 1.5 mm"
    assert rows["HD95"] == "per label: see manifest"  # 20 labels are not listed one by one
    assert list(rows)[0] == "Method"


# -- from a manifest ----------------------------------------------------------------------------
def _rotation(ax_deg, az_deg):
    a, b = math.radians(ax_deg), math.radians(az_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    return rz @ rx


FIXED_GRID = Grid(SHAPE, (1.2, 0.9, 1.5), (10.0, -20.0, 5.0), tuple(_rotation(20, 30).ravel()))
SLOPE = np.array([0.3, -0.2, 0.5])  # moving intensity = SLOPE . p + 40: linear, so exact


def _image(arr, grid, vector=False):
    img = sitk.GetImageFromArray(arr, isVector=vector)
    return grid.apply_to(img)


def _write_case(tmp_path, with_field=True):
    run = tmp_path / "run"
    run.mkdir()
    fixed = _image(_blob() * 100, FIXED_GRID)
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    # moving: a bigger grid around the fixed one, same direction, iso 1 mm
    mgrid = FIXED_GRID.centered_like((40, 40, 40), (1.0, 1.0, 1.0))
    pts = mgrid.index_to_physical(np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), -1))
    sitk.WriteImage(_image((pts @ SLOPE + 40).astype(np.float32), mgrid),
                    str(run / "moving.nrrd"))
    sitk.WriteImage(fixed, str(run / "warped.nii.gz"))
    labels = (_blob() > 0.5).astype(np.uint8)
    sitk.WriteImage(_image(labels, FIXED_GRID), str(run / "fixed_labels.nii.gz"))
    sitk.WriteImage(_image(labels * 2, FIXED_GRID), str(run / "warped_labels.nii.gz"))
    outputs = [{"name": "warped", "kind": "volume", "path": "warped.nii.gz"},
               {"name": "warped_labels", "kind": "labels", "path": "warped_labels.nii.gz"}]
    u_vox = None
    if with_field:
        k = np.arange(SHAPE[0], dtype=np.float64).reshape(-1, 1, 1)
        u_vox = np.zeros((1, 3) + SHAPE)
        u_vox[0, 0] = 0.1 * k  # d u_k / d k = 0.1: det J = 1.1 everywhere
        u_mm = displacement_voxel_to_mm(torch.from_numpy(u_vox), FIXED_GRID)[0].numpy()
        u_mm = u_mm + np.array([2.0, 0.0, 0.0]).reshape(3, 1, 1, 1)  # plus 2 mm along x (LPS)
        sitk.WriteImage(_image(np.moveaxis(u_mm, 0, -1), FIXED_GRID, vector=True),
                        str(run / "displacement.nii.gz"))
        # as the pipeline writes it: an inverse field on the moving grid may come first
        sitk.WriteImage(_image(np.ones((40, 40, 40, 3)), mgrid, vector=True),
                        str(run / "inverse_displacement.nii.gz"))
        outputs.append({"name": "inverse_transform", "kind": "displacement_field",
                        "path": "inverse_displacement.nii.gz"})
        outputs.append({"name": "transform", "kind": "displacement_field",
                        "path": "displacement.nii.gz"})
    else:
        sitk.WriteTransform(sitk.TranslationTransform(3, (2.0, 0.0, 0.0)),
                            str(run / "transform.tfm"))
        outputs.append({"name": "transform", "kind": "linear_transform", "path": "transform.tfm"})
    manifest = {"format": "deepreg-manifest/1", "method": "voxelmorph",
                "inputs": {"fixed": str(tmp_path / "fixed.nii.gz"), "moving": "moving.nrrd",
                           "fixed_labels": "fixed_labels.nii.gz"},
                "outputs": outputs,
                "metrics": {"ncc_before": 0.5, "ncc_after": 0.9, "dice_before": {"1": 0.6},
                            "dice_after": {"1": 0.8}},
                "timings": {"total": 1.5, "inference": 0.2}, "device": "cpu"}
    path = run / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path, u_vox


def _shift_voxels_for_2mm_x():
    """(k, j, i) voxel shift of a constant 2 mm LPS-x displacement, from the ITK index formula."""
    m = FIXED_GRID.direction_matrix @ np.diag(FIXED_GRID.spacing)  # (i, j, k) -> (x, y, z)
    return np.linalg.solve(m, [2.0, 0.0, 0.0])[::-1]


@pytest.mark.parametrize("with_field", [True, False])
def test_report_from_manifest_reads_geometry_right(tmp_path, monkeypatch, with_field):
    path, u_vox = _write_case(tmp_path, with_field)
    seen = {}

    def capture(out, fixed, moving, warped, jacobian, **kw):
        seen.update(out=out, fixed=fixed, moving=moving, warped=warped, jacobian=jacobian, **kw)
        return Path(out)

    monkeypatch.setattr(report, "render_qa_png", capture)
    report.report_from_manifest(path)
    assert seen["out"] == path.parent / "qa.png"
    np.testing.assert_allclose(seen["spacing"], (1.5, 0.9, 1.2))
    np.testing.assert_allclose(seen["fixed"], _blob() * 100, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(seen["warped"], seen["fixed"])
    # moving, resampled through the identity in physical space, is the linear ramp at fixed points
    pts = FIXED_GRID.index_to_physical(
        np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1))
    np.testing.assert_allclose(seen["moving"], pts @ SLOPE + 40, atol=1e-3)
    shift = _shift_voxels_for_2mm_x().reshape(3, 1, 1, 1)
    expected_u = shift + (u_vox[0] if with_field else 0.0)
    np.testing.assert_allclose(seen["displacement"], np.broadcast_to(expected_u, (3,) + SHAPE),
                               atol=1e-4)
    np.testing.assert_allclose(seen["jacobian"], 1.1 if with_field else 1.0, atol=1e-4)
    assert (seen["labels_fixed"] == (_blob() > 0.5)).all()
    assert (seen["labels_warped"] == 2 * (_blob() > 0.5)).all()
    m = seen["metrics"]
    assert (m["method"], m["device"], m["time"], m["ncc_after"]) == ("voxelmorph", "cpu", 1.5, 0.9)
    assert "voxelmorph" in seen["title"] and "moving" in seen["title"]


def test_report_from_manifest_writes_png(tmp_path):
    path, _ = _write_case(tmp_path)
    out = report.report_from_manifest(path, tmp_path / "out" / "qa.png")
    assert out == tmp_path / "out" / "qa.png"
    rgb = _read(out)
    assert rgb.shape[1] > 1500
    assert _grid_green(rgb[_cell_px(SHAPE, FIXED_GRID.spacing_kji, 0, 6)]).any()


def test_report_from_manifest_rejects_bad_manifests(tmp_path):
    path, _ = _write_case(tmp_path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps(dict(data, format="something/2")))
    with pytest.raises(BadInputError, match="format"):
        report.report_from_manifest(path)
    data["outputs"][0]["path"] = "missing.nii.gz"
    path.write_text(json.dumps(data))
    with pytest.raises(BadInputError, match="missing.nii.gz"):
        report.report_from_manifest(path)
