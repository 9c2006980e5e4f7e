"""A workspace of pretraining and fine-tuning runs that outlive the module that started them.

Each run is a folder ``<workspace>/<name>/``: the engine's own files (``config.json``,
``metrics.jsonl``, ``checkpoint.pt`` for pretraining; ``last.pt``, ``best.pt``, ``model/`` for
fine-tuning) plus two of ours:

- ``job.json``: kind, command, PID of the engine process, start time, exit code once known;
- ``events.jsonl``: every progress event of every attempt, appended as it arrives, each attempt
  opened by a ``{"event": "launch", ...}`` line of ours.

The state is decided from those files alone, so a new ``Runs`` on the same workspace (the module
closed and reopened) sees what an earlier one started: ``running`` (the PID is alive),
``done`` (the last attempt reported ``done``), ``stopped`` (no process, and a checkpoint to resume
from or a stop asked for with ``stop``), ``failed`` (the last attempt reported an error, or ended
with nothing to resume). A run stopped before its first checkpoint resumes from the start.

The engine is started through an injectable runner factory (``args -> ProcessProtocol``; by
default VoCoSegmentationLib's ``EngineProcess``, a new process group per run); a daemon thread
per live run drains the runner's events into ``events.jsonl``, whoever watches.

Example (Slicer's Python console)::

    from VoCoPretrainLib.runs import Runs
    runs = Runs()
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from .curves import json_records, read_jsonl

RUNNING, STOPPED, DONE, FAILED = "running", "stopped", "done", "failed"
PRETRAIN, FINETUNE = "pretrain", "finetune"
JOB_FILE, EVENTS_FILE = "job.json", "events.jsonl"
CHECKPOINTS = {PRETRAIN: "checkpoint.pt", FINETUNE: "last.pt"}
LAUNCH_EVENT = "launch"
STOP_EVENT = "stop_requested"  # ours, written by stop(): the user ended the attempt, whatever the engine says


def default_workspace() -> Path:
    return Path.home() / "VoCo" / "runs"


def default_runner_factory(args: Sequence[str]):
    """VoCoSegmentationLib's Qt-free ``EngineProcess`` (both modules' folders are on Slicer's path)."""
    from VoCoSegmentationLib.process import EngineProcess

    return EngineProcess(list(args))


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

    @property
    def resumable(self) -> bool:
        """Stopped, or ended with a checkpoint to continue from (enable the Resume button on this)."""
        return self.state == STOPPED or (self.state != RUNNING and self.checkpoint is not None)

    def to_dict(self) -> dict:
        return {**asdict(self), "resumable": self.resumable}


class _LiveJob:
    """A runner this Python process started, and the thread that copies its events to disk."""

    def __init__(self, run_dir: Path, runner):
        self.run_dir, self.runner = run_dir, runner
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._pump, name=f"voco-run-{run_dir.name}", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        events_path = self.run_dir / EVENTS_FILE
        try:
            while True:
                running = self.runner.running
                events = self.runner.poll()
                if events:
                    with open(events_path, "a", encoding="utf-8") as f:
                        for event in events:
                            f.write(json.dumps(event) + "\n")
                if not running and not events:
                    break
                time.sleep(0.2)
            job = read_job(self.run_dir)
            job.update(returncode=self.runner.returncode, ended=time.time())
            write_job(self.run_dir, job)
        finally:
            self.finished.set()


# Live runners by run folder, shared by every Runs of this Python process (the logic may be
# rebuilt when the module is reopened; the runners and their pump threads stay here).
_LIVE: dict[str, _LiveJob] = {}
_LIVE_LOCK = threading.Lock()


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


def pid_alive(pid: int | None, run_dir=None) -> bool:
    """Whether process ``pid`` exists, is not a zombie and (on Linux) is the engine of ``run_dir``."""
    if not pid:
        return False
    if sys.platform == "win32":
        try:
            import psutil
        except ImportError:
            return False
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
            if run_dir is not None:
                return str(run_dir) in (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError):
            return False
    return True


