"""A workspace of pretraining and fine-tuning runs that outlive the front end that started them.

Both modules (and VoCo Studio) keep their runs here: VoCo Pretrain's pretraining, VoCo
Segmentation's fine-tuning of the clinician's cases, the demo model. Each run is a folder
``<workspace>/<name>/``: the engine's own files (``config.json``, ``metrics.jsonl``,
``checkpoint.pt`` for pretraining; ``last.pt``, ``best.pt``, ``model/`` for fine-tuning, and its
``.lock`` while it trains) plus ours:

- ``job.json``: kind, command (and the first attempt's), PID of the process we started, start
  time, exit code once known; a resume runs only commands it holds, never what events.jsonl says;
- ``events.jsonl``: the engine's stdout itself (its progress events, appended by the engine, so
  they reach the disk whether or not anyone watches), each attempt opened by our ``launch``
  line and, when we saw it end, closed by our ``exit`` line;
- ``engine.log``: the engine's stderr.

Because the engine writes to files and not to a pipe of ours, closing Slicer (or VoCo Studio)
does not end a run: it trains on, and the next session sees it running, stopped or done.

The state comes from those files: ``running`` (the process we started is running, or the
engine holds the run's lock: this also covers a run a closed session started, and the engine
still checkpointing after the PythonSlicer launcher above it died on SIGTERM), ``done`` (the
last attempt reported ``done``), ``stopped`` (no process, and a checkpoint to resume from or a
stop asked for with ``stop``), ``failed`` (the last attempt reported an error, or ended with
nothing to resume). Events are read incrementally (``JsonLinesTail``): a poll costs the lines
written since the last one, however long the run.

Example (Slicer's Python console)::

    from VoCoCommonLib.runs import Runs
    runs = Runs("/data/voco-runs")
    run = runs.start_pretraining(["/data/ct"], preset="demo", backbone="swinunetr-tiny", steps=50)
    [(r.name, r.state, r.step, r.total) for r in runs.list_runs()]
    runs.stop(run); runs.resume(run)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import events as ev
from .process import error_from_log, start_logged
from .settings import Settings, read_settings

RUNNING, STOPPED, DONE, FAILED = "running", "stopped", "done", "failed"
PRETRAIN, FINETUNE = "pretrain", "finetune"
JOB_FILE, EVENTS_FILE, LOG_FILE, STOP_FILE, LOCK_FILE = "job.json", "events.jsonl", "engine.log", "STOP", ".lock"
CHECKPOINTS = {PRETRAIN: "checkpoint.pt", FINETUNE: "last.pt"}
STOP_FILE_VARIABLE = "VOCO_STOP_FILE"  # the engine checks for this file each step (voco/jobs/signals.py)


@dataclass
class RunInfo:
    name: str
    path: str
    kind: str                       # "pretrain" | "finetune"
    state: str                      # running | stopped | done | failed
    step: int | None = None         # last reported step
    total: int | None = None
    loss: float | None = None       # last reported total loss
    best_dice: float | None = None  # best mean validation Dice (fine-tuning)
    checkpoint: str | None = None   # the file a resume starts from, when it exists
    message: str = ""               # the last error or warning
    pid: int | None = None
    started: float | None = None
    model: str | None = None        # the model package a fine-tuning run wrote

    @property
    def resumable(self) -> bool:
        """Stopped, or ended with a checkpoint to continue from (enable the Resume button on this)."""
        return self.state == STOPPED or (self.state != RUNNING and self.checkpoint is not None)

    def to_dict(self) -> dict:
        return {**asdict(self), "resumable": self.resumable}


@dataclass
class _Summary:
    """What a run's events said so far, kept up to date from its tail."""

    tail: ev.JsonLinesTail
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    dice: list = field(default_factory=list)
    message: str = ""
    model: str | None = None
    attempt: set = field(default_factory=set)  # the kinds of event seen since the last launch line

    def add(self, events: list[dict]) -> None:
        for event in events:
            kind = event.get("event")
            if kind == ev.LAUNCH:
                self.attempt = set()
            self.attempt.add(kind)
            if kind in (ev.START, ev.STEP):
                self.step = event.get("step", self.step)
                self.total = event.get("total", self.total)
                if kind == ev.STEP and event.get("loss") is not None:
                    self.loss = event["loss"]
            elif kind == ev.VAL_DICE and event.get("mean") is not None:
                self.dice.append(event["mean"])
            elif kind == ev.DONE:
                if event.get("best_mean_dice") is not None:
                    self.dice.append(event["best_mean_dice"])
                self.model = event.get("model", self.model)
            elif kind in (ev.ERROR, ev.WARNING):
                self.message = event.get("message", "")


