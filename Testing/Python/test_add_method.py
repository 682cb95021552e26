"""docs/ARCHITECTURE.md, "How to add a method", held to its word: a toy method in a temporary
folder, found through $DEEPREG_METHOD_PATH, runs through `deepreg register`; no engine file changes."""
import json
import os
import subprocess
import sys
import textwrap



SPEC = '''
from deepreglib.methods.spec import MethodInfo, MethodSpec
SPEC = MethodSpec(info=MethodInfo(name="toy", title="Toy shift", description="shifts by one voxel",
                                  kind="deformable", weights=None,
                                  implementation=f"{__name__}.method:ToyMethod"))
'''
METHOD = '''
import torch
from deepreglib.methods.base import Method, MethodResult

class ToyMethod(Method):
    def run(self, fixed, moving, grid, ctx):
        u = torch.zeros(1, 3, *fixed.shape[2:])
        u[:, 2] = 1.0  # one voxel along i (x)
        return MethodResult(displacement=u)
'''


def test_a_method_from_a_folder_outside_the_engine_runs_through_deepreg_register(tmp_path):
    plugins = tmp_path / "plugins" / "toy_method"
    plugins.mkdir(parents=True)
    (plugins / "__init__.py").write_text(textwrap.dedent(SPEC))
    (plugins / "method.py").write_text(textwrap.dedent(METHOD))
    env = dict(os.environ, DEEPREG_METHOD_PATH=str(tmp_path / "plugins"))
    listed = subprocess.run([sys.executable, "-m", "deepreglib", "methods", "--json"], env=env,
                            capture_output=True, text=True, check=True)
    assert "toy" in [m["name"] for m in json.loads(listed.stdout)]
    out = tmp_path / "run"
    ex = subprocess.run([sys.executable, "-m", "deepreglib", "example", "--out", str(out), "--method", "toy",
                         "--progress", "none"], env=env, capture_output=True, text=True)
    assert ex.returncode == 0, ex.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "toy"
    assert {o["name"] for o in manifest["outputs"]} >= {"warped", "transform", "jacobian"}
