"""deepreglib.io.images: image/label/field/transform/landmark files, checked against SimpleITK itself."""
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from deepreglib.core import fields, geometry
from deepreglib.io import images as dio
from deepreglib.core.errors import BadInputError
from deepreglib.core.geometry import Grid
from deepreglib.core.warp import warp

SPACING = (0.9, 1.3, 2.1)
ORIGIN = (-30.0, 12.5, 4.0)


from helpers import rotation  # noqa: E402


DIRECTION = rotation(0.35, -0.2, 0.8)


def oblique_grid(shape=(12, 14, 16)) -> Grid:
    return Grid(shape, SPACING, ORIGIN, DIRECTION.ravel())


def smooth_volume(shape, seed=0) -> np.ndarray:
    """A smooth float32 volume with values in about [0, 100] (no two voxels alike by accident)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0.0, 100.0, size=(1, 1, 4, 4, 4)))
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy() \
        .astype(np.float32)


def smooth_field(shape, amplitude=1.5, seed=1) -> torch.Tensor:
    """A smooth random ``(1, 3, D, H, W)`` voxel displacement, at most ``amplitude`` voxels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 3, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    return (amplitude * F.interpolate(coarse, size=shape, mode="trilinear",
                                      align_corners=True)).to(torch.float32)


def image_on(grid: Grid, arr: np.ndarray) -> sitk.Image:
    return grid.apply_to(sitk.GetImageFromArray(arr))


def assert_same_geometry(a: sitk.Image, b: sitk.Image, atol=1e-6):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)


def tmp_leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".deepreg-tmp")]


# -- images ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_image_round_trip_keeps_geometry_and_values(tmp_path, ext):
    grid = oblique_grid()
    arr = smooth_volume(grid.shape)
    img = image_on(grid, arr)
    path = tmp_path / "sub" / f"vol{ext}"
    dio.write_image(img, path)
    back = dio.read_image(path)
    # NIfTI stores the direction as a float32 quaternion: 1e-6 covers it
    assert_same_geometry(back, img, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
    assert tmp_leftovers(path.parent) == []


def test_image_tensor_round_trip():
    grid = oblique_grid()
    arr = smooth_volume(grid.shape)
    t, g = dio.image_to_tensor(image_on(grid, arr))
    assert t.shape == (1, 1, *grid.shape) and t.dtype == torch.float32 and g == grid
    np.testing.assert_array_equal(t[0, 0].numpy(), arr)
    img = dio.tensor_to_image(t, grid)
    assert img.GetPixelID() == sitk.sitkFloat32 and Grid.from_sitk(img) == grid
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)
    # (D, H, W) works too; float -> integer type rounds to nearest and clips to the type's range
    t3 = torch.full(grid.shape, 2.7)
    t3[0, 0, 0] = -5.0
    t3[0, 0, 1] = 300.0
    lab = dio.tensor_to_image(t3, grid, sitk.sitkUInt8)
    a = sitk.GetArrayFromImage(lab)
    assert lab.GetPixelID() == sitk.sitkUInt8
    assert a[1, 1, 1] == 3 and a[0, 0, 0] == 0 and a[0, 0, 1] == 255
    # uint16 images (no torch equivalent) come in as float32
    t16, _ = dio.image_to_tensor(sitk.Cast(image_on(grid, arr), sitk.sitkUInt16))
    np.testing.assert_array_equal(t16[0, 0].numpy(), arr.astype(np.uint16).astype(np.float32))
    with pytest.raises(ValueError):
        dio.tensor_to_image(torch.zeros(1, 1, 3, 3, 3), grid)


def write_dicom_series(vol: sitk.Image, folder: Path, series_uid: str, prefix: str = "slice"):
    """One DICOM file per axial slice of an int16 ``vol`` (geometry in the position/orientation
    tags, which is what the series reader uses)."""
    folder.mkdir(parents=True, exist_ok=True)
    d = vol.GetDirection()
    orientation = "\\".join(f"{v:.12f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our UIDs so the slices form one series
    for k in range(vol.GetDepth()):
        slice_k = vol[:, :, k]
        position = vol.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",  # MR image storage
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.8.498.1",
            "0020|000e": series_uid,
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.12f}" for v in position),
            "0020|0013": str(k + 1),
            "0018|0050": str(vol.GetSpacing()[2]),
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(slice_k)


