"""Files in and out of the engine: images, label maps, displacement fields, linear transforms and
landmarks. Conventions: :mod:`deepreglib.core.conventions`; physical space only through :mod:`geometry`.

Everything on disk is ITK/LPS millimetres:

* A displacement field is an ITK vector image on the fixed grid, 3 float64 components
  ``(x, y, z)`` in LPS mm, ``T(p) = p + u(p)`` mapping fixed points to moving points (ITK's
  resampling transform, Slicer's "FromParent"). In NIfTI it is written the way SimpleITK and ANTs
  write it (intent code 1007 "vector", LPS components); 3D Slicer reads it correctly but logs a
  warning that it expected intent 1006, so for loading into Slicer prefer ``.nrrd``, ``.mha`` or
  ``.h5``.
* A linear transform is an ITK ``AffineTransform`` with the same fixed -> moving sense.
* Landmark files written here are LPS; readers accept LPS or RAS and always return LPS.

Every write goes to a temporary folder next to the target and is moved into place when complete,
so a crash or a cancelled run never leaves a half-written file under the final name.
"""
from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import struct
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from . import exchange
from ..core.errors import BadInputError
from ..core.geometry import Grid, displacement_mm_to_voxel, displacement_voxel_to_mm, ras_to_lps

_LOG = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Image file extensions the engine writes (and reads; reading accepts anything SimpleITK reads).
IMAGE_EXTENSIONS = exchange.IMAGE_EXTENSIONS
#: Extensions read and written as ITK transform files.
TRANSFORM_EXTENSIONS = exchange.TRANSFORM_EXTENSIONS
#: Transform-file extensions that can hold a displacement field (HDF5 only, as in Slicer and ANTs).
FIELD_TRANSFORM_EXTENSIONS = (".h5", ".hdf5")
#: Default extension for displacement fields (what ANTs writes).
DEFAULT_FIELD_EXTENSION = ".nii.gz"

_SUPPORTED_READ = ("NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a folder "
                   "holding one DICOM series")
_INTEGER_PIXELS = (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32,
                   sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64)
_COMPLEX_PIXELS = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)


# -- small helpers ---------------------------------------------------------------------------------
_atomic_output, _suffix = exchange.atomic_output, exchange.suffix


def _first_line(error: Exception) -> str:
    """ITK exceptions are several lines with source locations; the last non-empty line says what."""
    lines = [s.strip() for s in str(error).splitlines() if s.strip()]
    return lines[-1] if lines else type(error).__name__


def _require_file(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{what} not found: '{p}'. Check the path and that the file was saved.")
    return p


def _numpy_dtype_of(pixel_type: int) -> np.dtype:
    """The numpy dtype SimpleITK uses for a scalar pixel type."""
    return sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], pixel_type)).dtype


# -- images ----------------------------------------------------------------------------------------
def validate_image(img: sitk.Image, name: str = "image",
                   allow_constant: bool = False) -> sitk.Image:
    """Check that ``img`` is a usable 3D scalar volume; return it (a 4D image with a single time
    point comes back as 3D).

    Raises:
        BadInputError: 2D, 4D with several time points/channels, vector or complex voxels, a single
            slice, bad spacing/direction, NaN or infinite voxels (:class:`NonFiniteVoxelsError`), or (unless ``allow_constant``)
            a volume whose voxels all have the same value. The message says what and how to fix it.
    """
    if not isinstance(img, sitk.Image):
        raise TypeError(f"{name}: expected a SimpleITK Image, got {type(img).__name__}")
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp != 1:
        raise BadInputError(
            f"{name} has {ncomp} values per voxel (a vector, RGB or multi-channel image); "
            "registration needs a single-channel (scalar) volume. Convert it to grayscale or "
            "extract one channel before registering.")
    if img.GetPixelID() in _COMPLEX_PIXELS:
        raise BadInputError(f"{name} has complex-valued voxels; convert it to a real magnitude "
                            "image before registering.")
    dim = img.GetDimension()
    if dim == 4:
        size = img.GetSize()
        if size[3] != 1:
            raise BadInputError(
                f"{name} is 4D with {size[3]} time points or channels (size {size}); registration "
                "needs one 3D volume. Extract a single time point/channel (e.g. in Slicer's "
                "Sequences module) and register that.")
        # A 4D file with one time point is a 3D volume in a 4D container: drop the last axis and
        # keep the spatial 3x3 block of the direction.
        img = sitk.Extract(img, [size[0], size[1], size[2], 0], [0, 0, 0, 0],
                           sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    elif dim != 3:
        raise BadInputError(f"{name} is a {dim}D image (size {img.GetSize()}); registration needs "
                            "a 3D volume. Load the full 3D series rather than a single slice.")
    size = img.GetSize()
    if min(size) < 2:
        raise BadInputError(f"{name} is a single slice (size {size}); registration needs a 3D "
                            "volume with at least 2 voxels along every axis. Load the whole "
                            "series.")
    try:
        Grid.from_sitk(img)
    except BadInputError as e:
        raise BadInputError(f"{name} has unusable geometry: {e}. Fix the image header "
                            "(spacing must be positive, direction a rotation).") from None
    arr = sitk.GetArrayViewFromImage(img)
    if np.issubdtype(arr.dtype, np.floating):
        per_slice = np.array([arr.shape[1] * arr.shape[2] - np.count_nonzero(np.isfinite(a))
                              for a in arr], dtype=np.int64)  # slice by slice: no full-size mask
        if per_slice.any():
            raise NonFiniteVoxelsError(name, per_slice, arr.size, arr.shape[1] * arr.shape[2])
    if not allow_constant:
        lo, hi = arr.min(), arr.max()
        if lo == hi:
            raise BadInputError(
                f"{name} is empty: every voxel equals {float(lo):g}. Check that the right volume "
                "was chosen and that it is not blank (e.g. an unfinished export or an empty "
                "label map).")
    return img


def _read_dicom_series(folder: Path, containing: Optional[Path] = None) -> sitk.Image:
    """Read the DICOM series in ``folder`` (not its sub-folders): the one holding ``containing``
    if given, else the series with the most files."""
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise BadInputError(
            f"folder '{folder}' holds no DICOM series (sub-folders are not searched). Choose the "
            f"folder that directly contains the DICOM files of one series, or an image file: "
            f"{_SUPPORTED_READ}.")
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)
             for sid in series_ids}
    if containing is not None:
        target = containing.resolve()
        chosen = next((sid for sid, names in files.items()
                       if any(Path(n).resolve() == target for n in names)), None)
        if chosen is None:
            return _read_single_file(containing)
    else:
        chosen = max(files, key=lambda sid: len(files[sid]))
        if len(files) > 1:
            others = ", ".join(f"{sid} ({len(files[sid])} files)" for sid in files if sid != chosen)
            _LOG.warning("folder %s holds %d DICOM series; reading %s (%d files), the largest, and "
                         "ignoring %s. Put each series in its own folder to choose another.",
                         folder, len(files), chosen, len(files[chosen]), others)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise BadInputError(f"cannot read the DICOM series {chosen} in '{folder}' "
                            f"({_first_line(e)}). Check that the series is complete.") from None


