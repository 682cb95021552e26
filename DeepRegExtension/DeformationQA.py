"""DeformationQA: judge what any transform does (this extension's, SlicerElastix's, SlicerANTs'...).

Jacobian heatmap and folding statistics, displacement magnitude, the Transforms module's grid,
glyph and contour displays, checkerboard and flicker, TRE before/after, Dice/Hausdorff of a
warped segmentation, inverse consistency and a one-click report (table + screenshot). Every
number and map is computed by the worker command ``deepreg qa`` in a background process
(progress and Cancel, Slicer stays responsive, torch never enters Slicer's process); this file
only wires nodes, views and the run (``DeepRegistrationLib.qa``).
"""

import logging
import os
import shutil
import sys
import tempfile
import unittest
from typing import Optional, Sequence, Union

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
    from slicer.parameterNodeWrapper import parameterNodeWrapper
    _HAS_PARAMETER_WRAPPER = True
except ImportError:
    _HAS_PARAMETER_WRAPPER = False


from DeepRegistrationLib.standins import resource_path as _resource_path  # noqa: E402
from DeepRegistrationLib import qa  # noqa: E402
from DeepRegistrationLib import scene as dscene  # noqa: E402
from DeepRegistrationLib.process import BackgroundRun, WorkerProcess, temp_root, worker_environment  # noqa: E402


def resource_path(relative: str) -> str:
    return _resource_path(_MODULE_DIR, relative)


class DeformationQA(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Deformation QA"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepRegExtension developers"]
        self.parent.helpText = (
            "Quality assurance of any transform: Jacobian determinant (folding = det <= 0), "
            "displacement magnitude, grid/glyph/contour displays, checkerboard and flicker, "
            "landmark TRE, Dice and Hausdorff of warped segmentations, inverse consistency, and a "
            "report table with a screenshot.")
        self.parent.acknowledgementText = "Part of DeepRegExtension."
        self.parent.icon = qt.QIcon(resource_path("Icons/DeformationQA.png")) if _IN_SLICER else None


if _HAS_PARAMETER_WRAPPER:
    @parameterNodeWrapper
    class DeformationQAParameterNode:
        """The module's choices, saved with the scene (optional nodes start as ``None``)."""

        transformNode: slicer.vtkMRMLTransformNode
        referenceVolume: slicer.vtkMRMLScalarVolumeNode
        inverseTransform: slicer.vtkMRMLTransformNode
        fixedVolume: slicer.vtkMRMLScalarVolumeNode
        warpedVolume: slicer.vtkMRMLScalarVolumeNode
        fixedLandmarks: slicer.vtkMRMLMarkupsFiducialNode
        movingLandmarks: slicer.vtkMRMLMarkupsFiducialNode
        fixedSegmentation: Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode, None]
        warpedSegmentation: Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode, None]
        reportTable: slicer.vtkMRMLTableNode
        includeScreenshot: bool = True


class DeformationQAWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    FLICKER_MS = 700
    POLL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._lastTransform = None
        self._run = None
        self._onDone = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resource_path("UI/DeformationQA.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeformationQALogic()
        self.ui.jacobianButton.clicked.connect(self.onJacobian)
        self.ui.magnitudeButton.clicked.connect(self.onMagnitude)
        self.ui.showGridButton.clicked.connect(lambda: self.onShowDisplay("grid"))
        self.ui.showGlyphButton.clicked.connect(lambda: self.onShowDisplay("glyph"))
        self.ui.showContourButton.clicked.connect(lambda: self.onShowDisplay("contour"))
        self.ui.inverseButton.clicked.connect(self.onInverse)
        self.ui.checkerboardButton.clicked.connect(self.onCheckerboard)
        self.ui.flickerButton.toggled.connect(self.onFlicker)
        self.ui.treButton.clicked.connect(self.onTRE)
        self.ui.overlapButton.clicked.connect(self.onOverlap)
        self.ui.reportButton.clicked.connect(self.onReport)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self._flickerTimer = qt.QTimer()
        self._flickerTimer.setInterval(self.FLICKER_MS)
        self._flickerTimer.timeout.connect(self._flickerStep)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MS)
        self._pollTimer.timeout.connect(self.onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self._updateRunState()

    def cleanup(self) -> None:
        self._flickerTimer.stop()
        self._stopRun()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.ui.flickerButton.checked = False
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk_modified_event(), self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.ui.flickerButton.checked = False
        self._stopRun()  # its nodes are going away: nothing to load into
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.transformNode:
            p.transformNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLGridTransformNode")
        self._fillRelated()

    def setParameterNode(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk_modified_event(), self._onParameterNodeModified)
        self._parameterNode = node
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk_modified_event(), self._onParameterNodeModified)

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is not None and self._parameterNode.transformNode is not self._lastTransform:
            self._fillRelated()

    def _fillRelated(self) -> None:
        """A newly chosen transform: fill the empty selectors with its reference, warped volume
        and inverse (DeepRegistration results name them; others keep what the user chose)."""
        p = self._parameterNode
        self._lastTransform = p.transformNode
        if p.transformNode is None:
            return
        for key, node in self.logic.relatedNodes(p.transformNode).items():
            if node is not None and getattr(p, key) is None:
                setattr(p, key, node)

    def _need(self, *names) -> bool:
        missing = [n for n in names if getattr(self._parameterNode, n) is None]
        if missing:
            slicer.util.warningDisplay("Choose: " + ", ".join(missing))
        return not missing

    # -- the background run ------------------------------------------------------------------------
    def _start(self, onDone, outputs=(), inverseConsistency=False, landmarks=False, segmentations=False) -> None:
        """Start ``deepreg qa`` for the chosen transform and reference (plus what is asked);
        ``onDone(results)`` runs when it has finished and its maps are in the scene."""
        if self._run is not None:
            return
        from DeepRegistrationLib.dependencies import ensure_dependencies
        with slicer.util.tryWithErrorDisplay("Could not install the required Python packages.", waitCursor=True):
            if not ensure_dependencies(lambda msg: slicer.util.confirmOkCancelDisplay(msg, "DeformationQA"),
                                       log=logging.info, module="DeformationQA"):
                return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start the computation.", waitCursor=True):
            self._run = self.logic.start(
                p.transformNode, p.referenceVolume, inverseTransform=p.inverseTransform if inverseConsistency else None,
                fixedLandmarks=p.fixedLandmarks if landmarks else None,
                movingLandmarks=p.movingLandmarks if landmarks else None,
                fixedSegmentation=p.fixedSegmentation if segmentations else None,
                warpedSegmentation=p.warpedSegmentation if segmentations else None,
                outputs=outputs, inverseConsistency=inverseConsistency)
            self._onDone = onDone
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Computing in the background..."
            self._pollTimer.start()
        self._updateRunState()

    def onPoll(self) -> None:
        run = self._run
        if run is None:
            self._pollTimer.stop()
            return
        for event in run.poll():
            if event.get("event") == "progress":
                self.ui.progressBar.value = int(round(100 * run.worker.fraction))
                self.ui.statusLabel.text = f"{event.get('stage', '')}: {event.get('message', '')}"
        if not run.worker.finished:
            return
        self._pollTimer.stop()
        self._run, onDone, self._onDone = None, self._onDone, None
        try:
            results = run.finish()
        except Exception as e:  # noqa: BLE001 - loading failed: say so, keep Slicer usable
            slicer.util.errorDisplay(f"The computation finished but its results could not be loaded: {e}")
            results = None
        self.ui.statusLabel.text = "Done." if results is not None else run.outcome.message
        if run.outcome is not None and run.outcome.status in ("bad_input", "failed"):
            slicer.util.errorDisplay(run.outcome.message, detailedText=run.outcome.details or None)
        elif results is not None and onDone is not None:
            with slicer.util.tryWithErrorDisplay("Could not show the results."):
                onDone(results)
        self._updateRunState()

    def onCancel(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = "Cancelling..."

    def _stopRun(self) -> None:
        """Cancel a run whose results nobody will look at (scene closing, module closing)."""
        run, self._run, self._onDone = self._run, None, None
        self._pollTimer.stop()
        if run is not None:
            run.cancel(discard=True, block=True)
            run.finish()
        self._updateRunState()

    def _updateRunState(self) -> None:
        running = self._run is not None
        self.ui.cancelButton.enabled = running
        for name in ("jacobianButton", "magnitudeButton", "inverseButton", "treButton", "overlapButton",
                     "reportButton"):
            getattr(self.ui, name).enabled = not running
        if not running:
            self.ui.progressBar.value = 0

    # -- actions -----------------------------------------------------------------------------------
    def onJacobian(self) -> None:
        if self._need("transformNode", "referenceVolume"):
            self._start(lambda r: self._showMap(r.nodes["jacobian"], qa.jacobian_summary(r.metrics)),
                        outputs=("jacobian",))

    def onMagnitude(self) -> None:
        if self._need("transformNode", "referenceVolume"):
            self._start(lambda r: self._showMap(r.nodes["displacement_magnitude"], qa.magnitude_summary(r.metrics)),
                        outputs=("displacement_magnitude",))

    def _showMap(self, node, text: str) -> None:
        self.ui.foldingLabel.text = text
        slicer.util.setSliceViewerLayers(background=self._parameterNode.referenceVolume, foreground=node,
                                         foregroundOpacity=0.6)

    def onShowDisplay(self, mode: str) -> None:
        if self._need("transformNode"):
            self.logic.showTransformDisplay(self._parameterNode.transformNode, mode, self._parameterNode.referenceVolume)

    def onInverse(self) -> None:
        if self._need("transformNode", "referenceVolume"):
            self._start(lambda r: setattr(self.ui.inverseLabel, "text", qa.inverse_summary(r.metrics)),
                        inverseConsistency=True)

    def onCheckerboard(self) -> None:
        if not self._need("fixedVolume", "warpedVolume"):
            return
        with slicer.util.tryWithErrorDisplay("Could not make the checkerboard.", waitCursor=True):
            out = self.logic.checkerboard(self._parameterNode.fixedVolume, self._parameterNode.warpedVolume)
            slicer.util.setSliceViewerLayers(background=out, foreground=None)

    def onFlicker(self, on: bool) -> None:
        if on and self._need("fixedVolume", "warpedVolume"):
            p = self._parameterNode
            slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=p.warpedVolume, foregroundOpacity=1.0)
            self._flickerTimer.start()
        else:
            self._flickerTimer.stop()
            if on:
                self.ui.flickerButton.checked = False

    def _flickerStep(self) -> None:
        for i in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            c = slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            c.SetForegroundOpacity(0.0 if c.GetForegroundOpacity() > 0.5 else 1.0)

    def onTRE(self) -> None:
        if self._need("transformNode", "referenceVolume", "fixedLandmarks", "movingLandmarks"):
            self._start(lambda r: setattr(self.ui.treLabel, "text", qa.tre_summary_text(r.metrics)), landmarks=True)

    def onOverlap(self) -> None:
        if self._need("transformNode", "referenceVolume", "fixedSegmentation", "warpedSegmentation"):
            self._start(lambda r: setattr(self.ui.overlapLabel, "text", qa.overlap_summary(r.metrics)),
                        segmentations=True)

    def onReport(self) -> None:
        if not self._need("transformNode", "referenceVolume"):
            return
        p = self._parameterNode

        def done(results):
            table = p.reportTable or slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "Deformation QA report")
            p.reportTable = table
            self.logic.fillReport(table, p.transformNode, p.referenceVolume, results)
            message = f"Report in table '{table.GetName()}'."
            if p.includeScreenshot:
                message += f" Screenshot: {self.logic.screenshot(table)}"
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
            self.ui.statusLabel.text = message
        both = (p.fixedLandmarks is not None and p.movingLandmarks is not None)
        segs = (p.fixedSegmentation is not None and p.warpedSegmentation is not None)
        self._start(done, inverseConsistency=True, landmarks=both, segmentations=segs)


