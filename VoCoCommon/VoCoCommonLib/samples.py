"""The engine's real sample volumes (CT and MRI shipped inside PyPI wheels, checked by sha256),
as Slicer's SampleData module offers them.

The SampleData module would download a URL in the GUI thread; these volumes are members of
wheels, so the engine fetches them (``voco samples fetch NAME``) in a job and the module loads the
file once the job is done. ``SAMPLES`` names a subset of the engine's catalogue
(``voco.data.sample_data.SAMPLES``, which a test checks them against).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import events as ev
from .jobs import Job

CATEGORY = "VoCo"


@dataclass(frozen=True)
class SampleSource:
    engine_name: str  # in the engine's catalogue
    title: str        # the SampleData button
    node_name: str


SAMPLES = (
    SampleSource("spine-ct", "Spine CT (TPTBox)", "SpineCT"),
    SampleSource("spine-mri", "Spine T2w MRI (TPTBox)", "SpineMRI"),
    SampleSource("mni152-t1", "MNI152 T1 template (nilearn)", "MNI152T1"),
)


def sample_named(title: str) -> SampleSource:
    return next(sample for sample in SAMPLES if title in (sample.title, sample.engine_name))


class SampleJob(Job):
    """``voco samples fetch NAME`` in the background; ``path`` is the file once it is done."""

    def __init__(self, client, sample: SampleSource):
        super().__init__("sample", lambda: client.voco(["samples", "fetch", sample.engine_name]),
                         status=f"fetching the sample volume {sample.title}")
        self.sample, self.path = sample, None

    def apply(self, event: dict) -> None:
        if event.get("event") == ev.DONE:
            self.path = event.get("path")
        super().apply(event)
