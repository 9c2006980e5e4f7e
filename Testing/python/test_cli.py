"""Bad input never produces a traceback: one line on stderr naming the file and the problem,
exit code 2, an ``error`` event for JSON-lines readers, and nothing half-written."""

from __future__ import annotations

import gzip
import json
import os
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch

from voco.cli import main


def nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def volume(seed=0, shape=(40, 40, 24)):
    return np.random.default_rng(seed).normal(100, 20, shape)


class Exploit:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __reduce__(self):
        return os.system, ("echo pwned > /tmp/voco-pwned",)


def make_case(name: str, tmp):
    """Returns (argv, text the error must contain) for one kind of bad input."""
    good = nifti(tmp / "good.nii.gz", volume())
    run = ("--out", tmp / "run", "--backbone", "swinunetr-tiny", "--preset", "demo", "--steps", "2")
    if name == "missing_file":
        return ("pretrain", "--data", tmp / "nope.nii.gz", *run), "nope.nii.gz: does not exist"
    if name == "corrupt_file":
        (tmp / "noise.nii.gz").write_bytes(os.urandom(3000))
        return ("pretrain", "--data", tmp / "noise.nii.gz", *run), "noise.nii.gz: cannot be read"
    if name == "truncated_file":
        whole = nifti(tmp / "whole.nii.gz", volume()).read_bytes()
        (tmp / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
        return ("pretrain", "--data", tmp / "cut.nii.gz", *run), "cut.nii.gz: cannot be read"
    if name == "two_dimensional":
        nifti(tmp / "slice.nii.gz", volume()[:, :, 0])
        return ("pretrain", "--data", tmp / "slice.nii.gz", *run), "is 2-D"
    if name == "four_dimensional":
        nifti(tmp / "series.nii.gz", np.stack([volume(i) for i in range(3)], axis=-1))
        return ("pretrain", "--data", tmp / "series.nii.gz", *run), "3 channels/time points"
    if name == "not_finite":
        data = volume()
        data[3, 4, 5] = np.nan
        nifti(tmp / "nan.nii.gz", data)
        return ("pretrain", "--data", tmp / "nan.nii.gz", *run), "NaN or infinite"
    if name == "constant":
        nifti(tmp / "flat.nii.gz", np.full((40, 40, 24), 7.0))
        return ("pretrain", "--data", tmp / "flat.nii.gz", *run), "is constant"
    if name == "empty_folder":
        (tmp / "empty").mkdir()
        return ("pretrain", "--data", tmp / "empty", *run), "no images"
    if name == "broken_dataset_json":
        (tmp / "dataset.json").write_text('{"training": [')
        return ("pretrain", "--data", tmp / "dataset.json", *run), "dataset.json: "
    if name == "dataset_json_missing_image":
        (tmp / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/a.nii.gz"}]}))
        return ("pretrain", "--data", tmp / "dataset.json", *run), "a.nii.gz"
    if name == "unsupported_file":
        (tmp / "photo.png").write_bytes(b"\x89PNG\r\n")
        return ("pretrain", "--data", tmp / "photo.png", *run), "photo.png: not an image"
    if name == "bad_grid":
        return ("pretrain", "--data", good, *run, "--grid", "3,3"), "--grid must be three positive numbers"
    if name == "bad_crop_edge":
        return ("pretrain", "--data", good, *run, "--crop-edge", "40"), "multiple of 32"
    if name == "unknown_preset":
        return ("pretrain", "--data", good, "--out", tmp / "run", "--preset", "v9"), "invalid choice: 'v9'"
    if name == "zero_steps":
        return ("pretrain", "--data", good, "--out", tmp / "run", "--steps", "0"), "--steps must be at least 1"
    if name == "resume_without_run":
        return ("pretrain", "--out", tmp / "run", "--resume"), "no run to resume"
    if name == "cuda_without_gpu":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        return ("pretrain", "--data", good, *run, "--device", "cuda"), "sees no CUDA GPU"
    if name == "crops_missing_image":
        return ("crops", tmp / "nope.nrrd", "--out", tmp / "crops"), "nope.nrrd: does not exist"
    if name == "truncated_checkpoint":
        torch.save({"format": "voco-pretrain", "weights": torch.zeros(1000)}, tmp / "full.pt")
        (tmp / "cut.pt").write_bytes((tmp / "full.pt").read_bytes()[:700])
        return ("positions", good, "--checkpoint", tmp / "cut.pt", "--out", tmp / "pos"), "cut.pt: not a readable"
    if name == "malicious_checkpoint":
        (tmp / "evil.pt").write_bytes(pickle.dumps({"state": Exploit()}))
        return ("positions", good, "--checkpoint", tmp / "evil.pt", "--out", tmp / "pos"), "evil.pt: refused"
    if name == "foreign_checkpoint":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp / "other.pt")
        return ("positions", good, "--checkpoint", tmp / "other.pt", "--out", tmp / "pos"), "not a VoCo pretraining checkpoint"
    raise AssertionError(name)


CASES = ["missing_file", "corrupt_file", "truncated_file", "two_dimensional", "four_dimensional", "not_finite",
         "constant", "empty_folder", "broken_dataset_json", "dataset_json_missing_image", "unsupported_file",
         "bad_grid", "bad_crop_edge", "unknown_preset", "zero_steps", "resume_without_run", "cuda_without_gpu",
         "crops_missing_image", "truncated_checkpoint", "malicious_checkpoint", "foreign_checkpoint"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_line_error_and_exit_code_2(case, tmp_path, capsys):
    argv, expected = make_case(case, tmp_path)
    code = main([str(a) for a in argv] + ["--progress", "jsonl"] if argv[0] == "pretrain" else [str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in captured.err
    if argv[0] == "pretrain":
        last = json.loads(captured.out.strip().splitlines()[-1])
        assert last["event"] == "error" and expected in last["message"]
    for leftover in ("run/checkpoint.pt", "crops/layout.json", "pos/positions.json"):
        assert not (tmp_path / leftover).exists()
    assert not os.path.exists("/tmp/voco-pwned")


def test_a_bad_file_in_a_dataset_is_skipped_with_a_warning(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    nifti(folder / "a.nii.gz", volume(1))
    nifti(folder / "b.nii.gz", volume(2))
    (folder / "c.nii.gz").write_bytes(gzip.compress(b"not a nifti"))
    code = main(["pretrain", "--data", str(folder), "--out", str(tmp_path / "run"), "--preset", "demo",
                 "--grid", "2,2,1", "--backbone", "swinunetr-tiny", "--steps", "1", "--progress", "jsonl"])
    stream = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    warnings = [e for e in stream if e["event"] == "warning"]
    assert len(warnings) == 1 and "c.nii.gz" in warnings[0]["message"]
    start = next(e for e in stream if e["event"] == "start")
    assert start["volumes"] == 2 and start["skipped"] == 1


def test_the_engine_cli_knows_no_front_end_and_voco_studio_says_what_it_lacks(monkeypatch, capsys):
    import ast
    import sys
    from pathlib import Path

    assert main(["studio", "--port", "1"]) == 2  # no such engine command: VoCo Studio has its own
    assert "invalid choice: 'studio'" in capsys.readouterr().err
    engine = Path(__file__).resolve().parents[2] / "voco"
    for path in engine.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] in ("voco_studio", "slicer", "qt", "ctk", "vtk", "trame", "trame_slicer")
                           or n.startswith("VoCo") for n in names), f"{path}: {names}"
    from voco_studio.cli import main as studio_main

    monkeypatch.setitem(sys.modules, "trame_slicer", None)  # as if the 'studio' extra were not installed
    assert studio_main(["--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: VoCo Studio needs trame-slicer: pip install '.[studio]'"]
