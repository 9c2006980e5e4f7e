"""``voco finetune``: it learns grey and white matter on the real MNI152 T1, writes a model package
that ``voco segment`` and ``voco models import`` take, refuses bad label maps with one line,
resumes bit for bit after SIGTERM or a kill, starts from VoCo pretraining checkpoints and model
packages (the clinician loop's next version), and keeps best.pt for the best validation Dice."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import Events, events, run_voco, stop_after_first_step, voco_command
from voco.cli import main
from voco.data.brain_tissue import dice_per_label, write_training_dataset
from voco.errors import VocoInputError
from voco.figures import read_metrics
from voco.models.segmentation import build_segmentation_network, is_backbone_key
from voco.models.voco import Student
from voco.presets import PRESETS
from voco.registry.package import Label, ModelCard, Preprocessing, read_package, write_package
from voco.training.finetune import FinetuneConfig, Finetuner, finetune

GREY = {"scheme": "SCT", "code": "40146001", "meaning": "Cerebral Gray Matter"}
WHITE = {"scheme": "SCT", "code": "68523003", "meaning": "Cerebral White Matter"}


# --- a small synthetic dataset: two 36^3 cases at 2 mm, a sphere (1) and a slab (2) ------------------

SPACING = np.diag([2.0, 2.0, 2.0, 1.0])


def synthetic_case(seed: int, shape=(36, 36, 36)):
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = rng.uniform(12, 24, 3)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[(x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 < 7 ** 2] = 1
    labels[(labels == 0) & (z > 28)] = 2
    image = np.array([20.0, 80.0, 50.0])[labels] + rng.normal(0, 5, shape)
    return image.astype(np.float32), labels


def write_synthetic_dataset(folder, cases=2, names=True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "imagesTr").mkdir(exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    training = []
    for index in range(cases):
        image, labels = synthetic_case(index)
        nib.save(nib.Nifti1Image(image, SPACING), str(folder / "imagesTr" / f"case{index}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, SPACING), str(folder / "labelsTr" / f"case{index}.nii.gz"))
        training.append({"image": f"./imagesTr/case{index}.nii.gz", "label": f"./labelsTr/case{index}.nii.gz"})
    dataset = {"name": "synthetic", "training": training}
    if names:
        dataset["labels"] = {"0": "background", "1": "lesion", "2": "slab"}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder / "dataset.json"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


def small_config(data, out, **changes) -> FinetuneConfig:
    values = dict(data=str(data), out=str(out), architecture="swinunetr-tiny", steps=2, batch_size=2, patch_size=32,
                  spacing=(2.0, 2.0, 2.0), val_every=1, checkpoint_every=100, seed=0)
    return FinetuneConfig(**{**values, **changes})


# --- 1 and 2: real data, the model package, segment and import ------------------------------------------

BRAIN_STEPS = 60
BRAIN_MIN_DICE = {"grey matter": 0.80, "white matter": 0.88}


@pytest.fixture(scope="module")
def brain_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("brain")
    dataset = write_training_dataset(folder / "data")
    out = folder / "run"
    result = run_voco("finetune", "--data", dataset, "--out", out, "--backbone", "swinunetr-tiny", "--spacing", "3,3,3",
                      "--patch-size", 32, "--steps", BRAIN_STEPS, "--lr", "1e-3", "--batch-size", 2,
                      "--val-every", 20, "--checkpoint-every", BRAIN_STEPS, "--name", "brain-tissue-test",
                      "--device", "cpu", "--progress", "jsonl")
    assert result.returncode == 0, result.stderr
    return dataset, out, events(result.stdout)


def test_finetuning_on_the_mni152_t1_learns_grey_and_white_matter(brain_run):
    """The tiny SwinUNETR from random weights, 60 steps of two 32^3 patches at 3 mm, lr 1e-3, on
    the MNI152 2009a T1 with labels from its own grey/white matter maps (voco.data.brain_tissue).
    There is only one labelled case, so validation is on the training case (the engine says so
    with a warning and ``on_training_data``): this measures that the loop learns, not how well it
    generalises. Measured (2-core CPU, seed 0): Dice grey 0.866, white 0.930 (mean 0.898) after 60
    steps; 0.823 / 0.902 after 20. Thresholds: grey > 0.80, white > 0.88, and the mean rises."""
    _, out, stream = brain_run
    warnings = [e["message"] for e in stream if e["event"] == "warning"]
    assert any("validating on the training case" in w for w in warnings)
    start = next(e for e in stream if e["event"] == "start")
    assert start["labels"] == ["grey matter", "white matter"] and start["spacing"] == [3.0, 3.0, 3.0]
    assert start["patch_size"] == 32 and start["modality"] == "mri"
    validations = [e for e in stream if e["event"] == "val_dice"]
    assert [e["step"] for e in validations] == [20, 40, 60]
    final = validations[-1]
    print("val Dice by step:", {e["step"]: {k: round(v, 3) for k, v in e["dice"].items()} for e in validations})
    assert final["on_training_data"] is True
    for name, minimum in BRAIN_MIN_DICE.items():
        assert final["dice"][name] > minimum, (name, final["dice"])
    assert final["mean"] == pytest.approx(np.mean(list(final["dice"].values())))
    assert validations[-1]["mean"] > validations[0]["mean"]
    done = stream[-1]
    assert done["event"] == "done" and done["best_mean_dice"] == max(e["mean"] for e in validations)


def test_the_run_writes_a_complete_model_package(brain_run):
    _, out, stream = brain_run
    package = read_package(out / "model", verify=True)
    card = package.card
    assert (card.name, card.version, card.architecture, card.in_channels) == \
        ("brain-tissue-test", "1", "swinunetr-tiny", 1)
    assert [(label.value, label.name, label.terminology) for label in card.labels] == \
        [(1, "grey matter", GREY), (2, "white matter", WHITE)]
    assert all(label.color.startswith("#") and len(label.color) == 7 for label in card.labels)
    assert card.preprocessing.spacing == (3.0, 3.0, 3.0) and card.preprocessing.patch_size == (32, 32, 32)
    assert card.preprocessing.modality == "mri"
    best = max((e for e in stream if e["event"] == "val_dice"), key=lambda e: e["mean"])
    assert card.metrics["val_dice"] == best["dice"] and card.metrics["mean_val_dice"] == best["mean"]
    assert card.metrics["step"] == best["step"] and card.metrics["on_training_data"] is True
    assert card.metrics["val_cases"] == ["mni152"] and card.training["train_cases"] == ["mni152"]
    # best.pt holds the package's weights; last.pt the end of the run.
    weights = package.load_state_dict()
    best_pt = torch.load(out / "best.pt", weights_only=True)
    assert best_pt["step"] == best["step"]
    assert all(torch.equal(weights[k], best_pt["network"][k]) for k in weights)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == BRAIN_STEPS


def test_segment_runs_the_package_and_the_imported_model_by_name(brain_run, tmp_path, monkeypatch, capsys):
    """The package segments the MNI152 T1 on its own 1 mm grid; the label map agrees with the
    reference labels there (measured: grey 0.846, white 0.894; the val Dice above is on the 3 mm
    grid). Thresholds: grey > 0.78, white > 0.85."""
    dataset, out, _ = brain_run
    image, reference = dataset.parent / "imagesTr" / "mni152.nii.gz", dataset.parent / "labelsTr" / "mni152.nii.gz"
    result = run_voco("segment", image, tmp_path / "seg.nii.gz", "--model", out / "model", "--device", "cpu",
                      "--progress", "jsonl")
    assert result.returncode == 0, result.stderr
    labels = np.asarray(nib.load(str(tmp_path / "seg.nii.gz")).dataobj)
    truth = np.asarray(nib.load(str(reference)).dataobj)
    assert labels.shape == truth.shape
    scores = dice_per_label(labels, truth)
    print("Dice of voco segment on the 1 mm grid:", {k: round(v, 3) for k, v in scores.items()})
    assert scores["grey matter"] > 0.78 and scores["white matter"] > 0.85
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert [(r["value"], r["name"]) for r in sidecar["labels"]] == [(1, "grey matter"), (2, "white matter")]
    assert sidecar["model"]["name"] == "brain-tissue-test"

    monkeypatch.setenv("VOCO_MODELS_DIR", str(tmp_path / "models"))
    capsys.readouterr()
    assert main(["models", "import", str(out / "model"), "--progress", "jsonl"]) == 0
    imported = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert imported[0]["event"] == "imported" and imported[0]["name"] == "brain-tissue-test"
    assert imported[0]["version"] == "1"
    assert main(["segment", str(image), str(tmp_path / "by-name.nii.gz"), "--model", "brain-tissue-test",
                 "--device", "cpu"]) == 0
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "by-name.nii.gz")).dataobj), labels)


# --- 3. bad label maps and datasets -------------------------------------------------------------------------

def bad_dataset(name, tmp):
    """(data argument, text the error line must contain)."""
    folder = tmp / "data"
    dataset = write_synthetic_dataset(folder)
    image, labels = synthetic_case(0)
    label_path = folder / "labelsTr" / "case0.nii.gz"
    if name == "label_shape":
        nib.save(nib.Nifti1Image(labels[:, :, :30], SPACING), str(label_path))
        return dataset, "case0.nii.gz: label map does not match its image: shape 36x36x30 vs 36x36x36 (case0.nii.gz)"
    if name == "label_affine":
        shifted = SPACING.copy()
        shifted[:3, 3] = [0.0, 0.0, 4.0]
        nib.save(nib.Nifti1Image(labels, shifted), str(label_path))
        return dataset, "case0.nii.gz: label map does not match its image: origin/spacing/direction differ by up to 4"
    if name == "label_spacing":
        nib.save(nib.Nifti1Image(labels, np.diag([2.0, 2.0, 2.5, 1.0])), str(label_path))
        return dataset, "label map does not match its image: origin/spacing/direction differ by up to 0.5"
    if name == "label_not_integer":
        nib.save(nib.Nifti1Image(labels.astype(np.float32) * 0.5, SPACING), str(label_path))
        return dataset, "labelsTr/case0.nii.gz: is not a label map: values must be non-negative whole numbers"
    if name == "label_negative":
        nib.save(nib.Nifti1Image(labels.astype(np.int16) - 1, SPACING), str(label_path))
        return dataset, "labelsTr/case0.nii.gz: is not a label map"
    if name == "label_missing_in_folder":
        (folder / "dataset.json").unlink()
        (folder / "labelsTr" / "case1.nii.gz").unlink()
        return folder, "image case1.nii.gz has no label in labelsTr/"
    if name == "label_missing_in_dataset_json":
        (folder / "labelsTr" / "case1.nii.gz").unlink()
        return dataset, "which does not exist"
    if name == "dataset_json_not_json":
        dataset.write_text('{"training": [{"image": "./imagesTr/case0.nii.gz",')
        return dataset, "dataset.json: invalid JSON"
    if name == "label_header_larger_than_file":  # 256 MB declared in a gzip file that holds at most ~55 kB
        from test_volumes import header_only_nifti

        header_only_nifti(label_path, shape=(400, 400, 400))
        return dataset, "labelsTr/case0.nii.gz: declares 400x400x400 float32 voxels (256000000 bytes), but a gzip file"
    if name == "only_background":
        for index in range(2):
            nib.save(nib.Nifti1Image(np.zeros((36, 36, 36), np.uint8), SPACING),
                     str(folder / "labelsTr" / f"case{index}.nii.gz"))
        return dataset, "the label maps hold no foreground (only 0)"
    raise AssertionError(name)


BAD = ["label_shape", "label_affine", "label_spacing", "label_not_integer", "label_negative",
       "label_missing_in_folder", "label_missing_in_dataset_json", "dataset_json_not_json", "only_background",
       "label_header_larger_than_file"]


@pytest.mark.parametrize("case", BAD)
def test_bad_labels_get_one_error_line_exit_code_2_and_no_run_folder(case, tmp_path, capsys):
    data, expected = bad_dataset(case, tmp_path)
    out = tmp_path / "run"
    code = main(["finetune", "--data", str(data), "--out", str(out), "--backbone", "swinunetr-tiny",
                 "--patch-size", "32",
                 "--spacing", "2,2,2", "--steps", "1", "--device", "cpu", "--progress", "jsonl"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    last = json.loads(captured.out.strip().splitlines()[-1])
    assert last["event"] == "error" and expected in last["message"]
    assert not out.exists()


@pytest.mark.parametrize("case", ["val_cases", "patch_size", "init_architecture", "resume_without_run"])
def test_bad_options_get_one_error_line(case, synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["finetune", "--data", str(synthetic), "--out", str(out), "--steps", "1", "--device", "cpu"]
    if case == "val_cases":
        argv, expected = common + ["--val-cases", "2", "--patch-size", "32"], "--val-cases 2 leaves no training case"
    elif case == "patch_size":
        argv, expected = common + ["--patch-size", "48"], "--patch-size must be a multiple of 32, got 48"
    elif case == "init_architecture":
        torch.manual_seed(0)
        tiny = ModelCard("tiny", "1", "swinunetr-tiny", 1, [Label(1, "a", "#ffffff")],
                         Preprocessing("mri", (2.0,) * 3, (32,) * 3))
        weights = build_segmentation_network("swinunetr-tiny", 1, 2).state_dict()
        package = write_package(tmp_path / "tiny", tiny, weights)
        argv = common + ["--init", str(package.folder), "--backbone", "swinunetr-b"]
        expected = "--init holds a swinunetr-tiny network, not swinunetr-b"
    else:
        argv, expected = ["finetune", "--out", str(out), "--resume"], "no run to resume"
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not out.exists()


# --- 4. resume ----------------------------------------------------------------------------------------------

RESUME_STEPS = 6


def resume_args(data, out, *extra):
    return ("finetune", "--data", data, "--out", out, "--backbone", "swinunetr-tiny", "--spacing", "2,2,2",
            "--patch-size", 32, "--steps", RESUME_STEPS, "--batch-size", 2, "--val-every", 3, "--checkpoint-every", 2,
            "--seed", 3, "--device", "cpu", "--progress", "jsonl", *extra)


def run_tensors(out) -> dict[str, torch.Tensor]:
    last = torch.load(out / "last.pt", weights_only=True)
    flat = {f"network.{k}": v for k, v in last["network"].items()}
    for i, state in last["optimizer"]["state"].items():
        flat.update({f"optimizer.{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    flat.update({f"best.{k}": v for k, v in torch.load(out / "best.pt", weights_only=True)["network"].items()})
    return flat


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_voco(*resume_args(synthetic, out))
    assert result.returncode == 0, result.stderr
    return out


def test_sigterm_saves_the_current_step_and_resume_matches_the_uninterrupted_run(uninterrupted, synthetic, tmp_path):
    out = tmp_path / "stopped"
    code, stopped = stop_after_first_step(*resume_args(synthetic, out))
    assert code == 128 + signal.SIGTERM
    assert stopped[-1]["event"] == "stopped"
    step = stopped[-1]["step"]
    assert 1 <= step < RESUME_STEPS
    assert torch.load(out / "last.pt", weights_only=True)["step"] == step
    assert not list(out.glob(".*.tmp*"))

    result = run_voco(*resume_args(synthetic, out, "--resume"))
    assert result.returncode == 0, result.stderr
    resumed = events(result.stdout)
    assert next(e for e in resumed if e["event"] == "start")["step"] == step
    assert [e["step"] for e in resumed if e["event"] == "step"] == list(range(step + 1, RESUME_STEPS + 1))
    assert_bitwise_equal(run_tensors(out), run_tensors(uninterrupted))
    assert losses(out) == losses(uninterrupted)


def test_kill_after_a_checkpoint_then_resume_matches_the_uninterrupted_run(uninterrupted, synthetic, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen(voco_command(*resume_args(synthetic, out)), stdout=subprocess.PIPE, text=True)
    for line in process.stdout:  # kill -9 right after the step-4 checkpoint is announced
        if '"checkpoint"' in line and '"step": 4' in line:
            process.kill()
            break
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    # Only the options that may change are given again: the rest come from the run's config.json.
    result = run_voco("finetune", "--out", out, "--resume", "--device", "cpu", "--progress", "jsonl")
    assert result.returncode == 0, result.stderr
    assert next(e for e in events(result.stdout) if e["event"] == "start")["step"] == 4
    assert_bitwise_equal(run_tensors(out), run_tensors(uninterrupted))


# --- 5. starting weights ----------------------------------------------------------------------------------

def test_init_from_a_voco_pretraining_checkpoint_fills_the_whole_backbone(synthetic, tmp_path):
    torch.manual_seed(11)
    student = Student("swinunetr-tiny", PRESETS["demo"])
    checkpoint = tmp_path / "pretrain" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    torch.save({"format": "voco-pretrain", "format_version": 1, "step": 5, "backbone": "swinunetr-tiny",
                "student": student.state_dict(), "teacher": None}, checkpoint)
    seen = Events()
    tuner = Finetuner(small_config(synthetic, tmp_path / "run", init=str(checkpoint), architecture=None), seen, "cpu")
    assert tuner.architecture == "swinunetr-tiny"  # taken from the checkpoint
    (init,) = seen.of("init")
    assert init["layout"] == "voco-pretrain" and init["path"] == str(checkpoint)
    assert init["fraction"] == 1.0 and init["backbone_matched"] == init["backbone_total"] > 100
    assert init["shape_mismatched"] == 0
    assert init["unexpected"] == len([k for k in student.state_dict() if k.startswith("head.")])  # projection head
    network = tuner.network.state_dict()
    pretrained = {k.removeprefix("backbone."): v for k, v in student.state_dict().items() if k.startswith("backbone.")}
    backbone = [k for k in network if is_backbone_key("swinunetr-tiny", k)]
    assert len(backbone) == init["backbone_total"]
    assert all(torch.equal(network[k], pretrained[k]) for k in backbone)


def clinic_package(folder, name="clinic", version="1"):
    """A released model whose label order (slab first) differs from the data's value order."""
    torch.manual_seed(12)
    state = build_segmentation_network("swinunetr-tiny", 1, 3).state_dict()
    labels = [Label(2, "slab", "#123456"), Label(1, "lesion", "#abcdef")]
    return write_package(folder, ModelCard(name, version, "swinunetr-tiny", 1, labels,
                                           Preprocessing("mri", (2.0, 2.0, 2.0), (32, 32, 32))), state), state


