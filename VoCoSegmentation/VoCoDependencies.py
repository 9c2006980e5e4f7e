"""Install what the VoCo engine needs into Slicer's Python, only after the user agrees.

Used by the widgets of VoCoSegmentation and VoCoPretrain (not by their Lib packages, which never
install anything). Runs on the main thread: the dialogs and pip's progress need it.

- torch comes from the PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic().installTorch``),
  which picks the build that fits the computer's NVIDIA driver (or the CPU build).
- the other packages are read from ``Resources/requirements.txt`` and installed with
  ``slicer.packaging.pip_ensure`` on Slicer 5.12+ or ``slicer.util.pip_install`` on older Slicer.
- when a package that was already imported got installed or updated, the user is told that a
  restart is needed and offered one (``slicer.util.restart``).

Example (Slicer's Python console)::

    import VoCoDependencies
    VoCoDependencies.ensureDependencies()   # True when everything is there
    VoCoDependencies.engineDir()            # the folder that holds the voco package
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import shutil
import sys
import threading
from pathlib import Path

TORCH_REQUIREMENT = ">=2.3"
REQUESTER = "VoCo"
_HERE = Path(__file__).resolve().parent


def _firstWith(relative: str) -> Path | None:
    """The first of (installed layout: beside this file, source layout: the repository root) that
    holds ``relative``."""
    for folder in (_HERE, _HERE.parent):
        if (folder / relative).exists():
            return folder
    return None


def engineDir() -> Path | None:
    """The folder to put on the engine process's PYTHONPATH (it holds ``voco/``); None when
    ``voco`` is only importable from site-packages."""
    return _firstWith("voco/__init__.py")


def requirementsPath() -> Path:
    folder = _firstWith("Resources/requirements.txt")
    if folder is None:
        raise FileNotFoundError("Resources/requirements.txt of the VoCo extension is missing")
    return folder / "Resources" / "requirements.txt"


def engineInterpreter() -> str:
    """The Python that runs the engine: PythonSlicer inside Slicer, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def readRequirements(path=None) -> list[str]:
    """Requirement lines of requirements.txt (comments, blank lines and pip options dropped)."""
    lines = Path(path or requirementsPath()).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines
            if line.strip() and not line.strip().startswith(("#", "-"))]


def _requirementName(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]


def _satisfied(requirement: str) -> bool:
    """Whether ``requirement`` is installed at an acceptable version (``packaging`` ships with Slicer)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no packaging: presence only
        Requirement = None
    name = _requirementName(requirement)
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    if Requirement is None:
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def missingRequirements(requirements=None) -> list[str]:
    """The pip requirements (torch excluded) that are not satisfied."""
    return [r for r in (readRequirements() if requirements is None else requirements) if not _satisfied(r)]


def torchMissing() -> bool:
    return not _satisfied(f"torch{TORCH_REQUIREMENT}")


def _needsRestart(names) -> list[str]:
    """Installed packages that were already imported: the old version stays loaded until a restart."""
    loaded = {module.split(".")[0].lower().replace("-", "_") for module in sys.modules}
    aliases = {"pynrrd": "nrrd"}
    return [name for name in names if aliases.get(name.lower(), name.lower().replace("-", "_")) in loaded]


def _installTorch() -> None:
    import slicer

    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError("VoCo needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                           "restart Slicer, then try again.") from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                         torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise RuntimeError("PyTorch was not installed (see the Python console for the reason).")
    slicer.app.processEvents()


def _installPip(requirements: list[str]) -> None:
    import slicer

    try:
        import slicer.packaging as packaging
    except ImportError:  # Slicer before 5.12
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        # The user has agreed already; pip_ensure shows its own restart prompt when needed.
        packaging.pip_ensure(requirements, prompt_install=False, prompt_restart=True, requester=REQUESTER)
    else:
        slicer.util.pip_install(" ".join(requirements))


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Make torch and the pip requirements importable; True when they are (already or now).

    Asks the user first (unless ``askConfirmation`` is False); raises with a message for the user
    when an install fails (call it inside ``slicer.util.tryWithErrorDisplay``); returns False when
    the user declines or Slicer must restart first."""
    import slicer

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("VoCo's dependencies can only be installed from Slicer's main thread")
    needTorch = torchMissing()
    missing = missingRequirements()
    if not needTorch and not missing:
        return True
    what = ([f"PyTorch {TORCH_REQUIREMENT} (through the PyTorch extension, which picks the GPU or CPU build)"]
            if needTorch else []) + missing
    text = ("VoCo needs these Python packages, which are not installed yet:\n\n  " + "\n  ".join(what)
            + "\n\nDownload and install them now? This can take several minutes (PyTorch is large).")
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(text, windowTitle="VoCo: install dependencies"):
        logging.info("VoCo: installing dependencies declined")
        return False
    if needTorch:
        _installTorch()
    if missing:
        _installPip(missing)
    stillMissing = (["torch"] if torchMissing() else []) + missingRequirements()
    if stillMissing:
        raise RuntimeError("These packages are still missing after installing: " + ", ".join(stillMissing))
    restart = _needsRestart(["torch"] * needTorch + [_requirementName(r) for r in missing])
    if restart:
        if slicer.util.confirmYesNoDisplay(
                "Installed packages that were already loaded (" + ", ".join(restart) + "). Slicer must restart "
                "before VoCo can use them. Restart now?", windowTitle="VoCo: restart needed"):
            slicer.util.restart()
        return False
    return True
