"""VoCo Pretrain: pretrain a 3D backbone without labels (VoCo), watch its loss curves, and look at
what it learned: the crop layout of a volume and the predicted positions of target crops.

Runs are folders of a workspace that outlive the module (close Slicer, come back, resume). The
widget is a view of ``VoCoPretrainLib.session.PretrainSession`` (Qt-free, tested on
slicer-core): handlers read the parameter node and call the session once; ``showState`` shows
what the session decided. The engine (``python -m voco``) runs in its own process.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
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
from VoCoCommonLib.settings import read_settings

UNSUPPORTED = slicer_unsupported_message()  # None on Slicer 5.10+; the Libs need its Python 3.12
if not UNSUPPORTED:
    from VoCoCommonLib import dependencies
    from VoCoPretrainLib.session import POLL_INTERVAL_MS, PretrainSession

PRESETS = ["demo", "v2", "v1", "nnssl"]
BACKBONES = ["swinunetr-tiny", "swinunetr-b", "swinunetr-l", "swinunetr-h", "resencl"]


#
# VoCoPretrain
#


class VoCoPretrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VoCo Pretrain")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Machine Learning")]
        self.parent.dependencies = ["VoCoCommon"]
        self.parent.contributors = ["VoCo for 3D Slicer developers"]
        self.parent.helpText = (UNSUPPORTED or "") + _("""
