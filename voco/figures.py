"""Pictures a person can read: the crop layout, position predictions, loss curves (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .checkpoints.files import atomic_path  # noqa: E402

# (name, axis cut through, horizontal axis, vertical axis) in RAS-oriented voxel indices.
_VIEWS = (("axial", 2, 0, 1), ("coronal", 1, 0, 2), ("sagittal", 0, 1, 2))
_TARGET_COLOURS = ("#ff3b30", "#ffcc00", "#34c759", "#af52de", "#ff9500", "#5ac8fa")


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _draw_box(ax, box, h, v, **style):
    ax.add_patch(Rectangle((box[h] - 0.5, box[v] - 0.5), box[h + 3] - box[h], box[v + 3] - box[v], fill=False, **style))


def _crosses(box, axis, index) -> bool:
    return box[axis] <= index < box[axis + 3]


def plot_layout(layout, path: Path) -> None:
    """Three middle slices of the preprocessed volume through the patch, with the base grid
    (white, numbered) and the targets (coloured) drawn over it."""
    image = layout.volume.image[0].numpy()
    start = layout.batch.patch_starts[0]
    bases = layout.base_boxes + np.tile(start, 2)
    targets = layout.target_boxes + np.tile(start, 2)
    centre = start + np.array(layout.preset.patch_shape) // 2
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    for ax, (name, cut, h, v) in zip(axes, _VIEWS):
        plane = np.take(image, centre[cut], axis=cut)
        ax.imshow(plane.T, cmap="gray", origin="lower", interpolation="nearest")
        for k, box in enumerate(bases):
            if _crosses(box, cut, centre[cut]):
                _draw_box(ax, box, h, v, edgecolor="white", linewidth=1.0, alpha=0.8)
                ax.text((box[h] + box[h + 3]) / 2, (box[v] + box[v + 3]) / 2, str(k), color="white",
                        ha="center", va="center", fontsize=8, alpha=0.8)
        for t, box in enumerate(targets):
            if _crosses(box, cut, centre[cut]):
                _draw_box(ax, box, h, v, edgecolor=_TARGET_COLOURS[t % len(_TARGET_COLOURS)], linewidth=2.2,
                          linestyle="--", label=f"target {t}")
        ax.set_title(f"{name} slice {centre[cut]}")
        ax.set_xlabel(f"{'RAS'[h]} (voxels)")
        ax.set_ylabel(f"{'RAS'[v]} (voxels)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{Path(layout.volume.path).name}: preset {layout.preset.name}, "
                 f"{layout.preset.num_bases} base crops (white), {len(targets)} targets (dashed)")
    _save(fig, path)


def plot_positions(layout, predicted: np.ndarray, path: Path, untrained: np.ndarray | None = None,
                   prior: float | None = None) -> None:
    """For each target: where it is (axial slice) and its predicted vs true overlap per base, next
    to the untrained network's prediction and the constant prior when given."""
    truth = layout.labels
    count = len(truth)
    fig, axes = plt.subplots(count, 2, figsize=(13, 4.2 * count), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.6]})
    image = layout.volume.image[0].numpy()
    start = layout.batch.patch_starts[0]
    bases = layout.base_boxes + np.tile(start, 2)
    for t in range(count):
        target = layout.target_boxes[t] + np.tile(start, 2)
        z = (target[2] + target[5]) // 2
        ax = axes[t, 0]
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower", interpolation="nearest")
        for k, box in enumerate(bases):
            if _crosses(box, 2, z):
                _draw_box(ax, box, 0, 1, edgecolor="white", linewidth=0.8, alpha=0.6)
                ax.text((box[0] + box[3]) / 2, (box[1] + box[4]) / 2, f"{predicted[t, k]:.2f}\n({truth[t, k]:.2f})",
                        color="white", ha="center", va="center", fontsize=7)
        _draw_box(ax, target, 0, 1, edgecolor=_TARGET_COLOURS[t % len(_TARGET_COLOURS)], linewidth=2.2, linestyle="--")
        ax.set_title(f"target {t}: predicted (true) overlap per base")
        ax = axes[t, 1]
        k = np.arange(truth.shape[1])
        width = 0.4 if untrained is None else 0.28
        ax.bar(k - width, truth[t], width, label="true", color="#8e8e93")
        ax.bar(k, predicted[t], width, label="predicted", color=_TARGET_COLOURS[t % len(_TARGET_COLOURS)])
        title = f"mean |error| {np.abs(predicted[t] - truth[t]).mean():.3f}"
        if untrained is not None:
            ax.bar(k + width, untrained[t], width, label="untrained network", color="#c7c7cc", hatch="//")
            title += f"; untrained {np.abs(untrained[t] - truth[t]).mean():.3f}"
        if prior is not None:
            ax.axhline(prior, color="#1c1c1e", linestyle=":", linewidth=1.2, label=f"constant prior {prior:.2f}")
            title += f"; prior {np.abs(prior - truth[t]).mean():.3f}"
        ax.set_xticks(k)
        ax.set_xlabel("base crop")
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend(fontsize=8)
    _save(fig, path)


