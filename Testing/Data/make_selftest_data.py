"""Make the stored worker results that the modules' self-tests load into the scene without a
worker (the extension build server has no torch). Run from the repository root, with the engine
installed; it replaces ``Testing/Data/selftest_run`` and ``Testing/Data/selftest_qa``:

    python Testing/Data/make_selftest_data.py

The pair: a Gaussian blob and the same blob moved by 2.5 voxels, on a small oblique grid with
anisotropic spacing (so that a geometry mistake shows), registered by the weight-free
``iterative`` method; then ``deepreg qa`` of the result's transform.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
N = 16
SPACING = (1.5, 1.25, 2.0)
ORIGIN = (12.0, -30.0, 5.0)
c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
DIRECTION = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def blob(centre_i: float) -> sitk.Image:
    k, j, i = np.mgrid[:N, :N, :N].astype(np.float64)
    arr = 100 * np.exp(-((i - centre_i) ** 2 + (j - N / 2) ** 2 + (k - N / 2) ** 2) / (2 * 2.5 ** 2)) + 5
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    return img


def main() -> int:
    run, qa = HERE / "selftest_run", HERE / "selftest_qa"
    for folder in (run, qa):
        shutil.rmtree(folder, ignore_errors=True)
    inputs = run / "inputs"
    inputs.mkdir(parents=True)
    sitk.WriteImage(blob(N / 2), str(inputs / "fixed.nrrd"), useCompression=True)
    sitk.WriteImage(blob(N / 2 + 2.5), str(inputs / "moving.nrrd"), useCompression=True)
    worker = [sys.executable, "-m", "deepreglib"]
    # relative paths: the manifests name no folder of this machine
    subprocess.run(worker + ["register", "--fixed", "inputs/fixed.nrrd", "--moving", "inputs/moving.nrrd",
                             "--out", "out", "--method", "iterative", "--device", "cpu", "--no-qa",
                             "--progress", "none"], check=True, cwd=str(run))
    subprocess.run(worker + ["qa", "--transform", "selftest_run/out/displacement.mha",
                             "--reference", "selftest_run/inputs/fixed.nrrd", "--out", "selftest_qa",
                             "--inverse", "selftest_run/out/inverse_displacement.mha", "--progress", "none"],
                   check=True, cwd=str(HERE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
