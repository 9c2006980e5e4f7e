"""The progress protocol: how a running job tells the Slicer modules, the web front end and a
person at a terminal what it is doing.

``--progress jsonl`` writes every event as one JSON object on its own line on stdout, flushed at
once. Every object has ``"event"``; the kinds and their fields are documented in README.md
("Progress protocol"). Without it a human-readable progress bar goes to stderr.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

from .signals import request_stop


def finite_or_none(value):
    """JSON has no NaN/inf; send them as null so every line stays parseable (events, metrics.jsonl)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonLinesReporter:
    """When the reader goes away (the front end closed: a broken pipe), the job is not killed by
    its next event: the rest of the output goes nowhere and training stops after a checkpoint."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def emit(self, event: str, **fields) -> None:
        record = {"event": event, "time": round(time.time(), 3)}
        record.update({k: finite_or_none(v) for k, v in fields.items()})
        try:
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        devnull = open(os.devnull, "w")
        if self.stream is sys.stdout:
            os.dup2(devnull.fileno(), sys.stdout.fileno())  # the interpreter's last flush goes nowhere too
        self.stream = devnull
        request_stop(getattr(signal, "SIGPIPE", signal.SIGTERM))


class HumanReporter:
    """One updating line for steps, ordinary lines for everything else."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def emit(self, event: str, **fields) -> None:
        if event == "step":
            self._bar(fields["step"], fields["total"], f"{fields['step']}/{fields['total']} loss {fields['loss']:.4f} "
                      f"lr {fields['lr']:.2e} {fields['samples_per_s']:.2f} vol/s eta {fields['eta_s']:.0f}s")
        elif event == "download":
            done, total = fields["bytes"], fields["total"]
            size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
            self._bar(done, total, f"{size} {fields['name']}")
        elif event == "progress":
            self._bar(fields["done"], fields["total"], f"{fields['stage']} {fields['done']}/{fields['total']}")
        else:
            details = " ".join(f"{k}={v}" for k, v in fields.items())
            self.stream.write(f"{event}: {details}\n")
        self.stream.flush()


    def _bar(self, done, total, text: str) -> None:
        """One line rewritten in place; a newline once ``done`` reaches ``total``."""
        filled = int(30 * done / total) if total else 0
        self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {text} ")
        if done == total:
            self.stream.write("\n")


class SilentReporter:
    """For processes other than rank 0 of a distributed run."""

    def emit(self, event: str, **fields) -> None:
        pass


def make_reporter(kind: str | None, rank: int = 0):
    if rank != 0:
        return SilentReporter()
    return JsonLinesReporter() if kind == "jsonl" else HumanReporter()
