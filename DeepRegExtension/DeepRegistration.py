"""DeepRegistration: deep-learning image registration in 3D Slicer, run in a background process.

Thin by design (STYLE.md): the widget reads and writes the parameter node; the Logic converts
nodes to files, starts/cancels the worker (``PythonSlicer -m deepreglib register``) and loads
its outputs; all image math is in the engine (``deepreglib``). Helpers: ``DeepRegistrationLib``.
"""

import logging
import os
import shutil
import sys
import tempfile
import time
import unittest
from typing import Annotated, Optional, Union

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

try:  # inside Slicer
    import qt
    import slicer
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin
    _IN_SLICER = True
except ImportError:  # plain Python (+ slicer-core): the Logic and the self-tests stay usable
    _IN_SLICER = False
    from DeepRegistrationLib.standins import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,  # noqa: F401
                                              ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget,
                                              VTKObservationMixin)
    try:
        import slicer  # slicer-core: Slicer's MRML without the application
    except ImportError:
        slicer = None
try:  # Slicer's parameter-node wrapper (the application, or its Python layer in the tests)
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
    _HAS_PARAMETER_WRAPPER = True
except ImportError:
    _HAS_PARAMETER_WRAPPER = False


from DeepRegistrationLib.standins import resource_path as _resource_path  # noqa: E402
from DeepRegistrationLib import scene as dscene  # noqa: E402
from DeepRegistrationLib.process import (PRESET_CUSTOM, BackgroundRun, WorkerProcess,  # noqa: E402
                                         default_python, format_method_options, initialization_choices,
                                         parse_method_options, register_command, temp_root,
                                         worker_command, worker_environment)
from deepreglib.methods.presets import DEFAULT_PRESET, PRESETS  # noqa: E402 (plain data, torch-free)

DEVICE_AUTO, DEVICE_CPU = "auto", "cpu"
#: What the preset list shows last: run the Advanced section's method, alignment and options.
PRESET_CUSTOM_TITLE = "Custom (advanced options below)"


def resource_path(relative: str) -> str:
    return _resource_path(_MODULE_DIR, relative)


#
# Module
#
class DeepRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Deep Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepRegExtension developers"]
        self.parent.helpText = (
            "Register a moving volume to a fixed volume. Pick a preset (Fast, Balanced, Accurate: "
            "each with its measured time), or Custom to choose a deep-learning method (VoxelMorph, "
            "attention-based variants) or a weight-free one under Advanced. The registration runs "
            "in a separate process: Slicer stays responsive and Cancel stops it at once. Results: "
            "warped volume, transform (grid or linear, with inverse), Jacobian map and the "
            "method's attention maps. See the DeformationQA module to judge the result.")
        self.parent.acknowledgementText = (
            "Methods follow VoxelMorph (Dalca et al. 2018/2019, Balakrishnan et al. 2019) and the "
            "papers listed in each model card. Module layout follows Slicer's scripted-module "
            "template and SlicerElastix.")
        self.parent.icon = qt.QIcon(resource_path("Icons/DeepRegistration.png")) if _IN_SLICER else None


#
# Parameter node
#
if _HAS_PARAMETER_WRAPPER:
    @parameterNodeWrapper
    class DeepRegistrationParameterNode:
        """Everything a run needs; saved with the scene. Optional nodes are ``None`` until
        chosen (a union of node types must list ``None``: Slicer's wrapper writes every default
        when the node is created).

        ``preset``: a :data:`deepreglib.methods.presets.PRESETS` name or ``"custom"``. Under a
        preset, ``method``, ``initialization``, ``refineSteps`` and ``methodOptions`` hold the
        preset's values (shown in the Advanced section); when one no longer matches
        it, the run is a custom one (:meth:`DeepRegistrationLogic.effectivePreset`). The
        defaults are the default preset's values, so a new node is that preset."""

        fixedVolume: slicer.vtkMRMLScalarVolumeNode
        movingVolume: slicer.vtkMRMLScalarVolumeNode
        preset: str = DEFAULT_PRESET
        #: the images have different contrasts (MR to ultrasound, MR to CT): ``--contrast different``
        differentContrast: bool = False
        method: str = PRESETS[DEFAULT_PRESET].method
        device: str = DEVICE_AUTO
        refineSteps: Annotated[int, WithinRange(0, 1000)] = 0
        initialization: str = PRESETS[DEFAULT_PRESET].init
        fixedMask: Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode, None]
        movingMask: Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode, None]
        fixedLandmarks: slicer.vtkMRMLMarkupsFiducialNode
        movingLandmarks: slicer.vtkMRMLMarkupsFiducialNode
        initialTransform: slicer.vtkMRMLLinearTransformNode
        queryPoint: slicer.vtkMRMLMarkupsFiducialNode
        methodOptions: str = format_method_options(PRESETS[DEFAULT_PRESET].method_options)
        outputVolume: slicer.vtkMRMLScalarVolumeNode
        outputTransform: slicer.vtkMRMLTransformNode
        createJacobian: bool = True
        createInverse: bool = True
        showMethodOutputs: bool = True
        overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
        keepTemporaryFiles: bool = False


