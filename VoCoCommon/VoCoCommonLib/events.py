"""The engine's progress events as the front ends read them: their names, and JSON lines.

The engine (``python -m voco ... --progress jsonl``) writes one JSON object per line, each with
``"event"`` (README.md, "Progress protocol"). The front ends add four of their own: ``exit``
(always the last event of a process), ``launch`` (a run's attempt begins),
``stop_requested`` (the user stopped a run) and ``log`` (a line the engine wrote on stderr).
"""

from __future__ import annotations

import json
from pathlib import Path

START, STEP, PROGRESS, DONE = "start", "step", "progress", "done"
ERROR, WARNING, CANCELLED = "error", "warning", "cancelled"
VAL_DICE, DOWNLOAD, MODELS, IMPORTED = "val_dice", "download", "models", "imported"
EXIT, LAUNCH, STOP_REQUESTED, LOG = "exit", "launch", "stop_requested", "log"


def json_records(text: str) -> list[dict]:
    """The JSON objects of a JSON-lines text; blank, partial or non-object lines are skipped."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a JSON-lines file (none when it does not exist)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return json_records(text)


class JsonLinesTail:
    """Reads a JSON-lines file that another process appends to, a little at a time: each
    ``read_new()`` returns the records of the whole lines written since the last call, so a
    timer that calls it costs the new lines only, however long the file has grown."""

    def __init__(self, path):
        self.path = Path(path)
        self.offset = 0

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        return json_records(chunk[:end].decode("utf-8", errors="replace"))


def append_event(path, event: dict) -> None:
    """Append one event line (``O_APPEND``: whole lines, also beside an engine writing the same file)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")
