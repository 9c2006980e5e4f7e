"""The main job (``voco demo``): pretrain the tiny model on real volumes that ship inside PyPI
packages, draw what it learned (next to the untrained network and the constant prior), fine-tune
it to segment grey and white matter on one brain template and segment another, held-out one,
and answer whether the pretraining helped: ``voco evaluate`` of the pretrained start against
random weights, same budget, three seeds, scored on the held-out template. Minutes on two CPU
cores; re-running continues each stage from its checkpoint.

Writes into ``OUT``: ``run/`` (pretraining checkpoint, metrics, config), ``loss.png``,
``crops/<volume>/`` and ``positions/<volume>/`` (see ``voco crops`` / ``voco positions``),
``brain_tissue/`` (the labelled training set), ``finetune/`` (run and model package ``model/``),
``heldout/`` (segmentation, sidecar, reference), ``segmentation.png``,
``brain_tissue_evaluation/`` and ``evaluate/`` (see ``voco evaluate``; ``evaluate/evaluation.png``)
and ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from .data.brain_tissue import (HELDOUT_CASE, dice_per_label, write_evaluation_dataset, write_heldout_reference,
                                 write_training_dataset)
from .data.sample_data import fetch
from .figures import plot_losses, plot_segmentation, read_metrics
from .inference.segment import SegmentOptions, segment
from .layout import crop_layout, write_json, write_layout
from .positions import compare_over_layouts, write_positions
from .presets import PRESETS
from .registry.package import read_package
from .training import finetune as tuning
from .training.evaluate import EVALUATION_NAME, EvaluateConfig, evaluate
from .training.pretrain import CHECKPOINT_NAME, METRICS_NAME, PretrainConfig, pretrain

TRAINING_VOLUMES = ("mni152-t1", "spine-ct", "spine-mri")
SHOWN_VOLUMES = ("mni152-t1", "spine-ct")
DEFAULT_STEPS = 200
FINETUNE_STEPS = 80
EVALUATION_SEEDS = 3
POSITION_LAYOUTS = range(1, 17)  # 16 layouts of 2 targets: the position figures' sample


def loss_drop(records: list[dict], fraction: float = 0.1) -> tuple[float, float]:
    """Mean total loss over the first and the last ``fraction`` of the steps."""
    losses = np.array([r["loss"] for r in records], dtype=float)
    n = max(1, int(len(losses) * fraction))
    return float(losses[:n].mean()), float(losses[-n:].mean())


def run_demo(out: str | Path, reporter, steps: int | None = None, finetune_steps: int | None = None,
             device: str = "auto") -> int:
    out = Path(out)
    volumes = {name: fetch(name) for name in TRAINING_VOLUMES}
    reporter.emit("data", volumes={name: str(path) for name, path in volumes.items()})
    run_dir = out / "run"
    config = PretrainConfig(data=[str(p) for p in volumes.values()], out=str(run_dir), preset=PRESETS["demo"],
                            backbone="swinunetr-tiny", steps=steps or DEFAULT_STEPS, batch_size=2,
                            checkpoint_every=50, seed=0)
    code = pretrain(config, reporter, device=device, resume=(run_dir / CHECKPOINT_NAME).is_file())
    if code:
        return code
    checkpoint = run_dir / CHECKPOINT_NAME
    plot_losses(run_dir / METRICS_NAME, out / "loss.png")
    positions = {}
    for name in SHOWN_VOLUMES:
        write_layout(crop_layout(volumes[name], config.preset, seed=1), out / "crops" / name)
        write_positions(volumes[name], checkpoint, out / "positions" / name, seed=1)
        positions[name] = compare_over_layouts(volumes[name], checkpoint, POSITION_LAYOUTS)
    first, last = loss_drop(read_metrics(run_dir / METRICS_NAME))
    summary = {"steps": config.steps, "loss_first_10pct": first, "loss_last_10pct": last, "positions": positions}
    steps = finetune_steps or FINETUNE_STEPS
    code, summary["segmentation"] = finetune_and_segment(out, checkpoint, reporter, steps, device)
    if code:
        return code
    code, summary["transfer"] = pretrained_against_scratch(out, checkpoint, reporter, steps, device)
    if code:
        return code
    summary["outputs"] = str(out)
    write_json(summary, out / "summary.json")
    reporter.emit("summary", **summary)
    return 0


def pretrained_against_scratch(out: Path, pretrained: Path, reporter, steps: int, device: str) -> tuple[int, dict]:
    """``voco evaluate``: the demo's fine-tuning from the pretrained weights and from random ones,
    same budget, data order and seeds, each scored on the held-out template it never trained on."""
    config = EvaluateConfig(data=str(write_evaluation_dataset(out / "brain_tissue_evaluation")), out=str(out / "evaluate"),
                            inits=["scratch", f"voco={pretrained}"], seeds=EVALUATION_SEEDS, steps=steps,
                            test_cases=[HELDOUT_CASE], architecture="swinunetr-tiny", batch_size=2, patch_size=64,
                            spacing=(1.5, 1.5, 1.5), val_every=max(1, steps // 4))
    code = evaluate(config, reporter, device=device)
    if code:
        return code, {}
    evaluation = json.loads((out / "evaluate" / EVALUATION_NAME).read_text())
    per_label: dict[str, dict[str, list]] = {}
    for result in evaluation["results"]:
        for label, value in result["dice"].items():
            per_label.setdefault(result["init"], {}).setdefault(label, []).append(value)
    return 0, {"test_cases": evaluation["test_cases"], "steps": steps, "seeds": EVALUATION_SEEDS,
               "mean_dice": evaluation["summary"],
               "dice_per_label": {init: {label: float(np.mean(values)) for label, values in labels.items()}
                                  for init, labels in per_label.items()},
               "paired_difference_to_scratch": evaluation["paired_difference_to_scratch"],
               "figure": str(out / "evaluate" / "evaluation.png")}


def finetune_and_segment(out: Path, pretrained: Path, reporter, steps: int, device: str) -> tuple[int, dict]:
    """Fine-tune the pretrained model on the MNI152 tissue labels, segment the held-out template,
    and measure Dice against that template's own tissue labels."""
    dataset = write_training_dataset(out / "brain_tissue")
    run_dir = out / "finetune"
    config = tuning.FinetuneConfig(data=str(dataset), out=str(run_dir), init=str(pretrained),
                                   architecture="swinunetr-tiny", steps=steps, batch_size=2, patch_size=64,
                                   spacing=(1.5, 1.5, 1.5), val_every=40, checkpoint_every=40,
                                   name="brain-tissue-demo", seed=0)
    code = tuning.finetune(config, reporter, device=device, resume=(run_dir / tuning.LAST_NAME).is_file())
    if code:
        return code, {}
    heldout = out / "heldout"
    reference_path = heldout / "reference.nii.gz"
    if not reference_path.is_file():
        write_heldout_reference(reference_path)
    image_path = fetch("brain-t1-05mm")
    package = read_package(run_dir / tuning.PACKAGE_DIR)
    segmentation_path = heldout / "segmentation.nii.gz"
    segment(image_path, segmentation_path, package, SegmentOptions(device=device), reporter)
    dice = dice_per_label(np.asarray(nib.load(str(segmentation_path)).dataobj),
                          np.asarray(nib.load(str(reference_path)).dataobj))
    mean = float(np.mean(list(dice.values())))
    plot_segmentation(image_path, segmentation_path, package.card.labels, out / "segmentation.png", reference_path,
                      title=f"held-out template, mean Dice {mean:.3f} ("
                            + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()) + ")")
    return 0, {"finetune_steps": steps, "model": str(package.folder),
               "training_case_dice": package.card.metrics["val_dice"], "heldout_dice": dice, "heldout_mean_dice": mean}
