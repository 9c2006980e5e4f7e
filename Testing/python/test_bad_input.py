"""Bad paths and files around the data get one ``error:`` line and exit code 2, not a traceback:
output folders that cannot be written, data folders that cannot be read, label values no class
table can hold, a run folder's ``config.json`` that is not one. And stderr holds that line only,
also in the commands that import MONAI (checked through the real ``python -m voco``).

Tests may run as root, for whom ``chmod`` stops nothing: a read-only folder is then one of the
kernel's (``/sys``), and an unreadable one ``/proc/1/map_files``; each case is skipped where the
machine offers no such folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import events, run_voco
from voco.cli import main
from voco.registry.package import Label, ModelCard, Preprocessing, write_package
from voco.training.finetune import FinetuneConfig
from voco.training.pretrain import PretrainConfig
from voco.presets import PRESETS

SPACING = np.diag([2.0, 2.0, 2.0, 1.0])


def image(path, shape=(40, 40, 24)):
    data = np.random.default_rng(0).normal(100, 20, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, SPACING), str(path))
    return path


def labelled_dataset(folder, labels=None, label_map=None, nnunet=False):
    """One 32^3 case (a cube labelled 1); ``labels``: the dataset.json's labels entry."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    if label_map is None:
        label_map = np.zeros((32, 32, 32), np.uint8)
        label_map[8:24, 8:24, 8:24] = 1
    image_name = "case0_0000.nii.gz" if nnunet else "case0.nii.gz"
    image(folder / "imagesTr" / image_name, (32, 32, 32))
    nib.save(nib.Nifti1Image(label_map, SPACING, dtype=label_map.dtype), str(folder / "labelsTr" / "case0.nii.gz"))
    if nnunet:
        dataset = {"channel_names": {"0": "MR"}, "file_ending": ".nii.gz", "labels": labels}
    else:
        dataset = {"training": [{"image": "./imagesTr/case0.nii.gz", "label": "./labelsTr/case0.nii.gz"}],
                   "labels": labels or {"0": "background", "1": "cube"}}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder / "dataset.json"


def one_error_line(argv, capsys) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --- output folders that cannot be written -------------------------------------------------------------

def output_argv(command, out, tmp_path):
    """``voco COMMAND`` writing into ``out``; every other argument is valid or never reached."""
    if command == "segment":
        return ["segment", image(tmp_path / "scan.nii.gz"), out / "seg.nii.gz", "--model", "never-resolved"]
    if command == "pretrain":
        return ["pretrain", "--data", image(tmp_path / "scan.nii.gz"), "--out", out, "--steps", "1",
                "--backbone", "swinunetr-tiny", "--preset", "demo"]
    if command == "finetune":
        return ["finetune", "--data", labelled_dataset(tmp_path / "data"), "--out", out, "--steps", "1",
                "--patch-size", "32", "--spacing", "2,2,2", "--device", "cpu"]
    if command == "evaluate":
        return ["evaluate", "--data", labelled_dataset(tmp_path / "data"), "--out", out, "--init", "scratch",
                "--seeds", "1", "--steps", "1", "--patch-size", "32", "--spacing", "2,2,2", "--device", "cpu"]
    if command == "crops":
        return ["crops", image(tmp_path / "scan.nii.gz"), "--out", out]
    if command == "positions":
        return ["positions", image(tmp_path / "scan.nii.gz"), "--checkpoint", tmp_path / "never-read.pt", "--out", out]
    return ["demo", "--out", out, "--steps", "1"]


FOLDER_COMMANDS = ["segment", "pretrain", "finetune", "evaluate", "crops", "positions", "demo"]


