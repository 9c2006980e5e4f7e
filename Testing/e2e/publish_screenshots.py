"""Copies the screenshots the browser tests marked for the README (Testing/e2e/artifacts/publish/
studio_*.png, written by a passing run) to Resources/Screenshots/, 1000 px wide.

    .venv/bin/python -m pytest Testing/e2e && .venv/bin/python Testing/e2e/publish_screenshots.py
"""

import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "artifacts" / "publish"
TARGET = HERE.parents[1] / "Resources" / "Screenshots"
WIDTH = 1000


def main() -> int:
    shots = sorted(SOURCE.glob("studio_*.png"))
    if not shots:
        print(f"no studio_*.png in {SOURCE}: run the browser tests first", file=sys.stderr)
        return 1
    TARGET.mkdir(parents=True, exist_ok=True)
    for shot in shots:
        with Image.open(shot) as image:  # README-sized: a 1400 px page at WIDTH px keeps the text legible
            height = round(image.height * WIDTH / image.width)
            image.convert("RGB").resize((WIDTH, height), Image.LANCZOS).quantize(256).save(TARGET / shot.name, optimize=True)
        print(TARGET / shot.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
