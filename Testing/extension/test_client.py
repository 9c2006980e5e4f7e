"""The shared client (VoCoCommonLib): processes stopped as a tree, runs that outlive their front
end, events read incrementally, the volume hand-off, the training set, the environment probe,
the dependency installer and the settings. Real engine processes; real MRML where nodes appear."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from phantoms import oblique_affine
from slicer_fixtures import REPO

STEPS = 3


def add_volume(data_ijk: np.ndarray, affine: np.ndarray, name="image"):
    import slicer

    return slicer.util.addVolumeFromArray(np.ascontiguousarray(data_ijk.transpose(2, 1, 0)).astype(np.float32),
                                          affine, name)


def settings_for(tmp_path, engine, python=None):
    from VoCoCommonLib.settings import read_settings

    environ = {**os.environ, "VOCO_SLICER_HOME": str(tmp_path / "home"), "VOCO_MODELS_DIR": str(tmp_path / "models"),
               "VOCO_ENGINE_PYTHON": python or engine.python}
    return read_settings(environ)


def living(pids) -> list[int]:
    """Those of ``pids`` still running (not zombies: an orphan killed in a container may stay one)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


# --- the volume hand-off -----------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
def test_nrrd_written_here_is_read_by_the_engine_with_the_same_voxels_and_geometry(mrml, engine, tmp_path, compress):
    from VoCoCommonLib.volumes import read_nrrd, snapshot

    shape = (30, 20, 10)
    affine = oblique_affine(shape=shape)
    data = np.random.default_rng(1).normal(0, 100, shape).astype(np.float32)
    node = add_volume(data, affine)
    path = snapshot(node).write(tmp_path / "input.nrrd", compress=compress)
    read = json.loads(engine.run("read", path))  # exactly what the engine does with it
    assert read["shape"] == list(shape)
    np.testing.assert_allclose(read["affine"], affine, atol=1e-4)
    assert read["sum"] == pytest.approx(float(data.sum()), rel=1e-5)
    back, matrix = read_nrrd(path)
    np.testing.assert_array_equal(back, data.transpose(2, 1, 0))
    np.testing.assert_allclose(matrix, affine, atol=1e-9)


def test_nrrd_the_engine_writes_is_read_here_without_pynrrd(engine, tmp_path, monkeypatch):
    from VoCoCommonLib.volumes import read_nrrd

    written = json.loads(engine.run("write-nrrd", tmp_path / "labels.nrrd"))
    monkeypatch.setitem(sys.modules, "nrrd", None)  # Slicer does not ship pynrrd
    labels, matrix = read_nrrd(tmp_path / "labels.nrrd")
    assert labels.shape == (3, 4, 5) and labels.dtype == np.uint8
    i, j, k = written["ones"]
    assert labels[k, j, i] == 1 and labels[written["sevens"][2], written["sevens"][1], written["sevens"][0]] == 7
    assert int(labels.sum()) == 8
    np.testing.assert_allclose(matrix, written["affine"], atol=1e-9)


def test_a_detached_nrrd_header_is_refused(tmp_path):
    from VoCoCommonLib.volumes import read_nrrd

    (tmp_path / "x.nhdr").write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\n"
                                     "space directions: (1,0,0) (0,1,0) (0,0,1)\ndata file: /etc/passwd\n\n")
    with pytest.raises(ValueError, match="detached"):
        read_nrrd(tmp_path / "x.nhdr")


# --- processes ---------------------------------------------------------------------------------

FAKE_ENGINE = '''
import json, os, signal, subprocess, sys, time
mode = sys.argv[1]
print("not json")
print(json.dumps({"event": "start", "time": 0}), flush=True)
if mode == "fail":
    print("Traceback ...", file=sys.stderr)
    print("error: input.nrrd: broken", file=sys.stderr)
    print("more noise", file=sys.stderr)
    sys.exit(2)
if mode == "checkpoint":
    # as the engine does on SIGTERM: finish writing the checkpoint (2 s here), then exit 128 + 15
    def stop(signum, frame):
        time.sleep(2.0)
        open(sys.argv[2], "w").write("complete")
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    print(json.dumps({"event": "step", "step": 1}), flush=True)
    time.sleep(60)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(json.dumps({"event": "child", "pid": child.pid}), flush=True)
time.sleep(60)
'''

