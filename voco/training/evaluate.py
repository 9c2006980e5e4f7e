"""``voco evaluate``: the transfer experiment. Does an initialisation (VoCo pretraining, a model,
none) make the segmentation network better at the same fine-tuning budget?

Every initialisation fine-tunes the same network with the same budget (steps, batch, patch,
spacing, learning rate), the same data order and the same seeds: run ``(init, fraction, seed)``
is a plain ``voco finetune`` run whose every random draw is a function of ``(seed, step, sample)``
and whose network is built after ``torch.manual_seed(seed)``, so two initialisations differ in
their starting weights and in nothing else. It trains on a labelled subset and is scored on test
cases it never trained on:

- Test cases: ``test_cases``, else the fifth of the cases that ``voco finetune`` holds out for
  validation with seed 0 (at least one). They are never trained on, at any fraction.
- Training subset of ``(seed, fraction)``: the first ``ceil(fraction * n)`` of a permutation of the
  ``n`` other cases drawn from the seed; nested across fractions, the same for every initialisation.
- Learning curve: the run validates on the test cases every ``val_every`` steps (test Dice vs step).
- Score: Dice per label of the *final-step* model on the test cases (at the training spacing, as
  ``voco finetune`` validates), not of ``best.pt``: choosing the step by its test Dice would bias
  the score upwards.

Writes into ``out``: ``config.json`` (the settings; a re-run with other settings is refused),
``runs/<init>/f<fraction>/seed<k>/`` (the fine-tuning runs), ``results/<init>/f<fraction>/seed<k>.json``
(a finished run's score, written once), ``evaluation.json`` (rewritten after every finished run) and
``evaluation.png``. Re-running the same command continues: finished runs are not redone, an
unfinished one resumes from its ``last.pt``.

Under ``torchrun --nproc-per-node K`` rank r takes runs r, r + K, ... (each on ``cuda:LOCAL_RANK``
or the CPU); rank 0 writes ``evaluation.json`` and the figure once every rank has finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch.distributed as dist

from ..checkpoints.files import atomic_path, remove_stale_temporaries
from ..data.sources import case_name, list_labelled_cases
from ..errors import VocoInputError
from ..jobs.signals import StopRequest
from ..presets import parse_triple
from .distributed import choose_device, shutdown
from .finetune import (DEFAULT_PATCH, DEFAULT_SPACING, LAST_NAME, METRICS_NAME, FinetuneConfig,
                       check_unique_case_names, finetune)

SCRATCH = "scratch"
CONFIG_NAME, EVALUATION_NAME, FIGURE_NAME = "config.json", "evaluation.json", "evaluation.png"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SCORE_NOTE = ("Dice per label of the final-step model on the test cases (never trained on), at the training "
              "spacing; mean_dice is the mean over the labels present")
STD_NOTE = "sample standard deviation over seeds (n - 1 in the denominator); 0 for a single seed"


@dataclass
class EvaluateConfig:
    data: str
    out: str
    inits: list[str]  # "scratch" (random initialisation) or [LABEL=]CHECKPOINT|PACKAGE|REGISTRY-NAME
    seeds: int = 3
    steps: int = 200
    fractions: list[float] = field(default_factory=lambda: [1.0])
    test_cases: list[str] | None = None  # None: the fifth voco finetune holds out with seed 0
    architecture: str | None = None  # None: that of the first --init that has one, else swinunetr-tiny
    batch_size: int = 2
    patch_size: int | None = None
    spacing: tuple[float, float, float] | None = None
    modality: str = "auto"
    lr: float = 3e-4
    val_every: int = 50

    def validate(self) -> None:
        if not self.inits:
            raise VocoInputError("voco evaluate: give at least one --init (scratch, a checkpoint, a package or a name)")
        for name in ("seeds", "steps", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise VocoInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.fractions:
            raise VocoInputError("--fractions needs at least one fraction")
        for fraction in self.fractions:
            if not 0 < fraction <= 1:
                raise VocoInputError(f"--fractions must lie in (0, 1], got {fraction:g}")
        if len({fraction_name(f) for f in self.fractions}) < len(self.fractions):
            raise VocoInputError(f"--fractions has a fraction twice: {','.join(map(fraction_name, self.fractions))}")
        if self.test_cases is not None and len(set(self.test_cases)) < len(self.test_cases):
            raise VocoInputError(f"--test-cases names a case twice: {','.join(self.test_cases)}")
        # The fine-tuning options, checked as voco finetune checks them (before any download).
        FinetuneConfig(self.data, self.out, steps=self.steps, batch_size=self.batch_size, patch_size=self.patch_size,
                       lr=self.lr, val_every=self.val_every).validate()

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # as config.json holds it: lists, not tuples


@dataclass(frozen=True)
class Initialisation:
    label: str  # names the run folders and the summary keys
    source: str | None  # None: random initialisation


@dataclass(eq=False)
class Run:
    init: Initialisation
    fraction: float
    seed: int
    train_cases: list[str]
    finetune: FinetuneConfig

    @property
    def key(self) -> str:
        return f"{self.init.label}/f{fraction_name(self.fraction)}/seed{self.seed}"


@dataclass
class Plan:
    config: EvaluateConfig
    inits: list[Initialisation]
    test_cases: list[str]
    train_pool: list[str]
    runs: list[Run]

    @property
    def budget(self) -> dict:
        tuning = self.runs[0].finetune
        return {"steps": tuning.steps, "batch_size": tuning.batch_size, "patch_size": tuning.patch_size,
                "spacing": list(tuning.spacing), "modality": tuning.modality, "lr": tuning.lr,
                "architecture": tuning.architecture, "val_every": tuning.val_every}


def fraction_name(fraction: float) -> str:
    return f"{fraction:g}"


def summary_key(label: str, fraction: float) -> str:
    return label if fraction == 1 else f"{label}@{fraction_name(fraction)}"


# --- the plan -----------------------------------------------------------------------------------

def parse_init(text: str) -> Initialisation:
    """``scratch``, ``LABEL=SOURCE`` or ``SOURCE`` (labelled by its file or folder name)."""
    if text == SCRATCH:
        return Initialisation(SCRATCH, None)
    if not text.strip():
        raise VocoInputError("--init must not be empty: give scratch, a checkpoint, a model package or a name")
    label, _, source = text.partition("=")
    if not source or Path(text).exists() or not _LABEL.fullmatch(label):
        path = Path(text)
        label = path.name.removesuffix(next((s for s in _WEIGHT_SUFFIXES if path.name.endswith(s)), ""))
        label, source = re.sub(r"[^A-Za-z0-9._-]+", "-", label).lstrip("._-") or "init", text
    if label == SCRATCH and source != SCRATCH:
        raise VocoInputError(f"--init {text!r}: the label {SCRATCH!r} is kept for the random initialisation")
    return Initialisation(label, None if source == SCRATCH else source)


def parse_inits(texts: list[str]) -> list[Initialisation]:
    """The initialisations to compare: each source once, each label once."""
    inits = [parse_init(text) for text in texts]
    for index, init in enumerate(inits):
        earlier = inits[:index]
        if init.source in [other.source for other in earlier]:
            raise VocoInputError(f"--init {texts[index]!r} is given twice: the same weights would give the same runs")
        if init.label in [other.label for other in earlier]:
            raise VocoInputError(f"--init {texts[index]!r}: another --init is also labelled {init.label!r}; "
                                 "name them with LABEL=PATH")
    return inits


def _starting_points(inits: list[Initialisation], reporter) -> dict[str, tuple]:
    """For each initialisation with a source: (architecture, model card or None). Unknown or
    unreadable ones are refused here, before any run starts."""
    from ..checkpoints.layouts import read_weights
    from ..registry.package import read_package
    from ..registry.registry import resolve_weights

    found = {}
    for init in inits:
        if init.source is not None:
            path = resolve_weights(init.source, reporter)
            card = read_package(path, verify=True).card if Path(path).is_dir() else None
            found[init.label] = (read_weights(path).architecture, card)
    return found


def default_test_cases(names: list[str]) -> list[str]:
    """One case in five (at least one), as ``voco finetune`` holds out for validation with seed 0."""
    count = max(1, len(names) // 5)
    chosen = set(np.random.default_rng(0).permutation(len(names))[:count].tolist())
    return [name for index, name in enumerate(names) if index in chosen]


def training_subset(pool: list[str], seed: int, fraction: float) -> list[str]:
    """The first ceil(fraction * n) of the seed's permutation of the pool, in the pool's order:
    nested across fractions (a smaller fraction takes a prefix of the same permutation)."""
    count = max(1, math.ceil(round(fraction * len(pool), 9)))
    chosen = set(np.random.default_rng(seed).permutation(len(pool))[:count].tolist())
    return [name for index, name in enumerate(pool) if index in chosen]


def make_plan(config: EvaluateConfig, reporter) -> Plan:
    config.validate()
    inits = parse_inits(config.inits)
    names = [case_name(image) for image, _ in list_labelled_cases(config.data)]
    check_unique_case_names(names, config.data)
    test_cases = _test_cases(config, names)
    pool = [name for name in names if name not in test_cases]
    if not pool:
        raise VocoInputError(f"holding out {len(test_cases)} test case(s) leaves no training case "
                             f"(the dataset has {len(names)})", config.data)
    starts = _starting_points(inits, reporter)
    architecture = _architecture(config, inits, starts)
    cards = [card for _, card in starts.values() if card is not None]
    # A model package would preprocess with its own card's values; every run gets the same ones.
    modality = cards[0].preprocessing.modality if config.modality == "auto" and cards else config.modality
    runs = []
    for fraction in config.fractions:
        for seed in range(config.seeds):
            subset = training_subset(pool, seed, fraction)
            for init in inits:
                run_dir = Path(config.out) / "runs" / init.label / f"f{fraction_name(fraction)}" / f"seed{seed}"
                tuning = FinetuneConfig(
                    data=config.data, out=str(run_dir), init=init.source, architecture=architecture,
                    steps=config.steps, batch_size=config.batch_size,
                    patch_size=config.patch_size or DEFAULT_PATCH.get(architecture, 96),
                    spacing=tuple(config.spacing or DEFAULT_SPACING), modality=modality, lr=config.lr,
                    val_every=config.val_every, checkpoint_every=config.val_every, seed=seed,
                    train_case_names=subset, val_case_names=list(test_cases),
                    name=f"evaluate-{init.label}-f{fraction_name(fraction)}-seed{seed}")
                runs.append(Run(init, fraction, seed, subset, tuning))
    return Plan(config, inits, test_cases, pool, runs)


def _test_cases(config: EvaluateConfig, names: list[str]) -> list[str]:
    if config.test_cases is None:
        return default_test_cases(names)
    unknown = [name for name in config.test_cases if name not in names]
    if unknown:
        raise VocoInputError(f"--test-cases: no case named {unknown[0]!r} (the dataset has {', '.join(names)})",
                             config.data)
    return [name for name in names if name in config.test_cases]


def _architecture(config: EvaluateConfig, inits: list[Initialisation], starts: dict) -> str:
    architecture = config.architecture or next(
        (starts[i.label][0] for i in inits if i.label in starts and starts[i.label][0]), None) or "swinunetr-tiny"
    for init in inits:
        found = starts.get(init.label, (None,))[0]
        if found and found != architecture:
            raise VocoInputError(f"--init holds a {found} network, not {architecture}: every initialisation "
                                 "must fine-tune the same network", init.source)
    return architecture


# --- running ------------------------------------------------------------------------------------

class _RunReporter:
    """A run's fine-tuning events, each marked with the run; its ``start`` and ``done`` are renamed
    so that a reader takes only evaluate's own ``done`` for the end of the job."""

    RENAMED = {"start": "finetune_start", "done": "finetune_done"}

    def __init__(self, reporter, run: Run):
        self.reporter, self.run = reporter, run.key

    def emit(self, event: str, **fields) -> None:
        self.reporter.emit(self.RENAMED.get(event, event), run=self.run, **fields)


