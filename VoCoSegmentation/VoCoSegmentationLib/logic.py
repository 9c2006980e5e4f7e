"""VoCoSegmentation's logic: segment a volume node with the engine, turn the result into a
segmentation node, collect corrected cases and fine-tune the model on them.

Every engine call is a process (``python -m voco ...``) made by ``runner_factory`` (default
``EngineProcess``), so nothing here blocks Slicer: the widget calls ``job.update()`` from a
``qt.QTimer`` and shows ``job.fraction`` and ``job.status``; when ``job.finished`` it calls
``finish(job)`` (segment) or reads ``job.model_path`` (fine-tune).

Example (Slicer's Python console)::

    logic = SegmentationLogic()
    job = logic.segment(getNode("CT"), "/path/to/model_package", device="cpu")
    job.wait(); segmentation_node = logic.finish(job)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .models import ModelEntry, list_models
from .process import EXIT_EVENT, EngineProcess
from .results import SegmentationResult, move_into, segmentation_from_output
from .roi import roi_argument
from .training_set import TrainingSet
from .volumes import write_volume

_DEVICE_PROBE = r"""
import json
try:
    import torch
except Exception as exc:
    print(json.dumps({"torch": None, "problem": f"{type(exc).__name__}: {exc}"})); raise SystemExit
cuda = []
try:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cuda.append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
except Exception:
    pass
mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
print(json.dumps({"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda": cuda, "mps": mps}))
"""
SMALL_GPU_GB = 8.0


@dataclass
class Device:
    id: str  # what --device takes: auto, cuda:N, mps, cpu
    title: str


@dataclass
class Job:
    """A running engine process and what the widget shows of it."""

    process: object  # a ProcessProtocol
    kind: str
    fraction: float = 0.0
    status: str = "starting"
    error: str | None = None
    cancelled: bool = False
    events: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    returncode: int | None = None

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and self.error is None and not self.cancelled

    def update(self) -> list[dict]:
        """Take the events that arrived and update fraction/status/error; returns them."""
        new = self.process.poll()
        for event in new:
            self.events.append(event)
            self.apply(event)
        return new

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (tests, the console); True when finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.process.wait(min(0.2, remaining) if remaining is not None else 0.2)
            self.update()
            if deadline is not None and time.monotonic() >= deadline:
                break
        return self.finished

    def apply(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "warning":
            self.warnings.append(event.get("message", ""))
            self.status = f"warning: {event.get('message', '')}"
        elif kind == "error":
            self.error = event.get("message") or "the engine failed"
            self.status = f"error: {self.error}"
        elif kind == "cancelled":
            self.cancelled = True
            self.status = "cancelled"
        elif kind == "download":
            percent = event.get("percent")
            self.status = f"downloading {event.get('name', 'model')}" + (f" {percent:.0f} %" if percent is not None else "")
        elif kind == EXIT_EVENT:
            self.returncode = int(event.get("returncode", -1))
            if self.returncode != 0 and not self.error and not self.cancelled:
                self.error = f"the engine exited with code {self.returncode}"


@dataclass
class SegmentationJob(Job):
    volume_node: object = None
    model: str = ""
    temp_dir: Path | None = None
    input_path: Path | None = None
    output_path: Path | None = None
    result: SegmentationResult | None = None

    def apply(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "start":
            self.fraction = 0.05
            self.status = (f"segmenting with {event.get('model')} v{event.get('version')} on {event.get('device')} "
                           f"({event.get('windows')} windows)")
        elif kind == "progress":
            done, total = event.get("done", 0), max(1, event.get("total") or 1)
            if event.get("stage") == "resample":
                self.fraction = 0.9 + 0.08 * done / total
                self.status = "resampling to the input grid"
            else:
                self.fraction = 0.05 + 0.85 * done / total
                self.status = f"inference: window {done} of {total}"
        elif kind == "done":
            self.fraction = 0.98
            self.status = f"done in {event.get('seconds', '?')} s; loading the result"
        else:
            super().apply(event)


@dataclass
class FinetuneJob(Job):
    training_set: TrainingSet | None = None
    run_dir: Path | None = None
    base_model: ModelEntry | None = None
    best_dice: float | None = None
    model_path: str | None = None  # the imported package once finished
    model_name: str | None = None
    model_version: str | None = None
    phase: str = "finetune"  # then "import"
    runner_factory: object = None
    runner_options: dict = field(default_factory=dict)

    @property
    def previous_dice(self) -> float | None:
        return self.base_model.dice if isinstance(self.base_model, ModelEntry) else None

    def apply(self, event: dict) -> None:
        kind = event.get("event")
        if self.phase == "finetune" and kind == "start":
            self.status = (f"fine-tuning on {event.get('train_cases')} cases ({event.get('val_cases')} for validation) "
                           f"on {event.get('device')}")
        elif kind == "step":
            total = max(1, event.get("total") or 1)
            self.fraction = 0.95 * event.get("step", 0) / total
            loss = event.get("loss")
            self.status = f"step {event.get('step')} of {total}" + (f", loss {loss:.3f}" if loss is not None else "")
        elif kind == "val_dice":
            self.status = f"validation Dice {event.get('mean') or 0:.3f} at step {event.get('step')}"
        elif kind == "done" and self.phase == "finetune":
            self.best_dice = event.get("best_mean_dice")
            self.model_path = event.get("model")
        elif kind == "imported":
            self.model_name, self.model_version = event.get("name"), str(event.get("version"))
            self.model_path = event.get("path")
        elif kind == EXIT_EVENT and self.phase == "finetune" and event.get("returncode") == 0 and not self.error:
            self._start_import()
        else:
            super().apply(event)
            if kind == EXIT_EVENT and self.succeeded:
                self.fraction = 1.0
                dice = f", validation Dice {self.best_dice:.3f}" if self.best_dice is not None else ""
                before = f" (before: {self.previous_dice:.3f})" if self.previous_dice is not None else ""
                self.status = f"new model {self.model_name} v{self.model_version}{dice}{before}"

    def _start_import(self) -> None:
        package = Path(self.model_path or self.run_dir / "model")
        if not (package / "model.json").is_file():
            self.error = "fine-tuning wrote no model package (no validation ran?)"
            self.returncode = 1
            return
        self.phase = "import"
        self.fraction = 0.97
        self.status = "adding the new model version to the model list"
        self.process = self.runner_factory(["models", "import", str(package)], **self.runner_options).start()

    def cancel(self) -> None:
        self.process.cancel()
        self.update()


class SegmentationLogic:
    """See the module docstring. ``python``/``engine_dir``: the Python that runs the engine and a
    folder to put on its ``PYTHONPATH``; ``runs_folder``: where fine-tuning runs go."""

    def __init__(self, python: str | None = None, engine_dir: str | None = None, runner_factory=EngineProcess,
                 runs_folder=None, temp_root=None, auto_finetune_every: int = 0, env: dict | None = None):
        self.runner_factory = runner_factory
        self.runner_options = {k: v for k, v in {"python": python, "engine_dir": engine_dir, "env": env}.items()
                               if v is not None}
        self.runs_folder = Path(runs_folder) if runs_folder else Path(tempfile.gettempdir()) / "voco-finetune-runs"
        self.temp_root = temp_root
        self.auto_finetune_every = auto_finetune_every
        self.python = python

    # --- models and devices ------------------------------------------------------------------

    def models(self, timeout: float = 120.0) -> list[ModelEntry]:
        return list_models(self.runner_factory, self.runs_folder, timeout, **self.runner_options)

    def devices(self, timeout: float = 120.0) -> tuple[list[Device], str | None]:
        """(devices for the combo box, a message for the user or None), asking the engine's Python."""
        import os
        import sys

        env = {**os.environ, **self.runner_options.get("env", {})}
        try:
            answer = subprocess.run([self.python or sys.executable, "-c", _DEVICE_PROBE], capture_output=True,
                                    text=True, timeout=timeout, env=env)
            info = json.loads(answer.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            return [Device("cpu", "CPU")], f"could not ask the engine's Python which devices it has: {exc}"
        return devices_from_probe(info)

    # --- segmenting --------------------------------------------------------------------------

    def segment(self, volume_node, model, device: str = "auto", fast: bool = False, tta: bool = False,
                roi_node=None, runner_factory=None, extra_args=()) -> SegmentationJob:
        """Write the volume to a temporary file and start ``voco segment``; returns the job."""
        spec = model.spec if isinstance(model, ModelEntry) else str(model)
        if not spec:
            raise ValueError("no model selected")
        temp_dir = Path(tempfile.mkdtemp(prefix="voco-segment-", dir=self.temp_root))
        try:
            input_path = write_volume(volume_node, temp_dir / "input.nrrd")
            output_path = temp_dir / "segmentation.nrrd"
            args = ["segment", str(input_path), str(output_path), "--model", spec, "--device", device]
            args += ["--fast"] * bool(fast) + ["--tta"] * bool(tta)
            if roi_node is not None:
                args += roi_argument(roi_node, volume_node)
            args += [str(a) for a in extra_args]
            process = (runner_factory or self.runner_factory)(args, **self.runner_options).start()
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return SegmentationJob(process=process, kind="segment", status="starting the engine", volume_node=volume_node,
                               model=spec, temp_dir=temp_dir, input_path=input_path, output_path=output_path)

    def finish(self, job: SegmentationJob, timeout: float | None = None, name: str | None = None, output_node=None):
        """The segmentation node of a finished job (waits for it); raises with the engine's message
        when it failed. Temporary files are removed either way. With ``output_node`` (an existing
        segmentation node) the result's segments replace that node's and it is returned; a
        failure leaves it as it was."""
        try:
            job.wait(timeout)
            if not job.finished:
                raise TimeoutError("the engine is still running")
            if job.cancelled:
                raise RuntimeError("segmentation was cancelled")
            if not job.succeeded:
                raise RuntimeError(job.error or "segmentation failed")
            job.result = segmentation_from_output(job.output_path, job.volume_node, name=name)
            if output_node is not None:
                move_into(job.result, output_node, job.volume_node)
            job.fraction, job.status = 1.0, "done"
            if job.result.empty_labels:
                job.status = f"done; no voxels for: {', '.join(job.result.empty_labels)}"
            return job.result.node
        finally:
            if job.finished:
                self._clean(job)

    def cancel(self, job: Job, grace: float = 5.0) -> None:
        """Stop the job's whole process tree; a segmentation job leaves no node and no file."""
        job.process.cancel(grace)
        job.wait(grace + 5)
        job.cancelled = True
        job.status = "cancelled"
        if isinstance(job, SegmentationJob):
            self._clean(job)

    def _clean(self, job: SegmentationJob) -> None:
        if job.temp_dir is not None:
            shutil.rmtree(job.temp_dir, ignore_errors=True)

    # --- the clinician loop ------------------------------------------------------------------

    def add_to_training_set(self, training_set: TrainingSet | str, volume_node, segmentation_node, labels=None,
                            segment_ids=None) -> str:
        """Store the (corrected) case; returns its id. ``labels``: ``{segment name: value}`` or the
        model's labels (``ModelEntry.labels``) so that values match the model being fine-tuned."""
        training_set = training_set if isinstance(training_set, TrainingSet) else TrainingSet(training_set)
        return training_set.add(volume_node, segmentation_node, labels, segment_ids)

    def auto_finetune_due(self, training_set: TrainingSet) -> bool:
        """True when automatic fine-tuning is on and the last add made the case count a multiple of N."""
        count = training_set.count
        return self.auto_finetune_every > 0 and count > 0 and count % self.auto_finetune_every == 0

    def finetune(self, training_set: TrainingSet | str, current_model, steps: int = 200, device: str = "auto",
                 name: str | None = None, runner_factory=None, extra_args=()) -> FinetuneJob:
        """Start ``voco finetune`` from ``current_model`` on the collected cases; when it succeeds the
        job imports the new package (``voco models import``), so it shows in ``models()`` as the
        next version of the same name."""
        training_set = training_set if isinstance(training_set, TrainingSet) else TrainingSet(training_set)
        if training_set.count < 1:
            raise ValueError("the training set has no cases yet")
        spec = current_model.spec if isinstance(current_model, ModelEntry) else str(current_model)
        name = name or finetuned_name(current_model)
        run_dir = self.runs_folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = self.runs_folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        args = ["finetune", "--data", str(training_set.dataset_json), "--init", spec, "--name", name,
                "--out", str(run_dir), "--steps", str(steps), "--device", device, *map(str, extra_args)]
        factory = runner_factory or self.runner_factory
        process = factory(args, **self.runner_options).start()
        return FinetuneJob(process=process, kind="finetune", status="starting fine-tuning", training_set=training_set,
                           run_dir=run_dir, base_model=current_model if isinstance(current_model, ModelEntry) else None,
                           runner_factory=factory, runner_options=dict(self.runner_options))


def finetuned_name(model) -> str:
    """The name the fine-tuned package gets: the same as a segmentation model's (so it becomes its
    next version), ``<backbone>-seg`` for a backbone (a backbone's name and version are taken)."""
    if isinstance(model, ModelEntry):
        return f"{model.name}-seg" if model.needs_finetuning else model.name
    path = Path(str(model))
    card = path / "model.json"
    if card.is_file():
        try:
            return str(json.loads(card.read_text(encoding="utf-8"))["name"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if path.is_file():  # a checkpoint file
        return f"{path.name.split('.')[0]}-seg"
    return str(model)  # a registry name


def devices_from_probe(info: dict) -> tuple[list[Device], str | None]:
    """Devices and a message from the probe's answer (see ``_DEVICE_PROBE``)."""
    if not info.get("torch"):
        return [Device("cpu", "CPU")], f"PyTorch is not installed for the engine ({info.get('problem', '')})"
    devices = [Device("auto", "auto")]
    messages = []
    for gpu in info.get("cuda", []):
        devices.append(Device(f"cuda:{gpu['index']}", f"GPU {gpu['index']}: {gpu['name']} ({gpu['memory_gb']} GB)"))
        if gpu["memory_gb"] < SMALL_GPU_GB:
            messages.append(f"GPU {gpu['index']} has {gpu['memory_gb']} GB: large volumes may fall back to the CPU")
    if info.get("mps"):
        devices.append(Device("mps", "Apple GPU (MPS)"))
    devices.append(Device("cpu", "CPU"))
    if info.get("cuda_build") and not info.get("cuda"):
        messages.append(f"PyTorch {info['torch']} is a CUDA {info['cuda_build']} build but sees no GPU: check the "
                        "NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES; running on the CPU")
    elif not info.get("cuda_build") and not info.get("mps") and not info.get("cuda"):
        messages.append(f"PyTorch {info['torch']} is a CPU-only build: segmentation runs on the CPU "
                        "(reinstall torch with CUDA through the PyTorch extension to use a GPU)")
    return devices, "; ".join(messages) or None
