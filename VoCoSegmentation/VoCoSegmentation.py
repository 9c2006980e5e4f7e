"""VoCo Segmentation: segment a volume with a VoCo model, correct it, add it to the training set,
fine-tune the model on the collected cases and see whether it improves on cases it never saw;
roll back to an earlier version when it did not.

The widget is a view of ``VoCoSegmentationLib.session.SegmentationSession`` (Qt-free, tested
on slicer-core): each handler reads the inputs from the parameter node, calls the session once,
and ``showState`` shows what the session decided. The engine (``python -m voco``) always runs
in its own process; the GUI thread only polls it from a QTimer.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer.i18n import tr as _
from slicer.i18n import translate
from VoCoCommon import acknowledgementText, showChoices, showLog
from VoCoCommonLib.release import slicer_unsupported_message

UNSUPPORTED = slicer_unsupported_message()  # None on Slicer 5.10+; the Libs need its Python 3.12
if not UNSUPPORTED:
    from VoCoCommonLib import dependencies
    from VoCoSegmentationLib.session import POLL_INTERVAL_MS, SegmentationSession


#
# VoCoSegmentation
#


class VoCoSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VoCo Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["VoCoCommon"]
        self.parent.contributors = ["VoCo for 3D Slicer developers"]
        self.parent.helpText = (UNSUPPORTED or "") + _("""
Segment a volume with a VoCo model on the CPU or a GPU: the published VoComni models (20
abdominal and thoracic structures and lesions in CT; downloaded on first use, or imported from a
file), or a model fine-tuned here. The engine runs in a separate process: Slicer stays
responsive and <b>Apply</b> turns into <b>Cancel</b> while it works. The result is a segmentation
with named, coloured and coded segments beside the input volume. Correct it with Segment Editor,
then <b>Add to training set</b> (the version that made it is scored against your correction
first: its Dice on a case it never saw) and <b>Fine-tune</b>. The versions table shows each
version's Dice on such unseen cases, its Dice on cases held out of its fine-tuning, and flags a
version that did worse than the one it started from; <b>Roll back to this version</b> makes the
selected one current again (later versions are kept).
See the <a href="https://github.com/voco-slicer/SlicerVoCo#3d-slicer-extension">documentation</a>.
""")
        self.parent.acknowledgementText = acknowledgementText()
        if UNSUPPORTED:
            logging.error(UNSUPPORTED)


#
# VoCoSegmentationParameterNode
#


@parameterNodeWrapper
class VoCoSegmentationParameterNode:
    """GUI state, kept in the scene.

    model - the selected model (``ModelEntry.spec``: package folder or registry name).
    device - ``auto``, ``cpu``, ``cuda:N`` or ``mps``.
    roi - segment only inside this box, when set.
    outputSegmentation - the result goes here; a new node is made when none is set.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    device: str = "auto"
    fast: bool = False
    tta: bool = False
    roi: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    finetuneSteps: Annotated[int, WithinRange(1, 100000)] = 300
    autoFinetune: bool = False
    autoFinetuneEvery: Annotated[int, WithinRange(1, 1000)] = 5


#
# VoCoSegmentationWidget
#


class VoCoSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.session = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shownModels = None   # what the combo boxes show, so they are rebuilt only when it changes
        self._shownVersions = None  # the versions table's rows
        self._shownDevices = None
        self._shownLogLines = 0

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if UNSUPPORTED:
            self.layout.addWidget(qt.QLabel(UNSUPPORTED))
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VoCoSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = VoCoSegmentationLogic()
        self.session = self.logic.session
        self.session.changed.connect(self.showState)
        self.session.resultReady.connect(self.onResultReady)
        self.session.errorOccurred.connect(self.onError)
        self.session.modelSelected.connect(self.onNewModelVersion)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.session.tick)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceSelected)
        self.ui.showIn3DButton.connect("clicked(bool)", self.onShowIn3D)
        self.ui.addToTrainingSetButton.connect("clicked(bool)", self.onAddToTrainingSet)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.rollBackButton.connect("clicked(bool)", self.onRollBack)
        self.ui.modelsTableWidget.connect("itemSelectionChanged()", self.showState)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)

        self.initializeParameterNode()
        self.timer.start()

    def cleanup(self) -> None:
        if self.session is None:
            return
        self.timer.stop()
        self.session.close()
        self.removeObservers()

    def enter(self) -> None:
        if self.session is None:
            return
        self.initializeParameterNode()
        # In the background: the lists fill in when the engine answers. The model list is read on
        # every enter, since VoCo Pretrain may have fine-tuned a new model meanwhile.
        if self.session.state.environment is None:
            self.session.refresh()
        else:
            self.session.refresh_models()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.showState)

    def onSceneStartClose(self, caller, event) -> None:
        self.session.scene_closed()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.showState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a SlicerParameterName property in the .ui are bound to the fields of the same name.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.showState)
        self.showState()

    # --- showing the session's state ------------------------------------------------------------

    def showState(self, caller=None, event=None) -> None:
        state, p = self.session.state, self._parameterNode
        buttons = self.session.buttons(p.inputVolume if p else None, p.model if p else None,
                                       p.outputSegmentation if p else None)
        for widget, button in ((self.ui.applyButton, buttons.apply), (self.ui.finetuneButton, buttons.finetune),
                               (self.ui.addToTrainingSetButton, buttons.add)):
            widget.text = button.text
            widget.enabled = button.enabled
            widget.toolTip = button.tooltip
        for widget in (self.ui.modelComboBox, self.ui.refreshModelsButton, self.ui.importModelButton,
                       self.ui.deviceComboBox):
            widget.enabled = buttons.choose
        self.ui.showIn3DButton.enabled = bool(p and p.outputSegmentation)
        self.ui.progressBar.visible = state.job is not None
        self.ui.progressBar.value = int(round(100 * state.fraction))
        self.ui.statusLabel.text = state.status
        self.ui.trainingSetLabel.text = _("Training set: {count} case(s) in {folder}").format(
            count=state.training_set_count, folder=self.session.training_set.folder)
        self._showModels(state.segmentation_models, state.models_loading)
        self._showVersions()
        self._showDevices(state.devices)
        self._shownLogLines = showLog(self.ui.logTextEdit, self.session.log, self._shownLogLines)

    def _showModels(self, models, loading: bool) -> None:
        shown = [(m.spec, m.title) for m in models]
        if shown == self._shownModels:
            return
        self._shownModels = shown
        self.onModelSelected(showChoices(self.ui.modelComboBox, shown, self._parameterNode.model if self._parameterNode
                                         else ""))

    def _showVersions(self) -> None:
        rows = self.session.version_rows()
        table = self.ui.modelsTableWidget
        if rows != self._shownVersions:
            self._shownVersions = rows
            table.setRowCount(len(rows))
            for row, version in enumerate(rows):
                texts = (version.name, version.version, version.unseen, version.validation, version.note)
                for column, text in enumerate(texts):
                    table.setItem(row, column, qt.QTableWidgetItem(text))
        button = self.session.roll_back_button(self._selectedVersion())
        self.ui.rollBackButton.enabled = button.enabled
        self.ui.rollBackButton.toolTip = button.tooltip

    def _selectedVersion(self):
        """The spec of the version selected in the versions table, if any."""
        row = self.ui.modelsTableWidget.currentRow()
        rows = self._shownVersions or []
        selected = self.ui.modelsTableWidget.selectedItems()
        return rows[row].spec if selected and 0 <= row < len(rows) else None

    def _showDevices(self, devices) -> None:
        shown = [(d.id, d.title) for d in devices]
        if shown == self._shownDevices or not shown:
            return
        self._shownDevices = shown
        self.onDeviceSelected(showChoices(self.ui.deviceComboBox, shown, self._parameterNode.device
                                          if self._parameterNode else "auto"))
        environment = self.session.state.environment
        self.ui.deviceComboBox.toolTip = (environment.message if environment and environment.message
                                          else "Where the engine runs")

    # --- user actions ---------------------------------------------------------------------------

    def onModelSelected(self, index) -> None:
        models = self.session.state.segmentation_models
        if self._parameterNode and 0 <= index < len(models):
            self._parameterNode.model = models[index].spec

    def onDeviceSelected(self, index) -> None:
        devices = self.session.state.devices
        if self._parameterNode and 0 <= index < len(devices):
            self._parameterNode.device = devices[index].id

    def onNewModelVersion(self, spec) -> None:
        if self._parameterNode:
            self._parameterNode.model = spec
        self._shownModels = None
        self.showState()

    def onRefreshModels(self) -> None:
        self.session.refresh_models()

    def onApplyButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation.")):
            if self.session.state.job == "segment":
                self.session.cancel()
            else:
                self.session.segment(p.inputVolume, p.model, device=p.device, fast=p.fast, tta=p.tta, roi_node=p.roi,
                                     output_node=p.outputSegmentation)

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Import a model: a package's model.json, "
                                              "a package .zip or a checkpoint", "",
                                              "Models (model.json *.zip *.pt *.pth *.ckpt);;All files (*)")
        if path:
            path = Path(path)
            with slicer.util.tryWithErrorDisplay(_("Failed to import the model.")):
                self.session.import_model(path.parent if path.name == "model.json" else path)

    def onShowIn3D(self) -> None:
        node = self._parameterNode.outputSegmentation
        if node is not None:
            node.CreateClosedSurfaceRepresentation()  # Slicer's conversion, as Segment Editor's Show 3D
            if node.GetDisplayNode():
                node.GetDisplayNode().SetVisibility3D(True)

    def onAddToTrainingSet(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to add the case to the training set.")):
            self.session.add_to_training_set(p.inputVolume, p.outputSegmentation, model=p.model,
                                             auto_finetune_every=p.autoFinetuneEvery if p.autoFinetune else 0,
                                             steps=p.finetuneSteps, device=p.device)

    def onFinetune(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start fine-tuning.")):
            if self.session.state.finetuning:
                self.session.stop_finetuning()
            else:
                self.session.finetune(self.session.model(p.model) or p.model, steps=p.finetuneSteps, device=p.device)

    def onRollBack(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to roll back.")):
            self.session.roll_back(self._selectedVersion())

    def onInstallDependencies(self) -> None:
        environment = self.session.state.environment
        with slicer.util.tryWithErrorDisplay(_("Failed to install VoCo's Python dependencies."), waitCursor=True):
            if environment is None:
                self.ui.dependenciesLabel.text = _("Still asking the engine's Python what it has; try again in a moment.")
            elif dependencies.install(environment.missing):
                self.ui.dependenciesLabel.text = _("All dependencies are installed.")
                self.session.refresh()

    def onOpenModelsFolder(self) -> None:
        folder = self.session.client.settings.models_dir
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    # --- what the session reports ---------------------------------------------------------------

    def onResultReady(self, segmentationNode, volumeNode) -> None:
        if self._parameterNode:
            self._parameterNode.outputSegmentation = segmentationNode
        self.logic.showResult(segmentationNode, volumeNode)

    def onError(self, message) -> None:
        slicer.util.errorDisplay(f"VoCo: {message}")


#
# VoCoSegmentationLogic
#


class VoCoSegmentationLogic(ScriptedLoadableModuleLogic):
    """The module's session, for the widget and the Python console.

    Example (Slicer's Python console)::

        logic = slicer.modules.vocosegmentation.widgetRepresentation().self().logic
        node = logic.process(getNode("MRHead"), "/path/to/model", device="cpu")
    """

    def __init__(self, session=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = session or SegmentationSession()

    def getParameterNode(self):
        return VoCoSegmentationParameterNode(super().getParameterNode())

    def showResult(self, segmentationNode, volumeNode) -> None:
        """Show the volume in the slice views with the segmentation over it."""
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode:
            displayNode.SetVisibility(True)

    def process(self, volumeNode, model, device="auto", fast=False, tta=False, roiNode=None, timeout=600):
        """Segment and wait (console, self-test): returns the segmentation node. Blocks: not for the GUI."""
        job = self.session.segment(volumeNode, model, device=device, fast=fast, tta=tta, roi_node=roiNode)
        self.session.wait_until(lambda: job.finished, timeout, slicer.app.processEvents)
        if not job.succeeded or job.node is None:
            raise RuntimeError(job.error or job.status)
        return job.node


#
# VoCoSegmentationTest
#

# Runs in the engine's Python (a separate process): a tiny SwinUNETR package with random weights.
_TINY_PACKAGE_SCRIPT = r"""
import sys, torch
from voco.models.segmentation import build_segmentation_network
from voco.registry.package import Label, ModelCard, Preprocessing, write_package
torch.manual_seed(0)
labels = [Label(1, "bright", "#f1d691"), Label(2, "dark", "#80ae80")]
card = ModelCard(name="selftest-tiny", version="1", architecture="swinunetr-tiny", in_channels=1, labels=labels,
                 preprocessing=Preprocessing("mri", (2.0, 2.0, 2.0), (32, 32, 32)))
network = build_segmentation_network("swinunetr-tiny", 1, len(labels) + 1)
write_package(sys.argv[1], card, network.state_dict())
"""


class VoCoSegmentationTest(ScriptedLoadableModuleTest):
    """Segments a small synthetic volume with a tiny model on the CPU (about a minute).

    Slicer's Reload and Test calls ``runTest`` directly, outside unittest: a skip would be
    reported as a failure and cleanups registered with ``addCleanup`` would never run, so the
    test says why it does not run and cleans up in ``finally``."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if UNSUPPORTED:
            self.delayDisplay(f"Not run: {UNSUPPORTED}")
            return
        self.tempDir = Path(tempfile.mkdtemp(prefix="VoCoSegmentationTest-"))
        try:
            self.logic = VoCoSegmentationLogic()
            if not self._engineReady():
                return
            self.package = self._tinyPackage()
            self.setUp()
            self.test_segment_whole_volume_and_roi()
            self.setUp()
            self.test_cancel_leaves_nothing()
        finally:
            shutil.rmtree(self.tempDir, ignore_errors=True)

    def _engineReady(self) -> bool:
        session = self.logic.session
        session.refresh()
        session.wait_until(lambda: session.state.environment is not None, 300, slicer.app.processEvents)
        if not session.state.environment.ready:
            self.delayDisplay("Not run: VoCo's Python packages are not installed (Set-up > Check and install "
                              f"dependencies): {session.state.environment.message}")
            return False
        return True

    def _tinyPackage(self) -> str:
        settings = self.logic.session.client.settings
        package = self.tempDir / "selftest-tiny"
        subprocess.run([settings.engine_python, "-c", _TINY_PACKAGE_SCRIPT, str(package)], check=True,
                       env={**os.environ, **settings.engine_environment()}, timeout=300)
        self.assertTrue((package / "model.json").is_file())
        return str(package)

    def _ball(self):
        import numpy as np

        # 40 x 48 x 56 voxels of 1.5 mm: a bright ball in a noisy background.
        k, j, i = np.mgrid[:40, :48, :56]
        rng = np.random.default_rng(0)
        array = (100 * ((k - 20) ** 2 + (j - 24) ** 2 + (i - 28) ** 2 < 12 ** 2) + rng.normal(0, 5, k.shape))
        return slicer.util.addVolumeFromArray(array.astype(np.int16), ijkToRAS=np.diag([1.5, 1.5, 1.5, 1.0]),
                                              name="VoCoSelfTestBall")

    def test_segment_whole_volume_and_roi(self):
        import numpy as np

        volume = self._ball()
        segmentation = self.logic.process(volume, self.package, device="cpu")
        names = [segmentation.GetSegmentation().GetNthSegment(n).GetName()
                 for n in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, ["bright", "dark"])
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(segmentation, labelmap, volume)
        labels = slicer.util.arrayFromVolume(labelmap)
        self.assertEqual(labels.shape, slicer.util.arrayFromVolume(volume).shape)
        self.assertTrue(set(np.unique(labels)) <= {0, 1, 2})
        self.delayDisplay("Whole volume segmented")

        # A box over the lower corner: nothing may be labelled more than a voxel outside it.
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "VoCoSelfTestROI")
        roi.SetCenter(15.0, 18.0, 12.0)  # RAS mm: x 0..30, y 0..36, z 0..24; the volume spans 0..82.5 x 0..70.5 x 0..58.5
        roi.SetSize(30.0, 36.0, 24.0)
        k, j, i = np.indices(labels.shape)
        farOutside = (i * 1.5 > 31.5) | (j * 1.5 > 37.5) | (k * 1.5 > 25.5)
        restricted = self.logic.process(volume, self.package, device="cpu", roiNode=roi)
        slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(restricted, labelmap, volume)
        labels = slicer.util.arrayFromVolume(labelmap)
        self.assertEqual(labels.shape, farOutside.shape)
        self.assertFalse(labels[farOutside].any(), "voxels outside the ROI were labelled")
        self.delayDisplay("ROI respected")

    def test_cancel_leaves_nothing(self):
        volume = self._ball()
        session = self.logic.session
        before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        job = session.segment(volume, self.package, device="cpu", tta=True)
        session.cancel()
        session.wait_until(lambda: job.finished, 120, slicer.app.processEvents)
        self.assertTrue(job.cancelled)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), before)
        self.assertFalse(job.temp_dir.exists())
        self.delayDisplay("Cancel left no node and no file")
