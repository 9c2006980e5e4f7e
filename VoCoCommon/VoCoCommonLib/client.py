"""How the front ends reach the engine: the processes a session may start, made in one place.

``EngineClient`` holds the settings (interpreter, engine folder, models folder) and a process
class (``EngineProcess`` by default; a test may hand in another that follows ProcessProtocol).
Sessions never start a process any other way. Segmentations go to the client's warm engine
(``voco serve``, warm_engine.py) unless the settings turn it off; ``close()`` stops it.

Example (Slicer's Python console)::

    from VoCoCommonLib.client import EngineClient
    client = EngineClient()
    process = client.voco(["models", "list"]).start(); process.wait(60); process.poll()
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .process import EngineProcess
from .runs import Runs
from .settings import Settings, read_settings
from .warm_engine import WarmEngine

PROBE_SCRIPT = Path(__file__).with_name("environment_probe.py")


class EngineClient:
    def __init__(self, settings: Settings | None = None, process=EngineProcess):
        self.settings = settings or read_settings()
        self.process = process
        self.warm = WarmEngine(self.settings) if self.settings.warm_engine else None

    def voco(self, args: Sequence[str]):
        """``python -m voco ARGS --progress jsonl`` (not started yet)."""
        return self.process.voco(list(args), self.settings)

    def segment_process(self, args: Sequence[str]):
        """``voco segment ARGS``: a request to the warm engine, else a process of its own (not started yet)."""
        if self.warm is not None:
            return self.warm.request(args)
        return self.voco(["segment", *args])

    def close(self) -> None:
        """The front end goes away: stop the warm engine (returns at once; runs go on)."""
        if self.warm is not None:
            self.warm.close()

    def probe(self):
        """The environment probe in the engine's interpreter: devices and missing packages."""
        return self.process.script(PROBE_SCRIPT, [self.settings.requirements_file], self.settings)

    def runs(self, workspace=None) -> Runs:
        """The runs workspace (default: the settings' one, shared by both modules)."""
        return Runs(workspace if workspace is not None else self.settings.runs_dir, self.settings)
