"""The pretraining loop end to end, through the command line, on real shipped volumes:
the loss falls, a killed or stopped run resumes bit for bit, and a 2-process DDP run follows the
1-process run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch

from conftest import REPO, events, run_voco, stop_after_first_step, voco_command
from voco.figures import read_metrics

# A small but complete configuration: 2x2 base grid of 32^3 crops, tiny SwinUNETR, demo preset
# (v2 loss, EMA head teacher, feature dropout, inter-volume term).
SMALL = ("--preset", "demo", "--grid", "2,2,1", "--backbone", "swinunetr-tiny", "--batch-size", "2", "--seed", "7")
STEPS = 6


def pretrain_args(data, out, *extra):
    return ("pretrain", "--data", *data, "--out", out, *SMALL, "--steps", STEPS, "--checkpoint-every", 2,
            "--progress", "jsonl", *extra)


def load_tensors(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    flat = {f"student.{k}": v for k, v in state["student"].items()}
    flat.update({f"teacher.{k}": v for k, v in state["teacher"].items()})
    for i, param_state in state["optimizer"]["state"].items():
        flat.update({f"optimizer.{i}.{k}": v for k, v in param_state.items() if torch.is_tensor(v)})
    return flat


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def data(shipped):
    return [shipped["spine-ct"], shipped["spine-mri"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_voco(*pretrain_args(data, out))
    assert result.returncode == 0, result.stderr
    return out, events(result.stdout)


def test_progress_stream_is_json_lines_with_every_event_kind(uninterrupted):
    _, stream = uninterrupted
    kinds = [e["event"] for e in stream]
    assert kinds[0] == "start" and kinds[-1] == "done"
    steps = [e for e in stream if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    for e in steps:
        assert e["total"] == STEPS
        for key in ("loss", "loss_pos", "loss_neg", "loss_reg", "loss_inter", "lr", "samples_per_s", "eta_s"):
            assert np.isfinite(e[key]), key
        assert e["loss"] == pytest.approx(e["loss_pos"] + e["loss_neg"] + e["loss_reg"] + e["loss_inter"], rel=1e-5)
    assert [e["step"] for e in stream if e["event"] == "checkpoint"] == [2, 4, 6]


def test_resume_after_kill_matches_uninterrupted_run(uninterrupted, data, tmp_path):
    reference, _ = uninterrupted
    out = tmp_path / "killed"
    process = subprocess.Popen(voco_command(*pretrain_args(data, out)), stdout=subprocess.PIPE, text=True)
    for line in process.stdout:  # kill -9 right after the step-4 checkpoint is announced
        if '"checkpoint"' in line and '"step": 4' in line:
            process.kill()
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not list(out.glob(".*.tmp*")), "a temporary checkpoint was left behind"

    result = run_voco(*pretrain_args(data, out, "--resume"))
    assert result.returncode == 0, result.stderr
    assert events(result.stdout)[0]["step"] == 4
    assert_bitwise_equal(load_tensors(out / "checkpoint.pt"), load_tensors(reference / "checkpoint.pt"))
    # The metrics log tells the same story as the uninterrupted run's.
    resumed = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}
    original = {r["step"]: r["loss"] for r in read_metrics(reference / "metrics.jsonl")}
    assert resumed == original


def test_sigterm_checkpoints_the_current_step_and_resume_matches(uninterrupted, data, tmp_path):
    reference, _ = uninterrupted
    out = tmp_path / "stopped"
    code, stopped = stop_after_first_step(*pretrain_args(data, out))
    assert code == 128 + signal.SIGTERM
    assert stopped[-1]["event"] == "stopped"
    step = stopped[-1]["step"]
    assert 1 <= step < STEPS
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step

    result = run_voco(*pretrain_args(data, out, "--resume"))
    assert result.returncode == 0, result.stderr
    assert_bitwise_equal(load_tensors(out / "checkpoint.pt"), load_tensors(reference / "checkpoint.pt"))


def test_a_reader_that_goes_away_makes_the_run_checkpoint_and_stop_not_die(uninterrupted, data, tmp_path):
    """The front end closed (Slicer quit, a broken pipe): the next event must not kill the run."""
    reference, _ = uninterrupted
    out = tmp_path / "orphaned"
    process = subprocess.Popen(voco_command(*pretrain_args(data, out)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=REPO)
    for line in process.stdout:
        if '"event": "step"' in line.decode():
            break
    process.stdout.close()  # the reader is gone
    assert process.wait(timeout=300) == 128 + signal.SIGPIPE
    stderr = process.stderr.read().decode()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= step < STEPS
    result = run_voco(*pretrain_args(data, out, "--resume"))
    assert result.returncode == 0, result.stderr
    assert_bitwise_equal(load_tensors(out / "checkpoint.pt"), load_tensors(reference / "checkpoint.pt"))


def test_the_stop_file_stops_a_run_after_its_checkpoint(data, tmp_path):
    """Where a front end cannot signal the engine (Windows), it creates the file $VOCO_STOP_FILE names."""
    out, stop = tmp_path / "stopped", tmp_path / "STOP"
    process = subprocess.Popen(voco_command(*pretrain_args(data, out)), stdout=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "VOCO_STOP_FILE": str(stop)})
    lines = []
    for line in process.stdout:
        lines.append(line)
        if '"event": "step"' in line:
            stop.touch()
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    stopped = events("".join(lines))[-1]
    assert stopped["event"] == "stopped" and stopped["step"] < STEPS
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == stopped["step"]


def test_a_second_run_on_a_run_folder_in_use_is_refused_naming_the_holder(data, tmp_path):
    out = tmp_path / "busy"
    first = subprocess.Popen(voco_command(*pretrain_args(data, out)), stdout=subprocess.PIPE, text=True, cwd=REPO)
    for line in first.stdout:
        if '"event": "start"' in line:
            break
    second = run_voco(*pretrain_args(data, out, "--resume"))
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another training process" in lines[0] and f"pid {first.pid}" in lines[0]
    assert str(out) in lines[0]


def test_non_finite_steps_are_skipped_and_five_in_a_row_stop_the_run_keeping_finite_checkpoints(data, tmp_path,
                                                                                               monkeypatch, capsys):
    """Steps 2..6 get an infinite loss (what one 3e38 voxel does): skipped with warnings, the
    checkpoints at steps 2 and 4 hold step 1's weights, and step 6 ends the run with one line."""
    import json

    from voco.cli import main
    from voco.training import pretrain as pretrain_module

    real_forward, calls = pretrain_module.voco_forward, [0]

    def forward(*args, **kwargs):
        calls[0] += 1
        output, terms = real_forward(*args, **kwargs)
        if calls[0] >= 2:
            terms = {**terms, "loss": terms["loss"] * float("inf")}
        return output, terms

    monkeypatch.setattr(pretrain_module, "voco_forward", forward)
    saved = []
    real_save = pretrain_module.save_checkpoint
    monkeypatch.setattr(pretrain_module, "save_checkpoint",
                        lambda state, path: saved.append({k: v.clone() for k, v in state["student"].items()})
                        or real_save(state, path))
    out = tmp_path / "run"
    capsys.readouterr()
    code = main([str(a) for a in pretrain_args(data, out)[:-2]] + ["--steps", "10", "--device", "cpu",
                                                                  "--progress", "jsonl"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {out}: training stopped at step 6: the loss or its gradients were not finite "
                               "in 5 steps in a row")
    stream = events(captured.out)
    assert [e["step"] for e in stream if e["event"] == "warning" and "not finite" in e["message"]] == [2, 3, 4, 5, 6]
    assert [e["step"] for e in stream if e["event"] == "checkpoint"] == [2, 4]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])  # nothing learnt from steps 3 and 4
    assert all(torch.isfinite(v).all() for v in saved[1].values() if v.is_floating_point())

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    records = [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in records] == [False, True, True, True, True]


