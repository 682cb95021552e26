"""Issue 18: non-finite voxels refused at load time (every format), outputs streamed slab by slab
and equal to the whole-volume computation, the memory check, and faults injected into real
worker processes (disk full, SIGKILL, SIGTERM after the result, truncated input, two runs to one
folder, corrupted weights, CUDA out-of-memory)."""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepreglib.core.errors import BadInputError
from deepreglib.core.geometry import Grid, displacement_mm_to_voxel
from deepreglib.core.jacobian import jacobian_determinant
from deepreglib.core.resample import field_to_fixed_grid, physical_field, resample_to_grid
from deepreglib.io.images import SlabImageWriter, read_image
from deepreglib.run import memory, to_fixed_grid as tfg
from deepreglib.run.options import RegisterOptions
from deepreglib.run.pipeline import register

from helpers import rotation

POSIX = pytest.mark.skipif(os.name == "nt", reason="POSIX signals and resource limits")


def _blob_pair(folder: Path, n=40, ext=".nrrd", dtype=np.float32):
    z, y, x = np.mgrid[:n, :n, :n].astype(np.float64)
    paths = []
    for name, c in (("fixed", n / 2), ("moving", n / 2 + 2)):
        arr = 100 * np.exp(-((x - c) ** 2 + (y - n / 2) ** 2 + (z - n / 2) ** 2) / (2 * 6.0 ** 2))
        path = folder / f"{name}{ext}"
        sitk.WriteImage(sitk.GetImageFromArray(arr.astype(dtype)), str(path))
        paths.append(path)
    return paths


# -- non-finite voxels ---------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_voxels_are_refused_naming_the_image_and_count(tmp_path, ext, dtype):
    fixed, moving = _blob_pair(tmp_path, n=12, ext=ext, dtype=dtype)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(moving)))
    arr[3] = np.nan  # one whole slice
    arr[7, 2, 2] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(dtype)), str(moving))
    with pytest.raises(BadInputError) as e:
        register(RegisterOptions(fixed=str(fixed), moving=str(moving), out=str(tmp_path / "out"),
                                 method="voxelmorph", init="none", device="cpu"))
    msg = str(e.value)
    assert msg.startswith("the moving image") and moving.name in msg
    assert "145 NaN or infinite voxel(s) of 1728" in msg and "whole slice(s) z = 3" in msg
    assert "np.isfinite" in msg  # how to fix it
    assert not (tmp_path / "out").exists()


def test_non_finite_mask_is_refused_too(tmp_path):
    fixed, moving = _blob_pair(tmp_path, n=12, ext=".nii.gz")
    mask = np.ones((12, 12, 12), np.float32)
    mask[0, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "mask.nii.gz"))
    with pytest.raises(BadInputError, match=r"the --fixed-mask: .*1 NaN or infinite voxel"):
        register(RegisterOptions(fixed=str(fixed), moving=str(moving), out=str(tmp_path / "out"),
                                 method="voxelmorph", init="none", device="cpu",
                                 fixed_mask=str(tmp_path / "mask.nii.gz")))


def test_finite_nifti_still_reads(tmp_path):
    fixed, _ = _blob_pair(tmp_path, n=8, ext=".nii.gz")
    assert read_image(str(fixed)).GetSize() == (8, 8, 8)


# -- streamed outputs ----------------------------------------------------------------------------
def _problem():
    torch.manual_seed(0)
    fixed = Grid((13, 11, 9), (1.3, 0.9, 1.7), (-5.0, 3.0, 7.0), tuple(rotation(0.2, -0.1, 0.3).ravel()))
    moving = Grid((10, 12, 8), (1.5, 1.1, 1.9), (-4.0, 2.0, 6.0), tuple(rotation(-0.1, 0.2, 0.0).ravel()))
    net = fixed.centered_like((8, 8, 8), (2.0, 2.0, 2.0))
    u_net = torch.nn.functional.avg_pool3d(torch.randn(1, 3, 8, 8, 8), 3, 1, 1) * 0.8
    a = np.eye(4)
    a[:3, :3] = rotation(0.05, 0.02, -0.04) * 1.02
    a[:3, 3] = (1.5, -2.0, 0.5)
    img = torch.rand(1, 1, *moving.shape)
    fx = tfg.FixedGridResult(a, fixed, moving, net, img,
                             tfg.displacement_voxel_to_mm(u_net, net), None)
    return fx, u_net


