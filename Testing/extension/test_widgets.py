"""The modules' own widget code, run on Qt (PySide6 behind a PythonQt-compatible ``qt``), real MRML
and the real engine, with stand-ins only for the CTK/qMRML widget classes and the Slicer
application (slicer_application.py). Every handler runs at least once, through the buttons'
and timers' own signals, and the UI ends idle. Every call on the GUI thread is timed: none may
cost it 50 ms of CPU or hold it 0.5 s (the one exception, Show 3D, is Slicer's own surface
conversion the user asks for; it is measured and reported)."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from phantoms import oblique_affine, sphere_image
from slicer_fixtures import REPO

GUI_CPU_BUDGET_S, GUI_WALL_BUDGET_S = 0.05, 0.5
# Slicer's own work the user asked for: the closed-surface conversion of Show 3D, and reading a
# sample volume the user clicked in SampleData (Slicer loads its own samples on the GUI thread too).
USER_ASKED_FOR_SLOW = {"VoCoSegmentationWidget.onShowIn3D", "downloadSample.<locals>.load"}


def wait_for(condition, timeout=300.0, what=""):
    import pythonqt

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        pythonqt.process_events(0.1)


def click(button):
    button.click()
    import pythonqt

    pythonqt.process_events()


def assert_gui_budget(report):
    import pythonqt

    calls = [c for c in pythonqt.CLOCK.calls if c.label not in USER_ASKED_FOR_SLOW]
    longest = max(calls, key=lambda c: c.cpu_s)
    slowest = max(calls, key=lambda c: c.wall_s)
    report.update(calls=len(pythonqt.CLOCK.calls), longest=longest, slowest=slowest,
                  asked_for=[c for c in pythonqt.CLOCK.calls if c.label in USER_ASKED_FOR_SLOW])
    print(f"\nGUI thread: {len(calls)} calls; most CPU {longest}; longest wall {slowest}; "
          f"asked for by the user: {report['asked_for']}")
    assert longest.cpu_s < GUI_CPU_BUDGET_S, longest
    assert slowest.wall_s < GUI_WALL_BUDGET_S, slowest


@pytest.fixture
def engine_env(monkeypatch, engine, home):
    monkeypatch.setenv("VOCO_ENGINE_PYTHON", engine.python)
    return home


def widget_of(module_name):
    import pythonqt
    import slicer_application

    python_module, _ = slicer_application.load_module(module_name)
    gc.collect()  # an earlier test's garbage is not this panel's cost: collect it before the clock runs
    widget = pythonqt.CLOCK.measure(f"{module_name}Widget.setup", slicer_application.make_widget, python_module,
                                    module_name)
    widget.parent.isEntered = True
    pythonqt.CLOCK.measure(f"{module_name}Widget.enter", widget.enter)
    return python_module, widget


def sphere_volume(shape=(48, 40, 20), name="sphere"):
    import slicer

    affine = oblique_affine(shape=shape)
    data = sphere_image(affine, shape)
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.float32), affine,
                                          name)


def idle_segmentation_ui(widget) -> dict:
    ui = widget.ui
    return {"apply": ui.applyButton.text, "progress": ui.progressBar.visible, "busy": widget.session.busy,
            "choose": ui.modelComboBox.enabled}


IDLE = {"apply": "Apply", "progress": False, "busy": False, "choose": True}


# --- VoCo Segmentation -------------------------------------------------------------------------------

def test_segmentation_widget_runs_every_handler_and_ends_idle(slicer_gui, engine_env, engine, tmp_path,
                                                              monkeypatch, caplog):
    import pythonqt
    import slicer
    import slicer_application

    caplog.set_level(logging.ERROR)
    empty = tmp_path / "registry.json"  # the published models are the first-run test's
    empty.write_text('{"format": "voco-registry", "format_version": 1, "models": []}')
    monkeypatch.setenv("VOCO_REGISTRY", str(empty))
    toy = engine.toy(tmp_path / "toy").parent
    organs = engine.package(tmp_path / "organs", "organs", [{"value": 1, "name": "sphere", "color": "#ff0000"}],
                            {"mean_val_dice": 0.4})
    monkeypatch.setenv("VOCO_TEST_TOY", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(toy / "site"), os.environ.get("PYTHONPATH")) if p))
    volume = sphere_volume()
    python_module, widget = widget_of("VoCoSegmentation")
    ui, session = widget.ui, widget.session
    assert widget._parameterNode.inputVolume is volume  # the first volume of the scene
    assert not ui.applyButton.enabled and "checking" in ui.applyButton.toolTip  # the probe runs in the background
    wait_for(lambda: session.state.environment is not None and not session.state.models_loading, what="the probe")
    assert ui.deviceComboBox.count >= 2 and not ui.applyButton.enabled  # no segmentation model yet

    # Import: one file dialog (a package's model.json, a .zip or a checkpoint), no folder dialog first
    pythonqt.FileDialogs.answers = [str(toy / "package" / "model.json")]
    click(ui.importModelButton)
    assert [kind for kind, *_ in pythonqt.FileDialogs.opened] == ["getOpenFileName"]
    wait_for(lambda: ui.modelComboBox.count == 1, what="the imported model")
    assert ui.modelComboBox.currentText.startswith("sphere-model v1")
    assert widget._parameterNode.model == session.state.segmentation_models[0].spec
    ui.deviceComboBox.currentIndex = ui.deviceComboBox.count - 1  # the CPU
    assert widget._parameterNode.device == "cpu"

    # Apply: the result is shown and becomes the output segmentation
    assert ui.applyButton.enabled
    click(ui.applyButton)
    assert ui.applyButton.text == "Cancel" and ui.progressBar.visible and not ui.modelComboBox.enabled
    wait_for(lambda: not session.busy, what="the segmentation")
    output = widget._parameterNode.outputSegmentation
    assert output is not None and output.GetName() == "sphere sphere-model v1"
    assert ui.statusLabel.text == "done: sphere sphere-model v1" and idle_segmentation_ui(widget) == IDLE
    assert ("setSliceViewerLayers", ["background", "fit"]) in slicer_application.DISPLAYED
    click(ui.showIn3DButton)
    assert output.GetSegmentation().ContainsRepresentation("Closed surface")

    # Apply again into the chosen output, then Cancel while it runs
    monkeypatch.setenv("VOCO_TEST_SLOW", "1")
    session.client.close()  # the warm engine took its environment at start: the next job starts a slow one
    big = sphere_volume((120, 120, 40), "big")
    ui.inputVolumeSelector.setCurrentNode(big)
    assert widget._parameterNode.inputVolume is big
    click(ui.applyButton)
    wait_for(lambda: session.history[-1].events, what="the engine's first event")
    click(ui.applyButton)  # now Cancel
    wait_for(lambda: not session.busy, what="the cancelled segmentation")
    assert ui.statusLabel.text == "cancelled" and idle_segmentation_ui(widget) == IDLE
    monkeypatch.delenv("VOCO_TEST_SLOW")
    session.client.close()  # and the next one a quick one again

    # a job that fails leaves the module idle, its message shown
    widget._parameterNode.model = "no-such-model"
    click(ui.applyButton)
    wait_for(lambda: not session.busy, what="the failing segmentation")
    assert ui.statusLabel.text.startswith("error:") and "no-such-model" in ui.statusLabel.text
    assert any("no-such-model" in r.getMessage() for r in caplog.records)  # errorDisplay (logged in testing mode)
    assert idle_segmentation_ui(widget) == IDLE and ui.applyButton.enabled

    # closing the scene during a job cancels it; nothing is added to the new scene
    monkeypatch.setenv("VOCO_TEST_SLOW", "1")
    session.client.close()
    widget._parameterNode.model = session.state.segmentation_models[0].spec
    widget._parameterNode.inputVolume = big
    click(ui.applyButton)
    wait_for(lambda: session.history[-1].events, what="the engine's first event")
    slicer.mrmlScene.Clear(False)
    wait_for(lambda: not session.busy, what="the job of the closed scene")
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert idle_segmentation_ui(widget) == IDLE
    monkeypatch.delenv("VOCO_TEST_SLOW")
    session.client.close()  # and the next one a quick one again

    # the clinician loop: add the corrected case, fine-tune the real tiny model, stop it
    volume = sphere_volume()
    pythonqt.FileDialogs.answers = [str(organs / "model.json")]
    click(ui.importModelButton)
    wait_for(lambda: ui.modelComboBox.count == 2, what="the second model")
    ui.modelComboBox.currentIndex = [m.name for m in session.state.segmentation_models].index("organs")
    widget._parameterNode.inputVolume = volume
    click(ui.applyButton)
    wait_for(lambda: not session.busy, what="the organs segmentation")
    assert widget._parameterNode.outputSegmentation is not None and ui.addToTrainingSetButton.enabled
    click(ui.addToTrainingSetButton)
    wait_for(lambda: not session.busy, what="the case to be written")
    assert ui.trainingSetLabel.text.startswith("Training set: 1 case(s) in ")
    widget._parameterNode.finetuneSteps = 2
    click(ui.finetuneButton)
    assert ui.finetuneButton.text == "Stop fine-tuning"
    click(ui.finetuneButton)  # Stop: the run saves what it has and stops
    wait_for(lambda: session.state.finetuning is None, what="the stopped fine-tuning run")
    assert ui.finetuneButton.text == "Fine-tune" and "fine-tuning stopped" in ui.statusLabel.text

    # the versions table: what each version was measured to do; roll back to the selected row
    table = ui.modelsTableWidget
    assert [table.horizontalHeaderItem(c).text() for c in range(table.columnCount)] == [
        "Model", "Version", "Dice on unseen cases", "Validation Dice", "Note"]
    organs_row = [table.item(r, 0).text() for r in range(table.rowCount)].index("organs")
    assert table.item(organs_row, 2).text().endswith("(n=1)")  # scored on the case it made, before training on it
    assert table.item(organs_row, 3).text() == "0.400" and table.item(organs_row, 4).text() == "current"
    version_2 = tmp_path / "sphere-model-2"
    shutil.copytree(toy / "package", version_2)
    card = json.loads((version_2 / "model.json").read_text())
    (version_2 / "model.json").write_text(json.dumps({**card, "version": "2"}))
    pythonqt.FileDialogs.answers = [str(version_2 / "model.json")]
    click(ui.importModelButton)
    wait_for(lambda: table.rowCount == 3, what="sphere-model v2 in the table")
    rows = [(table.item(r, 0).text(), table.item(r, 1).text(), table.item(r, 4).text()) for r in range(3)]
    assert rows == [("organs", "1", "current"), ("sphere-model", "1", ""), ("sphere-model", "2", "current")]
    table.selectRow(2)
    assert not ui.rollBackButton.enabled and "current version" in ui.rollBackButton.toolTip
    table.selectRow(1)
    assert ui.rollBackButton.enabled
    click(ui.rollBackButton)
    assert ui.statusLabel.text == "sphere-model v1 is the current version; v2 kept"
    assert widget._parameterNode.model == session.versions("sphere-model")[0].spec  # selected for segmentation
    assert ui.modelComboBox.currentText.startswith("sphere-model v1") and table.item(1, 4).text() == "current"

    click(ui.refreshModelsButton)
    wait_for(lambda: not session.state.models_loading, what="the model list")
    click(ui.installDependenciesButton)
    assert ui.dependenciesLabel.text == "All dependencies are installed."
    click(ui.openModelsFolderButton)
    assert pythonqt.DesktopServices.opened[-1] == str(engine_env.parent / "models")
    pythonqt.CLOCK.measure("VoCoSegmentationWidget.exit", widget.exit)
    pythonqt.CLOCK.measure("VoCoSegmentationWidget.cleanup", widget.cleanup)
    assert idle_segmentation_ui(widget) == IDLE
    assert [label for label, _ in pythonqt.CLOCK.errors] == []
    report = {}
    assert_gui_budget(report)


# --- a new user's first run ----------------------------------------------------------------------------

VOCOMNI_NAMES = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
                 "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland",
                 "left adrenal gland", "liver tumor", "pancreas tumor", "kidney tumor", "COVID-19 lesion", "colon",
                 "colon cancer", "lung cancer"]


def combo_items(combo) -> list[str]:
    return [combo.itemText(i) for i in range(combo.count)]


def test_a_new_users_first_run_segments_a_ct_with_vocomni_then_fine_tunes_it(slicer_gui, engine_env, engine, shipped,
                                                                            tmp_path, monkeypatch):
    """Enter VoCo Segmentation with nothing installed -> the published models are listed -> import
    VoComni_B.pt (offline) -> segment the real spine CT -> correct a segment -> add the case ->
    fine-tune vocomni-b in VoCo Pretrain -> the new version is in VoCo Segmentation's list."""
    import pythonqt
    import slicer

    checkpoint = engine.vocomni(tmp_path / "published")  # as published, but for its values
    monkeypatch.setenv("VOCO_REGISTRY", str(checkpoint.parent / "models.json"))
    ct = slicer.util.loadVolume(str(shipped["spine-ct"]), {"name": "spine CT"})
    hierarchy = slicer.mrmlScene.GetSubjectHierarchyNode()
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient"), "study")
    hierarchy.CreateItem(study, ct)  # Slicer's subject hierarchy plugins do this for a loaded DICOM series

    _, widget = widget_of("VoCoSegmentation")
    ui, session, p = widget.ui, widget.session, widget._parameterNode
    wait_for(lambda: session.state.environment is not None and not session.state.models_loading, what="the models")
    assert combo_items(ui.modelComboBox) == ["vocomni-b v1.0 — will download 299 MB",
                                             "vocomni-h v1.0 — will download 4651 MB",
                                             "vocomni-l v1.0 — will download 1169 MB"]
    assert p.inputVolume is ct and p.model == "vocomni-b" and ui.applyButton.enabled  # ready at once

    pythonqt.FileDialogs.answers = [str(checkpoint)]
    click(ui.importModelButton)
    wait_for(lambda: not session.busy and not session.state.models_loading and
             ui.modelComboBox.currentText == "vocomni-b v1.0", what="the imported VoComni_B.pt")
    assert p.model == str(engine_env.parent / "models" / "vocomni-b" / "1.0")  # the installed package
    ui.deviceComboBox.currentIndex = ui.deviceComboBox.count - 1  # the CPU
    click(ui.applyButton)
    wait_for(lambda: not session.busy, timeout=900, what="the VoComni segmentation")
    result = p.outputSegmentation
    assert result is not None, ui.statusLabel.text
    segmentation = result.GetSegmentation()
    segments = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
    assert [segment.GetName() for segment in segments] == VOCOMNI_NAMES
    assert segments[2].GetTerminology().split("~")[2:4] == ["SCT^64033007^Kidney", "SCT^7771000^Left"]
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(result)) == study  # beside the CT, in its study
    log = ui.logTextEdit.toPlainText().splitlines()  # the engine's events in the log
    assert any(" segment: start " in line and "model=vocomni-b" in line for line in log), log

    # the clinician corrects the liver (a box of it) and adds the case
    liver = segmentation.GetSegmentIdBySegmentName("liver")
    corrected = np.zeros(slicer.util.arrayFromVolume(ct).shape, np.uint8)
    corrected[20:50, 10:30, 20:50] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected, result, liver, ct)
    click(ui.addToTrainingSetButton)
    wait_for(lambda: not session.busy, what="the case")
    assert session.state.training_set_count == 1

    # VoCo Pretrain fine-tunes vocomni-b on the training set; the new version joins the list
    _, pretrain = widget_of("VoCoPretrain")
    pre_ui, pre_session, pre_p = pretrain.ui, pretrain.session, pretrain._parameterNode
    wait_for(lambda: pre_session.state.environment is not None and pre_session.state.models, what="its model list")
    starts = combo_items(pre_ui.finetuneInitComboBox)
    assert starts[:3] == ["voco-b v1.0 — published backbone (will download)",
                          "voco-h v1.0 — published backbone (will download)",
                          "voco-l v1.0 — published backbone (will download)"]
    assert starts[-1] == "random initialisation (from scratch)"
    assert pre_ui.finetuneDataSummaryLabel.text.startswith("Labelled data: the training set (1 case(s)")
    pre_ui.finetuneInitComboBox.currentIndex = starts.index("vocomni-b v1.0")
    assert pre_p.finetuneInit == p.model
    pre_ui.deviceComboBox.currentIndex = pre_ui.deviceComboBox.count - 1
    pre_p.finetuneSteps, pre_p.finetunePatchSize, pre_p.finetuneBatchSize = 1, 64, 1  # a CPU-sized budget
    ready = []
    pre_session.modelReady.connect(ready.append)
    click(pre_ui.finetuneButton)
    wait_for(lambda: ready, timeout=900, what="the fine-tuned model")
    assert pre_session.state.run().name.startswith("vocomni-b-") and pre_session.state.run().state == "done"

    pythonqt.CLOCK.measure("VoCoSegmentationWidget.exit", widget.exit)
    pythonqt.CLOCK.measure("VoCoSegmentationWidget.enter", widget.enter)
    wait_for(lambda: not session.state.models_loading and len(session.versions("vocomni-b")) == 2,
             what="the new version in the list")
    newer = session.versions("vocomni-b")[-1]
    assert (newer.version, newer.parent_version) == ("2", "1.0")
    # one case: its Dice is on the case it trained on, and says so
    assert any(text.startswith("vocomni-b v2 — Dice on its training cases ") for text in combo_items(ui.modelComboBox))
    for module in (widget, pretrain):
        pythonqt.CLOCK.measure("cleanup", module.cleanup)
    assert [label for label, _ in pythonqt.CLOCK.errors] == []
    assert_gui_budget({})