def test_resume_can_extend_a_finished_run(uninterrupted, data, tmp_path):
    reference, _ = uninterrupted
    out = tmp_path / "extended"
    shutil.copytree(reference, out)
    result = run_voco("pretrain", "--out", out, "--resume", "--steps", STEPS + 2, "--progress", "jsonl")
    assert result.returncode == 0, result.stderr
    stream = events(result.stdout)
    assert stream[0]["step"] == STEPS and stream[-1]["step"] == STEPS + 2


def test_resume_refuses_a_changed_setting(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    out = tmp_path / "changed"
    shutil.copytree(reference, out)
    result = run_voco("pretrain", "--out", out, "--resume", "--batch-size", "3")
    assert result.returncode == 2
    assert "different batch_size" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_two_process_ddp_follows_the_single_process_run(data, tmp_path):
    # v1 (full EMA teacher, no inter-volume term, which needs two volumes in one process).
    common = ("--preset", "v1", "--grid", "2,2,1", "--crop-edge", "32", "--backbone", "swinunetr-tiny",
              "--steps", 4, "--seed", 3, "--progress", "jsonl", "--device", "cpu")
    single = run_voco("pretrain", "--data", *data, "--out", tmp_path / "one", "--batch-size", 2, *common)
    assert single.returncode == 0, single.stderr
    torchrun = [voco_command()[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "voco", "pretrain", "--data", *map(str, data), "--out", str(tmp_path / "two"),
                "--batch-size", "1", *map(str, common)]
    double = subprocess.run(torchrun, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-2000:]
    start = events(double.stdout)[0]
    assert start["world_size"] == 2
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    for key in ("loss", "loss_pos", "loss_neg", "loss_reg"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=2e-3, atol=1e-4, err_msg=key)
    a = load_tensors(tmp_path / "one" / "checkpoint.pt")
    b = load_tensors(tmp_path / "two" / "checkpoint.pt")
    worst = max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("student."))
    assert worst < 1e-3


def test_pretraining_on_shipped_volumes_lowers_the_loss(shipped, tmp_path):
    """The nnssl variant (no teacher, SGD) on the real MNI152 T1, spine CT and spine MRI, with the
    demo's 32^3 crops at 1 mm: its crops start out nearly indistinguishable (high zero-overlap and
    regulariser terms) and the network learns to tell them apart within a few dozen steps."""
    steps = 40
    result = run_voco("pretrain", "--data", shipped["mni152-t1"], shipped["spine-ct"], shipped["spine-mri"],
                      "--out", tmp_path, "--preset", "nnssl", "--grid", "3,3,1", "--crop-edge", 32, "--targets", 2,
                      "--spacing", "1,1,1", "--backbone", "swinunetr-tiny", "--steps", steps,
                      "--checkpoint-every", steps, "--progress", "jsonl")
    assert result.returncode == 0, result.stderr
    records = read_metrics(tmp_path / "metrics.jsonl")
    first, last = (np.mean([r["loss"] for r in part]) for part in (records[:10], records[-10:]))
    print(f"mean total loss, steps 1-10: {first:.4f}, steps {steps - 9}-{steps}: {last:.4f}")
    assert last < 0.8 * first