def test_slabs_equal_the_whole_volume_computation(monkeypatch):
    fx, u_net = _problem()
    u_mm = field_to_fixed_grid(u_net, fx.net, fx.fixed_grid)  # the whole-volume way
    total = physical_field(fx.matrix, u_mm, fx.fixed_grid, dtype=torch.float64)
    jac = jacobian_determinant(displacement_mm_to_voxel(total, fx.fixed_grid).float())
    warped = resample_to_grid(fx.moving, fx.moving_grid, fx.fixed_grid, matrix_lps=fx.matrix, displacement_mm=u_mm)
    monkeypatch.setattr(tfg, "SLAB_VOXELS", 2 * 11 * 9)  # slabs of 2 slices, the last of 1
    slabs = list(fx.slab_bounds())
    assert len(slabs) == 7 and slabs[-1] == (12, 13)
    parts = [fx.slab(k0, k1) for k0, k1 in slabs]
    cat = {k: torch.cat([getattr(p, k) for p in parts], dim=2) for k in ("total_mm", "jacobian", "warped")}
    assert torch.allclose(cat["total_mm"].double(), total, atol=2e-5)
    assert torch.allclose(cat["jacobian"], jac, atol=2e-5)  # halo: the seams are exact
    assert torch.allclose(cat["warped"], warped, atol=1e-5)


def test_slab_writer_round_trip_and_incomplete_file_is_not_left(tmp_path):
    grid = Grid((5, 4, 3), (0.7, 0.8, 1.5), (-10.5, 20.25, 3.0), tuple(rotation(0.3, 0.1, -0.2).ravel()))
    field = np.random.rand(5, 4, 3, 3).astype(np.float32)
    with SlabImageWriter(tmp_path / "f.mha", grid, np.float32, 3) as w:
        w.write(field[:2])
        w.write(torch.from_numpy(field[2:]).permute(3, 0, 1, 2)[None])  # (1, C, n, H, W)
    img = sitk.ReadImage(str(tmp_path / "f.mha"))
    assert np.array_equal(sitk.GetArrayFromImage(img), field)
    assert np.allclose(img.GetDirection(), grid.direction) and np.allclose(img.GetOrigin(), grid.origin)
    assert np.allclose(img.GetSpacing(), grid.spacing)
    with pytest.raises(ValueError, match="2 of 5 slices"):
        with SlabImageWriter(tmp_path / "g.mha", grid, np.int16) as w:
            w.write(np.zeros((2, 4, 3)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.mha"]


def test_too_big_for_this_machine_is_refused_before_reading(tmp_path, monkeypatch):
    fixed, moving = _blob_pair(tmp_path, n=8)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 100 * 2 ** 20)
    with pytest.raises(BadInputError, match=r"needs about 1\.\d GB .* only 0\.1 GB is available.*crop"):
        register(RegisterOptions(fixed=str(fixed), moving=str(moving), out=str(tmp_path / "out"),
                                 method="voxelmorph", init="none", device="cpu"))


# -- faults in real worker processes -------------------------------------------------------------
def _cmd(fixed, moving, out, *extra):
    return [sys.executable, "-m", "deepreglib", "register", "--fixed", str(fixed), "--moving", str(moving),
            "--out", str(out), "--method", "voxelmorph", "--init", "none", "--device", "cpu",
            "--progress", "json", "--no-qa", *extra]


def _run(cmd, env=None, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}, **kw)
    events = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return p.returncode, events


def _sha(paths):
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def _complete(out: Path) -> bool:
    m = json.loads((out / "manifest.json").read_text())
    return all((out / o["path"]).is_file() for o in m["outputs"])


