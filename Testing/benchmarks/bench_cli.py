"""How long the commands that compute nothing take, against ``python -c "import torch"`` in the same run.

Each command runs R times as a fresh subprocess (the way the Slicer module and a terminal run it),
in turns, and its best time counts; every figure is printed in seconds and as a ratio to the best
``import torch`` of the same run (goal: under 0.25). With ``--baseline REF`` (default ``main``) the
same commands also run on that git revision's engine (``git archive`` into a temporary folder), so
the old and new figures come from one run on one machine.

    .venv/bin/python Testing/benchmarks/bench_cli.py [--repeats 5] [--baseline main | --baseline '']
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing"))
GOAL = 0.25


def commands(checkpoint: Path) -> dict[str, list[str]]:
    return {
        "voco --help": ["--help"],
        "voco models list": ["models", "list"],
        "voco models list --progress jsonl": ["models", "list", "--progress", "jsonl"],
        "voco samples list": ["samples", "list"],
        "voco checkpoint inspect": ["checkpoint", "inspect", str(checkpoint)],
        "usage error (voco pretrain --steps many)": ["pretrain", "--steps", "many"],
    }


def engine_copy(revision: str, folder: Path) -> Path:
    """The engine and its registry at ``revision``, extracted into ``folder``."""
    archive = folder / "engine.tar"
    with open(archive, "wb") as out:
        subprocess.run(["git", "archive", revision, "voco", "Resources"], cwd=REPO, stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "engine", filter="data")
    return folder / "engine"


def seconds(argv: list[str], root: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True)
    elapsed = time.perf_counter() - start
    if result.returncode not in (0, 2):
        raise RuntimeError(f"{argv} failed: {result.stderr.decode()[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command; the best counts")
    parser.add_argument("--baseline", default="main", help="git revision to compare with ('' for none)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    from published_files import write_published_layouts

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_published_layouts(Path(tmp) / "published")["VoComni_B.pt"]
        roots = {"this": REPO, **({args.baseline: engine_copy(args.baseline, Path(tmp))} if args.baseline else {})}
        runs = {("import torch", "-"): [sys.executable, "-c", "import torch"]}
        for label, root in roots.items():
            for name, argv in commands(checkpoint).items():
                runs[(name, label)] = [sys.executable, "-m", "voco", *argv]
        best = {key: float("inf") for key in runs}
        for _ in range(args.repeats):  # in turns, so that a busy spell of the machine hits every command
            for key, argv in runs.items():
                root = roots.get(key[1], REPO)
                best[key] = min(best[key], seconds(argv, root))
    torch_s = best[("import torch", "-")]
    print(f"best of {args.repeats} fresh processes; ratio = time / import torch ({torch_s:.3f} s); goal < {GOAL}")
    print(f"{'command':<44} {'engine':<8} {'s':>7} {'ratio':>6}")
    figures = []
    for (name, label), value in best.items():
        ratio = value / torch_s
        figures.append({"command": name, "engine": label, "seconds": round(value, 4), "ratio": round(ratio, 3)})
        mark = "" if name == "import torch" else ("  ok" if ratio < GOAL else "  above goal")
        print(f"{name:<44} {label:<8} {value:7.3f} {ratio:6.2f}{mark}")
    if args.json:
        Path(args.json).write_text(json.dumps({"repeats": args.repeats, "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
