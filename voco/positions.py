"""What a pretrained VoCo model believes about position: for sampled targets of an image, the
predicted overlap with each base crop next to the true one (``voco positions``).

Two baselines say whether pretraining learned anything: the untrained network (the run's own
initial weights: pretraining seeds them with its ``seed`` before building the network) and the
constant prior, which predicts the mean true overlap of the layout for every target and base.
A model that has learned position beats both; one that has not is no better than the prior."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoints.files import load_checkpoint
from .errors import VocoInputError, first_line
from .data.volumes import Preprocessing, load_volume
from .layout import CropLayout, crop_layout, write_json, write_label_volume
from .models.voco import Student, build_teacher, voco_forward
from .training.pretrain import FORMAT, PretrainConfig
from .training.saved_config import checked_config


def load_pretrained(path: str | Path, device="cpu"):
    """Student, teacher and config from a ``voco pretrain`` checkpoint."""
    state = load_checkpoint(path)
    if state.get("format") != FORMAT:
        raise VocoInputError("not a VoCo pretraining checkpoint (no 'format': 'voco-pretrain')", path)
    config = PretrainConfig.from_dict(checked_config(state.get("config"), PretrainConfig, "pretrain", path))
    student = Student(config.backbone, config.preset, config.in_channels)
    teacher = build_teacher(student, config.preset)
    try:
        student.load_state_dict(state["student"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
    except (KeyError, RuntimeError) as error:  # missing, renamed or reshaped tensors
        raise VocoInputError(f"its weights do not fit the network its configuration names: {first_line(error)}",
                             path) from None
    if teacher is not None:
        teacher.to(device)
    return student.to(device).eval(), teacher, config


@torch.no_grad()
def predict_positions(layout: CropLayout, student, teacher, device="cpu") -> np.ndarray:
    logits, _ = voco_forward(student, teacher, layout.preset, layout.batch.crops.to(device))
    return logits[0].float().cpu().numpy()


def untrained_like(config: PretrainConfig, device="cpu"):
    """Student and teacher exactly as the run of ``config`` started (before its first step)."""
    torch.manual_seed(config.seed)  # as Pretrainer does before building the student
    student = Student(config.backbone, config.preset, config.in_channels)
    teacher = build_teacher(student, config.preset)
    if teacher is not None:
        teacher.to(device)
    return student.to(device).eval(), teacher


def position_scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """Mean absolute overlap error, and how often the base predicted to overlap most is the true one."""
    return {"mean_abs_error": float(np.abs(predicted - truth).mean()),
            "top_base_accuracy": float((predicted.argmax(1) == truth.argmax(1)).mean())}


def constant_prior(truth: np.ndarray) -> dict:
    """The prior that predicts the mean true overlap for every target and base, and its score."""
    return {"value": float(truth.mean()), "mean_abs_error": float(np.abs(truth - truth.mean()).mean()),
            "top_base_accuracy_chance": 1.0 / truth.shape[1]}


def baselines(layout: CropLayout, config: PretrainConfig, device="cpu") -> dict:
    """The untrained network's predictions and scores and the constant prior on ``layout``."""
    truth = layout.labels
    untrained = predict_positions(layout, *untrained_like(config, device), device)
    return {"untrained": {"predicted": untrained, **position_scores(untrained, truth)},
            "constant_prior": constant_prior(truth)}


def compare_over_layouts(image, checkpoint, seeds, device="cpu") -> dict:
    """The trained network, the untrained one and the constant prior scored over the layouts of
    ``seeds`` (one layout has only a few targets: many give a steadier figure)."""
    student, teacher, config = load_pretrained(checkpoint, device)
    untrained = untrained_like(config, device)
    volume = load_volume(image, Preprocessing.for_preset(config.preset, config.modality))
    truths, trained, initial = [], [], []
    for seed in seeds:
        layout = crop_layout(volume, config.preset, seed)
        truths.append(layout.labels)
        trained.append(predict_positions(layout, student, teacher, device))
        initial.append(predict_positions(layout, *untrained, device))
    truth = np.concatenate(truths)
    return {"layouts": len(truths), "targets": len(truth),
            "trained": position_scores(np.concatenate(trained), truth),
            "untrained": position_scores(np.concatenate(initial), truth),
            "constant_prior": constant_prior(truth)}


def heatmap(layout: CropLayout, predicted: np.ndarray, target: int) -> np.ndarray:
    """Predicted overlap of ``target`` with each base crop, painted over that crop on the input grid."""
    index_map = layout.index_map()
    values = np.concatenate([[0.0], predicted[target]]).astype(np.float32)
    return values[index_map]


def write_positions(image, checkpoint, out_dir, seed: int = 0, target: int = 0, device="cpu") -> dict[str, Path]:
    from .figures import plot_positions

    student, teacher, config = load_pretrained(checkpoint, device)
    layout = crop_layout(image, config.preset, seed, config.modality)
    if not 0 <= target < config.preset.num_targets:
        raise VocoInputError(f"--target must be between 0 and {config.preset.num_targets - 1}, got {target}")
    predicted = predict_positions(layout, student, teacher, device)
    truth = layout.labels
    compared = baselines(layout, config, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "positions.json", "figure": out / "positions.png", "volume": out / "positions.nii.gz"}
    layout_json = layout.to_json()
    write_json({
        "image": str(image), "checkpoint": str(checkpoint), "seed": seed, "heatmap_target": target,
        "preset": config.preset.name, "backbone": config.backbone,
        "bases": layout_json["bases"],
        "targets": [{**box, "true": truth[t].tolist(), "predicted": predicted[t].tolist(),
                     "mean_abs_error": float(np.abs(predicted[t] - truth[t]).mean()),
                     "predicted_base": int(predicted[t].argmax()), "true_base": int(truth[t].argmax())}
                    for t, box in enumerate(layout_json["targets"])],
        **position_scores(predicted, truth),
        "baselines": {name: {k: v for k, v in scores.items() if k != "predicted"} for name, scores in compared.items()},
    }, paths["json"])
    plot_positions(layout, predicted, paths["figure"], untrained=compared["untrained"]["predicted"],
                   prior=compared["constant_prior"]["value"])
    write_label_volume(heatmap(layout, predicted, target), layout.volume.source_affine, paths["volume"])
    return paths
