"""The worker command as Slicer runs it: a real subprocess, JSON lines, exit codes, outputs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepreglib.methods.weights import save_model
from deepreglib.methods.voxelmorph.network import VoxelMorph
from deepreglib.methods.registry import METHODS

ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def blob_image(shape=(32, 32, 32), centre=(16, 16, 16), spacing=(1.5, 1.5, 1.5), origin=(0, 0, 0)):
    k, j, i = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    r2 = (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2
    arr = (np.exp(-r2 / 40.0) + 0.5 * np.exp(-r2 / 200.0)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    sitk.WriteImage(blob_image(), str(d / "fixed.nii.gz"))
    sitk.WriteImage(blob_image(centre=(15, 17, 16)), str(d / "moving.nii.gz"))
    return d


@pytest.fixture(scope="module")
def untrained_weights(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(VoxelMorph(), tmp_path_factory.mktemp("w") / "vm_untrained")


def run_worker(*args, timeout=300):
    cmd = [sys.executable, "-m", "deepreglib", "register", "--progress", "json", "--device", "cpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def events(stdout):
    lines = [line for line in stdout.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every stdout line must be JSON


def test_worker_registers_and_writes_every_output(pair, untrained_weights, tmp_path):
    out = tmp_path / "run"
    proc = run_worker("--fixed", str(pair / "fixed.nii.gz"), "--moving", str(pair / "moving.nii.gz"),
                      "--out", str(out), "--method", "voxelmorph", "--weights", str(untrained_weights),
                      "--init", "none")  # no alignment: the untrained network alone (identity below)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    evs = events(proc.stdout)
    assert evs[-1] == {"event": "result", "manifest": str(out / "manifest.json")}
    fractions = [e["fraction"] for e in evs if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    names = {o["name"] for o in manifest["outputs"]}
    assert {"warped", "transform", "inverse_transform", "jacobian", "qa"} <= names
    for o in manifest["outputs"]:
        assert (out / o["path"]).is_file(), o
    assert manifest["weights"]["sha256"] == json.loads(Path(untrained_weights).with_suffix(".json").read_text())["sha256"]
    assert set(manifest["timings"]) >= {"read", "preprocess", "inference", "postprocess", "write", "total"}
    assert manifest["versions"]["torch"] == torch.__version__
    # the warped volume is on the fixed grid
    warped = sitk.ReadImage(str(out / "warped.mha"))
    fixed = sitk.ReadImage(str(pair / "fixed.nii.gz"))
    assert warped.GetSize() == fixed.GetSize() and warped.GetSpacing() == fixed.GetSpacing()
    # an untrained network is the identity: the warped image is the moving image
    moving = sitk.GetArrayFromImage(sitk.ReadImage(str(pair / "moving.nii.gz")))
    assert np.abs(sitk.GetArrayFromImage(warped) - moving).max() < 1e-3
    assert not list(tmp_path.glob(".run.partial-*"))


def test_methods_lists_the_registry():
    proc = subprocess.run([sys.executable, "-m", "deepreglib", "methods", "--json"], capture_output=True,
                          text=True, env=ENV, timeout=120)
    assert proc.returncode == 0
    listed = json.loads(proc.stdout)
    assert [m["name"] for m in listed] == list(METHODS)
    assert all(m["kind"] in ("rigid", "affine", "deformable") for m in listed)


def _write(path, arr, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing[: img.GetDimension()])
    img.SetOrigin(origin[: img.GetDimension()])
    sitk.WriteImage(img, str(path))
    return path


@pytest.mark.parametrize("case", ["missing", "garbage", "2d", "nan", "empty", "no_overlap", "out_not_empty",
                                  "bad_method"])
def test_bad_input_exits_2_with_a_message(case, pair, untrained_weights, tmp_path):
    fixed, moving = pair / "fixed.nii.gz", pair / "moving.nii.gz"
    out = tmp_path / "out"
    extra = []
    if case == "missing":
        moving = tmp_path / "nope.nii.gz"
    elif case == "garbage":
        moving = tmp_path / "garbage.nii.gz"
        moving.write_bytes(b"this is not an image" * 10)
    elif case == "2d":
        moving = _write(tmp_path / "flat.nii.gz", np.random.rand(32, 32).astype(np.float32))
    elif case == "nan":
        arr = np.random.rand(16, 16, 16).astype(np.float32)
        arr[3, 4, 5] = np.nan
        moving = _write(tmp_path / "nan.mha", arr)  # NIfTI writing drops NaNs
    elif case == "empty":
        moving = _write(tmp_path / "zeros.nii.gz", np.zeros((16, 16, 16), np.float32))
    elif case == "no_overlap":  # without alignment (--init auto would bring it over)
        moving = _write(tmp_path / "far.nii.gz", sitk.GetArrayFromImage(blob_image()), (1.5,) * 3, (500.0, 0.0, 0.0))
        extra = ["--init", "none"]
    elif case == "out_not_empty":
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    elif case == "bad_method":
        extra = ["--method", "no_such_method"]
    proc = run_worker("--fixed", str(fixed), "--moving", str(moving), "--out", str(out),
                      "--weights", str(untrained_weights), *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = events(proc.stdout)[-1]
    assert err["event"] == "error" and err["kind"] == "bad_input"
    assert len(err["message"]) > 20 and "Traceback" not in err["message"]
    if case == "out_not_empty":
        assert (out / "precious.txt").read_text() == "keep me"
        assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    else:
        assert not out.exists()
    if case == "no_overlap":
        assert "--init" in err["message"]


def test_sigterm_cancels_cleanly(pair, tmp_path):
    out = tmp_path / "cancelled"
    cmd = [sys.executable, "-m", "deepreglib", "register", "--progress", "json", "--device", "cpu",
           "--fixed", str(pair / "fixed.nii.gz"), "--moving", str(pair / "moving.nii.gz"),
           "--out", str(out), "--method", "iterative"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen_inference = False
    deadline = time.time() + 180
    for line in proc.stdout:  # wait until the optimisation is under way
        ev = json.loads(line)
        if ev["event"] == "progress" and ev["stage"] == "inference":
            seen_inference = True
            break
        assert time.time() < deadline
    assert seen_inference
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3
    last = json.loads(rest.strip().splitlines()[-1])
    assert last["event"] == "error" and last["kind"] == "cancelled"
    assert not out.exists()
    assert not list(tmp_path.glob(".cancelled.partial-*"))


def test_report_command_redraws_the_qa_picture(pair, untrained_weights, tmp_path):
    from deepreglib.cli import main as cli_main
    out = tmp_path / "run"
    proc = run_worker("--fixed", str(pair / "fixed.nii.gz"), "--moving", str(pair / "moving.nii.gz"),
                      "--out", str(out), "--weights", str(untrained_weights), "--no-qa")
    assert proc.returncode == 0 and not (out / "qa.png").exists()
    png = tmp_path / "again.png"
    assert cli_main(["report", str(out / "manifest.json"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
