"""The engine and its worker on a system without the Unix-only modules (Windows): every engine
module imports, and ``deepreg register`` runs a small pair, with ``resource``, ``fcntl``,
``termios``, ``pwd`` and ``grp`` made unimportable (for our code; the blocker lets the standard
library and third-party packages keep their own guarded imports)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

UNIX_ONLY = ("resource", "fcntl", "termios", "pwd", "grp")

#: Run before anything else in the child: from then on, importing one of UNIX_ONLY from a file
#: of this repository raises ImportError, as it would on Windows.
BLOCKER = textwrap.dedent(f"""
    import builtins, sys
    _ROOT = {str(Path(__file__).resolve().parents[2])!r}
    _BLOCKED = {UNIX_ONLY!r}
    for _name in _BLOCKED:
        sys.modules.pop(_name, None)
    _real_import = builtins.__import__
    def _import(name, globals=None, locals=None, fromlist=(), level=0):
        caller = (globals or {{}}).get("__file__") or ""
        if name.split(".")[0] in _BLOCKED and level == 0 and (caller.startswith(_ROOT) or "deepreglib" in caller
                                                              or "DeepRegistration" in caller):
            raise ImportError(f"No module named {{name!r}} (blocked: a Windows-only test)")
        return _real_import(name, globals, locals, fromlist, level)
    builtins.__import__ = _import
""")


def _child(code: str, tmp_path, timeout=300):
    script = tmp_path / "child.py"
    script.write_text(BLOCKER + textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                          cwd=str(tmp_path))


def test_the_blocker_blocks(tmp_path):
    """The test's own check: a repository file importing ``resource`` fails under the blocker."""
    probe = Path(__file__).resolve().parents[2] / "Testing" / "Python" / "_probe_resource.py"
    probe.write_text("import resource\n")
    try:
        done = _child(f"import runpy\nrunpy.run_path({str(probe)!r})\n", tmp_path)
    finally:
        probe.unlink()
    assert done.returncode != 0 and "blocked: a Windows-only test" in done.stderr


def test_engine_imports_and_registers_without_unix_only_modules(tmp_path):
    done = _child("""
        import importlib, json, pkgutil, sys
        import numpy as np, SimpleITK as sitk
        import deepreglib
        failed = []
        for info in pkgutil.walk_packages(deepreglib.__path__, "deepreglib."):
            if info.name.endswith("__main__"):  # the worker entry point: run below, through cli.main
                continue
            try:
                importlib.import_module(info.name)
            except ImportError as e:
                failed.append(f"{info.name}: {e}")
        k, j, i = np.mgrid[:16, :16, :16].astype(np.float64)
        for name, c in (("fixed", 8.0), ("moving", 10.0)):
            arr = (100 * np.exp(-((i - c) ** 2 + (j - 8) ** 2 + (k - 8) ** 2) / 18) + 5).astype(np.float32)
            sitk.WriteImage(sitk.GetImageFromArray(arr), name + ".nii.gz")
        from deepreglib.cli import main
        code = main(["register", "--fixed", "fixed.nii.gz", "--moving", "moving.nii.gz", "--out", "out",
                     "--method", "iterative", "--device", "cpu", "--no-qa", "--progress", "none"])
        print(json.dumps({"failed": failed, "code": code,
                          "blocked_loaded": [m for m in ("resource", "fcntl", "termios", "pwd", "grp")
                                             if m in sys.modules and "deepreglib" in str(sys.modules[m])]}))
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failed"] == [], report["failed"]
    assert report["code"] == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["peak_memory_mb"]["ram"] is None or manifest["peak_memory_mb"]["ram"] > 0
    assert manifest["metrics"]["ncc_after"] > manifest["metrics"]["ncc_before"]