# --- what Slicer itself shows of the modules ---------------------------------------------------------

def test_module_texts_go_through_slicers_translation(slicer_gui):
    import slicer
    import slicer_application

    for name in ("VoCoCommon", "VoCoSegmentation", "VoCoPretrain"):
        slicer_application.load_module(name)
    translated = set(slicer.app.translated)
    assert {("VoCoSegmentation", "VoCo Segmentation"), ("VoCoPretrain", "VoCo Pretrain"),
            ("qSlicerAbstractCoreModule", "Segmentation"), ("qSlicerAbstractCoreModule", "Machine Learning")} <= translated
    assert any(context == "VoCoCommon" and "Please cite VoCo" in text for context, text in translated)
    assert slicer.modules.vocosegmentation.acknowledgementText == slicer.modules.vocopretrain.acknowledgementText


def test_the_sample_volumes_are_offered_in_sample_data_and_the_engine_fetches_them(slicer_gui, engine_env, shipped):
    import types

    import SampleData
    import slicer
    import slicer_application

    python_module, _ = slicer_application.load_module("VoCoCommon")
    for slot in slicer.app.connections["startupCompleted()"]:  # as Slicer calls them once it is up
        slot()
    sources = SampleData.SampleDataLogic.sources["VoCo"]
    assert [source["sampleName"] for source in sources] == ["Spine CT (TPTBox)", "Spine T2w MRI (TPTBox)",
                                                             "MNI152 T1 template (nilearn)"]
    clicked = types.SimpleNamespace(**sources[0])  # what the SampleData button hands its downloader
    job = pythonqt_measure("downloadSample", python_module.downloadSample, clicked)
    wait_for(lambda: getattr(job, "node", None) is not None, what="the spine CT")
    assert job.node.GetName() == "SpineCT" and job.node.GetImageData().GetDimensions() == (73, 47, 73)
    assert_gui_budget({})


