"""SegmentationSession on real MRML (slicer-core) with the engine run for real, as a process.

Two kinds of model: ``package``, a real tiny SwinUNETR package (random weights, seed 0) whose
labels carry names, colours and a SNOMED code; and ``toy``, a package whose network is replaced
*inside the engine process* by a 1x1 convolution that thresholds the intensity (engine_side.py),
so that the right segmentation is known; ``slow`` also makes each window take a second.
Every ``tick`` of a test goes through the GUI clock: none may cost the GUI thread 50 ms.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from phantoms import dice, oblique_affine, rotation, sphere_image, sphere_mask

LIVER_CODE = {"scheme": "SCT", "code": "10200004", "meaning": "Liver"}
LABELS = [{"value": 1, "name": "liver", "color": "#dd8244", "terminology": LIVER_CODE},
          {"value": 5, "name": "spleen", "color": "#9d6c62"}]
SHAPE = (48, 40, 20)  # I, J, K
GUI_BUDGET_S = 0.05


@pytest.fixture(scope="module")
def package(tmp_path_factory, engine):
    return engine.package(tmp_path_factory.mktemp("package") / "toy-organs", "organs", LABELS, {"mean_val_dice": 0.25})


@pytest.fixture(scope="module")
def toy(tmp_path_factory, engine):
    return engine.toy(tmp_path_factory.mktemp("toy")).parent


@pytest.fixture
def toy_engine(toy, monkeypatch):
    monkeypatch.setenv("VOCO_TEST_TOY", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(toy / "site"), os.environ.get("PYTHONPATH")) if p))
    return toy / "package"


def new_session(tmp_path, engine, warm=True, python=None):
    """A session on a client of ``python`` (default: the engine's) with (``warm``) or without the warm engine."""
    from VoCoCommonLib.client import EngineClient
    from VoCoCommonLib.settings import read_settings
    from VoCoSegmentationLib.session import SegmentationSession

    settings = read_settings({**os.environ, "VOCO_ENGINE_PYTHON": python or engine.python,
                              "VOCO_WARM_ENGINE": "1" if warm else "0"})
    temp_root = tmp_path / "temp"
    temp_root.mkdir(exist_ok=True)
    return SegmentationSession(EngineClient(settings), temp_root=temp_root)


def tick_until(session, condition, timeout=300.0, clock=None):
    """The front end's timer: tick until ``condition()``; every tick's GUI-thread cost is kept."""
    import pythonqt

    clock = clock or pythonqt.CLOCK
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out; status: {session.state.status}"
        clock.measure("SegmentationSession.tick", session.tick)
        time.sleep(0.05)
    assert not clock.errors, clock.errors


def assert_gui_thread_budget():
    import pythonqt

    longest = pythonqt.CLOCK.longest()
    assert longest is None or longest.cpu_s < GUI_BUDGET_S, longest
    slowest = pythonqt.CLOCK.longest("wall_s")
    assert slowest is None or slowest.wall_s < 10 * GUI_BUDGET_S, slowest  # nothing waits for the engine


@pytest.fixture
def clock():
    import pythonqt

    pythonqt.CLOCK.reset()
    yield pythonqt.CLOCK
    assert_gui_thread_budget()


def add_volume(data_ijk: np.ndarray, affine: np.ndarray, name="image"):
    import slicer

    return slicer.util.addVolumeFromArray(np.ascontiguousarray(data_ijk.transpose(2, 1, 0)).astype(np.float32),
                                          affine, name)


def sphere_volume(shape=SHAPE):
    affine = oblique_affine(shape=shape)
    return add_volume(sphere_image(affine, shape), affine, "sphere"), affine


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def segment_array(segmentation_node, segment_id, volume_node) -> np.ndarray:
    import slicer

    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node).transpose(2, 1, 0)


def ready(session):
    session.refresh()
    tick_until(session, lambda: session.state.environment is not None and not session.state.models_loading)
    assert session.state.environment.ready, session.state.environment


# --- segmenting ----------------------------------------------------------------------------------

