"""Run by the engine's interpreter (never imported by a front end): what that Python has.

``PYTHON environment_probe.py REQUIREMENTS_TXT`` prints one JSON event::

    {"event": "environment", "python": "3.12.10", "torch": "2.13.0" | null, "problem": "...",
     "cuda_build": "12.8" | null, "cuda": [{"index", "name", "memory_gb"}], "mps": false,
     "missing": ["monai>=1.4", ...]}

It imports torch to count the GPUs, which takes seconds: the front ends run it in the
background, once when a module is entered and again after installing packages. Standard library
only (``packaging`` when present), so it answers even where nothing of VoCo's is installed.
"""

import importlib.metadata
import json
import platform
import re
import sys


def requirement_lines(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.strip() and not line.strip().startswith(("#", "-"))]


def satisfied(requirement):
    name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # presence only
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def torch_report():
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any failure to import is the answer
        return {"torch": None, "problem": f"{type(exc).__name__}: {exc}"}
    cuda = []
    try:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            cuda.append({"index": index, "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
    except Exception:  # noqa: BLE001 - a broken driver means no GPU to offer
        pass
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda": cuda, "mps": mps}


def main(argv):
    missing = [r for r in requirement_lines(argv[1]) if not satisfied(r)] if len(argv) > 1 else []
    report = {"event": "environment", "python": platform.python_version(), "missing": missing, **torch_report()}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
