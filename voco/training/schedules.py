"""Optimisers and learning-rate schedules of the published recipes."""

from __future__ import annotations

import math

import torch


def warmup_cosine(warmup: int, total: int):
    """Linear warm-up to the base rate, then cosine decay to 0 at ``total`` (VoCo v1/v2)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def poly(total: int, exponent: float = 0.9):
    """nnU-Net's polynomial decay."""
    return lambda step: (1 - min(step, total - 1) / total) ** exponent


def build_optimizer(kind: str, parameters, lr: float, steps: int, warmup: int, weight_decay: float):
    """AdamW (amsgrad) + warm-up cosine (VoCo v1/v2), or SGD Nesterov with momentum 0.99 + poly
    (nnU-Net, nnssl); warm-up is capped at a tenth of the run so that short runs still train."""
    if kind == "adamw":
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, amsgrad=True)
        schedule = warmup_cosine(min(warmup, steps // 10), steps)
    elif kind == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)
        schedule = poly(steps)
    else:
        raise ValueError(f"unknown optimizer {kind!r}")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
