"""VoCo Pretrain: pretrain a 3D backbone without labels (VoCo), watch its loss curves, and look at
what it learned: the crop layout of a volume and the predicted positions of target crops.

Runs are folders in a workspace that outlive the module (close Slicer, come back, resume). The
engine (``python -m voco``) runs in its own process. The work is done by ``VoCoPretrainLib``
(Qt-free, tested on slicer-core); the classes here only connect the GUI, the parameter node and
that logic.
"""

import logging
import os
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

POLL_INTERVAL_MS = 500
RUNS_REFRESH_TICKS = 4  # the runs table is re-read every 4 polls (2 s)
PRESETS = ["demo", "v2", "v1", "nnssl"]
BACKBONES = ["swinunetr-tiny", "swinunetr-b", "swinunetr-l", "swinunetr-h", "resencl"]


def vocoHome() -> Path:
    """The folder VoCoSegmentation also uses ($VOCO_SLICER_HOME, else ~/VoCo)."""
    return Path(os.environ.get("VOCO_SLICER_HOME") or Path.home() / "VoCo")


def _pathOrNone(path) -> Path | None:
    """An unset ctkPathLineEdit reads as Path('.'): that means no path."""
    return None if path is None or str(path) in ("", ".") else Path(path)


#
# VoCoPretrain
#


class VoCoPretrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "VoCo Pretrain"
        self.parent.categories = ["Machine Learning"]
        self.parent.dependencies = []
        self.parent.contributors = ["VoCo for 3D Slicer developers"]
        self.parent.helpText = """
Pretrain a 3D network on unlabelled volumes with VoCo (volume contrast): from a folder, a
dataset.json, the volumes in the scene and the cases collected in VoCo Segmentation. Start, stop
and resume runs, follow their loss curves live, show the base/target crop layout on a volume and
the positions a checkpoint predicts for the target crops (heat map in the foreground layer).
See the <a href="https://github.com/voco-slicer/SlicerVoCo#3d-slicer-extension">documentation</a>.
"""
        self.parent.acknowledgementText = """
Built on VoCo (Wu et al., CVPR 2024; VoCo-v2), MONAI and PyTorch.
"""


#
# VoCoPretrainParameterNode
#


@parameterNodeWrapper
class VoCoPretrainParameterNode:
    """GUI state, kept in the scene.

    dataPath - a folder, dataset.json or list file of unlabelled images (optional).
    runsFolder - the workspace: one sub-folder per run.
    selectedRun - the run the curves, Stop/Resume and position predictions refer to (its folder).
    """

    dataPath: Path = Path()
    useSceneVolumes: bool = False
    useSubmittedCases: bool = False
    runsFolder: Path = vocoHome() / "runs"
    runName: str = ""
    preset: Annotated[str, Choice(PRESETS)] = "demo"
    backbone: Annotated[str, Choice(BACKBONES)] = "swinunetr-tiny"
    steps: Annotated[int, WithinRange(1, 10000000)] = 200
    batchSize: Annotated[int, WithinRange(1, 64)] = 1
    device: str = "auto"
    selectedRun: str = ""
    overlayVolume: vtkMRMLScalarVolumeNode
    target: Annotated[int, WithinRange(0, 64)] = 0


#
# VoCoPretrainWidget
#


class VoCoPretrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runs = []  # RunInfo rows behind runsTableWidget
        self._devices = []
        self._ticks = 0

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VoCoPretrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = VoCoPretrainLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.timeout.connect(self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.dataPathLineEdit.filters = ctkPathFilters()
        self.ui.runsFolderPathLineEdit.filters = ctkPathFilters(folders=True)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.refreshRunsButton.connect("clicked(bool)", self.refreshRuns)
        self.ui.runsTableWidget.connect("itemSelectionChanged()", self.onRunSelected)
        self.ui.showCurvesButton.connect("clicked(bool)", self.onShowCurves)
        self.ui.showCropsButton.connect("clicked(bool)", self.onShowCrops)
        self.ui.showPositionsButton.connect("clicked(bool)", self.onShowPositions)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceSelected)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        # Runs keep going when the module is closed: their events are written to their folders.
        self.timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshRuns()
        if not self._devices:
            import VoCoDependencies

            if VoCoDependencies.torchMissing() or VoCoDependencies.missingRequirements():
                self.ui.statusLabel.text = "VoCo's Python packages are not installed yet: see Set-up below."
            else:
                qt.QTimer.singleShot(0, self.refreshDevices)
        self.timer.start()

    def exit(self) -> None:
        self.timer.stop()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.updateButtons()

    # --- GUI state ------------------------------------------------------------------------------

    def _selected(self):
        name = self._parameterNode.selectedRun if self._parameterNode else ""
        return next((run for run in self._runs if run.path == name), None)

    def updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        run = self._selected()
        hasData = bool(p and (_pathOrNone(p.dataPath) or p.useSceneVolumes or p.useSubmittedCases))
        self.ui.startButton.enabled = hasData
        self.ui.startButton.toolTip = "Start a new run" if hasData else "Choose data: a folder, scene volumes or cases"
        self.ui.stopButton.enabled = bool(run and run.state == "running")
        self.ui.resumeButton.enabled = bool(run and run.state in ("stopped", "failed", "done") and run.checkpoint)
        self.ui.showCurvesButton.enabled = run is not None
        self.ui.showCropsButton.enabled = bool(p and p.overlayVolume)
        self.ui.showPositionsButton.enabled = bool(p and p.overlayVolume and run and run.checkpoint
                                                   and run.kind == "pretrain")
        self.ui.dataSummaryLabel.text = self._dataSummary()

    def _dataSummary(self) -> str:
        p = self._parameterNode
        if not p:
            return ""
        parts = []
        if _pathOrNone(p.dataPath):
            parts.append(str(p.dataPath))
        if p.useSceneVolumes:
            parts.append(f"{len(self.logic.sceneVolumes())} scene volume(s)")
        if p.useSubmittedCases:
            parts.append(f"{self.logic.submittedCasesCount()} submitted case(s)")
        return "Data: " + ", ".join(parts) if parts else "No data chosen yet."

    def refreshRuns(self) -> None:
        if self._parameterNode:
            self.logic.setWorkspace(self._parameterNode.runsFolder)
        self._runs = self.logic.listRuns()
        table = self.ui.runsTableWidget
        selected = self._parameterNode.selectedRun if self._parameterNode else ""
        table.blockSignals(True)
        table.setRowCount(len(self._runs))
        for row, run in enumerate(self._runs):
            step = f"{run.step or 0} / {run.total}" if run.total else str(run.step or "")
            loss = f"{run.loss:.4f}" if run.loss is not None else ""
            for column, text in enumerate((run.name, run.state, step, loss)):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(run.message or run.path)
                table.setItem(row, column, item)
            if run.path == selected:
                table.selectRow(row)
        table.blockSignals(False)
        self.updateButtons()

    def refreshDevices(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to ask the engine for devices.", waitCursor=True):
            devices, message = self.logic.devices()
            self._devices = devices
            self.ui.deviceComboBox.blockSignals(True)
            self.ui.deviceComboBox.clear()
            for device in devices:
                self.ui.deviceComboBox.addItem(device.title)
            ids = [d.id for d in devices]
            wanted = self._parameterNode.device if self._parameterNode else "auto"
            self.ui.deviceComboBox.currentIndex = ids.index(wanted) if wanted in ids else 0
            self.ui.deviceComboBox.blockSignals(False)
            self.onDeviceSelected(self.ui.deviceComboBox.currentIndex)
            if message:
                self.ui.statusLabel.text = message

    # --- user actions ---------------------------------------------------------------------------

    def onDeviceSelected(self, index) -> None:
        if self._parameterNode and 0 <= index < len(self._devices):
            self._parameterNode.device = self._devices[index].id

    def onRunSelected(self) -> None:
        rows = sorted({index.row() for index in self.ui.runsTableWidget.selectedIndexes()})
        if rows and rows[0] < len(self._runs) and self._parameterNode:
            self._parameterNode.selectedRun = self._runs[rows[0]].path
            with slicer.util.tryWithErrorDisplay("Failed to load the run's curves."):
                self.logic.curves(self._parameterNode.selectedRun)
        self.updateButtons()

    def onInstallDependencies(self) -> None:
        import VoCoDependencies

        with slicer.util.tryWithErrorDisplay("Failed to install VoCo's Python dependencies.", waitCursor=True):
            if VoCoDependencies.ensureDependencies():
                self.refreshDevices()

    def _dependenciesReady(self) -> bool:
        import VoCoDependencies

        with slicer.util.tryWithErrorDisplay("Failed to install VoCo's Python dependencies.", waitCursor=True):
            return VoCoDependencies.ensureDependencies()
        return False

    def onStart(self) -> None:
        if not self._dependenciesReady():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to start pretraining.", waitCursor=True):
            self.logic.setWorkspace(p.runsFolder)
            data = self.logic.collectData(_pathOrNone(p.dataPath), p.useSceneVolumes, p.useSubmittedCases)
            run = self.logic.start(data, preset=p.preset, backbone=p.backbone, steps=p.steps, batchSize=p.batchSize,
                                   device=p.device, name=p.runName or None)
            p.selectedRun = str(run)
            self.logic.showCurves(run)
            self.ui.statusLabel.text = f"started {Path(run).name}"
            self.refreshRuns()
            self.timer.start()

    def onStop(self) -> None:
        run = self._selected()
        with slicer.util.tryWithErrorDisplay("Failed to stop the run.", waitCursor=True):
            if run and self.logic.stop(run.path):
                self.ui.statusLabel.text = f"stopping {run.name}: it saves a checkpoint first"
            self.refreshRuns()

    def onResume(self) -> None:
        run = self._selected()
        if not run or not self._dependenciesReady():
            return
        with slicer.util.tryWithErrorDisplay("Failed to resume the run.", waitCursor=True):
            steps = self._parameterNode.steps if self._parameterNode.steps > (run.total or 0) else None
            self.logic.resume(run.path, steps=steps)
            self.ui.statusLabel.text = f"resumed {run.name}"
            self.refreshRuns()
            self.timer.start()

    def onShowCurves(self) -> None:
        run = self._selected()
        if run:
            with slicer.util.tryWithErrorDisplay("Failed to show the curves."):
                self.logic.showCurves(run.path)

    def onShowCrops(self) -> None:
        p = self._parameterNode
        if not self._dependenciesReady():
            return
        with slicer.util.tryWithErrorDisplay("Failed to compute the crop layout.", waitCursor=True):
            layout = self.logic.showCropLayout(p.overlayVolume, preset=p.preset)
            self.ui.statusLabel.text = (f"crop layout ({p.preset}): {len(layout.bases)} base crops, "
                                        f"{len(layout.targets)} targets")

    def onShowPositions(self) -> None:
        p = self._parameterNode
        run = self._selected()
        if not run or not self._dependenciesReady():
            return
        with slicer.util.tryWithErrorDisplay("Failed to predict positions.", waitCursor=True):
            nodes = self.logic.showPositions(p.overlayVolume, run.path, target=p.target, device=p.device)
            errors = [t.get("mean_abs_error") for t in nodes.positions.get("targets", [])]
            errors = [e for e in errors if e is not None]
            mean = sum(errors) / len(errors) if errors else float("nan")
            self.ui.positionsLabel.text = (f"{len(errors)} targets, mean absolute overlap error {mean:.3f}; "
                                           f"heat map: target {nodes.heatmap_target}")

    # --- polling --------------------------------------------------------------------------------

    def onPoll(self) -> None:
        try:
            new = self.logic.lib.update_curves()
        except Exception as exc:  # a broken run folder must not stop the timer
            logging.warning(f"VoCo: reading run events failed: {exc}")
            new = {}
        self._ticks += 1
        if new or self._ticks % RUNS_REFRESH_TICKS == 0:
            self.refreshRuns()
        run = self._selected()
        if run is None:
            self.ui.progressBar.value = 0
            return
        total = run.total or 0
        self.ui.progressBar.value = int(100 * (run.step or 0) / total) if total else 0
        status = f"{run.name}: {run.state}"
        if run.step is not None and total:
            status += f", step {run.step} of {total}"
        if run.loss is not None:
            status += f", loss {run.loss:.4f}"
        if run.message:
            status += f" ({run.message})"
        self.ui.statusLabel.text = status


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
    """Thin: delegates to ``VoCoPretrainLib.PretrainLogic`` (runs, curves, overlays).

    Example (Slicer's Python console)::

        logic = VoCoPretrainLogic()
        run = logic.start([getNode("MRHead")], steps=50, device="cpu")
        logic.showCurves(run)
    """

    def __init__(self, workspace=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.setWorkspace(workspace or vocoHome() / "runs")

    def setWorkspace(self, workspace) -> None:
        import VoCoDependencies
        from VoCoPretrainLib.logic import PretrainLogic

        workspace = Path(workspace)
        if getattr(self, "lib", None) is not None and self.lib.workspace == workspace:
            return
        engineDir = VoCoDependencies.engineDir()
        python = VoCoDependencies.engineInterpreter()

        def runner(args):
            from VoCoSegmentationLib.process import EngineProcess

            return EngineProcess(list(args), python=python, engine_dir=str(engineDir) if engineDir else None)

        self.lib = PretrainLogic(workspace, runner_factory=runner)

    def getParameterNode(self):
        return VoCoPretrainParameterNode(super().getParameterNode())

    # --- data -----------------------------------------------------------------------------------

    def sceneVolumes(self) -> list:
        """Scalar volumes of the scene that are images (not VoCo's own heat maps)."""
        nodes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
        # Overlays made by VoCoPretrainLib carry a "VoCo.overlay" attribute; they are results, not data.
        return [n for n in nodes if not n.IsA("vtkMRMLLabelMapVolumeNode") and not n.GetAttribute("VoCo.overlay")]

    def submittedCasesDataset(self) -> Path:
        return vocoHome() / "training-set" / "dataset.json"

    def submittedCasesCount(self) -> int:
        from VoCoSegmentationLib import TrainingSet

        return TrainingSet(self.submittedCasesDataset().parent).count

    def collectData(self, dataPath=None, useSceneVolumes=False, useSubmittedCases=False) -> list:
        data = [str(dataPath)] if dataPath else []
        if useSceneVolumes:
            data += self.sceneVolumes()
        if useSubmittedCases and self.submittedCasesDataset().is_file():
            data.append(str(self.submittedCasesDataset()))
        if not data:
            raise ValueError("no data: choose a folder or dataset.json, scene volumes, or submitted cases")
        return data

    # --- runs -----------------------------------------------------------------------------------

    def devices(self):
        import VoCoDependencies
        from VoCoSegmentationLib import SegmentationLogic

        return SegmentationLogic(python=VoCoDependencies.engineInterpreter()).devices()

    def start(self, data, preset="demo", backbone="swinunetr-tiny", steps=200, batchSize=1, device="auto", name=None):
        """Start pretraining; returns the run folder."""
        return self.lib.start_pretraining(data, preset=preset, backbone=backbone, steps=steps, name=name,
                                          batch_size=batchSize, device=device)

    def stop(self, run) -> bool:
        return self.lib.stop(run)

    def resume(self, run, steps=None):
        return self.lib.resume(run, steps=steps)

    def listRuns(self) -> list:
        return self.lib.list_runs()

    def curves(self, run):
        return self.lib.curves_for(run)

    def showCurves(self, run):
        """Show the run's chart in the layout's plot view."""
        curves = self.lib.curves_for(run)
        slicer.modules.plots.logic().ShowChartInLayout(curves.chart)
        return curves

    # --- overlays -------------------------------------------------------------------------------

    def showCropLayout(self, volumeNode, preset="demo", seed=0):
        """Base-crop labelmap and base/target boxes over the volume (``voco crops``)."""
        layout = self.lib.crop_layout(volumeNode, preset=preset, seed=seed, prefix=f"{volumeNode.GetName()} ")
        slicer.util.setSliceViewerLayers(background=volumeNode, label=layout.labelmap, labelOpacity=0.3, fit=True)
        return layout

    def showPositions(self, volumeNode, run, target=0, device="auto", seed=0):
        """Predicted overlaps of the targets with each base (``voco positions``); the chosen target's
        heat map goes into the foreground layer."""
        nodes = self.lib.position_predictions(volumeNode, run, seed=seed, target=target, device=device,
                                              prefix=f"{volumeNode.GetName()} ")
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=nodes.heatmap,
                                         foregroundOpacity=nodes.display.get("foreground_opacity", 0.5))
        return nodes


#
# VoCoPretrainTest
#


class VoCoPretrainTest(ScriptedLoadableModuleTest):
    """Crop layout on a synthetic volume, a 2-step pretraining run with curves, and position
    predictions from its checkpoint, all on the CPU with the tiny backbone (a few minutes)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_crop_layout_overlay()
        self.setUp()
        self.test_two_step_pretraining_curves_and_positions()

    def _prepare(self):
        import numpy as np

        import VoCoDependencies

        if VoCoDependencies.torchMissing() or VoCoDependencies.missingRequirements():
            self.skipTest("VoCo's dependencies are not installed (Set-up > Check and install dependencies)")
        self.tempDir = Path(tempfile.mkdtemp(prefix="VoCoPretrainTest-"))
        self.addCleanup(shutil.rmtree, self.tempDir, True)
        # 64 x 96 x 96 voxels of 1.5 mm: nested ellipsoids with noise, an image with structure to contrast.
        k, j, i = np.mgrid[:64, :96, :96].astype(np.float32)
        r = ((k - 32) / 28) ** 2 + ((j - 48) / 40) ** 2 + ((i - 48) / 42) ** 2
        array = 300 * (r < 1) + 400 * (r < 0.4) + np.random.default_rng(0).normal(0, 10, r.shape)
        volume = slicer.util.addVolumeFromArray(array.astype(np.int16), ijkToRAS=np.diag([1.5, 1.5, 1.5, 1.0]),
                                                name="VoCoSelfTestPhantom")
        return volume, VoCoPretrainLogic(workspace=self.tempDir / "runs")

    def test_crop_layout_overlay(self):
        import numpy as np

        volume, logic = self._prepare()
        layout = logic.showCropLayout(volume, preset="demo")
        self.assertGreaterEqual(len(layout.bases), 4)
        self.assertGreaterEqual(len(layout.targets), 1)
        labels = slicer.util.arrayFromVolume(layout.labelmap)
        self.assertEqual(labels.shape, slicer.util.arrayFromVolume(volume).shape)
        # Every base crop is painted (value = base index + 1) and nothing else is.
        self.assertEqual(set(np.unique(labels)) - {0}, set(range(1, len(layout.bases) + 1)))
        self.delayDisplay(f"Crop layout: {len(layout.bases)} bases, {len(layout.targets)} targets")

    def test_two_step_pretraining_curves_and_positions(self):
        volume, logic = self._prepare()
        run = logic.start([volume], preset="demo", backbone="swinunetr-tiny", steps=2, device="cpu",
                          name="selftest")
        state = logic.lib.runs.wait(run, timeout=900)
        info = logic.lib.info(run)
        self.assertEqual(state, "done", info.message)
        self.assertEqual(info.step, 2)
        self.assertIsNotNone(info.checkpoint)
        curves = logic.showCurves(run)
        self.assertGreaterEqual(curves.loss_table.GetNumberOfRows(), 1)
        self.assertGreaterEqual(curves.chart.GetNumberOfPlotSeriesNodes(), 1)
        self.delayDisplay("Pretrained 2 steps; curves plotted")

        nodes = logic.showPositions(volume, run, target=0, device="cpu")
        self.assertEqual(slicer.util.arrayFromVolume(nodes.heatmap).shape, slicer.util.arrayFromVolume(volume).shape)
        targets = nodes.positions["targets"]
        self.assertGreaterEqual(len(targets), 1)
        self.assertEqual(nodes.table.GetNumberOfRows(), sum(len(t["true"]) for t in targets))
        self.delayDisplay("Position predictions shown")
