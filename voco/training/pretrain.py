"""The VoCo pretraining loop: resumable, on one process or many (torchrun, DDP).

Stages, as in the command line: list images -> preprocess (once, cached in memory; bad files are
skipped with a warning) -> train (crops drawn per step, see ``voco.data.crops``) -> checkpoint.
With ``--data STORE`` (made by ``voco preprocess``) nothing is held in memory: each step's patches
are streamed from the store by DataLoader workers (``store_steps``).

Exact resume: the data position and every random draw are functions of ``(seed, step)``, so a
checkpoint needs only the step, the weights, the teacher, the optimiser, the schedule, the grad
scaler and torch's RNG state; a resumed run reaches the same weights bit for bit on the CPU.

A step with a non-finite loss or gradient changes nothing and is counted (``finite_steps``);
weights that are not finite are never saved, and ``metrics.jsonl`` stays strict JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..checkpoints.files import atomic_path, load_checkpoint, require_finite, save_checkpoint
from ..data.crops import CropBatch, crops_from_patches, sample_batch
from ..data.sources import list_images
from ..data.store import Store, is_store
from ..data.volumes import Preprocessing, load_volumes
from ..errors import VocoInputError, first_line
from ..jobs.progress import finite_or_none
from ..jobs.signals import StopRequest
from ..models.backbones import check_input_edge
from ..models.voco import Student, batch_keep_mask, build_teacher, teacher_source, voco_forward
from ..presets import Preset, preset_from_dict
from .data_order import batch_positions, sample_order
from .distributed import init_distributed, shutdown
from .finite_steps import NonFiniteSteps
from .saved_config import checked_config, read_saved_config
from .schedules import build_optimizer
from .store_steps import StoreSteps, stream_steps

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
FORMAT = "voco-pretrain"


@dataclass
class PretrainConfig:
    data: list[str]
    out: str
    preset: Preset
    backbone: str = "swinunetr-tiny"
    steps: int = 1000
    batch_size: int = 2
    checkpoint_every: int = 100
    seed: int = 0
    lr: float | None = None
    modality: str = "auto"
    in_channels: int = 1
    grad_clip: float = 1.0
    log_every: int = 1

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise VocoInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise VocoInputError(f"--lr must be positive and finite, got {self.lr}")
        check_input_edge(self.backbone, self.preset.input_edge)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["preset"] = dataclasses.asdict(self.preset)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "PretrainConfig":
        return cls(**{**values, "preset": preset_from_dict(values["preset"])})


# What a checkpoint of this format always holds (state_dict), checked before a resume reads it.
_CHECKPOINT_KEYS = ("step", "world_size", "student", "optimizer", "scheduler", "scaler", "rng_cpu")

# Settings that must not change when a run is resumed (steps may grow; output and logging may change).
_RESUME_FIXED = ("preset", "backbone", "batch_size", "seed", "lr", "modality", "in_channels", "data")


def preprocessing_for(config: PretrainConfig) -> Preprocessing:
    return Preprocessing.for_preset(config.preset, config.modality)


class Pretrainer:
    """Holds the model, teacher, optimiser and data of one run; ``run()`` trains to ``steps``."""

    def __init__(self, config: PretrainConfig, reporter, device: str = "auto", resume: bool = False,
                 workers: int = 0):
        config.validate()
        self.config, self.reporter = config, reporter
        self.run_dir = Path(config.out)
        self.checkpoint_path = self.run_dir / CHECKPOINT_NAME
        self.dist = init_distributed(device)
        self.device = self.dist.device
        state = self._resume_state() if resume else None

        self.store_steps, self.workers, self._streamed = None, workers, None
        if len(config.data) == 1 and is_store(config.data[0]):
            store = Store(config.data[0])
            store.require_preprocessing(preprocessing_for(config))
            self.store_steps = StoreSteps(store, config.preset, config.seed, config.batch_size, self.dist.rank,
                                          self.dist.world_size)
            self.volumes, self.skipped = store.entries, len(store.skipped)
        else:
            images = list_images(config.data)
            self.volumes = load_volumes(images, preprocessing_for(config), on_warning=lambda message, path:
                                        reporter.emit("warning", message=message, file=str(path)))
            self.skipped = len(images) - len(self.volumes)

        torch.manual_seed(config.seed)  # identical initial weights on every rank and every rerun
        preset = config.preset
        self.student = Student(config.backbone, preset, config.in_channels).to(self.device)
        self.teacher = build_teacher(self.student, preset)
        self.optimizer, self.scheduler = build_optimizer(
            preset.optimizer, self.student.parameters(), config.lr or preset.lr, config.steps, preset.warmup_steps,
            preset.weight_decay)
        self.use_amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.step = 0
        self.non_finite = NonFiniteSteps(reporter, self.run_dir)
        if state is not None:
            self._load_state(state)
        self.model = (DistributedDataParallel(self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                      if self.dist.enabled else self.student)

    # --- checkpoints -------------------------------------------------------------------
    def _resume_state(self) -> dict:
        if not self.checkpoint_path.is_file():
            raise VocoInputError(f"--resume: no {CHECKPOINT_NAME} to resume from", self.run_dir)
        state = load_checkpoint(self.checkpoint_path)
        if state.get("format") != FORMAT:
            raise VocoInputError("--resume: not a VoCo pretraining checkpoint", self.checkpoint_path)
        saved = checked_config(state.get("config"), PretrainConfig, "pretrain", self.checkpoint_path, "--resume: ")
        missing = [key for key in _CHECKPOINT_KEYS if key not in state]
        if missing:
            raise VocoInputError(f"--resume: the checkpoint has no {missing[0]!r}", self.checkpoint_path)
        now = self.config.to_dict()
        for key in _RESUME_FIXED:
            if saved[key] != now[key]:
                raise VocoInputError(f"--resume: the run was started with a different {key} "
                                     f"({_short(saved[key])} vs now {_short(now[key])})", self.run_dir)
        if state["world_size"] != self.dist.world_size:
            raise VocoInputError(f"--resume: the run used {state['world_size']} processes, now {self.dist.world_size}; "
                                 "the data order depends on it", self.run_dir)
        if state["step"] > self.config.steps:
            raise VocoInputError(f"--resume: the checkpoint is at step {state['step']}, beyond --steps {self.config.steps}")
        return state

    def _load_state(self, state: dict) -> None:
        try:
            self._restore(state)
        except (KeyError, RuntimeError, ValueError) as error:  # tensors missing, renamed or reshaped
            raise VocoInputError(f"--resume: its saved state does not fit this run: {first_line(error)}",
                                 self.checkpoint_path) from None

    def _restore(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.step = state["step"]

    def state_dict(self) -> dict:
        return {
            "format": FORMAT, "format_version": 1, "step": self.step, "world_size": self.dist.world_size,
            "config": self.config.to_dict(), "backbone": self.config.backbone,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def save(self) -> Path:
        if self.dist.rank == 0:
            require_finite(self.student.state_dict(), self.checkpoint_path)
            save_checkpoint(self.state_dict(), self.checkpoint_path)
            self.reporter.emit("checkpoint", step=self.step, path=str(self.checkpoint_path))
        return self.checkpoint_path

    # --- training ----------------------------------------------------------------------
    def batch_positions(self, step: int) -> np.ndarray:
        return batch_positions(step, self.config.batch_size, self.dist.rank, self.dist.world_size)

    def next_batch(self) -> CropBatch:
        """This rank's crops of the current step: from the volumes in memory, or the store's
        patches the DataLoader has read ahead (its iterator starts at the first step asked for)."""
        preset, config = self.config.preset, self.config
        if self.store_steps is None:
            positions = self.batch_positions(self.step)
            order = sample_order(config.seed, len(self.volumes), positions)
            return sample_batch([self.volumes[i].image for i in order], preset, config.seed, self.step,
                                positions.tolist(), self.device)
        if self._streamed is None:
            self._streamed = stream_steps(self.store_steps, self.step, config.steps, self.workers, self.device)
        samples = next(self._streamed)
        return crops_from_patches(samples.patches, samples.draws, preset, self.device)

    def train_step(self) -> dict[str, float]:
        preset, config = self.config.preset, self.config
        batch = self.next_batch()
        keep = batch_keep_mask(batch.generators, preset, self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            _, terms = voco_forward(self.model, self.teacher, preset, batch.crops, batch.labels, keep)
        grad_norm = torch.tensor(float("nan"), device=self.device)
        # Decided together: a rank that skipped its backward pass would leave the others waiting.
        finite = not self.dist.any(not bool(torch.isfinite(terms["loss"].detach())))
        if finite:
            self.scaler.scale(terms["loss"]).backward()
            self.scaler.unscale_(self.optimizer)  # so that clipping sees true gradients under AMP
            grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), config.grad_clip)
            # Under AMP the scaler itself skips a step with overflowing gradients and lowers its scale.
            finite = self.use_amp or bool(torch.isfinite(grad_norm))
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.teacher is not None:
                self.teacher.update(teacher_source(self.student, preset))
        self.optimizer.zero_grad(set_to_none=True)
        self.non_finite.count(self.step + 1, finite)
        names = sorted(terms)
        values = self.dist.all_mean(torch.stack([terms[n].detach().float() for n in names] + [grad_norm.float()]))
        return dict(zip(names + ["grad_norm"], values.tolist()))

    def run(self) -> int:
        """Train to ``config.steps``; returns the process exit code (0, or 128 + signal if stopped)."""
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.rank == 0:
            with atomic_path(self.run_dir / "config.json") as tmp:
                tmp.write_text(json.dumps(config.to_dict(), indent=2))
        self.reporter.emit("start", step=self.step, total=config.steps, run_dir=str(self.run_dir),
                           volumes=len(self.volumes), skipped=self.skipped, world_size=self.dist.world_size,
                           device=str(self.device), preset=config.preset.name, backbone=config.backbone)
        global_batch = config.batch_size * self.dist.world_size
        started, first_step = time.perf_counter(), self.step
        with StopRequest() as stop, open(self.run_dir / METRICS_NAME, "a") as metrics:
            try:
                while self.step < config.steps:
                    values = self.train_step()
                    self.step += 1
                    elapsed = time.perf_counter() - started
                    per_step = elapsed / (self.step - first_step)
                    if self.step % config.log_every == 0 or self.step == config.steps:
                        record = {"step": self.step, "total": config.steps, **values,
                                  "lr": self.optimizer.param_groups[0]["lr"],
                                  "samples_per_s": global_batch / per_step, "eta_s": per_step * (config.steps - self.step)}
                        self.reporter.emit("step", **record)
                        if self.dist.rank == 0:
                            metrics.write(json.dumps({k: finite_or_none(v) for k, v in record.items()}) + "\n")
                            metrics.flush()
                    stopping = self.dist.any(stop.signal is not None)
                    if stopping or self.step % config.checkpoint_every == 0 or self.step == config.steps:
                        self.save()
                    if stopping:
                        self.reporter.emit("stopped", step=self.step, checkpoint=str(self.checkpoint_path))
                        return 128 + (stop.signal or signal.SIGTERM)
            finally:
                self._streamed = None  # a store's DataLoader workers end with the run
        self.reporter.emit("done", step=self.step, checkpoint=str(self.checkpoint_path))
        return 0


def resumable_config(run_dir, given: dict) -> PretrainConfig:
    """The saved configuration of a run, with the options given again on the command line applied."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise VocoInputError(f"--resume: no run to resume (config.json and {CHECKPOINT_NAME} are missing)", run_dir)
    config = PretrainConfig.from_dict(read_saved_config(path, PretrainConfig, "pretrain"))
    for name in ("data", "out", "backbone", "steps", "batch_size", "checkpoint_every", "lr", "seed", "log_every", "modality"):
        if name in given:
            setattr(config, name, given[name])
    return config


def pretrain(config: PretrainConfig, reporter, device: str = "auto", resume: bool = False, workers: int = 0) -> int:
    try:
        return Pretrainer(config, reporter, device, resume, workers).run()
    finally:
        shutdown()


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
