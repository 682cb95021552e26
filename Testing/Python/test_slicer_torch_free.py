"""torch stays out of Slicer's own process: each test runs a child Python as Slicer's would be,
with both module files loaded on ``slicer-core`` (and Slicer's own parameter-node wrapper), and
checks ``sys.modules`` at the end. The worker, a separate process, may load torch.

Also: the self-tests on a machine without the engine's packages (the extension build server)
still test something, from the stored results under ``Testing/Data``."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (Slicer's MRML classes) is not installed", allow_module_level=True)

HERE = Path(__file__).resolve().parent

PRELUDE = textwrap.dedent(f"""
    import json, sys
    sys.path.insert(0, {str(HERE)!r})
    import slicer
    import slicer_layer
    slicer.mrmlScene = slicer.vtkMRMLScene()
    release = next((r for r in reversed(slicer_layer.RELEASES) if slicer_layer.available(r)), None)
    layer = slicer_layer.slicer_python_layer(release) if release else None
    if layer is not None:
        layer.__enter__()
    DeepRegistration = slicer_layer.load_module_file("DeepRegistration", "DeepRegistration")
    DeformationQA = slicer_layer.load_module_file("DeformationQA", "DeformationQA")
""")


def _child(code: str, tmp_path, timeout=600):
    script = tmp_path / "child.py"
    script.write_text(PRELUDE + textwrap.dedent(code))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_registration_and_qa_through_the_modules_never_load_torch_into_slicer(tmp_path):
    report = _child("""
        import numpy as np
        n = 20
        k, j, i = np.mgrid[:n, :n, :n].astype(np.float64)
        def blob(c):
            return (100 * np.exp(-((i - c) ** 2 + (j - 10) ** 2 + (k - 10) ** 2) / 18) + 5).astype(np.float32)
        fixed = slicer.util.addVolumeFromArray(blob(10.0), name="Fixed")
        moving = slicer.util.addVolumeFromArray(blob(12.5), name="Moving")
        logic = DeepRegistration.DeepRegistrationLogic()
        names = [m.name for m in logic.methods()]
        devices = logic.devices()
        results = logic.run(fixedVolume=fixed, movingVolume=moving, method="iterative", device="cpu", timeout=300)
        qa_results = DeformationQA.DeformationQALogic().run(results.nodes["transform"], fixed,
                                                            inverseTransform=results.nodes["inverse_transform"])
        print(json.dumps({
            "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
            "engine": sorted(m for m in sys.modules if m.startswith("deepreglib")),
            "methods": names, "devices": [v for _, v in devices],
            "nodes": sorted(results.nodes), "qa_nodes": sorted(qa_results.nodes),
            "folding": qa_results.metrics["folding_percent"], "wrapper": release}))
    """, tmp_path)
    assert report["torch"] == [], f"torch was imported into Slicer's process: {report['torch'][:5]}"
    heavy = [m for m in report["engine"] if m.startswith(("deepreglib.io.images", "deepreglib.run.",
                                                          "deepreglib.report.", "deepreglib.core.geometry"))]
    assert heavy == [], heavy  # only the protocol, the exchange files and the registry's specs
    assert "iterative" in report["methods"] and report["devices"][:2] == ["auto", "cpu"]
    assert {"warped", "transform", "jacobian"} <= set(report["nodes"])
    assert report["qa_nodes"] == ["displacement_magnitude", "jacobian"] and report["folding"] == 0.0


def test_selftests_without_the_engine_packages_still_check_the_stored_results(tmp_path):
    """As on the extension build server: torch cannot be imported; the tests that start the
    worker are skipped with a message, the stored-result tests run and pass."""
    report = _child("""
        import importlib.abc, unittest
        class _NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError("No module named 'torch' (this test's build server)")
                return None
        sys.meta_path.insert(0, _NoTorch())
        from DeepRegistrationLib import dependencies
        dependencies.missing_requirements = lambda: ["torch>=2.1"]
        outcome = {}
        for module, cls in ((DeepRegistration, "DeepRegistrationTest"), (DeformationQA, "DeformationQATest")):
            case_class = getattr(module, cls)
            for name in sorted(n for n in dir(case_class) if n.startswith("test_")):
                result = unittest.TestResult()
                case_class(name).run(result)
                outcome[f"{cls}.{name}"] = ("error" if result.errors or result.failures else
                                            "skipped: " + result.skipped[0][1] if result.skipped else "passed")
                if result.errors or result.failures:
                    outcome[f"{cls}.{name}"] += " " + (result.errors + result.failures)[0][1][-1500:]
        print(json.dumps(outcome))
    """, tmp_path)
    assert report["DeepRegistrationTest.test_StoredResultLoadsIntoScene"] == "passed", report
    assert report["DeformationQATest.test_StoredQAResultLoads"] == "passed", report
    assert report["DeepRegistrationTest.test_InputsAreNeverOutputs"] == "passed", report
    assert report["DeformationQATest.test_TransformDisplays"] == "passed", report
    assert "torch" in report["DeepRegistrationTest.test_IterativeRegistrationAlignsBlob"], report
    assert report["DeepRegistrationTest.test_IterativeRegistrationAlignsBlob"].startswith("skipped")
    assert not [k for k, v in report.items() if v.startswith("error")], report