# Like PythonSlicer (CTKAppLauncher): starts the real interpreter as its child, in its own process
# group, and has no SIGTERM handler: a SIGTERM ends it at once, while its child goes on.
LAUNCHER = '''#!{python}
import os, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_DFL)
sys.exit(subprocess.call([{engine!r}, *sys.argv[1:]]))
'''


@pytest.fixture
def fake_engine(tmp_path):
    """A stand-in ``voco`` package (no torch)."""
    (tmp_path / "fake" / "voco").mkdir(parents=True)
    (tmp_path / "fake" / "voco" / "__init__.py").write_text("")
    (tmp_path / "fake" / "voco" / "__main__.py").write_text(FAKE_ENGINE)
    return tmp_path / "fake"


def launcher(tmp_path, engine_python) -> str:
    path = tmp_path / "PythonSlicer"
    path.write_text(LAUNCHER.format(python=sys.executable, engine=engine_python))
    path.chmod(0o755)
    return str(path)


def fake_process(fake_engine, *args, python=None):
    from VoCoCommonLib.process import EngineProcess

    return EngineProcess(["-m", "voco", *args], python=python, env={"PYTHONPATH": str(fake_engine)}, cwd=fake_engine)


def test_an_engine_error_line_on_stderr_becomes_the_error_event(fake_engine):
    process = fake_process(fake_engine, "fail").start()
    assert process.wait(60) == 2 and not process.running
    polled = process.poll()
    events = [e for e in polled if e["event"] != "log"]
    assert [e["event"] for e in events] == ["start", "error", "exit"]
    assert events[1]["message"] == "input.nrrd: broken" and events[2]["returncode"] == 2
    assert "error: input.nrrd: broken" in [e["line"] for e in polled if e["event"] == "log"]  # the views' log
    assert process.stdout_other == ["not json"]