def test_the_clinician_loop_makes_the_next_version_of_the_same_model(synthetic, tmp_path):
    package, state = clinic_package(tmp_path / "clinic-1")
    seen = Events()
    config = small_config(synthetic, tmp_path / "run", init=str(package.folder), architecture=None,
                          patch_size=None, spacing=None, name="clinic")
    assert finetune(config, seen, device="cpu") == 0
    (init,) = seen.of("init")
    assert init["layout"] == "voco-model" and init["fraction"] == 1.0
    assert init["missing"] == 0 and init["shape_mismatched"] == 0 and init["unexpected"] == 0  # head included
    card = read_package(tmp_path / "run" / "model", verify=True).card
    assert (card.name, card.version) == ("clinic", "2")
    assert card.training["parent"] == {"name": "clinic", "version": "1"}
    assert [(label.value, label.name, label.color) for label in card.labels] == \
        [(2, "slab", "#123456"), (1, "lesion", "#abcdef")]  # the starting model's order and colours
    # Spacing and patch come from the starting model's card.
    assert card.preprocessing.spacing == (2.0, 2.0, 2.0) and card.preprocessing.patch_size == (32, 32, 32)
    # Another name starts a new model at version 1.
    other = small_config(synthetic, tmp_path / "other", init=str(package.folder), architecture=None, steps=1,
                         name="someone-else")
    assert finetune(other, Events(), device="cpu") == 0
    assert read_package(tmp_path / "other" / "model").card.version == "1"