def result_path(out, run: Run) -> Path:
    return Path(out) / "results" / run.init.label / f"f{fraction_name(run.fraction)}" / f"seed{run.seed}.json"


def evaluate(config: EvaluateConfig, reporter, device: str = "auto") -> int:
    """Run (or continue) the experiment; 0 when every run is scored, 128 + signal when stopped."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    chosen = choose_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    created = world > 1 and not dist.is_initialized()
    if created:
        # gloo also between GPU processes: the ranks only wait for each other (no tensor travels),
        # and a rank may wait for hours while the others finish their runs.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        return _evaluate(config, reporter, str(chosen), rank, world)
    finally:
        if created:
            shutdown()


def _evaluate(config: EvaluateConfig, reporter, device: str, rank: int, world: int) -> int:
    from ..jobs.run_lock import run_lock

    with run_lock(config.out, rank=rank):
        if rank == 0:  # first, alone: a registry name is downloaded once
            plan = make_plan(config, reporter)
            _check_saved_config(config)
        _barrier(world)
        if rank != 0:
            plan = make_plan(config, reporter)
        reporter.emit("plan", runs=len(plan.runs), inits=[init.label for init in plan.inits],
                      fractions=config.fractions, seeds=config.seeds, test_cases=plan.test_cases,
                      train_pool=plan.train_pool, budget=plan.budget, world_size=world, out=config.out)
        code = _run_share(plan, reporter, device, rank, world)
        _barrier(world)
        if rank != 0:
            return code
        evaluation = write_evaluation(plan)
        if code:
            return code
        from ..figures import plot_evaluation

        figure = Path(config.out) / FIGURE_NAME
        plot_evaluation(evaluation, figure)
        reporter.emit("done", evaluation=str(Path(config.out) / EVALUATION_NAME), figure=str(figure),
                      summary=evaluation["summary"])
        return 0


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _check_saved_config(config: EvaluateConfig) -> None:
    """Write the settings, or refuse other settings than those saved (paths compared as the files
    they name: the same folder or dataset may be named another way)."""
    path = Path(config.out) / CONFIG_NAME
    given = config.to_dict()
    if not path.is_file():
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(given, indent=2))
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise VocoInputError(f"{CONFIG_NAME} is not the configuration of a voco evaluate run; choose another --out",
                             config.out)
    ours, theirs = _comparable(given), _comparable(saved)
    changed = next((k for k in ours if theirs.get(k) != ours[k]), None)
    if changed:
        raise VocoInputError(f"holds an evaluation with other settings ({changed}: {json.dumps(saved.get(changed))[:60]} "
                             f"there, {json.dumps(given[changed])[:60]} now); repeat its command to continue it, "
                             "or choose another --out", config.out)


def _comparable(values: dict) -> dict:
    def where(text):
        return str(Path(text).resolve()) if isinstance(text, str) and Path(text).exists() else text

    inits = values.get("inits")
    if isinstance(inits, list) and all(isinstance(text, str) and text.strip() for text in inits):
        inits = [(init.label, where(init.source)) for init in map(parse_init, inits)]
    return {**values, "out": None, "data": where(values.get("data")), "inits": inits}


def _run_share(plan: Plan, reporter, device: str, rank: int, world: int) -> int:
    """This rank's runs (r, r + K, ...), one after the other; rank 0 rewrites evaluation.json after each."""
    total, case_cache = len(plan.runs), {}
    with StopRequest() as stop:
        for index in range(rank, total, world):
            run = plan.runs[index]
            info = {"run": run.key, "index": index + 1, "total": total, "init": run.init.label,
                    "fraction": run.fraction, "seed": run.seed}
            path = result_path(plan.config.out, run)
            if path.is_file():
                result = json.loads(path.read_text())
                reporter.emit("run_done", **info, dice=result["dice"], mean_dice=result["mean_dice"], reused=True)
                continue
            run_dir = Path(run.finetune.out)
            resume = (run_dir / LAST_NAME).is_file()
            if run_dir.is_dir():
                remove_stale_temporaries(run_dir)  # this rank is the run folder's only writer
            reporter.emit("run_start", **info, train_cases=run.train_cases, resume=resume)
            code = finetune(dataclasses.replace(run.finetune), _RunReporter(reporter, run), device=device,
                            resume=resume, case_cache=case_cache)
            if code:
                return code
            result = score(run)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(result, indent=1))
            reporter.emit("run_done", **info, dice=result["dice"], mean_dice=result["mean_dice"], reused=False)
            if rank == 0:
                write_evaluation(plan)
            if stop.signal:
                return 128 + stop.signal
    return 0