#
# Widget
#
class DeepRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._devicesQuery = None
        self._overlays = []
        self._applyingPreset = False  # onPresetSelected writes several fields: no custom switch meanwhile
        self._customReason = ""  # why the preset went to Custom by itself (shown under the list)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resource_path("UI/DeepRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepRegistrationLogic()
        self._fillChoices()

        # the overlay list shows the method maps of runs, not every volume of the scene
        self.ui.overlaySelector.addAttribute("vtkMRMLScalarVolumeNode", dscene.OVERLAY_ATTRIBUTE, "true")

        self.ui.presetComboBox.currentIndexChanged.connect(self.onPresetSelected)
        self.ui.methodComboBox.currentIndexChanged.connect(self.onMethodSelected)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceSelected)
        self.ui.initializationComboBox.currentIndexChanged.connect(self.onInitializationSelected)
        self.ui.refreshDevicesButton.clicked.connect(self.onRefreshDevices)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.overlayOpacitySlider.valueChanged.connect(self.onOverlayOpacity)
        self.ui.overlaySelector.currentNodeChanged.connect(self.onOverlaySelected)

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.timeout.connect(self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def _fillChoices(self) -> None:
        """The lists' items, each with its value as item data (what the parameter node holds):
        the presets (registry order) and Custom, the methods, the devices, the alignments."""
        for title, name in self.logic.presetChoices():
            self.ui.presetComboBox.addItem(title, name)
        for info in self.logic.methods():
            self.ui.methodComboBox.addItem(info.title, info.name)
        self.ui.deviceComboBox.addItem("Auto (GPU if available)", DEVICE_AUTO)
        self.ui.deviceComboBox.addItem("CPU", DEVICE_CPU)
        models = os.environ.get("DEEPREG_MODELS") or resource_path("Models")
        for label, value in initialization_choices(models):
            self.ui.initializationComboBox.addItem(label, value)

    def cleanup(self) -> None:
        if self._run is not None:  # the module is closing: stop the worker, drop its files
            self._timer.stop()
            self._run.cancel(discard=True, block=True)
            try:
                self._run.finish()  # removes the temporary folder
            except RuntimeError as e:  # the worker outlived the kill: leave its folder
                logging.warning("DeepRegistration: %s; temporary files left in %s", e, self._run.temp_dir)
            self._run = None
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk_modified_event(), self._updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        run, self._run = self._run, None
        if run is not None:  # its input nodes are going away: nothing to load into
            run.cancel(discard=True, block=True)
            try:
                run.finish()  # removes its temporary folder
            except RuntimeError as e:
                logging.warning("DeepRegistration: %s; temporary files left in %s", e, run.temp_dir)
            self.ui.statusLabel.text = "Registration cancelled: the scene was closed."
        self.setParameterNode(None)
        self._updateGUI()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk_modified_event(), self._updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk_modified_event(), self._updateGUI)
            self._updateGUI()

    # -- parameter node <-> the widgets connectGui cannot bind (item data, not text) ----------
    def _updateGUI(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._run is not None
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.toolTip = ("Stop the registration (the worker and all it started)" if running
                                       else "Register the moving volume to the fixed volume")
        self.ui.applyButton.enabled = running or bool(p is not None and p.fixedVolume and p.movingVolume
                                                      and p.fixedVolume != p.movingVolume)
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.outputsCollapsibleButton.enabled = not running
        if p is None:
            return
        if not self._applyingPreset and p.preset != PRESET_CUSTOM:
            changed = self.logic.presetDifference(p.preset, p.method, p.initialization, p.refineSteps,
                                                  p.methodOptions)
            if changed:  # an Advanced option was edited (or a scene from before presets was loaded)
                self._customReason = (f"Preset switched to Custom: {', '.join(changed)} changed from the "
                                      f"{self.logic.presetTitle(p.preset)} preset."
                                      if self.logic.presetInfo(p.preset) is not None else
                                      f"Preset switched to Custom: the saved preset {p.preset!r} is not known here.")
                self.ui.statusLabel.text = self._customReason
                p.preset = PRESET_CUSTOM  # (observed: a nested _updateGUI shows it; this one goes on)
        if self.ui.deviceComboBox.findData(p.device) < 0 and p.device:
            # a device saved with the scene (e.g. cuda:1) before "Detect GPUs" listed it
            self.ui.deviceComboBox.addItem(p.device, p.device)
        for combo, value in ((self.ui.presetComboBox, p.preset), (self.ui.methodComboBox, p.method),
                             (self.ui.deviceComboBox, p.device),
                             (self.ui.initializationComboBox, p.initialization)):
            index = combo.findData(value)
            if index >= 0 and combo.currentIndex != index:
                combo.blockSignals(True)  # showing the node's value must not write it back
                combo.setCurrentIndex(index)
                combo.blockSignals(False)
        preset = self.logic.presetInfo(p.preset)
        if preset is not None:
            self._customReason = ""
            self.ui.presetDescriptionLabel.text = self.logic.presetSummary(preset)
            self.ui.advancedCollapsibleButton.text = "Advanced (the preset's settings; changing one selects Custom)"
        else:
            self.ui.presetDescriptionLabel.text = "\n".join(
                t for t in (self._customReason, "Custom: the method, initial alignment, refinement steps "
                            "and method options under Advanced are used as they are.") if t)
            self.ui.advancedCollapsibleButton.text = "Advanced (custom)"
        info = self.logic.methodInfo(p.method)
        if info is not None:
            self.ui.methodDescriptionLabel.text = self.logic.methodSummary(info)
            self.ui.refineStepsSpinBox.enabled = info.supports_refine

    def onPresetSelected(self, index) -> None:
        """A preset writes its values into the Advanced section's fields (they show what runs);
        Custom keeps the current values as the starting point and opens the Advanced section."""
        p = self._parameterNode
        if p is None or index < 0:
            return
        name = self.ui.presetComboBox.itemData(index)
        if name == p.preset:
            return
        self._applyingPreset = True
        try:
            if name != PRESET_CUSTOM:
                for field, value in self.logic.presetValues(name).items():
                    if getattr(p, field) != value:
                        setattr(p, field, value)
            p.preset = name
        finally:
            self._applyingPreset = False
        self._customReason = ""
        if name == PRESET_CUSTOM:
            self.ui.advancedCollapsibleButton.collapsed = False
        self._updateGUI()

    def onMethodSelected(self, index) -> None:
        p = self._parameterNode
        if p and index >= 0:
            method, old = self.ui.methodComboBox.itemData(index), p.method
            presets_options = bool(p.methodOptions) and p.methodOptions in self.logic.presetOptionTexts(old)
            p.method = method
            if method != old and presets_options:
                p.methodOptions = ""  # a preset's options belong to its method (as in the engine)

    def onDeviceSelected(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def onInitializationSelected(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.initialization = self.ui.initializationComboBox.itemData(index)

    def onRefreshDevices(self) -> None:
        """List CUDA/MPS devices with their free memory. The worker answers (``deepreg devices
        --json``): Slicer's process never loads torch nor holds a CUDA context."""
        if self._devicesQuery is not None:
            return
        from DeepRegistrationLib.dependencies import ensure_dependencies
        with slicer.util.tryWithErrorDisplay("Could not install the required Python packages.", waitCursor=True):
            if not ensure_dependencies(lambda msg: slicer.util.confirmOkCancelDisplay(msg, "DeepRegistration"),
                                       log=self._log):
                return
        with slicer.util.tryWithErrorDisplay("Could not list the devices."):
            self._devicesQuery = self.logic.startDevicesQuery()
            self.ui.refreshDevicesButton.enabled = False
            self.ui.statusLabel.text = "Detecting GPUs..."
            self._timer.start()

    def _devicesQueryDone(self) -> None:
        query, self._devicesQuery = self._devicesQuery, None
        self.ui.refreshDevicesButton.enabled = True
        try:
            devices = self.logic.devicesFromQuery(query)
        except RuntimeError as e:
            slicer.util.errorDisplay(f"Could not list the devices: {e}")
            return
        self.ui.statusLabel.text = f"{len(devices) - 2} GPU(s) found." if len(devices) > 2 else "No GPU found."
        current = self._parameterNode.device if self._parameterNode else DEVICE_AUTO
        self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.clear()
        for label, value in devices:
            self.ui.deviceComboBox.addItem(label, value)
        self.ui.deviceComboBox.blockSignals(False)
        index = self.ui.deviceComboBox.findData(current)
        self.ui.deviceComboBox.setCurrentIndex(max(0, index))

    # -- run / cancel -----------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            return
        from DeepRegistrationLib.dependencies import ensure_dependencies
        with slicer.util.tryWithErrorDisplay("Could not install the required Python packages.", waitCursor=True):
            if not ensure_dependencies(lambda msg: slicer.util.confirmOkCancelDisplay(msg, "DeepRegistration"),
                                       log=self._log):
                return
        with slicer.util.tryWithErrorDisplay("Could not start the registration.", waitCursor=True):
            self.ui.logTextEdit.clear()
            self.ui.progressBar.value = 0
            self._run = self.logic.runFromParameterNode(self._parameterNode)
            self._log(" ".join(self._run.worker.args))
            for message in self._run.messages:
                self._log("note: " + message)
            self._timer.start()
        self._updateGUI()

    def onPoll(self) -> None:
        if self._devicesQuery is not None and self._devicesQuery.finished:
            self._devicesQueryDone()
        run = self._run
        if run is None:
            if self._devicesQuery is None:
                self._timer.stop()
            return
        for event in run.poll():
            kind = event.get("event")
            if kind == "progress":
                self.ui.progressBar.value = int(round(100 * run.worker.fraction))
                self.ui.statusLabel.text = f"{event.get('stage', '')}: {event.get('message', '')}"
            elif kind in ("log", "error") and event.get("level") != "debug":
                self._log(f"{event.get('level', kind)}: {event.get('message', '')}")
        if not run.worker.finished:
            return
        if self._devicesQuery is None:
            self._timer.stop()
        self._run = None
        try:
            results = run.finish()
        except Exception as e:  # noqa: BLE001 - loading failed: say so, keep Slicer usable
            slicer.util.errorDisplay(f"The registration finished but its results could not be loaded: {e}")
            results = None
        outcome = run.outcome
        self.ui.statusLabel.text = outcome.message
        if run.keep_temp:
            self._log(f"temporary files kept in {run.temp_dir}")
        if outcome.status in ("bad_input", "failed"):
            slicer.util.errorDisplay(outcome.message, detailedText=outcome.details or None)
        elif results is not None:
            self._showResults(results)
        self._updateGUI()

    def _showResults(self, results) -> None:
        self.ui.metricsLabel.text = dscene.metrics_summary(results.metrics)
        for message in results.messages:
            self._log("note: " + message)
        fixed = self._parameterNode.fixedVolume
        warped = results.nodes.get("warped") or self._parameterNode.movingVolume
        slicer.util.setSliceViewerLayers(background=fixed, foreground=warped, foregroundOpacity=0.5)
        self._overlays = results.overlays
        if results.overlays:  # listed, not shown: fixed against registered comes first
            self.ui.overlaySelector.blockSignals(True)
            self.ui.overlaySelector.setCurrentNode(results.overlays[0])
            self.ui.overlaySelector.blockSignals(False)
        for browser in results.browsers.values():  # step-by-step play-back: the Sequences toolbar
            try:
                slicer.modules.sequences.setToolBarActiveBrowserNode(browser)
                slicer.modules.sequences.setToolBarVisible(True)
            except AttributeError:  # a Slicer without that API: the Sequences module still plays it
                self._log(f"play the steps in the Sequences module ('{browser.GetName()}')")

    def onOverlaySelected(self, node) -> None:
        if node is not None and self._parameterNode is not None:
            slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=self._parameterNode.overlayOpacity)

    def onOverlayOpacity(self, value) -> None:
        for i in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode").SetForegroundOpacity(value)

    def _log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)


def vtk_modified_event():
    import vtk
    return vtk.vtkCommand.ModifiedEvent


#
# Logic
#
class RegistrationRun(BackgroundRun):
    """A started registration: poll it (GUI timer), cancel it, then :meth:`finish` loads the
    results (``LoadedResults``) and removes the temporary folder (unless kept)."""

    def __init__(self, worker: WorkerProcess, temp_dir: str, fixed, moving, choices, keep_temp: bool,
                 messages=()):
        super().__init__(worker, temp_dir, lambda manifest: dscene.load_results(manifest, fixed, moving, choices),
                         keep_temp, messages)
        self.fixed = fixed
        self.moving = moving
        self.choices = choices


class DeepRegistrationLogic(ScriptedLoadableModuleLogic):
    """Register from the GUI, the Python console or another module::

        logic = DeepRegistrationLogic()
        results = logic.run(fixedVolume=f, movingVolume=m, method="iterative", device="cpu")
        results.nodes["warped"], results.nodes["transform"], results.metrics["folding_percent"]
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    if _IN_SLICER:
        def getParameterNode(self):
            return DeepRegistrationParameterNode(super().getParameterNode())

    @staticmethod
    def methods():
        from deepreglib.methods.registry import METHODS
        return list(METHODS.values())

    @staticmethod
    def methodInfo(name: str):
        from deepreglib.methods.registry import METHODS
        return METHODS.get(name)

    @staticmethod
    def methodSummary(info) -> str:
        """What the method selector shows under the list: description, kind, expected time per
        device kind and what inputs it expects (all from the engine's registry)."""
        names = {"cpu": "CPU", "cuda": "GPU (CUDA)", "mps": "Apple GPU"}
        times = ", ".join(f"{names.get(k, k)} ~{v:g} s" for k, v in info.expected_seconds.items())
        lines = [info.description, f"Kind: {info.kind}." + (f" Expected time (160x192x224 voxels): "
                                                             f"{times}." if times else "")]
        if info.input_note:
            lines.append(info.input_note)
        if not info.weights:
            lines.append("Needs no trained network.")
        return "\n".join(lines)

    # -- presets (deepreglib.methods.presets: plain data, torch-free) -----------------------------
    @staticmethod
    def presets():
        return list(PRESETS.values())

    @staticmethod
    def presetChoices() -> list:
        """``(title, value)`` for the preset list: every registry preset in its order, then Custom."""
        return [(pr.title, pr.name) for pr in PRESETS.values()] + [(PRESET_CUSTOM_TITLE, PRESET_CUSTOM)]

    @staticmethod
    def presetInfo(name: str):
        """The registry's ``Preset`` called ``name``; ``None`` for ``"custom"`` or an unknown name."""
        return PRESETS.get(name)

    @staticmethod
    def presetTitle(name: str) -> str:
        preset = PRESETS.get(name)
        return preset.title if preset is not None else repr(name)

    @staticmethod
    def presetSummary(preset) -> str:
        """What the preset list shows under it: the description and the registry's measured
        time per device kind, with the results file it was measured on."""
        names = {"cpu": "a CPU", "cuda": "a GPU (CUDA)", "mps": "an Apple GPU"}
        times = ", ".join(f"about {v:g} s on {names.get(k, k)}" for k, v in preset.expected_seconds.items())
        if times and preset.measured:
            times += f", measured: {preset.measured}"
        return preset.description + (f"\nExpected time: {times}." if times else "")

    @staticmethod
    def presetValues(name: str) -> dict:
        """The parameter-node fields a preset sets: its method, alignment and method options,
        no extra refinement steps."""
        preset = PRESETS[name]
        return {"method": preset.method, "initialization": preset.init, "refineSteps": 0,
                "methodOptions": format_method_options(preset.method_options)}

    @staticmethod
    def presetOptionTexts(method: str) -> set:
        """The method-option texts that the presets running ``method`` write (a preset's options
        belong to its method: another method starts without them, as in the engine)."""
        return {format_method_options(pr.method_options) for pr in PRESETS.values()
                if pr.method == method and pr.method_options}

    @staticmethod
    def presetDifference(name: str, method: str, initialization: str, refineSteps: int,
                         methodOptions: str) -> list:
        """What in these Advanced values differs from preset ``name``, in the Advanced section's
        words (``["method", "refinement steps"]``); empty: they are that preset's. An unknown
        ``name`` differs in everything: ``["preset"]``."""
        if name not in PRESETS:
            return ["preset"]
        wanted = DeepRegistrationLogic.presetValues(name)
        changed = [label for field, label, value in (
            ("method", "method", method), ("initialization", "initial alignment", initialization),
            ("refineSteps", "refinement steps", int(refineSteps or 0))) if value != wanted[field]]
        try:
            same_options = parse_method_options(methodOptions) == parse_method_options(wanted["methodOptions"])
        except ValueError:
            same_options = False
        return changed + ([] if same_options else ["method options"])

    @staticmethod
    def effectivePreset(p) -> str:
        """The preset a parameter node runs: its ``preset`` while the Advanced values are that
        preset's, else ``"custom"`` (what runs is what the Advanced section shows)."""
        if p.preset == PRESET_CUSTOM or DeepRegistrationLogic.presetDifference(
                p.preset, p.method, p.initialization, p.refineSteps, p.methodOptions):
            return PRESET_CUSTOM
        return p.preset

    @staticmethod
    def startDevicesQuery(python: Optional[str] = None) -> WorkerProcess:
        """Ask the worker for the devices (``deepreg devices --json``) in the background."""
        cmd = worker_command("devices", ["--json"], python=python or default_python(), progress=False)
        return WorkerProcess(cmd, env=DeepRegistrationLogic.workerEnvironment()).start()

    @staticmethod
    def devicesFromQuery(query: WorkerProcess) -> list:
        """(label, value) pairs of a finished :meth:`startDevicesQuery`: Auto, CPU, every CUDA
        device with its free memory, MPS. Raises ``RuntimeError`` with the worker's message."""
        query.wait(60)
        events = query.poll()
        outcome = query.outcome()
        for event in events:
            if event.get("event") == "result" and isinstance(event.get("devices"), list):
                return [(str(d["label"]), str(d["value"])) for d in event["devices"]]
        raise RuntimeError(outcome.message)

    @staticmethod
    def devices(python: Optional[str] = None, timeout: float = 120) -> list:
        """Blocking :meth:`startDevicesQuery` (console, scripts)."""
        query = DeepRegistrationLogic.startDevicesQuery(python)
        if query.wait(timeout) is None:
            query.cancel()
            raise RuntimeError(f"the device query took longer than {timeout} s")
        return DeepRegistrationLogic.devicesFromQuery(query)

    @staticmethod
    def workerEnvironment() -> dict:
        """The worker's environment (:func:`DeepRegistrationLib.process.worker_environment`):
        the folder holding ``deepreglib`` on ``PYTHONPATH`` and ``DEEPREG_MODELS`` naming the
        one folder of shipped weights."""
        return worker_environment(_MODULE_DIR, resource_path("Models"))

    def start(self, fixedVolume, movingVolume, method: str = "voxelmorph", device: str = DEVICE_AUTO,
              refineSteps: int = 0, initialization: str = "none", fixedMask=None, movingMask=None,
              fixedLandmarks=None, movingLandmarks=None, initialTransform=None, outputVolume=None,
              outputTransform=None, createWarped: bool = True, createJacobian: bool = True,
              createInverse: bool = True, showMethodOutputs: bool = True,
              keepTemporaryFiles: bool = False, queryPoint=None, methodOptions: str = "",
              python: Optional[str] = None, preset: Optional[str] = None,
              differentContrast: bool = False) -> RegistrationRun:
        """Write the inputs and start the worker; returns at once with a :class:`RegistrationRun`.

        ``preset``: ``"fast"``, ``"balanced"`` or ``"accurate"`` (``deepreglib.methods.presets``)
        runs that recipe (``--preset NAME``): it chooses the method, the initial alignment and
        the method's options, so ``method``, ``initialization``, ``refineSteps``,
        ``methodOptions`` and ``queryPoint`` are not used (a note says so for a query point).
        ``None`` or ``"custom"``: ``method`` with these options, as before presets.

        ``differentContrast``: the two volumes show different contrasts (MR to ultrasound, MR
        to CT): the worker aligns them by mutual information and the balanced and accurate
        presets optimise MIND-SSC (``--contrast different``).

        ``queryPoint``: a point list whose first point is the fixed-image point whose attention
        or similarity map the method draws (CAR-Net, D-Net, SAME: method option
        ``query_point``). ``methodOptions``: more options of the method, ``"KEY=VALUE; ..."``
        (the worker says which options a method has when one is wrong).

        Raises ``ValueError`` for missing or identical inputs, or an output node that is an
        input (checked before anything starts).
        """
        if fixedVolume is None or movingVolume is None:
            raise ValueError("choose a fixed and a moving volume")
        if fixedVolume == movingVolume:
            raise ValueError("the fixed and moving volumes are the same node; choose two volumes")
        notes = []
        if preset and preset != PRESET_CUSTOM:
            if self.presetInfo(preset) is None:
                raise ValueError(f"unknown preset {preset!r}; one of {', '.join(PRESETS)} or {PRESET_CUSTOM!r}")
            method, refineSteps, methodOptions = self.presetInfo(preset).method, 0, ""
            if queryPoint is not None:
                notes.append(f"the {self.presetTitle(preset)} preset draws no attention map: the query "
                             "point is used by CAR-Net, D-Net and SAME (choose Custom)")
                queryPoint = None
        elif self.methodInfo(method) is None:
            raise ValueError(f"unknown method {method!r}")
        dscene.check_output_nodes(fixedVolume, movingVolume, outputVolume, outputTransform,
                                  other_inputs=(fixedMask, movingMask, fixedLandmarks, movingLandmarks,
                                                initialTransform))
        method_options = dict(parse_method_options(methodOptions))
        if queryPoint is not None:
            method_options["query_point"] = dscene.query_point_lps(queryPoint)
        temp_dir = tempfile.mkdtemp(prefix="DeepReg-", dir=temp_root())
        try:
            inputs = dscene.write_worker_inputs(
                os.path.join(temp_dir, "inputs"), fixedVolume, movingVolume, fixed_mask=fixedMask,
                moving_mask=movingMask, fixed_landmarks=fixedLandmarks, moving_landmarks=movingLandmarks,
                initial_transform=initialTransform)
            options = dict(inputs.options())
            if differentContrast:
                options["contrast"] = "different"
            cmd = register_command(inputs.files["fixed"], inputs.files["moving"],
                                   os.path.join(temp_dir, "out"), method, python=python or default_python(),
                                   device=device, refine=refineSteps, init=initialization,
                                   options=options, flags=("no-qa",),
                                   method_options=method_options, preset=preset)
            worker = WorkerProcess(cmd, env=self.workerEnvironment(), cwd=temp_dir).start()
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        choices = dscene.OutputChoices(warped_volume=outputVolume, transform=outputTransform,
                                       create_warped=createWarped, create_jacobian=createJacobian,
                                       create_inverse=createInverse, create_method_outputs=showMethodOutputs)
        logging.info("DeepRegistration: started %s (pid %s) in %s",
                     f"preset {preset}" if preset and preset != PRESET_CUSTOM else method, worker.pid, temp_dir)
        return RegistrationRun(worker, temp_dir, fixedVolume, movingVolume, choices, keepTemporaryFiles,
                               list(inputs.messages) + notes)

    def run(self, fixedVolume, movingVolume, timeout: Optional[float] = None, **kwargs):
        """Blocking version of :meth:`start` (console, scripts, self-tests). Returns the
        ``LoadedResults``; raises ``RuntimeError`` with the worker's message if the run did not
        finish (bad input, crash, cancelled or ``timeout`` seconds passed)."""
        return self.start(fixedVolume, movingVolume, **kwargs).wait_for_results(timeout, "the registration")

    def runFromParameterNode(self, p) -> RegistrationRun:
        """The widget's adapter: the parameter node's values as :meth:`start` keywords. No
        warped-volume node chosen: the moving volume is placed under the transform instead
        (SlicerElastix's behaviour). The preset is :meth:`effectivePreset`: a node whose Advanced
        values were changed (also from the console) runs them as a custom run."""
        return self.start(
            p.fixedVolume, p.movingVolume, preset=self.effectivePreset(p), method=p.method, device=p.device, refineSteps=p.refineSteps,
            initialization=p.initialization, fixedMask=p.fixedMask, movingMask=p.movingMask,
            fixedLandmarks=p.fixedLandmarks, movingLandmarks=p.movingLandmarks,
            initialTransform=p.initialTransform, outputVolume=p.outputVolume,
            outputTransform=p.outputTransform, createWarped=p.outputVolume is not None,
            createJacobian=p.createJacobian,
            createInverse=p.createInverse, showMethodOutputs=p.showMethodOutputs,
            keepTemporaryFiles=p.keepTemporaryFiles, queryPoint=p.queryPoint, methodOptions=p.methodOptions,
            differentContrast=p.differentContrast)


#
# Test
#
class DeepRegistrationTest(ScriptedLoadableModuleTest):
    """Self-tests run by Slicer's test factory (``ctest -R py_DeepRegistration``, Reload & Test):
    the weight-free ``iterative`` method on small synthetic volumes (seconds on a CPU), with
    measurable outcomes. They also run outside Slicer with ``slicer-core``
    (Testing/Python/test_slicer_selftests.py).

    Where the engine's packages (torch) are not installed, e.g. on the extension build server,
    the tests that start the worker say so and are skipped; the others still run: a stored
    worker result (``Testing/Data/selftest_run``) is loaded into the scene and checked."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def _requireWorker(self):
        from DeepRegistrationLib.dependencies import missing_requirements
        missing = missing_requirements()
        if missing:  # installed on first use in the GUI; a test must not install packages
            self.skipTest("skipped: this test runs the worker, which needs " + ", ".join(missing)
                          + " (not installed here); the stored-result tests still ran")

    def runTest(self):
        for test in (self.test_StoredResultLoadsIntoScene, self.test_InputsAreNeverOutputs,
                     self.test_IterativeRegistrationAlignsBlob, self.test_WithoutWarpedVolumeMovingIsShownRegistered,
                     self.test_CancelLeavesSceneUnchanged, self.test_BadInputIsReported,
                     self.test_TemporaryFilesKeptOnlyWhenAsked):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as e:
                self.delayDisplay(f"{test.__name__}: {e}")

    def test_StoredResultLoadsIntoScene(self):
        """A worker's result folder (made by ``Testing/Data/make_selftest_data.py``) loads into
        nodes with the fixed volume's geometry, the Jacobian colours, provenance and references;
        its transform maps the fixed blob's centre onto the moving blob's. Needs no torch."""
        import numpy as np
        folder = os.path.join(os.path.dirname(_MODULE_DIR), "Testing", "Data", "selftest_run")
        if not os.path.isdir(folder):
            self.skipTest(f"skipped: the stored result {folder} is not in this installation")
        scene = slicer.mrmlScene
        fixed = dscene.read_volume_node(scene, os.path.join(folder, "inputs", "fixed.nrrd"), "Fixed")
        moving = dscene.read_volume_node(scene, os.path.join(folder, "inputs", "moving.nrrd"), "Moving")
        results = dscene.load_results(os.path.join(folder, "out", "manifest.json"), fixed, moving)
        self.assertEqual(set(results.nodes), {"warped", "transform", "inverse_transform", "jacobian"})
        for name in ("warped", "jacobian"):
            np.testing.assert_allclose(_ijk_to_ras(results.nodes[name]), _ijk_to_ras(fixed), atol=1e-5)
        jac = results.nodes["jacobian"]
        self.assertEqual(jac.GetDisplayNode().GetColorNode().GetName(), dscene.JACOBIAN_COLOR_NODE_NAME)
        transform = results.nodes["transform"]
        self.assertTrue(transform.IsA("vtkMRMLGridTransformNode"))
        self.assertEqual(transform.GetNodeReferenceID(dscene.FIXED_REFERENCE_ROLE), fixed.GetID())
        self.assertEqual(transform.GetNodeReferenceID(dscene.MOVING_REFERENCE_ROLE), moving.GetID())
        self.assertEqual(results.nodes["inverse_transform"].GetNodeReferenceID(dscene.FIXED_REFERENCE_ROLE),
                         moving.GetID())
        self.assertEqual(transform.GetAttribute("DeepReg.Method"), "iterative")
        mapped = np.array(transform.GetTransformFromParent().TransformPoint(self._centroid_ras(fixed).tolist()))
        self.assertGreater(np.linalg.norm(self._centroid_ras(moving) - self._centroid_ras(fixed)), 2.0)
        self.assertLess(np.linalg.norm(mapped - self._centroid_ras(moving)), 0.5)
        self.assertIn("SDlogJ", dscene.metrics_summary(results.metrics))

    def _pair(self, shift_vox=2.5, n=20):
        """A Gaussian blob and the same blob shifted by ``shift_vox`` voxels (1 mm) along i."""
        import numpy as np
        k, j, i = np.mgrid[:n, :n, :n].astype(np.float64)

        def blob(ci):
            return (100 * np.exp(-((i - ci) ** 2 + (j - n / 2) ** 2 + (k - n / 2) ** 2) / (2 * 3.0 ** 2)) + 5).astype(np.float32)
        fixed = slicer.util.addVolumeFromArray(blob(n / 2), name="Fixed")
        moving = slicer.util.addVolumeFromArray(blob(n / 2 + shift_vox), name="Moving")
        return fixed, moving

    @staticmethod
    def _centroid_ras(node):
        import numpy as np
        arr = slicer.util.arrayFromVolume(node).astype(np.float64)
        arr = np.clip(arr - 5.0, 0, None)
        k, j, i = np.mgrid[:arr.shape[0], :arr.shape[1], :arr.shape[2]]
        c = [float((arr * a).sum() / arr.sum()) for a in (i, j, k)]
        m = vtk_matrix_of(node)
        return np.array(m.MultiplyPoint(c + [1.0])[:3])

    def test_IterativeRegistrationAlignsBlob(self):
        self._requireWorker()
        import numpy as np
        self.delayDisplay("Registering a shifted blob with the iterative method")
        fixed, moving = self._pair()
        before = slicer.util.arrayFromVolume(moving).copy()
        logic = DeepRegistrationLogic()
        t0 = time.time()
        results = logic.run(fixedVolume=fixed, movingVolume=moving, method="iterative", device="cpu", timeout=300)
        self.delayDisplay(f"done in {time.time() - t0:.1f} s")
        warped = results.nodes["warped"]
        offset_before = np.linalg.norm(self._centroid_ras(moving) - self._centroid_ras(fixed))
        offset_after = np.linalg.norm(self._centroid_ras(warped) - self._centroid_ras(fixed))
        self.assertGreater(offset_before, 2.0)
        self.assertLess(offset_after, 0.5)
        self.assertEqual(results.metrics["folding_percent"], 0.0)
        self.assertGreater(results.metrics["ncc_after"], results.metrics["ncc_before"])
        jac = results.nodes["jacobian"]
        self.assertEqual(jac.GetDisplayNode().GetColorNode().GetName(), dscene.JACOBIAN_COLOR_NODE_NAME)
        self.assertEqual((jac.GetDisplayNode().GetWindowLevelMin(), jac.GetDisplayNode().GetWindowLevelMax()),
                         dscene.JACOBIAN_WINDOW)
        transform = results.nodes["transform"]
        self.assertTrue(transform.IsA("vtkMRMLGridTransformNode"))
        self.assertEqual(transform.GetNodeReferenceID(dscene.FIXED_REFERENCE_ROLE), fixed.GetID())
        self.assertEqual(transform.GetNodeReferenceID(dscene.MOVING_REFERENCE_ROLE), moving.GetID())
        # the transform maps the fixed blob's centre onto the moving blob's (fixed -> moving)
        mapped = np.array(transform.GetTransformFromParent().TransformPoint(self._centroid_ras(fixed).tolist()))
        self.assertLess(np.linalg.norm(mapped - self._centroid_ras(moving)), 0.5)
        for node in results.nodes.values():
            self.assertEqual(node.GetAttribute("DeepReg.Method"), "iterative")
            self.assertEqual(node.GetAttribute("DeepReg.Device"), "cpu")
        self.assertIn("SDlogJ", dscene.metrics_summary(results.metrics))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(moving), before)
        self.assertIsNone(moving.GetParentTransformNode())
        # a second run adds new nodes; the first result stays as it was
        first_warped = slicer.util.arrayFromVolume(warped).copy()
        again = logic.run(fixedVolume=fixed, movingVolume=moving, method="iterative", device="cpu", timeout=300)
        self.assertIsNot(again.nodes["warped"], warped)
        self.assertNotEqual(again.nodes["warped"].GetName(), warped.GetName())
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(warped), first_warped)

    def test_WithoutWarpedVolumeMovingIsShownRegistered(self):
        self._requireWorker()
        import numpy as np
        fixed, moving = self._pair()
        logic = DeepRegistrationLogic()
        results = logic.run(fixedVolume=fixed, movingVolume=moving, method="iterative", device="cpu",
                            createWarped=False, timeout=300)
        self.assertNotIn("warped", results.nodes)
        self.assertIs(moving.GetParentTransformNode(), results.nodes["transform"])
        # a second run registers the original moving volume again and moves it to the new result
        again = logic.run(fixedVolume=fixed, movingVolume=moving, method="iterative", device="cpu",
                          createWarped=False, timeout=300)
        self.assertIs(moving.GetParentTransformNode(), again.nodes["transform"])
        p = self._centroid_ras(fixed).tolist()
        first = np.array(results.nodes["transform"].GetTransformFromParent().TransformPoint(p))
        second = np.array(again.nodes["transform"].GetTransformFromParent().TransformPoint(p))
        self.assertLess(np.linalg.norm(first - second), 0.05)  # the same registration, not a composition

    def test_CancelLeavesSceneUnchanged(self):
        self._requireWorker()
        fixed, moving = self._pair(n=40)
        n_nodes = slicer.mrmlScene.GetNumberOfNodes()
        run = DeepRegistrationLogic().start(fixed, moving, method="iterative", device="cpu")
        deadline = time.time() + 120
        while time.time() < deadline and not any(e.get("stage") == "inference" for e in run.poll()):
            if _IN_SLICER:
                slicer.app.processEvents()
            time.sleep(0.05)
        t0 = time.time()
        run.cancel(block=True)
        self.assertLess(time.time() - t0, 10.0)
        self.assertIsNone(run.finish())
        self.assertEqual(run.outcome.status, "cancelled")
        self.assertFalse(os.path.exists(run.temp_dir))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), n_nodes)

    def test_BadInputIsReported(self):
        self._requireWorker()
        import numpy as np
        fixed, _ = self._pair()
        flat = slicer.util.addVolumeFromArray(np.zeros((8, 8, 8), "float32"), name="Empty")
        with self.assertRaises(RuntimeError) as ctx:
            DeepRegistrationLogic().run(fixedVolume=fixed, movingVolume=flat, method="iterative", device="cpu", timeout=120)
        self.assertIn("empty", str(ctx.exception))
        self.assertNotIn("Traceback", str(ctx.exception))

    def test_TemporaryFilesKeptOnlyWhenAsked(self):
        self._requireWorker()
        fixed, moving = self._pair(n=12)
        logic = DeepRegistrationLogic()
        for keep in (False, True):
            run = logic.start(fixed, moving, method="iterative", device="cpu", keepTemporaryFiles=keep)
            try:
                self.assertEqual(run.worker.wait(300), 0)
                self.assertIsNotNone(run.finish())
                self.assertEqual(os.path.isdir(run.temp_dir), keep)
                if keep:  # the worker's inputs, outputs and manifest, for support
                    for name in ("inputs/fixed.nrrd", "inputs/moving.nrrd", "out/manifest.json"):
                        self.assertTrue(os.path.isfile(os.path.join(run.temp_dir, name)), name)
            finally:
                shutil.rmtree(run.temp_dir, ignore_errors=True)

    def test_InputsAreNeverOutputs(self):
        fixed, moving = self._pair()
        n_nodes = slicer.mrmlScene.GetNumberOfNodes()
        for kwargs in ({"outputVolume": moving}, {"outputVolume": fixed}):
            with self.assertRaises(ValueError):
                DeepRegistrationLogic().start(fixed, moving, method="iterative", device="cpu", **kwargs)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), n_nodes)


def _ijk_to_ras(volume_node):
    m = vtk_matrix_of(volume_node)
    return [[m.GetElement(r, c) for c in range(4)] for r in range(4)]


def vtk_matrix_of(volume_node):
    import vtk
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return m
