"""The VoCo network: a backbone and projection head (the student), an EMA teacher, and the
forward pass that turns a batch of crops into overlap predictions and loss terms.

Crops arrive per volume as ``(B, K + T, C, e, e, e)``: the K base crops first, then the T
targets. By default the projection head normalises over the crops of one volume, so each volume
is treated the same whether it shares a process with others or not (DDP splits volumes); the
preset's ``norm_scope="batch"`` normalises over all crops of the process, as the official code.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..presets import Preset
from .backbones import build_backbone


class ProjectionHead(nn.Module):
    """Three linear layers with ReLU; the first two normalised without learnable affine.

    ``norm="batch"`` normalises each feature over crops (VoCo's BatchNorm1d without affine or
    running statistics): those of one volume (``scope="volume"``) or all in the batch
    (``scope="batch"``, as the official code); ``"instance"`` normalises each vector (nnssl's
    InstanceNorm1d on a ``(crops, features)`` matrix).
    """

    def __init__(self, in_dim: int, width: int, norm: str, scope: str = "volume"):
        super().__init__()
        self.layer1, self.layer2, self.layer3 = nn.Linear(in_dim, width), nn.Linear(width, width), nn.Linear(width, width)
        self.norm_dim = -1 if norm == "instance" else {"volume": 1, "batch": (0, 1)}[scope]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=self.norm_dim, keepdim=True)
        var = x.var(dim=self.norm_dim, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, width)
        x = F.relu(self._normalise(self.layer1(x)))
        x = F.relu(self._normalise(self.layer2(x)))
        return self.layer3(x)


class Student(nn.Module):
    """Backbone + head. ``forward`` returns the pooled embeddings and the projections."""

    def __init__(self, backbone: str, preset: Preset, in_channels: int = 1):
        super().__init__()
        self.backbone = build_backbone(backbone, in_channels)
        self.head = ProjectionHead(self.backbone.embedding_dim, preset.head_dim, preset.head_norm, preset.norm_scope)

    def forward(self, crops: torch.Tensor, keep: torch.Tensor | None = None):
        b, n = crops.shape[:2]
        embeddings = self.backbone(crops.flatten(0, 1)).view(b, n, -1)
        # v2's feature dropout: a precomputed, already rescaled keep-mask (so it is reproducible).
        projected = self.head(embeddings if keep is None else embeddings * keep)
        return embeddings, projected


class EmaTeacher(nn.Module):
    """Exponential moving average of a module: ``t = m * t + (1 - m) * s`` after each step."""

    def __init__(self, source: nn.Module, momentum: float):
        super().__init__()
        self.module = copy.deepcopy(source).requires_grad_(False)
        self.momentum = momentum

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        mine = list(self.module.parameters())
        theirs = [p.detach() for p in source.parameters()]
        torch._foreach_mul_(mine, self.momentum)
        torch._foreach_add_(mine, theirs, alpha=1 - self.momentum)

    def forward(self, x):
        return self.module(x)


def build_teacher(student: Student, preset: Preset) -> EmaTeacher | None:
    if preset.teacher == "full":
        return EmaTeacher(student, preset.ema_momentum)
    if preset.teacher == "head":
        return EmaTeacher(student.head, preset.ema_momentum)
    return None


def teacher_source(student: Student, preset: Preset) -> nn.Module:
    return student if preset.teacher == "full" else student.head


def feature_keep_mask(generator: torch.Generator, crops: int, p: float) -> torch.Tensor:
    """v2's feature dropout, drawn from the sample's generator: ``(crops, 1)``, each crop's whole
    embedding kept (scaled by ``1 / (1 - p)``) or zeroed with probability ``p``, as the official
    ``nn.Dropout1d`` does on a ``(crops, features)`` matrix (each row is one channel)."""
    return (torch.rand((crops, 1), generator=generator) >= p).float() / (1 - p)


def batch_keep_mask(generators, preset: Preset, device) -> torch.Tensor | None:
    """The feature-dropout masks of a batch, ``(B, K + T, 1)``, or None when the preset has none."""
    if preset.feature_dropout == 0:
        return None
    crops = preset.num_bases + preset.num_targets
    return torch.stack([feature_keep_mask(g, crops, preset.feature_dropout) for g in generators]).to(device)


def voco_forward(student, teacher: EmaTeacher | None, preset: Preset, crops: torch.Tensor,
                 labels: torch.Tensor | None = None, keep: torch.Tensor | None = None):
    """One VoCo pass. Returns ``(logits (B, T, K), terms)``; ``terms`` is empty without labels.

    ``student`` may be the DDP-wrapped Student; the teacher runs outside it, without gradients.
    """
    k = preset.num_bases
    embeddings, projected = student(crops, keep)
    s_bases, s_targets = projected[:, :k], projected[:, k:]
    inter = None
    if preset.teacher == "full":  # v1: symmetric assignment between student and teacher
        with torch.no_grad():
            _, t_projected = teacher(crops)
        t_bases, t_targets = t_projected[:, :k], t_projected[:, k:]
        logits = 0.5 * (losses.assign(s_targets, t_bases) + losses.assign(t_targets, s_bases))
    elif preset.teacher == "head":  # v2: shared backbone, bases from the EMA head
        with torch.no_grad():
            t_projected = teacher(embeddings.detach())
        t_bases, t_targets = t_projected[:, :k], t_projected[:, k:]
        logits = losses.assign(s_targets, t_bases)
        if preset.inter_volume:
            inter = losses.inter_volume_loss(s_targets, s_bases, t_targets, t_bases, preset.neg_loss)
    else:  # nnssl: no teacher; the prediction loss may leave the bases to the regulariser
        logits = losses.assign(s_targets, s_bases.detach() if preset.detach_bases else s_bases)
    if labels is None:
        return logits, {}
    return logits, losses.voco_loss(logits, labels, s_bases, preset.neg_loss, inter, preset.regulariser)
