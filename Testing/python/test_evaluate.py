"""``voco evaluate``: every initialisation fine-tunes with the same data order, subsets and seeds
(an init holding exactly scratch's seed-0 weights gives scratch's seed-0 results bit for bit), the
test cases are never trained on, ``evaluation.json`` and the figure are written, a killed run
continues without redoing finished runs, torchrun spreads the runs, bad input is one line."""

from __future__ import annotations

import json
import os
import signal
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
from voco.figures import read_metrics
from voco.training.evaluate import EvaluateConfig, make_plan, summarise, training_subset

CASES = 4  # one is held out by default (one in five, at least one), three are trained on
STEPS, FRACTIONS = 2, [1.0, 0.5]


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
    values = dict(data=str(data), out=str(out), inits=inits, seeds=1, steps=STEPS, fractions=[1.0],
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


KILLED_RUN = "same/f1/seed0"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """``voco evaluate`` of scratch and ``same`` (scratch's seed-0 weights, as a package), seed 0,
    two steps a run: killed (SIGKILL) at the first checkpoint of its second run, then run again."""
    folder = tmp_path_factory.mktemp("evaluate")
    data = write_dataset(folder / "data")
    package = seed0_package(folder / "seed0")
    config = options(data, folder / "out", ["scratch", f"same={package}"])
    out = folder / "out"
    started = time.perf_counter()
    process = subprocess.Popen(voco_command(*cli_args(config)), stdout=subprocess.PIPE, text=True)
    killed = []
    for line in process.stdout:
        killed.append(json.loads(line))
        if killed[-1]["event"] == "checkpoint" and killed[-1]["run"] == KILLED_RUN:
            process.kill()
            break
    process.wait(timeout=60)
    first = out / "results" / "scratch" / "f1" / "seed0.json", out / "runs" / "scratch" / "f1" / "seed0" / "metrics.jsonl"
    finished = [(path.stat().st_mtime_ns, path.read_bytes()) for path in first]
    killed_at = time.perf_counter()
    result = run_voco(*cli_args(config))
    assert result.returncode == 0, result.stderr
    print(f"killed after {killed_at - started:.1f} s, resumed run {time.perf_counter() - killed_at:.1f} s")
    untouched = finished == [(path.stat().st_mtime_ns, path.read_bytes()) for path in first]
    evaluation = json.loads((out / "evaluation.json").read_text())
    return {"config": config, "killed": killed, "kill_code": process.returncode, "resumed": events(result.stdout),
            "untouched": untouched, "evaluation": evaluation}


def result_of(evaluation, init, fraction, seed) -> dict:
    (result,) = [r for r in evaluation["results"]
                 if (r["init"], r["fraction"], r["seed"]) == (init, fraction, seed)]
    return result


SCORED = ("dice", "mean_dice", "learning_curve", "train_loss", "train_cases")


def test_every_init_gets_the_same_data_order_and_seeds_and_differs_only_by_its_weights(experiment):
    config, evaluation = experiment["config"], experiment["evaluation"]
    plan = make_plan(EvaluateConfig(**{**config, "seeds": 2, "fractions": FRACTIONS}), Events())
    assert len(plan.runs) == 2 * 2 * len(FRACTIONS)
    for fraction in FRACTIONS:
        for seed in range(2):
            scratch, same = (next(r for r in plan.runs if (r.init.label, r.fraction, r.seed) == (init, fraction, seed))
                             for init in ("scratch", "same"))
            a, b = scratch.finetune.to_dict(), same.finetune.to_dict()
            assert {k for k in a if a[k] != b[k]} == {"init", "out", "name"}
            assert a["seed"] == seed and a["checkpoint_every"] == a["val_every"] == 1
    # The same starting weights give the same run, bit for bit (this one was killed and resumed).
    scratch, same = (result_of(evaluation, init, 1.0, 0) for init in ("scratch", "same"))
    assert {k: scratch[k] for k in SCORED} == {k: same[k] for k in SCORED}


def test_test_cases_are_never_trained_on_and_the_subsets_are_nested(experiment):
    config, evaluation = experiment["config"], experiment["evaluation"]
    assert len(evaluation["test_cases"]) == 1  # one in five, at least one
    (test_case,) = evaluation["test_cases"]
    pool = [f"case{i}" for i in range(CASES) if f"case{i}" != test_case]
    assert evaluation["train_pool"] == pool
    for result in evaluation["results"]:
        assert result["train_cases"] == pool
        # What the run itself trained and validated on, as its model card records it.
        card = read_package(os.path.join(config["out"], result["run_dir"], "model")).card
        assert card.training["train_cases"] == result["train_cases"]
        assert card.metrics["val_cases"] == [test_case] and card.metrics["on_training_data"] is False
    plan = make_plan(EvaluateConfig(**{**config, "seeds": 3, "fractions": [1.0, 0.5, 0.25]}), Events())
    for run in plan.runs:
        assert test_case not in run.train_cases and run.finetune.val_case_names == [test_case]
        assert run.finetune.train_case_names == run.train_cases
        assert len(run.train_cases) == {1.0: 3, 0.5: 2, 0.25: 1}[run.fraction]  # ceil(fraction * 3)
    for seed in range(5):
        subsets = [set(training_subset(pool, seed, f)) for f in (1, 0.67, 0.5, 0.1)]
        assert all(small <= large for large, small in zip(subsets, subsets[1:]))
    assert len({tuple(training_subset(pool, seed, 0.5)) for seed in range(5)}) > 1  # the seed draws it


def test_evaluation_json_figure_and_events(experiment):
    config, evaluation = experiment["config"], experiment["evaluation"]
    out = config["out"]
    assert {"test_cases", "results", "summary"} <= set(evaluation)
    assert evaluation["complete"] is True and evaluation["runs_planned"] == len(evaluation["results"]) == 2
    for result in evaluation["results"]:
        assert {"init", "seed", "fraction", "steps", "dice", "mean_dice"} <= set(result)
        assert result["steps"] == STEPS and set(result["dice"]) == {"lesion", "slab"}
        scored = [v for v in result["dice"].values() if v is not None]
        assert result["mean_dice"] == pytest.approx(np.mean(scored) if scored else 0.0)
        assert result["learning_curve"]["step"] == [1, 2] and len(result["train_loss"]) == STEPS
        # The score is the final step's test Dice (not the best step's).
        metrics = read_metrics(os.path.join(out, result["run_dir"], "metrics.jsonl"))
        assert metrics[-1]["step"] == STEPS and metrics[-1]["val_dice"] == result["dice"]
        assert result["learning_curve"]["mean_dice"][-1] == result["mean_dice"]
    mean = result_of(evaluation, "scratch", 1.0, 0)["mean_dice"]
    assert evaluation["summary"] == {"scratch": {"mean": mean, "std": 0.0, "n": 1},
                                     "same": {"mean": mean, "std": 0.0, "n": 1}}  # one seed: std 0
    assert evaluation["paired_difference_to_scratch"] == {"same": {"mean": 0.0, "std": 0.0, "n": 1}}
    results = [{"init": "a", "fraction": 0.5, "seed": s, "mean_dice": d} for s, d in enumerate((0.2, 0.4, 0.9))]
    assert summarise(results) == {"a@0.5": pytest.approx({"mean": 0.5, "std": np.std([0.2, 0.4, 0.9], ddof=1), "n": 3})}
    assert evaluation["budget"]["steps"] == STEPS and evaluation["config"]["seeds"] == 1
    figure = os.path.join(out, "evaluation.png")
    assert open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(figure) > 20000
    # Events: the plan, each run's start and end, its fine-tuning steps marked with the run, done.
    killed, resumed = experiment["killed"], experiment["resumed"]
    plan = killed[0]
    assert plan["event"] == "plan" and plan["runs"] == 2 and plan["inits"] == ["scratch", "same"]
    assert plan["test_cases"] == evaluation["test_cases"]
    steps = [e for e in killed if e["event"] == "step"]
    assert [(e["run"], e["step"], e["total"]) for e in steps] == \
        [("scratch/f1/seed0", 1, 2), ("scratch/f1/seed0", 2, 2), (KILLED_RUN, 1, 2)]
    assert [e["event"] for e in killed + resumed].count("start") == 0  # finetune's start is finetune_start
    assert [e["index"] for e in resumed if e["event"] == "run_done"] == [1, 2]
    done = resumed[-1]
    assert done["event"] == "done" and done["summary"] == evaluation["summary"] and done["figure"] == figure


def test_a_killed_evaluation_continues_without_redoing_finished_runs(experiment):
    assert experiment["kill_code"] == -signal.SIGKILL
    resumed = experiment["resumed"]
    assert [(e["run"], e["reused"]) for e in resumed if e["event"] == "run_done"] == \
        [("scratch/f1/seed0", True), (KILLED_RUN, False)]
    assert [e["run"] for e in resumed if e["event"] == "run_start"] == [KILLED_RUN]
    assert [(e["run"], e["step"]) for e in resumed if e["event"] == "finetune_start"] == [(KILLED_RUN, 1)]  # last.pt
    assert experiment["untouched"]  # the finished run's result and metrics were not rewritten


def test_a_finished_evaluation_run_again_redoes_nothing(experiment, capsys):
    """Also when its folder and dataset are named another way: paths are compared as the files they name."""
    config = {**experiment["config"], "out": os.path.join(experiment["config"]["out"], "."),
              "data": os.path.relpath(experiment["config"]["data"])}
    capsys.readouterr()
    assert main(cli_args(config)) == 0
    stream = events(capsys.readouterr().out)
    assert [e["reused"] for e in stream if e["event"] == "run_done"] == [True, True]
    assert not [e for e in stream if e["event"] in ("run_start", "step")]
    assert stream[-1]["event"] == "done" and stream[-1]["summary"] == experiment["evaluation"]["summary"]


def test_torchrun_spreads_the_runs_over_the_ranks(experiment, tmp_path):
    config = {**experiment["config"], "out": str(tmp_path / "out"), "inits": ["scratch"], "seeds": 2}
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
    expected = result_of(experiment["evaluation"], "scratch", 1.0, 0)  # the same run as one process makes
    assert {k: evaluation["results"][0][k] for k in SCORED} == {k: expected[k] for k in SCORED}
    assert evaluation["results"][1]["train_loss"] != expected["train_loss"]  # seed 1: other weights and data order
    values = [r["mean_dice"] for r in evaluation["results"]]
    assert evaluation["summary"]["scratch"] == pytest.approx({"mean": np.mean(values), "std": np.std(values, ddof=1),
                                                              "n": 2})
    assert (tmp_path / "out" / "evaluation.png").is_file()


@pytest.mark.parametrize("case", ["unknown_init", "unreadable_init", "seeds", "fraction_high", "fraction_zero",
                                  "unknown_test_case", "no_training_case", "duplicate_init", "duplicate_label",
                                  "other_settings"])
def test_bad_input_is_one_line_and_exit_code_2(case, experiment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VOCO_MODELS_DIR", str(tmp_path / "models"))
    config = {**experiment["config"], "out": str(tmp_path / "out")}
    out = tmp_path / "out"
    extra, expected = [], None
    if case == "unknown_init":
        config["inits"] = ["scratch", "no-such-model"]
        expected = "'no-such-model' is not an existing file or folder, nor a known model"
    elif case == "unreadable_init":
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        config["inits"] = ["scratch", str(tmp_path / "junk.pt")]
        expected = "junk.pt: refused: it contains pickled code or objects"
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
        config["inits"], expected = ["scratch", "again=scratch"], "--init 'again=scratch' is given twice"
    elif case == "duplicate_label":
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "best.pt").write_bytes(b"")
        config["inits"] = [str(tmp_path / "a" / "best.pt"), str(tmp_path / "b" / "best.pt")]
        expected = "another --init is also labelled 'best'; name them with LABEL=PATH"
    else:
        config, out = {**experiment["config"], "seeds": 3}, experiment["config"]["out"]
        before = os.path.getmtime(os.path.join(out, "evaluation.json"))
        expected = f"{out}: holds an evaluation with other settings (seeds: 1 there, 3 now)"
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


def test_runs_on_the_same_data_share_the_preprocessed_cases(tmp_path):
    from voco.training.finetune import Finetuner

    data = write_dataset(tmp_path / "data")
    plan = make_plan(EvaluateConfig(**options(data, tmp_path / "out", ["scratch"], seeds=2)), Events())
    cache = {}
    first, second = (Finetuner(run.finetune, Events(), "cpu", case_cache=cache) for run in plan.runs)
    assert len(cache) == 1 and first.cases is second.cases and first.modality == second.modality == "mri"
    assert [case.name for case in second.train_cases] == plan.runs[1].train_cases
