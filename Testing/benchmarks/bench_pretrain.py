"""Pretraining throughput: this engine against a baseline in the style of the reference VoCo code.

Both sides train the same network (``voco.models.voco.Student`` and its EMA teacher, same seed)
with the same optimiser and schedule, on the same preprocessed volumes held in memory (what a
MONAI CacheDataset keeps), drawing the same volumes at the same steps. They differ only where the
engine differs from the reference (GitHub Luffy03/VoCo):

* data: ``sample_batch`` cuts, resizes and augments all crops of a step at once; the baseline cuts
  each crop alone with MONAI dictionary transforms built per crop (SpatialCrop, Resize, RandFlip x3,
  RandRotate90, RandShiftIntensity) and computes labels target by target, base by base;
* loss: ``voco.losses`` is vectorised; the baseline loops over volumes, assigns one target at a time
  with ``F.cosine_similarity``, loops over base pairs i < j (and volume pairs for v2's inter term);
* EMA: ``EmaTeacher.update`` (foreach ops) against a Python loop over parameters.

First the baseline's unaugmented crops, labels and loss terms are checked against the engine's on
one batch. Then both train in one process, step by step in turns (engine, baseline, baseline,
engine, ...) after an untimed warm-up step each; steps/s is 1 / the median step time. Phases run
one after the other (the reference overlaps data with GPU compute in DataLoader workers, and
deep-copies CacheDataset items, which is left out here).

    .venv/bin/python Testing/benchmarks/bench_pretrain.py [--preset v1 --steps 2 --rounds 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import (Compose, RandAdjustContrastd, RandFlipd, RandGaussianNoised, RandRotate90d,
                              RandScaleIntensityd, RandScaleIntensityFixedMeand, RandShiftIntensityd, Resized,
                              SpatialCropd, ToTensord)

from voco.data.crops import extract_crops, sample_batch
from voco.data.sample_data import fetch
from voco.data.volumes import load_volume
from voco.geometry import base_grid
from voco.losses import EPS
from voco.models.voco import Student, batch_keep_mask, build_teacher, teacher_source, voco_forward
from voco.presets import PRESETS, resolve_preset
from voco.training.pretrain import PretrainConfig, preprocessing_for, sample_order
from voco.training.schedules import build_optimizer

SAMPLES = ("mni152-t1", "spine-ct", "spine-mri")
SEED = 0
PHASES = {"data": "data", "forward": "forward+loss", "backward": "backward+optimizer+EMA"}
TOLERANCE = 1e-5


class Side:
    """One trainer. Subclasses supply ``data`` (crops, labels, keep-mask), ``loss`` and ``ema``."""

    def __init__(self, preset, backbone, volumes, batch_size, device, total_steps):
        self.preset, self.volumes, self.batch_size, self.device = preset, volumes, batch_size, device
        torch.manual_seed(SEED)  # identical initial weights on both sides
        self.student = Student(backbone, preset).to(device)
        self.teacher = build_teacher(self.student, preset)
        self.optimizer, self.scheduler = build_optimizer(preset.optimizer, self.student.parameters(), preset.lr,
                                                         total_steps, preset.warmup_steps, preset.weight_decay)
        self.amp = device.type == "cuda"  # as the engine's Pretrainer: fp16 autocast on GPUs
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def order(self, step: int) -> tuple[np.ndarray, list[int]]:
        positions = step * self.batch_size + np.arange(self.batch_size)
        return sample_order(SEED, len(self.volumes), positions), positions.tolist()

    def keep_mask(self, generators):
        return batch_keep_mask(generators, self.preset, self.device)

    def step(self, step: int) -> dict[str, float]:
        """One training step; returns the seconds spent in each phase."""
        t0 = time.perf_counter()
        crops, labels, keep = self.data(step)
        t1 = _synced(self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            terms = self.loss(crops, labels, keep)
        t2 = _synced(self.device)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.teacher is not None:
            self.ema()
        t3 = _synced(self.device)
        return {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2}


class Engine(Side):
    name = "engine"

    def data(self, step):
        order, positions = self.order(step)
        batch = sample_batch([self.volumes[i].image for i in order], self.preset, SEED, step, positions, self.device)
        return batch.crops, batch.labels, self.keep_mask(batch.generators)

    def loss(self, crops, labels, keep):
        return voco_forward(self.student, self.teacher, self.preset, crops, labels, keep)[1]

    def ema(self):
        self.teacher.update(teacher_source(self.student, self.preset))


# --- the baseline: the reference's style, one crop / target / pair / parameter at a time ----------

def crop_transform(start, preset, augment: bool) -> Compose:
    """MONAI dictionary transforms for one crop, built anew for every crop as the reference does."""
    chain = [SpatialCropd("image", roi_start=start, roi_end=[s + preset.crop_edge for s in start])]
    if preset.input_edge != preset.crop_edge:
        chain.append(Resized("image", spatial_size=(preset.input_edge,) * 3, mode="trilinear", align_corners=False))
    if augment:
        chain += [RandFlipd("image", prob=0.2, spatial_axis=axis) for axis in range(3)]
        chain += [RandRotate90d("image", prob=0.2, max_k=3),
                  RandShiftIntensityd("image", offsets=0.1, prob=preset.shift_prob)]
        if preset.augment == "nnssl":
            chain += [RandGaussianNoised("image", prob=0.1, std=0.1), RandScaleIntensityd("image", 0.25, prob=0.15),
                      RandScaleIntensityFixedMeand("image", prob=0.15, factors=0.25),
                      RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5))]
    return Compose([*chain, ToTensord("image")])


def baseline_layout(rng, shape, preset):
    """A random patch start in a volume of ``shape`` and random target corners inside the patch."""
    edge, patch = preset.crop_edge, preset.patch_shape
    start = [int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch)]
    return start, [[int(rng.integers(0, p - edge + 1)) for p in patch] for _ in range(preset.num_targets)]


def overlap_row(target, bases, edge: int, dims: int) -> list[float]:
    """Labels of one target: its overlap fraction with each base, base by base, axis by axis."""
    return [math.prod(max(edge - abs(t - b), 0) / edge for t, b in zip(target[:dims], base[:dims])) for base in bases]


def baseline_crops(volumes, preset, layouts, augment=True):
    """``layouts[i] = (patch start, target corners)``; returns crops (B, K + T, 1, e, e, e) and labels."""
    edge, (nx, ny, nz) = preset.crop_edge, preset.grid
    bases = [(i * edge, j * edge, k * edge) for i in range(nx) for j in range(ny) for k in range(nz)]
    crops, labels = [], []
    for volume, (start, targets) in zip(volumes, layouts):
        for corner in bases + [tuple(t) for t in targets]:
            transform = crop_transform([int(s + c) for s, c in zip(start, corner)], preset, augment)
            crops.append(transform({"image": volume})["image"].as_tensor())
        labels.append([overlap_row(t, bases, edge, preset.label_dims) for t in targets])
    return torch.stack(crops).view(len(volumes), -1, *crops[0].shape), torch.tensor(labels, dtype=torch.float32)


def online_assign(feats, bases):
    """ReLU cosine similarity of each target (one at a time) with all bases: (T, D), (K, D) -> (T, K)."""
    return F.relu(torch.stack([F.cosine_similarity(f.unsqueeze(0), bases, dim=1) for f in feats]))


def regularization_loss(bases, form: str):
    total, pairs = 0.0, 0
    for i in range(len(bases) - 1):
        for j in range(i + 1, len(bases)):
            if form == "voco":
                total = total + F.relu(F.cosine_similarity(bases[i:i + 1], bases[j:j + 1].detach(), dim=1)) ** 2
            else:
                total = total + F.relu(F.cosine_similarity(bases[i:i + 1], bases[j:j + 1], dim=1))
            pairs += 1
    return (total / pairs).squeeze(0)


def ce_loss(labels, logits, neg_form: str):
    """Positive and zero-overlap terms of one volume (or one volume pair), as the reference's ce_loss."""
    pos = -(labels * torch.log(1 - (labels - logits).abs() + EPS)).sum() / (labels.sum() + EPS)
    zero = (labels == 0).float()
    values = logits ** 2 if neg_form == "square" else -torch.log(1 - logits + EPS)
    return pos, (zero * values).sum() / (zero.sum() + EPS)


