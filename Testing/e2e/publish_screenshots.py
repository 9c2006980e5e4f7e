"""Copies the screenshots the browser tests marked for the README (Testing/e2e/artifacts/publish/
studio_*.png, written by a passing run) to Resources/Screenshots/.

    .venv/bin/python -m pytest Testing/e2e && .venv/bin/python Testing/e2e/publish_screenshots.py
"""

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "artifacts" / "publish"
TARGET = HERE.parents[1] / "Resources" / "Screenshots"


def main() -> int:
    shots = sorted(SOURCE.glob("studio_*.png"))
    if not shots:
        print(f"no studio_*.png in {SOURCE}: run the browser tests first", file=sys.stderr)
        return 1
    TARGET.mkdir(parents=True, exist_ok=True)
    for shot in shots:
        shutil.copyfile(shot, TARGET / shot.name)
        print(TARGET / shot.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