def test_cancel_returns_at_once_and_kills_a_child_that_ignores_sigterm_after_the_grace(fake_engine):
    process = fake_process(fake_engine, "sleep").start()
    events = []
    while not any(e["event"] == "child" for e in events):
        assert process.running
        process.wait(0.1)
        events += process.poll()
    child = next(e["pid"] for e in events if e["event"] == "child")
    started = time.perf_counter()
    process.cancel(grace=1.0)
    assert time.perf_counter() - started < 0.05  # the GUI thread does not wait
    assert process.wait(30) == -signal.SIGTERM
    assert [e["event"] for e in process.poll()][-2:] == ["cancelled", "exit"]
    deadline = time.monotonic() + 10
    while living([child]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert living([child]) == []


def test_cancel_under_a_launcher_that_dies_on_sigterm_waits_for_the_engine_to_finish_its_checkpoint(
        fake_engine, tmp_path):
    """PythonSlicer dies at once on SIGTERM; killing the group then would cut the checkpoint short."""
    marker = tmp_path / "checkpoint-written"
    process = fake_process(fake_engine, "checkpoint", marker, python=launcher(tmp_path, sys.executable)).start()
    events = []
    while not any(e["event"] == "step" for e in events):
        assert process.running, process.stderr_tail
        process.wait(0.1)
        events += process.poll()
    process.cancel(grace=20.0)
    process.wait(60)
    assert marker.read_text() == "complete"


# --- runs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, shipped, engine):
    """Start -> stop after step 1 -> reopen -> resume -> done, recording what was listed on the way."""
    from VoCoCommonLib.runs import Runs
    from VoCoCommonLib.settings import read_settings

    folder = tmp_path_factory.mktemp("lifecycle")
    settings = read_settings({**os.environ, "VOCO_ENGINE_PYTHON": engine.python,
                              "VOCO_MODELS_DIR": str(folder / "models")})
    workspace = folder / "runs"
    seen = {}
    runs = Runs(workspace, settings)
    run = runs.start_pretraining([shipped["spine-mri"]], preset="demo", backbone="swinunetr-tiny", steps=STEPS,
                                 name="tiny", batch_size=1, checkpoint_every=100, device="cpu")
    seen["listed_after_start"] = [(r.name, r.state) for r in runs.list_runs()]
    deadline = time.monotonic() + 300
    while not (runs.info(run).step or 0) >= 1:
        assert time.monotonic() < deadline and runs.info(run).state == "running", runs.info(run)
        time.sleep(0.2)
    seen["stop_sent"] = runs.stop(run)
    seen["after_stop"] = runs.wait(run, timeout=120)
    seen["info_stopped"] = runs.info(run)
    reopened = Runs(workspace, settings)                    # the module closed and opened again
    seen["reopened_stopped"] = [(r.name, r.state, r.step) for r in reopened.list_runs()]
    reopened.resume("tiny")
    seen["reopened_again"] = [(r.name, r.state) for r in Runs(workspace, settings).list_runs()]
    seen["final"] = reopened.wait(run, timeout=300)
    seen["info_done"] = Runs(workspace, settings).info("tiny")
    seen["run"], seen["settings"] = run, settings
    return seen


def test_run_lists_running_then_stops_on_sigterm_and_resumes_to_done(lifecycle):
    from VoCoCommonLib.runs import DONE, RUNNING, STOPPED

    assert lifecycle["listed_after_start"] == [("tiny", RUNNING)]
    assert lifecycle["stop_sent"] is True
    assert lifecycle["after_stop"] == STOPPED
    stopped = lifecycle["info_stopped"]
    assert stopped.checkpoint and Path(stopped.checkpoint).name == "checkpoint.pt" and stopped.resumable
    assert 1 <= stopped.step < STEPS and stopped.total == STEPS
    run = Path(lifecycle["run"])
    job = json.loads((run / "job.json").read_text())
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert "stopped" in kinds and kinds.count("launch") == 2 and kinds[-2:] == ["done", "exit"]
    assert [e["returncode"] for e in events if e["event"] == "exit"] == [143, 0]
    assert job["returncode"] == 0 and job["attempts"] == 2 and "--resume" in job["command"]
    assert lifecycle["reopened_stopped"] == [("tiny", STOPPED, stopped.step)]
    assert lifecycle["reopened_again"] == [("tiny", RUNNING)]
    done = lifecycle["info_done"]
    assert lifecycle["final"] == DONE and done.state == DONE
    assert done.step == STEPS and done.total == STEPS and np.isfinite(done.loss)
    assert (run / "engine.log").is_file()


def test_a_failed_run_says_why_in_the_engines_words(tmp_path, engine):
    from VoCoCommonLib.runs import FAILED, Runs

    runs = Runs(tmp_path / "runs", settings_for(tmp_path, engine))
    run = runs.start_pretraining([tmp_path / "missing.nii.gz"], backbone="swinunetr-tiny", steps=2, name="bad")
    assert runs.wait(run, timeout=120) == FAILED
    info = runs.list_runs()[0]
    assert (info.name, info.state, info.checkpoint, info.resumable) == ("bad", FAILED, None, False)
    assert "missing.nii.gz" in info.message
    with pytest.raises(RuntimeError, match="no checkpoint"):
        runs.resume(run)


def test_a_run_stopped_before_its_first_checkpoint_is_stopped_and_resumes_from_the_start(tmp_path, shipped, engine):
    from VoCoCommonLib.runs import DONE, STOPPED, Runs

    runs = Runs(tmp_path / "runs", settings_for(tmp_path, engine))
    run = runs.start_pretraining([shipped["spine-mri"]], preset="demo", backbone="swinunetr-tiny", steps=2,
                                 name="early", batch_size=1, device="cpu")
    assert runs.stop(run) is True  # while the engine still imports: SIGTERM ends it before any checkpoint
    assert runs.wait(run, timeout=120) == STOPPED
    info = runs.info(run)
    assert info.checkpoint is None and info.resumable
    runs.resume(run, steps=3)
    assert runs.wait(run, timeout=300) == DONE
    job = json.loads((Path(run) / "job.json").read_text())
    assert "--resume" not in job["command"] and job["command"][job["command"].index("--steps") + 1] == "3"
    assert runs.info(run).step == 3


def test_a_resume_replays_only_the_command_job_json_kept_never_a_launch_line_of_events_jsonl(tmp_path):
    """events.jsonl also holds what the engine printed (and a folder may hold one nobody started):
    its launch lines are never run again; job.json, which only the front end writes, says the command."""
    from VoCoCommonLib import events as ev
    from VoCoCommonLib.runs import Runs

    started = []

    class Ended:  # a process that has already ended
        pid = None

        def wait(self):
            return 0

        def poll(self):
            return 0

    runs = Runs(tmp_path / "runs", start_process=lambda command, *_: started.append(command) or Ended())
    forged = runs.workspace / "forged"
    forged.mkdir(parents=True)
    ev.append_event(forged / "events.jsonl", {"event": ev.LAUNCH, "args": ["pretrain", "--out", str(tmp_path)]})
    ev.append_event(forged / "events.jsonl", {"event": ev.STOP_REQUESTED})
    with pytest.raises(RuntimeError, match="no checkpoint"):
        runs.resume("forged")
    assert started == [] and sorted(p.name for p in forged.iterdir()) == ["events.jsonl"]

    run = runs.start_pretraining(["scan.nii.gz"], steps=2, name="early", device="cpu")
    deadline = time.monotonic() + 30
    while json.loads((run / "job.json").read_text()).get("returncode") is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ev.append_event(run / "events.jsonl", {"event": ev.STOP_REQUESTED})
    runs.resume(run, steps=3)
    first, again = started
    assert again[again.index("-m") + 1:] == first[first.index("-m") + 1:first.index("--steps") + 1] + ["3"] + \
        first[first.index("--steps") + 2:]


def test_stopping_under_a_launcher_that_dies_keeps_the_run_running_until_its_checkpoint_is_written(
        tmp_path, shipped, engine):
    """The launcher dies at once; the engine holds the run's lock while it checkpoints, so the run is
    not shown stopped (and cannot be resumed twice) before its checkpoint is whole."""
    from VoCoCommonLib.runs import DONE, RUNNING, STOPPED, Runs

    runs = Runs(tmp_path / "runs", settings_for(tmp_path, engine, python=launcher(tmp_path, engine.python)))
    run = runs.start_pretraining([shipped["spine-mri"]], preset="demo", backbone="swinunetr-tiny", steps=40,
                                 name="launched", batch_size=1, checkpoint_every=1000, device="cpu")
    deadline = time.monotonic() + 300
    while (runs.info(run).step or 0) < 1:
        assert time.monotonic() < deadline and runs.info(run).state == RUNNING, runs.info(run)
        time.sleep(0.1)
    launcher_pid = json.loads((Path(run) / "job.json").read_text())["pid"]
    assert runs.stop(run)
    states = []
    while (state := runs.info(run).state) == RUNNING:
        states.append((state, living([launcher_pid]) == []))
        time.sleep(0.05)
    assert state == STOPPED
    assert any(launcher_gone for _, launcher_gone in states), "the launcher outlived the engine"
    assert runs.info(run).checkpoint
    runs.resume(run, steps=2)
    assert runs.wait(run, timeout=300) == DONE


FRONT_END = '''
import sys, time
sys.path.insert(0, {common!r})
from VoCoCommonLib.runs import Runs
from VoCoCommonLib.settings import read_settings
runs = Runs({workspace!r}, read_settings())
run = runs.start_pretraining([{data!r}], preset="demo", backbone="swinunetr-tiny", steps={steps}, name="orphan",
                             batch_size=1, checkpoint_every=100, device="cpu")
while (runs.info(run).step or 0) < 1:
    time.sleep(0.1)
print("step 1 seen; the front end goes away", flush=True)
'''


def test_a_run_goes_on_when_its_front_end_exits_and_the_next_session_sees_it_finish(tmp_path, shipped, engine):
    from VoCoCommonLib.runs import DONE, RUNNING, Runs

    settings = settings_for(tmp_path, engine)
    script = FRONT_END.format(common=str(REPO / "VoCoCommon"), workspace=str(tmp_path / "runs"),
                              data=str(shipped["spine-mri"]), steps=6)
    env = {**os.environ, "VOCO_ENGINE_PYTHON": engine.python, "VOCO_MODELS_DIR": str(tmp_path / "models")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = Runs(tmp_path / "runs", settings)                # a new session, as after restarting Slicer
    assert runs.info("orphan").state == RUNNING
    assert runs.wait("orphan", timeout=300) == DONE
    info = runs.info("orphan")
    assert info.step == 6 and info.checkpoint


def test_polling_a_run_costs_its_new_lines_not_its_history(tmp_path, engine):
    """A front end's timer reads every run twice a second: it must not re-parse events.jsonl."""
    from VoCoCommonLib.runs import Runs

    run = tmp_path / "runs" / "long"
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"kind": "pretrain", "name": "long", "started": 1.0}))
    with open(run / "events.jsonl", "w") as f:
        for step in range(1, 100_001):
            f.write(json.dumps({"event": "step", "step": step, "total": 200_000, "loss": 1.0 / step}) + "\n")
    runs = Runs(tmp_path / "runs", settings_for(tmp_path, engine))
    assert runs.info("long").step == 100_000  # the first read takes the history once
    with open(run / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": "step", "step": 100_001, "total": 200_000, "loss": 0.5}) + "\n")
        f.write('{"event": "step", "st')  # a line still being written
    cpu = time.thread_time()
    info = runs.info("long")
    assert time.thread_time() - cpu < 0.02
    assert info.step == 100_001 and info.loss == 0.5


def test_events_tail_returns_whole_lines_only(tmp_path):
    from VoCoCommonLib.events import JsonLinesTail

    path = tmp_path / "events.jsonl"
    tail = JsonLinesTail(path)
    assert tail.read_new() == []
    path.write_text('{"event": "a"}\nnot json\n{"event": "b"')
    assert tail.read_new() == [{"event": "a"}]
    with open(path, "a") as f:
        f.write(', "x": 1}\n')
    assert tail.read_new() == [{"event": "b", "x": 1}] and tail.read_new() == []


# --- the training set ------------------------------------------------------------------------------

def corrected_case(shape, seed):
    """A volume and a 'corrected' segmentation: liver = a sphere, spleen = a box."""
    import slicer

    from phantoms import sphere_image, sphere_mask

    affine = oblique_affine(shape=shape, degrees=(10.0 * seed, 5.0))
    volume = add_volume(sphere_image(affine, shape), affine, f"case{seed}")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"seg{seed}")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    liver = segmentation.GetSegmentation().AddEmptySegment("a", "liver")
    spleen = segmentation.GetSegmentation().AddEmptySegment("b", "spleen")
    mask = sphere_mask(affine, shape)
    box = np.zeros(shape, np.uint8)
    box[2:10, 2:10, 2:8] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8).transpose(2, 1, 0).copy(), segmentation,
                                                     liver, volume)
    slicer.util.updateSegmentBinaryLabelmapFromArray(box.transpose(2, 1, 0).copy(), segmentation, spleen, volume)
    return volume, segmentation, affine, mask, box


