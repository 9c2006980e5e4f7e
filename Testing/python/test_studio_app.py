"""VoCo Studio's server side without a browser: the app object on real MRML (trame-slicer's
SlicerApp), driven through the same callbacks the page's buttons call. Skipped unless the
``studio`` extra (trame-slicer) is installed. The page itself is tested in headless Chromium."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trame_slicer")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    import os

    from trame.app import get_server

    from voco_studio.app import StudioApp

    models = tmp_path_factory.mktemp("installed-models")
    previous = os.environ.get("VOCO_MODELS_DIR")
    os.environ["VOCO_MODELS_DIR"] = str(models)  # the demo model is installed here, not in the user's cache
    server = get_server("voco-studio-test", client_type="vue3")
    yield StudioApp(server, workdir=tmp_path_factory.mktemp("studio"))
    if previous is None:
        del os.environ["VOCO_MODELS_DIR"]
    else:
        os.environ["VOCO_MODELS_DIR"] = previous


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


def test_the_demo_model_trains_in_the_background_and_segments_grey_and_white_matter(studio):
    studio.state.device = "cpu"
    run_dir = studio.train_demo_model()
    assert run_dir is not None, studio.state.status_text
    rows = {row["id"]: row for row in studio.state.jobs}
    assert rows[Path(run_dir).name]["kind"] == "finetune"
    wait_for(studio, lambda: studio.state.status_text.startswith("Demo model ready"), timeout=900)
    import os

    assert Path(studio.state.model).is_relative_to(os.environ["VOCO_MODELS_DIR"])  # installed (imported) there
    (version,) = studio.state.versions  # one case: its Dice is on the case it trained on, and says so
    assert version["version"] == "1" and version["validation"].endswith(" (n=1) on its training cases")
    assert float(version["validation"].split()[0]) > 0.5 and version["unseen"] == "—" and version["current"]
    assert studio.state.status_text.startswith("Demo model ready: Dice on its training cases ")
    assert studio.state.pretrain_runs == []  # a fine-tuning run is no pretraining run to pick

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
    assert [s["name"] for s in studio.state.segments] == ["grey matter", "white matter"]
    assert all(re.fullmatch(r"#[0-9a-f]{6}", s["color"]) for s in studio.state.segments)
    assert studio.state.status_text == "Segmentation done: 2 segments"
    assert all(s["voxels"] > 0 for s in studio.state.segments)
    assert studio.state.segmentation_name == f"{studio.state.volume_name} segmentation (brain-tissue-demo v1)"
    # grey and white matter of the MNI152 (about 0.7 and 0.5 litres at 1 mm) within a factor of three: the 3 mm
    # demo model takes the cortex's partial-volume rim with it (about 1.4 litres of grey matter seen)
    voxels = {s["name"]: s["voxels"] for s in studio.state.segments}
    assert 250_000 < voxels["grey matter"] < 2_100_000 and 170_000 < voxels["white matter"] < 1_500_000
    # shown in 3D as surfaces, with the volume rendering out of their way
    assert studio.segmentation_node.GetSegmentation().ContainsRepresentation("Closed surface")
    assert not studio.slicer_app.volume_rendering.get_vr_display_node(studio.volume_node).GetVisibility()


def test_a_case_added_scores_its_version_and_a_row_rolls_back_only_to_a_version_the_server_listed(studio, tmp_path):
    import json
    import shutil

    assert studio.segmentation_node is not None  # the demo model's segmentation, uncorrected
    studio.state.model = studio.segmentation.versions("brain-tissue-demo")[0].spec
    studio.add_to_training_set()
    wait_for(studio, lambda: studio.state.training_set_count == 1 and not studio.segmentation.busy)
    (version_1,) = studio.state.versions
    assert version_1["unseen"] == "1.000 (n=1)"  # its own segmentation, not corrected: full agreement
    assert "had Dice 1.000 on it (before training on it)" in studio.segmentation.state.status

    copy = tmp_path / "demo-v2"  # a second version of the demo model, as a fine-tune would make
    shutil.copytree(version_1["spec"], copy)
    card = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps({**card, "version": "2"}))
    studio.segmentation.import_model(copy)
    wait_for(studio, lambda: len(studio.state.versions) == 2 and studio.state.model != version_1["spec"])
    assert [(v["version"], v["current"]) for v in studio.state.versions] == [("1", False), ("2", True)]
    assert set(studio.state.versions[0]) == {"spec", "name", "version", "unseen", "validation", "note", "current",
                                             "worse"}

    for not_offered in (str(copy), "../../etc", None, {"spec": version_1["spec"]}):
        studio.roll_back(not_offered)
        assert studio.state.status_text.startswith("Error: not a version in the model list")
        assert [v["current"] for v in studio.state.versions] == [False, True]
    studio.roll_back(version_1["spec"])
    assert studio.state.model == version_1["spec"]  # selected for segmentation and the next fine-tune
    assert [(v["version"], v["current"], v["note"]) for v in studio.state.versions] == [("1", True, "current"),
                                                                                      ("2", False, "")]
    assert studio.state.status_text == "brain-tissue-demo v1 is the current version; v2 kept"


def test_a_cancelled_run_leaves_no_new_node_and_shows_cancelled(studio):
    before = studio.slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    job_id = studio.run_segmentation()
    studio.cancel_segmentation()  # returns at once; the engine stops in the background
    assert studio.state.status_text == "Cancelling"
    wait_for(studio, lambda: not studio.state.seg_running)
    rows = {row["id"]: row for row in studio.state.jobs}
    assert rows[job_id]["state"] == "cancelled"
    assert studio.slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before
    assert studio.state.status_text == "Cancelled"


def test_the_loss_chart_has_one_path_per_loss_term():
    from voco_studio.chart import loss_chart_svg

    svg = loss_chart_svg({"step": [1.0, 2.0, 3.0], "loss": [0.9, 0.7, float("nan")], "loss_pos": [0.5, 0.4, 0.3]})
    assert svg.count('data-testid="loss-series"') == 2
    assert 'data-series="loss" data-points="2"' in svg and 'data-series="loss_pos" data-points="3"' in svg
    assert np.isfinite([float(c) for c in svg.split('d="M')[1].split('"')[0].replace("L", ",").split(",")]).all()


@pytest.mark.parametrize("window, library", [("vtkEGLRenderWindow", "EGL"), ("vtkOSOpenGLRenderWindow", "OSMesa")])
def test_views_render_headless_with_egl_and_with_osmesa(window, library):
    """What `voco-studio --check-rendering` says on a machine with no display: a GPU server's EGL
    names its GPU; here it is Mesa's llvmpipe on the CPU."""
    import ctypes.util
    import json
    import os
    import subprocess
    import sys

    if ctypes.util.find_library(library) is None:
        pytest.skip(f"lib{library} is not installed (Testing/e2e/install_system_packages.sh installs it)")
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"} | {"VTK_DEFAULT_OPENGL_WINDOW": window}
    run = subprocess.run([sys.executable, "-m", "voco_studio", "--check-rendering", "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["window"] == window
    assert report["pixels_drawn"] > 100 and report["renderer"] != "?"


def test_devices_come_from_the_engine_in_the_background(studio):
    wait_for(studio, lambda: studio.segmentation.state.environment is not None)
    values = [d["value"] for d in studio.state.devices]
    assert values[0] == "auto" and values[-1] == "cpu"
    assert "CPU-only build" in studio.state.device_note or any(v.startswith("cuda") for v in values)


def test_the_crop_layout_is_drawn_over_the_volume_alone(studio):
    assert studio.show_crop_layout() is not None, studio.state.status_text
    wait_for(studio, lambda: studio.pretrain.state.job is None)
    job = studio.pretrain.history[-1]
    assert job.kind == "crops" and job.succeeded, job.error
    nodes = job.nodes
    assert studio.state.status_text == f"Crop layout: {len(nodes.bases)} bases, {len(nodes.targets)} targets"
    for view in studio.slicer_app.view_manager.get_slice_views():
        assert view.get_foreground_opacity() == pytest.approx(0.4)
    segmentations = studio.slicer_app.scene.GetNodesByClass("vtkMRMLSegmentationNode")
    assert all(not node.GetDisplayNode().GetVisibility() for node in segmentations)


def test_a_missing_data_path_stops_the_start_with_one_line_naming_it(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "missing.nii.gz"
    run = subprocess.run([sys.executable, "-m", "voco_studio", "--data", str(missing), "--port", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and lines[0].startswith("error:"), run.stderr


def test_page_callbacks_return_nothing_and_async_ones_stay_awaitable(studio):
    import asyncio

    calls = []

    async def later(x):
        calls.append(x)
        return "not for the page"

    assert studio._cb(lambda x: calls.append(x) or "not for the page")(1) is None
    callback = studio._cb(later)
    assert asyncio.iscoroutinefunction(callback)
    assert asyncio.run(callback(2)) is None and calls == [1, 2]


def test_a_non_editable_install_carries_what_voco_studio_imports(tmp_path):
    """`pip install ".[studio]"` (not -e): the wheel must hold the modules' Lib packages and the
    voco-studio entry point, and VoCo Studio must import from it alone (no source checkout)."""
    import os
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[2]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(repo)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("voco-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("voco", "voco_studio", "VoCoCommonLib", "VoCoSegmentationLib", "VoCoPretrainLib"):
        assert f"{package}/__init__.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "voco-studio = voco_studio.cli:main" in entry_points
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                                str(tmp_path / "site"), str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    probe = ("import VoCoCommonLib, VoCoSegmentationLib, VoCoPretrainLib, voco_studio.app, voco_studio.cli\n"
             "print(*[m.__file__ for m in (VoCoCommonLib, VoCoSegmentationLib, VoCoPretrainLib, voco_studio.app)])")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert all(path.startswith(str(tmp_path / "site")) for path in run.stdout.split())


# --- what a page user can reach on the server (issue 12) -----------------------------------------------

def nifti_bytes(tmp_path) -> bytes:
    import nibabel as nib

    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(512, dtype=np.float32).reshape(8, 8, 8), np.eye(4)), str(path))
    return path.read_bytes()


def upload(studio, name: str, content: bytes) -> None:
    """What the page's file input sends: trame's file dict in the ``upload_files`` state."""
    studio._on_upload([{"name": name, "size": len(content), "type": "", "content": content}])


def page_sets(studio, **values) -> None:
    """What trame does with a change the page sends: update the state and run its @change handlers
    (which run once the state is ready, as the server makes it when it starts)."""
    studio.state.ready()
    with studio.state:
        studio.state.update(values)


def uploads_left(studio) -> list:
    return sorted(p.name for p in (studio.workdir / "uploads").rglob("*") if p.is_file()) \
        if (studio.workdir / "uploads").is_dir() else []


@pytest.mark.parametrize("name, header", [
    ("secret.nhdr", "NRRD0004\ntype: uint8\ndimension: 1\nsizes: {size}\nencoding: raw\ndata file: {target}\n\n"),
    ("secret.nrrd", "NRRD0004\ntype: uint8\ndimension: 1\nsizes: {size}\nencoding: raw\ndatafile: {target}\n\n"),
    ("secret.nii", "NRRD0004\ntype: uint8\ndimension: 1\nsizes: {size}\nencoding: raw\ndata file: {target}\n\n"),
    ("secret.mhd", "ObjectType = Image\nNDims = 1\nDimSize = {size}\nElementType = MET_UCHAR\n"
                   "ElementDataFile = {target}\n"),
    ("secret.hdr", "{target}"),
])
def test_an_upload_that_refers_to_another_file_is_refused_and_nothing_is_kept(studio, tmp_path, name, header):
    """A detached header would make the server read (and stream to the page) any file it can read."""
    target = tmp_path / "server-secret.raw"
    target.write_bytes(b"server secret!" * 4)
    before = studio.state.volume_name
    upload(studio, name, header.format(target=target, size=target.stat().st_size).encode())
    assert studio.state.status_text.startswith("Error:") and "self-contained" in studio.state.status_text
    assert studio.state.volume_name == before
    assert uploads_left(studio) == []


def test_a_self_contained_upload_loads_and_one_over_the_cap_or_not_a_volume_leaves_nothing(studio, tmp_path,
                                                                                             monkeypatch):
    upload(studio, "small.nii.gz", nifti_bytes(tmp_path))
    assert studio.state.status_text == "Loaded small.nii.gz"
    assert uploads_left(studio) == ["small.nii.gz"]
    upload(studio, "events.jsonl", b'{"event": "launch", "args": ["pretrain", "--help"]}\n')
    assert studio.state.status_text.startswith("Error:") and uploads_left(studio) == ["small.nii.gz"]
    upload(studio, "broken.nii.gz", b"\x1f\x8b not really gzip")
    assert studio.state.status_text.startswith("Error:") and uploads_left(studio) == ["small.nii.gz"]
    monkeypatch.setattr(studio, "max_upload_bytes", 1000)
    upload(studio, "large.nii.gz", nifti_bytes(tmp_path) + b"\0" * 1000)
    assert studio.state.status_text.startswith("Error:") and "upload limit" in studio.state.status_text
    assert uploads_left(studio) == ["small.nii.gz"]
    studio.ctrl.on_server_exited()  # what the server runs when it stops
    assert not (studio.workdir / "uploads").exists()


def test_server_paths_load_only_under_data_and_workdir_and_say_the_same_for_missing_and_existing(
        studio, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    existing = outside / "scan.nii.gz"
    existing.write_bytes(nifti_bytes(tmp_path))
    link = studio.workdir / "link-out.nii.gz"
    link.symlink_to(existing)
    before = studio.state.volume_name
    said = {}
    for name, path in {"existing": existing, "missing": outside / "none.nii.gz", "link": link,
                       "dotdot": studio.workdir / ".." / outside.name / "scan.nii.gz"}.items():
        studio.state.volume_path = str(path)
        studio.load_path()
        said[name] = studio.state.status_text.replace(str(path), "PATH")
        assert studio.state.volume_name == before, name
    assert len(set(said.values())) == 1 and said["existing"].startswith("Error: PATH:"), said
    studio.state.model_path = str(existing)
    studio.add_model_path()
    assert studio.state.status_text.replace(str(existing), "PATH") == said["existing"]
    inside = studio.workdir / "inside.nii.gz"
    inside.write_bytes(nifti_bytes(tmp_path))
    studio.state.volume_path = str(inside)
    studio.load_path()
    assert studio.state.status_text == "Loaded inside.nii.gz"


def test_a_run_is_picked_by_its_id_and_a_folder_the_page_names_is_never_resumed(studio, tmp_path):
    """An uploaded events.jsonl with a launch event, picked as the run, must not be replayed."""
    forged = tmp_path / "forged-run"
    forged.mkdir()
    (forged / "events.jsonl").write_text('{"event": "launch", "args": ["pretrain", "--help"]}\n'
                                         '{"event": "stop_requested"}\n')
    for name in (str(forged), "../" + forged.name, forged.name):
        page_sets(studio, pretrain_run=name)
        assert studio.state.pretrain_run == "" and studio.pretrain.state.selected is None, name
        studio.state.pretrain_run = name  # pending: the buttons check it again themselves
        studio.resume_pretraining()
        studio.stop_pretraining()
        studio.show_positions()
    assert sorted(p.name for p in forged.iterdir()) == ["events.jsonl"]


def test_page_values_that_the_server_did_not_offer_are_refused(studio):
    layout = studio.state.layout
    page_sets(studio, layout="no-such-layout")
    assert studio.state.layout == layout
    for effect in ("no-such-effect", "paint"):
        studio.set_editor_effect(effect)
    studio.select_segment("no-such-segment")
    studio.state.sample = "../../etc/passwd"
    studio.load_sample()
    assert studio.state.status_text.startswith("Error:") and "sample" in studio.state.status_text
    studio.state.model = "/etc/passwd"
    studio.run_segmentation()
    assert studio.state.status_text.startswith("Error:") and "model" in studio.state.status_text
    studio.finetune()
    assert studio.state.status_text.startswith("Error:") and "model" in studio.state.status_text
    studio.state.device = "--evil"
    studio.start_pretraining()
    assert studio.state.status_text.startswith("Error:") and "device" in studio.state.status_text
    studio.state.device = "cpu"
    studio.state.pretrain_steps = "-5"
    studio.start_pretraining()
    assert studio.state.status_text.startswith("Error:") and "steps" in studio.state.status_text
    assert studio.pretrain.state.runs == [] or all(r.kind != "pretrain" for r in studio.pretrain.state.runs)


@pytest.mark.parametrize("args, says", [
    (["--token", "12345678"], "--token"),      # the page would send it back as a number
    (["--token", "short"], "--token"),
    (["--token", "has spaces in it"], "--token"),
    (["--token", "a-token-of-mine", "--no-token"], "not allowed with"),
    (["--max-upload-mb", "0"], "--max-upload-mb"),
])
def test_a_token_the_page_cannot_send_back_or_no_upload_room_stops_the_start_in_one_line(capsys, args, says):
    from voco_studio.cli import main

    assert main(args + ["--port", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], lines
    assert "unrecognized" not in lines[0]


def test_each_start_has_a_new_token_that_the_page_sends_back_as_text():
    from voco_studio.access import new_token, page_keeps_as_text, same_origin

    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50 and all(page_keeps_as_text(t) and len(t) >= 32 for t in tokens)
    assert not any(page_keeps_as_text(t) for t in ("1e10", "0x1f2e3d4c", "Infinity", "-12345678", "true"))
    assert same_origin("http://localhost:9000", "localhost:9000")  # through a tunnel: the page's own address
    assert not same_origin("http://evil.example", "127.0.0.1:8080") and not same_origin("null", "127.0.0.1:8080")
def test_a_header_declaring_more_voxels_than_its_file_holds_is_refused_before_slicer_reads_it(studio, tmp_path):
    from test_volumes import header_only_nifti

    from voco.errors import VocoInputError

    path = header_only_nifti(tmp_path / "huge.nii.gz")
    volumes = studio.slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(VocoInputError, match="huge.nii.gz: declares 1500x1500x1500 float32 voxels"):
        studio.load_file(path)
    assert studio.slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes

