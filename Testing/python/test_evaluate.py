"""``voco evaluate``: every initialisation fine-tunes with the same data order, subsets and seeds
(an init holding exactly scratch's seed-0 weights gives scratch's seed-0 results bit for bit), the
test cases are never trained on, ``evaluation.json`` and the figure are written, a killed run
continues without redoing finished runs, torchrun spreads the runs, bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import Events, events, run_voco, voco_command
from test_finetune import SPACING, synthetic_case
from voco.cli import main
from voco.models.segmentation import build_segmentation_network
from voco.registry.package import Label, ModelCard, Preprocessing, read_package, write_package
from voco.training.evaluate import EvaluateConfig, evaluate, make_plan, training_subset

CASES = 4  # one is held out by default (one in five, at least one), three are trained on
STEPS, SEEDS, FRACTIONS = 2, 2, [1.0, 0.5]


def write_dataset(folder, cases=CASES):
    """Four 32^3 cases at 2 mm (a sphere and a slab): one sliding window each."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for index in range(cases):
        image, labels = synthetic_case(index, shape=(32, 32, 32))
        nib.save(nib.Nifti1Image(image, SPACING), str(folder / "imagesTr" / f"case{index}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, SPACING), str(folder / "labelsTr" / f"case{index}.nii.gz"))
        training.append({"image": f"./imagesTr/case{index}.nii.gz", "label": f"./labelsTr/case{index}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps({"name": "synthetic", "training": training,
                                                     "labels": {"0": "background", "1": "lesion", "2": "slab"}}))
    return folder / "dataset.json"


def seed0_package(folder):
    """A model package whose weights are exactly the network scratch builds for seed 0."""
    torch.manual_seed(0)
    weights = build_segmentation_network("swinunetr-tiny", 1, 3).state_dict()
    card = ModelCard("seed0", "1", "swinunetr-tiny", 1, [Label(1, "lesion", "#ff0000"), Label(2, "slab", "#00ff00")],
                     Preprocessing("mri", (2.0, 2.0, 2.0), (32, 32, 32)))
    return write_package(folder, card, weights).folder


def options(data, out, inits, **changes) -> dict:
    values = dict(data=str(data), out=str(out), inits=inits, seeds=SEEDS, steps=STEPS, fractions=FRACTIONS,
                  architecture="swinunetr-tiny", batch_size=1, patch_size=32, spacing=(2.0, 2.0, 2.0), modality="mri",
                  lr=1e-3, val_every=1)
    return {**values, **changes}


def cli_args(config: dict) -> list[str]:
    args = ["evaluate", "--data", config["data"], "--out", config["out"], "--seeds", config["seeds"],
            "--steps", config["steps"], "--fractions", ",".join(f"{f:g}" for f in config["fractions"]),
            "--backbone", config["architecture"], "--batch-size", config["batch_size"],
            "--patch-size", config["patch_size"], "--spacing", ",".join(map(str, config["spacing"])),
            "--modality", config["modality"], "--lr", config["lr"], "--val-every", config["val_every"],
            "--device", "cpu", "--progress", "jsonl"]
    for init in config["inits"]:
        args += ["--init", init]
    return [str(a) for a in args]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """scratch and ``same`` (scratch's seed-0 weights as a package), 2 seeds, fractions 1 and 0.5:
    eight runs of two steps, in-process."""
    folder = tmp_path_factory.mktemp("evaluate")
    data = write_dataset(folder / "data")
    package = seed0_package(folder / "seed0")
    config = options(data, folder / "out", ["scratch", f"same={package}"])
    seen = Events()
    started = time.perf_counter()
    assert evaluate(EvaluateConfig(**config), seen, device="cpu") == 0
    print(f"8 runs in {time.perf_counter() - started:.1f} s")
    evaluation = json.loads((folder / "out" / "evaluation.json").read_text())
    return config, seen, evaluation


def result_of(evaluation, init, fraction, seed) -> dict:
    (result,) = [r for r in evaluation["results"]
                 if (r["init"], r["fraction"], r["seed"]) == (init, fraction, seed)]
    return result


SCORED = ("dice", "mean_dice", "learning_curve", "train_loss", "train_cases")


def test_every_init_gets_the_same_data_order_and_seeds_and_differs_only_by_its_weights(experiment):
    config, _, evaluation = experiment
    plan = make_plan(EvaluateConfig(**config), Events())
    for fraction in FRACTIONS:
        for seed in range(SEEDS):
            scratch, same = (next(r for r in plan.runs if (r.init.label, r.fraction, r.seed) == (init, fraction, seed))
                             for init in ("scratch", "same"))
            a, b = scratch.finetune.to_dict(), same.finetune.to_dict()
            assert {k for k in a if a[k] != b[k]} == {"init", "out", "name"}
            assert a["seed"] == seed and a["checkpoint_every"] == a["val_every"] == 1
    # The same starting weights give the same run, bit for bit; other weights another one.
    for fraction in FRACTIONS:
        scratch, same = (result_of(evaluation, init, fraction, 0) for init in ("scratch", "same"))
        assert {k: scratch[k] for k in SCORED} == {k: same[k] for k in SCORED}
        scratch, same = (result_of(evaluation, init, fraction, 1) for init in ("scratch", "same"))
        assert scratch["train_cases"] == same["train_cases"]
        assert scratch["train_loss"] != same["train_loss"]


def test_test_cases_are_never_trained_on_and_the_subsets_are_nested(experiment):
    config, _, evaluation = experiment
    assert len(evaluation["test_cases"]) == 1  # one in five, at least one
    (test_case,) = evaluation["test_cases"]
    pool = [f"case{i}" for i in range(CASES) if f"case{i}" != test_case]
    assert evaluation["train_pool"] == pool
    for result in evaluation["results"]:
        assert test_case not in result["train_cases"]
        # What the run itself trained and validated on, as its model card records it.
        card = read_package(os.path.join(config["out"], result["run_dir"], "model")).card
        assert card.training["train_cases"] == result["train_cases"]
        assert card.metrics["val_cases"] == [test_case] and card.metrics["on_training_data"] is False
        if result["fraction"] == 1:
            assert result["train_cases"] == pool
        else:
            assert len(result["train_cases"]) == 2  # ceil(0.5 * 3)
            assert set(result["train_cases"]) < set(pool)
    for seed in range(5):
        subsets = [set(training_subset(pool, seed, f)) for f in (1, 0.67, 0.5, 0.1)]
        assert all(small <= large for large, small in zip(subsets, subsets[1:]))
    assert len({tuple(training_subset(pool, seed, 0.5)) for seed in range(5)}) > 1  # the seed draws it


def test_evaluation_json_figure_and_events(experiment):
    config, seen, evaluation = experiment
    out = config["out"]
    assert {"test_cases", "results", "summary"} <= set(evaluation)
    assert evaluation["complete"] is True and evaluation["runs_planned"] == len(evaluation["results"]) == 8
    for result in evaluation["results"]:
        assert {"init", "seed", "fraction", "steps", "dice", "mean_dice"} <= set(result)
        assert result["steps"] == STEPS and set(result["dice"]) == {"lesion", "slab"}
        scored = [v for v in result["dice"].values() if v is not None]
        assert result["mean_dice"] == pytest.approx(np.mean(scored) if scored else 0.0)
        assert result["learning_curve"]["step"] == [1, 2] and len(result["train_loss"]) == STEPS
        # The score is the final step's test Dice (not the best step's).
        metrics = [json.loads(line) for line in open(os.path.join(out, result["run_dir"], "metrics.jsonl"))]
        assert metrics[-1]["step"] == STEPS and metrics[-1]["val_dice"] == result["dice"]
        assert result["learning_curve"]["mean_dice"][-1] == result["mean_dice"]
    assert set(evaluation["summary"]) == {"scratch", "same", "scratch@0.5", "same@0.5"}
    for key, entry in evaluation["summary"].items():
        init, _, fraction = key.partition("@")
        values = [r["mean_dice"] for r in evaluation["results"] if r["init"] == init
                  and r["fraction"] == float(fraction or 1)]
        assert entry == pytest.approx({"mean": np.mean(values), "std": np.std(values, ddof=1), "n": SEEDS})
    same = evaluation["paired_difference_to_scratch"]["same"]
    assert same["n"] == SEEDS and same["mean"] == pytest.approx(
        np.mean([result_of(evaluation, "same", 1.0, s)["mean_dice"] - result_of(evaluation, "scratch", 1.0, s)["mean_dice"]
                 for s in range(SEEDS)]))
    assert evaluation["budget"]["steps"] == STEPS and evaluation["config"]["seeds"] == SEEDS
    figure = os.path.join(out, "evaluation.png")
    assert open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(figure) > 20000
    # Events: the plan, each run's start and end, its fine-tuning steps marked with the run, done.
    (plan,) = seen.of("plan")
    assert plan["runs"] == 8 and plan["inits"] == ["scratch", "same"] and plan["test_cases"] == evaluation["test_cases"]
    assert [e["index"] for e in seen.of("run_start")] == [e["index"] for e in seen.of("run_done")] == list(range(1, 9))
    steps = seen.of("step")
    assert len(steps) == 8 * STEPS and steps[0]["run"] == "scratch/f1/seed0" and steps[0]["total"] == STEPS
    assert not seen.of("start") and len(seen.of("finetune_done")) == 8
    assert seen.seen[-1] == ("done", {"evaluation": os.path.join(out, "evaluation.json"),
                                      "figure": figure, "summary": evaluation["summary"]})


def scratch_only(experiment, out) -> dict:
    """The scratch runs of fraction 1 alone: the same runs as in the experiment, two of them."""
    config, _, _ = experiment
    return {**config, "out": str(out), "inits": ["scratch"], "fractions": [1.0]}


def assert_same_results(evaluation, experiment):
    for result in evaluation["results"]:
        expected = result_of(experiment[2], "scratch", 1.0, result["seed"])
        assert {k: result[k] for k in SCORED} == {k: expected[k] for k in SCORED}


def test_a_killed_evaluation_continues_without_redoing_finished_runs(experiment, tmp_path):
    config = scratch_only(experiment, tmp_path / "out")
    process = subprocess.Popen(voco_command(*cli_args(config)), stdout=subprocess.PIPE, text=True)
    first_result = tmp_path / "out" / "results" / "scratch" / "f1" / "seed0.json"
    for line in process.stdout:  # kill -9 once run 2 has its first checkpoint (run 1 is scored)
        event = json.loads(line)
        if event["event"] == "checkpoint" and event["run"] == "scratch/f1/seed1":
            assert first_result.is_file()
            process.kill()
            break
    process.wait(timeout=60)
    assert process.returncode == -9
    finished = first_result.stat().st_mtime_ns, (tmp_path / "out/runs/scratch/f1/seed0/metrics.jsonl").read_bytes()

    result = run_voco(*cli_args(config))
    assert result.returncode == 0, result.stderr
    stream = events(result.stdout)
    done = [e for e in stream if e["event"] == "run_done"]
    assert [(e["run"], e["reused"]) for e in done] == [("scratch/f1/seed0", True), ("scratch/f1/seed1", False)]
    assert [e["run"] for e in stream if e["event"] == "run_start"] == ["scratch/f1/seed1"]
    assert [e["step"] for e in stream if e["event"] == "finetune_start"] == [1]  # resumed from last.pt
    assert finished == (first_result.stat().st_mtime_ns,
                        (tmp_path / "out/runs/scratch/f1/seed0/metrics.jsonl").read_bytes())
    assert_same_results(json.loads((tmp_path / "out" / "evaluation.json").read_text()), experiment)


def test_torchrun_spreads_the_runs_over_the_ranks(experiment, tmp_path):
    config = scratch_only(experiment, tmp_path / "out")
    command = voco_command()[:1] + ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                    "-m", "voco", *cli_args(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stream = events(result.stdout)  # rank 0's events only
    assert next(e for e in stream if e["event"] == "plan")["world_size"] == 2
    assert [e["run"] for e in stream if e["event"] == "run_start"] == ["scratch/f1/seed0"]
    assert stream[-1]["event"] == "done"
    evaluation = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert evaluation["complete"] and [r["seed"] for r in evaluation["results"]] == [0, 1]
    assert_same_results(evaluation, experiment)
    assert (tmp_path / "out" / "evaluation.png").is_file()


@pytest.mark.parametrize("case", ["unknown_init", "unreadable_init", "seeds", "fraction_high", "fraction_zero",
                                  "unknown_test_case", "no_training_case", "duplicate_init", "other_settings"])
def test_bad_input_is_one_line_and_exit_code_2(case, experiment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VOCO_MODELS_DIR", str(tmp_path / "models"))
    config = {**experiment[0], "out": str(tmp_path / "out")}
    out = tmp_path / "out"
    extra, expected = [], None
    if case == "unknown_init":
        config["inits"] = ["scratch", "no-such-model"]
        expected = "'no-such-model' is not an existing file or folder, nor a known model"
    elif case == "unreadable_init":
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        config["inits"] = ["scratch", str(tmp_path / "junk.pt")]
        expected = "junk.pt: not a readable PyTorch checkpoint"
    elif case == "seeds":
        config["seeds"], expected = 0, "--seeds must be at least 1, got 0"
    elif case == "fraction_high":
        config["fractions"], expected = [1.0, 1.5], "--fractions must lie in (0, 1], got 1.5"
    elif case == "fraction_zero":
        config["fractions"], expected = [0.0], "--fractions must lie in (0, 1], got 0"
    elif case == "unknown_test_case":
        extra, expected = ["--test-cases", "case1,nope"], "--test-cases: no case named 'nope'"
    elif case == "no_training_case":
        extra = ["--test-cases", ",".join(f"case{i}" for i in range(CASES))]
        expected = "holding out 4 test case(s) leaves no training case"
    elif case == "duplicate_init":
        config["inits"], expected = ["scratch", "scratch"], "--init 'scratch' is given twice"
    else:
        config, out = {**experiment[0], "seeds": 3}, experiment[0]["out"]
        before = os.path.getmtime(os.path.join(out, "evaluation.json"))
        expected = f"{out}: holds an evaluation with other settings (seeds: 2 there, 3 now)"
    capsys.readouterr()
    assert main(cli_args(config) + extra) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["event"] == "error"
    if case == "other_settings":
        assert os.path.getmtime(os.path.join(out, "evaluation.json")) == before
    else:
        assert not out.exists()
