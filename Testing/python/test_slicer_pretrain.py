"""VoCoPretrainLib against real MRML (PyPI slicer-core) and the real engine run as a subprocess.

One short real pretraining run (spine MRI, demo preset, tiny backbone, batch 1) is shared by the
module: it is stopped by SIGTERM after its first step, resumed to the end, and its checkpoint and
events then feed the position-prediction and curve tests.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
for module in ("VoCoPretrain", "VoCoSegmentation"):
    if str(REPO / module) not in sys.path:
        sys.path.insert(0, str(REPO / module))

from VoCoPretrainLib import overlays  # noqa: E402
from VoCoPretrainLib.curves import TrainingCurves  # noqa: E402
from VoCoPretrainLib.logic import PretrainLogic  # noqa: E402
from VoCoPretrainLib.runs import DONE, FAILED, RUNNING, STOPPED, Runs  # noqa: E402

STEPS = 3


def load_image(path, name="image"):
    """A NIfTI file into the scene with its own geometry (slicer-core has no file readers)."""
    import slicer.util

    array, ijk_to_ras = overlays.read_nifti(path)
    return slicer.util.addVolumeFromArray(array.astype(np.float32), ijk_to_ras, name)


def ras_to_ijk(volume_node, ras) -> tuple[int, int, int]:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(matrix)
    ijk = matrix.MultiplyPoint([*map(float, ras), 1.0])[:3]
    return tuple(int(round(c)) for c in ijk)


def wait_for(predicate, timeout=120.0, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


# --- the shared real run -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, shipped):
    """Start -> stop after step 1 -> reopen -> resume -> done, recording what was listed on the way."""
    workspace = tmp_path_factory.mktemp("workspace")
    seen = {}
    logic = PretrainLogic(workspace)
    run = logic.start_pretraining([shipped["spine-mri"]], preset="demo", backbone="swinunetr-tiny", steps=STEPS,
                                  name="tiny", batch_size=1, checkpoint_every=100, device="cpu")
    seen["listed_after_start"] = [(r.name, r.state) for r in logic.list_runs()]
    wait_for(lambda: any(e.get("event") == "step" for e in logic.runs.new_events(run)), timeout=150)
    seen["stop_sent"] = logic.stop(run)
    seen["after_stop"] = logic.runs.wait(run, timeout=120)
    seen["info_stopped"] = logic.info(run)
    reopened = PretrainLogic(workspace)                     # the module closed and opened again
    seen["reopened_stopped"] = [(r.name, r.state, r.step) for r in reopened.list_runs()]
    reopened.resume("tiny")
    seen["reopened_again"] = [(r.name, r.state) for r in PretrainLogic(workspace).list_runs()]
    seen["final"] = reopened.runs.wait(run, timeout=150)
    seen["info_done"] = PretrainLogic(workspace).info("tiny")
    seen["run"] = run
    return seen


def test_run_lists_running_then_stops_on_sigterm_and_resumes_to_done(lifecycle):
    assert lifecycle["listed_after_start"] == [("tiny", RUNNING)]
    assert lifecycle["stop_sent"] is True
    assert lifecycle["after_stop"] == STOPPED
    stopped = lifecycle["info_stopped"]
    assert stopped.checkpoint and Path(stopped.checkpoint).name == "checkpoint.pt" and stopped.resumable
    assert 1 <= stopped.step < STEPS and stopped.total == STEPS
    job = json.loads((Path(lifecycle["run"]) / "job.json").read_text())
    events = [json.loads(line) for line in (Path(lifecycle["run"]) / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert "stopped" in kinds and kinds.count("launch") == 2 and kinds[-2:] == ["done", "exit"]
    assert [e["returncode"] for e in events if e["event"] == "exit"] == [143, 0]
    assert job["returncode"] == 0 and job["attempts"] == 2 and "--resume" in job["command"]
    # a new logic on the same workspace (module reopened) sees the stopped run, then the resumed one running
    assert lifecycle["reopened_stopped"] == [("tiny", STOPPED, stopped.step)]
    assert lifecycle["reopened_again"] == [("tiny", RUNNING)]
    done = lifecycle["info_done"]
    assert lifecycle["final"] == DONE and done.state == DONE
    assert done.step == STEPS and done.total == STEPS and math.isfinite(done.loss)


def test_runs_report_failure_with_the_engines_message(tmp_path):
    runs = Runs(tmp_path)
    run = runs.start_pretraining([tmp_path / "missing.nii.gz"], backbone="swinunetr-tiny", steps=2, name="bad")
    assert runs.wait(run, timeout=120) == FAILED
    info = runs.list_runs()[0]
    assert (info.name, info.state, info.checkpoint, info.resumable) == ("bad", FAILED, None, False)
    assert "missing.nii.gz" in info.message
    with pytest.raises(RuntimeError, match="no checkpoint"):
        runs.resume(run)


def test_a_run_stopped_before_its_first_checkpoint_is_stopped_and_resumes_from_the_start(tmp_path, shipped):
    runs = Runs(tmp_path)
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


class FakeRunner:
    """A runner that follows ProcessProtocol without a process: replays events, then exits."""

    def __init__(self, args, events, returncode=0):
        self.command, self._events, self._code, self._started = list(args), list(events), returncode, False

    def start(self):
        self._started = True
        return self

    def poll(self):
        events, self._events = self._events, []
        return events + ([{"event": "exit", "returncode": self._code}] if events else [])

    def cancel(self, grace=5.0):
        self._events = []

    def wait(self, timeout=None):
        return self._code

    @property
    def running(self):
        return self._started and bool(self._events)

    @property
    def returncode(self):
        return None if self.running else self._code


def test_runs_take_an_injected_runner_and_read_state_from_its_events(tmp_path):
    script = [{"event": "start", "step": 0, "total": 4},
              {"event": "step", "step": 4, "total": 4, "loss": 0.5},
              {"event": "val_dice", "step": 4, "mean": 0.7, "dice": {"liver": 0.7}},
              {"event": "done", "step": 4, "best_mean_dice": 0.7, "model": "m"}]
    made = []
    runs = Runs(tmp_path, lambda args: made.append(FakeRunner(args, script)) or made[-1])
    run = runs.start_finetuning(tmp_path / "dataset.json", init="voco-b", steps=4, name="ft")
    assert runs.wait(run, timeout=10) == DONE
    assert made[0].command[:2] == ["finetune", "--data"] and "--init" in made[0].command
    info = runs.info("ft")
    assert (info.kind, info.step, info.total, info.loss, info.best_dice) == ("finetune", 4, 4, 0.5, 0.7)


# --- curves ------------------------------------------------------------------------------------

def test_curves_fill_a_table_and_one_series_per_loss_term(mrml):
    import slicer.util

    curves = TrainingCurves("recorded")
    base = {"event": "step", "total": 3, "loss_pos": 0.3, "loss_neg": 0.4, "loss_reg": 0.1, "grad_norm": 2.0}
    curves.add_events([{"event": "start", "step": 0, "total": 3}, {**base, "step": 1, "loss": 0.8}])
    curves.add_events([{**base, "step": 2, "loss": 0.7, "loss_inter": 0.05},
                       {"event": "val_dice", "step": 2, "mean": 0.6, "dice": {"grey": 0.5, "white": 0.7}},
                       {**base, "step": 3, "loss": None}])
    assert curves.columns() == ["step", "loss", "loss_neg", "loss_pos", "loss_reg", "loss_inter"]
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(curves.loss_table, "step"), [1, 2, 3])
    loss = slicer.util.arrayFromTableColumn(curves.loss_table, "loss")
    assert loss[:2].tolist() == [0.8, 0.7] and math.isnan(loss[2])
    inter = slicer.util.arrayFromTableColumn(curves.loss_table, "loss_inter")
    assert math.isnan(inter[0]) and inter[1] == 0.05
    assert curves.columns(curves.val_table) == ["step", "val_mean", "val_grey", "val_white"]
    assert slicer.util.arrayFromTableColumn(curves.val_table, "val_white").tolist() == [0.7]
    chart = curves.chart
    names = [chart.GetNthPlotSeriesNode(i).GetYColumnName() for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert sorted(names) == sorted(["loss", "loss_neg", "loss_pos", "loss_reg", "loss_inter", "val_mean",
                                    "val_grey", "val_white"])
    series = curves.series["val_mean"]
    assert series.GetTableNodeID() == curves.val_table.GetID() and series.GetXColumnName() == "step"


def test_curves_of_a_real_run_rebuild_from_its_files(mrml, lifecycle):
    import slicer.util

    logic = PretrainLogic(Path(lifecycle["run"]).parent)
    curves = logic.curves_for("tiny")
    steps = slicer.util.arrayFromTableColumn(curves.loss_table, "step")
    assert steps.tolist() == list(range(1, STEPS + 1))      # the resumed attempt goes on from the checkpoint
    assert {"loss", "loss_pos", "loss_neg", "loss_reg", "loss_inter"} <= set(curves.series)
    from_metrics = TrainingCurves("metrics")
    (Path(lifecycle["run"]) / "events.jsonl").rename(Path(lifecycle["run"]) / "events.saved")
    try:
        from_metrics.load_run(lifecycle["run"])
    finally:
        (Path(lifecycle["run"]) / "events.saved").rename(Path(lifecycle["run"]) / "events.jsonl")
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(from_metrics.loss_table, "loss"),
                               slicer.util.arrayFromTableColumn(curves.loss_table, "loss"))
    assert logic.update_curves() == {}


# --- overlays ----------------------------------------------------------------------------------

def assert_roi_matches(node, box, atol=1e-3):
    np.testing.assert_allclose(node.GetCenter(), box["center_ras"], atol=atol)
    np.testing.assert_allclose(node.GetSize(), box["size_mm"], atol=atol)
    corners = overlays.roi_corners(node)
    expected = np.asarray(box["corners_ras"])
    distances = np.linalg.norm(corners[:, None] - expected[None], axis=-1)
    assert distances.min(axis=1).max() < atol and distances.min(axis=0).max() < atol


def test_crop_layout_of_a_scene_volume_lands_at_its_ras_boxes(mrml, shipped, tmp_path):
    volume = load_image(shipped["spine-ct"], "spine CT")      # PIR orientation
    logic = PretrainLogic(tmp_path / "runs")
    nodes = logic.crop_layout(volume, tmp_path / "crops", preset="demo")
    layout = json.loads((tmp_path / "crops" / "layout.json").read_text())
    assert [n.GetName() for n in nodes.bases] == [f"base {b['index']}" for b in layout["bases"]]
    for node, box in zip(nodes.bases + nodes.targets, layout["bases"] + layout["targets"]):
        assert_roi_matches(node, box)
        assert node.GetLocked()
    assert nodes.bases[0].GetDisplayNode().GetSelectedColor() != nodes.targets[0].GetDisplayNode().GetSelectedColor()
    # the labelmap lies on the volume's grid and holds base k + 1 under base k's centre
    import slicer.util
    import vtk

    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(a)
    nodes.labelmap.GetIJKToRASMatrix(b)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(a), slicer.util.arrayFromVTKMatrix(b), atol=1e-4)
    labels = slicer.util.arrayFromVolume(nodes.labelmap)
    assert labels.shape == slicer.util.arrayFromVolume(volume).shape
    inside = 0
    for node, box in zip(nodes.bases, layout["bases"]):
        i, j, k = ras_to_ijk(nodes.labelmap, node.GetCenter())
        if 0 <= k < labels.shape[0] and 0 <= j < labels.shape[1] and 0 <= i < labels.shape[2]:
            assert labels[k, j, i] == box["index"] + 1
            inside += 1
    assert inside >= 1
    table = nodes.color_table
    assert table.GetNumberOfColors() == len(layout["bases"]) + 1 and table.GetColorName(4) == "base 3"


@pytest.mark.parametrize("flip", [False, True])
def test_rois_follow_oblique_and_left_handed_box_axes(mrml, tmp_path, flip):
    angle = np.deg2rad(30)
    axes = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
    if flip:
        axes[:, 2] *= -1
    affine = np.eye(4)
    affine[:3, :3] = axes * [1.5, 2.0, 3.0]
    affine[:3, 3] = [10, -20, 5]
    boxes = []
    for index, (lo, hi) in enumerate([((0, 0, 0), (8, 6, 4)), ((8, 0, 0), (16, 6, 4))]):
        lo, hi = np.array(lo, float), np.array(hi, float)
        corners = np.array([[(hi if (c >> d) & 1 else lo)[d] - 0.5 for d in range(3)] for c in range(8)])
        ras = corners @ affine[:3, :3].T + affine[:3, 3]
        boxes.append({"kind": "base", "index": index, "center_ras": ras.mean(axis=0).tolist(),
                      "size_mm": ((hi - lo) * [1.5, 2.0, 3.0]).tolist(), "corners_ras": ras.tolist()})
    (tmp_path / "layout.json").write_text(json.dumps({"box_axes_ras": axes.tolist(), "bases": boxes, "targets": []}))
    index_map = np.zeros((16, 6, 4), np.int16)
    index_map[:8], index_map[8:] = 1, 2
    nib.save(nib.Nifti1Image(index_map, affine), str(tmp_path / "layout.nii.gz"))
    nodes = overlays.load_layout(tmp_path)
    assert nodes.labelmap.GetAttribute(overlays.ROLE_ATTRIBUTE) == "layout"
    assert nodes.bases[0].GetAttribute(overlays.ROLE_ATTRIBUTE) == "base"
    for node, box in zip(nodes.bases, boxes):
        assert_roi_matches(node, box)
        i, j, k = ras_to_ijk(nodes.labelmap, node.GetCenter())
        import slicer.util

        assert slicer.util.arrayFromVolume(nodes.labelmap)[k, j, i] == box["index"] + 1


def test_position_predictions_of_a_checkpoint(mrml, lifecycle, shipped, tmp_path):
    import slicer.util
    import vtk

    logic = PretrainLogic(Path(lifecycle["run"]).parent)
    nodes = logic.position_predictions(shipped["spine-ct"], "tiny", tmp_path / "positions", device="cpu")
    positions = json.loads((tmp_path / "positions" / "positions.json").read_text())
    assert positions["checkpoint"].endswith("checkpoint.pt")
    bases, targets = len(positions["bases"]), len(positions["targets"])
    table = nodes.table
    assert table.GetNumberOfRows() == targets * bases
    rows = np.stack([slicer.util.arrayFromTableColumn(table, c) for c in overlays.POSITION_COLUMNS], axis=1)
    expected = [(t["index"], b, t["true"][b], t["predicted"][b]) for t in positions["targets"] for b in range(bases)]
    np.testing.assert_allclose(rows[:, :4], expected, atol=1e-6)
    np.testing.assert_allclose(rows[:, 4], rows[:, 3] - rows[:, 2], atol=1e-6)
    for node, target in zip(nodes.targets, positions["targets"]):
        assert_roi_matches(node, target)
        np.testing.assert_allclose(node.GetDisplayNode().GetSelectedColor(),
                                   overlays.error_color(target["mean_abs_error"]), atol=1e-6)
    matrix = vtk.vtkMatrix4x4()
    nodes.heatmap.GetIJKToRASMatrix(matrix)
    image = nib.load(str(shipped["spine-ct"]))
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), image.affine, atol=1e-4)
    heat = slicer.util.arrayFromVolume(nodes.heatmap)
    assert heat.shape == image.shape[::-1]
    predicted = positions["targets"][0]["predicted"]
    painted = np.unique(heat[heat != 0])
    assert painted.size and np.abs(painted[:, None] - np.asarray(predicted)[None]).min(axis=1).max() < 1e-5
    assert nodes.heatmap.GetDisplayNode().GetColorNodeID() == nodes.display["color_node_id"]
    assert nodes.heatmap.GetAttribute(overlays.ROLE_ATTRIBUTE) == "heatmap"