def test_training_set_cases_are_on_the_image_grid_with_the_models_label_values(mrml, tmp_path, monkeypatch):
    import slicer

    from VoCoCommonLib.training_set import TrainingSet
    from VoCoCommonLib.volumes import read_nrrd

    monkeypatch.setitem(sys.modules, "nrrd", None)  # Slicer ships no pynrrd: adding a case must not need it
    store = TrainingSet(tmp_path / "cases")
    for seed in (1, 2):
        volume, segmentation, affine, mask, box = corrected_case((48, 40, 20), seed)
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        case = store.add(volume, segmentation, [{"value": 1, "name": "liver"}, {"value": 5, "name": "spleen"}])
        assert case == f"case_{seed:04d}"
        assert slicer.mrmlScene.GetNumberOfNodes() == nodes  # the export's temporary nodes are gone
        labels, matrix = read_nrrd(tmp_path / "cases" / "labelsTr" / f"{case}.nrrd")
        _, image_matrix = read_nrrd(tmp_path / "cases" / "imagesTr" / f"{case}.nrrd")
        np.testing.assert_allclose(matrix, affine, atol=1e-9)
        np.testing.assert_array_equal(matrix, image_matrix)
        np.testing.assert_array_equal(labels.transpose(2, 1, 0) == 1, mask & ~box.astype(bool))
        np.testing.assert_array_equal(labels.transpose(2, 1, 0) == 5, box.astype(bool))
    dataset = json.loads((tmp_path / "cases" / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "liver", "5": "spleen"}
    assert dataset["numTraining"] == 2 and store.count == 2
    assert [c["case_id"] for c in store.cases()] == ["case_0001", "case_0002"]


def test_training_set_survives_a_crash_while_writing(mrml, tmp_path, monkeypatch):
    from VoCoCommonLib import training_set as module
    from VoCoCommonLib.training_set import TrainingSet
    from VoCoCommonLib.volumes import read_nrrd

    store = TrainingSet(tmp_path / "cases")
    shape = (16, 16, 12)
    volume, segmentation, *_ = corrected_case(shape, 1)
    store.add(volume, segmentation, {"liver": 1, "spleen": 2})
    good = (tmp_path / "cases" / "dataset.json").read_text()

    real_replace = os.replace
    for crash_on in ("dataset.json", "labelsTr"):  # after both case files / between image and label
        def crashing_replace(src, dst, crash_on=crash_on):
            if crash_on in Path(dst).parts:
                raise OSError("simulated crash")
            return real_replace(src, dst)

        monkeypatch.setattr(module.os, "replace", crashing_replace)
        with pytest.raises(OSError, match="simulated crash"):
            store.add(volume, segmentation, {"liver": 1, "spleen": 2})
        monkeypatch.setattr(module.os, "replace", real_replace)
        assert (tmp_path / "cases" / "dataset.json").read_text() == good  # the previous one, whole
        assert store.count == 1

    # a crash that left a half-written temporary file and an orphan case behind
    (tmp_path / "cases" / "labelsTr" / ".tmp-case_0002.nrrd").write_bytes(b"NRRD0004\npartial")
    assert (tmp_path / "cases" / "imagesTr" / "case_0002.nrrd").exists()  # orphan from the first crash
    volume2, segmentation2, *_ = corrected_case(shape, 2)
    assert store.add(volume2, segmentation2, {"liver": 1, "spleen": 2}) == "case_0002"
    assert store.count == 2
    names = sorted(p.name for p in (tmp_path / "cases").rglob("*") if p.is_file())
    assert names == ["case_0001.nrrd", "case_0001.nrrd", "case_0002.nrrd", "case_0002.nrrd", "dataset.json"]
    labels, _ = read_nrrd(tmp_path / "cases" / "labelsTr" / "case_0002.nrrd")
    assert set(np.unique(labels)) == {0, 1, 2}


def test_training_set_keeps_the_label_values_a_result_tagged_its_segments_with(mrml, tmp_path):
    from VoCoCommonLib.training_set import LABEL_VALUE_TAG, TrainingSet
    from VoCoCommonLib.volumes import read_nrrd

    volume, segmentation, _, mask, box = corrected_case((16, 16, 12), 1)
    segments = segmentation.GetSegmentation()
    segments.GetSegment("a").SetTag(LABEL_VALUE_TAG, "3")  # as segmentation_from_output tags them
    segments.GetSegment("b").SetTag(LABEL_VALUE_TAG, "7")
    store = TrainingSet(tmp_path / "cases")
    case = store.add(volume, segmentation)
    dataset = json.loads((tmp_path / "cases" / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "3": "liver", "7": "spleen"}
    labels, _ = read_nrrd(tmp_path / "cases" / "labelsTr" / f"{case}.nrrd")
    np.testing.assert_array_equal(labels.transpose(2, 1, 0) == 7, box.astype(bool))


# --- the environment probe -----------------------------------------------------------------------

def test_devices_and_messages_from_the_probes_answer():
    from VoCoCommonLib.environment import environment_from_probe

    env = environment_from_probe({"torch": "2.13.0", "cuda_build": "12.8", "cuda": [], "mps": False, "missing": []})
    assert [d.id for d in env.devices] == ["auto", "cpu"] and "sees no GPU" in env.message and env.ready
    env = environment_from_probe({"torch": "2.13.0", "cuda_build": "12.8", "mps": False, "missing": ["monai>=1.4"],
                                  "cuda": [{"index": 0, "name": "H100", "memory_gb": 79.2},
                                           {"index": 1, "name": "T400", "memory_gb": 4.0}]})
    assert [d.id for d in env.devices] == ["auto", "cuda:0", "cuda:1", "cpu"] and "GPU 1 has 4.0 GB" in env.message
    assert not env.ready and env.missing == ["monai>=1.4"]
    env = environment_from_probe({"torch": None, "problem": "No module named 'torch'", "missing": ["monai>=1.4"]})
    assert [d.id for d in env.devices] == ["cpu"] and env.missing == ["torch", "monai>=1.4"]


def test_the_probe_asks_the_engines_interpreter_in_the_background(tmp_path, engine):
    from VoCoCommonLib.client import EngineClient
    from VoCoCommonLib.environment import ProbeJob

    job = ProbeJob(EngineClient(settings_for(tmp_path, engine))).start()
    assert job.wait(120)
    env = job.environment()
    assert env.ready, env
    assert env.devices[0].id == "auto" and env.devices[-1].id == "cpu"
    missing = ProbeJob(EngineClient(settings_for(tmp_path, engine, python=str(tmp_path / "no-python")))).start()
    assert missing.wait(60)
    assert not missing.environment().ready and "no-python" in missing.environment().problem


# --- the dependency installer -------------------------------------------------------------------------

@pytest.fixture
def installer(monkeypatch):
    """slicer.util's dialogs, pip_install and restart recorded; a PyTorchUtils that, like the real
    one, imports torch at the end of installTorch."""
    import slicer
    import slicer.util

    calls = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: True), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: calls.append("ok?") or True)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kw: calls.append("restart?") or False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirements: calls.append(("pip", requirements)))
    monkeypatch.setattr(slicer.util, "restart", lambda: calls.append("restart"))
    monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)  # Slicer 5.10: no slicer.packaging

    def install_torch(askConfirmation=False, torchVersionRequirement=None, **kw):
        calls.append(("installTorch", torchVersionRequirement))
        monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # as PyTorchUtils imports it
        return sys.modules["torch"]

    utils = types.ModuleType("PyTorchUtils")
    utils.PyTorchUtilsLogic = lambda: types.SimpleNamespace(installTorch=install_torch)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", utils)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    return calls