def pythonqt_measure(label, function, *args):
    import pythonqt

    return pythonqt.CLOCK.measure(label, function, *args)


# --- VoCo Pretrain ------------------------------------------------------------------------------------

def test_pretrain_widget_runs_every_handler_and_ends_idle(slicer_gui, engine_env, shipped, tmp_path):
    import pythonqt
    import slicer
    import slicer_application

    from test_pretrain_session import load_image

    volume = load_image(shipped["spine-mri"], "spine MRI")
    python_module, widget = widget_of("VoCoPretrain")
    ui, session, p = widget.ui, widget.session, widget._parameterNode
    # an unset data path reads as nothing, not "."
    assert ui.dataPathLineEdit.currentPath == "" and p.dataPath == ""
    assert ui.dataSummaryLabel.text == "No data chosen yet." and not ui.startButton.enabled
    assert session.runs.workspace == engine_env / "runs"
    p.runsFolder = tmp_path / "runs"
    assert session.runs.workspace == tmp_path / "runs"
    wait_for(lambda: session.state.environment is not None, what="the probe")
    ui.deviceComboBox.currentIndex = ui.deviceComboBox.count - 1
    assert p.device == "cpu"
    ui.useSceneVolumesCheckBox.checked = True
    assert p.useSceneVolumes and ui.dataSummaryLabel.text == "Data: 1 scene volume(s)"
    ui.dataPathLineEdit.currentPath = str(tmp_path)
    assert p.dataPath == str(tmp_path)
    ui.dataPathLineEdit.currentPath = ""
    p.steps, p.runName = 3, "widget-run"
    assert ui.startButton.enabled

    click(ui.startButton)
    wait_for(lambda: session.state.run() is not None and (session.state.run().step or 0) >= 1, what="step 1")
    assert ui.runsTableWidget.rowCount == 1 and ui.stopButton.enabled and not ui.resumeButton.enabled
    assert p.selectedRun == str(tmp_path / "runs" / "widget-run")
    wait_for(lambda: any(kind == "ShowChartInLayout" for kind, _ in slicer_application.DISPLAYED), what="the chart")
    click(ui.stopButton)
    wait_for(lambda: session.state.run().state == "stopped", what="the stopped run")
    assert ui.resumeButton.enabled and not ui.stopButton.enabled
    click(ui.resumeButton)
    wait_for(lambda: session.state.run().state == "done", timeout=600, what="the resumed run")
    assert ui.progressBar.value == 100 and ui.statusLabel.text.startswith("widget-run: done, step 3 of 3")

    ui.runsTableWidget.clearSelection()
    ui.runsTableWidget.selectRow(0)
    pythonqt.process_events()
    click(ui.refreshRunsButton)
    shown = len(slicer_application.DISPLAYED)
    click(ui.showCurvesButton)
    assert slicer_application.DISPLAYED[shown:] == [("ShowChartInLayout", "widget-run curves")]

    p.overlayVolume = volume
    click(ui.showCropsButton)
    wait_for(lambda: session.state.job is None, what="the crop layout")
    assert ui.positionsLabel.text.startswith("crop layout: ")
    assert slicer_application.DISPLAYED[-1] == ("setSliceViewerLayers", ["background", "fit", "label", "labelOpacity"])
    assert ui.showPositionsButton.enabled
    click(ui.showPositionsButton)
    wait_for(lambda: session.state.job is None, what="the position predictions")
    assert "mean absolute overlap error" in ui.positionsLabel.text
    assert slicer_application.DISPLAYED[-1] == ("setSliceViewerLayers", ["background", "foreground",
                                                                          "foregroundOpacity"])
    # fine-tuning: the run just made is a start; with no case and no dataset there is nothing to train on
    wait_for(lambda: not session.state.models_loading, what="the model list")
    starts = [ui.finetuneInitComboBox.itemText(i) for i in range(ui.finetuneInitComboBox.count)]
    assert "widget-run — pretraining run, step 3" in starts and starts[-1] == "random initialisation (from scratch)"
    assert not ui.finetuneButton.enabled and "add a corrected case" in ui.finetuneButton.toolTip
    ui.finetuneDataPathLineEdit.currentPath = str(tmp_path)
    assert p.finetuneDataPath == str(tmp_path) and ui.finetuneButton.enabled
    assert ui.finetuneDataSummaryLabel.text == f"Labelled data: {tmp_path}"
    ui.finetuneDataPathLineEdit.currentPath = ""
    assert p.finetuneDataPath == "" and not ui.finetuneButton.enabled
    click(ui.installDependenciesButton)
    slicer.mrmlScene.Clear(False)
    pythonqt.process_events(1.0)
    # a new scene has a new parameter node: the default runs folder, no run selected, no curves left behind
    assert widget._parameterNode is not None and session.runs.workspace == engine_env / "runs"
    assert session.state.selected is None and session.curves is None
    pythonqt.CLOCK.measure("VoCoPretrainWidget.exit", widget.exit)
    pythonqt.CLOCK.measure("VoCoPretrainWidget.cleanup", widget.cleanup)
    assert [label for label, _ in pythonqt.CLOCK.errors] == []
    assert session.state.job is None
    assert_gui_budget({})