def score(run: Run) -> dict:
    """A finished run's result, from its metrics.jsonl: the final step's test Dice, the learning curve."""
    from ..figures import read_metrics

    records = read_metrics(Path(run.finetune.out) / METRICS_NAME)
    final = records[-1]
    if final["step"] != run.finetune.steps or "val_mean" not in final:
        raise VocoInputError(f"run {run.key} ended at step {final['step']} without its final validation",
                             run.finetune.out)
    validated = [r for r in records if "val_mean" in r]
    return {"init": run.init.label, "init_source": run.init.source, "seed": run.seed, "fraction": run.fraction,
            "steps": run.finetune.steps, "dice": final["val_dice"], "mean_dice": final["val_mean"],
            "train_cases": run.train_cases, "run_dir": f"runs/{run.key}",
            "learning_curve": {"step": [r["step"] for r in validated], "mean_dice": [r["val_mean"] for r in validated]},
            "train_loss": [r["loss"] for r in records]}


# --- the summary --------------------------------------------------------------------------------

def write_evaluation(plan: Plan) -> dict:
    """``evaluation.json`` from the results written so far (in the plan's order)."""
    out = Path(plan.config.out)
    results = [json.loads(path.read_text()) for path in (result_path(out, run) for run in plan.runs) if path.is_file()]
    evaluation = {
        "test_cases": plan.test_cases,
        "results": results,
        "summary": summarise(results),
        "paired_difference_to_scratch": paired_differences(results),
        "complete": len(results) == len(plan.runs),
        "runs_planned": len(plan.runs),
        "train_pool": plan.train_pool,
        "budget": plan.budget,
        "inits": {init.label: init.source for init in plan.inits},
        "score": SCORE_NOTE,
        "std": STD_NOTE,
        "config": plan.config.to_dict(),
    }
    with atomic_path(out / EVALUATION_NAME) as tmp:
        tmp.write_text(json.dumps(evaluation, indent=1))
    return evaluation