def test_installing_torch_through_the_pytorch_extension_needs_no_restart(installer):
    from VoCoCommonLib import dependencies

    assert "never_imported" not in sys.modules
    assert dependencies.install(["torch", "never-imported>=1.0"]) is True
    assert installer == ["ok?", ("installTorch", dependencies.TORCH_REQUIREMENT), ("pip", "never-imported>=1.0")]


def test_updating_a_package_slicer_has_imported_asks_for_a_restart(installer):
    from VoCoCommonLib import dependencies

    assert "numpy" in sys.modules
    assert dependencies.install(["numpy>=1.24"]) is False
    assert installer == ["ok?", ("pip", "numpy>=1.24"), "restart?"]


def test_slicer_512_installs_with_pip_ensure_which_handles_restarting(installer, monkeypatch):
    import slicer

    from VoCoCommonLib import dependencies

    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = lambda requirements, **kw: installer.append(("pip_ensure", list(requirements),
                                                                        kw["prompt_restart"]))
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    assert dependencies.install(["numpy>=1.24"]) is True
    assert installer == ["ok?", ("pip_ensure", ["numpy>=1.24"], True)]


# --- settings and releases ------------------------------------------------------------------------------

def test_environment_settings_are_read_in_one_place():
    """VOCO_SLICER_HOME, VOCO_MODELS_DIR, VOCO_REGISTRY, VOCO_ENGINE_PYTHON, VOCO_WARM_ENGINE: settings.py only."""
    readers = []
    for path in list((REPO).glob("VoCo*/**/*.py")) + list((REPO / "voco_studio").glob("*.py")):
        text = path.read_text()
        for name in ("VOCO_SLICER_HOME", "VOCO_MODELS_DIR", "VOCO_REGISTRY", "VOCO_ENGINE_PYTHON", "VOCO_WARM_ENGINE"):
            if name in text and path.name != "settings.py":
                readers.append(f"{path.relative_to(REPO)}: {name}")
    assert readers == []


