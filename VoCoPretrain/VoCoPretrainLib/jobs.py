"""The pretraining module's one-shot jobs: ``voco crops`` (the crop layout of a volume) and
``voco positions`` (what a checkpoint predicts for the target crops), plus loading a run's
curves. The volume is handed over and the output files are read in the job's worker thread;
the overlay nodes are made on the GUI thread once the job has finished.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from VoCoCommonLib.jobs import Job
from VoCoCommonLib.volumes import snapshot

from . import overlays
from .curves import CurveColumns


def file_stem(name: str) -> str:
    """A node name as a safe file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "volume") or "volume"


class OverlayJob(Job):
    """``voco crops`` or ``voco positions`` on a volume node; ``result`` is the OverlayFiles read back."""

    def __init__(self, client, kind: str, volume_node, args, out_dir=None):
        volume = snapshot(volume_node)
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix=f"voco-{kind}-"))
        image = self.out_dir / "input" / f"{file_stem(volume.name)}.nrrd"

        def prepare():
            image.parent.mkdir(parents=True, exist_ok=True)
            volume.write(image)

        read = overlays.read_layout if kind == "crops" else overlays.read_positions
        super().__init__(kind, lambda: client.voco([kind, image, "--out", self.out_dir, *map(str, args)]),
                         prepare=prepare, load=lambda: read(self.out_dir),
                         status="drawing the crop layout" if kind == "crops" else "predicting target positions")
        self.volume_node = volume_node
        self.nodes = None  # LayoutNodes / PositionNodes, once the session made them


def crops_job(client, volume_node, preset: str | None = None, seed: int = 0, out_dir=None) -> OverlayJob:
    args = ["--seed", seed] + (["--preset", preset] if preset else [])
    return OverlayJob(client, "crops", volume_node, args, out_dir)


def positions_job(client, volume_node, checkpoint, target: int = 0, device: str | None = None, seed: int = 0,
                  out_dir=None) -> OverlayJob:
    args = ["--checkpoint", checkpoint, "--seed", seed, "--target", target] + (["--device", device] if device else [])
    return OverlayJob(client, "positions", volume_node, args, out_dir)


class CurvesJob(Job):
    """A run's history read into CurveColumns in the background (a long run has many lines)."""

    def __init__(self, run_dir):
        super().__init__("curves", load=lambda: CurveColumns.from_run(run_dir), status="reading the run's curves")
        self.run_dir = Path(run_dir)
