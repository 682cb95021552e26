"""--preset (methods/presets.py) and the defaults a run resolves: which method, options and
initial alignment run, what the manifest records, and bad preset names."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from deepreglib.core.errors import BadInputError
from deepreglib.methods.presets import DEFAULT_PRESET, PRESETS, get_preset
from deepreglib.methods.registry import METHODS
from deepreglib.run.options import RegisterOptions, apply_preset


def _opts(**kw):
    return RegisterOptions(fixed="f.nii.gz", moving="m.nii.gz", out="o", **kw)


def test_every_preset_names_a_registered_method_with_a_measured_time():
    assert DEFAULT_PRESET == "balanced" and list(PRESETS) == ["fast", "balanced", "accurate"]
    for p in PRESETS.values():
        assert p.method in METHODS and p.init == "auto"
        assert p.expected_seconds.get("cpu", 0) > 0 and p.measured.startswith("benchmarks/results/")


@pytest.mark.parametrize("kwargs, method, preset, init, options", [
    ({}, "instance", "balanced", "auto", {"schedule": "balanced"}),
    ({"preset": "fast"}, "voxelmorph", "fast", "auto", {}),
    ({"preset": "accurate"}, "instance", "accurate", "auto", {"schedule": "accurate"}),
    ({"method": "iterative"}, "iterative", None, "auto", {}),           # a method alone runs as it is
    ({"method": "dnet"}, "dnet", None, "none", {}),                     # a rigid method is the alignment
    ({"preset": "fast", "method": "carnet"}, "carnet", "fast", "auto", {}),
    ({"preset": "balanced", "init": "none"}, "instance", "balanced", "none", {"schedule": "balanced"}),
    ({"preset": "accurate", "method_options": {"schedule": "balanced"}}, "instance", "accurate", "auto",
     {"schedule": "balanced"}),                                          # explicit options win
    ({"weights": "my.pt"}, "voxelmorph", None, "auto", {}),            # weights name the default network
    ({"contrast": "different"}, "instance", "balanced", "auto", {"schedule": "balanced", "similarity": "mind"}),
    ({"contrast": "different", "method_options": {"similarity": "lncc"}}, "instance", "balanced", "auto",
     {"schedule": "balanced", "similarity": "lncc"}),                    # explicit options still win
    ({"preset": "fast", "contrast": "different"}, "voxelmorph", "fast", "auto", {}),
    ({"method": "instance", "contrast": "different"}, "instance", None, "auto", {"similarity": "mind"}),
])
def test_apply_preset(kwargs, method, preset, init, options):
    out = apply_preset(_opts(**kwargs))
    assert (out.method, out.preset, out.init, out.method_options) == (method, preset, init, options)


def test_unknown_preset_is_refused():
    with pytest.raises(BadInputError, match="fast, balanced, accurate"):
        get_preset("quick")
    with pytest.raises(BadInputError):
        apply_preset(_opts(preset="quick"))


def test_the_default_run_is_the_balanced_preset_and_says_so(tmp_path):
    """A run with no method and no preset: balanced (instance optimiser after --init auto); the
    manifest records preset, method and the alignment's quality; moving = fixed shifted 4 mm
    comes out aligned."""
    from deepreglib.run.pipeline import register
    from helpers import centred_grid, sample_phantom
    grid = centred_grid((40, 40, 40), (2.0, 2.0, 2.0))
    shift = np.eye(4)
    shift[:3, 3] = (4.0, -2.0, 0.0)
    paths = []
    for name, img in (("f", sample_phantom(grid)), ("m", sample_phantom(grid, shift))):
        paths.append(str(tmp_path / f"{name}.nii.gz"))
        sitk.WriteImage(grid.apply_to(sitk.GetImageFromArray(img[0, 0].numpy())), paths[-1])
    manifest = json.loads(register(RegisterOptions(fixed=paths[0], moving=paths[1], out=str(tmp_path / "o"),
                                                   qa=False)).read_text())
    assert manifest["preset"] == "balanced" and manifest["method"] == "instance"
    assert manifest["parameters"]["init"] == "auto" and manifest["alignment"]["quality"] == "ok"
    assert manifest["metrics"]["ncc_after"] > 0.98 > manifest["metrics"]["ncc_before"]
    t = np.asarray(manifest["matrix_lps"])[:3, 3]
    assert np.allclose(t, (4.0, -2.0, 0.0), atol=1.0)


def test_different_contrasts_align_by_mutual_information_and_register_by_mind(tmp_path):
    """``--contrast different``: the moving image is the fixed phantom shifted 4 mm with its
    contrast inverted inside the object (as bone is bright on CT and dark on T1 MR). The
    alignment (mutual information) finds the shift within 1 mm, the instance optimiser runs with
    MIND-SSC, and the manifest says so; an unknown value is refused before anything is read."""
    from deepreglib.run.options import check_options
    from deepreglib.run.pipeline import register
    from helpers import centred_grid, sample_phantom
    grid = centred_grid((40, 40, 40), (2.0, 2.0, 2.0))
    shift = np.eye(4)
    shift[:3, 3] = (4.0, -2.0, 0.0)
    fixed = sample_phantom(grid)[0, 0].numpy()
    moving = sample_phantom(grid, shift)[0, 0].numpy()
    moving = np.where(moving > 0.05 * moving.max(), moving.max() - moving, 0.0).astype(np.float32)
    paths = []
    for name, img in (("f", fixed), ("m", moving)):
        paths.append(str(tmp_path / f"{name}.nii.gz"))
        sitk.WriteImage(grid.apply_to(sitk.GetImageFromArray(img)), paths[-1])
    manifest = json.loads(register(RegisterOptions(fixed=paths[0], moving=paths[1], out=str(tmp_path / "o"),
                                                   qa=False, contrast="different")).read_text())
    assert manifest["parameters"]["contrast"] == "different"
    assert manifest["parameters"]["method_options"] == {"schedule": "balanced", "similarity": "mind"}
    t = np.asarray(manifest["matrix_lps"])[:3, 3]
    assert np.allclose(t, (4.0, -2.0, 0.0), atol=1.0), t
    with pytest.raises(BadInputError, match="--contrast must be one of same, different"):
        check_options(_opts(contrast="mixed"))