def test_defaults_and_overrides_of_the_settings(tmp_path):
    from VoCoCommonLib.client import EngineClient
    from VoCoCommonLib.settings import read_settings

    settings = read_settings({"HOME": str(tmp_path)})
    assert settings.warm_engine and EngineClient(settings).warm is not None  # segmentations go to voco serve
    assert EngineClient(read_settings({"VOCO_WARM_ENGINE": "0"})).warm is None  # one process per segmentation
    assert settings.runs_dir.name == "runs" and settings.training_set_dir.name == "training-set"
    assert settings.models_dir.parts[-3:] == (".cache", "voco", "models")
    assert settings.engine_dir == REPO and settings.requirements_file == REPO / "Resources" / "requirements.txt"
    custom = read_settings({"VOCO_SLICER_HOME": str(tmp_path / "h"), "VOCO_MODELS_DIR": str(tmp_path / "m"),
                            "VOCO_ENGINE_PYTHON": "/opt/py"})
    assert custom.home == tmp_path / "h" and custom.engine_python == "/opt/py"
    assert custom.engine_environment()["VOCO_MODELS_DIR"] == str(tmp_path / "m")
    assert custom.engine_environment()["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


def test_an_older_slicer_gets_one_line_and_a_supported_one_none():
    from VoCoCommonLib.release import unsupported_message

    assert unsupported_message(5, 10) is None and unsupported_message(5, 12) is None and unsupported_message(6, 0) is None
    message = unsupported_message(5, 8)
    assert "5.10 or newer" in message and "5.8" in message and "\n" not in message


def test_popen_options_hide_the_console_window_on_windows(monkeypatch):
    from VoCoCommonLib import process

    assert process.popen_options() == {"start_new_session": True}
    if sys.platform != "win32":
        class StartupInfo:
            dwFlags, wShowWindow = 0, 1

        monkeypatch.setattr(process, "WINDOWS", True)
        monkeypatch.setattr(process.subprocess, "STARTUPINFO", StartupInfo, raising=False)
        monkeypatch.setattr(process.subprocess, "STARTF_USESHOWWINDOW", 1, raising=False)
        monkeypatch.setattr(process.subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
        options = process.popen_options()
        assert options["creationflags"] == 0x200
        assert options["startupinfo"].dwFlags & 1 and options["startupinfo"].wShowWindow == 0


def test_the_probe_script_needs_only_the_standard_library():
    script = (REPO / "VoCoCommon" / "VoCoCommonLib" / "environment_probe.py").read_text()
    imported = {line.split()[1].split(".")[0] for line in script.splitlines()
                if line.startswith(("import ", "from ")) and not line.startswith("from __future__")}
    assert imported <= set(sys.stdlib_module_names) | {"packaging"}


def test_the_engine_log_gives_a_view_only_the_lines_it_has_not_shown():
    from VoCoCommonLib.engine_log import EngineLog

    log = EngineLog(max_lines=3)
    log.add("segment", [{"event": "start", "time": 0, "model": "vocomni-b"}, {"event": "log", "line": "a warning"}])
    first = log.since(0)
    assert [line.split(" ", 1)[1] for line in first] == ["segment: start model=vocomni-b", "segment: a warning"]
    log.add("segment", [{"event": "error", "message": "broken", "time": 0}])
    assert [line.split(" ", 1)[1] for line in log.since(2)] == ["segment: error: broken"]
    log.add("segment", [{"event": "exit", "returncode": 2, "time": 0}] * 4)  # more than it keeps
    assert len(log.since(3)) == 3 and log.since(log.total) == []
