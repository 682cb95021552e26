"""The presets in the Slicer module (issue 16): the first choice after the volumes, listing the
registry's presets and Custom, each with its measured time; the Advanced section (method,
alignment, refinement, method options, device) collapsed below it, showing the preset's values;
editing one of them makes the run Custom; and what reaches the worker's command line.

Stand-in Qt widgets (Qt has no Python package outside Slicer) and a stand-in parameter node that
calls the widget's ``_updateGUI`` on every change, as the real node's observer does. Nothing
here starts the worker or imports the engine beyond its plain-data registry."""
import dataclasses
import inspect
import shutil
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "DeepRegExtension"))

import DeepRegistration  # noqa: E402
from DeepRegistrationLib import process  # noqa: E402
from DeepRegistrationLib.process import register_command  # noqa: E402
from deepreglib.methods.presets import DEFAULT_PRESET, PRESETS  # noqa: E402

Logic = DeepRegistration.DeepRegistrationLogic
CUSTOM_ITEM = ("Custom (advanced options below)", "custom")
INPUT_CLASSES = {"QComboBox", "QSpinBox", "QDoubleSpinBox", "QLineEdit", "QCheckBox", "qMRMLNodeComboBox",
                 "ctkSliderWidget"}


# -- stand-ins ----------------------------------------------------------------------------------
class _Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def emit(self, *args):
        for slot in self.slots:
            slot(*args)


class _Widget:
    def __init__(self):
        self.text, self.enabled, self.toolTip, self.collapsed, self.value = "", True, "", True, 0

    def appendPlainText(self, text):
        self.text += text + "\n"


class _Combo(_Widget):
    """A QComboBox: items with data; ``setCurrentIndex`` emits ``currentIndexChanged`` unless
    signals are blocked (as the user's choice does)."""

    def __init__(self):
        super().__init__()
        self.items, self.currentIndex, self._blocked = [], -1, False
        self.currentIndexChanged = _Signal()

    def addItem(self, text, data):
        self.items.append((text, data))
        if self.currentIndex < 0:
            self.setCurrentIndex(0)

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def itemData(self, index):
        return self.items[index][1]

    def blockSignals(self, on):
        self._blocked = bool(on)

    def setCurrentIndex(self, index):
        if index != self.currentIndex:
            self.currentIndex = index
            if not self._blocked:
                self.currentIndexChanged.emit(index)

    def choose(self, data):  # what the user does
        index = self.findData(data)
        assert index >= 0, (data, self.items)
        self.setCurrentIndex(index)


class _Node:
    """The parameter node: plain attributes; every change calls the observer (``_updateGUI``)."""

    def __init__(self, observer, **values):
        self.__dict__["_observer"] = observer
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        self.__dict__[name] = value
        self._observer()


COMBOS = ("presetComboBox", "methodComboBox", "deviceComboBox", "initializationComboBox")
OTHERS = ("applyButton", "inputsCollapsibleButton", "outputsCollapsibleButton", "advancedCollapsibleButton",
          "statusLabel", "presetDescriptionLabel", "methodDescriptionLabel", "refineStepsSpinBox")


def _widget():
    w = DeepRegistration.DeepRegistrationWidget()
    w.ui = types.SimpleNamespace(**{n: _Combo() for n in COMBOS}, **{n: _Widget() for n in OTHERS})
    w.logic = Logic()
    w._fillChoices()
    for name, slot in (("presetComboBox", w.onPresetSelected), ("methodComboBox", w.onMethodSelected),
                       ("deviceComboBox", w.onDeviceSelected),
                       ("initializationComboBox", w.onInitializationSelected)):
        getattr(w.ui, name).currentIndexChanged.connect(slot)
    defaults = dict(Logic.presetValues(DEFAULT_PRESET), preset=DEFAULT_PRESET, device="auto",
                    fixedVolume=None, movingVolume=None)
    w._parameterNode = _Node(w._updateGUI, **defaults)
    w._updateGUI()
    return w


# -- the .ui ----------------------------------------------------------------------------------
def _ui():
    return ET.parse(ROOT / "Resources" / "UI" / "DeepRegistration.ui").getroot()