def _spread(values: list[float]) -> dict:
    values = np.asarray(values, dtype=float)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "n": int(len(values))}


def summarise(results: list[dict]) -> dict:
    """Mean, sample std and count of the mean test Dice over seeds, per initialisation and fraction."""
    groups: dict[str, list[float]] = {}
    for result in results:
        groups.setdefault(summary_key(result["init"], result["fraction"]), []).append(result["mean_dice"])
    return {key: _spread(values) for key, values in groups.items()}


def paired_differences(results: list[dict]) -> dict:
    """Per initialisation and fraction: the mean test Dice minus that of ``scratch`` with the same
    seed (same data order, same subset), over the seeds both have; the fairer comparison."""
    scratch = {(r["fraction"], r["seed"]): r["mean_dice"] for r in results if r["init"] == SCRATCH}
    groups: dict[str, list[float]] = {}
    for result in results:
        pair = scratch.get((result["fraction"], result["seed"]))
        if result["init"] != SCRATCH and pair is not None:
            groups.setdefault(summary_key(result["init"], result["fraction"]), []).append(result["mean_dice"] - pair)
    return {key: _spread(values) for key, values in groups.items()}


# --- the command line ---------------------------------------------------------------------------

def _fractions(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise VocoInputError(f"--fractions must be numbers separated by commas, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise VocoInputError(f"--fractions must lie in (0, 1], got {text!r}")
    return values


def evaluate_from_args(args, reporter) -> int:
    config = EvaluateConfig(data=args.data, out=args.out, inits=list(args.init), seeds=args.seeds, steps=args.steps,
                            architecture=args.backbone)
    if args.fractions is not None:
        config.fractions = _fractions(args.fractions)
    if args.test_cases is not None:
        config.test_cases = [name.strip() for name in args.test_cases.split(",") if name.strip()]
    if args.spacing:
        config.spacing = parse_triple(args.spacing, float, "--spacing")
    for name in ("batch_size", "patch_size", "modality", "lr", "val_every"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    return evaluate(config, reporter, device=args.device)
