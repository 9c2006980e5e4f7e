"""A job: one piece of work a front end starts and then only watches, never waits for.

A job runs in a worker thread of its own, in up to three phases: ``prepare`` (e.g. write the
input volume for the engine), the engine's process (its events, in order), and ``load`` (e.g.
read the engine's output files). The GUI thread only calls ``update()`` from its timer: it
takes the events that arrived and updates ``fraction``, ``status``, ``error``; the last event is
always ``exit``, after ``load`` has finished, so a finished job's ``result`` is ready to show.
``cancel()`` returns at once; the worker stops the process tree and the job ends ``cancelled``.

Example (Slicer's Python console)::

    from VoCoCommonLib.client import EngineClient
    from VoCoCommonLib.jobs import Job
    job = Job("models", lambda: EngineClient().voco(["models", "list"])).start()
    job.wait(60); [e["event"] for e in job.events]
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from . import events as ev


class Job:
    """See the module docstring. Subclasses refine ``apply`` to say more about their events."""

    def __init__(self, kind: str, make_process: Callable | None = None, prepare: Callable | None = None,
                 load: Callable | None = None, status: str = "starting"):
        self.kind = kind
        self.make_process, self.prepare, self.load = make_process, prepare, load
        self.fraction = 0.0
        self.status = status
        self.error: str | None = None
        self.cancelled = False
        self.returncode: int | None = None
        self.events: list[dict] = []
        self.warnings: list[str] = []
        self.result = None            # what ``load`` returned
        self.process = None
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the GUI thread ------------------------------------------------------------------------

    def start(self) -> "Job":
        self._thread = threading.Thread(target=self._work, name=f"voco-job-{self.kind}", daemon=True)
        self._thread.start()
        return self

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and self.error is None and not self.cancelled

    @property
    def cancelling(self) -> bool:
        return self._cancel.is_set() and not self.finished

    def update(self) -> list[dict]:
        """Take the events that arrived and apply them; returns them, with the engine's stderr
        lines (``log`` events, which ``events`` leaves out). Never blocks."""
        new = []
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                return new
            if event.get("event") != ev.LOG:
                self.events.append(event)
                self.apply(event)
            new.append(event)

    def cancel(self) -> None:
        """Ask the job to stop; returns at once (the worker stops the engine's process tree). A job
        that was never started (a queued one) ends cancelled at once."""
        if not self.started:
            self.cancelled, self.status, self.returncode = True, "cancelled", 1
        elif not self.finished:
            self._cancel.set()
            self.status = "cancelling"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (tests, the console); True when finished."""
        if self._thread is not None:
            self._thread.join(timeout)
        self.update()
        return self.finished

    def apply(self, event: dict) -> None:
        kind = event.get("event")
        if kind == ev.WARNING:
            self.warnings.append(event.get("message", ""))
            self.status = f"warning: {event.get('message', '')}"
        elif kind == ev.ERROR:
            self.error = event.get("message") or "the engine failed"
            self.status = f"error: {self.error}"
        elif kind == ev.CANCELLED:
            self.cancelled = True
            self.status = "cancelled"
        elif kind == ev.DOWNLOAD:  # a model fetched on first use: the progress bar shows the download
            percent = event.get("percent")
            if percent is not None:
                self.fraction = min(1.0, max(0.0, percent / 100))
            self.status = f"downloading {event.get('name', 'model')}" + (f" {percent:.0f} %" if percent is not None else "")
        elif kind == ev.EXIT:
            self.returncode = int(event.get("returncode", -1))
            if self.returncode != 0 and not self.error and not self.cancelled:
                self.error = f"the engine exited with code {self.returncode}"
                self.status = f"error: {self.error}"
            elif self.succeeded:
                self.fraction = 1.0

    # --- the worker thread ---------------------------------------------------------------------

    def _post(self, event: str, **fields) -> None:
        self._queue.put({"event": event, "time": round(time.time(), 3), **fields})

    def _work(self) -> None:
        returncode = 0
        try:
            if self.prepare is not None:
                self.prepare()
            if self._cancel.is_set():
                self._post(ev.CANCELLED, message="cancelled before the engine started")
                returncode = 1
            elif self.make_process is not None:
                returncode = self._run_process()
            if returncode == 0 and self.load is not None and not self._cancel.is_set():
                self.result = self.load()
            elif returncode == 0 and self._cancel.is_set():
                self._post(ev.CANCELLED, message="cancelled")
                returncode = 1
        except Exception as exc:  # reported to the user as the job's error
            self._post(ev.ERROR, message=str(exc) or type(exc).__name__)
            returncode = returncode or 1
        finally:
            self._post(ev.EXIT, returncode=returncode)

    def _run_process(self) -> int:
        self.process = self.make_process().start()
        cancel_sent, failed = False, False
        while True:
            for event in self.process.poll():
                if event.get("event") == ev.EXIT:
                    return 1 if failed and event.get("returncode") == 0 else int(event.get("returncode", -1))
                failed |= event.get("event") in (ev.ERROR, ev.CANCELLED)
                self._queue.put(event)
            if self._cancel.is_set() and not cancel_sent:
                self.process.cancel()
                cancel_sent = True
            self.process.wait(0.05)