def test_the_next_version_of_an_imported_model_by_name(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("VOCO_MODELS_DIR", str(tmp_path / "models"))
    package, _ = clinic_package(tmp_path / "clinic-3", version="3")
    assert main(["models", "import", str(package.folder)]) == 0
    config = small_config(synthetic, tmp_path / "run", init="clinic", architecture=None, steps=1, name="clinic")
    assert finetune(config, Events(), device="cpu") == 0
    assert read_package(tmp_path / "run" / "model").card.version == "4"


def test_the_next_version_after_a_roll_back_skips_the_versions_kept():
    from voco.training.finetune import next_version

    assert next_version("2", ["1", "2"]) == "3"
    assert next_version("1.0", []) == "2"              # after a published 1.0
    assert next_version("1", ["1", "2", "3"]) == "4"   # rolled back to 1: 2 and 3 are kept, not overwritten
    assert next_version("a1b2c3", []) == "1"           # a backbone's digest is no version number


# --- 6. validation, best and last --------------------------------------------------------------------------

def test_validation_events_best_and_last(synthetic, tmp_path):
    seen = Events()
    config = small_config(synthetic, tmp_path / "run", steps=4, val_every=2, checkpoint_every=3)
    assert finetune(config, seen, device="cpu") == 0
    validations = seen.of("val_dice")
    assert [v["step"] for v in validations] == [2, 4]
    for v in validations:
        assert set(v["dice"]) == {"lesion", "slab"}
        assert all(d is None or 0 <= d <= 1 for d in v["dice"].values())
        scored = [d for d in v["dice"].values() if d is not None]
        assert v["mean"] == pytest.approx(np.mean(scored) if scored else 0.0)
        assert v["on_training_data"] is False  # two cases: one is held out
    assert [c["step"] for c in seen.of("checkpoint")] == [3, 4]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 4
    best = max(validations, key=lambda v: v["mean"])  # the first of equal means wins
    best_pt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best_pt["step"] == best["step"] and best_pt["best"]["mean"] == best["mean"]
    assert read_package(tmp_path / "run" / "model").card.metrics["step"] == best["step"]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["val_mean"] for r in records if "val_mean" in r] == [v["mean"] for v in validations]


