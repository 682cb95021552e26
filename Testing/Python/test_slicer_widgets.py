"""The widgets' behaviour that Slicer's GUI would show, with stand-in Qt widgets (Qt has no
Python package outside Slicer): the Apply/Cancel state after the scene is closed in the middle
of a run, what the slice views show after a run, and how Cancel ends the worker on Windows."""
import sys
import time
import types
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepRegExtension"))

import DeepRegistration  # noqa: E402
from DeepRegistrationLib import process  # noqa: E402


class _Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)


class _Widget:
    """Stands in for any Qt widget: settable properties, signals that can be blocked."""

    def __init__(self, **props):
        self.__dict__.update(text="", enabled=True, toolTip="", value=0)
        self.__dict__.update(props)
        self._blocked = False
        self.currentNodeChanged = _Signal()

    def blockSignals(self, on):
        self._blocked = bool(on)

    def setCurrentNode(self, node):
        self.current = node
        if not self._blocked:
            for slot in self.currentNodeChanged.slots:
                slot(node)

    def appendPlainText(self, text):
        self.text += text + "\n"


def _widget():
    w = DeepRegistration.DeepRegistrationWidget()
    names = ("applyButton", "inputsCollapsibleButton", "outputsCollapsibleButton", "statusLabel", "metricsLabel",
             "overlaySelector", "logTextEdit", "progressBar", "deviceComboBox", "methodComboBox",
             "initializationComboBox", "methodDescriptionLabel", "refineStepsSpinBox", "refreshDevicesButton")
    w.ui = types.SimpleNamespace(**{n: _Widget() for n in names})
    w.ui.overlaySelector.currentNodeChanged.connect(w.onOverlaySelected)
    w.logic = DeepRegistration.DeepRegistrationLogic()
    w._timer = types.SimpleNamespace(stop=lambda: None, start=lambda: None)
    w.removeObserver = w.addObserver = lambda *args: None
    return w


class _Run:
    def __init__(self):
        self.calls = []
        self.temp_dir = "/nonexistent"

    def cancel(self, discard=False, block=False):
        self.calls.append(("cancel", discard, block))

    def finish(self):
        self.calls.append(("finish",))


def test_closing_the_scene_mid_run_gives_back_apply_and_the_inputs():
    w = _widget()
    w._parameterNode = None
    w._run = run = _Run()
    w._updateGUI()
    assert w.ui.applyButton.text == "Cancel" and not w.ui.inputsCollapsibleButton.enabled
    w.onSceneStartClose(None, None)
    assert ("cancel", True, True) in run.calls and ("finish",) in run.calls  # stopped, its folder removed
    assert w._run is None
    assert w.ui.applyButton.text == "Apply"
    assert w.ui.inputsCollapsibleButton.enabled and w.ui.outputsCollapsibleButton.enabled
    assert not w.ui.applyButton.enabled  # no parameter node, no inputs: nothing to apply yet


def test_after_a_run_the_views_show_fixed_against_registered(monkeypatch):
    shown = []
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kw: shown.append(kw), raising=False)
    monkeypatch.setattr(DeepRegistration.dscene, "metrics_summary", lambda metrics: "")
    w = _widget()
    fixed, moving, warped, overlay = (object() for _ in range(4))
    w._parameterNode = types.SimpleNamespace(fixedVolume=fixed, movingVolume=moving, overlayOpacity=0.5)
    results = types.SimpleNamespace(metrics={}, messages=[], nodes={"warped": warped}, overlays=[overlay],
                                    browsers={})
    w._showResults(results)
    assert shown[-1]["background"] is fixed and shown[-1]["foreground"] is warped
    assert w.ui.overlaySelector.current is overlay  # listed, ready for the user to pick
    w.ui.overlaySelector.setCurrentNode(overlay)  # the user picks it: now it is shown
    assert shown[-1]["foreground"] is overlay


def test_cancel_on_windows_ends_the_tree_at_once(monkeypatch):
    commands = []
    monkeypatch.setattr(process, "_IS_WINDOWS", True)
    monkeypatch.setattr(process.subprocess, "run", lambda cmd, **kw: commands.append(cmd))

    class _Proc:
        pid = 4321

        def wait(self, timeout=None):
            return 3

        def kill(self):
            commands.append(["kill"])

    worker = process.WorkerProcess(["worker"], grace_seconds=30.0)
    worker._proc = _Proc()
    t0 = time.monotonic()
    worker.cancel(block=True)
    assert time.monotonic() - t0 < 5.0  # not the 30 s grace period
    assert commands == [["taskkill", "/PID", "4321", "/T", "/F"]]
