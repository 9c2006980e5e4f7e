"""``voco crops`` and ``voco positions`` on a real shipped CT (stored P-I-R, so every box passes
through a reorientation): the boxes land where the image's voxels are, in voxels and in RAS."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import Events, events, run_voco
from voco.geometry import apply_affine


@pytest.fixture(scope="module")
def crops(shipped, tmp_path_factory):
    out = tmp_path_factory.mktemp("crops")
    result = run_voco("crops", shipped["spine-ct"], "--out", out, "--preset", "demo", "--seed", 3)
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "layout.json").read_text()), nib.load(str(shipped["spine-ct"]))


def test_layout_lists_every_base_and_target_with_their_labels(crops):
    _, layout, _ = crops
    assert len(layout["bases"]) == 9 and len(layout["targets"]) == 2
    labels = np.array(layout["labels"])
    assert labels.shape == (2, 9)
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-9)


def test_box_ras_positions_agree_with_the_input_image_affine(crops):
    _, layout, image = crops
    affine = image.affine
    np.testing.assert_allclose(np.array(layout["image_affine"]), affine, atol=1e-5)
    for box in layout["bases"] + layout["targets"]:
        lo, hi = np.array(box["voxel_box"][:3]), np.array(box["voxel_box"][3:])
        centre = apply_affine(affine, (lo + hi) / 2 - 0.5)
        np.testing.assert_allclose(box["center_ras"], centre, atol=1e-3)
        corners = np.array(box["corners_ras"])
        np.testing.assert_allclose(corners.mean(axis=0), centre, atol=1e-3)
        # A 32-voxel crop at the demo's 1 mm spacing is 32 mm on every side, in any orientation.
        np.testing.assert_allclose(box["size_mm"], [32, 32, 32], atol=1e-3)
        np.testing.assert_allclose(np.ptp(corners, axis=0), [32, 32, 32], atol=1e-3)


def test_layout_volume_marks_each_base_where_its_box_is(crops):
    out, layout, image = crops
    index_map = nib.load(str(out / "layout.nii.gz"))
    np.testing.assert_allclose(index_map.affine, image.affine, atol=1e-5)
    values = np.asarray(index_map.dataobj)
    assert values.shape == image.shape
    assert set(np.unique(values)) <= set(range(10)) and len(np.unique(values)) > 1
    for base in layout["bases"]:
        voxels = np.argwhere(values == base["index"] + 1)
        if len(voxels) == 0:  # the base lies in the padding beyond the image
            continue
        ras = apply_affine(image.affine, voxels)
        corners = np.array(base["corners_ras"])
        assert (ras >= corners.min(axis=0) - 1e-3).all() and (ras <= corners.max(axis=0) + 1e-3).all()


def test_layout_picture_is_written(crops):
    out, _, _ = crops
    png = (out / "layout.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_positions_compare_predictions_with_the_truth(shipped, tmp_path):
    run = tmp_path / "run"
    trained = run_voco("pretrain", "--data", shipped["spine-ct"], "--out", run, "--preset", "demo",
                       "--backbone", "swinunetr-tiny", "--steps", 2, "--batch-size", 1, "--progress", "jsonl")
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "positions"
    result = run_voco("positions", shipped["spine-ct"], "--checkpoint", run / "checkpoint.pt", "--out", out,
                      "--target", 1, "--progress", "jsonl")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "positions.json").read_text())
    assert len(report["targets"]) == 2
    for target in report["targets"]:
        assert len(target["true"]) == len(target["predicted"]) == 9
        assert all(0 <= p <= 1 for p in target["predicted"])
        assert target["mean_abs_error"] == pytest.approx(np.abs(np.subtract(target["predicted"], target["true"])).mean())
    heat = nib.load(str(out / "positions.nii.gz"))
    layout = nib.load(str(shipped["spine-ct"]))
    assert heat.shape == layout.shape
    values = np.asarray(heat.dataobj)
    # Each base's region holds target 1's predicted overlap with that base.
    crops_out = tmp_path / "crops"
    assert run_voco("crops", shipped["spine-ct"], "--out", crops_out, "--preset", "demo").returncode == 0
    index_map = np.asarray(nib.load(str(crops_out / "layout.nii.gz")).dataobj)
    for k, predicted in enumerate(report["targets"][1]["predicted"]):
        if (index_map == k + 1).any():
            np.testing.assert_allclose(values[index_map == k + 1], predicted, atol=1e-6)
    assert (out / "positions.png").read_bytes()[:4] == b"\x89PNG"
    assert events(result.stdout)[-1]["event"] == "done"
    # The baselines that say whether pretraining learned anything: the constant prior predicts the
    # layout's mean true overlap everywhere; the untrained network has its own score.
    truth = np.array([target["true"] for target in report["targets"]])
    prior = report["baselines"]["constant_prior"]
    assert prior["value"] == pytest.approx(truth.mean())
    assert prior["mean_abs_error"] == pytest.approx(np.abs(truth - truth.mean()).mean())
    assert prior["top_base_accuracy_chance"] == pytest.approx(1 / 9)
    untrained = report["baselines"]["untrained"]
    assert 0 <= untrained["mean_abs_error"] <= 1 and 0 <= untrained["top_base_accuracy"] <= 1
    predicted = np.array([target["predicted"] for target in report["targets"]])
    assert report["top_base_accuracy"] == pytest.approx((predicted.argmax(1) == truth.argmax(1)).mean())


def test_the_untrained_baseline_is_the_runs_own_first_weights(shipped, tmp_path):
    """The untrained network ``voco positions`` compares with is the run's network before its first step."""
    from voco.positions import untrained_like
    from voco.presets import PRESETS
    from voco.training.pretrain import PretrainConfig, Pretrainer

    config = PretrainConfig(data=[str(shipped["spine-ct"])], out=str(tmp_path / "run"), preset=PRESETS["demo"],
                            backbone="swinunetr-tiny", steps=1, batch_size=1, seed=3)
    started = Pretrainer(config, Events()).student.state_dict()
    untrained, _ = untrained_like(config)
    assert started.keys() == untrained.state_dict().keys()
    for name, value in untrained.state_dict().items():
        assert torch.equal(value, started[name].cpu()), name


