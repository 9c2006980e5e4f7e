"""Segmentation networks whose encoder half is a VoCo backbone.

The parameter names are those of the published downstream code, so the backbone keys of a VoCo
checkpoint (``swinViT.*``, ``encoder1..4``, ``encoder10`` for SwinUNETR; ``encoder.*`` for
nnU-Net's ResEnc-L UNet) land in the same-named parameters here without renaming.
"""

from __future__ import annotations

from torch import nn

from ..errors import VocoInputError
from .architectures import BACKBONES, SWIN_SIZES, is_backbone_key  # noqa: F401 (is_backbone_key: re-exported)
from .backbones import ResEncLEncoder


def build_segmentation_network(architecture: str, in_channels: int, num_classes: int) -> nn.Module:
    """A SwinUNETR (v2, as VoCo fine-tunes it) or ResEnc-L UNet with ``num_classes`` outputs
    (background included)."""
    if num_classes < 2:
        raise VocoInputError(f"a segmentation network needs at least 2 classes (background + 1), got {num_classes}")
    if architecture in SWIN_SIZES:
        from monai.networks.nets import SwinUNETR

        return SwinUNETR(in_channels=in_channels, out_channels=num_classes, use_v2=True, use_flash_attention=True,
                         **SWIN_SIZES[architecture])
    if architecture == "resencl":
        try:
            from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
        except ImportError as exc:
            raise VocoInputError("the resencl architecture needs the package dynamic-network-architectures "
                                 "(pip install --no-deps dynamic-network-architectures)") from exc
        stages = len(ResEncLEncoder.FEATURES)
        return ResidualEncoderUNet(
            input_channels=in_channels, n_stages=stages, features_per_stage=list(ResEncLEncoder.FEATURES),
            conv_op=nn.Conv3d, kernel_sizes=3, strides=[1, 2, 2, 2, 2, 2], n_blocks_per_stage=[1, 3, 4, 6, 6, 6],
            num_classes=num_classes, n_conv_per_stage_decoder=[1] * (stages - 1), conv_bias=True,
            norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    raise VocoInputError(f"unknown architecture {architecture!r}; choose one of {', '.join(BACKBONES)}")


def patch_multiple(architecture: str) -> int:
    """Window edges must be multiples of this (five 2x downsamplings)."""
    return 32
