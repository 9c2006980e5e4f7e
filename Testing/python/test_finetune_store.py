"""Fine-tuning streamed from a labelled store (``voco preprocess --labels``): the store keeps each
case's label map and foreground sample; a run from it draws the patches a run from the files
draws, is the same with 0 or 2 DataLoader workers and resumes exactly; reruns redo only cases
whose image or label map changed; and a store that does not fit the run is refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import Events
from test_finetune import SPACING, small_config, write_synthetic_dataset
from test_store import StopAfter, store_files, synthetic_ct
from voco.cli import main
from voco.data import preprocess_store as writer
from voco.data.preprocess_store import preprocess_store
from voco.data.sources import dataset_label_names, list_labelled_cases
from voco.data.store import Store, VolumeFile
from voco.data.volumes import Preprocessing, preprocess_pair, read_label_map, read_volume
from voco.figures import read_metrics
from voco.training.finetune import Finetuner
from voco.training.finetune_store import StoredCase

# What small_config fine-tunes with: 2 mm, 32^3 patches, the data's own modality.
OPTIONS = Preprocessing(spacing=(2.0, 2.0, 2.0), pad_to=(32, 32, 32))


def build(dataset, out, workers=1):
    pairs = list_labelled_cases(dataset)
    reporter = Events()
    counts = preprocess_store([i for i, _ in pairs], out, OPTIONS, reporter, workers,
                              label_maps=[label for _, label in pairs], label_names=dataset_label_names(dataset))
    return counts, reporter


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("labelled"), cases=3)


@pytest.fixture(scope="module")
def store(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("labelled_store")
    build(dataset, out)
    return out


def test_the_store_keeps_each_label_map_and_foreground_as_fine_tuning_from_the_files_has_them(dataset, store):
    plan = json.loads((store / "plan.json").read_text())
    assert plan["label_names"] == {"1": "lesion", "2": "slab"}
    index = json.loads((store / "index.json").read_text())
    tuner = Finetuner(small_config(dataset, store.parent / "unused"), Events(), "cpu")
    for entry, case, (image_path, label_path) in zip(index, tuner.cases, list_labelled_cases(dataset)):
        assert entry["label"]["source"] == str(label_path.resolve()) and len(entry["label"]["sha256"]) == 64
        assert entry["label_values"] == [0, 1, 2]
        image = read_volume(image_path)
        _, label, _, _ = preprocess_pair(image, read_label_map(label_path, image), OPTIONS)
        stored = VolumeFile(store / entry["key"].replace(".vox", ".label.vox")).read_stored_patch((0, 0, 0), case.shape)
        assert stored.dtype == np.uint8
        np.testing.assert_array_equal(stored, label.numpy())
        np.testing.assert_array_equal(np.load(store / entry["key"].replace(".vox", ".foreground.npy")),
                                      case.foreground.numpy())
        stored_case = StoredCase(store, entry, case.name)
        assert len(stored_case.foreground) == entry["foreground_voxels"] == len(case.foreground)
        np.testing.assert_array_equal(stored_case.foreground[7], case.foreground[7].numpy())


def test_a_run_from_the_store_draws_the_patches_a_run_from_the_files_draws(dataset, store, tmp_path):
    from_files = Finetuner(small_config(dataset, tmp_path / "files"), Events(), "cpu")
    from_store = Finetuner(small_config(store, tmp_path / "store", steps=4), Events(), "cpu", workers=0)
    assert all(isinstance(case, StoredCase) for case in from_store.cases)  # no volume held in memory
    assert [c.name for c in from_store.val_cases] == [c.name for c in from_files.val_cases]
    assert [label.name for label in from_store.labels] == ["lesion", "slab"] and from_store.modality == "mri"
    for step in range(4):  # the loader reads steps 0..3 in order
        images, targets = from_store.next_batch()
        expected_images, expected_targets = from_files.sample_batch(step)
        torch.testing.assert_close(targets, expected_targets, rtol=0, atol=0)
        torch.testing.assert_close(images, expected_images, rtol=2e-3, atol=2e-3)  # stored as float16


def test_fine_tuning_from_the_store_is_the_same_with_0_or_2_workers_and_resumes_exactly(store, tmp_path, monkeypatch):
    one = tmp_path / "workers0"
    assert Finetuner(small_config(store, one, steps=3, val_every=3), Events(), "cpu", workers=0).run() == 0

    two, stop_file = tmp_path / "workers2", tmp_path / "STOP"
    monkeypatch.setenv("VOCO_STOP_FILE", str(stop_file))
    config = small_config(store, two, steps=3, val_every=3)
    assert Finetuner(config, StopAfter(1, stop_file), "cpu", workers=2).run() == 128 + signal.SIGTERM
    stop_file.unlink()
    resumed = Events()
    assert Finetuner(small_config(store, two, steps=3, val_every=3), resumed, "cpu", resume=True, workers=2).run() == 0
    assert resumed.of("start")[0]["step"] == 1

    losses = [{r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")} for run in (one, two)]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3]
    states = [torch.load(run / "last.pt", weights_only=True) for run in (one, two)]
    assert states[0]["network"].keys() == states[1]["network"].keys()
    assert all(torch.equal(states[0]["network"][k], states[1]["network"][k]) for k in states[0]["network"])
    package = json.loads((one / "model" / "model.json").read_text())
    assert package["training"]["data"] == str(store)


def test_the_command_line_makes_a_labelled_store_and_fine_tunes_from_it(dataset, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["preprocess", "--labels", "--data", str(dataset), "--out", str(out), "--spacing", "2,2,2",
                 "--patch-size", "32", "--workers", "0", "--progress", "jsonl"]) == 0
    assert Store(out).plan["preprocessing"]["pad_to"] == [32, 32, 32]
    assert main(["finetune", "--data", str(out), "--out", str(tmp_path / "run"), "--backbone", "swinunetr-tiny",
                 "--patch-size", "32", "--steps", "1", "--workers", "1", "--device", "cpu", "--progress", "jsonl"]) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "run" / "model" / "weights.pt").is_file()


def test_a_rerun_redoes_only_cases_whose_image_or_label_map_changed(dataset, tmp_path, monkeypatch):
    copy = tmp_path / "data"
    shutil.copytree(dataset.parent, copy)
    out = tmp_path / "store"
    build(copy / "dataset.json", out)
    before = store_files(out)
    prepared = []
    real = writer._prepare_case
    monkeypatch.setattr(writer, "_prepare_case", lambda image, *rest: prepared.append(image.name) or real(image, *rest))

    counts, _ = build(copy / "dataset.json", out)
    assert prepared == [] and counts["unchanged"] == 3

    label_path = copy / "labelsTr" / "case1.nii.gz"
    labels = np.asarray(nib.load(str(label_path)).dataobj)
    labels[labels == 2] = 0  # the clinician removed the slab
    nib.save(nib.Nifti1Image(labels, SPACING), str(label_path))
    os.utime(label_path, ns=(3_000_000_000, 3_000_000_000))
    counts, _ = build(copy / "dataset.json", out)
    assert prepared == ["case1.nii.gz"] and counts["ok"] == 1 and counts["unchanged"] == 2
    entry = json.loads((out / "index.json").read_text())[1]
    assert entry["label_values"] == [0, 1] and entry["label"]["mtime_ns"] == 3_000_000_000
    changed = {name for name in before if store_files(out)[name] != before[name]}
    key = entry["key"].removesuffix(".vox")
    assert changed == {"index.json", f"{key}.label.vox", f"{key}.foreground.npy"}

    removed = json.loads((out / "index.json").read_text())[2]["key"].removesuffix(".vox")
    dataset_json = json.loads((copy / "dataset.json").read_text())
    dataset_json["training"] = dataset_json["training"][:2]
    (copy / "dataset.json").write_text(json.dumps(dataset_json))
    counts, _ = build(copy / "dataset.json", out)
    gone = set(before) - set(store_files(out))
    assert counts["removed"] == 1 and gone == {f"{removed}.vox", f"{removed}.label.vox", f"{removed}.foreground.npy"}


def test_an_unusable_case_is_listed_and_the_run_from_the_store_says_so(dataset, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(dataset.parent, copy)
    label_path = copy / "labelsTr" / "case2.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((30, 30, 30), np.uint8), SPACING), str(label_path))  # not its image's grid
    counts, reporter = build(copy / "dataset.json", tmp_path / "store")
    assert counts["ok"] == 2 and counts["skipped"] == 1
    [warning] = reporter.of("warning")
    assert warning["message"].startswith(str(label_path.resolve())) and "does not match its image" in warning["message"]
    seen = Events()
    Finetuner(small_config(tmp_path / "store", tmp_path / "run"), seen, "cpu")
    assert [w["file"] for w in seen.of("warning")] == [str((copy / "imagesTr" / "case2.nii.gz").resolve())]


def refused(capsys, *args) -> str:
    code = main(list(map(str, args)))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    return lines[0]


def test_a_store_that_does_not_fit_the_run_is_refused_in_one_line(dataset, store, tmp_path, capsys):
    unlabelled = tmp_path / "unlabelled"
    assert main(["preprocess", "--data", str(synthetic_ct(tmp_path / "ct.nii.gz")), "--out", str(unlabelled),
                 "--preset", "demo", "--grid", "2,2,1", "--workers", "0", "--progress", "jsonl"]) == 0
    capsys.readouterr()
    run = ("finetune", "--out", tmp_path / "run", "--backbone", "swinunetr-tiny", "--device", "cpu", "--steps", "1")
    line = refused(capsys, *run, "--data", unlabelled)
    assert str(unlabelled) in line and "voco preprocess --labels" in line
    line = refused(capsys, *run, "--data", store, "--spacing", "1.5,1.5,1.5", "--patch-size", "32")
    assert str(store) in line and "resampled to 2x2x2 mm, the run wants 1.5x1.5x1.5 mm" in line
    line = refused(capsys, *run, "--data", store, "--patch-size", "64")
    assert str(store) in line and "pads cases to 32 voxels" in line and "--patch-size 64" in line
    line = refused(capsys, *run, "--data", store, "--patch-size", "32", "--modality", "ct")
    assert "scaled as mri, the run wants ct" in line
    line = refused(capsys, "preprocess", "--labels", "--data", dataset, "--out", store, "--spacing", "2,2,2",
                   "--patch-size", "32", "--preset", "v2")
    assert "--preset is a pretraining option" in line
    line = refused(capsys, "preprocess", "--data", dataset, "--out", store, "--spacing", "2,2,2")
    assert str(store) in line and "use another --out" in line


def test_a_resumed_run_refuses_a_store_that_gained_a_label_its_labels_do_not_name(store, tmp_path, capsys):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    assert Finetuner(small_config(copy, tmp_path / "run", steps=1), Events(), "cpu").run() == 0
    index = json.loads((copy / "index.json").read_text())
    index[0]["label_values"] = [0, 1, 2, 3]  # as a rerun of voco preprocess after a new label was drawn
    (copy / "index.json").write_text(json.dumps(index))
    line = refused(capsys, "finetune", "--out", tmp_path / "run", "--resume", "--steps", "2", "--device", "cpu")
    assert line == f"error: {copy}: has label value 3, which the model's labels do not name"
