"""Fine-tuning patches: which patch of which case each sample takes, and its augmentation.

Every draw is a function of ``(seed, step, index)`` and of the cases' shapes and foreground
samples, nothing else, so the cases may be tensors in memory or files of a store read by
DataLoader workers (cases of the same shapes give the same patches either way), and a resumed
run draws what an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

FOREGROUND_SAMPLE = 20000  # centres to choose foreground patches from: enough, and memory stays small


class PatchSource(Protocol):
    shape: tuple[int, int, int]
    foreground: Sequence  # (N, 3) voxel indices with a foreground class


@dataclass
class PatchDraw:
    case: int  # index into the training cases
    start: tuple[int, int, int]
    flips: list[int]  # tensor axes (1..3) to mirror
    scale: float
    shift: float


def foreground_sample(foreground: torch.Tensor) -> torch.Tensor:
    """Indices ``(N, 3)`` of the true voxels of ``foreground`` ``(X, Y, Z)``: all of them, or a
    fixed random sample of ``FOREGROUND_SAMPLE``."""
    indices = torch.nonzero(foreground)
    if len(indices) > FOREGROUND_SAMPLE:
        chosen = torch.randperm(len(indices), generator=torch.Generator().manual_seed(0))[:FOREGROUND_SAMPLE]
        indices = indices[chosen]
    return indices


def draw_patch(cases: Sequence[PatchSource], edge: int, positive_fraction: float, seed: int, step: int,
               index: int) -> PatchDraw:
    """Sample ``index`` of ``step``: a case, a patch of ``edge`` voxels centred on foreground with
    probability ``positive_fraction`` (anywhere otherwise), mirrorings and an intensity change."""
    rng = np.random.default_rng([seed, step, index])
    chosen = int(rng.integers(len(cases)))
    case = cases[chosen]
    shape = np.array(case.shape)
    if rng.random() < positive_fraction and len(case.foreground):
        centre = np.asarray(case.foreground[rng.integers(len(case.foreground))], dtype=np.int64)
    else:
        centre = rng.integers(0, shape)
    start = np.clip(centre - edge // 2, 0, shape - edge)
    flips = [axis + 1 for axis in range(3) if rng.random() < 0.5]
    scale = rng.uniform(0.9, 1.1)
    return PatchDraw(chosen, tuple(int(s) for s in start), flips, scale, rng.uniform(-0.1, 0.1))


def augment_patch(image: torch.Tensor, target: torch.Tensor, draw: PatchDraw) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` and ``target`` ``(C, e, e, e)`` mirrored and ``image`` scaled as ``draw`` says."""
    if draw.flips:
        image, target = image.flip(draw.flips), target.flip(draw.flips)
    return image * draw.scale + draw.shift, target
