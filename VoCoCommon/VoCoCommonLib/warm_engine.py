"""The warm engine: one ``voco serve`` process per client, started on the first segmentation and
kept up, so that later ones skip starting Python, importing torch and reading the weights.

``WarmEngine.request(args)`` is what a job runs instead of a process of its own: a
``WarmRequest`` follows ProcessProtocol (process.py), sends one request and yields its events,
the last one ``exit`` as always. Only a job's worker thread waits (for the server to be ready);
the GUI thread's calls (``poll``, ``cancel``, ``close``) write a line at most.

- The server dies during a request (a crash, kill -9): that request ends with an ``error``
  event, "the engine stopped: ..." (from its stderr, as EngineProcess says it), and the next
  request starts a new server.
- The server cannot start or never gets ready (an engine without ``serve``, a broken
  interpreter): this client runs every later segmentation as a process of its own
  (EngineProcess), and says so once, in the engine log.
- ``close()`` cancels what runs, asks the server to shut down and kills it if it does not.

Example (Slicer's Python console)::

    from VoCoCommonLib.client import EngineClient
    client = EngineClient()
    request = client.segment_process(["in.nrrd", "out.nrrd", "--model", "MODEL"]).start()
    request.wait(600); request.poll()
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import threading
import time
import uuid
import weakref
from typing import Sequence

from . import events as ev
from .process import CANCEL_GRACE_S, EngineProcess, error_from_log, popen_options, stop_tree

READY_TIMEOUT_S = 300.0  # importing torch from a cold disk; a server not ready by then is not used
READY = "ready"


class WarmEngine:
    def __init__(self, settings):
        self.settings = settings
        self.unavailable: str | None = None  # why ``voco serve`` is not used, once it failed to start
        self._server: _Server | None = None
        self._starting: _Server | None = None
        self._lock = threading.Lock()        # the fields: held for moments only, so close() never waits
        self._start_lock = threading.Lock()  # one server starting at a time (in a job's thread)
        self._told = False
        self._held: list[_Server] = []  # the server, where the finalizer (which must not hold self) finds it
        weakref.finalize(self, _stop_all, self._held)  # a session dropped without close() leaves no server

    def request(self, args: Sequence[str]) -> "WarmRequest":
        """``voco segment ARGS`` as a request (not started yet)."""
        return WarmRequest(self, [str(a) for a in args])

    def close(self) -> None:
        """Stop the server (returns at once); a later request starts a new one."""
        with self._lock:
            servers = [s for s in (self._server, self._starting) if s is not None]
            self._server = self._starting = None
            self._held.clear()
        for server in servers:
            server.stop()

    def _live_server(self) -> "_Server | None":
        """The running server, started first if need be (blocks: a job's thread); None when this
        client falls back to one process per job."""
        with self._start_lock:
            with self._lock:
                if self.unavailable is not None or (self._server is not None and self._server.alive):
                    return None if self.unavailable is not None else self._server
                server = self._starting = _Server(self.settings)
            why = server.start()
            with self._lock:
                closed = self._starting is not server  # close() was called meanwhile (and stopped it)
                self._starting = None
                if not closed and why is None:
                    self._server = server
                    self._held[:] = [server]
                elif not closed:
                    self.unavailable = why
            if closed:
                server.stop()  # it may have got ready after close() asked it to stop
                raise RuntimeError("the engine was stopped as it started (the session closed)")
            return None if self.unavailable is not None else server

    def _fallback_notice(self) -> str | None:
        """The engine log's line about the fallback, the first time only."""
        with self._lock:
            if self._told:
                return None
            self._told = True
        return f"warm engine unavailable ({self.unavailable}): one engine process per segmentation from now on"


def _stop_all(servers: list) -> None:
    for server in servers:
        server.stop(grace=None)


class _Server:
    """One ``python -m voco serve`` process; routes its events to the requests by id."""

    def __init__(self, settings):
        self.command = [settings.engine_python, "-m", "voco", "serve"]
        self.env = {**os.environ, **settings.engine_environment(), "PYTHONUNBUFFERED": "1"}
        self.alive = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._process: subprocess.Popen | None = None
        self._requests: dict[str, WarmRequest] = {}  # sent, not ended; the oldest one runs
        self._stopping = False
        self._lock = threading.Lock()  # the fields; never held while writing
        self._write_lock = threading.Lock()  # whole lines in order: a request before a stop's cancel of it
        self._ready = threading.Event()
        self._ended = threading.Event()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> str | None:
        """Start it and wait until it is ready; None then, else why it is not."""
        try:
            self._process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, env=self.env, text=True, encoding="utf-8",
                                             errors="replace", bufsize=1, **popen_options())
        except OSError as exc:
            return f"{self.command[0]}: {exc.strerror or exc}"
        self.alive = True
        self._stderr_thread = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_thread.start()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.is_set() and not self._ended.is_set() and time.monotonic() < deadline:
            self._ready.wait(0.05)
        if self._ready.is_set():
            return None
        self.stop(grace=1.0)
        self._ended.wait(5)
        if self._process.returncode is None:
            return f"not ready after {READY_TIMEOUT_S:.0f} s"
        return error_from_log(self.stderr_tail, self._process.returncode)

    def send(self, request: "WarmRequest") -> bool:
        """Send ``request``; False when the server had ended or is stopping, or the write found it
        gone (the caller starts another). One that ends after this ends the request, through its reader."""
        with self._write_lock:
            with self._lock:
                if not self.alive or self._stopping:
                    return False
                self._requests[request.id] = request
            if self._write({"id": request.id, "command": "segment", "args": request.args}):
                return True
        with self._lock:
            self.alive = False  # its stdin is closed: nothing more can be asked of it
            # Unless the reader has ended the request already (then it failed with the server's words).
            return self._requests.pop(request.id, None) is None

    def cancel(self, request: "WarmRequest") -> None:
        with self._write_lock:
            self._write({"id": request.id, "cancel": True})

    def kill(self) -> None:
        """For a request that did not stop in time: the whole server goes (its requests end)."""
        if self._process is not None:
            threading.Thread(target=stop_tree, args=(self._process, 1.0), daemon=True).start()

    def stop(self, grace: float | None = CANCEL_GRACE_S) -> None:
        """Cancel what runs, ask it to shut down, kill it after ``grace`` s (None: never, as at
        interpreter shutdown, where no thread may start: the end of its stdin ends it); returns at once."""
        with self._write_lock:
            with self._lock:
                self._stopping = True  # a request not registered by now goes to another server
                running = list(self._requests.values())
            for request in running:
                request.cancel_requested = True
                self._write({"id": request.id, "cancel": True})
            self._write({"command": "shutdown"})
            try:
                self._process.stdin.close()
            except (OSError, AttributeError):
                pass
        if self._process is not None and grace is not None:
            threading.Thread(target=stop_tree, args=(self._process, grace, lambda: None), daemon=True).start()

    def _write(self, message: dict) -> bool:
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
            return True
        except (OSError, ValueError, AttributeError):  # ended, or its stdin closed already
            return False

    def _read_stderr(self) -> None:
        for line in self._process.stderr:
            line = line.rstrip("\n")
            self.stderr_tail.append(line)
            with self._lock:
                running = next(iter(self._requests.values()), None)
            if running is not None:
                running._stderr(line)

    def _read_stdout(self) -> None:
        for line in self._process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not an event (a library's print): the protocol has no use for it
            if not isinstance(event, dict):
                continue
            if event.get("event") == READY:
                self._ready.set()
                continue
            with self._lock:
                request = self._requests.get(event.get("request"))
                if request is not None and event.get("event") == ev.EXIT:
                    del self._requests[request.id]
            if request is not None:
                request._put(event)
        with self._lock:
            self.alive = False  # at once: a request sent from now on goes to a new server
        returncode = self._process.wait()
        self._stderr_thread.join(5)  # its last lines say why it ended
        with self._lock:
            orphans, self._requests = list(self._requests.values()), {}
        for request in orphans:
            request._server_ended(returncode)
        self._close_pipes()
        self._ended.set()

    def _close_pipes(self) -> None:
        with self._write_lock:
            pipes = [self._process.stdin, self._process.stdout]
            if not self._stderr_thread.is_alive():
                pipes.append(self._process.stderr)
            for pipe in pipes:
                try:
                    pipe.close()
                except OSError:
                    pass


class WarmRequest:
    """One ``voco segment`` request to the client's warm engine, as a ProcessProtocol (see the
    module docstring); with the fallback it runs an EngineProcess and passes its events on."""

    def __init__(self, engine: WarmEngine, args: list[str]):
        self.engine, self.args = engine, args
        self.id = uuid.uuid4().hex[:12]
        self.command = [engine.settings.engine_python, "-m", "voco", "serve", "segment", *args]
        self.cancel_requested = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)  # this request's lines
        self._server: _Server | None = None
        self._process: EngineProcess | None = None  # the fallback
        self._events: collections.deque[dict] = collections.deque()
        self._finished = threading.Event()
        self._failed = False
        self._returncode: int | None = None

    def start(self) -> "WarmRequest":
        """Blocks until the server is ready (a job's thread calls it)."""
        for _ in range(2):  # a server that ended since its last request is replaced once
            server = self.engine._live_server()
            if server is None:
                return self._fall_back()
            if server.send(self):
                self._server = server
                return self
        raise RuntimeError("the warm engine ended twice as the request was sent")

    @property
    def pid(self) -> int | None:
        """The server's (or, with the fallback, the process's) pid."""
        return self._process.pid if self._process is not None else self._server.pid if self._server else None

    @property
    def running(self) -> bool:
        if self._process is not None:
            return self._process.running
        return self._server is not None and not self._finished.is_set()

    @property
    def returncode(self) -> int | None:
        if self._process is not None:
            return self._process.returncode
        return self._returncode if self._finished.is_set() else None

    def poll(self) -> list[dict]:
        events = []
        while self._events:
            events.append(self._events.popleft())
        if self._process is not None:
            events += self._process.poll()
        return events

    def wait(self, timeout: float | None = None) -> int | None:
        if self._process is not None:
            return self._process.wait(timeout)
        self._finished.wait(timeout)
        return self.returncode

    def cancel(self, grace: float = CANCEL_GRACE_S) -> None:
        """Ask the server to stop this request; returns at once. A request still going after
        ``grace`` seconds (a forward pass that takes longer) ends with the server killed."""
        if self._process is not None:
            self._process.cancel(grace)
            return
        if self._server is None or self._finished.is_set() or self.cancel_requested:
            return
        self.cancel_requested = True
        self._server.cancel(self)
        timer = threading.Timer(grace, lambda: None if self._finished.is_set() else self._server.kill())
        timer.daemon = True
        timer.start()

    # --- from the server's reader threads ------------------------------------------------------

    def _fall_back(self) -> "WarmRequest":
        notice = self.engine._fallback_notice()
        if notice is not None:
            self._events.append({"event": ev.LOG, "line": notice, "time": time.time()})
        self._process = EngineProcess.voco(["segment", *self.args], self.engine.settings).start()
        self.command = self._process.command
        return self

    def _stderr(self, line: str) -> None:
        self.stderr_tail.append(line)
        self._events.append({"event": ev.LOG, "line": line})

    def _put(self, event: dict) -> None:
        kind = event.get("event")
        self._failed |= kind in (ev.ERROR, ev.CANCELLED)
        if kind == ev.EXIT:
            self._returncode = int(event.get("returncode", -1))
        self._events.append(event)
        if kind == ev.EXIT:
            self._finished.set()

    def _server_ended(self, returncode: int) -> None:
        """The server ended before this request did."""
        if self.cancel_requested:
            self._put({"event": ev.CANCELLED, "message": "stopped on request", "time": time.time()})
        elif not self._failed:
            detail = (error_from_log(self.stderr_tail, returncode) if any(line.strip() for line in self.stderr_tail)
                      else f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}")
            self._put({"event": ev.ERROR, "message": f"the engine stopped: {detail}", "time": time.time(),
                       "synthesized": True})
        self._put({"event": ev.EXIT, "returncode": returncode if returncode != 0 else 1, "time": time.time()})