def test_best_is_replaced_only_when_the_mean_dice_improves(synthetic, tmp_path, monkeypatch):
    means = [0.2, 0.5, 0.4, 0.5, 0.7, 0.6]
    scripted = iter(means)
    saved = []

    def validate(self):
        mean = next(scripted)
        return {"dice": {"lesion": mean, "slab": mean}, "mean": mean}

    original = Finetuner.save_best

    def save_best(self):
        saved.append((self.step, self.best["mean"]))
        return original(self)

    monkeypatch.setattr(Finetuner, "validate", validate)
    monkeypatch.setattr(Finetuner, "save_best", save_best)
    seen = Events()
    assert finetune(small_config(synthetic, tmp_path / "run", steps=6), seen, device="cpu") == 0
    assert [v["mean"] for v in seen.of("val_dice")] == means
    assert saved == [(1, 0.2), (2, 0.5), (5, 0.7)]  # not at step 4: 0.5 is no improvement on 0.5
    best_pt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best_pt["step"] == 5 and best_pt["best"]["mean"] == 0.7
    assert seen.of("done")[0]["best_step"] == 5
    card = read_package(tmp_path / "run" / "model").card
    assert card.metrics["mean_val_dice"] == 0.7 and card.metrics["step"] == 5
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["step"] == 6 and last["best"]["step"] == 5
    assert not torch.equal(last["network"]["out.conv.conv.weight"], best_pt["network"]["out.conv.conv.weight"])