def _find(root, name):
    return next(w for w in root.iter("widget") if w.get("name") == name)


def _names_under(element):
    return {w.get("name") for w in element.iter("widget")}


def test_preset_is_the_first_choice_after_the_volumes():
    root = _ui()
    inputs = [w.get("name") for w in root.iter("widget") if w.get("class") in INPUT_CLASSES]
    assert inputs[:3] == ["fixedVolumeSelector", "movingVolumeSelector", "presetComboBox"], inputs[:5]
    assert _find(root, "presetComboBox").get("class") == "QComboBox"
    # the description sits right under the list, in the Inputs section, outside Advanced
    section = _names_under(_find(root, "inputsCollapsibleButton"))
    assert {"presetComboBox", "presetDescriptionLabel", "advancedCollapsibleButton"} <= section
    assert not {"presetComboBox", "presetDescriptionLabel"} & _names_under(_find(root, "advancedCollapsibleButton"))
    after = inputs[inputs.index("presetComboBox"):]
    order = [w.get("name") for w in root.iter("widget")]
    assert order.index("presetComboBox") < order.index("presetDescriptionLabel") < order.index("advancedCollapsibleButton")
    assert "methodComboBox" in after


def test_advanced_section_is_collapsed_and_holds_the_methods_options():
    advanced = _find(_ui(), "advancedCollapsibleButton")
    assert advanced.get("class") == "ctkCollapsibleButton"
    collapsed = [p for p in advanced.findall("property") if p.get("name") == "collapsed"]
    assert collapsed and collapsed[0].find("bool").text == "true"
    assert {"methodComboBox", "methodDescriptionLabel", "initializationComboBox", "refineStepsSpinBox",
            "methodOptionsLineEdit", "deviceComboBox", "refreshDevicesButton"} <= _names_under(advanced)


# -- the list and its description ---------------------------------------------------------------
def test_preset_list_is_every_registry_preset_then_custom():
    assert Logic.presetChoices() == [(p.title, p.name) for p in PRESETS.values()] + [CUSTOM_ITEM]
    assert len(PRESETS) >= 3 and {"fast", "balanced", "accurate"} <= set(PRESETS)
    w = _widget()
    assert w.ui.presetComboBox.items == Logic.presetChoices()  # item data: the preset's name
    assert w.ui.initializationComboBox.items[0] == ("Automatic (recommended)", "auto")
    assert "self._fillChoices()" in inspect.getsource(DeepRegistration.DeepRegistrationWidget.setup)


def test_description_shows_the_registrys_measured_time():
    for preset in PRESETS.values():
        text = Logic.presetSummary(preset)
        assert text.startswith(preset.description), preset.name
        assert preset.measured and f"about {preset.expected_seconds['cpu']:g} s on a CPU" in text, text
        assert f"measured: {preset.measured}" in text, text
        assert "GPU" not in text or "cuda" in preset.expected_seconds
    with_gpu = dataclasses.replace(PRESETS["fast"], expected_seconds={"cpu": 10.7, "cuda": 1.5})
    text = Logic.presetSummary(with_gpu)
    assert "about 10.7 s on a CPU, about 1.5 s on a GPU (CUDA), measured: " + with_gpu.measured in text
    w = _widget()  # a new node: the default preset, its text under the list
    assert w.ui.presetComboBox.itemData(w.ui.presetComboBox.currentIndex) == DEFAULT_PRESET == "balanced"
    assert w.ui.presetDescriptionLabel.text == Logic.presetSummary(PRESETS[DEFAULT_PRESET])
    assert w._parameterNode.preset == "balanced" and w._parameterNode.initialization == "auto"


# -- choosing and editing -----------------------------------------------------------------------
def test_choosing_a_preset_shows_its_values_under_advanced():
    w = _widget()
    p = w._parameterNode
    w.ui.presetComboBox.choose("fast")
    fast = PRESETS["fast"]
    assert p.preset == "fast"  # not turned into Custom while its values were written
    assert (p.method, p.initialization, p.refineSteps, p.methodOptions) == (fast.method, fast.init, 0, "")
    assert w.ui.methodComboBox.itemData(w.ui.methodComboBox.currentIndex) == fast.method
    assert w.ui.initializationComboBox.itemData(w.ui.initializationComboBox.currentIndex) == fast.init
    assert w.ui.presetDescriptionLabel.text == Logic.presetSummary(fast)
    assert w.ui.advancedCollapsibleButton.collapsed  # a preset needs nothing opened
    w.ui.presetComboBox.choose("accurate")
    assert p.preset == "accurate" and p.method == PRESETS["accurate"].method
    assert Logic.parse_options(p.methodOptions) if hasattr(Logic, "parse_options") else True
    assert process.parse_method_options(p.methodOptions) == {
        k: str(v) for k, v in PRESETS["accurate"].method_options.items()}
    assert Logic.effectivePreset(p) == "accurate"


def test_editing_an_advanced_option_switches_to_custom_and_says_so():
    w = _widget()
    p = w._parameterNode
    w.ui.methodComboBox.choose("carnet")  # the user picks another method under Advanced
    assert p.preset == "custom" and p.method == "carnet"
    assert w.ui.presetComboBox.itemData(w.ui.presetComboBox.currentIndex) == "custom"
    said = "Preset switched to Custom: method changed from the Balanced (recommended) preset."
    assert said in w.ui.presetDescriptionLabel.text and w.ui.statusLabel.text == said
    assert p.methodOptions == ""  # the balanced preset's options belong to its method, not to CAR-Net
    assert p.initialization == "auto"  # the rest of the preset's values stay as the starting point

    w.ui.presetComboBox.choose("fast")
    p.refineSteps = 10  # as the spin box (bound by connectGui) writes it
    assert p.preset == "custom" and "refinement steps changed from the Fast preset" in w.ui.statusLabel.text

    w.ui.presetComboBox.choose("balanced")
    w.ui.initializationComboBox.choose("rigid")
    assert p.preset == "custom" and "initial alignment" in w.ui.statusLabel.text

    w.ui.presetComboBox.choose("balanced")
    p.methodOptions = "schedule=accurate"
    assert p.preset == "custom" and "method options" in w.ui.statusLabel.text


def test_the_device_is_no_part_of_a_preset():
    w = _widget()
    w.ui.deviceComboBox.choose("cpu")
    assert w._parameterNode.device == "cpu" and w._parameterNode.preset == "balanced"


def test_choosing_custom_keeps_the_values_and_opens_advanced():
    w = _widget()
    p = w._parameterNode
    before = (p.method, p.initialization, p.refineSteps, p.methodOptions)
    w.ui.presetComboBox.choose("custom")
    assert p.preset == "custom" and (p.method, p.initialization, p.refineSteps, p.methodOptions) == before
    assert not w.ui.advancedCollapsibleButton.collapsed
    assert w.ui.presetDescriptionLabel.text.startswith("Custom:")
    assert Logic.effectivePreset(p) == "custom"


def test_a_scene_saved_before_presets_runs_its_own_settings():
    """Such a scene has no ``preset``: the wrapper fills in the default, but its method is not
    the default preset's, so the GUI shows Custom and the run is custom."""
    w = _widget()
    p = w._parameterNode
    p.__dict__.update(method="voxelmorph", initialization="none", methodOptions="")  # as read, unobserved
    assert Logic.effectivePreset(p) == "custom"
    w._updateGUI()
    assert p.preset == "custom" and "method, initial alignment, method options" in w.ui.statusLabel.text


# -- what reaches the worker --------------------------------------------------------------------
def _parse(cmd):
    from deepreglib.cli import build_parser
    return build_parser().parse_args(cmd[3:])


def test_register_command_with_a_preset_names_no_method():
    cmd = register_command("f.nrrd", "m.nrrd", "out", "voxelmorph", python="py", device="cpu", preset="fast")
    assert cmd[cmd.index("--preset") + 1] == "fast"
    assert "--method" not in cmd and "--init" not in cmd and "--refine" not in cmd
    args = _parse(cmd)
    assert args.preset == "fast" and args.method is None and args.init is None and args.device == "cpu"
    with_refine = register_command("f", "m", "o", "voxelmorph", python="py", preset="fast", refine=20)
    assert with_refine[with_refine.index("--refine") + 1] == "20" and "--method" not in with_refine


