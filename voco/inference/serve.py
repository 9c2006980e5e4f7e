"""``voco serve``: a warm engine. One process stays up, reads JSON-lines requests on stdin and
answers with the usual events on stdout, keeping the last networks it used loaded on their device
(``NetworkCache``), so that a front end's second segmentation costs only the segmentation.

Requests, one JSON object per line:

- ``{"id": "r1", "command": "segment", "args": [IMAGE, OUTPUT, "--model", M, ...]}``: the
  arguments of ``voco segment``, parsed by its parser (the same errors);
- ``{"id": "r1", "cancel": true}``: stop that request (queued or running); nothing is written;
- ``{"command": "shutdown"}``, or the end of stdin: answer what was asked, then exit 0.

Answers: ``{"event": "ready", "pid", "protocol", "commands", "cache_size", "devices"}`` once,
when the engine is imported and warm; then for each request its events, each with
``"request": ID``, the ``start`` event with ``"model_cache": "hit" | "miss"``, and last
``{"event": "exit", "request": ID, "returncode": N}``, N being the exit code ``voco segment``
would have had (0, 2 for bad input, 128 + 15 when cancelled). A bad request gets an ``error``
event and exit code 2; the server stays up, as it does after a request's error.

One request runs at a time, in a worker thread; later ones wait in order (a front end has one
running at a time anyway, and two segmentations at once would only share the same device). The
main thread keeps reading stdin, so a ``cancel`` arrives while a segmentation runs: it sets the
request's flag, and the request's reporter, the only callback a segmentation makes, raises
``Cancelled`` at its next progress event, before anything is written. SIGTERM / SIGINT cancel
the running and the queued requests and end the server with 128 + the signal. Fine-tuning and
pretraining keep processes of their own (a run outlives its front end).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from ..errors import VocoInputError, first_line
from ..jobs.progress import finite_or_none
from ..jobs.signals import Cancelled, cancel_on_signals

PROTOCOL = 1
CACHE_VARIABLE = "VOCO_SERVE_CACHE"
SERVED = ("segment",)
CANCELLED_CODE = 128 + int(signal.SIGTERM)
# The events at which a cancelled request stops: a segmentation's progress, all before it writes.
CANCEL_POINTS = frozenset({"download", "start", "progress", "warning"})


class Output:
    """stdout, shared by the worker (a request's events) and the main thread (refusals): whole
    lines, one at a time. ``gone`` once the reader went away (a broken pipe): nobody would see
    the results, so the requests stop."""

    def __init__(self, stream):
        self.stream = stream
        self.gone = False
        self._lock = threading.Lock()

    def emit(self, event: str, request=None, **fields) -> None:
        record = {"event": event, "time": round(time.time(), 3)}
        if request is not None:
            record["request"] = request
        record.update({k: finite_or_none(v) for k, v in fields.items()})
        line = json.dumps(record) + "\n"
        with self._lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (BrokenPipeError, OSError):
                self.gone = True


@dataclass
class Request:
    id: str | int
    command: str
    args: list[str]
    cancelled: threading.Event = field(default_factory=threading.Event)


class RequestReporter:
    """The reporter a request's command gets: its events carry the request's id, and once the
    request is cancelled its next progress event raises ``Cancelled`` (see the module docstring)."""

    def __init__(self, output: Output, request: Request, networks):
        self.output, self.request, self.networks = output, request, networks

    def emit(self, event: str, **fields) -> None:
        if event in CANCEL_POINTS and (self.request.cancelled.is_set() or self.output.gone):
            raise Cancelled(int(signal.SIGTERM))
        if event == "start":
            fields["model_cache"] = self.networks.last
        self.output.emit(event, request=self.request.id, **fields)


class Server:
    def __init__(self, output: Output, cache_size: int):
        from ..cli import build_parser
        from .network_cache import NetworkCache

        self.output = output
        self.networks = NetworkCache(cache_size)
        self.parser = build_parser()
        self._queue: queue.Queue = queue.Queue()
        self._requests: dict = {}  # id -> Request, queued or running
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="voco-serve", daemon=True)

    def start(self) -> None:
        self._worker.start()

    # --- the main thread -----------------------------------------------------------------------

    def receive(self, line: str) -> bool:
        """Take one line of stdin; False once it asks for a shutdown."""
        text = line.strip()
        if not text:
            return True
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            message = None
        if not isinstance(message, dict):
            return self._refuse(None, f"a request is one JSON object per line, got {text[:80]!r}")
        if message.get("command") == "shutdown":
            return False
        rid = message.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
            return self._refuse(None, 'every request needs an "id" (a string or a number)')
        if message.get("cancel"):
            self.cancel(rid)
            return True
        command, args = message.get("command"), message.get("args", [])
        if command not in SERVED:
            return self._refuse(rid, f"voco serve runs {', '.join(SERVED)} requests, not {command!r} "
                                     "(pretrain and finetune run as processes of their own)")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            return self._refuse(rid, '"args" must be a list of strings')
        request = Request(rid, command, args)
        with self._lock:
            taken = rid in self._requests
            if not taken:
                self._requests[rid] = request
        if taken:  # its events and a cancel could not tell the two apart
            return self._refuse(None, f"request id {rid!r} is queued or running already")
        self._queue.put(request)
        return True

    def cancel(self, rid) -> None:
        """Cancel a queued or running request; one that has ended already is left as it is."""
        with self._lock:
            request = self._requests.get(rid)
        if request is not None:
            request.cancelled.set()

    def cancel_all(self) -> None:
        with self._lock:
            for request in self._requests.values():
                request.cancelled.set()

    def finish(self) -> None:
        """Answer the requests that were asked, then stop the worker."""
        self._queue.put(None)
        self._worker.join()

    def _refuse(self, rid, message: str) -> bool:
        self.output.emit("error", request=rid, message=message)
        self.output.emit("exit", request=rid, returncode=2)
        return True

    # --- the worker thread ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                return
            returncode = 1
            try:
                returncode = self._run(request)
            finally:  # every request is answered, whatever ended it
                with self._lock:
                    self._requests.pop(request.id, None)
                self.output.emit("exit", request=request.id, returncode=returncode)
                release_device_memory()

    def _run(self, request: Request) -> int:
        from ..cli import _PATH_ERRNOS as PATH_ERRNOS
        from .segment import segment_from_args

        reporter = RequestReporter(self.output, request, self.networks)
        if request.cancelled.is_set():
            self.output.emit("cancelled", request=request.id, message="cancelled before it started")
            return CANCELLED_CODE
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # --help would print on the protocol's stdout
                args = self.parser.parse_args([request.command, *request.args])
            return segment_from_args(args, reporter, networks=self.networks)
        except VocoInputError as exc:
            return self._failed(request, str(exc), 2)
        except SystemExit:  # --help, --version: argparse printed and would exit
            return self._failed(request, "not a request: arguments that only print help", 2)
        except OSError as exc:
            if exc.errno in PATH_ERRNOS and exc.filename is not None:
                return self._failed(request, f"{exc.filename}: {exc.strerror}", 2)
            return self._crashed(request, exc)
        except Exception as exc:  # a bug: reported for this request; the server stays up for the next
            return self._crashed(request, exc)

    def _failed(self, request: Request, message: str, returncode: int) -> int:
        self.output.emit("error", request=request.id, message=" ".join(message.split()))
        return returncode

    def _crashed(self, request: Request, exc: Exception) -> int:
        traceback.print_exc(file=sys.stderr)
        return self._failed(request, f"{type(exc).__name__}: {first_line(exc)}", 1)


def release_device_memory() -> None:
    """The memory a request's windows took goes back to the device (the networks stay), so an
    idle server does not keep a large volume's share from a fine-tuning run started next."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def devices() -> list[str]:
    import torch

    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return found + ["mps"] * bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def cache_size(given: int | None) -> int:
    """``--cache-size``, else ``$VOCO_SERVE_CACHE``, else the default (2 networks)."""
    from .network_cache import DEFAULT_SIZE

    text = given if given is not None else os.environ.get(CACHE_VARIABLE, DEFAULT_SIZE)
    try:
        size = int(text)
    except ValueError:
        size = -1
    if size < 0:
        raise VocoInputError(f"the network cache size must be a whole number, 0 or more, got {text!r}")
    return size


def serve(stdin=None, stdout=None, size: int | None = None) -> int:
    """Run the server until shutdown, the end of ``stdin`` (0) or SIGTERM / SIGINT (128 + signal)."""
    # Bytes that are not UTF-8 become a request that is refused, not an error that ends the server.
    stdin = stdin or io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    stdout = stdout or sys.stdout
    size = cache_size(size)
    from . import segment  # noqa: F401  torch, MONAI and the networks imported before "ready": warm means warm

    output = Output(stdout)
    server = Server(output, size)
    server.start()
    output.emit("ready", pid=os.getpid(), protocol=PROTOCOL, commands=list(SERVED), cache_size=size,
                devices=devices())
    try:
        with cancel_on_signals():
            for line in stdin:
                if not server.receive(line):
                    break
    except Cancelled as stop:
        server.cancel_all()
        server.finish()
        return 128 + stop.signum
    server.finish()
    return 0