def _nifti_header(path: Path) -> Optional[dict]:
    """The fields of a single-file NIfTI-1/2 header this module needs (``order`` "<" or ">",
    ``dims``, ``bitpix``, ``datatype``, ``offset``, ``gz``), or None when it cannot parse one."""
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(str(path), "rb") if gz else open(str(path), "rb")) as f:
            header = f.read(540)
    except (OSError, EOFError):
        return None
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            if header[344:347] != b"n+1":
                return None
            dims = struct.unpack(order + "8h", header[40:56])
            datatype = struct.unpack(order + "h", header[70:72])[0]
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            if header[4:7] != b"n+2":
                return None
            datatype = struct.unpack(order + "h", header[12:14])[0]
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    return {"order": order, "dims": dims, "bitpix": bitpix, "datatype": datatype, "offset": offset,
            "gz": gz}


def _nifti_lengths(path: Path) -> Optional[Tuple[int, int]]:
    """(bytes a single-file NIfTI needs: header, extensions and voxels; bytes it has), or None
    when the file is not a single-file NIfTI-1/2 this can parse.

    ITK's NIfTI reader fills a truncated file with zeros without complaint (other formats fail
    loudly), so an interrupted copy would silently become a partly black volume.
    """
    h = _nifti_header(path)
    if h is None:
        return None
    gz, dims, bitpix, offset = h["gz"], h["dims"], h["bitpix"], h["offset"]
    needed = offset + int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]])) * bitpix // 8
    if not gz:
        return needed, path.stat().st_size
    with open(str(path), "rb") as f:
        f.seek(-4, os.SEEK_END)
        stored = struct.unpack("<I", f.read(4))[0]  # gzip trailer: length modulo 2**32
    if stored == needed % 2 ** 32:
        return needed, needed
    # the trailer disagrees (truncated, or several gzip members): count the real length
    have = 0
    try:
        with gzip.open(str(path), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                have += len(chunk)
    except (OSError, EOFError):
        pass
    return needed, have


def _read_single_file(path: Path) -> sitk.Image:
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise BadInputError(f"cannot read '{path}' as an image ({_first_line(e)}). Supported: "
                            f"{_SUPPORTED_READ}. Check that the file is complete and in one of "
                            "these formats.") from None
    if _suffix(path, (".nii", ".nii.gz")):
        lengths = _nifti_lengths(path)
        if lengths is not None and lengths[1] < lengths[0]:
            raise BadInputError(f"'{path}' is truncated: it needs {lengths[0]} bytes of header "
                                f"and voxel data but holds {lengths[1]}. The file is incomplete "
                                "(an interrupted copy or export); copy or export it again.")
        per_slice = _nifti_non_finite_per_slice(path)
        if per_slice is not None and per_slice.any():
            raise NonFiniteVoxelsError(f"image '{path.name}'", per_slice, int(np.prod(img.GetSize())))
    return img


#: NIfTI ``datatype`` codes of real floating-point voxels -> numpy type (the only ones with NaN)
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _nifti_non_finite_per_slice(path: Path, chunk_bytes: int = 1 << 24) -> Optional[np.ndarray]:
    """Count NaN and infinite voxels of a float NIfTI per slice (last axis), from the file's
    own bytes; None for other files. ITK 5's NIfTI reader replaces every non-finite voxel by 0
    while reading (``nifti_read_buffer``; fixed only in ITK 6), so the image SimpleITK returns
    cannot tell a NaN from a real 0: the raw data are scanned once more, in chunks."""
    h = _nifti_header(path)
    if h is None or h["datatype"] not in _NIFTI_FLOAT_TYPES or h["dims"][0] < 3:
        return None
    dtype = np.dtype(h["order"] + _NIFTI_FLOAT_TYPES[h["datatype"]])
    dims = [max(int(d), 1) for d in h["dims"][1:h["dims"][0] + 1]]
    slice_voxels = dims[0] * dims[1]
    counts = np.zeros(int(np.prod(dims[2:])), dtype=np.int64)  # z (and any 4th axis) slices
    step = max(dtype.itemsize, chunk_bytes // dtype.itemsize * dtype.itemsize)
    done = 0
    with (gzip.open(str(path), "rb") if h["gz"] else open(str(path), "rb")) as f:
        f.seek(h["offset"])
        while done < counts.size * slice_voxels:
            data = f.read(step)
            if len(data) < dtype.itemsize:
                break
            values = np.frombuffer(data[: len(data) // dtype.itemsize * dtype.itemsize], dtype=dtype)
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                np.add.at(counts, np.minimum((bad + done) // slice_voxels, counts.size - 1), 1)
            done += values.size
    return counts


class NonFiniteVoxelsError(BadInputError):
    """An image holds NaN or infinite voxels (refused: exit 2). ``per_slice``: the count per
    slice of the last (z) axis."""

    def __init__(self, name: str, per_slice: np.ndarray, total: int, slice_voxels: Optional[int] = None):
        self.name, self.per_slice, self.total = name, np.asarray(per_slice), int(total)
        self.count = int(self.per_slice.sum())
        slice_voxels = slice_voxels or max(1, self.total // max(1, self.per_slice.size))
        super().__init__(non_finite_message(name, self.per_slice, self.total, slice_voxels))


def non_finite_message(name: str, per_slice: np.ndarray, total: int, slice_voxels: int) -> str:
    """What is wrong and how to fix it, for NaN/infinite voxels (count, percent, whole slices)."""
    count = int(per_slice.sum())
    text = (f"{name} has {count} NaN or infinite voxel(s) of {total} "
            f"({100.0 * count / max(total, 1):.3g} %)")
    whole = np.flatnonzero(per_slice >= slice_voxels)
    if whole.size:
        text += f"; whole slice(s) z = {_ranges(whole)} are non-finite"
        rest = count - int(per_slice[whole].sum())
        if rest:
            text += f" (and {rest} voxel(s) in other slices)"
    elif count:
        text += f", in slice(s) z = {_ranges(np.flatnonzero(per_slice))}"
    return (text + ". Registration needs finite intensities: replace them by 0 or the background "
            "value (SimpleITK: a = sitk.GetArrayFromImage(img); a[~np.isfinite(a)] = 0; in 3D "
            "Slicer's Python console: a = slicer.util.arrayFromVolume(node); a[~np.isfinite(a)] = 0;"
            " slicer.util.arrayFromVolumeModified(node)) and save the volume again; where the "
            "replaced region is not anatomy, also give a mask (--fixed-mask/--moving-mask).")


def _ranges(indices: np.ndarray, limit: int = 6) -> str:
    """``[0 1 2 5 7 8]`` -> ``"0-2, 5, 7-8"`` (at most ``limit`` runs, then "...")."""
    runs: List[str] = []
    start = prev = None
    for i in (int(x) for x in indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(runs[:limit]) + (", ..." if len(runs) > limit else "")


def _read_any_image(path: PathLike) -> sitk.Image:
    p = _require_file(path, "image")
    if p.is_dir():
        return _read_dicom_series(p)
    try:
        image_io = sitk.ImageFileReader.GetImageIOFromFileName(str(p))
    except RuntimeError as e:
        raise BadInputError(f"cannot read '{p}' as an image ({_first_line(e)}). Supported: "
                            f"{_SUPPORTED_READ}. Check that the file is complete and in one of "
                            "these formats.") from None
    if image_io == "GDCMImageIO":
        # One file of a DICOM series is one slice: read the whole series it belongs to.
        return _read_dicom_series(p.parent, containing=p)
    return _read_single_file(p)


def image_size(path: PathLike) -> Optional[Tuple[int, ...]]:
    """The voxel size ``(x, y, z[, ...])`` a file's header declares, read without its voxels;
    None for folders (DICOM), missing or unreadable files (reading them says what is wrong)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
        return tuple(int(n) for n in reader.GetSize())
    except RuntimeError:
        return None


def read_image(path: PathLike) -> sitk.Image:
    """Read a 3D scalar volume: NIfTI, NRRD, MetaImage (or anything SimpleITK reads), or a DICOM
    series when ``path`` is a folder (or one file of the series). Spacing, origin and direction
    are kept as in the file (LPS).

    Raises:
        BadInputError: missing or unreadable file, or an image :func:`validate_image` rejects.
    """
    return validate_image(_read_any_image(path), name=f"image '{Path(path).name}'")


def read_labels(path: PathLike) -> sitk.Image:
    """Read an integer label map (same formats and checks as :func:`read_image`, but an all-zero
    map is allowed). Floating-point files holding whole numbers are converted to ``sitkInt32``.

    Raises:
        BadInputError: as :func:`read_image`, or fractional values (an intensity image passed as
            labels).
    """
    name = f"label map '{Path(path).name}'"
    img = validate_image(_read_any_image(path), name=name, allow_constant=True)
    if img.GetPixelID() in _INTEGER_PIXELS:
        return img
    arr = sitk.GetArrayViewFromImage(img)
    fractional = arr != np.round(arr)
    if fractional.any():
        example = float(arr[fractional].flat[0])
        raise BadInputError(
            f"{name} should hold whole-number labels (one per structure) but has fractional values "
            f"such as {example:g}; it looks like an intensity image. Pass a segmentation/label "
            "map.")
    info = np.iinfo(np.int32)
    if arr.min() < info.min or arr.max() > info.max:
        raise BadInputError(f"{name} has label values outside the 32-bit integer range "
                            f"[{arr.min():g}, {arr.max():g}]; renumber the labels.")
    return sitk.Cast(img, sitk.sitkInt32)


def image_to_tensor(img: sitk.Image, dtype: torch.dtype = torch.float32
                    ) -> Tuple[torch.Tensor, Grid]:
    """A 3D scalar SimpleITK image -> (``(1, 1, D, H, W)`` tensor of ``dtype`` on the CPU, its
    :class:`Grid`). D, H, W are the array axes z, y, x; values are unchanged (no scaling)."""
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a 3D scalar image, got {img.GetDimension()}D with "
                         f"{img.GetNumberOfComponentsPerPixel()} components")
    grid = Grid.from_sitk(img)
    arr = sitk.GetArrayViewFromImage(img)
    # Through numpy in a dtype torch >= 2.1 understands (it lacks uint16/uint32/uint64).
    staging = {torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32,
               torch.int16: np.int16, torch.uint8: np.uint8}.get(dtype, np.float32)
    t = torch.from_numpy(np.array(arr, dtype=staging, copy=True)).to(dtype)
    return t.reshape(1, 1, *grid.shape), grid


def tensor_to_image(t: torch.Tensor, grid: Grid, pixel_type: Optional[int] = None) -> sitk.Image:
    """A ``(1, 1, D, H, W)`` or ``(D, H, W)`` tensor -> SimpleITK image on ``grid``.

    ``pixel_type`` (a ``sitk.sitkXXX`` constant) defaults to the tensor's own type (bool and
    half-precision become uint8 and float32). Floats going to an integer type are rounded to the
    nearest integer and clipped to the type's range (not truncated).
    """
    if t.ndim == 5:
        if tuple(t.shape[:2]) != (1, 1):
            raise ValueError(f"expected (1, 1, D, H, W), got {tuple(t.shape)}")
        t = t[0, 0]
    elif t.ndim != 3:
        raise ValueError(f"expected (1, 1, D, H, W) or (D, H, W), got {tuple(t.shape)}")
    if tuple(t.shape) != grid.shape:
        raise ValueError(f"tensor shape {tuple(t.shape)} does not match grid shape {grid.shape}")
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    arr = t.numpy()
    if pixel_type is not None:
        target = _numpy_dtype_of(pixel_type)
        if np.issubdtype(target, np.integer) and np.issubdtype(arr.dtype, np.floating):
            info = np.iinfo(target)
            arr = np.clip(np.rint(arr), info.min, info.max)
        arr = arr.astype(target, copy=False)
    return grid.apply_to(sitk.GetImageFromArray(arr))


def write_image(img: sitk.Image, path: PathLike) -> Path:
    """Write ``img`` atomically (creating parent folders); compressed unless the name ends in
    ``.nii``. Extensions: :data:`IMAGE_EXTENSIONS`. Returns the path written."""
    try:
        return exchange.write_image(img, path)
    except exchange.FileFormatError as e:
        raise BadInputError(str(e)) from None



# -- streamed writing -------------------------------------------------------------------------------
#: numpy dtype -> MetaImage ElementType
_MET_TYPES = {np.dtype("float32"): "MET_FLOAT", np.dtype("float64"): "MET_DOUBLE",
              np.dtype("int16"): "MET_SHORT", np.dtype("uint16"): "MET_USHORT",
              np.dtype("int8"): "MET_CHAR", np.dtype("uint8"): "MET_UCHAR",
              np.dtype("int32"): "MET_INT", np.dtype("uint32"): "MET_UINT"}


def _metaimage_header(grid: Grid, dtype: np.dtype, components: int) -> bytes:
    """The header of an uncompressed single-file MetaImage (``.mha``) as ITK writes it: sizes
    and spacing in (x, y, z) order; ``TransformMatrix`` is the direction matrix column by column
    (ITK's MetaImageIO writes it transposed with respect to SimpleITK's row-major direction)."""
    d = np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)
    num = lambda values: " ".join(repr(float(v)) for v in values)  # noqa: E731 (17 digits)
    lines = ["ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
             "CompressedData = False", f"TransformMatrix = {num(d.T.ravel())}", f"Offset = {num(grid.origin)}",
             "CenterOfRotation = 0 0 0", f"ElementSpacing = {num(grid.spacing)}",
             "DimSize = " + " ".join(str(int(n)) for n in reversed(grid.shape))]
    if components > 1:
        lines.append(f"ElementNumberOfChannels = {components}")
    lines += [f"ElementType = {_MET_TYPES[np.dtype(dtype)]}", "ElementDataFile = LOCAL"]
    return ("\n".join(lines) + "\n").encode("ascii")


class SlabImageWriter:
    """Writes one image on ``grid`` slab by slab (consecutive slices of the slowest axis ``k``,
    in order) to an uncompressed MetaImage, never holding the whole volume. Use as a context
    manager: the file is written under a temporary name and moved into place only when every
    slice arrived (:func:`exchange.atomic_output`); an error or a missing slab leaves nothing.

    ``write(slab)`` takes ``(n, H, W)`` (scalar) or ``(n, H, W, C)`` (``C = components``) numpy
    arrays, or tensors ``(1, 1, n, H, W)`` / ``(1, C, n, H, W)``; values are cast to ``dtype``
    (integers: rounded and clipped to the type's range)."""

    def __init__(self, path: PathLike, grid: Grid, dtype=np.float32, components: int = 1):
        if not str(path).lower().endswith(".mha"):
            raise ValueError(f"slab writing makes MetaImage files (.mha), not '{path}'")
        self.path, self.grid, self.dtype, self.components = Path(path), grid, np.dtype(dtype), int(components)
        self.rows = 0
        self._atomic = self._file = None

    def __enter__(self) -> "SlabImageWriter":
        self._atomic = _atomic_output(self.path)
        tmp = self._atomic.__enter__()
        self._file = open(str(tmp), "wb")
        self._file.write(_metaimage_header(self.grid, self.dtype, self.components))
        return self

    def write(self, slab) -> None:
        a = _slab_array(slab, self.components)
        if tuple(a.shape[1:3]) != tuple(self.grid.shape[1:]) or self.rows + a.shape[0] > self.grid.shape[0]:
            raise ValueError(f"slab {tuple(a.shape)} does not fit rows {self.rows}.. of {self.grid.shape}")
        if np.issubdtype(self.dtype, np.integer) and np.issubdtype(a.dtype, np.floating):
            info = np.iinfo(self.dtype)
            a = np.clip(np.rint(a), info.min, info.max)
        self._file.write(np.ascontiguousarray(a, dtype=self.dtype.newbyteorder("<")).tobytes())
        self.rows += a.shape[0]

    def __exit__(self, kind, value, tb):
        self._file.close()
        if kind is None and self.rows != self.grid.shape[0]:
            error = ValueError(f"'{self.path.name}': {self.rows} of {self.grid.shape[0]} slices written")
            self._atomic.__exit__(ValueError, error, None)  # removes the temporary file
            raise error
        return self._atomic.__exit__(kind, value, tb)  # moves the file into place, or removes it


def _slab_array(slab, components: int) -> np.ndarray:
    if isinstance(slab, torch.Tensor):
        t = slab.detach().cpu()
        if t.ndim == 5:
            t = t[0].permute(1, 2, 3, 0) if components > 1 else t[0, 0]
        slab = t.numpy()
    a = np.asarray(slab)
    if components > 1 and (a.ndim != 4 or a.shape[3] != components):
        raise ValueError(f"expected (n, H, W, {components}), got {a.shape}")
    if components == 1 and a.ndim != 3:
        raise ValueError(f"expected (n, H, W), got {a.shape}")
    return a


# -- displacement fields ---------------------------------------------------------------------------
def displacement_to_sitk(u_voxel: torch.Tensor, grid: Grid) -> sitk.Image:
    """Engine displacement -> ITK displacement-field image.

    Args:
        u_voxel: ``(1, 3, D, H, W)`` in voxels of ``grid``, components ``(k, j, i)``.
        grid: the fixed grid the field lives on.
    Returns:
        3D ``sitkVectorFloat64`` image on ``grid``, components ``(x, y, z)`` in LPS mm.
    """
    _check_field(u_voxel)
    return physical_field_to_sitk(displacement_voxel_to_mm(u_voxel.detach().to("cpu", torch.float64), grid), grid)


def _check_field(u: torch.Tensor) -> None:
    if u.ndim != 5 or u.shape[0] != 1 or u.shape[1] != 3:
        raise ValueError(f"expected a displacement of shape (1, 3, D, H, W), got {tuple(u.shape)}")


def physical_field_to_sitk(u_mm: torch.Tensor, grid: Grid) -> sitk.Image:
    """A physical field ``(1, 3, D, H, W)``, LPS mm ``(x, y, z)`` at the voxel centres of ``grid``
    -> the ITK displacement-field image (``sitkVectorFloat64``) on ``grid``."""
    _check_field(u_mm)
    u_mm = u_mm.detach().to("cpu", torch.float64)
    if not torch.isfinite(u_mm).all():
        raise ValueError("displacement field contains NaN or infinite values")
    # SimpleITK vector arrays are (z, y, x, component): move the component axis last.
    arr = u_mm[0].permute(1, 2, 3, 0).contiguous().numpy()
    return grid.apply_to(sitk.GetImageFromArray(arr, isVector=True))


def sitk_to_displacement(img: sitk.Image) -> Tuple[torch.Tensor, Grid]:
    """ITK displacement-field image (3D, 3 components ``(x, y, z)`` LPS mm) -> (``(1, 3, D, H, W)``
    float32 displacement in voxels of its grid, components ``(k, j, i)``; the grid)."""
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 3:
        raise BadInputError(
            f"not a 3D displacement field: a {img.GetDimension()}D image with "
            f"{img.GetNumberOfComponentsPerPixel()} component(s) per voxel; expected 3D with 3 "
            "components (x, y, z displacement in mm).")
    grid = Grid.from_sitk(img)
    arr = sitk.GetArrayFromImage(img).astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise BadInputError("the displacement field contains NaN or infinite values; "
                            "regenerate it.")
    u_mm = torch.from_numpy(arr).permute(3, 0, 1, 2).unsqueeze(0)
    u = displacement_mm_to_voxel(u_mm, grid)
    return u.to(torch.float32).contiguous(), grid


def write_displacement_field(u_voxel: torch.Tensor, grid: Grid, path: PathLike) -> Path:
    """Write an engine displacement (voxels of ``grid``) as an ITK displacement field, atomically
    (see :func:`write_physical_field`)."""
    return _write_field_image(displacement_to_sitk(u_voxel, grid), path)


def write_physical_field(u_mm: torch.Tensor, grid: Grid, path: PathLike) -> Path:
    """Write a physical field (LPS mm on ``grid``, :func:`physical_field_to_sitk`) as an ITK
    displacement field, atomically.

    ``.nii.gz``/``.nii``/``.nrrd``/``.nhdr``/``.mha``/``.mhd``: a vector image. ``.h5``/``.hdf5``:
    an ITK ``DisplacementFieldTransform``. Either way SimpleITK, ANTs, elastix and Slicer read it
    as ``T(p) = p + u(p)`` (fixed -> moving).
    """
    return _write_field_image(physical_field_to_sitk(u_mm, grid), path)


def _write_field_image(img: sitk.Image, path: PathLike) -> Path:
    if _suffix(path, IMAGE_EXTENSIONS):
        # float32 components: half the file and write time; every reader (Slicer, ITK, ANTs)
        # accepts them and the precision (1e-7 relative) is far below any registration error
        return write_image(sitk.Cast(img, sitk.sitkVectorFloat32), path)
    if _suffix(path, FIELD_TRANSFORM_EXTENSIONS):
        transform = sitk.DisplacementFieldTransform(img)  # takes the image's buffer
        with _atomic_output(path) as tmp:
            sitk.WriteTransform(transform, str(tmp))
        return Path(path)
    raise BadInputError(f"cannot write a displacement field to '{path}': use one of "
                        f"{IMAGE_EXTENSIONS + FIELD_TRANSFORM_EXTENSIONS}")


def _read_transform(path: PathLike) -> sitk.Transform:
    p = _require_file(path, "transform file")
    try:
        return sitk.ReadTransform(str(p)).Downcast()
    except RuntimeError as e:
        raise BadInputError(f"cannot read '{p}' as an ITK transform ({_first_line(e)}); expected "
                            f"one of {TRANSFORM_EXTENSIONS}.") from None


def read_displacement_field(path: PathLike) -> Tuple[torch.Tensor, Grid]:
    """Read a displacement field written by :func:`write_displacement_field` (or ANTs, elastix,
    Slicer): an image file, or an ITK transform file holding one ``DisplacementFieldTransform``.
    Returns ``(u_voxel (1, 3, D, H, W) float32, grid)`` as :func:`sitk_to_displacement`."""
    if _suffix(path, TRANSFORM_EXTENSIONS):
        transform = _read_transform(path)
        while isinstance(transform, sitk.CompositeTransform) and \
                transform.GetNumberOfTransforms() == 1:
            transform = transform.GetNthTransform(0).Downcast()
        if not isinstance(transform, sitk.DisplacementFieldTransform):
            raise BadInputError(f"'{path}' holds a {transform.GetName()}, not a single "
                                "displacement field; read linear transforms with "
                                "read_linear_transform.")
        return sitk_to_displacement(transform.GetDisplacementField())
    p = _require_file(path, "displacement field")
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as e:
        raise BadInputError(f"cannot read '{p}' as a displacement field image "
                            f"({_first_line(e)}).") from None
    return sitk_to_displacement(img)


# -- linear transforms -----------------------------------------------------------------------------
def write_linear_transform(matrix_lps: np.ndarray, path: PathLike) -> Path:
    """Write a 4x4 LPS point map ``p_moving = A p_fixed + t`` (ITK's resampling sense) as an ITK
    ``AffineTransform`` (centre 0) to ``.tfm``/``.txt``/``.h5``/``.hdf5``/``.mat``, atomically."""
    try:
        return exchange.write_linear_transform(matrix_lps, path)
    except exchange.FileFormatError as e:
        raise BadInputError(str(e)) from None


def read_linear_transform(path: PathLike) -> np.ndarray:
    """Read any linear ITK transform file (Affine, Euler, Versor, Similarity, Translation, or a
    Composite of linear ones) as a 4x4 LPS matrix ``p -> A p + t`` in the file's sense (fixed ->
    moving for registration results).

    The matrix is measured from the transform itself (images of the origin and the unit vectors),
    which includes the centre of rotation and the order of composite members without depending
    on each transform type's parameterisation.

    Raises:
        BadInputError: missing/unreadable file, or a non-linear (deformable) transform.
    """
    transform = _read_transform(path)
    if not transform.IsLinear():
        raise BadInputError(f"'{path}' holds a non-linear transform ({transform.GetName()}); read "
                            "deformable transforms with read_displacement_field.")
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)), dtype=np.float64)
    m = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        m[:3, axis] = np.asarray(transform.TransformPoint(unit), dtype=np.float64) - origin
    m[:3, 3] = origin
    return m


# -- landmarks -------------------------------------------------------------------------------------
def _coordinate_system(value: str, source: str) -> str:
    """'LPS' or 'RAS' from a file's declaration (Slicer's .fcsv used 0 = RAS, 1 = LPS)."""
    v = value.strip().upper()
    if v in ("LPS", "1"):
        return "LPS"
    if v in ("RAS", "0"):
        return "RAS"
    raise BadInputError(f"{source}: unknown coordinate system '{value}'; use LPS or RAS.")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


_NAME_COLUMNS = ("label", "name", "id")
_AXIS_COLUMNS = {("x", "y", "z"): None, ("l", "p", "s"): "LPS", ("r", "a", "s"): "RAS"}


def _read_landmarks_csv(path: Path) -> Tuple[List[str], np.ndarray, Optional[str]]:
    """(names, points as written, declared coordinate system or None)."""
    declared = None
    header = None
    data_lines = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            key, sep, value = stripped.lstrip("#").partition("=")
            key = key.strip().lower().replace("_", "").replace(" ", "")
            if sep and key == "coordinatesystem":
                declared = _coordinate_system(value, str(path))
            elif sep and key == "columns":
                header = [c.strip().lower() for c in value.split(",")]
            continue
        data_lines.append(line)
    if not data_lines:
        raise BadInputError(f"landmark file '{path}' holds no points.")
    delimiter = "\t" if "\t" in data_lines[0] and "," not in data_lines[0] else ","
    rows = [[c.strip() for c in row] for row in csv.reader(data_lines, delimiter=delimiter)]
    first = [c.lower() for c in rows[0]]
    if any(all(a in first for a in axes) for axes in _AXIS_COLUMNS):
        header, rows = first, rows[1:]
    if header is not None:
        axes = next((a for a in _AXIS_COLUMNS if all(c in header for c in a)), None)
        if axes is None:
            raise BadInputError(f"landmark file '{path}': the header {header} has no x,y,z (or "
                                "l,p,s / r,a,s) columns.")
        if _AXIS_COLUMNS[axes] is not None:
            declared = declared or _AXIS_COLUMNS[axes]
        coord_cols = [header.index(a) for a in axes]
        name_col = next((header.index(n) for n in _NAME_COLUMNS if n in header), None)
    elif len(rows[0]) == 3:
        coord_cols, name_col = [0, 1, 2], None
    elif len(rows[0]) == 4:
        coord_cols, name_col = [1, 2, 3], 0
    else:
        raise BadInputError(f"landmark file '{path}' has {len(rows[0])} columns and no header; "
                            "use 'x,y,z' or 'label,x,y,z' columns, or add a header line naming "
                            "the x, y, z (and label) columns.")
    names, points = [], []
    for n, row in enumerate(rows):
        values = [row[c] if c < len(row) else "" for c in coord_cols]
        if not all(_is_number(v) for v in values):
            raise BadInputError(f"landmark file '{path}', data row {n + 1}: coordinates {values} "
                                "are not all numbers.")
        points.append([float(v) for v in values])
        names.append(row[name_col] if name_col is not None and name_col < len(row) else str(n + 1))
    return names, np.asarray(points, dtype=np.float64).reshape(-1, 3), declared


def _read_markups_json(path: Path) -> Tuple[List[str], np.ndarray, Optional[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInputError(f"'{path}' is not valid JSON ({e}); expected a Slicer markups "
                            "file (.mrk.json).") from None
    markups = data.get("markups") if isinstance(data, dict) else None
    if not isinstance(markups, list) or not markups:
        raise BadInputError(f"'{path}' has no 'markups' list; expected a Slicer markups file "
                            "(.mrk.json) with a point list.")
    if len(markups) > 1:
        _LOG.warning("%s holds %d markups; reading the first one only", path, len(markups))
    markup = markups[0]
    system = _coordinate_system(markup.get("coordinateSystem", "LPS"), str(path))
    units = markup.get("coordinateUnits", "mm")
    units = units[0] if isinstance(units, list) and units else units
    scale = {"mm": 1.0, "um": 1e-3}.get(units)
    if scale is None:
        raise BadInputError(f"'{path}': unsupported coordinateUnits {units!r}; use mm.")
    names, points, skipped = [], [], []
    for n, point in enumerate(markup.get("controlPoints", [])):
        label = str(point.get("label", point.get("id", n + 1)))
        position = point.get("position")
        if point.get("positionStatus", "defined") != "defined" or position is None:
            skipped.append(label)
            continue
        if len(position) != 3 or not all(isinstance(v, (int, float)) for v in position):
            raise BadInputError(f"'{path}': control point {label!r} has position {position}; "
                                "expected 3 numbers.")
        names.append(label)
        points.append([float(v) * scale for v in position])
    if skipped:
        _LOG.warning("%s: skipped %d control point(s) without a placed position: %s",
                     path, len(skipped), ", ".join(skipped))
    return names, np.asarray(points, dtype=np.float64).reshape(-1, 3), system


def read_landmarks(path: PathLike, ras: bool = False) -> Tuple[List[str], np.ndarray]:
    """Read landmarks as ``(names, points)``; ``points`` is ``(N, 3)`` float64 LPS mm ``(x, y, z)``.

    Formats:
        * Slicer markups JSON (``.json``, e.g. ``.mrk.json``): the first markup's placed control
          points, in its ``coordinateSystem`` (LPS if absent, per the schema).
        * CSV/TSV: columns ``x,y,z`` or ``label,x,y,z`` without a header, or any columns with a
          header naming ``x,y,z`` (or ``l,p,s`` / ``r,a,s``, which declare the system) and
          optionally ``label``/``name``/``id``. A comment line ``# coordinateSystem = RAS`` (or
          LPS) declares the system. Slicer's ``.fcsv`` works (RAS unless it declares LPS).

    Args:
        ras: the coordinates of a file that does not declare its system are RAS (default LPS).
            A system declared in the file always wins.
    Raises:
        BadInputError: missing file, malformed content, no points, or non-finite coordinates.
    """
    p = _require_file(path, "landmark file")
    if p.name.lower().endswith(".json"):
        names, points, declared = _read_markups_json(p)
    else:
        names, points, declared = _read_landmarks_csv(p)
        if declared is None and p.name.lower().endswith(".fcsv"):
            declared = "RAS"  # Slicer's legacy fiducial lists are RAS unless they say otherwise
    if declared is not None and ras and declared != "RAS":
        _LOG.warning("%s declares %s coordinates; ignoring the request to read it as RAS", p,
                     declared)
    system = declared or ("RAS" if ras else "LPS")
    if len(points) == 0:
        raise BadInputError(f"landmark file '{p}' holds no placed points.")
    if not np.isfinite(points).all():
        raise BadInputError(f"landmark file '{p}' has NaN or infinite coordinates.")
    if system == "RAS":
        points = ras_to_lps(points)  # RAS -> LPS: negate x and y
    return names, points


write_markups_json = exchange.write_markups_json
_check_points = exchange.check_points


def write_landmarks_csv(path: PathLike, points_lps, names: Optional[Sequence[str]] = None) -> Path:
    """Write ``label,x,y,z`` rows in LPS mm after a ``# coordinateSystem = LPS`` line, atomically
    (read back by :func:`read_landmarks`)."""
    pts, labels = _check_points(points_lps, names)
    with _atomic_output(path) as tmp:
        with open(str(tmp), "w", newline="", encoding="utf-8") as f:
            f.write("# coordinateSystem = LPS\n")
            writer = csv.writer(f)
            writer.writerow(["label", "x", "y", "z"])
            for label, pos in zip(labels, pts):
                writer.writerow([label] + [repr(float(v)) for v in pos])
    return Path(path)