# --- 7. non-finite steps, damaged starting models, a busy run folder -----------------------------------------

def strict_json_lines(path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def infinite_loss_at(monkeypatch, steps):
    """Make the loss infinite at the given steps (an extreme voxel does that to a real run), and
    validation a constant (its sliding window is not what these tests are about)."""
    original = Finetuner.train_step

    def train_step(self):
        real = getattr(self.loss, "real", self.loss)
        self.loss = real
        if self.step + 1 in steps:
            self.loss = lambda logits, target: real(logits, target) * float("inf")
            self.loss.real = real
        return original(self)

    monkeypatch.setattr(Finetuner, "train_step", train_step)
    monkeypatch.setattr(Finetuner, "validate", lambda self: {"dice": {"lesion": 0.5, "slab": 0.5}, "mean": 0.5})


def test_a_step_with_an_infinite_loss_is_skipped_with_a_warning_and_the_run_goes_on(synthetic, tmp_path, monkeypatch):
    infinite_loss_at(monkeypatch, {2})
    seen = Events()
    weights_after = {}
    original = Finetuner.train_step

    def recording(self):
        values = original(self)
        weights_after[self.step + 1] = self.network.state_dict()["out.conv.conv.weight"].clone()
        return values

    monkeypatch.setattr(Finetuner, "train_step", recording)
    assert finetune(small_config(synthetic, tmp_path / "run", steps=3, val_every=100), seen, device="cpu") == 0
    assert [w["step"] for w in seen.of("warning") if "not finite" in w["message"]] == [2]
    assert torch.equal(weights_after[1], weights_after[2]) and not torch.equal(weights_after[2], weights_after[3])
    records = strict_json_lines(tmp_path / "run" / "metrics.jsonl")
    assert [r["loss"] is None for r in records] == [False, True, False]
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["network"].values() if v.is_floating_point())


