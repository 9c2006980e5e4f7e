"""Fixtures of the Slicer-side tests (the client, the sessions, the widgets), loaded as a pytest
plugin (``-p slicer_fixtures``). These tests run on Python 3.11 and 3.12 (Slicer 5.10+'s) and need
no torch: the engine they start is ``$VOCO_ENGINE_PYTHON`` (default: this interpreter), a process
as in Slicer, and what they need of the engine comes from ``engine_side.py`` run there."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _path in (HERE, REPO / "Testing", REPO / "VoCoCommon", REPO / "VoCoSegmentation", REPO / "VoCoPretrain"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


class Engine:
    """The engine's interpreter, for what a test needs made there (packages, shipped samples)."""

    def __init__(self, python: str):
        self.python = python
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                                                if p)}

    def run(self, *args, timeout=600) -> str:
        done = subprocess.run([self.python, str(HERE / "engine_side.py"), *map(str, args)], capture_output=True,
                              text=True, env=self.env, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    def package(self, folder, name, labels, metrics=None) -> Path:
        return Path(self.run("package", folder, name, json.dumps(labels), json.dumps(metrics or {})))

    def toy(self, folder) -> Path:
        return Path(self.run("toy", folder))

    def vocomni(self, folder) -> Path:
        """VoComni_B.pt in the published layout; FOLDER/models.json is a registry that vouches for it."""
        return Path(self.run("vocomni", folder))

    def sample(self, name) -> Path:
        return Path(self.run("sample", name))


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine(os.environ.get("VOCO_ENGINE_PYTHON") or sys.executable)


@pytest.fixture(scope="session")
def shipped(engine):
    """The real sample volumes shipped inside PyPI wheels (fetched once, checked by sha256)."""
    return {name: engine.sample(name) for name in ("spine-ct", "spine-mri", "mni152-t1")}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """The modules' home (training set, runs) and model cache in the test's folder: nothing of the user's."""
    monkeypatch.setenv("VOCO_SLICER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VOCO_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "home"


@pytest.fixture
def mrml():
    """Real MRML (PyPI slicer-core): a fresh scene with Slicer's module logics, installed as
    ``slicer.mrmlScene`` / ``slicer.modules`` for the Lib code and ``slicer.util``."""
    from slicer_core_app import SlicerCoreApp

    app = SlicerCoreApp()
    app.install()
    yield app
    app.close()


@pytest.fixture
def slicer_gui(mrml):
    """Qt (PySide6 behind a PythonQt-compatible ``qt``), the Slicer application stand-ins and a
    fresh GUI clock, on real MRML."""
    import pythonqt
    import slicer_application

    pythonqt.install()
    pythonqt.warm_up(sorted(REPO.glob("VoCo*/Resources/UI/*.ui")))
    application = slicer_application.install()
    pythonqt.CLOCK.reset()
    pythonqt.FileDialogs.answers, pythonqt.FileDialogs.opened = [], []
    # In the whole suite this process also holds torch and MONAI from the engine's tests (Slicer's
    # does not: the engine is a process of its own); a full collection scans them, 0.13 s here, on
    # whichever GUI call it falls. Frozen, the collector scans what the modules made since.
    gc.collect()
    gc.freeze()
    try:
        yield application
    finally:
        gc.unfreeze()
