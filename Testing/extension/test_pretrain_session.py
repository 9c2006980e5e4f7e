"""PretrainSession on real MRML and the real engine: a pretraining run started from a scene volume,
stopped, resumed and followed live; its curves; the crop layout and the position predictions as
overlays. Every tick goes through the GUI clock: none may cost the GUI thread 50 ms."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from test_segmentation_session import assert_gui_thread_budget

STEPS = 3


def new_session(engine, workspace):
    from VoCoCommonLib.client import EngineClient
    from VoCoCommonLib.settings import read_settings
    from VoCoPretrainLib.session import PretrainSession

    session = PretrainSession(EngineClient(read_settings({**os.environ, "VOCO_ENGINE_PYTHON": engine.python})))
    session.set_workspace(workspace)
    return session


def tick_until(session, condition, timeout=300.0):
    import pythonqt

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out; status: {session.state.status}"
        pythonqt.CLOCK.measure("PretrainSession.tick", session.tick)
        time.sleep(0.05)
    assert not pythonqt.CLOCK.errors, pythonqt.CLOCK.errors


@pytest.fixture
def clock():
    import pythonqt

    pythonqt.CLOCK.reset()
    yield pythonqt.CLOCK
    assert_gui_thread_budget()


def load_image(path, name="image"):
    """A NIfTI file into the scene with its own geometry (slicer-core has no file readers)."""
    import slicer.util

    from VoCoPretrainLib import overlays

    array, ijk_to_ras = overlays.read_nifti(path)
    return slicer.util.addVolumeFromArray(array.astype(np.float32), ijk_to_ras, name)


def ras_to_ijk(volume_node, ras) -> tuple[int, int, int]:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(matrix)
    ijk = matrix.MultiplyPoint([*map(float, ras), 1.0])[:3]
    return tuple(int(round(c)) for c in ijk)


@pytest.fixture
def vtk_errors():
    """What VTK's error macros printed meanwhile (vtkOutputWindow)."""
    import vtk

    window = vtk.vtkStringOutputWindow()
    previous = vtk.vtkOutputWindow.GetInstance()
    vtk.vtkOutputWindow.SetInstance(window)
    yield window.GetOutput
    vtk.vtkOutputWindow.SetInstance(previous)


# --- a run, live ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_of_a_scene_volume(tmp_path_factory, shipped, engine):
    """Start from a scene volume -> stopped after its first step -> resumed -> done, through the
    session, recording what it showed on the way; then the crop layout and positions of that run."""
    import pythonqt
    from slicer_core_app import SlicerCoreApp

    app = SlicerCoreApp()
    app.install()
    pythonqt.CLOCK.reset()
    folder = tmp_path_factory.mktemp("pretrain-session")
    session = new_session(engine, folder / "runs")
    seen = {"curves": [], "overlays": []}
    session.curvesReady.connect(lambda curves: seen["curves"].append(curves.loss_table.GetNumberOfRows()))
    session.overlayReady.connect(lambda kind, nodes, volume: seen["overlays"].append((kind, nodes, volume)))
    volume = load_image(shipped["spine-mri"], "spine MRI")
    session.refresh()
    tick_until(session, lambda: session.state.environment is not None)
    seen["buttons_before"] = session.buttons(has_data=True, volume_node=volume)
    run = pythonqt.CLOCK.measure("start", session.start, session.collect_data(None, True, False), "demo",
                                 "swinunetr-tiny", STEPS, 1, "cpu", "scene", 100)
    seen["selected_after_start"] = session.state.selected
    tick_until(session, lambda: (session.state.run() is not None and (session.state.run().step or 0) >= 1))
    seen["buttons_running"] = session.buttons(has_data=True, volume_node=volume)
    seen["stop"] = pythonqt.CLOCK.measure("stop", session.stop)
    tick_until(session, lambda: session.state.run().state != "running")
    seen["stopped"] = session.state.run()
    seen["buttons_stopped"] = session.buttons(has_data=True, volume_node=volume)
    session.resume()
    tick_until(session, lambda: session.state.run().state == "done", timeout=600)
    seen["done"] = session.state.run()
    seen["rows"] = session.curves.loss_table.GetNumberOfRows()
    seen["columns"] = session.curves.columns()
    crops = session.crop_layout(volume, preset="demo", out_dir=folder / "crops")
    tick_until(session, lambda: crops.finished)
    positions = session.positions(volume, target=0, device="cpu", out_dir=folder / "positions")
    tick_until(session, lambda: positions.finished)
    seen.update(session=session, run=run, volume=volume, crops=crops, positions=positions, folder=folder,
                longest=pythonqt.CLOCK.longest(), slowest=pythonqt.CLOCK.longest("wall_s"))
    yield seen
    app.close()