def baseline_forward(student, teacher, preset, crops, labels, keep) -> dict:
    """The same network calls as ``voco_forward``; every loss term computed volume by volume."""
    k, batch = preset.num_bases, crops.shape[0]
    embeddings, projected = student(crops, keep)
    t_projected = None
    with torch.no_grad():
        if preset.teacher == "full":
            t_projected = teacher(crops)[1]
        elif preset.teacher == "head":
            t_projected = teacher(embeddings.detach())
    pos = neg = reg = 0.0
    for i in range(batch):
        s_bases, s_targets, y = projected[i, :k], projected[i, k:], labels[i]
        if preset.teacher == "full":
            logits = 0.5 * (online_assign(s_targets, t_projected[i, :k]) + online_assign(t_projected[i, k:], s_bases))
        elif preset.teacher == "head":
            logits = online_assign(s_targets, t_projected[i, :k])
        else:
            logits = online_assign(s_targets, s_bases.detach() if preset.detach_bases else s_bases)
        pos_i, neg_i = ce_loss(y, logits, preset.neg_loss)
        pos, neg, reg = pos + pos_i, neg + neg_i, reg + regularization_loss(s_bases, preset.regulariser)
    terms = {"loss_pos": pos / batch, "loss_neg": neg / batch, "loss_reg": reg / batch}
    if preset.inter_volume:  # v2: student targets of volume i against its bases of volume i + 1,
        inter = 0.0          # the teacher's prediction for the pair as soft label
        for i in range(batch):
            j = (i + 1) % batch
            with torch.no_grad():
                soft = online_assign(t_projected[i, k:], t_projected[j, :k])
            pos_ij, neg_ij = ce_loss(soft, online_assign(projected[i, k:], projected[j, :k]), preset.neg_loss)
            inter = inter + pos_ij + neg_ij
        terms["loss_inter"] = inter / batch
    terms["loss"] = sum(terms.values())
    return terms