# --- the self-tests, as Slicer's Reload and Test runs them ------------------------------------------

@pytest.mark.parametrize("module_name", ["VoCoSegmentation", "VoCoPretrain"])
def test_reload_and_test_passes_with_the_engine(slicer_gui, engine_env, module_name, caplog):
    caplog.set_level(logging.INFO)
    python_module, widget = widget_of(module_name)
    widget.onReloadAndTest()  # raises on a failure, as Slicer's (tryWithErrorDisplay re-raises)
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("Not run") for m in messages), messages
    assert any("shown" in m or "respected" in m or "left no node" in m for m in messages), messages
    assert not list(Path(tempfile.gettempdir()).glob(f"{module_name}Test-*"))
    widget.cleanup()


@pytest.mark.parametrize("module_name", ["VoCoSegmentation", "VoCoPretrain"])
def test_reload_and_test_without_the_engines_packages_says_so_and_leaves_no_temp_folder(
        slicer_gui, home, tmp_path, monkeypatch, module_name, caplog):
    """Slicer calls runTest() directly: a skipTest() was reported as a failure there, and the
    temp folders registered with addCleanup() were never removed."""
    bare = tmp_path / "python-without-packages"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # -S: no site-packages, so no torch
    bare.chmod(0o755)
    monkeypatch.setenv("VOCO_ENGINE_PYTHON", str(bare))
    before = set(Path(tempfile.gettempdir()).glob(f"{module_name}Test-*"))
    caplog.set_level(logging.INFO)
    python_module, widget = widget_of(module_name)
    widget.onReloadAndTest()
    assert any(r.getMessage().startswith("Not run: VoCo's Python packages are not installed")
               for r in caplog.records)
    assert set(Path(tempfile.gettempdir()).glob(f"{module_name}Test-*")) == before
    widget.cleanup()