def last_attempt(events: list[dict]) -> list[dict]:
    """The events since the last ``launch`` line (the whole list when there is none)."""
    for i in range(len(events) - 1, -1, -1):
        if events[i].get("event") == LAUNCH_EVENT:
            return events[i:]
    return events


class Runs:
    """Start, stop, resume and list runs in a workspace folder."""

    def __init__(self, workspace=None, runner_factory: Callable | None = None):
        # absolute: the run folder is matched against the engine's command line to recognise its PID
        self.workspace = (Path(workspace) if workspace is not None else default_workspace()).expanduser().absolute()
        self.runner_factory = runner_factory or default_runner_factory
        self._offsets: dict[str, int] = {}

    # --- starting ------------------------------------------------------------------------------

    def new_run_dir(self, name: str | None = None, kind: str = PRETRAIN) -> Path:
        """A new, empty run folder (``<kind>-YYYYmmdd-HHMMSS`` unless named; a suffix keeps it unique)."""
        base = name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
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
                         checkpoint_every: int | None = None, device: str = "auto",
                         extra_args: Sequence[str] = ()) -> Path:
        """``voco finetune --data DATASET --out RUN [--init CKPT|PACKAGE|NAME]``; returns the folder."""
        run_dir = Path(run_dir) if run_dir is not None else self.new_run_dir(name, FINETUNE)
        args = ["finetune", "--data", str(dataset), "--out", str(run_dir)]
        args += _options(init=init, backbone=backbone, steps=steps, name=model_name, val_every=val_every,
                         checkpoint_every=checkpoint_every, device=device)
        return self._launch(run_dir, FINETUNE, args + list(extra_args))

    def resume(self, run, steps: int | None = None, device: str | None = None) -> Path:
        """Continue a stopped (or failed) run from its checkpoint with ``--resume``; ``steps`` may grow."""
        run_dir = self._run_dir(run)
        info = self.info(run_dir)
        if info.state == RUNNING:
            raise RuntimeError(f"run {info.name} is still running")
        if info.checkpoint is not None:
            args = [info.kind, "--out", str(run_dir), "--resume"] + _options(steps=steps, device=device)
        elif info.state == STOPPED:  # stopped before its first checkpoint: the first command again
            first = next(e for e in read_jsonl(run_dir / EVENTS_FILE) if e.get("event") == LAUNCH_EVENT)
            args = _with_options(first["args"], steps=steps, device=device)
        else:
            raise RuntimeError(f"run {info.name} has no checkpoint to resume from")
        return self._launch(run_dir, info.kind, args)

    def _launch(self, run_dir: Path, kind: str, args: list[str]) -> Path:
        runner = self.runner_factory(args)
        job = read_job(run_dir)
        job.update(kind=kind, name=run_dir.name, command=list(args), started=time.time(), ended=None,
                   returncode=None, pid=None, attempts=job.get("attempts", 0) + 1)
        with open(run_dir / EVENTS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": LAUNCH_EVENT, "time": round(time.time(), 3), "args": list(args)}) + "\n")
        runner.start()
        job["pid"] = getattr(runner, "pid", None)
        write_job(run_dir, job)
        with _LIVE_LOCK:
            _LIVE[str(run_dir)] = _LiveJob(run_dir, runner)
        return run_dir

    # --- stopping ------------------------------------------------------------------------------

    def stop(self, run) -> bool:
        """Ask a running run to stop (SIGTERM: the engine checkpoints and exits 143); does not wait.
        False when it was not running."""
        run_dir = self._run_dir(run)
        live = _LIVE.get(str(run_dir))
        job = read_job(run_dir)
        pid = job.get("pid")
        alive = self._alive(run_dir, job)
        if alive:
            with open(run_dir / EVENTS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps({"event": STOP_EVENT, "time": round(time.time(), 3)}) + "\n")
        if sys.platform != "win32" and pid and alive:
            try:
                os.killpg(pid, signal.SIGTERM)     # runners start the engine as a group leader
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    return False
            return True
        if live is not None and live.runner.running:   # no PID (a test's runner) or Windows
            threading.Thread(target=live.runner.cancel, kwargs={"grace": 600.0}, daemon=True).start()
            return True
        return False

    def wait(self, run, timeout: float | None = None) -> str:
        """Block until the run is no longer running (or ``timeout`` s); its state. For scripts and tests."""
        run_dir = self._run_dir(run)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            live = _LIVE.get(str(run_dir))
            if live is not None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                live.finished.wait(remaining)
            state = self.info(run_dir).state
            if state != RUNNING or (deadline is not None and time.monotonic() >= deadline):
                return state
            time.sleep(0.2)

    # --- reading -------------------------------------------------------------------------------

    def list_runs(self) -> list[RunInfo]:
        """Every run folder of the workspace (those with a job.json), newest first."""
        if not self.workspace.is_dir():
            return []
        runs = [self.info(p) for p in self.workspace.iterdir() if (p / JOB_FILE).is_file()]
        return sorted(runs, key=lambda r: r.started or 0, reverse=True)

    def info(self, run) -> RunInfo:
        run_dir = self._run_dir(run)
        job = read_job(run_dir)
        kind = job.get("kind", PRETRAIN)
        events = read_jsonl(run_dir / EVENTS_FILE)
        info = RunInfo(name=run_dir.name, path=str(run_dir), kind=kind, state=FAILED, pid=job.get("pid"),
                       started=job.get("started"))
        checkpoint = run_dir / CHECKPOINTS.get(kind, "checkpoint.pt")
        info.checkpoint = str(checkpoint) if checkpoint.is_file() else None
        dice = []
        for event in events:
            kind_of = event.get("event")
            if kind_of in ("start", "step"):
                info.step = event.get("step", info.step)
                info.total = event.get("total", info.total)
                if kind_of == "step" and event.get("loss") is not None:
                    info.loss = event["loss"]
            elif kind_of == "val_dice" and event.get("mean") is not None:
                dice.append(event["mean"])
            elif kind_of == "done" and event.get("best_mean_dice") is not None:
                dice.append(event["best_mean_dice"])
            elif kind_of in ("error", "warning"):
                info.message = event.get("message", "")
        info.best_dice = max(dice) if dice else None
        info.state = self._state(run_dir, job, last_attempt(events), info.checkpoint is not None)
        return info

    def new_events(self, run) -> list[dict]:
        """Events written to the run's events.jsonl since this ``Runs`` last asked (whole lines only)."""
        run_dir = self._run_dir(run)
        path = run_dir / EVENTS_FILE
        offset = self._offsets.get(str(run_dir), 0)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self._offsets[str(run_dir)] = offset + end
        return json_records(chunk[:end].decode("utf-8", errors="replace"))

    def rewind(self, run) -> None:
        """Make the next ``new_events`` start from the beginning of the file again."""
        self._offsets.pop(str(self._run_dir(run)), None)

    # --- internals -----------------------------------------------------------------------------

    def _run_dir(self, run) -> Path:
        if isinstance(run, RunInfo):
            return Path(run.path)
        path = Path(run)
        return path if path.is_absolute() or path.parent != Path(".") else self.workspace / path

    def _alive(self, run_dir: Path, job: dict) -> bool:
        live = _LIVE.get(str(run_dir))
        if live is not None and not live.finished.is_set():
            return True
        return pid_alive(job.get("pid"), run_dir) and job.get("returncode") is None

    def _state(self, run_dir: Path, job: dict, attempt: list[dict], has_checkpoint: bool) -> str:
        if self._alive(run_dir, job):
            return RUNNING
        kinds = [e.get("event") for e in attempt]
        if "done" in kinds:
            return DONE
        if STOP_EVENT in kinds:
            return STOPPED
        if "error" in kinds and not any(k in ("stopped", "cancelled") for k in kinds):
            return FAILED
        return STOPPED if has_checkpoint else FAILED


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
