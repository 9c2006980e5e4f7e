"""A tiny demo model package built on the spot (random SwinUNETR-tiny weights, seed 0), so the
segmentation workflow can be shown and tested without downloading weights. Its output means
nothing; the point is the workflow (run, progress, named coloured segments, correct, fine-tune)."""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(folder) -> Path:
    import torch

    from voco.models.segmentation import build_segmentation_network
    from voco.registry.package import Label, ModelCard, Preprocessing, write_package

    labels = [Label(1, "region A", "#dd8244", None), Label(2, "region B", "#3d9be9", None)]
    card = ModelCard(name="studio-demo", version="1", architecture="swinunetr-tiny", in_channels=1, labels=labels,
                     preprocessing=Preprocessing("mri", (6.0, 6.0, 6.0), (32, 32, 32), None))
    torch.manual_seed(0)
    network = build_segmentation_network("swinunetr-tiny", 1, len(labels) + 1)
    package = write_package(Path(folder) / "studio-demo", card, network.state_dict())
    return Path(package.folder)