def test_segment_with_a_real_model_gives_named_coloured_segments_on_the_input_grid(mrml, home, package, tmp_path,
                                                                                   engine, clock):
    import slicer

    from VoCoCommonLib.volumes import ijk_to_ras
    from VoCoSegmentationLib.results import terminology_entry

    volume, affine = sphere_volume()
    session = new_session(tmp_path, engine)
    ready(session)
    shown = []
    session.resultReady.connect(lambda node, source: shown.append((node, source)))
    assert session.buttons(volume, str(package), None).apply.enabled
    job = clock.measure("segment", session.segment, volume, str(package), "cpu")
    assert session.buttons(volume, str(package), None).apply.text == "Cancel"
    tick_until(session, lambda: job.finished)
    assert job.succeeded, job.error
    kinds = [e["event"] for e in job.events]
    assert kinds[0] == "start" and "done" in kinds and kinds[-1] == "exit" and "progress" in kinds
    node = job.node
    assert shown == [(node, volume)] and not job.temp_dir.exists()
    assert node.IsA("vtkMRMLSegmentationNode") and node.GetScene() is slicer.mrmlScene
    assert node.GetName() == "sphere organs v1" and session.state.status == "done: sphere organs v1"
    expected = job.result.labels.transpose(2, 1, 0)
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == \
        ["liver", "spleen"]
    for i, label in enumerate(LABELS):
        segment_id = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segment_id)
        np.testing.assert_allclose(segment.GetColor(), [int(label["color"][k:k + 2], 16) / 255 for k in (1, 3, 5)],
                                   atol=1e-6)
        np.testing.assert_array_equal(segment_array(node, segment_id, volume), expected == label["value"])
    assert segmentation.GetNthSegment(0).GetTerminology() == (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^") == terminology_entry(LIVER_CODE)
    assert segmentation.GetNthSegment(1).GetTerminology() == slicer.vtkSegment().GetTerminology()
    assert node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is volume
    np.testing.assert_allclose(ijk_to_ras(volume), affine, atol=1e-6)
    # 2-D at once; surfaces for the 3-D view only on request (Show 3D): they cost the GUI thread
    assert not segmentation.ContainsRepresentation(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    assert session.state.job is None and session.buttons(volume, str(package)).apply.text == "Apply"


class SlowFiles:
    """A local HTTP server of a folder's files, sent in 64 KB pieces a few ms apart, so that the
    download of a model on first use is seen in progress."""

    def __init__(self, folder):
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def copyfile(self, source, outputfile):
                while block := source.read(1 << 16):
                    outputfile.write(block)
                    time.sleep(0.005)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_registry_model_downloads_on_first_use_with_its_progress_then_segments(mrml, home, tmp_path, engine,
                                                                                monkeypatch, clock):
    folder = tmp_path / "server"
    folder.mkdir()
    server = SlowFiles(folder)
    try:
        engine.run("omni", folder, server.url)
        monkeypatch.setenv("VOCO_REGISTRY", str(folder / "models.json"))
        session = new_session(tmp_path, engine)
        ready(session)
        [entry] = session.state.segmentation_models
        assert (entry.name, entry.installed) == ("omni", False) and entry.title.startswith("omni v1.0 — will download ")
        volume, _ = sphere_volume()
        seen = []
        job = session.segment(volume, entry, device="cpu")
        tick_until(session, lambda: seen.append((session.state.status, session.state.fraction)) or job.finished,
                   clock=clock)
        assert job.succeeded, job.error
        downloading = [fraction for status, fraction in seen if status.startswith("downloading omni ")]
        assert downloading and downloading == sorted(downloading) and 0 < downloading[-1] <= 1
        assert session.state.status == "done: sphere omni v1.0"
        session.refresh_models()
        tick_until(session, lambda: not session.state.models_loading, clock=clock)
        assert session.state.segmentation_models[0].installed  # the next run needs no download
    finally:
        server.close()


def test_known_answer_roi_and_the_chosen_output_node(mrml, home, toy_engine, tmp_path, engine, clock):
    import slicer

    from VoCoSegmentationLib.roi import roi_ras_box

    volume, affine = sphere_volume()
    session = new_session(tmp_path, engine)
    full = session.segment(volume, str(toy_engine), device="cpu")
    tick_until(session, lambda: full.finished)
    assert full.succeeded, full.error
    sphere = segment_array(full.node, full.node.GetSegmentation().GetNthSegmentID(0), volume)
    truth = sphere_mask(affine, SHAPE)
    assert dice(sphere > 0, truth) > 0.9
    assert full.node.GetSegmentation().GetNthSegment(0).GetName() == "sphere"

    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(-10.0, -6.0, 9.0)  # the sphere's right part (the sphere is centred at x = 4)
    roi.SetSize(12.0, 40.0, 40.0)
    output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen output")
    before = node_ids(slicer.mrmlScene)
    job = session.segment(volume, str(toy_engine), device="cpu", roi_node=roi, output_node=output)
    tick_until(session, lambda: job.finished)
    assert job.node is output and node_ids(slicer.mrmlScene) - before == {output.GetDisplayNode().GetID()}
    assert output.GetSegmentation().GetNumberOfSegments() == 1
    inside = segment_array(output, output.GetSegmentation().GetNthSegmentID(0), volume) > 0
    corners = np.array(np.meshgrid(*np.array(roi_ras_box(roi)).reshape(2, 3).T)).reshape(3, -1).T
    voxels = (np.linalg.inv(affine) @ np.c_[corners, np.ones(len(corners))].T)[:3].T
    start = np.clip(np.floor(voxels.min(0)).astype(int), 0, SHAPE)
    end = np.clip(np.ceil(voxels.max(0)).astype(int) + 1, 0, SHAPE)
    box = np.zeros(SHAPE, bool)
    box[start[0]:end[0], start[1]:end[1], start[2]:end[2]] = True
    assert inside.any() and not (inside & ~box).any()  # nothing outside the ROI's voxel box
    assert dice(inside, truth & box) > 0.85
    assert (sphere & ~box).sum() > 1000  # ... where the full run did find the sphere


def test_a_volume_under_a_transform_gets_its_segmentation_where_it_is_not_moved_twice(mrml, home, toy_engine,
                                                                                        tmp_path, engine, clock):
    import slicer

    volume, affine = sphere_volume()
    moved = np.eye(4)
    moved[:3, :3] = rotation(15.0, 2)
    moved[:3, 3] = (40.0, -25.0, 10.0)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(moved))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    session = new_session(tmp_path, engine)
    job = session.segment(volume, str(toy_engine), device="cpu")
    tick_until(session, lambda: job.finished)
    node = job.node
    assert node.GetTransformNodeID() == transform.GetID()
    # the segmentation's grid is the volume's own: the transform above both is not applied into it
    converter = slicer.vtkSegmentationConverter
    expected = converter.SerializeImageGeometry(slicer.util.vtkMatrixFromArray(affine), volume.GetImageData())
    assert node.GetSegmentation().GetConversionParameter(converter.GetReferenceImageGeometryParameterName()) == expected
    # and the sphere is where the volume shows it (none of it cut off by a shifted grid)
    found = segment_array(node, node.GetSegmentation().GetNthSegmentID(0), volume) > 0
    assert dice(found, sphere_mask(affine, SHAPE)) > 0.9


def test_cancel_returns_at_once_kills_the_engine_and_leaves_no_node_and_no_file(mrml, home, toy_engine, tmp_path,
                                                                               engine, clock, monkeypatch):
    """One process per job (the warm engine turned off, or unavailable); the warm engine's cancel is below."""
    import slicer

    monkeypatch.setenv("VOCO_TEST_SLOW", "1")
    volume, _ = sphere_volume(shape=(120, 120, 40))  # 8 windows of about a second each
    session = new_session(tmp_path, engine, warm=False)
    before = node_ids(slicer.mrmlScene)
    job = session.segment(volume, str(toy_engine), device="cpu")
    tick_until(session, lambda: any(e["event"] == "start" for e in job.events))
    pid = job.process.pid
    clock.measure("cancel", session.cancel)
    assert session.buttons(volume, "x").apply.text == "Cancelling..."
    tick_until(session, lambda: job.finished)
    assert job.cancelled and not job.succeeded and session.state.status == "cancelled"
    assert job.returncode == 128 + 15  # the engine stopped cleanly on SIGTERM
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert node_ids(slicer.mrmlScene) == before
    assert not job.temp_dir.exists() and list((tmp_path / "temp").iterdir()) == []
    assert session.state.job is None and session.buttons(volume, "x").apply.text == "Apply"


def test_an_engine_error_reaches_the_status_and_adds_no_node(mrml, home, tmp_path, engine, clock):
    import slicer

    volume, _ = sphere_volume(shape=(16, 16, 16))
    session = new_session(tmp_path, engine)
    errors = []
    session.errorOccurred.connect(errors.append)
    before = node_ids(slicer.mrmlScene)
    job = session.segment(volume, "no-such-model", device="cpu")
    tick_until(session, lambda: job.finished)
    assert "no-such-model" in job.error and session.state.status.startswith("error:") and errors == [job.error]
    assert job.returncode == 2 and node_ids(slicer.mrmlScene) == before and not job.temp_dir.exists()
    assert session.state.job is None and not session.busy


def test_a_failed_result_conversion_leaves_no_partial_node(mrml, tmp_path):
    import slicer

    from VoCoCommonLib.volumes import write_nrrd
    from VoCoSegmentationLib.results import read_output, segmentation_from_output

    volume, affine = sphere_volume(shape=(16, 16, 16))
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    write_nrrd(labels, affine, tmp_path / "seg.nrrd")
    (tmp_path / "seg.json").write_text(json.dumps({"labels": [{"value": 1, "name": "ok", "color": "#00ff00"},
                                                              {"value": 2, "name": "bad", "color": "red"}]}))
    before = node_ids(slicer.mrmlScene)
    with pytest.raises(ValueError, match="#rrggbb"):
        segmentation_from_output(read_output(tmp_path / "seg.nrrd"), volume)
    assert node_ids(slicer.mrmlScene) == before


def test_closing_the_scene_during_a_segmentation_cancels_it_and_adds_nothing_after(mrml, home, toy_engine,
                                                                                   tmp_path, engine, clock,
                                                                                   monkeypatch):
    import slicer

    monkeypatch.setenv("VOCO_TEST_SLOW", "1")
    volume, _ = sphere_volume(shape=(120, 120, 40))
    session = new_session(tmp_path, engine)
    job = session.segment(volume, str(toy_engine), device="cpu")
    tick_until(session, lambda: any(e["event"] == "start" for e in job.events))
    session.scene_closed()
    slicer.mrmlScene.Clear(False)
    tick_until(session, lambda: job.finished)
    assert job.node is None and slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert not job.temp_dir.exists() and session.state.job is None


def test_versions_are_segmented_one_after_the_other_when_compared(mrml, home, toy_engine, tmp_path, engine, clock):
    volume, _ = sphere_volume(shape=(24, 24, 16))
    session = new_session(tmp_path, engine)
    session.compare_versions(volume, [str(toy_engine), str(toy_engine)], device="cpu", names=["older", "newer"])
    assert [job.started for job in session.history] == [True, False] and session.busy  # one at a time
    tick_until(session, lambda: not session.busy)
    assert [job.node.GetName() for job in session.history] == ["older", "newer"]


# --- the warm engine (voco serve) ------------------------------------------------------------------------

def alive(pid) -> bool:
    """Running, not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def segmented(session, volume, model):
    job = session.segment(volume, model, device="cpu")
    tick_until(session, lambda: job.finished)
    return job


def start_event(job) -> dict:
    return next(e for e in job.events if e["event"] == "start")


def test_two_volumes_go_to_one_warm_engine_that_keeps_the_network_and_stops_with_the_session(
        mrml, home, toy_engine, tmp_path, engine, clock):
    shapes = [(24, 24, 16), (32, 24, 16)]
    volumes = [sphere_volume(shape) for shape in shapes]
    session = new_session(tmp_path, engine)
    jobs = [segmented(session, volume, str(toy_engine)) for volume, _ in volumes]
    assert all(job.succeeded for job in jobs), [job.error for job in jobs]
    for job, (volume, affine), shape in zip(jobs, volumes, shapes):
        sphere = segment_array(job.node, job.node.GetSegmentation().GetNthSegmentID(0), volume)
        assert dice(sphere > 0, sphere_mask(affine, shape)) > 0.9
    pid = jobs[0].process.pid
    assert jobs[1].process.pid == pid and alive(pid)  # one server for both, still up
    assert [start_event(job)["model_cache"] for job in jobs] == ["miss", "hit"]  # the weights were read once
    assert [job.events[-1] for job in jobs][-1]["event"] == "exit" and not list((tmp_path / "temp").iterdir())
    clock.measure("close", session.close)
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_a_killed_warm_engine_fails_its_job_clearly_and_the_next_job_restarts_it(mrml, home, toy_engine, tmp_path,
                                                                                 engine, clock, monkeypatch):
    import signal

    monkeypatch.setenv("VOCO_TEST_SLOW", "1")
    volume, _ = sphere_volume(shape=(120, 120, 40))  # 8 windows of about a second each
    session = new_session(tmp_path, engine)
    errors = []
    session.errorOccurred.connect(errors.append)
    job = session.segment(volume, str(toy_engine), device="cpu")
    tick_until(session, lambda: any(e["event"] == "start" for e in job.events))
    pid = job.process.pid
    os.kill(pid, signal.SIGKILL)
    tick_until(session, lambda: job.finished)
    assert job.error == "the engine stopped: killed by signal 9" and errors == [job.error]
    assert job.returncode == -9 and job.node is None and not job.temp_dir.exists()
    monkeypatch.delenv("VOCO_TEST_SLOW")  # the new server is started without it
    small, _ = sphere_volume(shape=(24, 24, 16))
    again = segmented(session, small, str(toy_engine))
    assert again.succeeded, again.error
    assert again.process.pid != pid and start_event(again)["model_cache"] == "miss"
    session.close()


def test_cancel_stops_the_request_and_the_warm_engine_stays_up_for_the_next(mrml, home, toy_engine, tmp_path,
                                                                          engine, clock, monkeypatch):
    import slicer

    monkeypatch.setenv("VOCO_TEST_SLOW", "1")
    volume, _ = sphere_volume(shape=(120, 120, 40))
    session = new_session(tmp_path, engine)
    before = node_ids(slicer.mrmlScene)
    job = session.segment(volume, str(toy_engine), device="cpu")
    tick_until(session, lambda: any(e["event"] == "start" for e in job.events))
    started = time.monotonic()
    clock.measure("cancel", session.cancel)
    tick_until(session, lambda: job.finished)
    assert time.monotonic() - started < 5  # at the next window, not after the 8
    assert job.cancelled and not job.succeeded and session.state.status == "cancelled"
    assert job.returncode == 128 + 15 and alive(job.process.pid)  # what voco segment says; the server is up
    assert node_ids(slicer.mrmlScene) == before and list((tmp_path / "temp").iterdir()) == []
    small, _ = sphere_volume(shape=(24, 24, 16))
    again = segmented(session, small, str(toy_engine))
    assert again.succeeded and again.process.pid == job.process.pid and start_event(again)["model_cache"] == "hit"
    session.close()


OLD_ENGINE = """#!/bin/sh
# An engine from before voco serve: it refuses the command as argparse does, and runs the others.
for arg in "$@"; do
  if [ "$arg" = serve ]; then
    echo "error: voco: argument command: invalid choice: 'serve'" >&2
    exit 2
  fi
done
exec {python} "$@"
"""


def test_an_engine_without_serve_gets_one_process_per_job_said_once_in_the_log(mrml, home, toy_engine, tmp_path,
                                                                              engine, clock):
    old = tmp_path / "old-engine"
    old.write_text(OLD_ENGINE.format(python=engine.python))
    old.chmod(0o755)
    session = new_session(tmp_path, engine, python=str(old))
    volume, _ = sphere_volume(shape=(24, 24, 16))
    jobs = [segmented(session, volume, str(toy_engine)) for _ in range(2)]
    assert all(job.succeeded for job in jobs), [job.error for job in jobs]
    assert jobs[0].process.pid != jobs[1].process.pid and not any(alive(job.process.pid) for job in jobs)
    assert "model_cache" not in start_event(jobs[1])  # voco segment's own events
    notices = [line for line in session.log.lines if "warm engine unavailable" in line]
    assert len(notices) == 1 and "invalid choice: 'serve'" in notices[0], notices


# --- the clinician loop --------------------------------------------------------------------------------

def corrected_case(shape, seed):
    from test_client import corrected_case as case

    return case(shape, seed)


def test_add_finetune_and_the_new_version_with_its_held_out_validation_dice(mrml, home, package, tmp_path, engine, clock):
    from VoCoCommonLib.runs import FINETUNE

    session = new_session(tmp_path, engine)
    ready(session)
    selected = []
    session.modelSelected.connect(selected.append)
    imported = session.import_model(package)                 # the model becomes one of the list
    tick_until(session, lambda: selected)
    assert imported.succeeded and imported.imported["name"] == "organs"
    organs = session.model(selected.pop())
    assert organs is not None and organs.installed and organs.validation.mean == 0.25
    assert not session.buttons(None, organs.spec).finetune.enabled  # no case yet
    for seed in (1, 2):
        volume, segmentation, *_ = corrected_case(SHAPE, seed)
        job = clock.measure("add", session.add_to_training_set, volume, segmentation, organs.spec)
        tick_until(session, lambda: job.finished)
        assert job.succeeded, job.error
        assert session.state.status == f"added case_{seed:04d} to the training set"
    assert session.state.training_set_count == 2 and session.training_set.folder == home / "training-set"
    dataset = json.loads(session.training_set.dataset_json.read_text())
    assert dataset["labels"] == {"0": "background", "1": "liver", "5": "spleen"}  # the model's label values

    run = session.finetune(organs, steps=2, device="cpu", extra_args=["--batch-size", "1", "--patch-size", "32"],
                           val_every=2)
    assert session.buttons(None, organs.spec).finetune.text == "Stop fine-tuning"
    info = session.runs.info(run)
    assert info.kind == FINETUNE and run.parent == home / "runs"  # the runs workspace both modules share
    tick_until(session, lambda: selected, timeout=600)
    new = session.model(selected[0])
    assert (new.name, new.version, new.parent_version) == ("organs", "2", "1") and new.usable
    assert new.validation.n == 1 and new.training_case_dice is None  # one of the two cases held out
    assert session.state.status.startswith("new model organs v2: held-out validation Dice ")
    assert session.state.finetuning is None and session.buttons(None, organs.spec).finetune.text == "Fine-tune"
    assert all(m.needs_finetuning and not m.usable for m in session.state.models if m.kind == "backbone")


def test_model_list_marks_backbones_and_never_calls_the_dice_on_training_cases_plain_dice(tmp_path, package):
    from VoCoCommonLib.models import ModelEntry, entries_from_runs, merge_entries

    run = tmp_path / "runs" / "organs-x" / "model"
    run.mkdir(parents=True)
    card_values = json.loads((package / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**card_values, "version": "2", "metrics": {
        "mean_val_dice": 0.5, "on_training_data": True, "val_cases": ["case_0001"]}}))
    entries = merge_entries([ModelEntry("organs", "1", "segmentation", True, str(package),
                                        metrics={"mean_val_dice": 0.25}),
                             ModelEntry("voco-b", "1", "backbone", False)] + entries_from_runs(tmp_path / "runs"))
    titles = [entry.title for entry in entries]
    assert titles == ["organs v1 — validation Dice 0.250", "organs v2 — Dice on its training cases 0.500 (n=1)",
                      "voco-b v1 — backbone, fine-tune first"]
    assert entries[1].spec == str(run) and entries[1].parent_version == "1"


def test_fine_tuned_names_follow_the_model(tmp_path, package):
    from VoCoCommonLib.models import ModelEntry
    from VoCoCommonLib.models import finetuned_name

    base = ModelEntry("organs", "1", "segmentation", True, str(package))
    assert finetuned_name(base) == finetuned_name(str(package)) == "organs"
    assert finetuned_name(ModelEntry("voco-b", "1", "backbone", False)) == "voco-b-seg"
    (tmp_path / "VoCo_B_SSL_head.pt").write_bytes(b"")
    assert finetuned_name(str(tmp_path / "VoCo_B_SSL_head.pt")) == "VoCo_B_SSL_head-seg"


def test_rotated_roi_under_a_transform_becomes_its_world_bounding_box(mrml):
    import slicer

    from VoCoSegmentationLib.roi import roi_argument, roi_ras_box

    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    rotated = np.eye(4)
    rotated[:3, :3] = rotation(30.0, 2)
    roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(rotated))
    roi.SetSize(10, 10, 10)
    shift = np.eye(4)
    shift[:3, 3] = (100, 0, 0)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    roi.SetAndObserveTransformNodeID(transform.GetID())

    half = 5 * (np.cos(np.radians(30)) + np.sin(np.radians(30)))
    np.testing.assert_allclose(roi_ras_box(roi), (100 - half, -half, -5, 100 + half, half, 5), atol=1e-9)
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)  # Slicer's own world bounds agree
    np.testing.assert_allclose(roi_ras_box(roi), bounds[0::2] + bounds[1::2], atol=1e-9)
    volume = add_volume(np.zeros((8, 8, 8)), np.eye(4))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(roi_ras_box(roi, volume), (-half, -half, -5, half, half, 5), atol=1e-9)
    assert roi_argument(roi) == ["--roi-ras=" + ",".join(f"{v:.4f}" for v in roi_ras_box(roi))]


# --- what each version is measured to do, roll-back and the flag ------------------------------------

def next_version_of(package: Path, folder: Path, version: str, metrics: dict) -> Path:
    """``package`` as a fine-tune of itself would be: the same weights, ``version``, its parent
    the version it copies, and the card's ``metrics``."""
    import shutil

    shutil.copytree(package, folder)
    card = json.loads((folder / "model.json").read_text())
    card.update(version=version, metrics=metrics,
                training={"parent": {"name": card["name"], "version": card["version"]}})
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def import_and_select(session, package, selected):
    job = session.import_model(package)
    tick_until(session, lambda: job.finished and selected)
    assert job.succeeded, job.error
    return session.model(selected.pop())


def test_an_added_case_scores_the_version_that_made_it_then_versions_roll_back_and_a_worse_one_is_flagged(
        mrml, home, toy_engine, tmp_path, engine, clock):
    import slicer

    from voco.data.sources import list_labelled_cases

    session = new_session(tmp_path, engine)  # no probe needed: the import lists the models
    selected = []
    session.modelSelected.connect(selected.append)
    v1 = import_and_select(session, toy_engine, selected)
    assert (v1.name, v1.version, v1.current) == ("sphere-model", "1", True)

    # Segment with v1, correct the result (a slab of it erased), add it: v1 is scored on the correction.
    volume, _ = sphere_volume()
    job = session.segment(volume, v1.spec, device="cpu")
    tick_until(session, lambda: job.finished)
    node, segment_id = job.node, job.node.GetSegmentation().GetNthSegmentID(0)
    produced = segment_array(node, segment_id, volume) > 0
    corrected = produced.copy()
    corrected[:, :, :8] = False
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected.astype(np.uint8).transpose(2, 1, 0).copy(), node,
                                                     segment_id, volume)
    expected = dice(produced, corrected)
    assert 0.3 < expected < 0.95
    added = clock.measure("add", session.add_to_training_set, volume, node, v1.spec)
    tick_until(session, lambda: added.finished)
    assert added.succeeded, added.error
    assert session.state.status == (f"added case_0001 to the training set; sphere-model v1 had Dice {expected:.3f} "
                                    "on it (before training on it)")
    dataset = json.loads(session.training_set.dataset_json.read_text())
    (entry,) = dataset["training"]
    assert entry["unseen_dice"]["model"] == "sphere-model" and entry["unseen_dice"]["version"] == "1"
    assert entry["unseen_dice"]["dice"] == {"sphere": pytest.approx(expected)}
    assert entry["unseen_dice"]["mean_dice"] == pytest.approx(expected)
    assert len(list_labelled_cases(session.training_set.dataset_json)) == 1  # voco finetune still reads it

    # A case drawn by hand has no score.
    hand = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn by hand")
    hand_id = hand.GetSegmentation().AddEmptySegment("s", "sphere")
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected.astype(np.uint8).transpose(2, 1, 0).copy(), hand,
                                                     hand_id, volume)
    added = session.add_to_training_set(volume, hand, v1.spec)
    tick_until(session, lambda: added.finished)
    assert session.state.status == "added case_0002 to the training set"
    assert "unseen_dice" not in json.loads(session.training_set.dataset_json.read_text())["training"][1]

    (row,) = session.version_rows("sphere-model")
    assert (row.unseen, row.validation, row.note, row.current) == (f"{expected:.3f} (n=1)", "—", "current", True)
    assert session.model(v1.spec).title == f"sphere-model v1 — Dice on unseen cases {expected:.3f} (n=1)"

    # v2, fine-tuned from v1, is worse on the case held out of its training than v1 was on it: flagged.
    v2_package = next_version_of(toy_engine, tmp_path / "v2", "2", {"mean_val_dice": expected - 0.1,
                                                                    "on_training_data": False,
                                                                    "val_cases": ["case_0001"]})
    v2 = import_and_select(session, v2_package, selected)
    flag = f"worse than v1: held-out validation Dice {expected - 0.1:.3f} < {expected:.3f} on the same cases"
    assert (v2.version, v2.parent_version, v2.worse, v2.current) == ("2", "1", flag, True)
    held_out = f"held-out validation Dice {expected - 0.1:.3f} (n=1)"
    assert session.state.status == f"new model sphere-model v2: {held_out}: {flag}"
    rows = session.version_rows("sphere-model")
    assert [(r.version, r.validation, r.note, r.worse) for r in rows] == [
        ("1", "—", "", False), ("2", f"{expected - 0.1:.3f} (held out, n=1)", f"current; {flag}", True)]
    assert not session.roll_back_button(v2.spec).enabled and session.roll_back_button(v1.spec).enabled

    # Roll back: v1 is current and selected, v2 is kept; a new session starts with v1.
    session.roll_back(v1.spec)
    assert selected == [v1.spec] and session.state.status == "sphere-model v1 is the current version; v2 kept"
    assert [(r.version, r.current) for r in session.version_rows("sphere-model")] == [("1", True), ("2", False)]
    later = new_session(tmp_path, engine)
    chosen = []
    later.modelSelected.connect(chosen.append)
    later.refresh_models()
    tick_until(later, lambda: not later.state.models_loading)
    assert chosen == [v1.spec] and len(later.versions("sphere-model")) == 2
    with pytest.raises(ValueError, match="not a version in the model list"):
        session.roll_back(str(tmp_path / "somewhere-else"))