def read_job(run_dir) -> dict:
    try:
        return json.loads((Path(run_dir) / JOB_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_job(run_dir, job: dict) -> None:
    path = Path(run_dir) / JOB_FILE
    tmp = path.with_name(f".{JOB_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(job, indent=1))
    os.replace(tmp, path)


def engine_holds_lock(run_dir) -> bool:
    """Whether a training process holds ``<run>/.lock`` (the engine's side: voco/jobs/run_lock.py)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return False
    with open(path, "a+b") as handle:
        if sys.platform == "win32":
            import msvcrt

            handle.seek(0)
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            except OSError:
                return True
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            return False
        import fcntl

        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


class Runs:
    """Start, stop, resume and list runs in a workspace folder.

    ``start_process(command, env, stdout_path, stderr_path) -> Popen`` starts a run's process
    (default ``start_logged``; a test may start something else that writes events)."""

    _live: dict[str, object] = {}          # run folder -> Popen, shared by every Runs of this process
    _live_lock = threading.Lock()

    def __init__(self, workspace=None, settings: Settings | None = None, start_process: Callable = start_logged):
        self.settings = settings or read_settings()
        self.workspace = Path(workspace if workspace is not None else self.settings.runs_dir).expanduser().absolute()
        self.start_process = start_process
        self._summaries: dict[str, _Summary] = {}

    # --- starting ------------------------------------------------------------------------------

    def new_run_dir(self, name: str | None = None, kind: str = PRETRAIN) -> Path:
        """A new, empty run folder (``<kind>-YYYYmmdd-HHMMSS`` unless named; a suffix keeps it unique)."""
        base = name or timestamped(kind)
        if any(c in base for c in "/\\") or base in (".", ".."):
            raise ValueError(f"a run name cannot contain a path separator: {base!r}")
        self.workspace.mkdir(parents=True, exist_ok=True)
        run_dir, n = self.workspace / base, 1
        while True:
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                n += 1
                run_dir = self.workspace / f"{base}-{n}"

    def start_pretraining(self, data: Sequence, preset: str = "demo", backbone: str | None = None,
                          steps: int | None = None, name: str | None = None, run_dir=None,
                          batch_size: int | None = None, checkpoint_every: int | None = None,
                          device: str = "auto", extra_args: Sequence[str] = ()) -> Path:
        """``voco pretrain --data DATA... --out RUN`` in a new run folder; returns the folder."""
        if not data:
            raise ValueError("pretraining needs at least one image, folder, dataset.json or list file")
        run_dir = Path(run_dir) if run_dir is not None else self.new_run_dir(name, PRETRAIN)
        args = ["pretrain", "--data", *map(str, data), "--out", str(run_dir), "--preset", preset]
        args += _options(backbone=backbone, steps=steps, batch_size=batch_size,
                         checkpoint_every=checkpoint_every, device=device)
        return self._launch(run_dir, PRETRAIN, args + list(extra_args))

    def start_finetuning(self, dataset, init: str | None = None, backbone: str | None = None,
                         steps: int | None = None, name: str | None = None, run_dir=None,
                         model_name: str | None = None, val_every: int | None = None,
                         checkpoint_every: int | None = None, device: str = "auto", patch_size: int | None = None,
                         batch_size: int | None = None, extra_args: Sequence[str] = ()) -> Path:
        """``voco finetune --data DATASET --out RUN [--init CKPT|PACKAGE|NAME]``; returns the folder."""
        run_dir = Path(run_dir) if run_dir is not None else self.new_run_dir(name, FINETUNE)
        args = ["finetune", "--data", str(dataset), "--out", str(run_dir)]
        args += _options(init=init, backbone=backbone, steps=steps, name=model_name, val_every=val_every,
                         checkpoint_every=checkpoint_every, device=device, patch_size=patch_size,
                         batch_size=batch_size)
        return self._launch(run_dir, FINETUNE, args + list(extra_args))

    def resume(self, run, steps: int | None = None, device: str | None = None) -> Path:
        """Continue a stopped (or failed) run from its checkpoint with ``--resume``; ``steps`` may grow."""
        run_dir = self.run_dir(run)
        info = self.info(run_dir)
        first = read_job(run_dir).get("first_command")
        if info.state == RUNNING:
            raise RuntimeError(f"run {info.name} is still running")
        if info.checkpoint is not None:
            args = [info.kind, "--out", str(run_dir), "--resume"] + _options(steps=steps, device=device)
        elif info.state == STOPPED and first:  # stopped before its first checkpoint: the first command again
            args = _with_options(first, steps=steps, device=device)
        else:
            raise RuntimeError(f"run {info.name} has no checkpoint to resume from")
        return self._launch(run_dir, info.kind, args)

    def _launch(self, run_dir: Path, kind: str, args: list[str]) -> Path:
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        job = read_job(run_dir)
        job.setdefault("first_command", list(args))
        job.update(kind=kind, name=run_dir.name, command=list(args), started=time.time(), ended=None,
                   returncode=None, pid=None, attempts=job.get("attempts", 0) + 1)
        ev.append_event(run_dir / EVENTS_FILE, {"event": ev.LAUNCH, "time": round(time.time(), 3), "args": list(args)})
        command = [self.settings.engine_python, "-m", "voco", *args, "--progress", "jsonl"]
        env = {**self.settings.engine_environment(), STOP_FILE_VARIABLE: str(run_dir / STOP_FILE)}
        process = self.start_process(command, env, run_dir / EVENTS_FILE, run_dir / LOG_FILE)
        job["pid"] = process.pid
        write_job(run_dir, job)
        with self._live_lock:
            self._live[str(run_dir)] = process
        threading.Thread(target=self._watch, args=(run_dir, process), name=f"voco-run-{run_dir.name}",
                         daemon=True).start()
        return run_dir

    def _watch(self, run_dir: Path, process) -> None:
        """Reap the process, then close its attempt: an ``error`` made from engine.log when the
        engine ended badly without saying why, our ``exit`` line and the exit code in job.json."""
        returncode = process.wait()
        attempt = ev.read_jsonl(run_dir / EVENTS_FILE)
        since = max((i for i, e in enumerate(attempt) if e.get("event") == ev.LAUNCH), default=0)
        said = {e.get("event") for e in attempt[since:]}
        if returncode != 0 and not said & {ev.ERROR, ev.CANCELLED, "stopped", ev.STOP_REQUESTED}:
            log = (run_dir / LOG_FILE).read_text(errors="replace").splitlines()[-200:] \
                if (run_dir / LOG_FILE).is_file() else []
            ev.append_event(run_dir / EVENTS_FILE, {"event": ev.ERROR, "message": error_from_log(log, returncode),
                                                    "time": round(time.time(), 3), "synthesized": True})
        ev.append_event(run_dir / EVENTS_FILE, {"event": ev.EXIT, "returncode": returncode,
                                                "time": round(time.time(), 3)})
        job = read_job(run_dir)
        job.update(returncode=returncode, ended=time.time())
        write_job(run_dir, job)

    # --- stopping ------------------------------------------------------------------------------

    def stop(self, run) -> bool:
        """Ask a running run to stop: it checkpoints and exits (SIGTERM to its process group on
        POSIX; its stop file everywhere, which Windows relies on). Does not wait and kills
        nothing, so the checkpoint is never cut short. False when it was not running."""
        run_dir = self.run_dir(run)
        if not self._alive(run_dir):
            return False
        ev.append_event(run_dir / EVENTS_FILE, {"event": ev.STOP_REQUESTED, "time": round(time.time(), 3)})
        (run_dir / STOP_FILE).touch()
        pid = read_job(run_dir).get("pid")
        if sys.platform != "win32" and pid:
            try:
                os.killpg(pid, signal.SIGTERM)     # the engine's process group (start_new_session)
            except (ProcessLookupError, PermissionError):
                pass                               # the group is gone; the stop file remains
        return True

    def wait(self, run, timeout: float | None = None) -> str:
        """Block until the run is no longer running (or ``timeout`` s); its state. For scripts and tests."""
        run_dir = self.run_dir(run)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.info(run_dir).state
            if state != RUNNING or (deadline is not None and time.monotonic() >= deadline):
                return state
            time.sleep(0.1)

    # --- reading -------------------------------------------------------------------------------

    def list_runs(self) -> list[RunInfo]:
        """Every run folder of the workspace (those with a job.json), newest first."""
        if not self.workspace.is_dir():
            return []
        runs = [self.info(p) for p in self.workspace.iterdir() if (p / JOB_FILE).is_file()]
        return sorted(runs, key=lambda r: r.started or 0, reverse=True)

    def info(self, run) -> RunInfo:
        run_dir = self.run_dir(run)
        job = read_job(run_dir)
        kind = job.get("kind", PRETRAIN)
        summary = self._summaries.get(str(run_dir))
        if summary is None:
            summary = self._summaries[str(run_dir)] = _Summary(ev.JsonLinesTail(run_dir / EVENTS_FILE))
        summary.add(summary.tail.read_new())
        checkpoint = run_dir / CHECKPOINTS.get(kind, "checkpoint.pt")
        info = RunInfo(name=run_dir.name, path=str(run_dir), kind=kind, state=FAILED, step=summary.step,
                       total=summary.total, loss=summary.loss, best_dice=max(summary.dice) if summary.dice else None,
                       checkpoint=str(checkpoint) if checkpoint.is_file() else None, message=summary.message,
                       pid=job.get("pid"), started=job.get("started"), model=summary.model)
        info.state = self._state(run_dir, summary.attempt, info.checkpoint is not None)
        return info

    def run_dir(self, run) -> Path:
        """The folder of a run given as a RunInfo, a folder path or a run name of this workspace."""
        if isinstance(run, RunInfo):
            return Path(run.path)
        path = Path(run)
        return path if path.is_absolute() or path.parent != Path(".") else self.workspace / path

    def is_run(self, run) -> bool:
        path = self.run_dir(run)
        return (path / JOB_FILE).is_file() or (path / "config.json").is_file()

    # --- internals -----------------------------------------------------------------------------

    def _alive(self, run_dir: Path) -> bool:
        process = self._live.get(str(run_dir))
        if process is not None and process.poll() is None:
            return True
        return engine_holds_lock(run_dir)

    def _state(self, run_dir: Path, attempt: set[str], has_checkpoint: bool) -> str:
        if self._alive(run_dir):
            return RUNNING
        if ev.DONE in attempt:
            return DONE
        if ev.STOP_REQUESTED in attempt:
            return STOPPED
        if ev.ERROR in attempt and not any(k in ("stopped", ev.CANCELLED) for k in attempt):
            return FAILED
        return STOPPED if has_checkpoint else FAILED


def timestamped(name: str) -> str:
    """``name-YYYYmmdd-HHMMSS``: a run's folder name (a model's runs are told apart by when they began)."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _options(**values) -> list[str]:
    """``--key value`` for each value that is not None."""
    return _with_options([], **values)


def _with_options(args: Sequence[str], **values) -> list[str]:
    """``args`` with each given option's value replaced (or added); None leaves an option as it is."""
    args = list(args)
    for key, value in values.items():
        flag = f"--{key.replace('_', '-')}"
        if value is None:
            continue
        if flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    return args