def _leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@POSIX
def test_disk_full_is_bad_input_naming_the_folder_and_leaves_nothing(tmp_path):
    import resource
    inputs = _blob_pair(tmp_path)
    before = _sha(inputs)

    def limit():  # every file this process writes stops at 300 kB (the field needs 768 kB)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
    rc, events = _run(_cmd(*inputs, tmp_path / "out"), preexec_fn=limit)
    assert rc == 2
    assert events[-1]["kind"] == "bad_input" and str(tmp_path) in events[-1]["message"]
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert _sha(inputs) == before


@POSIX
def test_sigkill_at_random_moments_loses_nothing_and_the_next_run_succeeds(tmp_path):
    inputs = _blob_pair(tmp_path)
    before = _sha(inputs)
    rng = random.Random(18)
    for i in range(2):
        out = tmp_path / f"out{i}"
        p = subprocess.Popen(_cmd(*inputs, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 6.0))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        assert not out.exists() or _complete(out)  # never a half-written result under the name
        if not out.exists():
            rc, _ = _run(_cmd(*inputs, out))  # reuses whatever the killed run left
            assert rc == 0 and _complete(out)
        assert _leftovers(tmp_path) == []
    assert _sha(inputs) == before


@POSIX
def test_sigterm_right_after_the_result_still_exits_0(tmp_path):
    """The rare unclean end: a SIGTERM that arrived after the result, while Python shut down,
    killed the finished worker (exit -15): Python restores the default handler at exit."""
    inputs = _blob_pair(tmp_path)
    p = subprocess.Popen(_cmd(*inputs, tmp_path / "out"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    for line in p.stdout:
        if '"result"' in line:
            p.send_signal(signal.SIGTERM)
            break
    assert p.wait(timeout=60) == 0 and _complete(tmp_path / "out")


@POSIX
def test_two_runs_to_one_folder_one_wins_the_other_is_refused(tmp_path):
    inputs = _blob_pair(tmp_path)
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cmd(*inputs, out), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(text for rc, text in results if rc == 2)
    assert str(out) in loser
    assert _complete(out) and _leftovers(tmp_path) == []


def test_truncated_nifti_is_bad_input(tmp_path):
    fixed, moving = _blob_pair(tmp_path, n=24, ext=".nii.gz")
    data = moving.read_bytes()
    moving.write_bytes(data[: len(data) // 2])
    rc, events = _run(_cmd(fixed, moving, tmp_path / "out"))
    assert rc == 2 and ("truncated" in events[-1]["message"] or "cannot read" in events[-1]["message"])
    assert not (tmp_path / "out").exists()


def test_corrupted_weights_are_bad_input_naming_the_file(tmp_path):
    from deepreglib.io.models import models_dir
    for name in ("voxelmorph.pt", "voxelmorph.json"):
        shutil.copy(models_dir() / name, tmp_path / name)
    data = bytearray((tmp_path / "voxelmorph.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "voxelmorph.pt").write_bytes(bytes(data))
    inputs = _blob_pair(tmp_path)
    rc, events = _run(_cmd(*inputs, tmp_path / "out", "--weights", str(tmp_path / "voxelmorph.pt")))
    assert rc == 2 and "checksum" in events[-1]["message"] and "voxelmorph.pt" in events[-1]["message"]
    assert not (tmp_path / "out").exists()


def test_cuda_out_of_memory_retries_on_the_cpu_and_says_so(tmp_path):
    inputs = _blob_pair(tmp_path)
    rc, events = _run(_cmd(*inputs, tmp_path / "out"), env={"DEEPREG_FAULT_INJECT": "cuda_oom"})
    assert rc == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["device"] == "cpu" and m["device_fallback"]["reason"] == "CUDA out of memory"
    assert any("retried on the CPU" in s for s in m["messages"])
    assert m["input_checks"] == {"non_finite": "refused", "non_finite_voxels": {"fixed": 0, "moving": 0}}
