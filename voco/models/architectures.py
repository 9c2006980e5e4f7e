"""The architectures' names and the parameter prefixes of their encoders, as plain data.

Kept apart from the networks (``backbones``, ``segmentation``) so that the command line's choices,
the model cards and the registry check names, and ``voco checkpoint inspect`` tells a backbone key,
without importing torch or MONAI.
"""

from __future__ import annotations

# MONAI SwinUNETR sizes of the published models (feature_size 48 / 96 / 192). Tiny is ours, for
# CPU tests and the demo: at feature size 12 the cost is the 7^3-token attention windows, so it
# uses 4^3 windows (10x faster on 64^3 crops), and group norm so that it also runs on 32^3 crops,
# whose bottleneck map is a single voxel that instance norm cannot normalise.
SWIN_SIZES = {
    "swinunetr-tiny": {"feature_size": 12, "window_size": 4, "norm_name": ("group", {"num_groups": 3})},
    "swinunetr-b": {"feature_size": 48},
    "swinunetr-l": {"feature_size": 96},
    "swinunetr-h": {"feature_size": 192},
}
BACKBONES = (*SWIN_SIZES, "resencl")

# Encoder parameter prefixes: what a pretrained backbone checkpoint provides.
SWIN_BACKBONE_PREFIXES = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
RESENC_BACKBONE_PREFIXES = ("encoder.",)


def backbone_prefixes(architecture: str) -> tuple[str, ...]:
    return RESENC_BACKBONE_PREFIXES if architecture == "resencl" else SWIN_BACKBONE_PREFIXES


def is_backbone_key(architecture: str, key: str) -> bool:
    return key.startswith(backbone_prefixes(architecture))
