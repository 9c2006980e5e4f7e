"""The engine's output as the views' collapsible log shows it: one line per event and per line
the engine wrote on stderr, the newest ``MAX_LINES`` kept.

A view remembers how many lines it has shown (``total`` when it last looked) and appends only
``since(shown)``: a poll costs the new lines, however long the session.
"""

from __future__ import annotations

import collections
import json
import time

from . import events as ev

MAX_LINES = 2000
# Fields every event has, or that the line says already.
_QUIET = {"event", "time", "line", "message"}


class EngineLog:
    def __init__(self, max_lines: int = MAX_LINES):
        self.lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self.total = 0  # lines ever added

    def add(self, source: str, events: list[dict]) -> None:
        """The events of a job or run called ``source`` (e.g. "segment", a run's name)."""
        for event in events:
            self.lines.append(f"{_clock(event)} {source}: {describe(event)}")
            self.total += 1

    def since(self, shown: int) -> list[str]:
        """The lines added after the first ``shown`` (all that are kept, if more were dropped)."""
        new = self.total - shown
        return list(self.lines)[-new:] if 0 < new <= len(self.lines) else list(self.lines) if new > 0 else []

    def text(self) -> str:
        return "\n".join(self.lines)


def describe(event: dict) -> str:
    kind = event.get("event", "?")
    if kind == ev.LOG:
        return str(event.get("line", ""))
    fields = {k: v for k, v in event.items() if k not in _QUIET and v is not None}
    text = kind + (f": {event['message']}" if event.get("message") else "")
    if fields:
        text += " " + " ".join(f"{k}={_short(v)}" for k, v in fields.items())
    return text


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _clock(event: dict) -> str:
    stamp = event.get("time")
    return time.strftime("%H:%M:%S", time.localtime(stamp if isinstance(stamp, (int, float)) else time.time()))
