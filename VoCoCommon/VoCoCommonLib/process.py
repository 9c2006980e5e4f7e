"""The engine's processes: started in a process group of their own, read as JSON-lines events,
stopped as a tree.

Qt-free on purpose: a front end polls ``poll()`` from its timer; nothing here blocks the caller
(``cancel`` returns at once; the waiting happens in a thread). The engine is never imported
here: inside Slicer, torch lives in another process.

Why the whole tree: inside Slicer the engine's interpreter is ``PythonSlicer``, a CTKAppLauncher
that starts ``python-real`` as its child and has no SIGTERM handler. A SIGTERM ends the launcher
at once while the engine (its child) is still writing its checkpoint, so waiting for the
launcher alone and then killing the group would kill the engine mid-write. ``stop_tree`` notes
every descendant (psutil) before it signals, and waits for all of them.

Example (Slicer's Python console)::

    from VoCoCommonLib.process import EngineProcess
    from VoCoCommonLib.settings import read_settings
    job = EngineProcess.voco(["models", "list"], read_settings()).start()
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
from typing import Callable, Protocol, Sequence

from . import events as ev

WINDOWS = sys.platform == "win32"
CANCEL_GRACE_S = 10.0  # a segmentation stops at once; a training step may need a few seconds first


class ProcessProtocol(Protocol):
    """What the sessions need from a runner (a test may hand in another one)."""

    command: list[str]

    def start(self) -> "ProcessProtocol": ...

    def poll(self) -> list[dict]: ...

    def cancel(self, grace: float = CANCEL_GRACE_S) -> None: ...

    def wait(self, timeout: float | None = None) -> int | None: ...

    @property
    def running(self) -> bool: ...

    @property
    def returncode(self) -> int | None: ...


def popen_options() -> dict:
    """A process group of its own (so that a stop reaches the launcher and the engine), and on
    Windows no console window, as ``slicer.util.launchConsoleProcess`` does."""
    if WINDOWS:
        info = subprocess.STARTUPINFO()
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP, "startupinfo": info}
    return {"start_new_session": True}


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _terminate_group(pid: int) -> None:
    """SIGTERM to the group (POSIX): the engine checkpoints or cancels; Windows has no such signal
    for a process without our console, so runs are asked through their stop file instead."""
    if WINDOWS:
        return
    try:  # the group keeps the leader's pid as its id, also after the leader has exited
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def stop_tree(popen: subprocess.Popen, grace: float, ask: Callable[[], None] | None = None) -> None:
    """Ask the process tree of ``popen`` to stop (``ask``, default SIGTERM to its group), wait up
    to ``grace`` seconds for every process of it, then kill what is left. Blocks: call it from a
    thread. Our own child is waited for through ``popen`` (so its exit code stays ours to read)."""
    descendants = _descendants(popen.pid)
    (ask or (lambda: _terminate_group(popen.pid)))()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if popen.poll() is not None and not any(_running(p) for p in descendants):
            return
        time.sleep(0.05)
    for process in descendants:
        if _running(process):
            try:
                process.kill()
            except Exception:  # gone meanwhile
                pass
    if popen.poll() is None:
        popen.kill()
    popen.wait()


class EngineProcess:
    """``PYTHON ARGV...`` in a new process group, its stdout read as events.

    - ``poll()`` returns the JSON events that arrived since the last call, in order; the last event
      is always ``{"event": "exit", "returncode": N}``. When the process fails (exit code not 0)
      without an ``error`` or ``cancelled`` event, an ``error`` event is made from the last
      ``error:`` line of stderr (or its last line) just before ``exit``.
    - ``cancel()`` stops the whole tree (see ``stop_tree``) in a thread and returns at once.
    - ``stdout_other`` keeps stdout lines that were not events; ``stderr_tail`` the last stderr lines.
    """

    def __init__(self, argv: Sequence[str], python: str | None = None, env: dict | None = None,
                 cwd: str | None = None, stderr_lines: int = 200):
        self.command = [python or sys.executable, *map(str, argv)]
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.cwd = cwd
        self.stdout_other: list[str] = []
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self.cancel_requested = False
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._finished = threading.Event()
        self._saw_error = False
        self._returncode: int | None = None

    @classmethod
    def voco(cls, args: Sequence[str], settings, **options) -> "EngineProcess":
        """``python -m voco ARGS --progress jsonl`` with the settings' interpreter and engine folder."""
        args = [str(a) for a in args]
        if "--progress" not in args and not any(a.startswith("--progress=") for a in args):
            args += ["--progress", "jsonl"]
        return cls(["-m", "voco", *args], python=settings.engine_python, env=settings.engine_environment(),
                   **options)

    @classmethod
    def script(cls, path, args: Sequence[str], settings, **options) -> "EngineProcess":
        """A script of ours run by the engine's interpreter (the environment probe)."""
        return cls([str(path), *map(str, args)], python=settings.engine_python, env=settings.engine_environment(),
                   **options)

    # --- running ------------------------------------------------------------------------------

    def start(self) -> "EngineProcess":
        if self._process is not None:
            raise RuntimeError("this process was already started")
        self._process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, text=True,
                                         encoding="utf-8", errors="replace", bufsize=1, **popen_options())
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
        """Wait until the process has ended and all its output is read (tests, the console)."""
        self._finished.wait(timeout)
        return self.returncode

    def cancel(self, grace: float = CANCEL_GRACE_S) -> None:
        """Stop the whole process tree; returns at once (the ``cancelled`` and ``exit`` events follow)."""
        if self._process is None or self._finished.is_set() or self.cancel_requested:
            return
        self.cancel_requested = True
        ask = (lambda: subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)],
                                      capture_output=True, **popen_options())) if WINDOWS else None
        threading.Thread(target=stop_tree, args=(self._process, grace, ask), daemon=True).start()

    # --- reading ------------------------------------------------------------------------------

    def _read_stderr(self) -> None:
        for line in self._process.stderr:
            self.stderr_tail.append(line.rstrip("\n"))
            self._events.put({"event": ev.LOG, "line": line.rstrip("\n")})  # the views' engine log

    def _read_stdout(self) -> None:
        for line in self._process.stdout:
            self._put_line(line)
        returncode = self._process.wait()
        self._stderr_thread.join(5)
        if returncode != 0 and not self._saw_error:
            if self.cancel_requested:
                self._put({"event": ev.CANCELLED, "message": "stopped on request", "time": time.time()})
            else:
                self._put({"event": ev.ERROR, "message": error_from_log(self.stderr_tail, returncode),
                           "time": time.time(), "synthesized": True})
        self._returncode = returncode
        self._put({"event": ev.EXIT, "returncode": returncode, "time": time.time()})
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
        if event.get("event") in (ev.ERROR, ev.CANCELLED):
            self._saw_error = True
        self._events.put(event)


def error_from_log(lines, returncode: int) -> str:
    """The engine's own one-line error (``error: ...``) among its stderr lines, else the last line."""
    lines = [line.strip() for line in lines if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    if returncode < 0:
        return f"the engine was stopped by signal {-returncode}"
    return lines[-1] if lines else f"the engine exited with code {returncode}"


def start_logged(command: Sequence[str], env: dict, stdout_path, stderr_path) -> subprocess.Popen:
    """A process whose stdout and stderr are appended to files, not piped to us: it outlives the
    front end that started it (Slicer closed, a broken pipe), and its events stay on disk."""
    with open(stdout_path, "ab") as stdout, open(stderr_path, "ab") as stderr:
        return subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, **popen_options())
