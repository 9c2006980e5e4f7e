"""``voco finetune``: a segmentation network on labelled volumes, starting from VoCo weights.

Stages, as in the command line: list cases -> preprocess (image and label together, cached in
memory; or, from a store made by ``voco preprocess --labels``, streamed by DataLoader workers)
-> train on patches (half centred on foreground, half anywhere) with DiceCE ->
validate by sliding window every ``val_every`` steps -> checkpoint (``last.pt`` always,
``best.pt`` and the model package ``model/`` when validation Dice improves).

The result is a model package (see ``voco.registry.package``) that ``voco segment`` runs, that
``voco models import`` installs and that a later fine-tune starts from: the clinician loop
fine-tunes the current model on a few corrected cases and gets the next version.

Like pretraining, every random draw is a function of ``(seed, step, sample)``, so a resumed run
continues exactly where the checkpoint was taken.

A step with a non-finite loss or gradient changes nothing and is counted (``finite_steps``);
weights that are not finite are never saved, and ``metrics.jsonl`` stays strict JSON. The model
package is replaced whole (``write_package``), after ``best.pt``: a kill between the two leaves
``last.pt`` from before that step, so a resumed run passes it again and rewrites both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss

from ..checkpoints.files import atomic_path, load_checkpoint, require_finite, save_checkpoint
from ..data.patches import augment_patch, draw_patch, foreground_sample
from ..data.sources import MAX_LABEL_VALUE, case_name, dataset_label_names, list_labelled_cases
from ..data.store import is_store
from ..data.volumes import Preprocessing, check_declared_size, preprocess_pair, read_label_map, read_volume
from ..errors import VocoInputError, first_line
from ..inference.sliding_window import SlidingWindowPredictor
from ..jobs.progress import finite_or_none
from ..jobs.signals import StopRequest
from ..models.segmentation import build_segmentation_network
from ..presets import MAX_PATCH_EDGE, parse_triple
from ..registry.package import Label, ModelCard, ModelPackage, Preprocessing as CardPreprocessing, default_labels, write_package
from .distributed import choose_device
from .finetune_store import FinetuneSteps, LabelledStore
from .finite_steps import NonFiniteSteps
from .saved_config import read_saved_config
from .schedules import build_optimizer
from .store_steps import stream_steps

LAST_NAME, BEST_NAME, METRICS_NAME, PACKAGE_DIR = "last.pt", "best.pt", "metrics.jsonl", "model"
FORMAT = "voco-finetune"
DEFAULT_SPACING = (1.5, 1.5, 1.5)  # the published VoCo downstream protocol
DEFAULT_PATCH = {"swinunetr-tiny": 64}  # others: the published 96
MAX_CLASSES = 255  # a case's network classes are stored as uint8


@dataclass
class FinetuneConfig:
    data: str
    out: str
    init: str | None = None
    architecture: str | None = None  # None: that of --init, else swinunetr-tiny
    steps: int = 1000
    batch_size: int = 2
    patch_size: int | None = None
    spacing: tuple[float, float, float] | None = None  # None: --init's model card, else 1.5 mm
    modality: str = "auto"
    lr: float = 3e-4
    val_every: int = 100
    checkpoint_every: int = 100
    val_cases: int | None = None  # None: one case in five (at least one when there are two or more)
    # An explicit split by case name (voco evaluate): when either is given, --val-cases and the seed's
    # draw are not used; the one not given is every other case.
    train_case_names: list[str] | None = None
    val_case_names: list[str] | None = None
    name: str | None = None
    seed: int = 0
    positive_fraction: float = 0.5
    warmup_steps: int = 50

    def validate(self) -> None:
        for name in ("steps", "batch_size", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise VocoInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise VocoInputError(f"--lr must be positive and finite, got {self.lr}")
        if self.patch_size is not None and (self.patch_size < 32 or self.patch_size % 32):
            raise VocoInputError(f"--patch-size must be a multiple of 32, got {self.patch_size}")
        if self.patch_size is not None and self.patch_size > MAX_PATCH_EDGE:
            raise VocoInputError(f"--patch-size must be at most {MAX_PATCH_EDGE}, got {self.patch_size}")
        if self.val_cases is not None and self.val_cases < 0:
            raise VocoInputError(f"--val-cases must be 0 or more, got {self.val_cases}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(eq=False)
class Case:
    name: str
    image: torch.Tensor  # float32 (1, X, Y, Z), preprocessed
    classes: torch.Tensor  # uint8 (1, X, Y, Z): network class per voxel
    foreground: torch.Tensor  # (N, 3) voxel indices with a foreground class (a sample of them)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])

    def whole(self, lookup=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image, self.classes


class Finetuner:
    def __init__(self, config: FinetuneConfig, reporter, device: str = "auto", resume: bool = False,
                 case_cache: dict | None = None, workers: int = 0):
        """``case_cache``: preprocessed cases kept between runs on the same data (voco evaluate);
        ``workers``: DataLoader processes reading a store's patches ahead (0: this process)."""
        config.validate()
        self.config, self.reporter = config, reporter
        self.run_dir = Path(config.out)
        self.device = choose_device(device)
        self.workers, self._streamed = workers, None
        state = self._resume_state() if resume else None
        self.store = LabelledStore(config.data) if is_store(config.data) else None
        pairs = None if self.store else list_labelled_cases(config.data)

        init_package, init_weights = (None, None) if resume else self._init_weights()
        card = init_package.card if init_package else None
        self.architecture = config.architecture = (config.architecture or (init_weights.architecture if init_weights else None)
                                                   or "swinunetr-tiny")
        if init_weights and init_weights.architecture and init_weights.architecture != self.architecture:
            raise VocoInputError(f"--init holds a {init_weights.architecture} network, not {self.architecture}", config.init)
        config.patch_size = config.patch_size or (card.preprocessing.patch_size[0] if card else None) or \
            DEFAULT_PATCH.get(self.architecture, 96)
        config.spacing = tuple(config.spacing or (card.preprocessing.spacing if card else None)
                               or (self.store.spacing if self.store else DEFAULT_SPACING))
        if config.modality == "auto" and card:
            config.modality = card.preprocessing.modality

        if self.store:
            self.store.check(config.spacing, config.patch_size, config.modality)
            for entry in self.store.store.skipped:
                reporter.emit("warning", message=f"not in the store: {entry['reason']}", file=entry["source"])
        self.labels = self._labels(pairs, card, state)
        self.lookup = np.zeros(max(label.value for label in self.labels) + 1, dtype=np.uint8)
        for index, label in enumerate(self.labels, start=1):
            self.lookup[label.value] = index
        if self.store:
            self.store.require_named(self.labels)
            self.cases, self.modality = self.store.cases, self.store.modality
        else:
            self.cases = self._cached_cases(pairs, case_cache)
        self.train_cases, self.val_cases, self.val_on_training = self._split(self.cases)

        torch.manual_seed(config.seed)
        self.network = build_segmentation_network(self.architecture, 1, len(self.labels) + 1).to(self.device)
        if init_weights is not None:
            from ..checkpoints.layouts import load_weights

            report = load_weights(self.network, init_weights, self.architecture)
            reporter.emit("init", path=str(init_weights.path), layout=init_weights.layout, **report.to_dict())
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        # weight decay 1e-5: the official fine-tuning scripts' --reg_weight
        self.optimizer, self.scheduler = build_optimizer("adamw", self.network.parameters(), config.lr,
                                                         config.steps, config.warmup_steps, weight_decay=1e-5)
        self.use_amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.step, self.best = 0, {"mean": -1.0, "step": 0, "dice": {}}
        self.non_finite = NonFiniteSteps(reporter, self.run_dir)
        self.parent = ({"name": card.name, "version": card.version} if card else None)
        if state is not None:
            self._load_state(state)

    # --- data ---------------------------------------------------------------------------
    def _init_weights(self):
        if not self.config.init:
            return None, None
        from ..checkpoints.layouts import read_weights
        from ..registry.package import read_package
        from ..registry.registry import resolve_weights

        path = resolve_weights(self.config.init, self.reporter)
        package = read_package(path, verify=True) if Path(path).is_dir() else None  # as segment checks it
        return package, read_weights(path)

    def _labels(self, pairs, card: ModelCard | None, state) -> list[Label]:
        """Network classes 1..K in order: those of the starting model first (so a clinician's
        next version keeps its label order), then any new values of the data."""
        if state is not None:
            return [Label(**label) for label in state["labels"]]
        if self.store:
            names, values = self.store.label_names, set(self.store.label_values)
        else:
            names, values = dataset_label_names(self.config.data), set()
            for _, label_path in pairs:
                values |= set(_label_values(label_path).astype(int).tolist())
        values.discard(0)
        if not values:  # judged on the label maps alone: dataset.json names every label, present or not
            raise VocoInputError("the label maps hold no foreground (only 0)", self.config.data)
        values |= set(names)
        labels = list(card.labels) if card else []
        known = {label.value for label in labels}
        labels += default_labels(sorted(values - known), names)
        if len(labels) > MAX_CLASSES:
            raise VocoInputError(f"{len(labels)} labels; at most {MAX_CLASSES} are supported", self.config.data)
        return labels

    def _cached_cases(self, pairs, cache: dict | None) -> list[Case]:
        """The cases preprocessed as this run needs them; a run on the same files, labels and
        preprocessing takes those of an earlier one from ``cache`` (training never changes them)."""
        config = self.config
        key = (tuple(map(str, pairs)), tuple(label.value for label in self.labels), tuple(config.spacing),
               config.patch_size, config.modality)
        if cache is not None and key in cache:
            cases, self.modality = cache[key]
            return cases
        cases = self._load_cases(pairs)
        if cache is not None:
            cache[key] = cases, self.modality
        return cases

    def _load_cases(self, pairs) -> list[Case]:
        config, lookup = self.config, self.lookup
        cases, modality = [], config.modality
        for image_path, label_path in pairs:
            image = read_volume(image_path)
            label = read_label_map(label_path, image)
            if label.max() >= len(lookup):
                raise VocoInputError(f"has label value {int(label.max())}, which the model's labels do not name",
                                     label_path)
            options = Preprocessing(modality=modality, spacing=config.spacing, pad_to=(config.patch_size,) * 3)
            image, label, _, resolved = preprocess_pair(image, label, options)
            modality = resolved if modality == "auto" else modality  # every case scaled like the first
            classes = torch.from_numpy(lookup[label.numpy()])
            cases.append(Case(case_name(image_path), image, classes, foreground_sample(classes[0])))
        self.modality = modality
        return cases

    def _split(self, cases):
        if self.config.train_case_names is not None or self.config.val_case_names is not None:
            return self._split_by_name(cases)
        count = self.config.val_cases
        if count is None:
            count = max(1, len(cases) // 5) if len(cases) >= 2 else 0
        if count >= len(cases):
            raise VocoInputError(f"--val-cases {count} leaves no training case (the dataset has {len(cases)})")
        order = np.random.default_rng(self.config.seed).permutation(len(cases))
        val = [cases[i] for i in sorted(order[:count])]
        train = [cases[i] for i in sorted(order[count:])]
        if not val:
            self.reporter.emit("warning", message="only one labelled case: validating on the training case "
                                                  "(the Dice it reports is not a held-out measure)")
        return train, val or train, not val

    def _split_by_name(self, cases):
        names = [case.name for case in cases]
        check_unique_case_names(names, self.config.data)
        chosen = {}
        for kind in ("train", "val"):
            given = getattr(self.config, f"{kind}_case_names")
            unknown = sorted(set(given or ()) - set(names))
            if unknown:
                raise VocoInputError(f"no case named {unknown[0]!r} (the dataset has {', '.join(names)})",
                                     self.config.data)
            chosen[kind] = set(given) if given is not None else None
        train_names = chosen["train"] if chosen["train"] is not None else set(names) - chosen["val"]
        val_names = chosen["val"] if chosen["val"] is not None else set(names) - chosen["train"]
        train = [case for case in cases if case.name in train_names]  # dataset order: as the seed draws them
        val = [case for case in cases if case.name in val_names]
        if not train:
            raise VocoInputError("the split by case name leaves no training case", self.config.data)
        if not val:
            self.reporter.emit("warning", message="no validation case: validating on the training cases "
                                                  "(the Dice it reports is not a held-out measure)")
        return train, val or train, not val

    def sample_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and classes of ``step``'s samples, cut from the cases in memory."""
        config, edge = self.config, self.config.patch_size
        images, targets = [], []
        for index in range(config.batch_size):
            draw = draw_patch(self.train_cases, edge, config.positive_fraction, config.seed, step, index)
            case = self.train_cases[draw.case]
            region = (slice(None), *(slice(s, s + edge) for s in draw.start))
            image, target = augment_patch(case.image[region], case.classes[region], draw)
            images.append(image)
            targets.append(target)
        return torch.stack(images).to(self.device), torch.stack(targets).to(self.device)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current step's batch: from the cases in memory, or as DataLoader workers read it
        ahead from the store (the same draws; the iterator starts at the first step asked for)."""
        if self.store is None:
            return self.sample_batch(self.step)
        if self._streamed is None:
            config = self.config
            steps = FinetuneSteps(self.train_cases, self.lookup, config.patch_size, config.positive_fraction,
                                  config.seed, config.batch_size)
            self._streamed = stream_steps(steps, self.step, config.steps, self.workers, self.device)
        images, targets = next(self._streamed)
        return images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    # --- training -----------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        self.network.train()
        images, targets = self.next_batch()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            loss = self.loss(self.network(images), targets.long())
        grad_norm = float("nan")
        finite = bool(torch.isfinite(loss.detach()))
        if finite:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0))
            # Under AMP the scaler itself skips a step with overflowing gradients and lowers its scale.
            finite = self.use_amp or np.isfinite(grad_norm)
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.non_finite.count(self.step + 1, finite)
        return {"loss": loss.item(), "grad_norm": grad_norm}

    def validate(self) -> dict:
        """Dice per label over the validation cases (a label absent from both prediction and
        reference in a case does not count for that case)."""
        self.network.eval()
        predictor = SlidingWindowPredictor(self.network, (self.config.patch_size,) * 3, self.device, overlap=0.25,
                                           batch_size=4 if self.device.type == "cuda" else 1)
        per_label = {label.name: [] for label in self.labels}
        for case in self.val_cases:
            image, classes = case.whole(self.lookup)
            predicted = predictor.predict(image, len(self.labels) + 1).argmax(0).cpu()
            reference = classes[0]
            for index, label in enumerate(self.labels, start=1):
                p, r = predicted == index, reference == index
                total = int(p.sum() + r.sum())
                if total:
                    per_label[label.name].append(2.0 * int((p & r).sum()) / total)
        dice = {name: float(np.mean(values)) if values else None for name, values in per_label.items()}
        scored = [v for v in dice.values() if v is not None]
        return {"dice": dice, "mean": float(np.mean(scored)) if scored else 0.0}

    def run(self) -> int:
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.run_dir / "config.json") as tmp:
            tmp.write_text(json.dumps(config.to_dict(), indent=2))
        self.reporter.emit("start", step=self.step, total=config.steps, run_dir=str(self.run_dir),
                           architecture=self.architecture, device=str(self.device), train_cases=len(self.train_cases),
                           val_cases=len(self.val_cases), labels=[label.name for label in self.labels],
                           spacing=list(config.spacing), patch_size=config.patch_size, modality=self.modality)
        started, first_step = time.perf_counter(), self.step
        with StopRequest() as stop, open(self.run_dir / METRICS_NAME, "a") as metrics:
            try:
                while self.step < config.steps:
                    values = self.train_step()
                    self.step += 1
                    per_step = (time.perf_counter() - started) / (self.step - first_step)
                    record = {"step": self.step, "total": config.steps, **values, "lr": self.optimizer.param_groups[0]["lr"],
                              "samples_per_s": config.batch_size / per_step, "eta_s": per_step * (config.steps - self.step)}
                    self.reporter.emit("step", **record)
                    if self.step % config.val_every == 0 or self.step == config.steps:
                        result = self.validate()
                        self.reporter.emit("val_dice", step=self.step, dice=result["dice"], mean=result["mean"],
                                           on_training_data=self.val_on_training)
                        record.update(val_dice=result["dice"], val_mean=result["mean"])
                        if result["mean"] > self.best["mean"]:
                            self.best = {"mean": result["mean"], "step": self.step, "dice": result["dice"]}
                            self.save_best()
                    metrics.write(json.dumps({k: finite_or_none(v) for k, v in record.items()}) + "\n")
                    metrics.flush()
                    if stop.signal or self.step % config.checkpoint_every == 0 or self.step == config.steps:
                        self.save_last()
                    if stop.signal:
                        self.reporter.emit("stopped", step=self.step, checkpoint=str(self.run_dir / LAST_NAME))
                        return 128 + stop.signal
            finally:
                self._streamed = None  # a store's DataLoader workers end with the run
        self.reporter.emit("done", step=self.step, best_step=self.best["step"], best_mean_dice=self.best["mean"],
                           model=str(self.run_dir / PACKAGE_DIR))
        return 0

    # --- checkpoints and the model package ----------------------------------------------------
    def save_last(self) -> None:
        state = {
            "format": FORMAT, "format_version": 1, "step": self.step, "config": self.config.to_dict(),
            "architecture": self.architecture, "labels": [dataclasses.asdict(label) for label in self.labels],
            "modality": self.modality, "best": self.best, "parent": self.parent,
            "network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        require_finite(state["network"], self.run_dir / LAST_NAME)
        save_checkpoint(state, self.run_dir / LAST_NAME)
        self.reporter.emit("checkpoint", step=self.step, path=str(self.run_dir / LAST_NAME))

    def save_best(self) -> ModelPackage:
        """``best.pt`` (weights + the Dice that earned them) and the model package built from it."""
        weights = {k: v.detach().cpu() for k, v in self.network.state_dict().items()}
        require_finite(weights, self.run_dir / BEST_NAME)
        save_checkpoint({"format": FORMAT + "-best", "step": self.step, "architecture": self.architecture,
                         "best": self.best, "network": weights}, self.run_dir / BEST_NAME)
        return write_package(self.run_dir / PACKAGE_DIR, self.card(), weights)

    def card(self) -> ModelCard:
        config = self.config
        name = config.name or self.run_dir.resolve().name
        version = "1"
        if self.parent and self.parent["name"] == name:
            from ..registry.registry import installed_models

            taken = [record["version"] for record in installed_models() if record["name"] == name]
            version = next_version(self.parent["version"], taken)
        metrics = {"val_dice": self.best["dice"], "mean_val_dice": self.best["mean"], "step": self.best["step"],
                   "val_cases": [case.name for case in self.val_cases], "on_training_data": self.val_on_training}
        return ModelCard(
            name=name, version=version, architecture=self.architecture, in_channels=1, labels=self.labels,
            preprocessing=CardPreprocessing(modality=self.modality, spacing=tuple(config.spacing),
                                            patch_size=(config.patch_size,) * 3),
            description=f"fine-tuned by voco finetune on {config.data}", metrics=metrics,
            training={"data": config.data, "init": config.init, "steps": config.steps, "parent": self.parent,
                      "train_cases": [case.name for case in self.train_cases]})

    def _resume_state(self) -> dict:
        path = self.run_dir / LAST_NAME
        if not path.is_file():
            raise VocoInputError(f"--resume: no {LAST_NAME} to resume from", self.run_dir)
        state = load_checkpoint(path)
        if state.get("format") != FORMAT:
            raise VocoInputError("--resume: not a voco finetune checkpoint", path)
        if state["step"] > self.config.steps:
            raise VocoInputError(f"--resume: the checkpoint is at step {state['step']}, beyond --steps {self.config.steps}")
        return state

    def _load_state(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        self.step, self.best, self.parent = state["step"], state["best"], state["parent"]


def _label_values(path: Path) -> np.ndarray:
    from monai.transforms import LoadImage

    check_declared_size(path)
    try:
        values = np.unique(LoadImage(image_only=True)(str(path)).numpy())
    except Exception as error:
        raise VocoInputError(f"cannot be read as a label map: {first_line(error)}", path) from None
    if not np.isfinite(values).all() or (values < 0).any() or (values != values.round()).any() \
            or values.max(initial=0) > MAX_LABEL_VALUE:
        raise VocoInputError(f"is not a label map: values must be non-negative whole numbers up to {MAX_LABEL_VALUE}",
                             path)
    return values


def next_version(parent: str, taken) -> str:
    """The clinician loop's next model version: 3 after 2, 2 after a published 1.0, and after a
    roll-back from 3 to 1 it is 4, not 2: the versions kept (``taken``) are never overwritten."""
    majors = [int(str(v).split(".")[0]) for v in [parent, *taken] if str(v).split(".")[0].isdigit()]
    return str(max(majors, default=0) + 1)


def check_unique_case_names(names: list[str], data) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise VocoInputError(f"two cases are named {name!r}: a split by case name needs unique names", data)
        seen.add(name)


def finetune(config: FinetuneConfig, reporter, device: str = "auto", resume: bool = False,
             case_cache: dict | None = None, workers: int = 0) -> int:
    return Finetuner(config, reporter, device, resume, case_cache, workers).run()


def resumable_config(run_dir, given: dict) -> FinetuneConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise VocoInputError(f"--resume: no run to resume (config.json and {LAST_NAME} are missing)", run_dir)
    values = read_saved_config(path, FinetuneConfig, "finetune")
    values["spacing"] = tuple(values["spacing"]) if values.get("spacing") else None
    config = FinetuneConfig(**values)
    for name in ("steps", "val_every", "checkpoint_every", "out"):
        if name in given:
            setattr(config, name, given[name])
    return config


def finetune_from_args(args, reporter, workers: int = 0) -> int:
    given = {k: v for k, v in vars(args).items() if v is not None}
    if args.resume:
        config = resumable_config(args.out, given)
    else:
        if not args.data:
            raise VocoInputError("voco finetune: --data is required (dataset.json or a folder with imagesTr/ + labelsTr/)")
        config = FinetuneConfig(data=args.data, out=args.out, init=args.init, architecture=args.backbone)
        if args.spacing:
            config.spacing = parse_triple(args.spacing, float, "--spacing")
        for name in ("steps", "batch_size", "patch_size", "modality", "lr", "val_every", "checkpoint_every",
                     "val_cases", "name", "seed"):
            if name in given:
                setattr(config, name, given[name])
    return finetune(config, reporter, device=args.device, resume=args.resume, workers=workers)
