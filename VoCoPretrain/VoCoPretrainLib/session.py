"""PretrainSession: everything a pretraining front end decides, without Qt.

The Slicer widget and VoCo Studio are views of one of these (see VoCoSegmentationLib.session
for the pattern): runs of the shared workspace listed with their state, progress and loss;
start (volumes exported in the background), stop (the engine checkpoints first) and resume;
the selected run's loss curves, fed from its events as they arrive; the crop layout of a volume
and the positions a checkpoint predicts, drawn as overlays; and fine-tuning runs that start from
a published backbone (voco-b/l/h), a pretraining run of the workspace or a segmentation model,
on the clinician's training set or a labelled dataset, whose model then joins the model list. Nothing blocks the GUI thread:
``tick()`` (the view's timer, every ``POLL_INTERVAL_MS``) reads only what runs wrote since the
last tick and makes the nodes of finished jobs.

Example (Slicer's Python console)::

    session = PretrainSession()
    run = session.start([getNode("CTChest")], steps=50, device="cpu")
    session.tick(); session.state.runs
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from VoCoCommonLib.client import EngineClient
from VoCoCommonLib.environment import EngineEnvironment
from VoCoCommonLib.jobs import Job
from VoCoCommonLib.models import finetuned_name
from VoCoCommonLib.runs import DONE, FINETUNE, PRETRAIN, RUNNING, timestamped
from VoCoCommonLib.session import Session
from VoCoCommonLib.signalling import Signal
from VoCoCommonLib.training_set import TrainingSet
from VoCoCommonLib.volumes import snapshot

from . import overlays
from .curves import TrainingCurves
from .jobs import CurvesJob, crops_job, file_stem, positions_job

POLL_INTERVAL_MS = 500
RUNS_REFRESH_TICKS = 4  # the runs table is re-read every 4 ticks (2 s), at once when the selected run reports


@dataclass
class Button:
    text: str
    enabled: bool
    tooltip: str = ""


@dataclass
class PretrainButtons:
    start: Button
    stop: Button
    resume: Button
    curves: Button
    crops: Button
    positions: Button
    finetune: Button


@dataclass
class PretrainState:
    runs: list = field(default_factory=list)          # RunInfo, newest first
    selected: str | None = None                       # the selected run's folder
    environment: EngineEnvironment | None = None      # None while the probe runs
    job: str | None = None                            # "start", "crops", "positions" while one runs
    status: str = ""                                  # the selected run, or the start of one
    overlay_status: str = ""                          # the crop layout / position predictions
    fraction: float = 0.0                             # the selected run's progress
    models: list = field(default_factory=list)        # ModelEntry: what fine-tuning can start from
    models_loading: bool = False

    @property
    def devices(self) -> list:
        return self.environment.devices if self.environment else []

    def run(self, path: str | None = None):
        path = self.selected if path is None else str(path)
        return next((r for r in self.runs if r.path == path), None)


class PretrainSession(Session):
    """Signals: ``changed()``, ``errorOccurred(message)``, ``overlayReady(kind, nodes, volume_node)``
    (kind "crops" or "positions"), ``curvesReady(TrainingCurves)``, ``modelReady(package_folder)`` (a
    fine-tuning run this session started is done: its model is a new entry of the model list)."""

    def __init__(self, client: EngineClient | None = None, runs=None, training_set: TrainingSet | None = None):
        super().__init__(client or EngineClient(), PretrainState())
        self.runs = runs or self.client.runs()
        self.training_set = training_set or TrainingSet(self.client.settings.training_set_dir)
        self.overlayReady, self.curvesReady, self.modelReady = Signal(), Signal(), Signal()
        self._finetunes: set[str] = set()             # fine-tuning runs started here, until they end
        self.curves: TrainingCurves | None = None     # of the selected run
        self._columns, self._tail = None, None        # its CurveColumns and events tail, once loaded
        self._ticks = 0

    # --- data ----------------------------------------------------------------------------------

    def scene_volumes(self) -> list:
        """Scalar volumes of the scene that are images (not label maps, not VoCo's own overlays)."""
        import slicer

        nodes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
        return [n for n in nodes if not n.IsA("vtkMRMLLabelMapVolumeNode") and not n.GetAttribute(overlays.ROLE_ATTRIBUTE)]

    def submitted_cases(self) -> int:
        return self.training_set.count

    def collect_data(self, data_path=None, use_scene_volumes: bool = False, use_submitted_cases: bool = False) -> list:
        """What to pretrain on: a path, the scene's volumes and the clinician's cases."""
        data = [str(data_path)] if data_path else []
        if use_scene_volumes:
            data += self.scene_volumes()
        if use_submitted_cases and self.training_set.dataset_json.is_file():
            data.append(str(self.training_set.dataset_json))
        if not data:
            raise ValueError("no data: choose a folder or dataset.json, scene volumes, or submitted cases")
        return data

    def data_summary(self, data_path=None, use_scene_volumes: bool = False, use_submitted_cases: bool = False) -> str:
        parts = [str(data_path)] if data_path else []
        if use_scene_volumes:
            parts.append(f"{len(self.scene_volumes())} scene volume(s)")
        if use_submitted_cases:
            parts.append(f"{self.submitted_cases()} submitted case(s)")
        return "Data: " + ", ".join(parts) if parts else "No data chosen yet."

    def finetune_starts(self) -> list[tuple[str, str]]:
        """What a fine-tuning run can start from, as (spec for ``--init``, title): the published
        backbones, the workspace's pretraining runs with a checkpoint, the segmentation models,
        and a random initialisation ("")."""
        backbones = [(m.spec, f"{m.name} v{m.version} — published backbone"
                      + ("" if m.installed else " (will download)") + m.trust_note)
                     for m in self.state.models if m.needs_finetuning]
        runs = [(r.checkpoint, f"{r.name} — pretraining run, step {r.step or 0}")
                for r in self.state.runs if r.kind == PRETRAIN and r.checkpoint]
        models = [(m.spec, m.title) for m in self.state.models if m.usable]
        return backbones + runs + models + [("", "random initialisation (from scratch)")]

    def finetune_data_summary(self, data_path=None) -> str:
        if data_path:
            return f"Labelled data: {data_path}"
        return f"Labelled data: the training set ({self.training_set.count} case(s) added in VoCo Segmentation)"

    # --- what the views show -------------------------------------------------------------------

    def buttons(self, has_data: bool, volume_node=None, finetune_data=None) -> PretrainButtons:
        env, run, job = self.state.environment, self.state.run(), self._job
        not_ready = ("checking the engine's Python..." if env is None else
                     "install VoCo's Python packages first (Set-up)" if not env.ready else "")
        busy = "wait for the running job" if job is not None else ""
        why = not_ready or busy or ("" if has_data else "choose data: a folder, scene volumes or cases")
        start = Button("Start", not why, why or "Start a new run")
        running = run is not None and run.state == RUNNING
        stop = Button("Stop", running, "Stop the run: it saves a checkpoint first" if running else "no run is running")
        resumable = run is not None and run.resumable and not not_ready
        resume = Button("Resume", resumable, "Continue the run from its checkpoint" if resumable else
                        not_ready or "select a stopped run")
        curves = Button("Show curves in the plot view", run is not None, "" if run else "select a run")
        why = not_ready or busy or ("" if volume_node is not None else "select a volume")
        crops = Button("Show crop layout", not why, why or "Draw the base crops and targets over the volume")
        why = why or ("" if run is not None and run.kind == PRETRAIN and run.checkpoint else
                      "select a pretraining run with a checkpoint")
        positions = Button("Predict positions", not why, why or "What the run's checkpoint predicts for each target")
        why = not_ready or busy or ("" if finetune_data or self.training_set.count else
                                    "add a corrected case in VoCo Segmentation, or choose a labelled dataset")
        finetune = Button("Start fine-tuning", not why, why or "Fine-tune a segmentation network from the chosen start")
        return PretrainButtons(start, stop, resume, curves, crops, positions, finetune)

    # --- actions -------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Ask the engine's Python what it has and list the models (in the background); re-read the runs."""
        self.probe_environment()
        self.refresh_models()
        self.refresh_runs()

    def refresh_runs(self) -> None:
        self.state.runs = self.runs.list_runs()
        self._finetunes_ended()
        run = self.state.run()
        self.state.fraction = (run.step or 0) / run.total if run is not None and run.total else 0.0
        if run is not None and (self._job is None or self._job.kind != "start"):
            self.state.status = _run_status(run)
        self._changed()

    def set_workspace(self, folder) -> None:
        """Another runs folder (VoCo Pretrain's setting)."""
        folder = Path(folder).expanduser().absolute()
        if folder != self.runs.workspace:
            self.runs = type(self.runs)(folder, self.runs.settings, self.runs.start_process)
            self.select(None)
            self.refresh_runs()

    def select(self, run) -> None:
        """Follow ``run`` (a folder, name or RunInfo; None: none): its curves are read in the background."""
        path = str(self.runs.run_dir(run)) if run else None
        if path == self.state.selected:
            return
        self.state.selected = path
        self.curves, self._columns, self._tail = None, None, None
        if path is not None:
            self._background.append(CurvesJob(path).start())
        self._changed()

    def start(self, data, preset: str = "demo", backbone: str = "swinunetr-tiny", steps: int = 200,
              batch_size: int = 1, device: str = "auto", name: str | None = None,
              checkpoint_every: int | None = None) -> Path:
        """Start pretraining on paths and/or volume nodes (written into the run's ``inputs/`` in the
        background); returns the run folder, which is selected."""
        if self._job is not None:
            raise ValueError("wait for the running job to finish")
        items = [data] if isinstance(data, (str, Path)) or hasattr(data, "GetImageData") else list(data)
        paths = [str(item) for item in items if not hasattr(item, "GetImageData")]
        volumes = [snapshot(item) for item in items if hasattr(item, "GetImageData")]
        if not items:
            raise ValueError("pretraining needs at least one image, folder, dataset.json or list file")
        run_dir = self.runs.new_run_dir(name, PRETRAIN)

        def launch():
            try:
                inputs = run_dir / "inputs"
                for i, volume in enumerate(volumes):
                    inputs.mkdir(exist_ok=True)
                    paths.append(str(volume.write(inputs / f"{i:03d}_{file_stem(volume.name)}.nrrd")))
                return self.runs.start_pretraining(paths, preset, backbone, steps, run_dir=run_dir,
                                                   batch_size=batch_size, checkpoint_every=checkpoint_every,
                                                   device=device)
            except BaseException:
                shutil.rmtree(run_dir, ignore_errors=True)  # never launched: no run to list
                raise

        self._start(Job("start", load=launch, status=f"starting {run_dir.name}" +
                        (f" (writing {len(volumes)} volume(s))" if volumes else "")))
        self.select(run_dir)
        return run_dir

    def start_finetuning(self, init: str = "", data=None, steps: int = 300, device: str = "auto",
                         name: str | None = None, patch_size: int | None = None, batch_size: int | None = None,
                         extra_args=()) -> Path:
        """A fine-tuning run from ``init`` (a spec of ``finetune_starts``; "" for a random start) on
        ``data`` (a dataset.json or imagesTr/labelsTr folder; None: the training set); it is
        selected, and its model joins the model list when it is done (``modelReady``)."""
        if self._job is not None:
            raise ValueError("wait for the running job to finish")
        data = data or self.training_set.finetuning_data()
        run = next((r for r in self.state.runs if init and r.checkpoint == init), None)
        entry = next((m for m in self.state.models if init and m.spec == init), None)
        name = name or (f"{run.name}-seg" if run else finetuned_name(entry or init) if init else "scratch-seg")
        run_dir = self.runs.start_finetuning(data, init=init or None, steps=steps, model_name=name, device=device,
                                             name=timestamped(name), patch_size=patch_size,
                                             batch_size=batch_size, extra_args=extra_args)
        self._finetunes.add(str(run_dir))
        self.refresh_runs()
        self.select(run_dir)
        self.state.status = f"fine-tuning {name}: started {run_dir.name}"
        self._changed()
        return run_dir

    def stop(self, run=None) -> bool:
        run = run or self.state.selected
        stopped = bool(run) and self.runs.stop(run)
        self.refresh_runs()
        if stopped:
            self.state.status = f"stopping {Path(str(run)).name}: it saves a checkpoint first"
            self._changed()
        return stopped

    def resume(self, run=None, steps: int | None = None, device: str | None = None) -> Path:
        run = run or self.state.selected
        if not run:
            raise ValueError("select a run to resume")
        info = self.runs.info(run)
        path = self.runs.resume(run, steps=steps if steps and steps > (info.total or 0) else None, device=device)
        self.refresh_runs()
        return path

    def crop_layout(self, volume_node, preset: str | None = "demo", seed: int = 0, out_dir=None) -> Job:
        if volume_node is None:
            raise ValueError("select a volume")
        return self._start(crops_job(self.client, volume_node, preset, seed, out_dir))

    def positions(self, volume_node, run=None, target: int = 0, device: str | None = None, seed: int = 0,
                  out_dir=None) -> Job:
        """What a checkpoint (a pretraining run's, by default the selected one's) predicts."""
        if volume_node is None:
            raise ValueError("select a volume")
        run = run or self.state.selected
        checkpoint = self.runs.info(run).checkpoint if run and self.runs.is_run(run) else run
        if not checkpoint:
            raise ValueError("select a pretraining run with a checkpoint")
        return self._start(positions_job(self.client, volume_node, checkpoint, target, device, seed, out_dir))

    def scene_closed(self) -> None:
        """The scene's nodes are gone: curves are rebuilt on the next tick, overlays dropped."""
        if self._job is not None and self._job.kind in ("crops", "positions"):
            self._job.cancel()
        self.curves = None
        self._changed()

    # --- the timer -----------------------------------------------------------------------------

    def tick(self) -> bool:
        """Advance jobs, follow the selected run (call from the GUI thread's timer); True when anything changed."""
        self._ticks += 1
        changed = self._tick_background()
        new = self._tail.read_new() if self._tail is not None else []
        if new:
            self._columns.add_events(new)
            self.log.add(Path(self.state.selected).name, new)
        if self._columns is not None and (new or self.curves is None or not self.curves.in_scene()):
            self._show_curves()
            changed = True
        changed |= self._tick_job()
        if new or changed or self._ticks % RUNS_REFRESH_TICKS == 0:
            self.refresh_runs()
            changed = True
        elif changed:
            self._changed()
        return changed

    # --- internals -----------------------------------------------------------------------------

    def _show_job(self, job: Job) -> None:
        """The start of a run in the status line; crop layouts and positions in the overlay line."""
        if job.kind == "start":
            self.state.status = job.status
        else:
            self.state.overlay_status = job.status

    def _fail(self, message: str, overlay: bool = False) -> None:
        if overlay:
            self.state.overlay_status = f"error: {message}"
            self.errorOccurred.emit(message)
        else:
            super()._fail(message)

    def _finetunes_ended(self) -> None:
        """Fine-tuning runs started here that ended: a done one's model is new in the model list."""
        for run in [r for r in self.state.runs if r.path in self._finetunes and r.state != RUNNING]:
            self._finetunes.discard(run.path)
            package = Path(run.model or Path(run.path) / "model")
            if run.kind == FINETUNE and run.state == DONE and (package / "model.json").is_file():
                self.refresh_models()
                self.modelReady.emit(str(package))

    def _background_finished(self, job: Job) -> None:
        if job.kind == "curves" and str(job.run_dir) == self.state.selected:
            if job.succeeded:
                self._columns, self._tail = job.result
            else:
                self._fail(f"could not read the run's curves: {job.error}")

    def _show_curves(self) -> None:
        if self.curves is None or not self.curves.in_scene():
            self.curves = TrainingCurves(Path(self.state.selected).name)
        self.curves.show(self._columns)
        self.curvesReady.emit(self.curves)

    def _finish(self, job: Job) -> None:
        overlay = job.kind != "start"
        if job.cancelled:
            if overlay:
                self.state.overlay_status = "cancelled"
            else:
                self.state.status = "cancelled"
        elif not job.succeeded:
            self._fail(job.error or f"{job.kind} failed", overlay)
        elif job.kind == "start":
            self.state.status = f"started {Path(job.result).name}"
        elif job.volume_node is not None and job.volume_node.GetScene() is not None:
            prefix = f"{job.volume_node.GetName()} "
            if job.kind == "crops":
                job.nodes = overlays.layout_nodes(job.result, prefix)
                self.state.overlay_status = (f"crop layout: {len(job.nodes.bases)} base crops, "
                                             f"{len(job.nodes.targets)} targets")
            else:
                job.nodes = overlays.position_nodes(job.result, prefix)
                errors = [t["mean_abs_error"] for t in job.nodes.positions.get("targets", [])
                          if t.get("mean_abs_error") is not None]
                mean = sum(errors) / len(errors) if errors else float("nan")
                self.state.overlay_status = (f"{len(errors)} targets, mean absolute overlap error {mean:.3f}; "
                                             f"heat map: target {job.nodes.heatmap_target}")
            self.overlayReady.emit(job.kind, job.nodes, job.volume_node)


def _run_status(run) -> str:
    status = f"{run.name}: {run.state}"
    if run.step is not None and run.total:
        status += f", step {run.step} of {run.total}"
    if run.loss is not None:
        status += f", loss {run.loss:.4f}"
    if run.message:
        status += f" ({run.message})"
    return status
