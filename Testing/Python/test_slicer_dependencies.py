"""DeepRegistrationLib.dependencies: torch and the engine's requirements are installed on first
use, only after the user agreed, by the PyTorch extension for torch and by Slicer's
``pip_ensure`` for the rest. The installers are replaced by recorders here (nothing is
installed); what is checked is who is asked what, in which order, and what happens on failure."""
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepRegExtension"))

from DeepRegistrationLib import dependencies as deps  # noqa: E402


@pytest.fixture
def installers(monkeypatch):
    calls = []
    monkeypatch.setattr(deps, "_install_torch", lambda log: calls.append(("torch",)))
    monkeypatch.setattr(deps, "_pip", lambda reqs, log: calls.append(("pip", tuple(reqs))))
    return calls


def test_nothing_missing_asks_nothing(installers):
    asked = []
    assert deps.ensure_dependencies(lambda m: asked.append(m) or True, missing=[]) is True
    assert asked == [] and installers == []


def test_declining_installs_nothing(installers):
    asked = []
    assert deps.ensure_dependencies(lambda m: asked.append(m) or False,
                                    missing=[deps.TORCH_REQUIREMENT, "scipy>=1.7"]) is False
    assert installers == []
    assert len(asked) == 1 and "torch>=2.1" in asked[0] and "scipy>=1.7" in asked[0]
    assert "GB" in asked[0]  # the user learns what it costs before agreeing


def test_torch_by_the_pytorch_extension_then_the_rest_by_pip(installers, monkeypatch):
    monkeypatch.setattr(deps, "missing_requirements", lambda: [])  # installed afterwards
    assert deps.ensure_dependencies(lambda m: True, missing=[deps.TORCH_REQUIREMENT, "scipy>=1.7"]) is True
    assert installers == [("torch",), ("pip", ("scipy>=1.7",))]


def test_failed_installation_says_what_to_do(monkeypatch):
    def broken(log):
        raise OSError("no network")
    monkeypatch.setattr(deps, "_install_torch", broken)
    with pytest.raises(RuntimeError, match="no network.*pip_install"):
        deps.ensure_dependencies(lambda m: True, missing=[deps.TORCH_REQUIREMENT])


def test_still_missing_after_installation_asks_for_a_restart(installers, monkeypatch):
    monkeypatch.setattr(deps, "missing_requirements", lambda: ["scipy>=1.7"])
    with pytest.raises(RuntimeError, match="Restart Slicer"):
        deps.ensure_dependencies(lambda m: True, missing=["scipy>=1.7"])


def test_pip_ensure_is_used_without_asking_twice(monkeypatch):
    """Slicer 5.12's ``slicer.packaging.pip_ensure``: our confirmation was the question, so its
    own prompt is switched off; the requester is named."""
    pytest.importorskip("packaging")
    seen = {}

    def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True,
                   prompt_restart=True, requester=None, skip_in_testing=True, show_progress=True):
        seen.update(requirements=[str(r) for r in requirements], prompt_install=prompt_install,
                    requester=requester)
    monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(pip_ensure=pip_ensure))
    deps._pip(["scipy>=1.7", "matplotlib>=3.5"], log=lambda m: None)
    assert seen == {"requirements": ["scipy>=1.7", "matplotlib>=3.5"], "prompt_install": False,
                    "requester": "DeepRegExtension"}


def test_pytorch_extension_installs_torch_without_its_own_prompt(monkeypatch):
    done = {}

    class Logic:
        def torchInstalled(self):
            return False

        def installTorch(self, askConfirmation=True, torchVersionRequirement=None, **kw):
            done.update(askConfirmation=askConfirmation, requirement=torchVersionRequirement)
            return object()
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    deps._install_torch(log=lambda m: None)
    assert done == {"askConfirmation": False, "requirement": ">=2.1"}


def test_missing_requirements_lists_what_cannot_be_imported(monkeypatch):
    monkeypatch.setattr(deps, "ENGINE_REQUIREMENTS",
                        (("numpy", "numpy>=1.21"), ("deepreg_no_such_module", "deepreg-no-such-package>=1")))
    missing = deps.missing_requirements()
    assert "deepreg-no-such-package>=1" in missing and "numpy>=1.21" not in missing