def test_five_non_finite_steps_in_a_row_stop_with_one_line_and_keep_the_last_checkpoint(synthetic, tmp_path,
                                                                                      monkeypatch, capsys):
    out = tmp_path / "run"
    infinite_loss_at(monkeypatch, set(range(1, 20)))
    capsys.readouterr()
    assert main(["finetune", "--data", str(synthetic), "--out", str(out), "--backbone", "swinunetr-tiny",
                 "--patch-size", "32", "--spacing", "2,2,2", "--steps", "10", "--checkpoint-every", "1",
                 "--device", "cpu", "--progress", "jsonl"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: training stopped at step 5: the loss or its "
                                                   "gradients were not finite in 5 steps in a row"), captured.err
    assert len([e for e in events(captured.out) if e["event"] == "warning"]) == 5
    last = torch.load(out / "last.pt", weights_only=True)  # written at steps 1..4, with the initial weights
    assert last["step"] == 4
    assert all(torch.isfinite(v).all() for v in last["network"].values() if v.is_floating_point())
    assert [r["loss"] for r in strict_json_lines(out / "metrics.jsonl")] == [None] * 4


def test_non_finite_weights_are_never_saved(synthetic, tmp_path):
    tuner = Finetuner(small_config(synthetic, tmp_path / "run", steps=1), Events(), device="cpu")
    tuner.save_last()
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with torch.no_grad():
        next(tuner.network.parameters()).fill_(float("nan"))
    for save in (tuner.save_last, tuner.save_best):
        with pytest.raises(VocoInputError, match="tensors are not finite"):
            save()
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "run")) == ["last.pt"]


