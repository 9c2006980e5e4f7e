"""VoCo Studio's server side without a browser: the app object on real MRML (trame-slicer's
SlicerApp), driven through the same callbacks the page's buttons call. Skipped unless the
``studio`` extra (trame-slicer) is installed. The page itself is tested in headless Chromium."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("trame_slicer")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from trame.app import get_server

    from voco_studio.app import StudioApp

    server = get_server("voco-studio-test", client_type="vue3")
    return StudioApp(server, workdir=tmp_path_factory.mktemp("studio"))


def wait_for(app, condition, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out; jobs: {app.state.jobs}"
        app.poll_once()
        time.sleep(0.2)


def test_the_shipped_sample_volume_is_in_the_scene_and_the_3d_view_has_no_depth_peeling(studio):
    import slicer

    assert studio.state.status_text == "Loaded mni152-t1"
    volumes = list(studio.slicer_app.scene.GetNodesByClass("vtkMRMLScalarVolumeNode"))
    assert [v.GetName() for v in volumes] == [studio.state.volume_name]
    assert slicer.util.arrayFromVolume(volumes[0]).shape == (189, 233, 197)  # nilearn MNI152 2009, 1 mm, KJI
    threed = studio.slicer_app.view_manager.get_threed_views()
    assert threed
    renderers = threed[0].render_window().GetRenderers()
    assert all(not renderers.GetItemAsObject(i).GetUseDepthPeeling() for i in range(renderers.GetNumberOfItems()))


def test_a_segmentation_run_from_the_buttons_gives_a_named_coloured_segmentation_node(studio):
    studio.build_demo_model()
    assert studio.state.model.endswith("studio-demo")
    studio.state.device = "cpu"
    job_id = studio.run_segmentation()
    assert job_id and studio.state.seg_running
    rows = {row["id"]: row for row in studio.state.jobs}
    assert rows[job_id]["kind"] == "segment" and rows[job_id]["state"] == "running"

    wait_for(studio, lambda: not studio.state.seg_running)

    rows = {row["id"]: row for row in studio.state.jobs}
    assert rows[job_id]["state"] == "finished", rows[job_id]
    assert rows[job_id]["progress"] == 100
    nodes = list(studio.slicer_app.scene.GetNodesByClass("vtkMRMLSegmentationNode"))
    assert nodes == [studio.segmentation_node]
    assert [(s["name"], s["color"]) for s in studio.state.segments] == [("region A", "#dd8244"),
                                                                       ("region B", "#3d9be9")]
    assert studio.state.status_text == "Segmentation done: 2 segments"


def test_a_cancelled_run_leaves_no_new_node_and_shows_cancelled(studio):
    before = studio.slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    job_id = studio.run_segmentation()
    studio.cancel_segmentation()
    rows = {row["id"]: row for row in studio.state.jobs}
    assert rows[job_id]["state"] == "cancelled"
    assert not studio.state.seg_running
    studio.poll_once()
    assert studio.slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before


def test_the_loss_chart_has_one_path_per_loss_term():
    from voco_studio.chart import loss_chart_svg

    svg = loss_chart_svg({"step": [1.0, 2.0, 3.0], "loss": [0.9, 0.7, float("nan")], "loss_pos": [0.5, 0.4, 0.3]})
    assert svg.count('data-testid="loss-series"') == 2
    assert 'data-series="loss" data-points="2"' in svg and 'data-series="loss_pos" data-points="3"' in svg
    assert np.isfinite([float(c) for c in svg.split('d="M')[1].split('"')[0].replace("L", ",").split(",")]).all()
