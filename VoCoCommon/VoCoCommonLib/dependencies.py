"""Install what the engine needs into Slicer's Python, only after the user agrees (Slicer only).

What is missing comes from the environment probe (``environment.ProbeJob``), which the engine's
own interpreter answers; in Slicer that interpreter is PythonSlicer, so installing into Slicer's
Python is installing for the engine. Runs on the main thread: the dialogs and pip's progress
need it, and it blocks while pip works (the user asked for it and sees its progress).

- torch comes from the PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic().installTorch``),
  which picks the build that fits the computer's NVIDIA driver (or the CPU build);
- the other packages are installed with ``slicer.packaging.pip_ensure`` on Slicer 5.12+ (which
  shows its own restart prompt) or ``slicer.util.pip_install`` on 5.10/5.11;
- a restart is asked for only when a package that Slicer's own process had already imported was
  installed or updated. torch never counts: it runs in the engine's process only, and
  PyTorchUtils imports it while installing it (which made every torch install ask for a needless
  restart and abort the action).

Example (Slicer's Python console)::

    from VoCoCommonLib import dependencies
    dependencies.install(["torch", "monai>=1.4"])   # asks first; True when usable now
"""

from __future__ import annotations

import logging
import re
import sys
import threading

TORCH_REQUIREMENT = ">=2.3"
REQUESTER = "VoCo"
_IMPORT_NAMES = {"pynrrd": "nrrd"}  # pip name -> import name, where they differ


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]


def _imported(names, loaded: set[str]) -> list[str]:
    """Which of the pip ``names`` were imported in this process (``loaded``: top-level module names)."""
    return [name for name in names
            if _IMPORT_NAMES.get(name.lower(), name.lower().replace("-", "_")) in loaded and name.lower() != "torch"]


def _install_torch() -> None:
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError("VoCo needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                           "restart Slicer, then try again.") from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                         torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise RuntimeError("PyTorch was not installed (see the Python console for the reason).")


def _install_pip(requirements: list[str]) -> bool:
    """True when Slicer's own restart prompt (pip_ensure, 5.12+) already dealt with restarting."""
    import slicer

    try:
        import slicer.packaging as packaging
    except ImportError:  # Slicer before 5.12
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(requirements, prompt_install=False, prompt_restart=True, requester=REQUESTER)
        return True
    slicer.util.pip_install(" ".join(requirements))
    return False


def install(missing: list[str], ask: bool = True) -> bool:
    """Install ``missing`` (the probe's list: "torch" and pip requirement strings); True when
    they are installed and usable without a restart. Asks first (unless ``ask`` is False);
    raises with a message for the user when an install fails; returns False when the user
    declines or Slicer must restart first."""
    import slicer

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("VoCo's dependencies can only be installed from Slicer's main thread")
    if not missing:
        return True
    need_torch = "torch" in missing
    pip = [r for r in missing if requirement_name(r).lower() != "torch"]
    what = ([f"PyTorch {TORCH_REQUIREMENT} (through the PyTorch extension, which picks the GPU or CPU build)"]
            if need_torch else []) + pip
    text = ("VoCo needs these Python packages, which are not installed yet:\n\n  " + "\n  ".join(what)
            + "\n\nDownload and install them now? This can take several minutes (PyTorch is large).")
    if ask and not slicer.util.confirmOkCancelDisplay(text, windowTitle="VoCo: install dependencies"):
        logging.info("VoCo: installing dependencies declined")
        return False
    loaded = {module.split(".")[0].lower() for module in list(sys.modules)}  # before anything is installed
    if need_torch:
        _install_torch()
    restart_handled = _install_pip(pip) if pip else False
    restart = [] if restart_handled else _imported([requirement_name(r) for r in pip], loaded)
    if restart:
        if slicer.util.confirmYesNoDisplay(
                "Installed packages that were already loaded (" + ", ".join(restart) + "). Slicer must restart "
                "before VoCo can use them. Restart now?", windowTitle="VoCo: restart needed"):
            slicer.util.restart()
        return False
    return True
