"""The small files the two sides exchange, written the same way by both: images, linear
transforms and point lists (markups JSON), each written atomically (a temporary folder next to
the target, moved into place when complete). The Slicer side writes its inputs for the worker
with these functions inside Slicer's own process, so this module imports neither torch nor
anything that imports torch: only the standard library, numpy and SimpleITK (both ship with
Slicer).

Coordinates: files are ITK/LPS; Slicer is RAS (:data:`LPS_FROM_RAS`, its own inverse).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.errors import BadInputError

PathLike = Union[str, "os.PathLike[str]"]

#: LPS <-> RAS: negate x and y (the matrix is its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
TRANSFORM_EXTENSIONS = (".tfm", ".txt", ".h5", ".hdf5", ".mat")
_MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
                   "Markups/Resources/Schema/markups-schema-v1.0.3.json#")


class FileFormatError(ValueError):
    """A path whose extension names no format we write."""


def ras_to_lps(points) -> np.ndarray:
    """``(N, 3)`` RAS points -> LPS (the same map both ways)."""
    p = np.asarray(points, dtype=np.float64)
    return p * np.array([-1.0, -1.0, 1.0])


def suffix(path: PathLike, known: Sequence[str]) -> str:
    """The longest of ``known`` that the file name ends with (lower case), or ``""``."""
    name = Path(path).name.lower()
    for ext in sorted(known, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return ""


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path with ``path``'s file name inside a fresh hidden folder next to it;
    when the block succeeds, move everything written there into ``path``'s folder.

    A folder rather than a temporary file name keeps the extension (SimpleITK picks the writer
    from it) and keeps detached headers (``.nhdr``/``.mhd``) pointing at their data files, which
    are moved first so the header only appears once its data is in place.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".deepreg-tmp-", dir=str(final.parent)))
    try:
        tmp = tmp_dir / final.name
        yield tmp
        if not tmp.exists():
            raise OSError(f"writing '{final}' produced no file")
        for produced in sorted(tmp_dir.iterdir(), key=lambda f: f.name == final.name):
            os.replace(str(produced), str(final.parent / produced.name))
    finally:
        shutil.rmtree(str(tmp_dir), ignore_errors=True)


def check_output_folder(out: PathLike) -> None:
    """A run's output folder must be new or empty: a run never overwrites what the user has.

    Raises:
        BadInputError: the folder holds files, or its parent cannot be made or written into.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"output folder {out} already exists and is not empty; choose a new "
                            "folder (results are never written over existing files)")
    parent = out.resolve().parent
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInputError(f"cannot create the output folder's parent {parent}: {e}")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"cannot write into {parent}; choose an output folder you can write to")


#: name of the lock file inside a staging folder (held while a run owns the folder)
_LOCK_NAME = ".deepreg-lock"


