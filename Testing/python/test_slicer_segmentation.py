"""VoCoSegmentationLib against real MRML (PyPI slicer-core) with the engine run for real, as a
process (``python -m voco``), the way the Slicer module runs it.

Two kinds of model: ``package``, a real tiny SwinUNETR package (random weights, seed 0) whose
labels carry names, colours and a SNOMED code; and ``toy``, a package whose network is replaced
*inside the engine process* (a ``sitecustomize`` on its PYTHONPATH) by a 1x1 convolution that
thresholds the intensity, so that the right segmentation is known; ``slow`` also makes each
window take a second, for cancelling.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import textwrap
from pathlib import Path

import nrrd
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "VoCoSegmentation"))

from test_segment import dice, oblique_affine, rotation, sphere_image, sphere_mask  # noqa: E402
from voco.models.segmentation import build_segmentation_network  # noqa: E402
from voco.registry.package import Label, ModelCard, Preprocessing, write_package  # noqa: E402

LIVER_CODE = {"scheme": "SCT", "code": "10200004", "meaning": "Liver"}
LABELS = [Label(1, "liver", "#dd8244", LIVER_CODE), Label(5, "spleen", "#9d6c62", None)]
SHAPE = (48, 40, 20)  # I, J, K

TOY_SITE = '''
import os, time
if os.environ.get("VOCO_TEST_TOY"):
    import torch
    from torch import nn
    import voco.inference.segment as segment_module

    class Threshold(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 1)
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor([-4.0, 4.0]).view(2, 1, 1, 1, 1))
                self.conv.bias.zero_()

        def forward(self, x):
            if os.environ.get("VOCO_TEST_SLOW"):
                time.sleep(1.0)
            return self.conv(x)

    segment_module.load_network = lambda package, device: Threshold().to(device).eval()
'''


def card(name, labels, metrics=None) -> ModelCard:
    return ModelCard(name=name, version="1", architecture="swinunetr-tiny", in_channels=1, labels=list(labels),
                     preprocessing=Preprocessing("mri", (2.0, 2.0, 2.0), (32, 32, 32)), metrics=metrics or {})


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    network = build_segmentation_network("swinunetr-tiny", 1, len(LABELS) + 1)
    folder = tmp_path_factory.mktemp("package") / "toy-organs"
    return write_package(folder, card("organs", LABELS, {"mean_val_dice": 0.25}), network.state_dict())


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    (folder / "site").mkdir()
    (folder / "site" / "sitecustomize.py").write_text(textwrap.dedent(TOY_SITE))
    write_package(folder / "package", card("sphere-model", [Label(3, "sphere", "#ff0000", None)]), {"w": torch.zeros(1)})
    return folder


@pytest.fixture
def engine_env(tmp_path, monkeypatch):
    """An empty model cache for every test (nothing of the user's is touched)."""
    monkeypatch.setenv("VOCO_MODELS_DIR", str(tmp_path / "models-cache"))
    return {"VOCO_MODELS_DIR": str(tmp_path / "models-cache")}


def logic_for(tmp_path, env, toy_folder=None, slow=False):
    from VoCoSegmentationLib import SegmentationLogic

    env = dict(env)
    if toy_folder is not None:
        env.update(VOCO_TEST_TOY="1", PYTHONPATH=os.pathsep.join(
            p for p in (str(toy_folder / "site"), os.environ.get("PYTHONPATH")) if p))
        if slow:
            env["VOCO_TEST_SLOW"] = "1"
    temp_root = tmp_path / "temp"
    temp_root.mkdir(exist_ok=True)
    return SegmentationLogic(env=env, runs_folder=tmp_path / "runs", temp_root=temp_root)


def add_volume(data_ijk: np.ndarray, affine: np.ndarray, name="image"):
    import slicer

    return slicer.util.addVolumeFromArray(np.ascontiguousarray(data_ijk.transpose(2, 1, 0)).astype(np.float32),
                                          affine, name)


def sphere_volume(shape=SHAPE):
    affine = oblique_affine(shape=shape)
    return add_volume(sphere_image(affine, shape), affine, "sphere"), affine


def engine_labels(path) -> np.ndarray:
    """The engine's label map, I J K order."""
    data, header = nrrd.read(str(path), index_order="F")
    return data


def living_in_group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies (an orphan killed in a container
    may stay a zombie when nothing reaps it)."""
    living = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            living.append(int(stat.parent.name))
    return living


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def segment_array(segmentation_node, segment_id, volume_node) -> np.ndarray:
    import slicer

    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node).transpose(2, 1, 0)


# --- volumes and ROI --------------------------------------------------------------------------

def test_oblique_volume_written_for_the_engine_keeps_voxels_and_geometry(mrml, tmp_path):
    from VoCoSegmentationLib.volumes import ijk_to_ras, label_map_node_from_file, write_volume
    from voco.data.volumes import read_volume

    shape = (30, 20, 10)
    affine = oblique_affine(shape=shape)
    data = np.random.default_rng(1).normal(0, 100, shape).astype(np.float32)
    node = add_volume(data, affine)
    np.testing.assert_allclose(ijk_to_ras(node), affine, atol=1e-6)

    path = write_volume(node, tmp_path / "input.nrrd")
    read = read_volume(path)  # exactly what the engine does with it
    np.testing.assert_allclose(read.affine.numpy(), affine, atol=1e-4)
    np.testing.assert_array_equal(read.numpy()[0], data)

    back = label_map_node_from_file(path)
    assert back.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_allclose(ijk_to_ras(back), affine, atol=1e-6)


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
    # A volume under the same transform gets the box in its own (untransformed) coordinates.
    volume = add_volume(np.zeros((8, 8, 8)), np.eye(4))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(roi_ras_box(roi, volume), (-half, -half, -5, half, half, 5), atol=1e-9)
    assert roi_argument(roi) == ["--roi-ras=" + ",".join(f"{v:.4f}" for v in roi_ras_box(roi))]


# --- segmenting -------------------------------------------------------------------------------

def test_segment_with_a_real_model_gives_named_coloured_segments_on_the_input_grid(mrml, package, tmp_path, engine_env):
    import slicer
    from VoCoSegmentationLib import terminology_entry
    from VoCoSegmentationLib.volumes import ijk_to_ras

    volume, affine = sphere_volume()
    logic = logic_for(tmp_path, engine_env)
    job = logic.segment(volume, str(package.folder), device="cpu")
    statuses = []
    while not job.wait(0.3):
        statuses.append((job.fraction, job.status))
    assert job.succeeded, (job.error, job.process.stderr_tail)
    kinds = [e["event"] for e in job.events]
    assert kinds[0] == "start" and "done" in kinds and kinds[-1] == "exit"
    assert "progress" in kinds and job.fraction >= 0.9
    expected = engine_labels(job.output_path)
    assert expected.shape == SHAPE

    node = logic.finish(job)
    assert not job.temp_dir.exists()
    assert node.IsA("vtkMRMLSegmentationNode") and node.GetScene() is slicer.mrmlScene
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == \
        ["liver", "spleen"]
    for label in LABELS:
        segment_id = job.result.segment_ids[label.value]
        segment = segmentation.GetSegment(segment_id)
        np.testing.assert_allclose(segment.GetColor(), [int(label.color[i:i + 2], 16) / 255 for i in (1, 3, 5)],
                                   atol=1e-6)
        np.testing.assert_array_equal(segment_array(node, segment_id, volume), expected == label.value)
    liver = segmentation.GetSegment(job.result.segment_ids[1])
    assert liver.GetTerminology() == (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^") == terminology_entry(LIVER_CODE)
    # no code in the card: Slicer's default entry stays
    assert segmentation.GetSegment(job.result.segment_ids[5]).GetTerminology() == slicer.vtkSegment().GetTerminology()
    assert job.result.empty_labels == [label.name for label in LABELS if not (expected == label.value).any()]
    # geometry: the reference is the input volume; shown in slice and 3D views
    assert node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is volume
    np.testing.assert_allclose(ijk_to_ras(volume), affine, atol=1e-6)
    assert node.GetDisplayNode() is not None
    assert segmentation.ContainsRepresentation(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())


def test_known_answer_and_roi_restricted_inference(mrml, toy, tmp_path, engine_env):
    import slicer
    from VoCoSegmentationLib.roi import roi_ras_box

    volume, affine = sphere_volume()
    logic = logic_for(tmp_path, engine_env, toy)
    full = logic.finish(logic.segment(volume, str(toy / "package"), device="cpu"), timeout=300)
    sphere = segment_array(full, full.GetSegmentation().GetNthSegmentID(0), volume)
    truth = sphere_mask(affine, SHAPE)
    assert dice(sphere > 0, truth) > 0.9
    assert full.GetSegmentation().GetNthSegment(0).GetName() == "sphere"

    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(-10.0, -6.0, 9.0)  # the sphere's right part (the sphere is centred at x = 4)
    roi.SetSize(12.0, 40.0, 40.0)
    job = logic.segment(volume, str(toy / "package"), device="cpu", roi_node=roi)
    output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen output")
    before = node_ids(slicer.mrmlScene)
    node = logic.finish(job, timeout=300, output_node=output)  # into the node picked in the module
    assert node is output and node_ids(slicer.mrmlScene) - before == {output.GetDisplayNode().GetID()}
    assert node.GetSegmentation().GetNumberOfSegments() == 1
    inside = segment_array(node, node.GetSegmentation().GetNthSegmentID(0), volume) > 0
    corners = np.array([[x, y, z] for x, y, z in np.array(np.meshgrid(*np.array(roi_ras_box(roi)).reshape(2, 3).T))
                        .reshape(3, -1).T])
    voxels = (np.linalg.inv(affine) @ np.c_[corners, np.ones(len(corners))].T)[:3].T
    start = np.clip(np.floor(voxels.min(0)).astype(int), 0, SHAPE)
    end = np.clip(np.ceil(voxels.max(0)).astype(int) + 1, 0, SHAPE)
    box = np.zeros(SHAPE, bool)
    box[start[0]:end[0], start[1]:end[1], start[2]:end[2]] = True
    assert inside.any() and not (inside & ~box).any()  # nothing outside the ROI's voxel box
    assert dice(inside, truth & box) > 0.85
    assert (sphere & ~box).sum() > 1000  # ... where the full run did find the sphere


def test_cancel_kills_the_process_group_and_leaves_no_node_and_no_file(mrml, toy, tmp_path, engine_env):
    import slicer

    volume, _ = sphere_volume(shape=(120, 120, 40))  # 8 windows of about a second each
    logic = logic_for(tmp_path, engine_env, toy, slow=True)
    before = node_ids(slicer.mrmlScene)
    job = logic.segment(volume, str(toy / "package"), device="cpu")
    while not any(e["event"] == "start" for e in job.events):
        assert not job.wait(0.2), (job.error, job.process.stderr_tail)
    pid = job.process.pid
    logic.cancel(job, grace=10)
    assert job.cancelled and job.finished and not job.succeeded and job.status == "cancelled"
    assert living_in_group(pid) == []
    assert node_ids(slicer.mrmlScene) == before
    assert not job.temp_dir.exists() and list((tmp_path / "temp").iterdir()) == []
    assert job.returncode == 128 + signal.SIGTERM  # the engine stopped cleanly on SIGTERM
    with pytest.raises(RuntimeError, match="cancelled"):
        logic.finish(job)
    assert node_ids(slicer.mrmlScene) == before


def test_engine_error_reaches_the_job_and_adds_no_node(mrml, tmp_path, engine_env):
    import slicer

    volume, _ = sphere_volume(shape=(16, 16, 16))
    logic = logic_for(tmp_path, engine_env)
    before = node_ids(slicer.mrmlScene)
    job = logic.segment(volume, "no-such-model", device="cpu")
    with pytest.raises(RuntimeError, match="no-such-model"):
        logic.finish(job, timeout=120)
    assert "no-such-model" in job.error and job.status.startswith("error:")
    assert job.returncode == 2 and node_ids(slicer.mrmlScene) == before and not job.temp_dir.exists()


def test_failed_result_conversion_leaves_no_partial_node(mrml, tmp_path):
    import slicer
    from VoCoSegmentationLib.results import segmentation_from_output
    from VoCoSegmentationLib.volumes import write_nrrd

    volume, affine = sphere_volume(shape=(16, 16, 16))
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    write_nrrd(labels, affine, tmp_path / "seg.nrrd")
    sidecar = {"labels": [{"value": 1, "name": "ok", "color": "#00ff00"}, {"value": 2, "name": "bad", "color": "red"}]}
    before = node_ids(slicer.mrmlScene)
    with pytest.raises(ValueError, match="#rrggbb"):
        segmentation_from_output(tmp_path / "seg.nrrd", volume, sidecar=sidecar)
    assert node_ids(slicer.mrmlScene) == before


# --- the clinician loop -----------------------------------------------------------------------

def corrected_case(shape, seed):
    """A volume and a 'corrected' segmentation: liver = a sphere, spleen = a box."""
    import slicer

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


def test_training_set_cases_are_on_the_image_grid_and_finetune_makes_the_next_version(mrml, package, tmp_path,
                                                                                        engine_env):
    from VoCoSegmentationLib import ModelEntry, TrainingSet

    training_set = TrainingSet(tmp_path / "cases")
    logic = logic_for(tmp_path, engine_env)
    card_labels = [{"value": label.value, "name": label.name} for label in LABELS]
    for seed in (1, 2):
        volume, segmentation, affine, mask, box = corrected_case(SHAPE, seed)
        case = logic.add_to_training_set(training_set, volume, segmentation, card_labels)
        assert case == f"case_{seed:04d}"
        labels, header = nrrd.read(str(tmp_path / "cases" / "labelsTr" / f"{case}.nrrd"), index_order="F")
        image_header = nrrd.read_header(str(tmp_path / "cases" / "imagesTr" / f"{case}.nrrd"))
        np.testing.assert_array_equal(header["space directions"], image_header["space directions"])
        np.testing.assert_array_equal(labels == 1, mask & ~box.astype(bool))
        np.testing.assert_array_equal(labels == 5, box.astype(bool))
    dataset = json.loads((tmp_path / "cases" / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "liver", "5": "spleen"}
    assert dataset["numTraining"] == 2 and training_set.count == 2
    assert [c["case_id"] for c in training_set.cases()] == ["case_0001", "case_0002"]
    logic.auto_finetune_every = 2
    assert logic.auto_finetune_due(training_set)

    from VoCoSegmentationLib.logic import finetuned_name

    base = ModelEntry("organs", "1", "segmentation", True, str(package.folder), metrics={"mean_val_dice": 0.25})
    assert finetuned_name(base) == finetuned_name(str(package.folder)) == "organs"
    assert finetuned_name(ModelEntry("voco-b", "1", "backbone", False)) == "voco-b-seg"
    job = logic.finetune(training_set, base, steps=2, device="cpu",
                         extra_args=["--batch-size", "1", "--patch-size", "32", "--val-every", "2"])
    assert job.wait(600), job.status
    assert job.succeeded, (job.error, list(job.process.stderr_tail)[-5:])
    assert (job.model_name, job.model_version) == ("organs", "2")
    assert job.best_dice is not None and f"(before: {0.25:.3f})" in job.status
    models = {(m.name, m.version): m for m in logic.models()}
    new = models[("organs", "2")]
    assert new.installed and new.usable and new.dice == pytest.approx(job.best_dice)
    assert Path(new.path).is_dir()
    # the registry's backbones are listed as needing fine-tuning
    assert all(m.needs_finetuning and not m.usable for m in models.values() if m.kind == "backbone")


def test_training_set_survives_a_crash_while_writing(mrml, tmp_path, monkeypatch):
    from VoCoSegmentationLib import TrainingSet
    from VoCoSegmentationLib import training_set as module

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
    labels, _ = nrrd.read(str(tmp_path / "cases" / "labelsTr" / "case_0002.nrrd"))
    assert set(np.unique(labels)) == {0, 1, 2}
    shutil.rmtree(tmp_path / "cases")


# --- models and devices -----------------------------------------------------------------------

def test_model_list_marks_backbones_and_puts_dice_next_to_the_previous_version(tmp_path, package, engine_env):
    from VoCoSegmentationLib.models import ModelEntry, entries_from_runs, merge_entries

    run = tmp_path / "runs" / "organs-x" / "model"
    run.mkdir(parents=True)
    card_values = json.loads((package.folder / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**card_values, "version": "2", "metrics": {"mean_val_dice": 0.5}}))
    entries = merge_entries([ModelEntry("organs", "1", "segmentation", True, str(package.folder),
                                        metrics={"mean_val_dice": 0.25}),
                             ModelEntry("voco-b", "1", "backbone", False)] + entries_from_runs(tmp_path / "runs"))
    titles = [entry.title for entry in entries]
    assert titles == ["organs v1 — Dice 0.250", "organs v2 — Dice 0.500 (v1: 0.250)",
                      "voco-b v1 — backbone, fine-tune first"]
    assert entries[1].spec == str(run)


def test_devices_from_the_engine_python_and_a_message_for_a_cuda_build_without_gpu():
    from VoCoSegmentationLib import devices_from_probe

    devices, message = devices_from_probe({"torch": "2.13.0", "cuda_build": "12.8", "cuda": [], "mps": False})
    assert [d.id for d in devices] == ["auto", "cpu"] and "sees no GPU" in message
    devices, message = devices_from_probe({"torch": "2.13.0", "cuda_build": "12.8", "mps": False,
                                           "cuda": [{"index": 0, "name": "H100", "memory_gb": 79.2},
                                                    {"index": 1, "name": "T400", "memory_gb": 4.0}]})
    assert [d.id for d in devices] == ["auto", "cuda:0", "cuda:1", "cpu"] and "GPU 1 has 4.0 GB" in message
    assert devices_from_probe({"torch": None, "problem": "No module named 'torch'"})[0][0].id == "cpu"


# --- the runner ---------------------------------------------------------------------------------

FAKE_ENGINE = '''
import json, os, subprocess, sys, time
mode = sys.argv[1]
print("not json")
print(json.dumps({"event": "start", "time": 0}), flush=True)
if mode == "fail":
    print("Traceback ...", file=sys.stderr)
    print("error: input.nrrd: broken", file=sys.stderr)
    print("more noise", file=sys.stderr)
    sys.exit(2)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(json.dumps({"event": "child", "pid": child.pid}), flush=True)
time.sleep(60)
'''


@pytest.fixture
def fake_engine(tmp_path):
    """A stand-in ``voco`` package (no torch): fails with an ``error:`` line, or sleeps with a child
    that ignores SIGTERM."""
    (tmp_path / "fake" / "voco").mkdir(parents=True)
    (tmp_path / "fake" / "voco" / "__init__.py").write_text("")
    (tmp_path / "fake" / "voco" / "__main__.py").write_text(FAKE_ENGINE)
    return str(tmp_path / "fake")


def test_runner_turns_stderr_error_line_into_an_error_event_and_keeps_other_lines(fake_engine):
    from VoCoSegmentationLib import EngineProcess

    runner = EngineProcess(["fail"], engine_dir=fake_engine, cwd=fake_engine).start()
    assert runner.wait(60) == 2 and not runner.running
    events = runner.poll()
    assert [e["event"] for e in events] == ["start", "error", "exit"]
    assert events[1]["message"] == "input.nrrd: broken" and events[2]["returncode"] == 2
    assert runner.stdout_other == ["not json"] and runner.command[-2:] == ["--progress", "jsonl"]


def test_runner_cancel_kills_the_whole_process_group(fake_engine):
    from VoCoSegmentationLib import EngineProcess

    runner = EngineProcess(["sleep"], engine_dir=fake_engine, cwd=fake_engine).start()
    events = []
    while not any(e["event"] == "child" for e in events):
        assert runner.running
        runner.wait(0.1)
        events += runner.poll()
    child = next(e["pid"] for e in events if e["event"] == "child")
    runner.cancel(grace=1.0)  # the child ignores SIGTERM: SIGKILL after the grace period
    assert runner.returncode == -signal.SIGTERM
    assert [e["event"] for e in runner.poll()][-2:] == ["cancelled", "exit"]
    assert living_in_group(runner.pid) == [] and child not in living_in_group(child)


def test_training_set_keeps_the_label_values_a_result_tagged_its_segments_with(mrml, tmp_path):
    from VoCoSegmentationLib import TrainingSet
    from VoCoSegmentationLib.results import LABEL_VALUE_TAG

    volume, segmentation, _, mask, box = corrected_case((16, 16, 12), 1)
    segments = segmentation.GetSegmentation()
    segments.GetSegment("a").SetTag(LABEL_VALUE_TAG, "3")  # as segmentation_from_output tags them
    segments.GetSegment("b").SetTag(LABEL_VALUE_TAG, "7")
    store = TrainingSet(tmp_path / "cases")
    case = store.add(volume, segmentation)
    dataset = json.loads((tmp_path / "cases" / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "3": "liver", "7": "spleen"}
    labels, _ = nrrd.read(str(tmp_path / "cases" / "labelsTr" / f"{case}.nrrd"), index_order="F")
    np.testing.assert_array_equal(labels == 7, box.astype(bool))
