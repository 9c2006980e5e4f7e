"""Run the engine (``python -m voco ...``) in its own process and read its progress events.

Qt-free on purpose: the widget polls ``poll()`` from a ``qt.QTimer``, tests call ``wait()``.
The engine is never imported here: inside Slicer, torch may live in another Python.

Example (Slicer's Python console)::

    from VoCoSegmentationLib.process import EngineProcess
    job = EngineProcess(["models", "list"]).start()
    job.wait(60)
    print(job.poll())
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Protocol, Sequence

# After the process ends, one more event: {"event": "exit", "returncode": N}. Always the last one.
EXIT_EVENT = "exit"
_WINDOWS = sys.platform == "win32"


class ProcessProtocol(Protocol):
    """What the logic and the widgets need from a runner (a test may hand in another one)."""

    command: list[str]

    def start(self) -> "ProcessProtocol": ...

    def poll(self) -> list[dict]: ...

    def cancel(self, grace: float = 5.0) -> None: ...

    def wait(self, timeout: float | None = None) -> int | None: ...

    @property
    def running(self) -> bool: ...

    @property
    def returncode(self) -> int | None: ...


class EngineProcess:
    """``PYTHON -m voco ARGS --progress jsonl`` in a new session (process group).

    - ``poll()`` returns the JSON events that arrived since the last call, in order; the last event
      of a run is ``{"event": "exit", "returncode": N}``. When the process fails (exit code not 0)
      without an ``error`` or ``cancelled`` event, an ``error`` event is made from the last
      ``error:`` line of stderr (or its last line) just before ``exit``.
    - ``cancel()`` sends SIGTERM to the whole process group, then SIGKILL after ``grace`` seconds,
      and returns once the process has ended.
    - ``stdout_other`` keeps stdout lines that were not JSON; ``stderr_tail`` the last stderr lines.

    ``python`` defaults to ``sys.executable`` (PythonSlicer inside Slicer); ``engine_dir``, when
    given, is put in front of ``PYTHONPATH`` so that the ``voco`` package is found there.
    """

    def __init__(self, args: Sequence[str], python: str | None = None, engine_dir: str | None = None,
                 env: dict | None = None, cwd: str | None = None, stderr_lines: int = 200):
        args = [str(a) for a in args]
        if "--progress" not in args and not any(a.startswith("--progress=") for a in args):
            args += ["--progress", "jsonl"]
        self.command = [python or sys.executable, "-m", "voco", *args]
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        if engine_dir:
            self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(engine_dir), self.env.get("PYTHONPATH")) if p)
        self.cwd = cwd
        self.stdout_other: list[str] = []
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self.cancel_requested = False
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._finished = threading.Event()
        self._saw_error = False
        self._returncode: int | None = None

    # --- running ------------------------------------------------------------------------------

    def start(self) -> "EngineProcess":
        if self._process is not None:
            raise RuntimeError("this process was already started")
        options = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if _WINDOWS else {"start_new_session": True}
        self._process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, text=True,
                                         encoding="utf-8", errors="replace", bufsize=1, **options)
        self._stderr_thread = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_thread.start()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and not self._finished.is_set()

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has ended and its output has been read, else None."""
        return self._returncode if self._finished.is_set() else None

    def poll(self) -> list[dict]:
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait until the process has ended and all its output is read; the exit code, or None on timeout."""
        self._finished.wait(timeout)
        return self.returncode

    def cancel(self, grace: float = 5.0) -> None:
        """Stop the whole process tree: SIGTERM (the engine stops cleanly), SIGKILL after ``grace`` s."""
        if self._process is None or self._finished.is_set():
            return
        self.cancel_requested = True
        self._signal_group(terminate=True)
        try:
            self._process.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal_group(terminate=False)
            self._process.wait()
        self._signal_group(terminate=False, leftovers_only=True)
        self._finished.wait(grace)

    def _signal_group(self, terminate: bool, leftovers_only: bool = False) -> None:
        pid = self._process.pid
        if _WINDOWS:
            if not leftovers_only:
                subprocess.run(["taskkill", "/T", "/PID", str(pid)] + ([] if terminate else ["/F"]),
                               capture_output=True)
            return
        try:  # the group keeps the leader's pid as its id, also after the leader has exited
            os.killpg(pid, signal.SIGTERM if terminate else signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # nothing (left) in the group

    # --- reading ------------------------------------------------------------------------------

    def _read_stderr(self) -> None:
        for line in self._process.stderr:
            self.stderr_tail.append(line.rstrip("\n"))

    def _read_stdout(self) -> None:
        for line in self._process.stdout:
            self._put_line(line)
        returncode = self._process.wait()
        self._stderr_thread.join(5)
        if returncode != 0 and not self._saw_error:
            if self.cancel_requested:
                self._put({"event": "cancelled", "message": "stopped on request", "time": time.time()})
            else:
                self._put({"event": "error", "message": self.error_from_stderr(returncode), "time": time.time(),
                           "synthesized": True})
        self._returncode = returncode
        self._put({"event": EXIT_EVENT, "returncode": returncode, "time": time.time()})
        self._finished.set()

    def _put_line(self, line: str) -> None:
        text = line.strip()
        if not text:
            return
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict) or "event" not in event:
            self.stdout_other.append(text)
            return
        self._put(event)

    def _put(self, event: dict) -> None:
        if event.get("event") in ("error", "cancelled"):
            self._saw_error = True
        self._events.put(event)

    def error_from_stderr(self, returncode: int) -> str:
        lines = [line.strip() for line in self.stderr_tail if line.strip()]
        for line in reversed(lines):
            if line.startswith("error:"):
                return line[len("error:"):].strip()
        if returncode < 0:
            return f"the engine was stopped by signal {-returncode}"
        return lines[-1] if lines else f"the engine exited with code {returncode}"