@pytest.mark.parametrize("damage, message", [
    ("weights", "weights.pt: sha256 does not match the model card"),
    ("card", "model.json: model card patch_size must be three multiples of 32 up to 512, got [4096, 4096, 4096]"),
])
def test_init_from_a_damaged_package_is_one_error_line(damage, message, synthetic, tmp_path, capsys):
    package, _ = clinic_package(tmp_path / "clinic")
    if damage == "weights":
        weights = package.folder / "weights.pt"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one altered byte of tensor data: the file still loads
        weights.write_bytes(bytes(data))
    else:
        card = json.loads((package.folder / "model.json").read_text())
        card["preprocessing"]["patch_size"] = [4096] * 3
        (package.folder / "model.json").write_text(json.dumps(card))
    code = main(["finetune", "--data", str(synthetic), "--out", str(tmp_path / "run"), "--init", str(package.folder),
                 "--steps", "1", "--device", "cpu", "--progress", "jsonl"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_a_second_run_on_a_run_folder_in_use_is_refused_naming_the_holder(synthetic, tmp_path, capsys):
    """The lock is the operating system's: another open of ``.lock`` cannot take it, even in this process."""
    from voco.jobs.run_lock import run_lock

    out = tmp_path / "busy"
    with run_lock(out):
        code = main(["finetune", "--data", str(synthetic), "--out", str(out), "--steps", "2", "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0] == f"error: {out}: the run folder is in use by another training process " \
                       f"(pid {os.getpid()} on {socket.gethostname()})"
    assert os.listdir(out) == [".lock"]


def test_the_held_out_case_is_the_mean_of_the_fine_voxels_each_coarse_voxel_covers():
    """The evaluation dataset's held-out template is put on its 1.5 mm tissue grid by block means
    of its 0.5 mm T1 (as the real pair: the coarse x axis flipped, centres on fine centres)."""
    from voco.data.brain_tissue import _block_mean_on_grid

    fine_values = np.random.default_rng(0).random((12, 9, 9)).astype(np.float32)
    fine = nib.Nifti1Image(fine_values, np.diag([0.5, 0.5, 0.5, 1.0]))
    coarse = np.array([[-1.5, 0, 0, 4.0], [0, 1.5, 0, 0.5], [0, 0, 1.5, 0.5], [0, 0, 0, 1]])  # x flipped
    sampled = _block_mean_on_grid(fine, coarse, (3, 3, 3))
    # coarse (i, j, k) has its centre on fine voxel (8 - 3i, 1 + 3j, 1 + 3k) and covers +-1 around it
    for i, j, k in np.ndindex(3, 3, 3):
        x, y, z = 8 - 3 * i, 1 + 3 * j, 1 + 3 * k
        block = fine_values[x - 1:x + 2, y - 1:y + 2, z - 1:z + 2]
        assert sampled[i, j, k] == pytest.approx(block.mean(), rel=1e-5)
    with pytest.raises(ValueError, match="whole multiple"):
        _block_mean_on_grid(fine, np.diag([0.7, 0.7, 0.7, 1.0]), (3, 3, 3))