Pretrain a 3D network on unlabelled volumes with VoCo (volume contrast: a network learns to
predict where a random crop lies in a grid of base crops of the same volume), from a folder, a
dataset.json, the volumes in the scene and the cases collected in VoCo Segmentation. Start, stop
and resume runs (they go on when Slicer closes), follow their loss curves live, show the
base-crop layout on a volume and the positions a checkpoint predicts for the target crops.
Fine-tune a segmentation model from a published VoCo backbone, a pretraining run or a
segmentation model, on the training set or a labelled dataset; the new model appears in
VoCo Segmentation's model list.
See the <a href="https://github.com/voco-slicer/SlicerVoCo#3d-slicer-extension">documentation</a>.
""")
        self.parent.acknowledgementText = acknowledgementText()
        if UNSUPPORTED:
            logging.error(UNSUPPORTED)


#
# VoCoPretrainParameterNode
#


@parameterNodeWrapper
class VoCoPretrainParameterNode:
    """GUI state, kept in the scene.

    dataPath - a folder, dataset.json or list file of unlabelled images ("" when none; a str, since
               Slicer's path connector shows an empty Path as ".").
    runsFolder - the workspace: one sub-folder per run.
    selectedRun - the run the curves, Stop/Resume and position predictions refer to (its folder).
    finetuneInit - what fine-tuning starts from: a spec of the session's ``finetune_starts`` ("": random).
    finetuneDataPath - labelled data for fine-tuning ("": the training set of VoCo Segmentation).
    finetunePatchSize - training patch edge (0: the start's own, e.g. 96 for the VoCo models).
    """

    dataPath: str = ""
    useSceneVolumes: bool = False
    useSubmittedCases: bool = False
    runsFolder: Path = read_settings().runs_dir
    runName: str = ""
    preset: Annotated[str, Choice(PRESETS)] = "demo"
    backbone: Annotated[str, Choice(BACKBONES)] = "swinunetr-tiny"
    steps: Annotated[int, WithinRange(1, 10000000)] = 200
    batchSize: Annotated[int, WithinRange(1, 64)] = 1
    device: str = "auto"
    selectedRun: str = ""
    overlayVolume: vtkMRMLScalarVolumeNode
    target: Annotated[int, WithinRange(0, 64)] = 0
    finetuneInit: str = ""
    finetuneDataPath: str = ""
    finetuneSteps: Annotated[int, WithinRange(1, 10000000)] = 300
    finetunePatchSize: Annotated[int, WithinRange(0, 512)] = 0
    finetuneBatchSize: Annotated[int, WithinRange(1, 64)] = 2
    finetuneName: str = ""


#
# VoCoPretrainWidget
#


class VoCoPretrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.session = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shownRuns = None
        self._shownDevices = None
        self._shownStarts = None
        self._shownLogLines = 0
        self._chartWanted = False   # show the chart in the plot view when the curves are next ready

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if UNSUPPORTED:
            self.layout.addWidget(qt.QLabel(UNSUPPORTED))
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VoCoPretrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = VoCoPretrainLogic()
        self.session = self.logic.session
        self.session.changed.connect(self.showState)
        self.session.errorOccurred.connect(self.onError)
        self.session.overlayReady.connect(self.onOverlayReady)
        self.session.curvesReady.connect(self.onCurvesReady)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.session.tick)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.dataPathLineEdit.filters = ctkPathFilters()
        self.ui.runsFolderPathLineEdit.filters = ctkPathFilters(folders=True)
        self.ui.finetuneDataPathLineEdit.filters = ctkPathFilters()
        self.ui.finetuneDataPathLineEdit.connect("currentPathChanged(QString)", self.onFinetuneDataPathChanged)
        self.ui.finetuneInitComboBox.connect("currentIndexChanged(int)", self.onFinetuneInitSelected)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.dataPathLineEdit.connect("currentPathChanged(QString)", self.onDataPathChanged)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.refreshRunsButton.connect("clicked(bool)", self.onRefreshRuns)
        self.ui.runsTableWidget.connect("itemSelectionChanged()", self.onRunSelected)
        self.ui.showCurvesButton.connect("clicked(bool)", self.onShowCurves)
        self.ui.showCropsButton.connect("clicked(bool)", self.onShowCrops)
        self.ui.showPositionsButton.connect("clicked(bool)", self.onShowPositions)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceSelected)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)

        self.initializeParameterNode()
        self.timer.start()  # runs go on while the module is not shown; their curves stay live

    def cleanup(self) -> None:
        if self.session is None:
            return
        # Runs keep going when the module is closed: their events are written to their folders.
        self.timer.stop()
        self.session.scene_closed()
        self.removeObservers()

    def enter(self) -> None:
        if self.session is None:
            return
        self.initializeParameterNode()
        if self.session.state.environment is None:
            self.session.refresh()  # in the background
        else:  # VoCo Segmentation may have imported or fine-tuned a model meanwhile
            self.session.refresh_models()
            self.session.refresh_runs()

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
        if not self._parameterNode.overlayVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.overlayVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.showState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.showState)
            self.session.set_workspace(self._parameterNode.runsFolder)
            if self._parameterNode.selectedRun and Path(self._parameterNode.selectedRun).is_dir():
                self.session.select(self._parameterNode.selectedRun)
        self.showState()

    # --- showing the session's state ------------------------------------------------------------

    def _data(self) -> tuple:
        p = self._parameterNode
        return (p.dataPath or None, p.useSceneVolumes, p.useSubmittedCases) if p else (None, False, False)

    def showState(self, caller=None, event=None) -> None:
        p, state = self._parameterNode, self.session.state
        if p and Path(p.runsFolder).expanduser().absolute() != self.session.runs.workspace:
            self.session.set_workspace(p.runsFolder)
        if p and self.ui.dataPathLineEdit.currentPath != p.dataPath:
            self.ui.dataPathLineEdit.currentPath = p.dataPath
        if p and self.ui.finetuneDataPathLineEdit.currentPath != p.finetuneDataPath:
            self.ui.finetuneDataPathLineEdit.currentPath = p.finetuneDataPath
        data = self._data()
        buttons = self.session.buttons(has_data=any(data), volume_node=p.overlayVolume if p else None,
                                       finetune_data=p.finetuneDataPath if p else None)
        for widget, button in ((self.ui.startButton, buttons.start), (self.ui.stopButton, buttons.stop),
                               (self.ui.resumeButton, buttons.resume), (self.ui.showCurvesButton, buttons.curves),
                               (self.ui.showCropsButton, buttons.crops),
                               (self.ui.showPositionsButton, buttons.positions),
                               (self.ui.finetuneButton, buttons.finetune)):
            widget.enabled = button.enabled
            widget.toolTip = button.tooltip
        self.ui.dataSummaryLabel.text = self.session.data_summary(*data)
        self.ui.progressBar.value = int(round(100 * state.fraction))
        self.ui.statusLabel.text = state.status
        self.ui.positionsLabel.text = state.overlay_status
        self.ui.finetuneDataSummaryLabel.text = self.session.finetune_data_summary(p.finetuneDataPath if p else None)
        self._showRuns(state.runs, state.selected)
        self._showDevices(state.devices)
        self._showStarts(self.session.finetune_starts())
        self._shownLogLines = showLog(self.ui.logTextEdit, self.session.log, self._shownLogLines)

    def _showRuns(self, runs, selected) -> None:
        rows = [(r.path, r.name, r.state, f"{r.step or 0} / {r.total}" if r.total else str(r.step or ""),
                 f"{r.loss:.4f}" if r.loss is not None else "", r.message or r.path) for r in runs]
        if (rows, selected) == self._shownRuns:
            return
        self._shownRuns = (rows, selected)
        table = self.ui.runsTableWidget
        table.blockSignals(True)
        table.setRowCount(len(rows))
        for row, (path, *texts, tip) in enumerate(rows):
            for column, text in enumerate(texts):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(tip)
                table.setItem(row, column, item)
            if path == selected:
                table.selectRow(row)
        table.blockSignals(False)

    def _showDevices(self, devices) -> None:
        shown = [(d.id, d.title) for d in devices]
        if shown == self._shownDevices or not shown:
            return
        self._shownDevices = shown
        self.onDeviceSelected(showChoices(self.ui.deviceComboBox, shown, self._parameterNode.device
                                          if self._parameterNode else "auto"))

    def _showStarts(self, starts) -> None:
        if starts == self._shownStarts:
            return
        self._shownStarts = starts
        self.onFinetuneInitSelected(showChoices(self.ui.finetuneInitComboBox, starts, self._parameterNode.finetuneInit
                                                if self._parameterNode else ""))

    # --- user actions ---------------------------------------------------------------------------

    def onDataPathChanged(self, path) -> None:
        if self._parameterNode:
            self._parameterNode.dataPath = "" if path in ("", ".") else path

    def onFinetuneDataPathChanged(self, path) -> None:
        if self._parameterNode:
            self._parameterNode.finetuneDataPath = "" if path in ("", ".") else path

    def onFinetuneInitSelected(self, index) -> None:
        starts = self._shownStarts or []
        if self._parameterNode and 0 <= index < len(starts):
            self._parameterNode.finetuneInit = starts[index][0]

    def onFinetune(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start fine-tuning.")):
            run = self.session.start_finetuning(p.finetuneInit, data=p.finetuneDataPath or None, steps=p.finetuneSteps,
                                                device=p.device, name=p.finetuneName or None,
                                                patch_size=p.finetunePatchSize or None,
                                                batch_size=p.finetuneBatchSize)
            p.selectedRun = str(run)
            self._chartWanted = True

    def onDeviceSelected(self, index) -> None:
        devices = self.session.state.devices
        if self._parameterNode and 0 <= index < len(devices):
            self._parameterNode.device = devices[index].id

    def onRefreshRuns(self) -> None:
        self.session.refresh_runs()

    def onRunSelected(self) -> None:
        rows = sorted({index.row() for index in self.ui.runsTableWidget.selectedIndexes()})
        runs = self.session.state.runs
        if rows and rows[0] < len(runs) and self._parameterNode:
            self._parameterNode.selectedRun = runs[rows[0]].path
            self.session.select(runs[rows[0]].path)

    def onStart(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start pretraining.")):
            data = self.session.collect_data(*self._data())
            run = self.session.start(data, preset=p.preset, backbone=p.backbone, steps=p.steps, batch_size=p.batchSize,
                                     device=p.device, name=p.runName or None)
            p.selectedRun = str(run)
            self._chartWanted = True

    def onStop(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to stop the run.")):
            self.session.stop()

    def onResume(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to resume the run.")):
            self.session.resume(steps=self._parameterNode.steps, device=self._parameterNode.device)

    def onShowCurves(self) -> None:
        self._chartWanted = True
        if self.session.curves is not None and self.session.curves.in_scene():
            self.onCurvesReady(self.session.curves)

    def onShowCrops(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the crop layout.")):
            self.session.crop_layout(p.overlayVolume, preset=p.preset)

    def onShowPositions(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to predict positions.")):
            self.session.positions(p.overlayVolume, target=p.target, device=p.device)

    def onInstallDependencies(self) -> None:
        environment = self.session.state.environment
        with slicer.util.tryWithErrorDisplay(_("Failed to install VoCo's Python dependencies."), waitCursor=True):
            if environment is not None and dependencies.install(environment.missing):
                self.session.refresh()

    # --- what the session reports ---------------------------------------------------------------

    def onCurvesReady(self, curves) -> None:
        if self._chartWanted:
            self._chartWanted = False
            self.logic.showCurves(curves)

    def onOverlayReady(self, kind, nodes, volumeNode) -> None:
        self.logic.showOverlay(kind, nodes, volumeNode)

    def onError(self, message) -> None:
        slicer.util.errorDisplay(f"VoCo: {message}")


def ctkPathFilters(folders=False):
    """ctkPathLineEdit filters: existing folders only, or existing files and folders."""
    import ctk

    if folders:
        return ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Drives
    return ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Readable


#
# VoCoPretrainLogic
#


class VoCoPretrainLogic(ScriptedLoadableModuleLogic):
    """The module's session and how its results are shown in Slicer's views.

    Example (Slicer's Python console)::

        logic = slicer.modules.vocopretrain.widgetRepresentation().self().logic
        run = logic.session.start([getNode("MRHead")], steps=50, device="cpu")
    """

    def __init__(self, session=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = session or PretrainSession()

    def getParameterNode(self):
        return VoCoPretrainParameterNode(super().getParameterNode())

    def showCurves(self, curves) -> None:
        """The run's chart in the layout's plot view."""
        slicer.modules.plots.logic().ShowChartInLayout(curves.chart)

    def showOverlay(self, kind, nodes, volumeNode) -> None:
        """Crop layout: the base-index labelmap over the volume; positions: the heat map in front."""
        if kind == "crops":
            slicer.util.setSliceViewerLayers(background=volumeNode, label=nodes.labelmap, labelOpacity=0.3, fit=True)
        else:
            slicer.util.setSliceViewerLayers(background=volumeNode, foreground=nodes.heatmap,
                                             foregroundOpacity=nodes.display.get("foreground_opacity", 0.5))


#
# VoCoPretrainTest
#


class VoCoPretrainTest(ScriptedLoadableModuleTest):
    """Crop layout on a synthetic volume, a 2-step pretraining run with curves, and position
    predictions from its checkpoint, all on the CPU with the tiny backbone (a few minutes).

    Slicer's Reload and Test calls ``runTest`` directly, outside unittest: the test says why it
    does not run instead of skipping, and cleans up in ``finally``."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if UNSUPPORTED:
            self.delayDisplay(f"Not run: {UNSUPPORTED}")
            return
        self.tempDir = Path(tempfile.mkdtemp(prefix="VoCoPretrainTest-"))
        try:
            self.logic = VoCoPretrainLogic()
            self.logic.session.set_workspace(self.tempDir / "runs")
            self.logic.session.refresh()
            self.logic.session.wait_until(lambda: self.logic.session.state.environment is not None, 300,
                                          slicer.app.processEvents)
            environment = self.logic.session.state.environment
            if not environment.ready:
                self.delayDisplay("Not run: VoCo's Python packages are not installed (Set-up > Check and install "
                                  f"dependencies): {environment.message}")
                return
            self.setUp()
            self.test_crop_layout_overlay()
            self.setUp()
            self.test_two_step_pretraining_curves_and_positions()
        finally:
            shutil.rmtree(self.tempDir, ignore_errors=True)

    def _phantom(self):
        import numpy as np

        # 64 x 96 x 96 voxels of 1.5 mm: nested ellipsoids with noise, an image with structure to contrast.
        k, j, i = np.mgrid[:64, :96, :96].astype(np.float32)
        r = ((k - 32) / 28) ** 2 + ((j - 48) / 40) ** 2 + ((i - 48) / 42) ** 2
        array = 300 * (r < 1) + 400 * (r < 0.4) + np.random.default_rng(0).normal(0, 10, r.shape)
        return slicer.util.addVolumeFromArray(array.astype(np.int16), ijkToRAS=np.diag([1.5, 1.5, 1.5, 1.0]),
                                              name="VoCoSelfTestPhantom")

    def _overlay(self, start):
        shown = []
        self.logic.session.overlayReady.connect(lambda kind, nodes, volume: shown.append(nodes))
        job = start()
        self.logic.session.wait_until(lambda: job.finished, 900, slicer.app.processEvents)
        self.assertTrue(job.succeeded, job.error)
        self.logic.showOverlay(job.kind, job.nodes, job.volume_node)
        return job.nodes

    def test_crop_layout_overlay(self):
        import numpy as np

        volume = self._phantom()
        layout = self._overlay(lambda: self.logic.session.crop_layout(volume, preset="demo"))
        self.assertGreaterEqual(len(layout.bases), 4)
        self.assertGreaterEqual(len(layout.targets), 1)
        labels = slicer.util.arrayFromVolume(layout.labelmap)
        self.assertEqual(labels.shape, slicer.util.arrayFromVolume(volume).shape)
        # Every base crop is painted (value = base index + 1) and nothing else is.
        self.assertEqual(set(np.unique(labels)) - {0}, set(range(1, len(layout.bases) + 1)))
        self.delayDisplay(f"Crop layout: {len(layout.bases)} bases, {len(layout.targets)} targets")

    def test_two_step_pretraining_curves_and_positions(self):
        volume = self._phantom()
        session = self.logic.session
        run = session.start([volume], preset="demo", backbone="swinunetr-tiny", steps=2, device="cpu",
                            name="selftest")
        session.wait_until(lambda: session.state.run(run) is not None and session.state.run(run).state != "running"
                           and session.state.job is None, 900, slicer.app.processEvents)
        info = session.state.run(run)
        self.assertEqual(info.state, "done", info.message)
        self.assertEqual(info.step, 2)
        self.assertIsNotNone(info.checkpoint)
        session.wait_until(lambda: session.curves is not None and session.curves.loss_table.GetNumberOfRows() >= 1, 60,
                           slicer.app.processEvents)
        self.assertGreaterEqual(session.curves.chart.GetNumberOfPlotSeriesNodes(), 1)
        self.logic.showCurves(session.curves)
        self.delayDisplay("Pretrained 2 steps; curves plotted")

        nodes = self._overlay(lambda: session.positions(volume, run, target=0, device="cpu"))
        self.assertEqual(slicer.util.arrayFromVolume(nodes.heatmap).shape, slicer.util.arrayFromVolume(volume).shape)
        targets = nodes.positions["targets"]
        self.assertGreaterEqual(len(targets), 1)
        self.assertEqual(nodes.table.GetNumberOfRows(), sum(len(t["true"]) for t in targets))
        self.delayDisplay("Position predictions shown")
