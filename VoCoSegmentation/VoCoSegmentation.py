"""VoCo Segmentation: segment a volume with a VoCo model, correct it, add it to the training set,
fine-tune the model on the collected cases and see whether its validation Dice improves.

The engine (``python -m voco``) always runs in its own process; this module writes the volume to
a temporary file, shows the job's progress events, and loads the label map as a segmentation.
The work is done by ``VoCoSegmentationLib`` (Qt-free, tested on slicer-core); the classes here
only connect the GUI, the parameter node and that logic.
"""

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

POLL_INTERVAL_MS = 200


def vocoHome() -> Path:
    """Where the module keeps the training set and fine-tuning runs ($VOCO_SLICER_HOME, else ~/VoCo)."""
    return Path(os.environ.get("VOCO_SLICER_HOME") or Path.home() / "VoCo")


#
# VoCoSegmentation
#


class VoCoSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "VoCo Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["VoCo for 3D Slicer developers"]
        self.parent.helpText = """
Segment a volume with a VoCo model (published, imported, or fine-tuned here) on the CPU or a GPU.
The engine runs in a separate process: Slicer stays responsive and <b>Apply</b> turns into
<b>Cancel</b> while it works. Correct the result with Segment Editor, then <b>Add to training set</b>
and <b>Fine-tune</b>: the model list shows each version's validation Dice.
See the <a href="https://github.com/voco-slicer/SlicerVoCo#3d-slicer-extension">documentation</a>.
"""
        self.parent.acknowledgementText = """
Built on VoCo (Wu et al., "VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for
3D Medical Image Analysis", CVPR 2024), MONAI and PyTorch.
"""


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
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None  # the running engine job (segment, fine-tune or import), polled by the timer
        self._models = []  # ModelEntry list behind modelComboBox

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VoCoSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = VoCoSegmentationLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.timeout.connect(self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceSelected)
        self.ui.addToTrainingSetButton.connect("clicked(bool)", self.onAddToTrainingSet)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.progressBar.setVisible(False)

        self.initializeParameterNode()
        self.updateTrainingSetLabel()

    def cleanup(self) -> None:
        self.timer.stop()
        if self._job is not None and not self._job.finished:
            self.logic.cancel(self._job)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        if not self._models:
            import VoCoDependencies

            if VoCoDependencies.torchMissing() or VoCoDependencies.missingRequirements():
                self.ui.statusLabel.text = "VoCo's Python packages are not installed yet: see Set-up below."
            else:
                # First visit: fill the model and device lists (asks the engine's Python; a few seconds).
                qt.QTimer.singleShot(0, self.onRefreshModels)

    def exit(self) -> None:
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
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a SlicerParameterName property in the .ui are bound to the fields of the same name.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.updateButtons()

    # --- GUI state ------------------------------------------------------------------------------

    def _busy(self) -> bool:
        return self._job is not None and not self._job.finished

    def updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        busy = self._busy()
        segmenting = busy and self._job.kind == "segment"
        ready = bool(p and p.inputVolume and p.model)
        self.ui.applyButton.text = "Cancel" if segmenting else "Apply"
        self.ui.applyButton.enabled = segmenting or (ready and not busy)
        self.ui.applyButton.toolTip = ("Stop the segmentation" if segmenting else
                                       "Segment the input volume" if ready else "Select an input volume and a model")
        self.ui.finetuneButton.text = "Cancel fine-tuning" if busy and self._job.kind == "finetune" else "Fine-tune"
        self.ui.finetuneButton.enabled = (busy and self._job.kind == "finetune") or (not busy and bool(p and p.model))
        self.ui.addToTrainingSetButton.enabled = bool(p and p.inputVolume and p.outputSegmentation) and not segmenting
        for widget in (self.ui.modelComboBox, self.ui.refreshModelsButton, self.ui.importModelButton,
                       self.ui.deviceComboBox):
            widget.enabled = not busy

    def updateTrainingSetLabel(self) -> None:
        count = self.logic.trainingSet().count
        self.ui.trainingSetLabel.text = (f"Training set: {count} case{'s' * (count != 1)} in "
                                         f"{self.logic.trainingSet().folder}")

    def _showModels(self, models) -> None:
        self._models = [m for m in models if m.usable]
        wanted = self._parameterNode.model if self._parameterNode else ""
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for entry in self._models:
            self.ui.modelComboBox.addItem(entry.title)
        specs = [m.spec for m in self._models]
        names = [m.name for m in self._models]
        index = specs.index(wanted) if wanted in specs else names.index(wanted) if wanted in names else 0
        self.ui.modelComboBox.currentIndex = index if self._models else -1
        self.ui.modelComboBox.blockSignals(False)
        self.onModelSelected(self.ui.modelComboBox.currentIndex)

        table = self.ui.modelsTableWidget
        table.setRowCount(len(self._models))
        for row, entry in enumerate(self._models):
            dice = f"{entry.dice:.3f}" if entry.dice is not None else "—"
            if entry.previous_dice is not None:
                dice += f" (v{entry.previous_version}: {entry.previous_dice:.3f})"
            for column, text in enumerate((entry.name, str(entry.version), dice)):
                table.setItem(row, column, qt.QTableWidgetItem(text))

    def _showDevices(self, devices, message) -> None:
        wanted = self._parameterNode.device if self._parameterNode else "auto"
        self._devices = devices
        self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.clear()
        for device in devices:
            self.ui.deviceComboBox.addItem(device.title)
        ids = [d.id for d in devices]
        self.ui.deviceComboBox.currentIndex = ids.index(wanted) if wanted in ids else 0
        self.ui.deviceComboBox.blockSignals(False)
        self.onDeviceSelected(self.ui.deviceComboBox.currentIndex)
        self.ui.deviceComboBox.toolTip = message or "Where the engine runs"
        if message:
            self.ui.statusLabel.text = message

    # --- user actions ---------------------------------------------------------------------------

    def onModelSelected(self, index) -> None:
        if self._parameterNode and 0 <= index < len(self._models):
            self._parameterNode.model = self._models[index].spec

    def onDeviceSelected(self, index) -> None:
        devices = getattr(self, "_devices", [])
        if self._parameterNode and 0 <= index < len(devices):
            self._parameterNode.device = devices[index].id

    def onRefreshModels(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to list VoCo models.", waitCursor=True):
            self._showModels(self.logic.models())
            self._showDevices(*self.logic.devices())

    def onInstallDependencies(self) -> None:
        import VoCoDependencies

        with slicer.util.tryWithErrorDisplay("Failed to install VoCo's Python dependencies.", waitCursor=True):
            if VoCoDependencies.ensureDependencies():
                self.ui.dependenciesLabel.text = "All dependencies are installed."
                self.onRefreshModels()

    def _dependenciesReady(self) -> bool:
        import VoCoDependencies

        with slicer.util.tryWithErrorDisplay("Failed to install VoCo's Python dependencies.", waitCursor=True):
            return VoCoDependencies.ensureDependencies()
        return False

    def onApplyButton(self) -> None:
        if self._busy() and self._job.kind == "segment":
            self.ui.statusLabel.text = "cancelling..."
            with slicer.util.tryWithErrorDisplay("Failed to cancel the segmentation.", waitCursor=True):
                self.logic.cancel(self._job)
            self._jobEnded()
            return
        if not self._dependenciesReady():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to start the segmentation.", waitCursor=True):
            self._startJob(self.logic.segment(p.inputVolume, p.model, device=p.device, fast=p.fast, tta=p.tta,
                                              roiNode=p.roi))

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Model package folder")
        if not path:
            path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Model package or checkpoint", "",
                                                  "Models (*.zip *.pt *.pth *.ckpt);;All files (*)")
        if path:
            with slicer.util.tryWithErrorDisplay("Failed to import the model.", waitCursor=True):
                self._startJob(self.logic.importModel(path))

    def onAddToTrainingSet(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to add the case to the training set.", waitCursor=True):
            caseId = self.logic.addToTrainingSet(p.inputVolume, p.outputSegmentation, self._selectedModel())
            self.updateTrainingSetLabel()
            self.ui.statusLabel.text = f"added {caseId} to the training set"
            if p.autoFinetune and self.logic.autoFinetuneDue(p.autoFinetuneEvery) and not self._busy():
                self.ui.statusLabel.text += f"; {self.logic.trainingSet().count} cases: fine-tuning starts"
                self.onFinetune()

    def onFinetune(self) -> None:
        if self._busy() and self._job.kind == "finetune":
            with slicer.util.tryWithErrorDisplay("Failed to cancel fine-tuning.", waitCursor=True):
                self.logic.cancel(self._job)
            self._jobEnded()
            return
        if not self._dependenciesReady():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to start fine-tuning.", waitCursor=True):
            self._startJob(self.logic.finetune(self._selectedModel() or p.model, steps=p.finetuneSteps,
                                               device=p.device))

    def onOpenModelsFolder(self) -> None:
        folder = self.logic.modelsFolder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def _selectedModel(self):
        index = self.ui.modelComboBox.currentIndex
        return self._models[index] if 0 <= index < len(self._models) else None

    # --- the running job ------------------------------------------------------------------------

    def _startJob(self, job) -> None:
        self._job = job
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = job.status
        self.timer.start()
        self.updateButtons()

    def onPoll(self) -> None:
        job = self._job
        if job is None:
            self.timer.stop()
            return
        job.update()
        self.ui.progressBar.value = int(round(100 * job.fraction))
        self.ui.statusLabel.text = job.status
        if job.finished:
            self._jobEnded()

    def _jobEnded(self) -> None:
        self.timer.stop()
        job, self._job = self._job, None
        if job is not None and job.finished and not job.cancelled:
            with slicer.util.tryWithErrorDisplay(f"VoCo {job.kind} failed.", waitCursor=True):
                if job.kind == "segment":
                    node = self.logic.finish(job, outputNode=self._parameterNode.outputSegmentation)
                    self._parameterNode.outputSegmentation = node
                    self.logic.showResult(node, job.volume_node)
                elif not job.succeeded:
                    raise RuntimeError(job.error or f"{job.kind} failed")
                else:
                    self._parameterNode.model = getattr(job, "model_path", None) or self._parameterNode.model
                    self._showModels(self.logic.models())
            self.ui.statusLabel.text = job.status
        elif job is not None and job.cancelled:
            self.ui.statusLabel.text = "cancelled"
        self.ui.progressBar.setVisible(False)
        self.updateButtons()


#
# VoCoSegmentationLogic
#


class VoCoSegmentationLogic(ScriptedLoadableModuleLogic):
    """Thin: delegates to ``VoCoSegmentationLib.SegmentationLogic``, which runs the engine.

    Example (Slicer's Python console)::

        logic = slicer.modules.vocosegmentation.widgetRepresentation().self().logic
        node = logic.process(getNode("MRHead"), "/path/to/model", device="cpu")
    """

    def __init__(self, home=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        import VoCoDependencies
        from VoCoSegmentationLib import SegmentationLogic

        self.home = Path(home) if home else vocoHome()
        engineDir = VoCoDependencies.engineDir()
        self.lib = SegmentationLogic(python=VoCoDependencies.engineInterpreter(),
                                     engine_dir=str(engineDir) if engineDir else None,
                                     runs_folder=self.home / "finetune-runs")

    def getParameterNode(self):
        return VoCoSegmentationParameterNode(super().getParameterNode())

    def trainingSet(self):
        from VoCoSegmentationLib import TrainingSet

        return TrainingSet(self.home / "training-set")

    def modelsFolder(self) -> Path:
        return Path(os.environ.get("VOCO_MODELS_DIR") or Path.home() / ".cache" / "voco" / "models")

    def models(self):
        return self.lib.models()

    def devices(self):
        return self.lib.devices()

    def segment(self, volumeNode, model, device="auto", fast=False, tta=False, roiNode=None):
        return self.lib.segment(volumeNode, model, device=device, fast=fast, tta=tta, roi_node=roiNode)

    def finish(self, job, outputNode=None, timeout=None):
        """The result of a finished segmentation job; with ``outputNode`` its segments replace that
        node's, so a chosen output node keeps its place in the scene (the Lib removes the temporary
        node with its display node)."""
        return self.lib.finish(job, timeout=timeout, output_node=outputNode)

    def cancel(self, job) -> None:
        self.lib.cancel(job)

    def showResult(self, segmentationNode, volumeNode) -> None:
        """Show the volume in the slice views with the segmentation over it, and its 3D surfaces."""
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode:
            displayNode.SetVisibility(True)
            displayNode.SetVisibility3D(True)

    def process(self, volumeNode, model, device="auto", fast=False, tta=False, roiNode=None, timeout=None):
        """Segment and wait (console, tests): returns the segmentation node."""
        return self.finish(self.segment(volumeNode, model, device, fast, tta, roiNode), timeout=timeout)

    def importModel(self, path):
        """Start ``voco models import PATH``: a job like the others (poll it, or ``job.wait()``)."""
        from VoCoSegmentationLib import Job

        process = self.lib.runner_factory(["models", "import", str(path)], **self.lib.runner_options).start()
        return Job(process=process, kind="import", status=f"importing {Path(path).name}")

    def addToTrainingSet(self, volumeNode, segmentationNode, model=None) -> str:
        labels = model.labels if model is not None and getattr(model, "labels", None) else None
        return self.lib.add_to_training_set(self.trainingSet(), volumeNode, segmentationNode, labels=labels)

    def autoFinetuneDue(self, every: int) -> bool:
        count = self.trainingSet().count
        return every > 0 and count > 0 and count % every == 0

    def finetune(self, model, steps=300, device="auto"):
        return self.lib.finetune(self.trainingSet(), model, steps=steps, device=device)


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
    """Segments a small synthetic volume with a tiny model on the CPU (about a minute)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_whole_volume_and_roi()
        self.setUp()
        self.test_cancel_leaves_nothing()

    def _prepare(self):
        import numpy as np

        import VoCoDependencies

        if VoCoDependencies.torchMissing() or VoCoDependencies.missingRequirements():
            self.skipTest("VoCo's dependencies are not installed (Set-up > Check and install dependencies)")
        self.tempDir = Path(tempfile.mkdtemp(prefix="VoCoSegmentationTest-"))
        self.addCleanup(shutil.rmtree, self.tempDir, True)
        package = self.tempDir / "selftest-tiny"
        engineDir = VoCoDependencies.engineDir()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(engineDir or ""),
                                                                        os.environ.get("PYTHONPATH", "")) if p)}
        subprocess.run([VoCoDependencies.engineInterpreter(), "-c", _TINY_PACKAGE_SCRIPT, str(package)], check=True,
                       env=env, timeout=300)
        self.assertTrue((package / "model.json").is_file())

        # 40 x 48 x 56 voxels of 1.5 mm: a bright ball in a noisy background.
        k, j, i = np.mgrid[:40, :48, :56]
        rng = np.random.default_rng(0)
        array = (100 * ((k - 20) ** 2 + (j - 24) ** 2 + (i - 28) ** 2 < 12 ** 2) + rng.normal(0, 5, k.shape))
        volume = slicer.util.addVolumeFromArray(array.astype(np.int16), ijkToRAS=np.diag([1.5, 1.5, 1.5, 1.0]),
                                                name="VoCoSelfTestBall")
        self.delayDisplay("Made a tiny model and a synthetic volume")
        return volume, str(package)

    def test_segment_whole_volume_and_roi(self):
        import numpy as np

        volume, package = self._prepare()
        logic = VoCoSegmentationLogic(home=self.tempDir / "home")
        segmentation = logic.process(volume, package, device="cpu", timeout=600)
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
        restricted = logic.process(volume, package, device="cpu", roiNode=roi, timeout=600)
        slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(restricted, labelmap, volume)
        labels = slicer.util.arrayFromVolume(labelmap)
        self.assertEqual(labels.shape, farOutside.shape)
        self.assertFalse(labels[farOutside].any(), "voxels outside the ROI were labelled")
        self.delayDisplay("ROI respected")

    def test_cancel_leaves_nothing(self):
        volume, package = self._prepare()
        logic = VoCoSegmentationLogic(home=self.tempDir / "home")
        before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        job = logic.segment(volume, package, device="cpu", tta=True)
        logic.cancel(job)
        self.assertTrue(job.cancelled)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), before)
        self.assertFalse(job.temp_dir.exists())
        self.delayDisplay("Cancel left no node and no file")
