"""The main job (``voco demo``): pretrain the tiny model on real volumes that ship inside PyPI
packages, then draw what it learned. A few minutes on two CPU cores; re-running continues the
same run from its checkpoint.

Writes into ``OUT``: ``run/`` (checkpoint, metrics, config), ``loss.png``, ``crops/<volume>/``
and ``positions/<volume>/`` (see ``voco crops`` / ``voco positions``) and ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data.sample_data import fetch
from .figures import plot_losses, read_metrics
from .layout import crop_layout, write_json, write_layout
from .positions import write_positions
from .presets import PRESETS
from .training.pretrain import CHECKPOINT_NAME, METRICS_NAME, PretrainConfig, pretrain

TRAINING_VOLUMES = ("mni152-t1", "spine-ct", "spine-mri")
SHOWN_VOLUMES = ("mni152-t1", "spine-ct")
DEFAULT_STEPS = 200


def loss_drop(records: list[dict], fraction: float = 0.1) -> tuple[float, float]:
    """Mean total loss over the first and the last ``fraction`` of the steps."""
    losses = np.array([r["loss"] for r in records], dtype=float)
    n = max(1, int(len(losses) * fraction))
    return float(losses[:n].mean()), float(losses[-n:].mean())


def run_demo(out: str | Path, reporter, steps: int | None = None, device: str = "auto") -> int:
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
    errors = {}
    for name in SHOWN_VOLUMES:
        write_layout(crop_layout(volumes[name], config.preset, seed=1), out / "crops" / name)
        paths = write_positions(volumes[name], checkpoint, out / "positions" / name, seed=1)
        errors[name] = json.loads(paths["json"].read_text())["mean_abs_error"]
    first, last = loss_drop(read_metrics(run_dir / METRICS_NAME))
    summary = {"steps": config.steps, "loss_first_10pct": first, "loss_last_10pct": last,
               "position_mean_abs_error": errors, "outputs": str(out)}
    write_json(summary, out / "summary.json")
    reporter.emit("summary", **summary)
    return 0
