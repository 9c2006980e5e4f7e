"""Files in the layouts the VoCo authors publish, for tests that cannot download the real ones.

``VoComni_B.pt`` (Hugging Face Luffy503/VoCo) is what the authors' VoComni trainer saves: a dict
with ``epoch``, ``best_acc`` and ``state_dict``, the last holding a MONAI SwinUNETR
(``use_v2=True``, 21 output channels) under its own parameter names. Written here from a freshly
initialised network of that shape, it is the published file in all but its values (and so in
all but its sha256): 298,652,107 bytes against the published 298,654,672.

The shipped registry pins the published sha256, which a written file cannot have; ``registry_for``
is the shipped registry with the sha256 of the written files instead, everything else as shipped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

SHIPPED_REGISTRY = Path(__file__).resolve().parents[1] / "Resources" / "models.json"
VOCOMNI_CLASSES = 21  # background + the 20 VoComni classes


def write_vocomni_checkpoint(path, architecture: str = "swinunetr-b", classes: int = VOCOMNI_CLASSES,
                             seed: int = 0) -> Path:
    from voco.models.segmentation import build_segmentation_network

    torch.manual_seed(seed)
    network = build_segmentation_network(architecture, 1, classes)
    path = Path(path)
    torch.save({"epoch": 1, "best_acc": 0.0, "state_dict": network.state_dict()}, path)
    return path


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def registry_for(folder, files: dict[str, Path]) -> Path:
    """The shipped registry, with the entry publishing each file name of ``files`` pinned to the
    sha256 (and size) of the written file; returns the new registry's path."""
    values = json.loads(SHIPPED_REGISTRY.read_text(encoding="utf-8"))
    for entry in values["models"]:
        written = files.get(entry["file"])
        if written is not None:
            entry["sha256"], entry["size_bytes"] = sha256_of(written), Path(written).stat().st_size
    path = Path(folder) / "models.json"
    path.write_text(json.dumps(values, indent=1), encoding="utf-8")
    return path
