"""Every widget the module code uses (``self.ui.<name>``) exists in its .ui file, every
``SlicerParameterName`` in the .ui names a field of the module's parameter node, and both
modules import outside Slicer (their Qt/slicer imports are guarded)."""
import ast
import importlib
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = {"DeepRegistration": "DeepRegistrationParameterNode", "DeformationQA": "DeformationQAParameterNode"}


def _ui_tree(module):
    return ET.parse(ROOT / "Resources" / "UI" / f"{module}.ui")


def _widget_names(tree):
    return {w.get("name") for w in tree.iter("widget")}


def _used_names(module):
    source = (ROOT / "DeepRegExtension" / f"{module}.py").read_text()
    return set(re.findall(r"self\.ui\.(\w+)", source))


def _parameter_fields(module, class_name):
    tree = ast.parse((ROOT / "DeepRegExtension" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError(f"{class_name} not found in {module}.py")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_used_widget_exists(module):
    used = _used_names(module)
    assert len(used) > 10  # the scan found the code's widget uses
    missing = used - _widget_names(_ui_tree(module))
    assert not missing, f"{module}.ui lacks {sorted(missing)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_parameter_names_match_parameter_node(module):
    fields = _parameter_fields(module, MODULES[module])
    bound = {p.find("string").text for p in _ui_tree(module).iter("property")
             if p.get("name") == "SlicerParameterName"}
    assert bound, "no widget is bound to the parameter node"
    assert bound <= fields, f"unknown parameters {sorted(bound - fields)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_widget_names_unique_and_combos_get_the_scene(module):
    tree = _ui_tree(module)
    names = [w.get("name") for w in tree.iter("widget")]
    assert len(names) == len(set(names))
    combos = {w.get("name") for w in tree.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    receivers = {c.find("receiver").text for c in tree.iter("connection")
                 if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    assert combos and combos <= receivers


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_without_slicer_application(module):
    sys.path.insert(0, str(ROOT / "DeepRegExtension"))
    mod = importlib.import_module(module)
    assert mod._IN_SLICER is False
    assert (ROOT / "Resources" / "Icons" / f"{module}.png").is_file()
    assert Path(mod.resource_path(f"UI/{module}.ui")).is_file()


def test_method_selector_text_comes_from_the_registry():
    """What the widget shows under the method list: the registry's description, kind and
    expected time per device, for every method the registry has."""
    sys.path.insert(0, str(ROOT / "DeepRegExtension"))
    logic_cls = importlib.import_module("DeepRegistration").DeepRegistrationLogic
    from deepreglib.methods.registry import METHODS
    assert [m.name for m in logic_cls.methods()] == list(METHODS)
    for info in logic_cls.methods():
        text = logic_cls.methodSummary(info)
        assert text.startswith(info.description), info.name
        assert f"Kind: {info.kind}." in text, info.name
        if "cpu" in info.expected_seconds:
            assert f"CPU ~{info.expected_seconds['cpu']:g} s" in text, info.name
        if "cuda" in info.expected_seconds:
            assert f"GPU (CUDA) ~{info.expected_seconds['cuda']:g} s" in text, info.name
        assert logic_cls.methodInfo(info.name) is info
    assert logic_cls.methodInfo("no-such-method") is None


def test_device_list_starts_with_auto_and_cpu_and_names_every_gpu():
    sys.path.insert(0, str(ROOT / "DeepRegExtension"))
    torch = pytest.importorskip("torch")
    devices = importlib.import_module("DeepRegistration").DeepRegistrationLogic.devices()
    assert devices[:2] == [("Auto (GPU if available)", "auto"), ("CPU", "cpu")]
    cuda = [v for _, v in devices if v.startswith("cuda")]
    assert cuda == [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    for label, value in devices[2:]:
        if value.startswith("cuda"):
            assert "GB free" in label  # torch can tell the free memory of a CUDA device