class Baseline(Side):
    name = "baseline"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # What a CacheDataset holds after the deterministic transforms: MetaTensors with their affine.
        self.cached = [MetaTensor(v.image, affine=torch.as_tensor(v.affine)) for v in self.volumes]

    def data(self, step):
        order, positions = self.order(step)
        rng = np.random.default_rng([SEED, step])
        layouts = [baseline_layout(rng, self.cached[i].shape[1:], self.preset) for i in order]
        crops, labels = baseline_crops([self.cached[i] for i in order], self.preset, layouts)
        keep = self.keep_mask([torch.Generator().manual_seed(int(rng.integers(2 ** 62))) for _ in positions])
        return crops.to(self.device), labels.to(self.device), keep

    def loss(self, crops, labels, keep):
        return baseline_forward(self.student, self.teacher, self.preset, crops, labels, keep)

    def ema(self):
        m = self.teacher.momentum
        for param, param_t in zip(teacher_source(self.student, self.preset).parameters(), self.teacher.parameters()):
            param_t.data = m * param_t.data + (1 - m) * param.data


# --- checks, timing, report ---------------------------------------------------------------------

def check_equivalence(engine: Engine, baseline: Baseline) -> dict[str, float]:
    """Largest |difference| between the sides on the engine's batch of step 0.

    The network runs once; both losses then work in float64 on its outputs, because at
    initialisation some predictions sit within 1e-7 of 1, where ``-log(1 - p)`` turns float32
    rounding into differences of 1e-3 that would hide (or fake) a real one.
    """
    preset, edge, device = engine.preset, engine.preset.crop_edge, engine.device
    order, positions = engine.order(0)
    batch = sample_batch([engine.volumes[i].image for i in order], preset, SEED, 0, positions, device)
    layouts = list(zip(batch.patch_starts.tolist(), batch.target_boxes[..., :3].tolist()))
    crops, labels = baseline_crops([baseline.cached[i] for i in order], preset, layouts, augment=False)
    corners = np.concatenate([np.broadcast_to(base_grid(preset.grid, edge)[:, :3], (len(order), preset.num_bases, 3)),
                              batch.target_boxes[..., :3]], axis=1) + batch.patch_starts[:, None]
    plain = torch.cat([extract_crops(engine.volumes[i].image[None], torch.from_numpy(c[None]), edge)
                       for i, c in zip(order, corners)])
    if preset.input_edge != edge:
        plain = F.interpolate(plain.flatten(0, 1), size=crops.shape[-3:], mode="trilinear", align_corners=False)
        plain = plain.view(crops.shape)
    with torch.no_grad():
        outputs = [x.double() for x in engine.student(batch.crops, engine.keep_mask(batch.generators))]
        t_outputs = [x.double() for x in engine.teacher(batch.crops)] if preset.teacher == "full" else None
        teacher = ((lambda crops: t_outputs) if t_outputs else
                   copy.deepcopy(engine.teacher).double() if engine.teacher is not None else None)
        args = (lambda crops, keep: outputs, teacher, preset, batch.crops)
        mine = voco_forward(*args, batch.labels.double(), None)[1]
        theirs = baseline_forward(*args, labels.double().to(device), None)
    return {"crops": (crops - plain).abs().max().item(), "labels": (labels - batch.labels.cpu()).abs().max().item(),
            **{name: abs(mine[name].item() - theirs[name].item()) for name in sorted(mine)}}