def test_dicom_series_folder(tmp_path, caplog):
    grid = oblique_grid((6, 7, 8))
    arr = np.random.default_rng(3).integers(-800, 2000, size=grid.shape).astype(np.int16)
    vol = image_on(grid, arr)
    folder = tmp_path / "dicom"
    write_dicom_series(vol, folder, "1.2.826.0.1.3680043.8.498.2")
    # a second, smaller series in the same folder must be ignored, with a warning
    small = image_on(oblique_grid((3, 7, 8)), arr[:3].copy())
    write_dicom_series(small, folder, "1.2.826.0.1.3680043.8.498.3", prefix="other")
    with caplog.at_level(logging.WARNING, logger="deepreglib.io.images"):
        img = dio.read_image(folder)
    assert "2 DICOM series" in caplog.text
    assert_same_geometry(img, vol, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)
    # one file of the series stands for its whole series (here: the smaller one)
    one = dio.read_image(folder / "other001.dcm")
    assert one.GetSize() == (8, 7, 3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(one), arr[:3])


def test_4d_with_one_time_point_is_squeezed(tmp_path):
    grid = oblique_grid((4, 5, 6))
    arr = smooth_volume(grid.shape)
    img4 = sitk.JoinSeries([image_on(grid, arr)])
    assert img4.GetDimension() == 4
    path = tmp_path / "one_frame.nii.gz"
    sitk.WriteImage(img4, str(path))
    img = dio.read_image(path)
    assert img.GetDimension() == 3
    assert_same_geometry(img, image_on(grid, arr), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)


def _write(img: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(img, str(path))
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "nope.nii.gz", "not found"),
    "garbage": (lambda d: (d / "garbage.nii.gz").write_bytes(os.urandom(2048)) and
                d / "garbage.nii.gz", "cannot read"),
    "truncated_nii": (lambda d: _truncated(d, ".nii"), "truncated"),
    "truncated_nii_gz": (lambda d: _truncated(d, ".nii.gz"), "truncated"),
    "truncated_mha": (lambda d: _truncated(d, ".mha"), "cannot read"),
    "2d": (lambda d: _write(sitk.GetImageFromArray(np.random.rand(8, 9).astype(np.float32)),
                            d / "flat.nii.gz"), "2D"),
    "single_slice": (lambda d: _write(sitk.GetImageFromArray(
        np.random.rand(1, 8, 9).astype(np.float32)), d / "slice.nrrd"), "single slice"),
    "4d": (lambda d: _write(sitk.JoinSeries([sitk.GetImageFromArray(
        np.random.rand(4, 5, 6).astype(np.float32))] * 3), d / "series.nii.gz"), "time points"),
    "nan": (lambda d: _write(sitk.GetImageFromArray(_with(np.random.rand(4, 5, 6), np.nan)),
                             d / "nan.nrrd"), "NaN"),
    "inf": (lambda d: _write(sitk.GetImageFromArray(_with(np.random.rand(4, 5, 6), np.inf)),
                             d / "inf.mha"), "infinite"),
    "constant": (lambda d: _write(sitk.GetImageFromArray(np.full((4, 5, 6), 7, np.int16)),
                                  d / "const.nii.gz"), "empty"),
    "vector": (lambda d: _write(sitk.GetImageFromArray(np.random.rand(4, 5, 6, 3),
                                                       isVector=True), d / "rgb.nrrd"),
               "values per voxel"),
    "empty_folder": (lambda d: (d / "empty").mkdir() or d / "empty", "no DICOM"),
}


def _with(arr: np.ndarray, value: float) -> np.ndarray:
    arr = arr.astype(np.float32)
    arr[1, 2, 3] = value
    return arr


