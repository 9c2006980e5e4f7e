"""SegmentationSession: everything a segmentation front end decides, without Qt.

The Slicer widget and VoCo Studio are views of one of these: a handler reads its inputs, calls
one method, and the view shows ``state`` and ``buttons(...)`` whenever ``changed`` fires. The
session decides which models and devices to offer, starts, polls, finishes and cancels jobs,
what each button allows, the status line, and the clinician's loop: add a corrected case (first
scored: the Dice of the version that segmented it, on a case it never saw), fine-tune, see each
version's Dice on unseen cases, its held-out validation Dice and whether it did worse than its
parent (VoCoCommonLib.versions has the rules), and roll back to an earlier version.

The session remembers, for each segmentation node it made, which model version made it and its
label map as the engine wrote it (read in the job's thread); adding that node as a case scores it
in the add-case job's thread, so the GUI thread only exports the corrected segments, as before.

Nothing here blocks: the engine always runs as a process; the environment probe, the model
list, the volume hand-off, writing a case and reading results happen in job threads; the GUI
thread only calls ``tick()`` from its timer (every ``POLL_INTERVAL_MS``), which takes the new
events and makes the segmentation node of a finished job (MRML must be touched on that thread).
Fine-tuning is a run of the shared runs workspace (VoCoCommonLib.runs), so it goes on when the
front end closes and VoCo Pretrain lists it too; when it is done the session imports its model
package and the new version appears in the model list.

Example (Slicer's Python console)::

    session = SegmentationSession()
    session.refresh()                                   # probe + model list, in the background
    while session.tick() or session.busy: slicer.app.processEvents()
    session.segment(getNode("CT"), session.state.models[0].spec, device="cpu")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from VoCoCommonLib.client import EngineClient
from VoCoCommonLib.environment import EngineEnvironment
from VoCoCommonLib.jobs import Job
from VoCoCommonLib.models import ModelEntry, finetuned_name
from VoCoCommonLib.runs import DONE, FINETUNE, RUNNING, STOPPED, timestamped
from VoCoCommonLib.session import Session
from VoCoCommonLib.signalling import Signal
from VoCoCommonLib.training_set import CaseSnapshot, TrainingSet
from VoCoCommonLib.versions import CurrentVersions, VersionRow, annotate, case_score, version_row

from .jobs import ImportJob, SegmentJob
from .results import move_into, segmentation_from_output

POLL_INTERVAL_MS = 200


@dataclass
class Button:
    text: str
    enabled: bool
    tooltip: str = ""


@dataclass
class Produced:
    """What made a segmentation node: the model version and its label map as the engine wrote it."""

    name: str
    version: str
    labels: np.ndarray   # KJI, on the input volume's grid
    names: dict          # label value -> name
    volume_id: str       # the input volume's node id


@dataclass
class SegmentationButtons:
    apply: Button
    finetune: Button
    add: Button
    choose: bool  # model and device choice, refresh and import


@dataclass
class SegmentationState:
    models: list = field(default_factory=list)            # ModelEntry, every kind
    models_loading: bool = False
    environment: EngineEnvironment | None = None          # None while the probe runs
    job: str | None = None                                # kind of the running job, if any
    fraction: float = 0.0
    status: str = ""
    finetuning: str | None = None                         # the fine-tuning run's folder while it runs
    training_set_count: int = 0

    @property
    def segmentation_models(self) -> list:
        return [m for m in self.models if m.usable]

    @property
    def devices(self) -> list:
        return self.environment.devices if self.environment else []


class SegmentationSession(Session):
    """See the module docstring. Signals: ``changed()``, ``resultReady(segmentation_node,
    volume_node)``, ``errorOccurred(message)``, ``modelSelected(spec)`` (a new version to select)."""

    def __init__(self, client: EngineClient | None = None, training_set: TrainingSet | None = None, runs=None,
                 temp_root=None):
        client = client or EngineClient()
        self.training_set = training_set or TrainingSet(client.settings.training_set_dir)
        self._cases = self.training_set.cases()  # with their scores; read again by each add-case job
        super().__init__(client, SegmentationState(training_set_count=len(self._cases)))
        self.runs = runs or self.client.runs()
        self.current_versions = CurrentVersions(self.runs.workspace)
        self.temp_root = temp_root
        self.resultReady, self.modelSelected = Signal(), Signal()
        self._pending: list[Job] = []         # segmentations queued behind it (compare versions), not started
        self._finetune: dict | None = None    # {"run"} while a fine-tuning run goes on
        self._auto = None                     # (every, model, steps, device) for automatic fine-tuning
        self._select = None                   # a new version's spec, selected once the model list has it
        self._announce = None                 # the status line for that new version, said with its measures
        self._listed_once = False             # the first model list selects the current version chosen before
        self._produced: dict[str, Produced] = {}  # segmentation node id -> what made it

    # --- what the views show -------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._job is not None or bool(self._pending)

    def buttons(self, volume_node=None, model: str | None = None, segmentation_node=None) -> SegmentationButtons:
        env, job = self.state.environment, self._job
        segmenting = job is not None and job.kind == "segment"
        if segmenting:
            apply = Button("Cancelling..." if job.cancelling else "Cancel", not job.cancelling, "Stop the segmentation")
        else:
            why = ("checking the engine's Python..." if env is None else
                   f"VoCo's Python packages are missing ({', '.join(env.missing)}): see Set-up" if env.missing else
                   env.problem if env.problem else "select an input volume" if volume_node is None else
                   "select a model" if not model else "wait for the running job" if job is not None else "")
            apply = Button("Apply", not why, why or "Segment the input volume")
        if self._finetune is not None:
            finetune = Button("Stop fine-tuning", True, "Stop the fine-tuning run (it keeps its checkpoint)")
        else:
            why = ("checking the engine's Python..." if env is None else "install VoCo's Python packages first"
                   if not env.ready else "select a model to fine-tune" if not model else
                   "add a corrected case to the training set first" if self.state.training_set_count < 1 else "")
            finetune = Button("Fine-tune", not why, why or "Fine-tune the model on the training set")
        why = ("select the input volume and its (corrected) segmentation"
               if volume_node is None or segmentation_node is None else
               "wait for the running job" if job is not None else "")
        add = Button("Add to training set", not why, why or "Store the volume and its segmentation as a training case")
        return SegmentationButtons(apply, finetune, add, choose=job is None)

    def versions(self, name: str) -> list[ModelEntry]:
        return [m for m in self.state.models if m.name == name and m.usable]

    def model(self, spec: str) -> ModelEntry | None:
        return next((m for m in self.state.models if spec in (m.spec, m.name)), None)

    def version_rows(self, name: str | None = None) -> list[VersionRow]:
        """The versions table (of one model, or of all): measures, flag, which one is current."""
        return [version_row(m) for m in self.state.segmentation_models if name in (None, m.name)]

    def roll_back_button(self, spec: str | None) -> Button:
        entry = next((m for m in self.state.segmentation_models if m.spec == spec), None) if spec else None
        why = ("select a version in the table" if entry is None else
               f"v{entry.version} is the current version" if entry.current else "")
        return Button("Roll back to this version", not why,
                      why or f"Make {entry.name} v{entry.version} the current version (later versions are kept)")

    # --- actions -------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Ask the engine's Python what it has (devices, packages) and list the models, in the background."""
        self.probe_environment()
        self.refresh_models()

    def segment(self, volume_node, model, device: str = "auto", fast: bool = False, tta: bool = False,
                roi_node=None, output_node=None, name: str | None = None, queue: bool = False) -> SegmentJob:
        """Start ``voco segment`` on the volume; with ``queue`` it starts once the running job has
        ended. Raises ValueError with a message for the user on bad input."""
        if volume_node is None:
            raise ValueError("no input volume selected")
        if self._job is not None and not queue:
            raise ValueError("wait for the running job to finish")
        spec = model.spec if isinstance(model, ModelEntry) else str(model or "")
        job = SegmentJob(self.client, volume_node, spec, device, fast, tta, roi_node, output_node, name, self.temp_root)
        if self._job is not None:
            self.history.append(job)
            self._pending.append(job)
            self._changed()
            return job
        return self._start(job)

    def compare_versions(self, volume_node, versions: list, device: str = "auto", names=None) -> None:
        """Segment with each version in turn (queued), each result in a node of its own."""
        names = names or [None] * len(versions)
        for version, name in zip(versions, names):
            self.segment(volume_node, version, device, name=name, queue=True)

    def cancel(self) -> None:
        """Stop the running job (and drop the queued ones); returns at once."""
        self._drop_pending()
        if self._job is not None:
            self._job.cancel()
            self.state.status = "cancelling..."
        self._changed()

    def import_model(self, path) -> Job:
        if self._job is not None:
            raise ValueError("wait for the running job to finish")
        return self._start(ImportJob(self.client, path))

    def add_to_training_set(self, volume_node, segmentation_node, model=None, auto_finetune_every: int = 0,
                            steps: int = 300, device: str = "auto") -> Job:
        """Store the (corrected) case: read from the scene now, written in the background. With
        ``auto_finetune_every`` N, fine-tuning of ``model`` starts when the count reaches a multiple of N."""
        if self._job is not None:
            raise ValueError("wait for the running job to finish")
        entry = model if isinstance(model, ModelEntry) else self.model(str(model)) if model else None
        labels = entry.labels if entry is not None and entry.labels else None
        case = self.training_set.snapshot(volume_node, segmentation_node, labels)
        produced = self._produced.get(segmentation_node.GetID())
        if produced is not None and produced.volume_id != volume_node.GetID():
            produced = None  # made on another volume: nothing to compare with
        self._auto = (auto_finetune_every, entry or model, steps, device) if auto_finetune_every > 0 else None
        return self._start(Job("add-case", load=lambda: self._write_case(case, produced),
                               status="adding the case to the training set"))

    def roll_back(self, spec: str) -> ModelEntry:
        """Make an earlier version the current one: selected for segmentation and the start of the
        next fine-tune, in later sessions too (kept in the runs workspace); later versions stay."""
        entry = next((m for m in self.state.segmentation_models if m.spec == spec), None)
        if entry is None:
            raise ValueError(f"not a version in the model list: {spec}")
        versions = self.versions(entry.name)
        self.current_versions.set(entry.name, entry.version, versions[-1].version)
        self._annotate()
        later = [f"v{m.version}" for m in versions[versions.index(entry) + 1:]]
        self.state.status = (f"{entry.name} v{entry.version} is the current version"
                             + (f"; {', '.join(later)} kept" if later else ""))
        self.modelSelected.emit(entry.spec)
        self._changed()
        return entry

    def finetune(self, model, steps: int = 300, device: str = "auto", dataset=None, name: str | None = None,
                 backbone: str | None = None, extra_args=(), val_every: int | None = None) -> Path:
        """Start a fine-tuning run of ``model`` (a spec, ModelEntry, or None: from scratch) on the
        training set (or ``dataset``); returns its run folder. Its model is imported when it is done."""
        if self._finetune is not None:
            raise ValueError("a fine-tuning run is going on already")
        dataset = dataset or self.training_set.finetuning_data()
        name = name or finetuned_name(model)
        spec = model.spec if isinstance(model, ModelEntry) else model
        run = self.runs.start_finetuning(dataset, init=spec, backbone=backbone, steps=steps, model_name=name,
                                         name=timestamped(name), device=device,
                                         val_every=val_every, checkpoint_every=val_every, extra_args=extra_args)
        self._finetune = {"run": run}
        self.state.finetuning = str(run)
        self.state.status = "fine-tuning: starting"
        self._changed()
        return run

    def stop_finetuning(self) -> bool:
        return self._finetune is not None and self.runs.stop(self._finetune["run"])

    def watch_finetuning(self, run) -> None:
        """Follow a fine-tuning run started elsewhere (an earlier session) until it is imported."""
        if self._finetune is None and self.runs.info(run).kind == FINETUNE:
            self._finetune = {"run": self.runs.run_dir(run)}
            self.state.finetuning = str(self._finetune["run"])

    def scene_closed(self) -> None:
        """The volumes are gone: a running segmentation is cancelled and its result dropped."""
        self._drop_pending()
        self._produced.clear()
        if self._job is not None and self._job.kind == "segment":
            self._job.cancel()
            self._job.volume_node = None
        self._changed()

    def close(self) -> None:
        """The front end goes away: stop what would write into its scene and the warm engine (runs go on)."""
        self.scene_closed()
        self.client.close()

    # --- the timer -----------------------------------------------------------------------------

    def tick(self) -> bool:
        """Advance every job (call from the GUI thread's timer); True when anything changed."""
        changed = self._tick_background()
        if self._finetune is not None:
            changed |= self._tick_finetune()
        changed |= self._tick_job()
        if self._job is None and self._pending:
            self._start_queued()
            changed = True
        if changed:
            self._changed()
        return changed

    # --- internals -----------------------------------------------------------------------------

    def _show_job(self, job: Job) -> None:
        self.state.fraction, self.state.status = job.fraction, job.status

    def _start_queued(self) -> None:
        self._start(self._pending.pop(0))

    def _drop_pending(self) -> None:
        for job in self._pending:
            job.cancel()  # never started: cancelled at once
            job.clean()
        self._pending.clear()

    def _models_listed(self) -> None:
        self._annotate()
        if self._select is None and not self._listed_once:
            last = self.current_versions.last()  # rolled back in an earlier session: its current version
            chosen = next((m for m in self.state.segmentation_models if m.name == last and m.current), None)
            self._select = chosen.spec if chosen is not None else None
        self._listed_once = True
        if self._select is not None:
            entry = self.model(self._select)
            if self._announce and entry is not None:
                self.state.status = self._announce + "".join(f": {text}" for text in (entry.measures, entry.worse)
                                                             if text)
            self.modelSelected.emit(self._select)
            self._select = self._announce = None

    def _annotate(self) -> None:
        annotate(self.state.models, self._cases, self.current_versions.read())

    def _write_case(self, case: CaseSnapshot, produced: Produced | None) -> dict:
        """The add-case job's work (its thread): score the version that made the segmentation, store the case."""
        score = None
        if produced is not None:
            dice = case_score(produced.labels, produced.names, case.labels, case.names)
            score = {"model": produced.name, "version": produced.version, **dice} if dice else None
        case_id = self.training_set.write(case, score)
        return {"case_id": case_id, "score": score, "cases": self.training_set.cases()}

    def _background_finished(self, job: Job) -> None:
        if job.kind == "import":
            self._imported(job)

    def _tick_finetune(self) -> bool:
        run = self._finetune["run"]
        info = self.runs.info(run)
        before = self.state.status
        if info.state == RUNNING:
            step = f"step {info.step} of {info.total}" if info.total else "starting"
            loss = f", loss {info.loss:.3f}" if info.loss is not None else ""
            self.state.status = f"fine-tuning: {step}{loss}"
            return self.state.status != before
        self._finetune, self.state.finetuning = None, None
        package = Path(info.model or Path(info.path) / "model")
        if info.state == STOPPED:  # the user stopped it: no error, and it can go on later
            self.state.status = f"fine-tuning stopped at step {info.step or 0}: resume it in VoCo Pretrain"
        elif info.state != DONE:
            self._fail(f"fine-tuning {info.state}" + (f": {info.message}" if info.message else ""))
        elif not (package / "model.json").is_file():
            self._fail("fine-tuning wrote no model package (no validation ran?)")
        else:
            job = ImportJob(self.client, package)
            self.history.append(job)
            self._background.append(job.start())
            self.state.status = "adding the new model version to the model list"
        return True

    def _imported(self, job: ImportJob) -> None:
        if not job.succeeded:
            self._fail(job.error or "the import failed")
            return
        name, version, path = job.imported.get("name"), job.imported.get("version"), job.imported.get("path")
        self.state.status = self._announce = f"new model {name} v{version}"
        self._select = path
        self.refresh_models()

    def _finish(self, job: Job) -> None:
        if isinstance(job, SegmentJob):
            try:
                if job.succeeded and job.volume_node is not None:
                    self._show_result(job)
            except Exception as exc:  # the result could not be made: say so, leave nothing
                job.error = str(exc)
            finally:
                job.clean()
        if job.cancelled:
            self.state.status = "cancelled"
        elif not job.succeeded:
            self._fail(job.error or f"{job.kind} failed")
        elif job.kind == "import":
            self._imported(job)
        elif job.kind == "add-case":
            self._cases = job.result["cases"]
            self.state.training_set_count = len(self._cases)
            self.state.status = f"added {job.result['case_id']} to the training set" + scored(job.result["score"])
            self._annotate()
            self._auto_finetune()

    def _show_result(self, job: SegmentJob) -> None:
        result = segmentation_from_output(job.result, job.volume_node, name=job.name)
        if job.output_node is not None and job.output_node.GetScene() is not None:
            move_into(result, job.output_node, job.volume_node)
        job.node = result.node
        model = job.result.sidecar.get("model") or {}
        scene = result.node.GetScene()  # a label map per node is memory: none for nodes deleted since
        self._produced = {node_id: made for node_id, made in self._produced.items() if scene.GetNodeByID(node_id)}
        self._produced[result.node.GetID()] = Produced(
            str(model.get("name")), str(model.get("version")), job.result.labels,
            {int(label["value"]): str(label["name"]) for label in job.result.sidecar.get("labels", [])},
            job.volume_node.GetID())
        if result.empty_labels:
            job.status = f"done; no voxels for: {', '.join(result.empty_labels)}"
        else:
            job.status = f"done: {result.node.GetName()}"
        self.state.status = job.status
        self.resultReady.emit(result.node, job.volume_node)

    def _auto_finetune(self) -> None:
        if self._auto is None:
            return
        every, model, steps, device = self._auto
        self._auto = None
        count = self.state.training_set_count
        if count % every == 0 and self._finetune is None:
            try:
                self.finetune(model, steps=steps, device=device)
            except ValueError as exc:
                self._fail(str(exc))
                return
            self.state.status = f"{count} cases: fine-tuning starts"


def scored(score: dict | None) -> str:
    """What the status line adds about a new case's score."""
    if not score:
        return ""
    return f"; {score['model']} v{score['version']} had Dice {score['mean_dice']:.3f} on it (before training on it)"
