"""VoCo losses, vectorised over volumes, targets and base crops.

Shapes: ``logits`` and ``labels`` are ``(B, T, K)`` (volumes, targets, bases); base embeddings
are ``(B, K, D)``. Each term is averaged per volume and then over volumes, as in the official
v1/v2 code, so a batch split across DDP ranks (gradients averaged) optimises the same objective
as one process. (nnssl pools its two prediction ratios over the whole batch instead; with
labels that sum to 1 per target, as here, only the zero-overlap ratio can differ.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def assign(targets: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Predicted overlaps: ReLU of the cosine similarity, ``(B, T, D) x (B, K, D) -> (B, T, K)``."""
    return F.relu(F.normalize(targets, dim=-1) @ F.normalize(bases, dim=-1).transpose(-1, -2))


def positive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-sum_k y_k log(1 - |y_k - p_k| + eps) / sum_k y_k`` per volume, then the mean."""
    distance = (labels - logits).abs()
    per_volume = -(labels * torch.log(1 - distance + EPS)).sum(dim=(1, 2)) / (labels.sum(dim=(1, 2)) + EPS)
    return per_volume.mean()


def zero_overlap_loss(logits: torch.Tensor, labels: torch.Tensor, form: str) -> torch.Tensor:
    """Push predictions for bases a target does not touch to 0: ``square`` (v1) or ``log`` (v2)."""
    zero = (labels == 0).to(logits.dtype)
    if form == "square":
        values = logits.pow(2)
    elif form == "log":
        values = -torch.log(1 - logits + EPS)
    else:
        raise ValueError(f"unknown zero-overlap form {form!r}")
    return ((zero * values).sum(dim=(1, 2)) / (zero.sum(dim=(1, 2)) + EPS)).mean()


def regulariser(bases: torch.Tensor, form: str = "voco") -> torch.Tensor:
    """Keep base embeddings apart, as the mean over pairs ``i < j`` of ``ReLU(cos(b_i, sg(b_j)))^2``
    (``voco``: v1 and v2, gradient through the first of each pair only) or of ``ReLU(cos(b_i, b_j))``
    (``nnssl``: gradient through both)."""
    unit = F.normalize(bases, dim=-1)
    if form == "voco":
        similarity = F.relu(unit @ unit.detach().transpose(-1, -2)).pow(2)
    elif form == "nnssl":
        similarity = F.relu(unit @ unit.transpose(-1, -2))
    else:
        raise ValueError(f"unknown regulariser {form!r}")
    k = bases.shape[-2]
    upper = torch.ones(k, k, dtype=torch.bool, device=bases.device).triu(1)
    return similarity[:, upper].mean()


def inter_volume_loss(student_targets: torch.Tensor, student_bases: torch.Tensor, teacher_targets: torch.Tensor,
                      teacher_bases: torch.Tensor, neg_form: str) -> torch.Tensor:
    """v2's cross-volume term: the student's targets of volume i against its bases of volume
    j = i + 1 (the last volume against the first; a volume alone against its own bases), as the
    official code pairs them within a process's batch.

    The teacher's prediction for the same pair (detached) is the soft label, scored with the
    positive and zero-overlap terms as for the in-volume labels.
    """
    predicted = assign(student_targets, student_bases.roll(-1, dims=0))
    with torch.no_grad():
        soft = assign(teacher_targets, teacher_bases.roll(-1, dims=0))
    return positive_loss(predicted, soft) + zero_overlap_loss(predicted, soft, neg_form)


def voco_loss(logits, labels, student_bases, neg_form: str, inter: torch.Tensor | None = None,
              regulariser_form: str = "voco") -> dict:
    """All terms and their sum (weights 1, as published). Keys: loss, loss_pos, loss_neg, loss_reg[, loss_inter]."""
    terms = {
        "loss_pos": positive_loss(logits, labels),
        "loss_neg": zero_overlap_loss(logits, labels, neg_form),
        "loss_reg": regulariser(student_bases, regulariser_form),
    }
    if inter is not None:
        terms["loss_inter"] = inter
    terms["loss"] = sum(terms.values())
    return terms
