"""Encoders that turn a crop into one pooled multi-scale embedding vector.

Parameter names follow the published checkpoints so their weights load by name: the SwinUNETR
encoder keeps MONAI's ``swinViT`` / ``encoder1..4`` / ``encoder10`` (as in VoCo_*_SSL_head.pt),
ResEnc-L keeps ``encoder.stem`` / ``encoder.stages`` (as in nnssl's ``network_weights``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import VocoInputError
from .architectures import BACKBONES, SWIN_SIZES


def check_input_edge(name: str, edge: int) -> None:
    """Instance norm needs more than one voxel in the deepest map (1/32 of the input edge): the
    published backbones need crops of at least 64 voxels; tiny (group norm) runs on 32."""
    smallest = 32 if name == "swinunetr-tiny" else 64
    if edge < smallest or edge % 32:
        raise VocoInputError(f"the {name} backbone needs crops of at least {smallest} voxels in multiples of 32, "
                             f"got {edge}; set --crop-edge")


class SwinEncoder(nn.Module):
    """MONAI SwinUNETR's encoder half (``use_v2=True``): the Swin transformer plus the residual
    blocks on the input, the first three stages and the bottleneck. The embedding is the global
    average pool of those five maps, concatenated: ``24 * feature_size`` values (1152 for B)."""

    def __init__(self, in_channels: int = 1, feature_size: int = 48, window_size: int = 7,
                 norm_name: str | tuple = "instance"):
        super().__init__()
        from monai.networks.blocks import UnetrBasicBlock
        from monai.networks.nets.swin_unetr import SwinTransformer

        # Fused scaled-dot-product attention: same weights and results, less time and memory.
        self.swinViT = SwinTransformer(
            in_chans=in_channels, embed_dim=feature_size, window_size=(window_size,) * 3, patch_size=(2, 2, 2),
            depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), use_v2=True, spatial_dims=3, use_flash_attention=True)

        def block(cin, cout):
            return UnetrBasicBlock(spatial_dims=3, in_channels=cin, out_channels=cout, kernel_size=3,
                                   stride=1, norm_name=norm_name, res_block=True)

        f = feature_size
        self.encoder1 = block(in_channels, f)
        self.encoder2 = block(f, f)
        self.encoder3 = block(2 * f, 2 * f)
        self.encoder4 = block(4 * f, 4 * f)
        self.encoder10 = block(16 * f, 16 * f)
        self.embedding_dim = 24 * f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.swinViT(x)
        maps = (self.encoder1(x), self.encoder2(hidden[0]), self.encoder3(hidden[1]),
                self.encoder4(hidden[2]), self.encoder10(hidden[4]))
        return torch.cat([m.mean(dim=(2, 3, 4)) for m in maps], dim=1)


class ResEncLEncoder(nn.Module):
    """nnU-Net ResEnc-L encoder (6 stages, 32..320 features, 1-3-4-6-6-6 blocks, InstanceNorm,
    LeakyReLU) from ``dynamic-network-architectures``; all stage outputs pooled: 1120 values."""

    FEATURES = (32, 64, 128, 256, 320, 320)

    def __init__(self, in_channels: int = 1):
        super().__init__()
        try:
            from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
        except ImportError as exc:  # optional dependency
            raise VocoInputError("the resencl backbone needs the package dynamic-network-architectures "
                                 "(pip install --no-deps dynamic-network-architectures)") from exc
        self.encoder = ResidualEncoder(
            input_channels=in_channels, n_stages=6, features_per_stage=list(self.FEATURES),
            conv_op=nn.Conv3d, kernel_sizes=3, strides=[1, 2, 2, 2, 2, 2], n_blocks_per_stage=[1, 3, 4, 6, 6, 6],
            conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, return_skips=True)
        self.embedding_dim = sum(self.FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.mean(dim=(2, 3, 4)) for m in self.encoder(x)], dim=1)


def build_backbone(name: str, in_channels: int = 1) -> nn.Module:
    if name in SWIN_SIZES:
        return SwinEncoder(in_channels, **SWIN_SIZES[name])
    if name == "resencl":
        return ResEncLEncoder(in_channels)
    raise VocoInputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
