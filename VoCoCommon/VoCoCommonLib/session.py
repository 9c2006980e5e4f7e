"""What both modules' sessions share (VoCoSegmentationLib.session, VoCoPretrainLib.session): the
client, the engine's environment asked in the background, jobs in the background, the history of
jobs (VoCo Studio's jobs table), the one job the status line follows, and the two signals every
view connects: ``changed()`` and ``errorOccurred(message)``, and the engine log every job's events
and stderr lines go to (``log``). A session's ``state`` has ``environment``, ``status`` and ``job``
(the kind of the job the status line follows), ``models`` and ``models_loading`` (the model
list both modules offer, from the engine's registry and the workspace ``runs``)."""

from __future__ import annotations

import time

from .engine_log import EngineLog
from .environment import ProbeJob
from .jobs import Job
from .models import ModelsJob
from .signalling import Signal


class Session:
    def __init__(self, client, state):
        self.client = client
        self.state = state
        self.changed, self.errorOccurred = Signal(), Signal()
        self.history: list[Job] = []          # every job of this session, oldest first
        self._job: Job | None = None          # the job the status line (and a progress bar) follows
        self._background: list[Job] = []      # jobs no button waits for (the probe, model lists, ...)
        self.log = EngineLog()

    def probe_environment(self) -> None:
        """Ask the engine's Python what it has (devices, packages), in the background."""
        if not any(job.kind == "environment" for job in self._background):
            self.state.environment = None
            self._background.append(ProbeJob(self.client).start())

    def refresh_models(self) -> None:
        """Ask the engine, in the background, for the registry's and the installed models."""
        if not any(job.kind == "models" for job in self._background):
            self.state.models_loading = True
            self._background.append(ModelsJob(self.client, self.runs.workspace).start())
        self._changed()

    def _changed(self) -> None:
        self.state.job = self._job.kind if self._job is not None else None
        self.changed.emit()

    def _start(self, job: Job) -> Job:
        if job not in self.history:
            self.history.append(job)
        self._job = job.start()
        self._show_job(job)
        self._changed()
        return job

    def wait_until(self, condition, timeout: float = 600, between=None) -> None:
        """Tick (the session's ``tick``) until ``condition()``, for the console, scripts and self-tests; it blocks, so it is
        never for the GUI (``between``: called after each tick, e.g. ``slicer.app.processEvents``)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("timed out waiting for the engine")
            self.tick()
            if between is not None:
                between()
            time.sleep(0.05)

    def _tick_job(self) -> bool:
        """Advance the followed job; a finished one goes to ``_finish``."""
        job = self._job
        if job is None:
            return False
        changed = self._update(job)
        self._show_job(job)
        if job.finished:
            self._job = None
            self._finish(job)
            changed = True
        return changed

    def _update(self, job: Job) -> bool:
        """Take a job's new events into it and into the log; True when there were any."""
        new = job.update()
        self.log.add(job.kind, new)
        return bool(new)

    def _finish(self, job: Job) -> None:
        """The followed job ended (the sessions say what it means)."""

    def _show_job(self, job: Job) -> None:
        """Where the followed job's progress goes (the sessions say)."""
        self.state.status = job.status

    def _fail(self, message: str) -> None:
        self.state.status = f"error: {message}"
        self.errorOccurred.emit(message)

    def _tick_background(self) -> bool:
        """Advance the background jobs; each finished one goes to ``_background_finished``."""
        changed = False
        for job in list(self._background):
            changed |= self._update(job)
            if not job.finished:
                continue
            self._background.remove(job)
            if job.kind == "environment":
                self.state.environment = job.environment()
                if self.state.environment.message:
                    self.state.status = self.state.environment.message
            elif job.kind == "models":
                self.state.models_loading = False
                try:
                    self.state.models = job.models()
                except RuntimeError as exc:
                    self._fail(str(exc))
                self._models_listed()
            else:
                self._background_finished(job)
        return changed

    def _models_listed(self) -> None:
        """The model list was read again (a session that waits for it says what follows)."""

    def _background_finished(self, job: Job) -> None:
        """A background job other than the probe ended (the sessions say what it means)."""
