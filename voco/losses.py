"""VoCo losses, vectorised over volumes, targets and base crops.

Shapes: ``logits`` and ``labels`` are ``(B, T, K)`` (volumes, targets, bases); base embeddings
are ``(B, K, D)``. Each term is averaged per volume and then over volumes, so a batch split
across DDP ranks (gradients averaged) optimises the same objective as one process.
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


def regulariser(bases: torch.Tensor) -> torch.Tensor:
    """Keep base embeddings apart: mean over pairs ``i < j`` of ``ReLU(cos(b_i, sg(b_j)))^2``."""
    unit = F.normalize(bases, dim=-1)
    similarity = F.relu(unit @ unit.detach().transpose(-1, -2)).pow(2)
    k = bases.shape[-2]
    upper = torch.ones(k, k, dtype=torch.bool, device=bases.device).triu(1)
    return similarity[:, upper].mean()


def inter_volume_loss(student_targets: torch.Tensor, student_bases: torch.Tensor, teacher_targets: torch.Tensor,
                      teacher_bases: torch.Tensor, neg_form: str) -> torch.Tensor:
    """v2's cross-volume term: the student's targets of volume i against its bases of volume j != i.

    The teacher's prediction for the same pair (detached) is the soft label, scored with the
    positive and zero-overlap terms as for the in-volume labels. Returns 0 for a single volume.
    """
    b = student_targets.shape[0]
    if b < 2:
        return student_targets.sum() * 0
    pairs = ~torch.eye(b, dtype=torch.bool, device=student_targets.device)
    # (B_i, 1, T, D) against (1, B_j, K, D) -> (B_i, B_j, T, K) -> the (i, j != i) pairs
    predicted = assign(student_targets[:, None], student_bases[None])[pairs]
    with torch.no_grad():
        soft = assign(teacher_targets[:, None], teacher_bases[None])[pairs]
    return positive_loss(predicted, soft) + zero_overlap_loss(predicted, soft, neg_form)


def voco_loss(logits, labels, student_bases, neg_form: str, inter: torch.Tensor | None = None) -> dict:
    """All terms and their sum (weights 1, as published). Keys: loss, loss_pos, loss_neg, loss_reg[, loss_inter]."""
    terms = {
        "loss_pos": positive_loss(logits, labels),
        "loss_neg": zero_overlap_loss(logits, labels, neg_form),
        "loss_reg": regulariser(student_bases),
    }
    if inter is not None:
        terms["loss_inter"] = inter
    terms["loss"] = sum(terms.values())
    return terms
