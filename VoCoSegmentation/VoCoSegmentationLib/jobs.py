"""The segmentation module's jobs: ``voco segment`` on a volume node and ``voco models import``.

A ``SegmentJob`` hands the volume over without holding up the GUI: the session takes a snapshot
(a view of the voxels and the geometry) on the GUI thread, the job's worker writes it to a
temporary NRRD, runs the engine and reads its label map back; only making the segmentation node
is left for the GUI thread, once the job has finished. Its temporary folder goes away with the
job (``clean``), whatever the outcome.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from VoCoCommonLib import events as ev
from VoCoCommonLib.jobs import Job
from VoCoCommonLib.volumes import snapshot

from .results import read_output
from .roi import roi_argument


class SegmentJob(Job):
    def __init__(self, client, volume_node, model_spec: str, device: str = "auto", fast: bool = False,
                 tta: bool = False, roi_node=None, output_node=None, name: str | None = None, temp_root=None):
        if not model_spec:
            raise ValueError("no model selected")
        volume = snapshot(volume_node)  # checks the volume; a view of its voxels, no copy
        # raw: the label map is read back at once on this machine, and compressing a 512x512x300 one took over a second
        args = ["--model", model_spec, "--device", device, "--uncompressed"]
        args += ["--fast"] * bool(fast) + ["--tta"] * bool(tta)
        if roi_node is not None:
            args += roi_argument(roi_node, volume_node)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="voco-segment-", dir=temp_root))
        self.input_path, self.output_path = self.temp_dir / "input.nrrd", self.temp_dir / "segmentation.nrrd"
        super().__init__("segment", lambda: client.segment_process([self.input_path, self.output_path, *args]),
                         prepare=lambda: volume.write(self.input_path), load=lambda: read_output(self.output_path),
                         status="handing the volume to the engine")
        self.volume_node, self.model, self.output_node, self.name = volume_node, model_spec, output_node, name
        self.node = None  # the segmentation node, once the session made it

    def apply(self, event: dict) -> None:
        kind = event.get("event")
        if kind == ev.START:
            self.fraction = 0.05
            self.status = (f"segmenting with {event.get('model')} v{event.get('version')} on {event.get('device')} "
                           f"({event.get('windows')} windows)")
        elif kind == ev.PROGRESS:
            done, total = event.get("done", 0), max(1, event.get("total") or 1)
            if event.get("stage") == "resample":
                self.fraction = 0.9 + 0.08 * done / total
                self.status = "resampling to the input grid"
            else:
                self.fraction = 0.05 + 0.85 * done / total
                self.status = f"inference: window {done} of {total}"
        elif kind == ev.DONE:
            self.fraction = 0.98
            self.status = f"done in {event.get('seconds', '?')} s; loading the result"
        else:
            super().apply(event)

    def clean(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class ImportJob(Job):
    """``voco models import PATH`` (a package folder, .zip or checkpoint); ``imported`` names the result."""

    def __init__(self, client, path):
        super().__init__("import", lambda: client.voco(["models", "import", str(path)]),
                         status=f"importing {Path(path).name}")
        self.imported: dict = {}

    def apply(self, event: dict) -> None:
        if event.get("event") == ev.IMPORTED:
            self.imported = {"name": event.get("name"), "version": str(event.get("version")), "path": event.get("path")}
            self.status = f"imported {self.imported['name']} v{self.imported['version']}"
        super().apply(event)