def _truncated(d: Path, ext: str) -> Path:
    """The first half of a valid file (ITK's NIfTI reader alone would zero-fill the rest)."""
    full = _write(sitk.GetImageFromArray(np.random.rand(16, 16, 16).astype(np.float32)),
                  d / f"full{ext}")
    cut = d / f"cut{ext}"
    data = full.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    return cut


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_helpful_error(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(BadInputError) as info:
        dio.read_image(path)
    message = str(info.value)
    assert expected in message
    assert len(message) > 50  # says how to fix it, not just what failed


def test_validate_image_in_memory():
    grid = oblique_grid((4, 5, 6))
    good = image_on(grid, smooth_volume(grid.shape))
    assert dio.validate_image(good, "fixed") is good
    with pytest.raises(BadInputError, match="fixed"):
        dio.validate_image(image_on(grid, np.zeros(grid.shape, np.float32)), "fixed")
    ok = dio.validate_image(image_on(grid, np.zeros(grid.shape, np.float32)), "mask",
                            allow_constant=True)
    assert ok.GetSize() == good.GetSize()


def test_read_labels(tmp_path):
    grid = oblique_grid((4, 5, 6))
    labels = np.random.default_rng(0).integers(0, 5, size=grid.shape)
    as_float = dio.write_image(image_on(grid, labels.astype(np.float32)), tmp_path / "f.nii.gz")
    img = dio.read_labels(as_float)
    assert img.GetPixelID() == sitk.sitkInt32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), labels)
    as_u8 = dio.write_image(image_on(grid, labels.astype(np.uint8)), tmp_path / "u.nrrd")
    assert dio.read_labels(as_u8).GetPixelID() == sitk.sitkUInt8
    blank = dio.write_image(image_on(grid, np.zeros(grid.shape, np.uint8)), tmp_path / "z.nrrd")
    assert dio.read_labels(blank).GetSize() == (6, 5, 4)  # an empty label map is allowed
    fractional = dio.write_image(image_on(grid, smooth_volume(grid.shape)), tmp_path / "i.mha")
    with pytest.raises(BadInputError, match="whole-number"):
        dio.read_labels(fractional)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    grid = oblique_grid((4, 5, 6))
    img = image_on(grid, smooth_volume(grid.shape))
    target = tmp_path / "out" / "vol.nii.gz"

    def half_write(image, path, useCompression=False):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    with pytest.raises(RuntimeError):
        dio.write_image(img, target)
    assert list(target.parent.iterdir()) == []
    monkeypatch.undo()
    dio.write_image(img, target)
    assert [p.name for p in target.parent.iterdir()] == ["vol.nii.gz"]
    with pytest.raises(BadInputError):
        dio.write_image(img, tmp_path / "vol.png")


# -- displacement fields ----------------------------------------------------------------------
def test_displacement_to_sitk_components_are_lps_mm():
    grid = oblique_grid((4, 5, 6))
    u = torch.zeros(1, 3, *grid.shape)
    u[0, 0] = 1.0  # one voxel along k, i.e. along ITK's third axis
    img = dio.displacement_to_sitk(u, grid)
    assert img.GetPixelID() == sitk.sitkVectorFloat64 and img.GetNumberOfComponentsPerPixel() == 3
    assert Grid.from_sitk(img) == grid
    np.testing.assert_allclose(img[2, 3, 1], DIRECTION[:, 2] * SPACING[2], atol=1e-6)
    with pytest.raises(ValueError):
        dio.displacement_to_sitk(torch.zeros(2, 3, *grid.shape), grid)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha", ".h5"])
def test_displacement_field_file_round_trip(tmp_path, ext):
    grid = oblique_grid()
    u = smooth_field(grid.shape)
    path = dio.write_displacement_field(u, grid, tmp_path / f"field{ext}")
    back, g = dio.read_displacement_field(path)
    assert g.shape == grid.shape
    np.testing.assert_allclose(g.spacing, grid.spacing, atol=1e-5)
    np.testing.assert_allclose(g.origin, grid.origin, atol=1e-5)
    np.testing.assert_allclose(g.direction, grid.direction, atol=1e-5)
    torch.testing.assert_close(back, u, atol=1e-4, rtol=0)
    assert tmp_leftovers(tmp_path) == []