def vtk_modified_event():
    import vtk
    return vtk.vtkCommand.ModifiedEvent


class DeformationQALogic(ScriptedLoadableModuleLogic):
    """Usable from the Python console::

        logic = DeformationQALogic()
        jac_node, stats = logic.jacobianVolume(transformNode, fixedVolume)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    if _IN_SLICER:
        def getParameterNode(self):
            return DeformationQAParameterNode(super().getParameterNode())

    @staticmethod
    def relatedNodes(transformNode) -> dict:
        """Nodes that belong with a DeepRegistration transform (``None`` where unknown, e.g. for
        SlicerElastix's): ``referenceVolume`` and ``fixedVolume`` (its fixed reference),
        ``warpedVolume`` and ``inverseTransform`` (outputs of the same run: same method and
        time, roles swapped on the inverse)."""
        fixed = transformNode.GetNodeReference(dscene.FIXED_REFERENCE_ROLE)
        fixed_id = transformNode.GetNodeReferenceID(dscene.FIXED_REFERENCE_ROLE)
        moving_id = transformNode.GetNodeReferenceID(dscene.MOVING_REFERENCE_ROLE)
        out = {"referenceVolume": fixed, "fixedVolume": fixed, "warpedVolume": None, "inverseTransform": None}
        run_time = transformNode.GetAttribute(dscene.ATTRIBUTE_PREFIX + "Time")
        scene = transformNode.GetScene()
        if not run_time or scene is None:
            return out

        def same_run(node, output):
            return (node.GetAttribute(dscene.ATTRIBUTE_PREFIX + "Output") == output
                    and node.GetAttribute(dscene.ATTRIBUTE_PREFIX + "Time") == run_time
                    and node.GetAttribute(dscene.ATTRIBUTE_PREFIX + "Method")
                    == transformNode.GetAttribute(dscene.ATTRIBUTE_PREFIX + "Method"))
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            if same_run(node, "warped") and node.GetNodeReferenceID(dscene.MOVING_REFERENCE_ROLE) == moving_id:
                out["warpedVolume"] = node
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLTransformNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLTransformNode")
            if (same_run(node, "inverse_transform")
                    and node.GetNodeReferenceID(dscene.FIXED_REFERENCE_ROLE) == moving_id
                    and node.GetNodeReferenceID(dscene.MOVING_REFERENCE_ROLE) == fixed_id):
                out["inverseTransform"] = node
        return out

    def start(self, transformNode, referenceVolume, inverseTransform=None, fixedLandmarks=None,
              movingLandmarks=None, fixedSegmentation=None, warpedSegmentation=None,
              outputs: Sequence[str] = ("jacobian", "displacement_magnitude"), inverseConsistency: bool = True,
              keepTemporaryFiles: bool = False, python: Optional[str] = None) -> BackgroundRun:
        """Write the nodes and start ``deepreg qa`` in the background; returns at once. Poll the
        run, cancel it, then ``run.finish()`` loads the maps named in ``outputs`` and returns
        :class:`DeepRegistrationLib.qa.QAResults`. Raises ``ValueError`` for missing inputs
        (checked before anything starts)."""
        temp_dir = tempfile.mkdtemp(prefix="DeepRegQA-", dir=temp_root())
        try:
            files = qa.write_qa_inputs(os.path.join(temp_dir, "inputs"), transformNode, referenceVolume,
                                       inverse_node=inverseTransform, fixed_landmarks=fixedLandmarks,
                                       moving_landmarks=movingLandmarks, fixed_segmentation=fixedSegmentation,
                                       warped_segmentation=warpedSegmentation)
            cmd = qa.qa_command(files, os.path.join(temp_dir, "out"), python=python,
                                inverse_consistency=inverseConsistency)
            worker = WorkerProcess(cmd, env=worker_environment(_MODULE_DIR), cwd=temp_dir).start()
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return BackgroundRun(worker, temp_dir, lambda manifest: qa.load_qa_results(manifest, transformNode, outputs),
                             keep_temp=keepTemporaryFiles)

    def run(self, transformNode, referenceVolume, timeout: Optional[float] = 600, **kwargs):
        """Blocking :meth:`start` (console, scripts, self-tests): the ``QAResults``. Raises
        ``RuntimeError`` with the worker's message when it did not finish."""
        return self.start(transformNode, referenceVolume, **kwargs).wait_for_results(timeout)

    def jacobianVolume(self, transformNode, referenceVolume):
        """(Jacobian-determinant volume node shown with the folding colour table, numbers); blocks."""
        r = self.run(transformNode, referenceVolume, outputs=("jacobian",), inverseConsistency=False)
        return r.nodes["jacobian"], r.metrics

    def magnitudeVolume(self, transformNode, referenceVolume):
        """(displacement-magnitude volume node in mm, numbers); blocks."""
        r = self.run(transformNode, referenceVolume, outputs=("displacement_magnitude",), inverseConsistency=False)
        return r.nodes["displacement_magnitude"], r.metrics

    def report(self, transformNode, referenceVolume, tableNode, inverseTransform=None, fixedLandmarks=None,
               movingLandmarks=None, fixedSegmentation=None, warpedSegmentation=None) -> dict:
        """Every metric that has its inputs, into ``tableNode`` (Metric, Value); returns them. Blocks."""
        results = self.run(transformNode, referenceVolume, inverseTransform=inverseTransform,
                           fixedLandmarks=fixedLandmarks, movingLandmarks=movingLandmarks,
                           fixedSegmentation=fixedSegmentation, warpedSegmentation=warpedSegmentation, outputs=())
        return self.fillReport(tableNode, transformNode, referenceVolume, results)

    @staticmethod
    def fillReport(tableNode, transformNode, referenceVolume, results) -> dict:
        """The numbers of a finished run, with the names of what was checked, into the table."""
        stats = {"transform": transformNode.GetName(), "reference": referenceVolume.GetName()}
        method = transformNode.GetAttribute(dscene.ATTRIBUTE_PREFIX + "Method")
        if method:
            stats["method"] = method
        stats.update(results.metrics)
        qa.fill_table(tableNode, qa.report_rows(stats))
        return stats

    @staticmethod
    def showTransformDisplay(transformNode, mode: str, referenceVolume=None) -> None:
        """The Transforms module's visualisations: ``grid``, ``glyph`` or ``contour`` in 2D."""
        transformNode.CreateDefaultDisplayNodes()
        d = transformNode.GetDisplayNode()
        modes = {"grid": d.VIS_MODE_GRID, "glyph": d.VIS_MODE_GLYPH, "contour": d.VIS_MODE_CONTOUR}
        if mode not in modes:
            raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")
        d.SetVisualizationMode(modes[mode])
        if referenceVolume is not None:
            d.SetAndObserveRegionNode(referenceVolume)
        d.SetVisibility(True)
        d.SetVisibility2D(True)

    @staticmethod
    def checkerboard(fixedVolume, warpedVolume, pattern=(8, 8, 1)):
        """Checkerboard of the two volumes (Slicer's CheckerBoardFilter CLI; same grid needed)."""
        out = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(f"{fixedVolume.GetName()} checkerboard"))
        params = {"inputVolume1": fixedVolume.GetID(), "inputVolume2": warpedVolume.GetID(),
                  "outputVolume": out.GetID(), "checkerPattern": ",".join(str(p) for p in pattern)}
        slicer.cli.runSync(slicer.modules.checkerboardfilter, None, params)
        return out

    @staticmethod
    def screenshot(tableNode) -> Optional[str]:
        """Capture the view layout to a PNG beside the scene (or in the temporary folder)."""
        import ScreenCapture
        folder = slicer.mrmlScene.GetRootDirectory() or slicer.app.temporaryPath
        path = os.path.join(folder, f"{tableNode.GetName()}.png".replace(" ", "_"))
        ScreenCapture.ScreenCaptureLogic().captureImageFromView(None, path)
        tableNode.SetAttribute("DeepReg.Screenshot", path)
        return path


