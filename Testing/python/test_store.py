"""The preprocessed store (``voco preprocess``) and pretraining streamed from it: what it holds,
that it reads back what was stored, that reruns do only new work (also after a SIGKILL), that
unusable volumes are listed, and that a run from the store is exact and resumable whatever the
number of DataLoader workers, each DDP rank reading its own shard."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, Events, events, voco_command
from test_pretrain import assert_bitwise_equal, load_tensors
from voco.cli import main
from voco.data import preprocess_store as writer
from voco.data.preprocess_store import preprocess_store
from voco.data.store import Store, VolumeFile, write_volume
from voco.data.volumes import Preprocessing, load_volume
from voco.figures import read_metrics
from voco.presets import resolve_preset
from voco.training.pretrain import PretrainConfig, Pretrainer
from voco.training.store_steps import StoreSteps

# The demo preset with a 2x2x1 grid of 32^3 crops: 64x64x32 patches at 1 mm.
PRESET_ARGS = ("--preset", "demo", "--grid", "2,2,1")
PRESET = resolve_preset("demo", "2,2,1")
OPTIONS = Preprocessing.for_preset(PRESET)


def write_nifti(path, array, spacing=1.0):
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.diag([spacing] * 3 + [1.0])), str(path))
    return path


def synthetic_ct(path, shape=(90, 80, 50), seed=0):
    """An ellipsoid of soft tissue (around 40 HU, textured) in air: CT by its -1000 HU air."""
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    inside = (grid ** 2).sum(axis=0) < 0.8
    texture = np.random.default_rng(seed).normal(0, 60, shape)
    return write_nifti(path, np.where(inside, 40.0 + texture, -1000.0))


def synthetic_mri(path, shape=(70, 72, 40), seed=1):
    return write_nifti(path, 100 + np.random.default_rng(seed).normal(0, 20, shape).clip(-90, 90))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    return [synthetic_ct(folder / "ct_a.nii.gz"), synthetic_mri(folder / "mri.nii.gz"),
            synthetic_ct(folder / "ct_b.nii.gz", (75, 70, 36), seed=2)]


def build(sources, out, workers=1):
    reporter = Events()
    counts = preprocess_store(sources, out, OPTIONS, reporter, workers)
    return counts, reporter


@pytest.fixture(scope="module")
def store(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    build(sources, out)
    return out


def store_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def test_the_plan_and_the_index_say_what_was_done_to_each_volume(store, sources):
    plan = json.loads((store / "plan.json").read_text())
    assert plan["format"] == "voco-store" and plan["format_version"] == 1
    assert plan["preprocessing"] == json.loads(json.dumps(dataclasses.asdict(OPTIONS)))
    assert plan["encodings"] == {"ct": {"dtype": "uint8", "scale": 255.0}, "mri": {"dtype": "float16", "scale": 1.0}}
    index = json.loads((store / "index.json").read_text())
    assert [e["source"] for e in index] == [str(s.resolve()) for s in sources]
    assert [e["modality"] for e in index] == ["ct", "mri", "ct"]
    for entry, source in zip(index, sources):
        volume = load_volume(source, OPTIONS)
        assert entry["status"] == "ok" and (store / entry["key"]).is_file()
        assert entry["size"] == source.stat().st_size and entry["mtime_ns"] == source.stat().st_mtime_ns
        assert len(entry["sha256"]) == 64
        assert entry["shape"] == list(volume.image.shape) and entry["source_shape"] == list(volume.source_shape)
        np.testing.assert_allclose(entry["affine"], volume.affine)
        np.testing.assert_allclose(entry["source_affine"], volume.source_affine)


def test_stored_volumes_read_back_within_their_quantisation(store, sources):
    read = Store(store)
    for i, (source, tolerance) in enumerate(zip(sources, (0.5 / 255 + 1e-6, 2e-3, 0.5 / 255 + 1e-6))):
        expected = load_volume(source, OPTIONS).image
        decoded = read.image(i)
        assert decoded.dtype == torch.float32 and decoded.shape == expected.shape
        # float16 keeps 11 significant bits: relative to the value for MRI, absolute for CT in [0, 1]
        scale = expected.abs().clamp(min=1.0) if i == 1 else 1.0
        assert ((decoded - expected).abs() / scale).max() <= tolerance


def test_a_patch_equals_that_region_of_the_decoded_volume_across_chunk_edges(tmp_path):
    image = np.random.default_rng(0).random((1, 70, 45, 33)).astype(np.float32)
    write_volume(tmp_path / "v.vox", image, "ct")
    volume = VolumeFile(tmp_path / "v.vox")
    whole = volume.read()
    np.testing.assert_allclose(whole, np.round(image * 255) / 255, atol=1e-7)
    for start, shape in [((0, 0, 0), (64, 32, 32)), ((5, 13, 1), (64, 32, 32)), ((31, 31, 31), (2, 2, 2)),
                         ((6, 0, 0), (64, 45, 33))]:
        patch = volume.read_patch(start, shape)
        region = tuple(slice(s, s + n) for s, n in zip(start, shape))
        np.testing.assert_array_equal(patch, whole[(slice(None), *region)])


def test_a_rerun_reads_only_new_or_changed_volumes_and_drops_removed_ones(sources, tmp_path, monkeypatch):
    folder = tmp_path / "sources"
    shutil.copytree(sources[0].parent, folder)
    copies = [folder / s.name for s in sources]
    out = tmp_path / "store"
    build(copies, out)
    before = store_files(out)

    loaded = []
    real_load = writer.load_volume
    monkeypatch.setattr(writer, "load_volume", lambda path, options: loaded.append(path.name) or real_load(path, options))
    hashed = []
    real_hash = writer.file_sha256
    monkeypatch.setattr(writer, "file_sha256", lambda path: hashed.append(path.name) or real_hash(path))

    counts, _ = build(copies, out)
    assert (loaded, hashed) == ([], [])
    assert counts["unchanged"] == 3 and counts["ok"] == 0 and store_files(out) == before

    os.utime(copies[1], ns=(1_000_000_000, 1_000_000_000))  # touched, same content: hashed, not redone
    counts, _ = build(copies, out)
    assert (loaded, hashed) == ([], ["mri.nii.gz"]) and counts["unchanged"] == 3
    index = json.loads((out / "index.json").read_text())
    assert index[1]["mtime_ns"] == 1_000_000_000
    assert {k: v for k, v in store_files(out).items() if k != "index.json"} == \
        {k: v for k, v in before.items() if k != "index.json"}

    synthetic_ct(copies[2], (75, 70, 36), seed=9)  # new content: redone
    os.utime(copies[2], ns=(2_000_000_000, 2_000_000_000))
    counts, _ = build(copies, out)
    assert loaded == ["ct_b.nii.gz"] and counts["ok"] == 1 and counts["unchanged"] == 2
    key = json.loads((out / "index.json").read_text())[2]["key"]
    assert store_files(out)[key] != before[key]

    counts, _ = build(copies[:2], out)  # no longer given: out of the index and the store
    assert counts["removed"] == 1
    assert [e["source"] for e in json.loads((out / "index.json").read_text())] == [str(c.resolve()) for c in copies[:2]]
    assert not (out / key).exists()


def test_a_stored_volume_whose_file_was_deleted_is_made_again(store, sources, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(store, out)
    key = json.loads((out / "index.json").read_text())[1]["key"]
    (out / key).unlink()
    counts, _ = build(sources, out)
    assert counts["ok"] == 1 and counts["unchanged"] == 2
    assert store_files(out) == store_files(store)


def cut_short(path):
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("damage, named, problem", [
    (lambda store, key: (store / "plan.json").write_text("{not json"), "plan.json", "cannot read the store's plan"),
    (lambda store, key: (store / key).unlink(), "key", "cannot be read as a store volume"),
    (lambda store, key: cut_short(store / key), "key", "is damaged"),
    (lambda store, key: (store / key).write_bytes(b"x" * 100), "key", "cannot be read as a store volume"),
], ids=["plan", "volume missing", "volume cut short", "volume garbage"])
def test_a_damaged_store_is_refused_in_one_line(store, tmp_path, capsys, damage, named, problem):
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    key = json.loads((damaged / "index.json").read_text())[0]["key"]
    damage(damaged, key)
    code = main(["pretrain", "--data", str(damaged), "--out", str(tmp_path / "run"), *PRESET_ARGS, "--device", "cpu",
                 "--backbone", "swinunetr-tiny"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert str(damaged / (key if named == "key" else named)) in lines[0] and problem in lines[0]


def test_an_unusable_volume_is_listed_as_skipped_with_its_reason_and_the_rest_stored(sources, tmp_path):
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((40, 40, 1)))
    counts, reporter = build([flat, sources[1]], tmp_path / "store")
    assert counts["ok"] == 1 and counts["skipped"] == 1
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert index[0]["status"] == "skipped" and index[0]["reason"].startswith(str(flat.resolve()))
    assert index[1]["status"] == "ok"
    [warning] = reporter.of("warning")
    assert warning["file"] == str(flat.resolve()) and warning["message"] == index[0]["reason"]
    read = Store(tmp_path / "store")
    assert len(read.entries) == 1 and len(read.skipped) == 1


def test_a_killed_preprocess_resumes_to_the_store_an_uninterrupted_run_makes(sources, tmp_path):
    """Killed (SIGKILL) after its first volume; the rerun does the rest. The uninterrupted store is
    made by two worker processes: the same bytes as one process, and nothing on stderr (the worker
    processes keep MONAI's announcements about an unreadable file to themselves too)."""
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image")
    args = ("preprocess", "--data", *sources, garbage, *PRESET_ARGS, "--progress", "jsonl")
    complete = subprocess.run(voco_command(*args, "--out", tmp_path / "whole", "--workers", 2),
                              capture_output=True, text=True, cwd=REPO, timeout=600)
    assert complete.returncode == 0 and complete.stderr == "", complete.stderr
    done = events(complete.stdout)[-1]
    assert done["event"] == "done" and done["ok"] == 3 and done["skipped"] == 1 and done["store_bytes"] > 0

    out = tmp_path / "killed"
    process = subprocess.Popen(voco_command(*args, "--out", out, "--workers", 1), stdout=subprocess.PIPE,
                               text=True, cwd=REPO)
    for line in process.stdout:
        if '"progress"' in line:
            process.kill()
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert 1 <= len(json.loads((out / "index.json").read_text())) < 4

    rerun = subprocess.run(voco_command(*args, "--out", out, "--workers", 1), capture_output=True, text=True,
                           cwd=REPO, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    counts = events(rerun.stdout)[-1]
    assert counts["unchanged"] >= 1 and counts["unchanged"] + counts["ok"] + counts["skipped"] == 4
    assert store_files(out) == store_files(tmp_path / "whole")


def test_a_store_made_with_other_preprocessing_is_refused_in_one_line(store, sources, capsys):
    code = main(["preprocess", "--data", str(sources[0]), "--out", str(store), *PRESET_ARGS, "--spacing", "2,2,2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(store) in lines[0] and "use another --out" in lines[0]


def test_pretraining_refuses_a_store_of_another_preset(store, tmp_path, capsys):
    code = main(["pretrain", "--data", str(store), "--out", str(tmp_path / "run"), "--preset", "demo",
                 "--device", "cpu", "--backbone", "swinunetr-tiny"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(store) in lines[0] and "pad_to" in lines[0]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_read_disjoint_shards_that_cover_the_store(store, world_size):
    read = Store(store)
    shards = [StoreSteps(read, PRESET, 0, 2, rank, world_size) for rank in range(world_size)]
    owned = [set(s.shard.tolist()) for s in shards]
    assert sorted(i for part in owned for i in part) == list(range(len(read.entries)))
    for steps, part in zip(shards, owned):
        assert {int(i) for step in range(5) for i in steps.volumes_of(step)} == part


def test_more_ranks_than_volumes_are_refused(store):
    with pytest.raises(Exception, match="fewer than the 4 processes"):
        StoreSteps(Store(store), PRESET, 0, 2, 3, 4)


def pretrain_config(store, out):
    return PretrainConfig(data=[str(store)], out=str(out), preset=PRESET, backbone="swinunetr-tiny", steps=2,
                          batch_size=1, checkpoint_every=2, seed=7)


class StopAfter(Events):
    """Creates the stop file once ``step`` is reported: the run checkpoints and stops there."""

    def __init__(self, step, stop_file):
        super().__init__()
        self.step, self.stop_file = step, stop_file

    def emit(self, event, **fields):
        super().emit(event, **fields)
        if event == "step" and fields["step"] == self.step:
            self.stop_file.touch()


def test_a_run_from_the_store_is_the_same_with_0_or_2_workers_and_resumes_exactly(store, tmp_path, monkeypatch):
    one = tmp_path / "workers0"
    assert Pretrainer(pretrain_config(store, one), Events(), "cpu", workers=0).run() == 0

    two, stop_file = tmp_path / "workers2", tmp_path / "STOP"
    monkeypatch.setenv("VOCO_STOP_FILE", str(stop_file))
    assert Pretrainer(pretrain_config(store, two), StopAfter(1, stop_file), "cpu", workers=2).run() == 128 + signal.SIGTERM
    stop_file.unlink()
    resumed = Events()
    assert Pretrainer(pretrain_config(store, two), resumed, "cpu", resume=True, workers=2).run() == 0
    assert resumed.of("start")[0]["step"] == 1

    losses = [{r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")} for run in (one, two)]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2]
    assert_bitwise_equal(load_tensors(two / "checkpoint.pt"), load_tensors(one / "checkpoint.pt"))


def test_a_two_process_ddp_run_streams_from_the_store(store, tmp_path):
    torchrun = [voco_command()[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "voco", "pretrain", "--data", str(store), "--out", str(tmp_path / "run"), *PRESET_ARGS,
                "--backbone", "swinunetr-tiny", "--batch-size", "1", "--steps", "1", "--workers", "1",
                "--device", "cpu", "--progress", "jsonl"]
    result = subprocess.run(torchrun, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    stream = events(result.stdout)
    assert stream[0]["world_size"] == 2 and stream[0]["volumes"] == 3 and stream[-1]["event"] == "done"


def test_a_run_stopped_by_signalling_its_process_group_saves_and_exits_143(store, tmp_path):
    """What a front end's Stop does: SIGTERM to the whole group, DataLoader workers included.
    They leave the stop to the trainer (a worker killed by the signal once made the DataLoader
    raise in the middle of a step: a traceback and exit 1, the checkpoint not saved)."""
    process = subprocess.Popen(voco_command("pretrain", "--data", store, "--out", tmp_path / "run", *PRESET_ARGS,
                                            "--backbone", "swinunetr-tiny", "--batch-size", "1", "--steps", "50",
                                            "--checkpoint-every", "100", "--workers", "2", "--device", "cpu",
                                            "--progress", "jsonl"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               start_new_session=True)
    for line in process.stdout:
        if '"step"' in line:
            time.sleep(0.5)  # into the next step, while the workers read ahead
            os.killpg(process.pid, signal.SIGTERM)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM and err == "", err[-2000:]
    assert events(out)[-1]["event"] == "stopped"
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] >= 1


def test_a_damaged_chunk_read_by_a_worker_stops_the_run_in_one_line(store, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    for entry in json.loads((damaged / "index.json").read_text()):
        volume = VolumeFile(damaged / entry["key"])
        data = bytearray((damaged / entry["key"]).read_bytes())
        for i in range(len(volume.offsets) - 1):  # every chunk's zlib header made invalid
            data[volume.data_start + int(volume.offsets[i])] = 0xFF
        (damaged / entry["key"]).write_bytes(bytes(data))
    code = main(["pretrain", "--data", str(damaged), "--out", str(tmp_path / "run"), *PRESET_ARGS, "--device", "cpu",
                 "--backbone", "swinunetr-tiny", "--batch-size", "1", "--steps", "1", "--workers", "1",
                 "--progress", "jsonl"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {damaged}/") and ".vox: is damaged: chunk" in lines[0]
    assert "does not decompress" in lines[0] and lines[0].endswith("run voco preprocess again")