@pytest.mark.parametrize("command", FOLDER_COMMANDS)
def test_an_output_under_a_file_names_that_file(command, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    line = one_error_line(output_argv(command, blocker / "out", tmp_path), capsys)
    assert f"{blocker}/out: cannot be made: {blocker} is a file, not a folder" in line, line
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("command", FOLDER_COMMANDS[1:])
def test_an_out_that_is_an_existing_file_is_refused_and_kept(command, tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    line = one_error_line(output_argv(command, existing, tmp_path), capsys)
    assert line == f"error: {existing}: is a file; --out needs a folder"
    assert existing.read_text() == "keep me"


def read_only_folder(kind, tmp_path) -> Path:
    if kind == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes into a chmod 0o555 folder (see the sysfs case)")
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        return Path("/sys/voco-test-output")
    pytest.skip("this machine has no read-only /sys")


@pytest.mark.parametrize("kind", ["chmod", "sysfs"])
@pytest.mark.parametrize("command", ["segment", "pretrain", "finetune", "evaluate", "crops"])
def test_a_read_only_output_folder_is_an_error_before_any_work(command, kind, tmp_path, capsys):
    folder = read_only_folder(kind, tmp_path)
    try:
        line = one_error_line(output_argv(command, folder / "out", tmp_path), capsys)
    finally:
        if kind == "chmod":
            folder.chmod(0o755)
    assert line.startswith(f"error: {folder}/out") and "cannot be written (" in line, line
    assert not (folder / "out").exists()


def test_a_run_folder_made_read_only_after_its_last_run_is_an_error_before_training(tmp_path, capsys, monkeypatch):
    """The ``.lock`` of the last run can still be opened, but nothing new can be written beside it
    (as root, made so by refusing the probe file the check writes)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_bytes(b"")

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    line = one_error_line(output_argv("pretrain", run, tmp_path), capsys)
    assert line == f"error: {run}: cannot be written (Permission denied)"


def test_an_os_error_on_a_named_path_that_escapes_the_checks_is_one_line(monkeypatch, tmp_path, capsys):
    from voco import cli

    def full_disk(args, reporter):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "layout.png"))

    monkeypatch.setitem(cli.COMMANDS, "crops", full_disk)
    line = one_error_line(["crops", "x.nii.gz", "--out", tmp_path / "out"], capsys)
    assert line == f"error: {tmp_path}/out/layout.png: No space left on device"


def test_other_errors_keep_their_traceback(monkeypatch):
    from voco import cli

    def bug(args, reporter):
        raise OSError(5, "Input/output error")  # no path: not the user's to fix

    monkeypatch.setitem(cli.COMMANDS, "crops", bug)
    with pytest.raises(OSError):
        main(["crops", "x.nii.gz", "--out", "out"])


# --- data folders that cannot be read ------------------------------------------------------------------

def unreadable_folder(kind, tmp_path) -> Path:
    if kind == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root reads a chmod 0o000 folder (see the procfs case)")
        folder = tmp_path / "unreadable"
        folder.mkdir()
        folder.chmod(0)
        return folder
    folder = Path("/proc/1/map_files")
    try:
        os.listdir(folder)
    except PermissionError:
        return folder
    except OSError:
        pass
    pytest.skip("this machine has no unreadable /proc/1/map_files")


@pytest.mark.parametrize("kind", ["chmod", "procfs"])
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_an_unreadable_data_folder_is_named_with_the_reason(command, kind, tmp_path, capsys):
    folder = unreadable_folder(kind, tmp_path)
    try:
        line = one_error_line([command, "--data", folder, "--out", tmp_path / "run", "--steps", "1"], capsys)
    finally:
        if kind == "chmod":
            folder.chmod(0o755)
    assert line == f"error: {folder}: cannot be read (Permission denied)"
    assert not (tmp_path / "run").exists()


# --- label values ----------------------------------------------------------------------------------------

def with_nan():
    values = np.zeros((32, 32, 32), np.float32)
    values[8:24, 8:24, 8:24] = 1
    values[1, 1, 1] = np.nan
    return values


def with_value(value):
    values = np.zeros((32, 32, 32), np.int64)
    values[8:24, 8:24, 8:24] = value
    return values


LABEL_CASES = {
    "nan_in_label_map": (dict(label_map=with_nan()), "labelsTr/case0.nii.gz: is not a label map"),
    "label_map_value_99999999999": (dict(label_map=with_value(99999999999)),
                                    "labelsTr/case0.nii.gz: is not a label map: values must be non-negative "
                                    "whole numbers up to 65535"),
    "msd_label_99999999999": (dict(labels={"0": "background", "1": "cube", "99999999999": "huge"}),
                              "dataset.json: \"labels\" entry '99999999999': '99999999999' is not a label value"),
    "msd_label_negative": (dict(labels={"0": "background", "1": "cube", "-1": "minus"}), "'-1' is not a label value"),
    "msd_label_fraction": (dict(labels={"0": "background", "1": "cube", "1.5": "half"}),
                           "'1.5' is not a label value"),
    "nnunet_label_99999999999": (dict(nnunet=True, labels={"background": 0, "cube": 1, "huge": 99999999999}),
                                 "\"labels\" entry 'huge': 99999999999 is not a label value"),
    "nnunet_label_negative": (dict(nnunet=True, labels={"background": 0, "cube": 1, "minus": -3}),
                              "'minus': -3 is not a label value"),
    "nnunet_label_fraction": (dict(nnunet=True, labels={"background": 0, "cube": 1, "half": 1.5}),
                              "'half': 1.5 is not a label value"),
    "nnunet_label_boolean": (dict(nnunet=True, labels={"background": 0, "cube": True}),
                             "'cube': True is not a label value"),
    "more_labels_than_classes": (dict(labels={str(v): f"label {v}" for v in range(300)}),
                                 "dataset.json: 299 labels; at most 255 are supported"),
}


@pytest.mark.parametrize("case", LABEL_CASES)
def test_label_values_no_class_table_can_hold_are_refused(case, tmp_path, capsys):
    changes, expected = LABEL_CASES[case]
    data = labelled_dataset(tmp_path / "data", **changes)
    line = one_error_line(["finetune", "--data", data, "--out", tmp_path / "run", "--steps", "1",
                           "--patch-size", "32", "--spacing", "2,2,2", "--device", "cpu"], capsys)
    assert expected in line, line
    assert not (tmp_path / "run").exists()


# --- config.json on --resume --------------------------------------------------------------------------------

def saved_configs(tmp_path) -> dict[str, dict]:
    return {"pretrain": PretrainConfig(data=["scan.nii.gz"], out=str(tmp_path), preset=PRESETS["demo"]).to_dict(),
            "finetune": FinetuneConfig(data="dataset.json", out=str(tmp_path)).to_dict()}


def broken(kind, good: dict) -> bytes:
    contents = {
        "not_json": "{oops", "empty": "", "list": "[1, 2]", "foreign": json.dumps({"model": "unet", "epochs": 3}),
        "missing_data": json.dumps({k: v for k, v in good.items() if k != "data"}),
        "steps_text": json.dumps({**good, "steps": "many"}),
        "steps_boolean": json.dumps({**good, "steps": True}),
    }
    if kind == "non_utf8":
        return b"\xff\xfe{"
    if kind == "nested":  # pretrain: the preset's grid; finetune: the spacing
        key, value = ("preset", {**good["preset"], "grid": "3,3"}) if "preset" in good else ("spacing", "2")
        return json.dumps({**good, key: value}).encode()
    return contents[kind].encode()


RESUME_CASES = {"not_json": "--resume: invalid JSON: Expecting property name enclosed in double quotes (line 1, column 2)",
                "empty": "--resume: invalid JSON: Expecting value (line 1, column 1)",
                "non_utf8": "--resume: cannot be read: 'utf-8' codec can't decode",
                "list": "{voco} run (the file is not a JSON object)",
                "foreign": "{voco} run (unknown setting 'epochs')",
                "missing_data": "{voco} run (no 'data')",
                "steps_text": "{voco} run (steps is \"many\")",
                "steps_boolean": "{voco} run (steps is true)",
                "nested": None}


@pytest.mark.parametrize("kind", RESUME_CASES)
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_corrupt_or_foreign_config_json_on_resume_is_named(command, kind, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes(broken(kind, saved_configs(run)[command]))
    line = one_error_line([command, "--out", run, "--resume", "--device", "cpu"], capsys)
    expected = RESUME_CASES[kind] or ('(preset.grid is "3,3")' if command == "pretrain" else '(spacing is "2")')
    expected = expected.replace("{voco}", f"voco {command}")
    assert line.startswith(f"error: {run}/config.json: --resume: ") and expected in line, line


def test_a_saved_config_the_engine_wrote_is_read_back(tmp_path):
    from voco.training import finetune, pretrain

    for module, values in zip((pretrain, finetune), saved_configs(tmp_path).values()):
        (tmp_path / "config.json").write_text(json.dumps(values))
        assert json.dumps(module.resumable_config(tmp_path, {}).to_dict()) == json.dumps(values)


# --- stderr holds the one line, also after MONAI is imported (real CLI) -----------------------------------

@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noise")
    (folder / "noise.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))
    return folder / "noise.nii.gz"


def monai_failures(tmp_path, noise):
    """Commands that read a file MONAI cannot read (it then tries all its readers, DICOM included)."""
    package = write_package(tmp_path / "package", ModelCard("toy", "1", "swinunetr-tiny", 1, [Label(1, "a", "#ffffff")],
                                                            Preprocessing("mri", (2.0,) * 3, (32,) * 3)),
                            {"w": torch.zeros(1)})
    data = labelled_dataset(tmp_path / "data")
    (tmp_path / "data" / "labelsTr" / "case0.nii.gz").write_bytes(noise.read_bytes())
    return {"segment": ["segment", noise, tmp_path / "seg.nii.gz", "--model", package.folder],
            "finetune": ["finetune", "--data", data, "--out", tmp_path / "ft", "--steps", "1"],
            "pretrain": ["pretrain", "--data", noise, "--out", tmp_path / "pt", "--steps", "1"],
            "crops": ["crops", noise, "--out", tmp_path / "crops"]}


@pytest.mark.parametrize("command", ["segment", "finetune", "pretrain", "crops"])
def test_stderr_of_a_failing_command_that_imports_monai_is_the_error_line_alone(command, tmp_path, noise):
    result = run_voco(*monai_failures(tmp_path, noise)[command])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot be read" in lines[0], result.stderr


def test_a_successful_command_prints_no_monai_notice(tmp_path):
    result = run_voco("crops", image(tmp_path / "scan.nii.gz"), "--out", tmp_path / "crops", "--preset", "demo",
                      "--progress", "jsonl")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert events(result.stdout)[-1]["event"] == "done"


# --- options that asked for more memory than any machine has, or that numpy and torch refuse ---------------

OPTION_CASES = {
    "crops_grid_99": (["crops", "{image}", "--grid", "99,99,99", "--preset", "demo"],
                      "--grid 99,99,99 of 32-voxel crops makes a 3168x3168x3168 patch; at most 512 voxels an axis"),
    "crops_crop_edge_3200": (["crops", "{image}", "--crop-edge", "3200"], "makes a 9600x9600x3200 patch"),
    "crops_targets_10e9": (["crops", "{image}", "--targets", "1000000000", "--preset", "demo"],
                           "--targets must be at most 64, got 1000000000"),
    "crops_spacing_nan": (["crops", "{image}", "--spacing", "nan,1,1"],
                          "--spacing must be three positive numbers like 3,3,1, got 'nan,1,1'"),
    "crops_seed_negative": (["crops", "{image}", "--seed", "-1"],
                            "voco crops: argument --seed: must be a whole number from 0 to 4294967295, got '-1'"),
    "positions_seed_negative": (["positions", "{image}", "--checkpoint", "never-read.pt", "--seed", "-5"],
                                "argument --seed: must be a whole number from 0 to 4294967295, got '-5'"),
    "pretrain_seed_2_70": (["pretrain", "--data", "{image}", "--seed", str(2**70), "--preset", "demo",
                            "--backbone", "swinunetr-tiny", "--steps", "1"], "argument --seed: must be a whole number"),
    "pretrain_lr_inf": (["pretrain", "--data", "{image}", "--lr", "inf", "--preset", "demo",
                         "--backbone", "swinunetr-tiny", "--steps", "1"], "--lr must be positive and finite, got inf"),
    "finetune_lr_inf": (["finetune", "--data", "{dataset}", "--lr", "inf", "--patch-size", "32", "--spacing", "2,2,2",
                         "--steps", "1", "--device", "cpu"], "--lr must be positive and finite, got inf"),
    "finetune_patch_size_4096": (["finetune", "--data", "{dataset}", "--patch-size", "4096", "--spacing", "2,2,2",
                                  "--steps", "1", "--device", "cpu"], "--patch-size must be at most 512, got 4096"),
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_out_of_range_options_are_refused_before_any_work(case, tmp_path, capsys):
    argv, expected = OPTION_CASES[case]
    paths = {"{image}": str(image(tmp_path / "scan.nii.gz")), "{dataset}": str(labelled_dataset(tmp_path / "data"))}
    argv = [paths.get(a, a) for a in argv] + ["--out", str(tmp_path / "out")]
    line = one_error_line(argv, capsys)
    assert expected in line, line
    assert not (tmp_path / "out").exists()