def test_a_pretraining_checkpoint_with_a_damaged_config_or_weights_is_one_error_line(shipped, tmp_path):
    """``format: voco-pretrain`` alone does not make a usable checkpoint: a config from elsewhere or
    weights of another network were tracebacks in positions and in pretrain --resume."""
    import torch

    from voco.errors import VocoInputError
    from voco.positions import load_pretrained

    run = tmp_path / "run"
    trained = run_voco("pretrain", "--data", shipped["spine-ct"], "--out", run, "--preset", "demo",
                       "--backbone", "swinunetr-tiny", "--steps", 1, "--batch-size", 1, "--progress", "jsonl")
    assert trained.returncode == 0, trained.stderr
    good = torch.load(run / "checkpoint.pt", weights_only=True)
    damaged = {
        "config_of_another_kind": ({**good, "config": {"epochs": 3}}, "unknown setting 'epochs'"),
        "config_with_a_wrong_type": ({**good, "config": {**good["config"], "backbone": 7}}, "backbone is 7"),
        "weights_of_another_network": ({**good, "student": {"layer.weight": torch.zeros(2)}},
                                       "its weights do not fit the network its configuration names"),
    }
    for name, (state, message) in damaged.items():
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        with pytest.raises(VocoInputError, match=message):
            load_pretrained(path)
    torch.save(damaged["config_with_a_wrong_type"][0], run / "checkpoint.pt")
    result = run_voco("pretrain", "--out", run, "--resume", "--steps", 2)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {run / 'checkpoint.pt'}: --resume: not the configuration of a "
                                          "voco pretrain run (backbone is 7)"]
