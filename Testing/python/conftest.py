"""Shared fixtures: the real volumes shipped inside PyPI wheels, and a way to run the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shipped():
    """Paths of the real sample volumes (fetched once into the user cache, checked by sha256)."""
    from voco.data.sample_data import fetch

    return {name: fetch(name) for name in ("spine-ct", "spine-mri", "mni152-t1")}


def voco_command(*args) -> list[str]:
    return [sys.executable, "-m", "voco", *map(str, args)]


def run_voco(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(voco_command(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def events(stdout: str) -> list[dict]:
    """The JSON-lines progress events of a run (every stdout line must be one)."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


class Events:
    """A reporter that keeps every event, for tests that call the engine in-process."""

    def __init__(self):
        self.seen = []

    def emit(self, event, **fields):
        self.seen.append((event, fields))

    def of(self, kind):
        return [fields for event, fields in self.seen if event == kind]


def stop_after_first_step(*args, timeout=120) -> tuple[int, list[dict]]:
    """Run ``voco ARGS --progress jsonl``, send SIGTERM once step 1 is reported; (exit code, events)."""
    process = subprocess.Popen(voco_command(*args), stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if '"event": "step"' in line and '"step": 1,' in line:
            process.send_signal(signal.SIGTERM)
    process.wait(timeout=timeout)
    return process.returncode, events("".join(lines))
