"""The modules' Slicer self-tests (``ScriptedLoadableModuleTest``), run outside the application on
Slicer's real MRML (``slicer-core``) with a real worker process, so a broken self-test shows here
before Slicer's test factory (``ctest -R py_DeepRegistration``) meets it.

``slicer.mrmlScene`` is what the application provides; here it is a plain ``vtkMRMLScene``.
"""
import importlib
import sys
import unittest
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("vtk")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepRegExtension"))


@pytest.fixture
def application_scene():
    had = hasattr(slicer, "mrmlScene")
    old = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = slicer.vtkMRMLScene()
    try:
        yield slicer.mrmlScene
    finally:
        slicer.mrmlScene.Clear(0)
        if had:
            slicer.mrmlScene = old
        else:
            del slicer.mrmlScene


def _test_names(module_name, class_name):
    cls = getattr(importlib.import_module(module_name), class_name)
    return sorted(n for n in dir(cls) if n.startswith("test_"))


SELFTESTS = ([("DeepRegistration", "DeepRegistrationTest", n)
              for n in _test_names("DeepRegistration", "DeepRegistrationTest")]
             + [("DeformationQA", "DeformationQATest", n)
                for n in _test_names("DeformationQA", "DeformationQATest")])


def test_every_selftest_is_run_by_runTest():
    """Slicer's Reload & Test calls ``runTest``: it must run every ``test_`` method."""
    for module_name, class_name in {(m, c) for m, c, _ in SELFTESTS}:
        source = Path(importlib.import_module(module_name).__file__).read_text()
        body = source[source.index(f"class {class_name}("):]
        body = body[body.index("def runTest"):body.index("def ", body.index("def runTest") + 5)]
        for _, cls, name in SELFTESTS:
            if cls == class_name:
                assert f"self.{name}" in body, f"{class_name}.runTest does not run {name}"


@pytest.mark.parametrize("module_name,class_name,test_name", SELFTESTS,
                         ids=[f"{c}.{n}" for _, c, n in SELFTESTS])
def test_selftest_passes(application_scene, module_name, class_name, test_name):
    case = getattr(importlib.import_module(module_name), class_name)(test_name)
    result = unittest.TestResult()
    case.run(result)
    problems = [text for _, text in result.errors + result.failures]
    if result.skipped and not problems:
        pytest.skip(result.skipped[0][1])
    assert not problems, "\n".join(problems)