def read_metrics(path: Path) -> list[dict]:
    """Step records of a run, one per step; after a resume the re-run steps replace the old ones."""
    by_step = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(metrics_path: Path, path: Path) -> None:
    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(9, 5))
    for name in ("loss", "loss_pos", "loss_neg", "loss_reg", "loss_inter"):
        if records and name in records[0]:
            values = np.array([r[name] if r[name] is not None else np.nan for r in records], dtype=float)
            window = max(1, len(values) // 20)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, label=name, linewidth=2.0 if name == "loss" else 1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving average)")
    ax.set_title("VoCo pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_segmentation(image_path: Path, label_path: Path, labels, path: Path, reference_path: Path | None = None,
                      title: str = "") -> None:
    """Three middle slices of the image (file voxel axes, assumed near RAS) with the label map
    in its labels' colours; a second row with the reference labels when given."""
    import nibabel as nib
    from matplotlib.colors import ListedColormap

    image, predicted = nib.load(str(image_path)), nib.load(str(label_path))
    rows = [("segmentation", predicted)] + ([("reference", nib.load(str(reference_path)))] if reference_path else [])
    colours = np.zeros((max(label.value for label in labels) + 1, 4))
    for label in labels:
        colours[label.value] = matplotlib.colors.to_rgba(label.color, alpha=0.55)
    cmap = ListedColormap(colours)
    centre = [n // 2 for n in image.shape[:3]]
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 4.4 * len(rows)), squeeze=False)
    for row, (name, volume) in enumerate(rows):
        for col, (view, axis, h, v) in enumerate(_VIEWS):
            cut = tuple(centre[axis] if a == axis else slice(None) for a in range(3))
            ax = axes[row, col]
            ax.imshow(np.asarray(image.dataobj[cut], dtype=np.float32).T, cmap="gray", origin="lower")
            ax.imshow(np.asarray(volume.dataobj[cut]).T, cmap=cmap, vmin=0, vmax=len(colours) - 1,
                      origin="lower", interpolation="nearest")
            ax.set_title(f"{name}: {view}")
            ax.axis("off")
    handles = [Rectangle((0, 0), 1, 1, color=label.color) for label in labels]
    fig.legend(handles, [label.name for label in labels], loc="lower center", ncol=len(labels))
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_evaluation(evaluation: dict, path: Path) -> None:
    """``voco evaluate``: the test Dice of every run (a point per seed, mean ± std per initialisation
    and fraction), the learning curves (test Dice vs step: mean over seeds, ± std shaded) and the
    training loss (moving average, mean over seeds)."""
    results = evaluation["results"]
    inits = list(dict.fromkeys(r["init"] for r in results))
    fractions = sorted({r["fraction"] for r in results}, reverse=True)
    colours = {init: plt.get_cmap("tab10")(i % 10) for i, init in enumerate(inits)}
    styles = dict(zip(fractions, ("-", "--", ":", "-.") * len(fractions)))
    fig, (dice_ax, curve_ax, loss_ax) = plt.subplots(1, 3, figsize=(17, 5.2))
    ticks, names = [], []
    for f_index, fraction in enumerate(fractions):
        for i_index, init in enumerate(inits):
            x = f_index * (len(inits) + 1) + i_index
            group = [r for r in results if r["init"] == init and r["fraction"] == fraction]
            if not group:
                continue
            values = np.array([r["mean_dice"] for r in group], dtype=float)
            jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
            dice_ax.scatter(x + jitter, values, color=colours[init], alpha=0.6, s=22, zorder=2)
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            dice_ax.errorbar(x + 0.3, values.mean(), yerr=std, fmt="o", color="black", capsize=4, zorder=3)
            ticks.append(x)
            names.append(init if len(fractions) == 1 else f"{init}\n{fraction:.0%}")
            label = init if len(fractions) == 1 else f"{init} @ {fraction:g}"
            steps = group[0]["learning_curve"]["step"]
            curves = np.array([r["learning_curve"]["mean_dice"] for r in group if r["learning_curve"]["step"] == steps],
                              dtype=float)
            mean, spread = curves.mean(0), curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
            curve_ax.plot(steps, mean, color=colours[init], linestyle=styles[fraction], label=label)
            curve_ax.fill_between(steps, mean - spread, mean + spread, color=colours[init], alpha=0.15)
            losses = np.array([[np.nan if v is None else v for v in r["train_loss"]] for r in group], dtype=float)
            window = max(1, losses.shape[1] // 20)
            smooth = np.convolve(np.nanmean(losses, 0), np.ones(window) / window, mode="valid")
            loss_ax.plot(np.arange(window, losses.shape[1] + 1), smooth, color=colours[init],
                         linestyle=styles[fraction], label=label)
    dice_ax.set_xticks(ticks, names, fontsize=8)
    if len(fractions) > 1:
        dice_ax.set_xlabel("initialisation, share of the training cases fine-tuned on")
    dice_ax.set_ylabel("mean test Dice of the final model")
    dice_ax.set_title("test Dice per initialisation (points: seeds; black: mean ± std)")
    curve_ax.set_xlabel("fine-tuning step")
    curve_ax.set_ylabel("mean test Dice")
    curve_ax.set_title("learning curves (mean over seeds ± std)")
    loss_ax.set_xlabel("fine-tuning step")
    loss_ax.set_ylabel("training loss (moving average)")
    loss_ax.set_title("training loss (mean over seeds)")
    for ax in (dice_ax, curve_ax, loss_ax):
        ax.grid(alpha=0.3)
    for ax in (curve_ax, loss_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    budget = evaluation["budget"]
    fig.suptitle(f"voco evaluate: {budget['architecture']}, {budget['steps']} steps, batch {budget['batch_size']}, "
                 f"patch {budget['patch_size']}, test cases {', '.join(evaluation['test_cases'])}")
    _save(fig, path)
