"""Every setting the VoCo modules and VoCo Studio take from the environment, read here and only
here (nnU-Net's paths.py pattern).

- ``VOCO_SLICER_HOME``: the training set and the runs (default ``~/VoCo``);
- ``VOCO_MODELS_DIR``: installed model versions (default ``~/.cache/voco/models``, as the engine's);
- ``VOCO_REGISTRY``: another model registry file for the engine (default: the extension's);
- ``VOCO_ENGINE_PYTHON``: the interpreter that runs the engine (default: ``PythonSlicer`` inside
  Slicer, else this Python);
- ``VOCO_WARM_ENGINE``: ``0`` runs every segmentation as a process of its own instead of a
  request to the warm engine (``voco serve``, kept up per front end; default on).

Example (Slicer's Python console)::

    from VoCoCommonLib.settings import read_settings
    read_settings().runs_dir
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

HOME_VARIABLE, MODELS_VARIABLE = "VOCO_SLICER_HOME", "VOCO_MODELS_DIR"
REGISTRY_VARIABLE, ENGINE_PYTHON_VARIABLE = "VOCO_REGISTRY", "VOCO_ENGINE_PYTHON"
WARM_ENGINE_VARIABLE = "VOCO_WARM_ENGINE"
_LIB = Path(__file__).resolve().parent


def _first_with(relative: str) -> Path | None:
    """The first of (installed layout: the folder that holds this package; source layout: the
    repository root) that holds ``relative``."""
    for folder in (_LIB.parent, _LIB.parent.parent):
        if (folder / relative).exists():
            return folder
    return None


@dataclass(frozen=True)
class Settings:
    home: Path
    models_dir: Path
    engine_python: str
    engine_dir: Path | None     # holds the ``voco`` package; None when it is only in site-packages
    registry: Path | None = None
    warm_engine: bool = True    # segmentations as requests to one ``voco serve`` that stays up

    @property
    def training_set_dir(self) -> Path:
        return self.home / "training-set"

    @property
    def runs_dir(self) -> Path:
        """Pretraining and fine-tuning runs of both modules: one workspace."""
        return self.home / "runs"

    @property
    def requirements_file(self) -> Path:
        folder = _first_with("Resources/requirements.txt")
        if folder is None:
            raise FileNotFoundError("Resources/requirements.txt of the VoCo extension is missing")
        return folder / "Resources" / "requirements.txt"

    def engine_environment(self) -> dict[str, str]:
        """What the engine's process gets on top of this process's environment."""
        env = {MODELS_VARIABLE: str(self.models_dir)}
        if self.registry is not None:
            env[REGISTRY_VARIABLE] = str(self.registry)
        if self.engine_dir is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.engine_dir), os.environ.get("PYTHONPATH")) if p)
        return env


def read_settings(environ=None) -> Settings:
    environ = os.environ if environ is None else environ
    home = environ.get(HOME_VARIABLE)
    models = environ.get(MODELS_VARIABLE)
    registry = environ.get(REGISTRY_VARIABLE)
    return Settings(
        home=Path(home).expanduser() if home else Path.home() / "VoCo",
        models_dir=Path(models).expanduser() if models else Path.home() / ".cache" / "voco" / "models",
        engine_python=environ.get(ENGINE_PYTHON_VARIABLE) or shutil.which("PythonSlicer") or sys.executable,
        engine_dir=_first_with("voco/__init__.py"),
        registry=Path(registry).expanduser() if registry else None,
        warm_engine=environ.get(WARM_ENGINE_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off"),
    )