def _try_lock(fd: int) -> bool:
    """An exclusive, non-blocking OS lock on the open file ``fd``; the OS drops it when the
    process ends in any way (SIGKILL included), so a folder whose lock can be taken belongs to
    no running process. Modules imported here, not at the top: POSIX or Windows only.

    On a system with neither ``fcntl`` nor ``msvcrt`` there is no such lock: the claim is
    granted (a run must not fail for it) and two concurrent runs to one ``--out`` are then told
    apart only by the final rename, which still never writes over a winner's files."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False
    try:
        import msvcrt  # Windows
    except ImportError:
        return True
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def _claim(tmp: Path, out: Path) -> int:
    """Make ``tmp`` this process's staging folder and return the descriptor of its held lock.

    The claim is the lock on ``tmp/.deepreg-lock``: ``os.mkdir`` either creates the folder or
    finds one; whoever then holds the lock owns it. A folder found unlocked is what a killed run
    left (its contents are removed and it is reused); a locked one belongs to a live run.

    Raises:
        BadInputError: another run is writing to ``out``.
    """
    try:
        tmp.mkdir()
    except FileExistsError:
        pass
    fd = os.open(str(tmp / _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    if not _try_lock(fd):
        os.close(fd)
        raise BadInputError(f"another deepreg run is writing to {out} (its temporary folder {tmp} "
                            "is in use); wait for it to finish or choose another --out")
    for leftover in tmp.iterdir():  # a killed run's partial files, or nothing
        if leftover.name != _LOCK_NAME:
            shutil.rmtree(str(leftover), ignore_errors=True) if leftover.is_dir() else leftover.unlink()
    return fd


@contextlib.contextmanager
def staged_folder(out: PathLike) -> Iterator[Path]:
    """Yield a hidden folder ``.NAME.partial`` beside ``out``, claimed by this process (a lock
    the OS releases even on SIGKILL); when the block succeeds it is renamed to ``out``,
    otherwise removed: a cancelled or crashed command never leaves a half-written result under
    the final name, a killed one leaves only that folder, which the next run to ``out`` reuses.

    Exactly one of several runs to the same ``out`` writes it: a second run finds the folder
    locked (BadInputError, exit 2), and the rename itself only succeeds onto a missing or empty
    ``out`` (checked new or empty before the work started), so a winner's files are never
    touched.
    """
    out = Path(out).resolve()
    tmp = out.parent / f".{out.name}.partial"
    fd = _claim(tmp, out)
    renamed = False
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise BadInputError(f"output folder {out} already exists and is not empty; choose a new "
                                "folder (results are never written over existing files)")
        yield tmp
        if os.name == "nt":  # Windows renames no folder holding an open file, nor onto a folder
            os.close(fd)
            fd = None
            if out.exists():
                out.rmdir()  # empty: checked above
        try:
            os.rename(str(tmp), str(out))  # POSIX: atomic, and fails onto a non-empty folder
        except OSError:
            if out.exists() and any(p.name != _LOCK_NAME for p in out.iterdir()):
                raise BadInputError(f"output folder {out} was written by another run meanwhile; "
                                    "this run's results were discarded") from None
            raise
        renamed = True
    finally:
        if renamed:
            with contextlib.suppress(OSError):
                (out / _LOCK_NAME).unlink()
        else:
            for leftover in (tmp.iterdir() if tmp.is_dir() else ()):
                if leftover.name != _LOCK_NAME:
                    shutil.rmtree(str(leftover), ignore_errors=True) if leftover.is_dir() else leftover.unlink()
            with contextlib.suppress(OSError):
                (tmp / _LOCK_NAME).unlink()
            with contextlib.suppress(OSError):
                tmp.rmdir()
        if fd is not None:
            os.close(fd)


def write_image(img, path: PathLike) -> Path:
    """Write a SimpleITK image atomically (creating parent folders); compressed unless the name
    ends in ``.nii``. Extensions: :data:`IMAGE_EXTENSIONS`. Returns the path written."""
    import SimpleITK as sitk
    ext = suffix(path, IMAGE_EXTENSIONS)
    if not ext:
        raise FileFormatError(f"cannot write an image to '{path}': use one of {IMAGE_EXTENSIONS}")
    with atomic_output(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=ext != ".nii")
    return Path(path)


def write_linear_transform(matrix_lps, path: PathLike) -> Path:
    """Write a 4x4 LPS point map ``p_moving = A p_fixed + t`` (ITK's resampling sense) as an ITK
    ``AffineTransform`` (centre 0) to ``.tfm``/``.txt``/``.h5``/``.hdf5``/``.mat``, atomically."""
    import SimpleITK as sitk
    m = np.asarray(matrix_lps, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {m.shape}")
    if not np.isfinite(m).all() or not np.allclose(m[3], [0, 0, 0, 1], atol=1e-9):
        raise ValueError(f"not a finite homogeneous 4x4 matrix (last row must be 0 0 0 1):\n{m}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError(f"the linear part of the matrix is singular:\n{m}")
    if not suffix(path, TRANSFORM_EXTENSIONS):
        raise FileFormatError(f"cannot write a transform to '{path}': use one of {TRANSFORM_EXTENSIONS}")
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(m[:3, :3].ravel().tolist())
    transform.SetTranslation(m[:3, 3].tolist())
    with atomic_output(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return Path(path)


def check_points(points_lps, names: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, List[str]]:
    """``(N, 3)`` finite float64 points and one label per point (default ``"1"``..``"N"``)."""
    pts = np.asarray(points_lps, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("points contain NaN or infinite values")
    labels = [str(i + 1) for i in range(len(pts))] if names is None else [str(n) for n in names]
    if len(labels) != len(pts):
        raise ValueError(f"got {len(labels)} names for {len(pts)} points")
    return pts, labels


def write_markups_json(path: PathLike, points_lps, names: Optional[Sequence[str]] = None,
                       description: Optional[str] = None,
                       point_attributes: Optional[Sequence[Dict]] = None,
                       name: Optional[str] = None) -> Path:
    """Write a Slicer point list (markups JSON, schema v1.0.3) in LPS mm, atomically.

    Args:
        points_lps: ``(N, 3)`` LPS mm ``(x, y, z)``.
        names: one label per point (default ``"1"``..``"N"``).
        description: stored as the markup's ``description``.
        point_attributes: one dict per point merged into its control point (e.g.
            ``{"description": "TRE 1.2 mm"}``); Slicer keeps the fields its schema knows.
        name: the markup's node name in Slicer.
    """
    pts, labels = check_points(points_lps, names)
    if point_attributes is not None and len(point_attributes) != len(pts):
        raise ValueError(f"got {len(point_attributes)} point_attributes for {len(pts)} points")
    control_points = []
    for i, (pos, label) in enumerate(zip(pts, labels)):
        cp = {"id": str(i + 1), "label": label, "description": "", "associatedNodeID": "",
              "position": [float(v) for v in pos], "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0,
                                                                    -0.0, 0.0, 0.0, 1.0],
              "selected": True, "locked": False, "visibility": True, "positionStatus": "defined"}
        if point_attributes is not None:
            cp.update(point_attributes[i])
        control_points.append(cp)
    markup = {"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
              "locked": False, "labelFormat": "%N-%d", "controlPoints": control_points}
    if name is not None:
        markup["name"] = str(name)
    if description is not None:
        markup["description"] = str(description)
    text = json.dumps({"@schema": _MARKUPS_SCHEMA, "markups": [markup]}, indent=2)
    with atomic_output(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)