def _synced(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def summary(records: list[dict], steps: int) -> dict:
    totals = [sum(r.values()) for r in records]
    return {"steps_per_s": 1 / statistics.median(totals),
            "round_steps_per_s": [steps / sum(totals[i:i + steps]) for i in range(0, len(totals), steps)],
            "seconds_per_step": {p: statistics.median(r[p] for r in records) for p in PHASES}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo", choices=list(PRESETS))
    parser.add_argument("--backbone", default="swinunetr-tiny")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    preset = resolve_preset(args.preset)

    config = PretrainConfig(data=[], out="", preset=preset, backbone=args.backbone)
    volumes = [load_volume(fetch(name), preprocessing_for(config)) for name in SAMPLES]
    print(f"volumes: {', '.join(f'{n} {tuple(v.image.shape[1:])}' for n, v in zip(SAMPLES, volumes))}")
    total = 1 + args.rounds * args.steps
    sides = [cls(preset, args.backbone, volumes, args.batch_size, device, total) for cls in (Engine, Baseline)]

    check = check_equivalence(*sides)
    ok = all(value <= TOLERANCE for value in check.values())
    print("check (max |engine - baseline|): " + ", ".join(f"{k} {v:.1e}" for k, v in check.items())
          + (" OK" if ok else f" MISMATCH (> {TOLERANCE:g})"))

    records = {side.name: [] for side in sides}
    for side in sides:
        side.step(0)  # warm-up, not timed
    for r in range(args.rounds):  # steps interleaved, first side alternating (ABBA): drifts in load hit both
        for s in range(args.steps):
            step = 1 + r * args.steps + s
            for side in sides if step % 2 else sides[::-1]:
                records[side.name].append(side.step(step))
    figures = {name: summary(recs, args.steps) for name, recs in records.items()}
    for name, fig in figures.items():
        phases = ", ".join(f"{PHASES[p]} {fig['seconds_per_step'][p]:.3f}" for p in PHASES)
        rounds = " ".join(f"{v:.3g}" for v in fig["round_steps_per_s"])
        print(f"{name:>8}: {fig['steps_per_s']:.3g} steps/s; median s/step: {phases}; rounds: {rounds} steps/s")
    ratio = figures["engine"]["steps_per_s"] / figures["baseline"]["steps_per_s"]
    print(f"engine {figures['engine']['steps_per_s']:.3g} steps/s, baseline {figures['baseline']['steps_per_s']:.3g} "
          f"steps/s, ratio {ratio:.2f}x (preset {preset.name}, {args.backbone}, {device.type}, {threads} threads)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"preset": preset.name, "backbone": args.backbone, "device": device.type, "threads": threads,
                       "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "check": check,
                       "check_ok": ok, **figures, "ratio": ratio}, out, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