def test_a_run_of_a_scene_volume_stops_after_a_checkpoint_and_resumes_to_done(run_of_a_scene_volume):
    seen = run_of_a_scene_volume
    run = Path(seen["run"])
    assert seen["buttons_before"].start.enabled and not seen["buttons_before"].stop.enabled
    assert seen["selected_after_start"] == str(run)
    assert seen["buttons_running"].stop.enabled and not seen["buttons_running"].resume.enabled
    assert seen["stop"] is True
    stopped = seen["stopped"]
    assert stopped.state == "stopped" and stopped.checkpoint and 1 <= stopped.step < STEPS
    assert seen["buttons_stopped"].resume.enabled and not seen["buttons_stopped"].stop.enabled
    assert seen["done"].step == STEPS and math.isfinite(seen["done"].loss)
    inputs = sorted(p.name for p in (run / "inputs").iterdir())
    assert inputs == ["000_spine_MRI.nrrd"]  # the scene volume, exported in the background
    assert seen["session"].state.status.startswith("scene: done, step 3 of 3")


def test_the_curves_follow_the_run_and_rebuild_from_its_files(run_of_a_scene_volume, mrml):
    import slicer.util

    from VoCoPretrainLib.curves import CurveColumns, TrainingCurves

    seen = run_of_a_scene_volume
    assert seen["rows"] == STEPS and seen["curves"] and seen["curves"][-1] == STEPS
    assert seen["columns"][0] == "step" and {"loss", "loss_pos", "loss_neg", "loss_reg"} <= set(seen["columns"])
    columns, tail = CurveColumns.from_run(seen["run"])
    assert tail is not None and columns.loss["step"] == [1.0, 2.0, 3.0]  # the resumed attempt goes on from step 2
    run = Path(seen["run"])
    (run / "events.jsonl").rename(run / "events.saved")
    try:
        from_metrics, tail = CurveColumns.from_run(run)  # a run started outside the front ends: metrics.jsonl
    finally:
        (run / "events.saved").rename(run / "events.jsonl")
    assert tail is None
    np.testing.assert_allclose(from_metrics.loss["loss"], columns.loss["loss"])
    curves = TrainingCurves("rebuilt")
    curves.show(columns)
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(curves.loss_table, "step"), [1, 2, 3])


def test_the_session_never_held_up_the_gui_thread(run_of_a_scene_volume):
    seen = run_of_a_scene_volume
    assert seen["longest"].cpu_s < 0.05, seen["longest"]
    assert seen["slowest"].wall_s < 0.5, seen["slowest"]


def test_curve_columns_and_one_series_per_loss_term(mrml):
    import slicer.util

    from VoCoPretrainLib.curves import CurveColumns, TrainingCurves

    columns = CurveColumns()
    base = {"event": "step", "total": 3, "loss_pos": 0.3, "loss_neg": 0.4, "loss_reg": 0.1, "grad_norm": 2.0}
    columns.add_events([{"event": "start", "step": 0, "total": 3}, {**base, "step": 1, "loss": 0.8}])
    curves = TrainingCurves("recorded")
    curves.show(columns)
    columns.add_events([{**base, "step": 2, "loss": 0.7, "loss_inter": 0.05},
                        {"event": "val_dice", "step": 2, "mean": 0.6, "dice": {"grey": 0.5, "white": 0.7}},
                        {**base, "step": 3, "loss": None}])
    curves.show(columns)
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


# --- overlays ------------------------------------------------------------------------------------

def assert_roi_matches(node, box, atol=1e-3):
    from VoCoPretrainLib import overlays

    np.testing.assert_allclose(node.GetCenter(), box["center_ras"], atol=atol)
    np.testing.assert_allclose(node.GetSize(), box["size_mm"], atol=atol)
    corners = overlays.roi_corners(node)
    expected = np.asarray(box["corners_ras"])
    distances = np.linalg.norm(corners[:, None] - expected[None], axis=-1)
    assert distances.min(axis=1).max() < atol and distances.min(axis=0).max() < atol


def test_crop_layout_of_a_scene_volume_lands_at_its_ras_boxes(mrml, shipped, tmp_path, engine, clock, vtk_errors):
    import slicer.util
    import vtk

    volume = load_image(shipped["spine-ct"], "spine CT")      # PIR orientation
    session = new_session(engine, tmp_path / "runs")
    shown = []
    session.overlayReady.connect(lambda kind, nodes, source: shown.append((kind, source)))
    job = session.crop_layout(volume, preset="demo", out_dir=tmp_path / "crops")
    tick_until(session, lambda: job.finished)
    assert job.succeeded, job.error
    nodes = job.nodes
    assert shown == [("crops", volume)]
    assert session.state.overlay_status == f"crop layout: {len(nodes.bases)} base crops, {len(nodes.targets)} targets"
    layout = json.loads((tmp_path / "crops" / "layout.json").read_text())
    assert [n.GetName() for n in nodes.bases] == [f"spine CT base {b['index']}" for b in layout["bases"]]
    for node, box in zip(nodes.bases + nodes.targets, layout["bases"] + layout["targets"]):
        assert_roi_matches(node, box)
        assert node.GetLocked()
    assert nodes.bases[0].GetDisplayNode().GetSelectedColor() != nodes.targets[0].GetDisplayNode().GetSelectedColor()
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
    assert "deprecated" not in vtk_errors()  # no SetNamesInitialised: an error on Slicer 5.10+


