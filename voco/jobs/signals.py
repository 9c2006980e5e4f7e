"""How jobs react to SIGTERM / SIGINT (Slicer's Cancel button, Ctrl-C, a cluster's time limit).

Training jobs finish the current step, checkpoint and stop (``StopRequest``); nothing is lost but
the step in progress. They also stop that way when the front end that reads their progress went
away (a broken stdout, ``request_stop``) and, where a front end cannot send them a signal (a
Windows process without our console), when the file named by ``$VOCO_STOP_FILE`` appears. Jobs that produce one output file stop at once and leave nothing behind
(``cancel_on_signals`` raises ``Cancelled`` wherever the job is, and ``atomic_path`` removes its
temporary file on the way out).
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGBREAK", None)) if s is not None)
STOP_FILE_VARIABLE = "VOCO_STOP_FILE"
_requested: list[int] = []  # stops that came as no signal (see request_stop)


def request_stop(signum: int) -> None:
    """Make every ``StopRequest`` report ``signum`` (as if that signal had arrived)."""
    _requested.append(int(signum))


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the step and stops."""

    def __init__(self):
        self._signal = None
        self._previous = {}
        self._stop_file = os.environ.get(STOP_FILE_VARIABLE)

    @property
    def signal(self) -> int | None:
        """The signal that asked for the stop, or None to go on (checked once a step)."""
        if self._signal is not None:
            return self._signal
        if _requested:
            return _requested[0]
        if self._stop_file and os.path.exists(self._stop_file):
            return int(signal.SIGTERM)
        return None

    def __enter__(self):
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller handles stopping
                pass
        return self

    def _handle(self, signum, frame):
        self._signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Cancelled(BaseException):
    """Raised in the main thread by SIGTERM / SIGINT; a BaseException so that no ``except
    Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"cancelled by signal {signum}")
        self.signum = signum


def _raise_cancelled(signum, frame):
    raise Cancelled(signum)


@contextmanager
def cancel_on_signals():
    previous = {}
    for sig in SIGNALS:
        try:
            previous[sig] = signal.signal(sig, _raise_cancelled)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def signals_held_at_exit():
    """Yields ``hold()``: from that call until the block ends, SIGTERM / SIGINT wait, so that the
    files committed in between appear all together or not at all."""
    held = []

    def hold():
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        held.append(True)

    try:
        yield hold
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