@pytest.mark.parametrize("preset", [None, "custom"])
def test_register_command_custom_names_method_and_init(preset):
    cmd = register_command("f.nrrd", "m.nrrd", "out", "iterative", python="py", refine=5, init="rigid",
                           preset=preset)
    assert "--preset" not in cmd
    for flag, value in (("--method", "iterative"), ("--init", "rigid"), ("--refine", "5")):
        assert cmd[cmd.index(flag) + 1] == value
    args = _parse(cmd)
    assert args.preset is None and args.method == "iterative" and args.init == "rigid" and args.refine == 5


@pytest.fixture
def started(monkeypatch):
    """``DeepRegistrationLogic.start`` with the scene writing and the worker replaced: the
    command lines it would run, and the notes it would show."""
    runs = []

    class _Worker:
        pid = 1

        def __init__(self, args, env=None, cwd=None):
            self.args = list(args)

        def start(self):
            return self

    inputs = types.SimpleNamespace(files={"fixed": "f.nrrd", "moving": "m.nrrd"}, options=lambda: {}, messages=[])
    monkeypatch.setattr(DeepRegistration, "WorkerProcess", _Worker)
    monkeypatch.setattr(DeepRegistration.dscene, "write_worker_inputs", lambda *a, **k: inputs)
    monkeypatch.setattr(DeepRegistration.dscene, "check_output_nodes", lambda *a, **k: None)
    monkeypatch.setattr(DeepRegistration.dscene, "query_point_lps", lambda node: [1.0, 2.0, 3.0])
    monkeypatch.setattr(DeepRegistration.DeepRegistrationLogic, "workerEnvironment", staticmethod(lambda: {}))

    def start(**kwargs):
        run = Logic().start(object(), object(), python="py", **kwargs)
        shutil.rmtree(run.temp_dir, ignore_errors=True)
        runs.append(run)
        return run.worker.args, run.messages
    yield start


def test_the_parameter_node_reaches_the_worker_as_its_preset(started):
    w = _widget()
    p = w._parameterNode
    w.ui.presetComboBox.choose("fast")
    node = dict(vars(p), fixedMask=None, movingMask=None, fixedLandmarks=None, movingLandmarks=None,
                initialTransform=None, outputVolume=None, outputTransform=None, createJacobian=True,
                createInverse=True, showMethodOutputs=True, keepTemporaryFiles=False, queryPoint=None,
                differentContrast=True)
    node.pop("_observer")
    fields = types.SimpleNamespace(**node)
    calls = []
    logic = Logic()
    logic.start = lambda *a, **k: calls.append(k)
    logic.runFromParameterNode(fields)
    assert calls[-1]["preset"] == "fast" and calls[-1]["differentContrast"] is True
    fields.refineSteps = 30  # changed from the console, not through the GUI: the run is custom
    logic.runFromParameterNode(fields)
    assert calls[-1]["preset"] == "custom" and calls[-1]["refineSteps"] == 30

    args, _ = started(preset="fast", method="carnet", refineSteps=0, methodOptions="")
    assert args[args.index("--preset") + 1] == "fast" and "--method" not in args and "--init" not in args
    assert "--contrast" not in args
    args, _ = started(preset="balanced", differentContrast=True)
    assert args[args.index("--contrast") + 1] == "different"
    args, _ = started(preset="custom", method="iterative", initialization="auto", refineSteps=5)
    assert "--preset" not in args and args[args.index("--method") + 1] == "iterative"
    assert args[args.index("--init") + 1] == "auto" and args[args.index("--refine") + 1] == "5"


def test_logic_start_stays_compatible_and_drops_a_query_point_under_a_preset(started):
    args, _ = started(method="iterative", device="cpu")  # as the self-tests and scripts call it
    assert "--preset" not in args and args[args.index("--method") + 1] == "iterative"
    assert args[args.index("--init") + 1] == "none"
    args, messages = started(preset="balanced", queryPoint=object())
    assert not [a for a in args if a.startswith("query_point")] and "--method-option" not in args
    assert any("query point" in m for m in messages)
    with pytest.raises(ValueError, match="unknown preset"):
        started(preset="fastest")