def test_nifti_field_is_an_itk_vector_image(tmp_path):
    """SimpleITK writes NIfTI vector images with intent 1007 (vector) and LPS components, the
    convention ANTs uses; reading it back must not flip any component."""
    grid = oblique_grid((4, 5, 6))
    u = smooth_field(grid.shape)
    path = dio.write_displacement_field(u, grid, tmp_path / "field.nii.gz")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    assert reader.GetMetaData("intent_code") == "1007"
    on_disk = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    expected = geometry.displacement_voxel_to_mm(u.double(), grid)[0].permute(1, 2, 3, 0).numpy()
    np.testing.assert_allclose(on_disk, expected, atol=1e-9)


def _interior_mask(u: torch.Tensor, margin: float = 1.0) -> np.ndarray:
    """Voxels at least ``margin`` from the border whose target x + u(x) is inside the image by
    ``margin`` too: there both warps interpolate the same 8 neighbours and padding plays no part."""
    shape = u.shape[2:]
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape],
                                     indexing="ij"))
    target = idx + u[0]
    ok = torch.ones(shape, dtype=torch.bool)
    for axis, size in enumerate(shape):
        ok &= (idx[axis] >= margin) & (idx[axis] <= size - 1 - margin)
        ok &= (target[axis] >= margin) & (target[axis] <= size - 1 - margin)
    return ok.numpy()


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha", ".h5"])
def test_exported_field_resamples_like_engine_warp(tmp_path, ext):
    """ITK's resampling through our exported field equals the engine's warp: the physical
    meaning of the field survives export. Tolerance: 1e-4 of the intensity range (float32 vs
    float64 trilinear interpolation of the same samples)."""
    grid = oblique_grid()
    u = smooth_field(grid.shape, amplitude=2.0)
    moving_arr = smooth_volume(grid.shape, seed=5)
    moving = image_on(grid, moving_arr)
    engine = warp(torch.from_numpy(moving_arr)[None, None], u)[0, 0].numpy()

    path = dio.write_displacement_field(u, grid, tmp_path / f"field{ext}")
    if ext == ".h5":
        transform = sitk.ReadTransform(str(path))
    else:
        field = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
        transform = sitk.DisplacementFieldTransform(field)
    itk = sitk.GetArrayFromImage(sitk.Resample(moving, grid.reference_image(), transform,
                                               sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    mask = _interior_mask(u)
    assert mask.sum() > 0.3 * mask.size
    value_range = float(moving_arr.max() - moving_arr.min())
    err = np.abs(itk - engine)[mask].max()
    assert err < 1e-4 * value_range, err
    # and the warp is not the identity, so the comparison means something
    assert np.abs(engine - moving_arr)[mask].max() > 0.02 * value_range


# -- linear transforms ------------------------------------------------------------------------
def random_affine(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] = rotation(*rng.uniform(-0.3, 0.3, 3)) @ np.diag(rng.uniform(0.9, 1.1, 3))
    m[:3, 3] = rng.uniform(-3.0, 3.0, 3)
    return m


@pytest.mark.parametrize("ext", [".tfm", ".h5", ".txt", ".mat"])
def test_linear_transform_round_trip(tmp_path, ext):
    m = random_affine()
    path = dio.write_linear_transform(m, tmp_path / f"affine{ext}")
    np.testing.assert_allclose(dio.read_linear_transform(path), m, atol=1e-10)
    tfm = sitk.ReadTransform(str(path))
    p = np.array([10.0, -20.0, 5.0])
    np.testing.assert_allclose(tfm.TransformPoint(p.tolist()), m[:3, :3] @ p + m[:3, 3],
                               atol=1e-10)


def test_read_linear_transform_of_other_types(tmp_path):
    euler = sitk.Euler3DTransform((5.0, -3.0, 12.0), 0.1, -0.2, 0.3, (1.0, 2.0, 3.0))
    versor = sitk.VersorRigid3DTransform()
    versor.SetRotation((0.0, 0.6, 0.8), 0.4)
    versor.SetCenter((-4.0, 7.0, 1.0))
    versor.SetTranslation((0.5, 0.5, -2.0))
    translation = sitk.TranslationTransform(3, (1.5, -2.5, 3.5))
    similarity = sitk.Similarity3DTransform(1.2, (0.0, 0.0, 1.0), 0.5, (1.0, 0.0, 0.0),
                                            (10.0, 0.0, 0.0))
    composite = sitk.CompositeTransform([translation, euler, similarity])
    points = np.random.default_rng(0).uniform(-50, 50, size=(5, 3))
    for n, tfm in enumerate([euler, versor, translation, similarity, composite]):
        path = tmp_path / f"t{n}.tfm"
        sitk.WriteTransform(tfm, str(path))
        m = dio.read_linear_transform(path)
        for p in points:
            np.testing.assert_allclose(m[:3, :3] @ p + m[:3, 3], tfm.TransformPoint(p.tolist()),
                                       atol=1e-9)
    field_path = dio.write_displacement_field(torch.zeros(1, 3, 4, 4, 4),
                                              Grid.identity((4, 4, 4)), tmp_path / "f.h5")
    with pytest.raises(BadInputError, match="non-linear"):
        dio.read_linear_transform(field_path)
    with pytest.raises(BadInputError, match="not a single displacement"):
        dio.read_displacement_field(tmp_path / "t0.tfm")


def test_linear_transform_resamples_like_engine_warp(tmp_path):
    """sitk.Resample through the written .tfm equals warp with affine_to_field of the same
    physical matrix (tolerance 1e-4 of the intensity range, interior voxels)."""
    grid = oblique_grid()
    # a small rotation about the image centre plus a shift, in LPS mm
    centre = grid.corners().mean(axis=0)
    a = np.eye(4)
    a[:3, :3] = rotation(0.05, -0.04, 0.08)
    a[:3, 3] = centre - a[:3, :3] @ centre + np.array([1.0, -0.8, 0.6])
    path = dio.write_linear_transform(a, tmp_path / "affine.tfm")
    moving_arr = smooth_volume(grid.shape, seed=7)
    moving = image_on(grid, moving_arr)
    itk = sitk.GetArrayFromImage(sitk.Resample(moving, grid.reference_image(),
                                               sitk.ReadTransform(str(path)), sitk.sitkLinear,
                                               0.0, sitk.sitkFloat32))
    u = fields.affine_to_field(geometry.affine_voxel_matrix(a, grid, grid), grid.shape)
    engine = warp(torch.from_numpy(moving_arr)[None, None], u)[0, 0].numpy()
    mask = _interior_mask(u)
    assert mask.sum() > 0.2 * mask.size
    value_range = float(moving_arr.max() - moving_arr.min())
    assert np.abs(itk - engine)[mask].max() < 1e-4 * value_range
    assert np.abs(engine - moving_arr)[mask].max() > 0.02 * value_range


# -- landmarks ----------------------------------------------------------------------------------
POINTS = np.array([[1.5, -2.25, 30.0], [-10.0, 4.0, 0.125], [7.0, 8.0, -9.5]])
NAMES = ["apex", "base, left", "3"]


def test_landmarks_csv_round_trip(tmp_path):
    path = dio.write_landmarks_csv(tmp_path / "pts.csv", POINTS, NAMES)
    names, pts = dio.read_landmarks(path)
    assert names == NAMES
    np.testing.assert_array_equal(pts, POINTS)
    # the file declares LPS, so asking for RAS does not flip it
    _, pts_flag = dio.read_landmarks(path, ras=True)
    np.testing.assert_array_equal(pts_flag, POINTS)


def test_landmarks_csv_variants(tmp_path):
    ras = geometry.lps_to_ras(POINTS)
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(",".join(str(v) for v in p) for p in POINTS) + "\n")
    names, pts = dio.read_landmarks(plain)
    assert names == ["1", "2", "3"]
    np.testing.assert_array_equal(pts, POINTS)
    plain_ras = tmp_path / "plain_ras.csv"
    plain_ras.write_text("\n".join(f"P{i},{p[0]},{p[1]},{p[2]}" for i, p in enumerate(ras)))
    names, pts = dio.read_landmarks(plain_ras, ras=True)
    assert names == ["P0", "P1", "P2"]
    np.testing.assert_allclose(pts, POINTS)
    # header with extra columns in any order; r,a,s names declare RAS
    header = tmp_path / "slicer_table.csv"
    header.write_text("label,r,a,s,defined\n" +
                      "".join(f"n{i},{p[0]},{p[1]},{p[2]},1\n" for i, p in enumerate(ras)))
    names, pts = dio.read_landmarks(header)
    assert names == ["n0", "n1", "n2"]
    np.testing.assert_allclose(pts, POINTS)
    # comment line declaring the system, tab separated, z y x column order
    tsv = tmp_path / "pts.tsv"
    tsv.write_text("# coordinate_system = RAS\nname\tz\ty\tx\n" +
                   "".join(f"q{i}\t{p[2]}\t{p[1]}\t{p[0]}\n" for i, p in enumerate(ras)))
    names, pts = dio.read_landmarks(tsv)
    np.testing.assert_allclose(pts, POINTS)
    # Slicer's legacy .fcsv (RAS by default)
    fcsv = tmp_path / "F.fcsv"
    fcsv.write_text("# Markups fiducial file version = 4.10\n# CoordinateSystem = 0\n"
                    "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n" +
                    "".join(f"vtkMRMLMarkupsFiducialNode_{i},{p[0]},{p[1]},{p[2]},0,0,0,1,1,1,0,"
                            f"F-{i + 1},,\n" for i, p in enumerate(ras)))
    names, pts = dio.read_landmarks(fcsv)
    assert names == ["F-1", "F-2", "F-3"]
    np.testing.assert_allclose(pts, POINTS)


@pytest.mark.parametrize("content, expected", [
    ("", "no points"),
    ("a,b,c,d,e\n1,2,3,4,5\n", "header"),
    ("1,2,3,4,5\n", "no header"),
    ("x,y,z\n1,two,3\n", "not all numbers"),
    ("x,y,z\n1,nan,3\n", "NaN"),
])
def test_bad_landmark_csv(tmp_path, content, expected):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(BadInputError, match=expected):
        dio.read_landmarks(path)
    with pytest.raises(BadInputError, match="not found"):
        dio.read_landmarks(tmp_path / "missing.csv")


def test_markups_json_round_trip(tmp_path):
    path = dio.write_markups_json(tmp_path / "L.mrk.json", POINTS, NAMES, description="test",
                                  point_attributes=[{"description": f"d{i}"} for i in range(3)])
    data = json.loads(path.read_text())
    markup = data["markups"][0]
    assert data["@schema"].startswith("https://raw.githubusercontent.com/slicer/slicer/")
    assert markup["type"] == "Fiducial"
    assert markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    assert markup["controlPoints"][1]["description"] == "d1"
    names, pts = dio.read_landmarks(path)
    assert names == NAMES
    np.testing.assert_array_equal(pts, POINTS)


def test_markups_json_ras_and_unplaced_points(tmp_path):
    ras = geometry.lps_to_ras(POINTS)
    cps = [{"id": str(i), "label": f"L{i}", "position": p.tolist(), "positionStatus": "defined"}
           for i, p in enumerate(ras)]
    cps.append({"id": "9", "label": "unplaced", "position": [0.0, 0.0, 0.0],
                "positionStatus": "undefined"})
    path = tmp_path / "R.mrk.json"
    path.write_text(json.dumps({"@schema": "x", "markups": [
        {"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": cps}]}))
    names, pts = dio.read_landmarks(path)
    assert names == ["L0", "L1", "L2"]
    np.testing.assert_allclose(pts, POINTS)
    bad = tmp_path / "bad.mrk.json"
    bad.write_text("{not json")
    with pytest.raises(BadInputError, match="JSON"):
        dio.read_landmarks(bad)
    bad.write_text(json.dumps({"markups": []}))
    with pytest.raises(BadInputError, match="markups"):
        dio.read_landmarks(bad)


def test_write_landmarks_validates():
    with pytest.raises(ValueError):
        dio.write_markups_json("unused.mrk.json", np.zeros((3, 2)))
    with pytest.raises(ValueError):
        dio.write_landmarks_csv("unused.csv", POINTS, names=["a"])