def test_the_flag_compares_dice_on_unseen_cases_once_the_new_version_has_some(tmp_path):
    from VoCoCommonLib.models import ModelEntry, merge_entries
    from VoCoCommonLib.versions import annotate

    def cases(*scores):
        return [{"case_id": f"case_{n:04d}", "unseen_dice": {"model": "m", "version": version, "mean_dice": value}}
                for n, (version, value) in enumerate(scores, 1)]

    held_out = {"mean_val_dice": 0.9, "on_training_data": False, "val_cases": ["case_0009"]}
    entries = merge_entries([ModelEntry("m", "1", "segmentation", True, "/m1"),
                             ModelEntry("m", "2", "segmentation", True, "/m2", metrics=held_out)])
    annotate(entries, cases(("1", 0.8), ("1", 0.6)), {})
    assert entries[1].worse == ""  # held out 0.9 against v1's 0.7 on unseen cases
    annotate(entries, cases(("1", 0.8), ("1", 0.6), ("2", 0.65)), {})
    assert entries[1].worse == "worse than v1: Dice on unseen cases 0.650 < 0.700"  # its own unseen cases decide
    assert entries[1].title == ("m v2 — Dice on unseen cases 0.650 (n=1), held-out validation Dice 0.900 (n=1) — "
                                "worse than v1: Dice on unseen cases 0.650 < 0.700")
    assert [e.current for e in entries] == [False, True]
    annotate(entries, [], {"m": ("1", "2")})  # rolled back from 2 to 1
    assert [e.current for e in entries] == [True, False] and entries[1].worse == ""
    annotate(entries + [ModelEntry("m", "3", "segmentation", True, "/m3")], [], {"m": ("1", "2")})
    assert [e.current for e in entries] == [False, False]  # a newer version (3) is current again