@pytest.mark.parametrize("flip", [False, True])
def test_rois_follow_oblique_and_left_handed_box_axes(mrml, tmp_path, flip):
    import nibabel as nib
    import slicer.util

    from VoCoPretrainLib import overlays

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
    nodes = overlays.layout_nodes(overlays.read_layout(tmp_path))
    assert nodes.labelmap.GetAttribute(overlays.ROLE_ATTRIBUTE) == "layout"
    assert nodes.bases[0].GetAttribute(overlays.ROLE_ATTRIBUTE) == "base"
    for node, box in zip(nodes.bases, boxes):
        assert_roi_matches(node, box)
        i, j, k = ras_to_ijk(nodes.labelmap, node.GetCenter())
        assert slicer.util.arrayFromVolume(nodes.labelmap)[k, j, i] == box["index"] + 1


def test_position_predictions_of_the_runs_checkpoint(run_of_a_scene_volume, shipped):
    import nibabel as nib
    import slicer.util
    import vtk

    from VoCoPretrainLib import overlays

    seen = run_of_a_scene_volume
    job = seen["positions"]
    assert job.succeeded, job.error
    nodes = job.nodes
    assert [kind for kind, _, _ in seen["overlays"]] == ["crops", "positions"]
    positions = json.loads((seen["folder"] / "positions" / "positions.json").read_text())
    assert positions["checkpoint"] == str(Path(seen["run"]) / "checkpoint.pt")
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
    image = nib.load(str(shipped["spine-mri"]))
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), image.affine, atol=1e-4)
    heat = slicer.util.arrayFromVolume(nodes.heatmap)
    assert heat.shape == image.shape[::-1]
    predicted = positions["targets"][0]["predicted"]
    painted = np.unique(heat[heat != 0])
    assert painted.size and np.abs(painted[:, None] - np.asarray(predicted)[None]).min(axis=1).max() < 1e-5
    assert nodes.heatmap.GetDisplayNode().GetColorNodeID() == nodes.display["color_node_id"]
    assert nodes.heatmap.GetAttribute(overlays.ROLE_ATTRIBUTE) == "heatmap"
    assert seen["session"].state.overlay_status.startswith(f"{targets} targets, mean absolute overlap error")


def test_scene_volumes_leave_out_label_maps_and_vocos_own_overlays(mrml, engine, tmp_path):
    import slicer

    session = new_session(engine, tmp_path / "runs")
    image = slicer.util.addVolumeFromArray(np.zeros((4, 4, 4), np.int16), name="image")
    slicer.util.addVolumeFromArray(np.zeros((4, 4, 4), np.int16), name="labels",
                                   nodeClassName="vtkMRMLLabelMapVolumeNode")
    heatmap = slicer.util.addVolumeFromArray(np.zeros((4, 4, 4), np.float32), name="heat")
    heatmap.SetAttribute("VoCo.overlay", "heatmap")
    assert session.scene_volumes() == [image]
    assert session.data_summary("/data/ct", True, False) == "Data: /data/ct, 1 scene volume(s)"
    with pytest.raises(ValueError, match="no data"):
        session.collect_data(None, False, False)


def test_a_model_downloaded_without_a_published_sha256_says_unverified_in_every_list(engine, tmp_path):
    from VoCoCommonLib.models import entries_from_event

    rows = [{"name": "organs", "version": "1", "kind": "segmentation", "installed": True, "path": "/m/organs",
             "url": "https://example.org/organs.zip", "verified": False},
            {"name": "voco-b", "version": "1", "kind": "backbone", "installed": False, "url": "https://x/b.pt",
             "verified": False},
            {"name": "spleen", "version": "1", "kind": "segmentation", "installed": True, "path": "/m/spleen",
             "url": "https://example.org/spleen.zip", "verified": True}]
    organs, backbone, spleen = entries_from_event({"models": rows})
    assert organs.title == "organs v1 — unverified: no published sha256"
    assert spleen.title == "spleen v1" and spleen.verified
    session = new_session(engine, tmp_path / "workspace")
    session.state.models = [organs, backbone, spleen]
    assert [title for _, title in session.finetune_starts()][:2] == [
        "voco-b v1 — published backbone (will download) — unverified: no published sha256",
        "organs v1 — unverified: no published sha256"]