# --- an older Slicer -------------------------------------------------------------------------------------

OLD_SLICER = r'''
import sys, types
sys.path[:0] = [{folders}]
slicer = types.ModuleType("slicer")
slicer.app = types.SimpleNamespace(majorVersion=5, minorVersion=8)
for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLMarkupsROINode", "vtkMRMLSegmentationNode"):
    setattr(slicer, name, type(name, (), {{}}))
slicer.util = types.ModuleType("slicer.util")
slicer.util.VTKObservationMixin = type("VTKObservationMixin", (), {{"__init__": lambda self: None}})
class Module:
    def __init__(self, parent):
        self.parent = parent
class Widget:
    def __init__(self, parent=None):
        self.parent, self.layout = parent, types.SimpleNamespace(added=[], addWidget=lambda w: self.layout.added.append(w))
    def setup(self):
        pass
base = types.ModuleType("slicer.ScriptedLoadableModule")
base.ScriptedLoadableModule, base.ScriptedLoadableModuleWidget = Module, Widget
base.ScriptedLoadableModuleLogic = base.ScriptedLoadableModuleTest = object
wrapper = types.ModuleType("slicer.parameterNodeWrapper")
wrapper.parameterNodeWrapper = lambda cls: cls
wrapper.WithinRange = wrapper.Choice = lambda *args: None
i18n = types.ModuleType("slicer.i18n")  # Slicer has it from 5.4
i18n.tr, i18n.translate = (lambda text: text), (lambda context, text: text)
qt = types.ModuleType("qt")
qt.QLabel = lambda text: ("QLabel", text)
sys.modules.update({{"slicer": slicer, "slicer.util": slicer.util, "slicer.ScriptedLoadableModule": base,
                    "slicer.parameterNodeWrapper": wrapper, "slicer.i18n": i18n, "qt": qt,
                    "vtk": types.ModuleType("vtk")}})
import logging
logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s", stream=sys.stdout)
for name in ("VoCoCommon", "VoCoSegmentation", "VoCoPretrain"):
    module = __import__(name)
    parent = types.SimpleNamespace()
    getattr(module, name)(parent)
    if hasattr(module, name + "Widget"):
        widget = getattr(module, name + "Widget")(types.SimpleNamespace())
        widget.setup()
        print("PANEL", widget.layout.added)
'''


def pythons_before_312():
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    return sorted(root.glob("3.9*/bin/python3"))[-1:] if root.is_dir() else []


@pytest.mark.skipif(not pythons_before_312(), reason="no Python 3.9 here (Slicer 5.6-5.8's)")
def test_an_older_slicer_gets_one_message_and_no_traceback():
    folders = ", ".join(repr(str(REPO / f)) for f in ("VoCoCommon", "VoCoSegmentation", "VoCoPretrain"))
    done = subprocess.run([str(pythons_before_312()[0]), "-c", OLD_SLICER.format(folders=folders)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 3 and len(set(errors)) == 1 and "needs 3D Slicer 5.10 or newer" in errors[0]
    assert [line for line in lines if line.startswith("PANEL")] == [
        f"PANEL [('QLabel', '{errors[0][len('ERROR '):]}')]"] * 2
