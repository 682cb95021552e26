"""``deepreg qa`` (deepreglib.report.transform_qa): DeformationQA's numbers on transforms with known
answers, in the engine (fast, in-process) and once through the worker command."""
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from deepreglib.core.errors import BadInputError
from deepreglib.io import images as dio
from deepreglib.report import transform_qa as tqa

SHAPE_XYZ = (10, 9, 8)
SPACING = (1.5, 1.0, 2.0)
ORIGIN = (-5.0, 3.0, 10.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated axes: geometry must not matter


def _reference(arr=None):
    img = sitk.GetImageFromArray(np.zeros(SHAPE_XYZ[::-1], np.float32) if arr is None else arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    return img


def _affine(matrix, translation=(0.0, 0.0, 0.0)):
    t = sitk.AffineTransform(3)
    t.SetMatrix(np.asarray(matrix, float).ravel().tolist())
    t.SetTranslation(list(translation))
    return t


def test_scaling_has_known_jacobian_and_magnitude():
    ref = _reference()
    jac, magnitude, u_mm, stats = tqa.deformation_maps(_affine(np.eye(3) * 1.1), ref)
    np.testing.assert_allclose(jac, 1.331, atol=1e-4)
    assert jac.shape == SHAPE_XYZ[::-1]
    assert stats["folding_percent"] == 0.0 and stats["sdlogj"] == pytest.approx(0.0, abs=1e-5)
    p = np.array(ref.TransformIndexToPhysicalPoint((2, 3, 4)))
    assert magnitude[4, 3, 2] == pytest.approx(0.1 * np.linalg.norm(p), rel=1e-5)


def test_reflection_folds_everywhere():
    jac, _, _, stats = tqa.deformation_maps(_affine(np.diag([-1.0, 1.0, 1.0])), _reference())
    np.testing.assert_allclose(jac, -1.0, atol=1e-5)
    assert stats["folding_percent"] == pytest.approx(100.0)


def test_displacement_field_image_with_a_known_ramp(tmp_path):
    """u_x = 0.2 (x - x0) in LPS mm, as a displacement-field image file: det J = 1.2 inside."""
    ref = _reference()
    field = np.zeros(SHAPE_XYZ[::-1] + (3,))
    for idx in np.ndindex(*SHAPE_XYZ):
        x = ref.TransformIndexToPhysicalPoint(idx)[0]
        field[idx[::-1]][0] = 0.2 * (x - ORIGIN[0])
    img = sitk.GetImageFromArray(field, isVector=True)
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(tmp_path / "field.nrrd"))
    jac, magnitude, _, _ = tqa.deformation_maps(tqa.read_transform(tmp_path / "field.nrrd"), ref)
    np.testing.assert_allclose(jac[1:-1, 1:-1, 1:-1], 1.2, atol=1e-4)
    assert magnitude.max() == pytest.approx(np.abs(field[..., 0]).max(), rel=1e-5)


def test_inverse_consistency_exact_given_and_numerical():
    ref = _reference()
    forward = _affine(np.diag([1.1, 0.9, 1.0]), (2.0, 0.0, -1.0))
    _, _, u, _ = tqa.deformation_maps(forward, ref)
    exact = tqa.inverse_transform(forward, ref, u)
    assert tqa.inverse_consistency(forward, exact, ref)["max"] < 1e-9
    wrong = _affine(np.eye(3))
    assert tqa.inverse_consistency(forward, wrong, ref)["mean"] > 1.0
    # a smooth field: ITK's numerical inverse brings points back within a small fraction of a voxel
    field = np.zeros(SHAPE_XYZ[::-1] + (3,))
    k = np.arange(SHAPE_XYZ[2])[:, None, None]
    field[..., 1] = 0.6 * np.sin(k / 3.0)
    img = sitk.GetImageFromArray(field, isVector=True)
    img.CopyInformation(ref)
    smooth = sitk.DisplacementFieldTransform(sitk.Image(img))
    _, _, u, _ = tqa.deformation_maps(smooth, ref)
    numerical = tqa.inverse_transform(smooth, ref, u)
    assert tqa.inverse_consistency(smooth, numerical, ref)["mean"] < 0.05


def test_landmark_errors_before_and_after(tmp_path):
    p = np.array([[0.0, 0.0, 0.0], [10.0, 5.0, -2.0]])
    shift = np.array([3.0, -4.0, 0.0])
    q = p + shift + np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    dio.write_markups_json(tmp_path / "f.mrk.json", p, ["L0", "L1"])
    dio.write_markups_json(tmp_path / "m.mrk.json", q, ["L0", "L1"])
    res = tqa.landmark_errors(_affine(np.eye(3), shift), tmp_path / "f.mrk.json", tmp_path / "m.mrk.json")
    assert res["after"]["mean"] == pytest.approx(0.5)  # 0 and 1 mm
    assert res["before"]["max"] == pytest.approx(np.sqrt(9 + 16 + 1))
    assert [r[0] for r in res["per_point"]] == ["L0", "L1"]
    dio.write_markups_json(tmp_path / "one.mrk.json", q[:1])
    with pytest.raises(BadInputError, match="same number"):
        tqa.landmark_errors(_affine(np.eye(3)), tmp_path / "f.mrk.json", tmp_path / "one.mrk.json")


def test_label_overlap_resamples_onto_the_reference(tmp_path):
    a = np.zeros(SHAPE_XYZ[::-1], np.int16)
    b = np.zeros(SHAPE_XYZ[::-1], np.int16)
    a[2:6, 2:6, 2:6] = 1
    b[2:6, 2:6, 4:8] = 1  # shifted by 2 voxels along i (2 x 1.5 mm)
    ref = _reference()
    sitk.WriteImage(_reference(a), str(tmp_path / "a.nrrd"))
    sitk.WriteImage(_reference(b), str(tmp_path / "b.nrrd"))
    res = tqa.label_overlap(tmp_path / "a.nrrd", tmp_path / "b.nrrd", ref)
    assert res["dice"]["1"] == pytest.approx(0.5)
    assert res["hd95_mm"]["1"] == pytest.approx(3.0)
    # the same labels on a grid twice as fine: resampled (nearest) onto the reference, same answer
    fine = sitk.Resample(_reference(b), [2 * s for s in SHAPE_XYZ], sitk.Transform(), sitk.sitkNearestNeighbor,
                         ORIGIN, [s / 2 for s in SPACING], DIRECTION)
    sitk.WriteImage(fine, str(tmp_path / "b_fine.nrrd"))
    assert tqa.label_overlap(tmp_path / "a.nrrd", tmp_path / "b_fine.nrrd", ref)["dice"]["1"] == pytest.approx(0.5)


def test_bad_inputs_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        tqa.read_transform(tmp_path / "missing.h5")
    sitk.WriteImage(_reference(), str(tmp_path / "scalar.nrrd"))
    with pytest.raises(BadInputError, match="not a 3D displacement field"):
        tqa.read_transform(tmp_path / "scalar.nrrd")
    (tmp_path / "junk.tfm").write_text("not a transform")
    with pytest.raises(BadInputError, match="cannot read"):
        tqa.read_transform(tmp_path / "junk.tfm")
    opts = tqa.QAOptions(transform=str(tmp_path / "t.tfm"), reference=str(tmp_path / "scalar.nrrd"),
                         out=str(tmp_path / "out"), fixed_landmarks=str(tmp_path / "f.mrk.json"))
    dio.write_linear_transform(np.eye(4), tmp_path / "t.tfm")
    with pytest.raises(BadInputError, match="give both"):
        tqa.run_qa(opts)
    assert not (tmp_path / "out").exists()


def test_worker_command_writes_maps_and_manifest(tmp_path):
    """``deepreg qa`` end to end, as DeformationQA runs it: JSON lines, the maps on the
    reference grid, the numbers in the manifest, and a refusal (exit 2) of a used folder."""
    ref = _reference()
    sitk.WriteImage(ref, str(tmp_path / "ref.nrrd"))
    m = np.eye(4)
    m[:3, :3] = np.eye(3) * 1.1
    dio.write_linear_transform(m, tmp_path / "t.h5")
    cmd = [sys.executable, "-m", "deepreglib", "qa", "--transform", str(tmp_path / "t.h5"), "--reference",
           str(tmp_path / "ref.nrrd"), "--out", str(tmp_path / "out"), "--progress", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1]["event"] == "result"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["inverse"] == "exact"
    assert manifest["metrics"]["inverse_consistency_mm"]["max"] < 1e-6
    jac = sitk.ReadImage(str(tmp_path / "out" / "jacobian.nrrd"))
    assert jac.GetSize() == ref.GetSize() and np.allclose(jac.GetDirection(), DIRECTION)
    np.testing.assert_allclose(sitk.GetArrayFromImage(jac), 1.331, atol=1e-4)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "not empty" in again.stdout