class DeformationQATest(ScriptedLoadableModuleTest):
    """Known answers: a 10% scaling has Jacobian 1.331 everywhere and no folding; a translation
    moves landmarks by its length and is perfectly inverse-consistent; a grid transform with a
    fold shows it; a checkerboard interleaves its two inputs; a stored ``deepreg qa`` result
    loads into the scene. Without the engine's packages (the extension build server has no
    torch) the tests that start the worker say so and are skipped; the others still run."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def _requireWorker(self):
        from DeepRegistrationLib.dependencies import missing_requirements
        missing = missing_requirements()
        if missing:  # installed on first use in the GUI; a test must not install packages
            self.skipTest("skipped: this test runs the worker, which needs " + ", ".join(missing)
                          + " (not installed here); the stored-result tests still ran")

    def runTest(self):
        for test in (self.test_StoredQAResultLoads, self.test_TransformDisplays, self.test_ScalingJacobianAndReport,
                     self.test_FoldingGridTransform, self.test_Checkerboard):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as e:
                self.delayDisplay(f"{test.__name__}: {e}")

    def test_StoredQAResultLoads(self):
        """``deepreg qa``'s stored result for the stored registration (``Testing/Data``): the
        Jacobian map on the reference grid in the folding colours, referencing the transform, and
        the report table. Needs no torch."""
        import numpy as np
        import vtk
        data = os.path.join(os.path.dirname(_MODULE_DIR), "Testing", "Data")
        if not os.path.isdir(os.path.join(data, "selftest_qa")):
            self.skipTest(f"skipped: the stored result {data} is not in this installation")
        scene = slicer.mrmlScene
        reference = dscene.read_volume_node(scene, os.path.join(data, "selftest_run", "inputs", "fixed.nrrd"), "Fixed")
        transform = dscene.read_transform_node(scene, os.path.join(data, "selftest_run", "out", "displacement.mha"),
                                               "Stored transform")
        results = qa.load_qa_results(os.path.join(data, "selftest_qa", "manifest.json"), transform)
        jac = results.nodes["jacobian"]
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        jac.GetIJKToRASMatrix(a)
        reference.GetIJKToRASMatrix(b)
        for r in range(4):
            for c in range(4):
                self.assertAlmostEqual(a.GetElement(r, c), b.GetElement(r, c), places=5)
        self.assertEqual(jac.GetDisplayNode().GetColorNode().GetName(), dscene.JACOBIAN_COLOR_NODE_NAME)
        self.assertEqual(jac.GetNodeReferenceID("DeepReg.transform"), transform.GetID())
        self.assertAlmostEqual(float(np.min(slicer.util.arrayFromVolume(jac))), results.metrics["jacobian_min"], places=4)
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", "report")
        DeformationQALogic.fillReport(table, transform, reference, results)
        rows = {table.GetCellText(r, 0): table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())}
        self.assertEqual(rows["folding_percent"], "0")
        self.assertEqual(rows["inverse"], "given")
        self.assertLess(float(rows["inverse_consistency_mm.mean"]), 0.5)

    @staticmethod
    def _linear(name, from_parent):
        import vtk
        t = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
        m = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                m.SetElement(r, c, float(from_parent[r][c]))
        t.SetMatrixTransformFromParent(m)
        return t

    def test_ScalingJacobianAndReport(self):
        self._requireWorker()
        import numpy as np
        import vtk
        ref = slicer.util.addVolumeFromArray(np.zeros((10, 11, 12), "float32"), name="Reference")
        t = self._linear("Scale", np.diag([1.1, 1.1, 1.1, 1.0]))
        logic = DeformationQALogic()
        jac, stats = logic.jacobianVolume(t, ref)
        arr = slicer.util.arrayFromVolume(jac)
        self.assertAlmostEqual(float(arr.mean()), 1.331, places=3)
        self.assertEqual(stats["folding_percent"], 0.0)
        self.assertEqual(jac.GetDisplayNode().GetColorNode().GetName(), dscene.JACOBIAN_COLOR_NODE_NAME)
        self.assertEqual(jac.GetNodeReferenceID("DeepReg.transform"), t.GetID())
        mag, mstats = logic.magnitudeVolume(t, ref)
        self.assertAlmostEqual(mstats["max_displacement_mm"], float(slicer.util.arrayFromVolume(mag).max()), places=4)
        self.assertGreater(mstats["max_displacement_mm"], 0.5)
        shift = np.eye(4)
        shift[0, 3] = 1.0
        translation = self._linear("Shift", shift)
        fixed = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
        moving = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "M")
        fixed.AddControlPoint(vtk.vtkVector3d(10.0, 0.0, 0.0))
        moving.AddControlPoint(vtk.vtkVector3d(11.0, 0.0, 0.0))
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "report")
        stats = logic.report(translation, ref, table, fixedLandmarks=fixed, movingLandmarks=moving)
        self.assertAlmostEqual(stats["tre_before_mm"]["mean"], 1.0, places=6)
        self.assertAlmostEqual(stats["tre_after_mm"]["mean"], 0.0, places=6)
        self.assertLess(stats["inverse_consistency_mm"]["max"], 1e-6)
        self.assertGreater(table.GetNumberOfRows(), 5)
        rows = {table.GetCellText(r, 0): table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())}
        self.assertEqual(rows["folding_percent"], "0")
        self.assertEqual(rows["tre_after_mm.mean"], "0")
        logging.info("DeformationQA self-test passed")

    def test_FoldingGridTransform(self):
        """A displacement that turns a slab of the reference inside out: the folding % is that
        slab's share of the voxels and its Jacobian voxels get the folding colour."""
        self._requireWorker()
        import numpy as np
        ref = slicer.util.addVolumeFromArray(np.zeros((6, 8, 20), "float32"), name="Reference")
        import vtk
        from vtk.util import numpy_support
        i = np.arange(20, dtype=np.float64)
        ux = np.where((i >= 8) & (i <= 11), -2.0 * (i - 8), np.where(i > 11, -6.0, 0.0))  # du/dx = -2 there
        field = np.zeros((6, 8, 20, 3))
        field[..., 0] = ux[None, None, :]  # along RAS x = i (identity IJK -> RAS)
        image = vtk.vtkImageData()
        image.SetDimensions(20, 8, 6)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(field.reshape(-1, 3), deep=True))
        transform = slicer.vtkOrientedGridTransform()
        transform.SetDisplacementGridData(image)
        transform.SetInterpolationModeToLinear()
        grid = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "Fold")
        grid.SetAndObserveTransformFromParent(transform)
        jac, stats = DeformationQALogic().jacobianVolume(grid, ref)
        arr = slicer.util.arrayFromVolume(jac)
        self.assertGreater(stats["folding_percent"], 10.0)
        self.assertLess(float(arr.min()), 0.0)
        self.assertLessEqual(float(arr.min()), jac.GetDisplayNode().GetWindowLevelMin())  # in the folding colour

    def test_TransformDisplays(self):
        import numpy as np
        ref = slicer.util.addVolumeFromArray(np.zeros((5, 5, 5), "float32"), name="Reference")
        t = self._linear("Scale", np.diag([1.1, 1.1, 1.1, 1.0]))
        logic = DeformationQALogic()
        for mode in ("grid", "glyph", "contour"):
            logic.showTransformDisplay(t, mode, ref)
            d = t.GetDisplayNode()
            self.assertEqual(d.ConvertVisualizationModeToString(d.GetVisualizationMode()).lower(), mode)
            self.assertTrue(d.GetVisibility2D())
            self.assertEqual(d.GetRegionNode().GetID(), ref.GetID())
        with self.assertRaises(ValueError):
            logic.showTransformDisplay(t, "arrows")

    def test_Checkerboard(self):
        import numpy as np
        if not _IN_SLICER:
            self.skipTest("the checkerboard uses Slicer's CheckerBoardFilter CLI (application only)")
        a = slicer.util.addVolumeFromArray(np.full((4, 16, 16), 10, "float32"), name="A")
        b = slicer.util.addVolumeFromArray(np.full((4, 16, 16), 20, "float32"), name="B")
        out = DeformationQALogic().checkerboard(a, b, pattern=(2, 2, 1))
        arr = slicer.util.arrayFromVolume(out)
        self.assertEqual(set(np.unique(arr).tolist()), {10.0, 20.0})
        self.assertAlmostEqual(float((arr == 10).mean()), 0.5, places=2)
