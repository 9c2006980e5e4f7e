"""Sliding-window prediction with gaussian blending, lean on memory and robust to running out of it.

The class scores of a whole volume are never held in float32: each window's softmax, weighted by
a gaussian that trusts window centres more than their borders, is added into a half-precision
accumulator (classes x volume), and the sums are normalised in place at the end. With overlap 0.5
every voxel is seen by up to 8 windows, so fp16's 3 significant digits lose nothing that matters
for an argmax.

On a CUDA out-of-memory error the window batch is halved; at one window the work moves to the CPU.
Each step is reported as a ``warning`` event, so a user sees why it became slower.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start indices of windows of ``window`` voxels covering ``[0, length)``, spread evenly so
    that neighbours overlap by at least ``overlap`` of a window."""
    if length <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    count = math.ceil((length - window) / step) + 1
    return [round(i * (length - window) / (count - 1)) for i in range(count)]


def gaussian_importance(window: tuple[int, int, int], sigma_fraction: float = 1 / 8) -> torch.Tensor:
    """Separable gaussian with sigma = window/8 (nnU-Net's choice), peak 1, never exactly 0."""
    axes = []
    for edge in window:
        x = torch.arange(edge, dtype=torch.float32) - (edge - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (edge * sigma_fraction)) ** 2))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g /= g.max()
    return g.clamp_min(1e-3)


MIRROR_AXES = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)]  # the 8 axis mirrorings


class SlidingWindowPredictor:
    """Normalised class probabilities of a ``(C, X, Y, Z)`` image, as ``(K, X, Y, Z)`` float16."""

    def __init__(self, model: nn.Module, window: tuple[int, int, int], device: torch.device,
                 overlap: float = 0.5, batch_size: int = 1, mirror: bool = False, precision: str = "float32",
                 report: Callable[..., None] = lambda event, **fields: None):
        """``precision="auto"``: float16 on CUDA, bfloat16 with channels-last convolutions on CPUs
        that compute bfloat16 natively (AVX512-BF16 / AMX: about twice the float32 speed), float32
        elsewhere. ``"float32"`` everywhere: slower, bit-reproducible on the CPU."""
        if precision not in ("auto", "float32"):
            raise ValueError(f"precision must be auto or float32, got {precision!r}")
        self.model, self.window, self.device = model, tuple(window), device
        self.overlap, self.batch_size, self.mirror, self.report = overlap, batch_size, mirror, report
        self.precision = precision
        self.windows_evaluated = 0

    def windows(self, shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        return list(itertools.product(*(window_starts(length, edge, self.overlap)
                                        for length, edge in zip(shape, self.window))))

    @torch.inference_mode()
    def predict(self, image: torch.Tensor, num_classes: int) -> torch.Tensor:
        image, crop = _pad_to(image, self.window)
        shape = tuple(image.shape[1:])
        starts = self.windows(shape)
        while True:
            try:
                return self._predict_on_device(image, num_classes, starts)[(slice(None), *crop)]
            except torch.OutOfMemoryError:
                self._shrink_after_out_of_memory()

    def _shrink_after_out_of_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch_size > 1:
            self.batch_size //= 2
            self.report("warning", message=f"out of memory on {self.device}: retrying with {self.batch_size} "
                                           f"window{'s' if self.batch_size > 1 else ''} per batch")
        elif self.device.type != "cpu":
            self.report("warning", message=f"out of memory on {self.device} with one window per batch: "
                                           "continuing on the CPU (slower)")
            self.device = torch.device("cpu")
        else:
            raise MemoryError("out of memory on the CPU even with one window per batch")

    def _predict_on_device(self, image: torch.Tensor, num_classes: int, starts) -> torch.Tensor:
        device = self.device
        # Set both ways: a network kept by voco serve must not carry one request's layout into the
        # next (float32 gives the same result warm as cold).
        layout = torch.channels_last_3d if self._compute_dtype(device) == torch.bfloat16 else torch.contiguous_format
        model = self.model.to(device, memory_format=layout)
        scores = torch.zeros((num_classes, *image.shape[1:]), dtype=torch.float16, device=device)
        weights = torch.zeros(image.shape[1:], dtype=torch.float32, device=device)
        gaussian = gaussian_importance(self.window).to(device)
        image = image.to(device)
        total, evaluated = len(starts), 0
        for first in range(0, total, self.batch_size):
            batch_starts = starts[first:first + self.batch_size]
            regions = [tuple(slice(s, s + e) for s, e in zip(start, self.window)) for start in batch_starts]
            batch = torch.stack([image[(slice(None), *region)] for region in regions])
            probabilities = self._probabilities(model, batch) * gaussian
            for region, p in zip(regions, probabilities):
                scores[(slice(None), *region)] += p.to(torch.float16)
                weights[region] += gaussian
            evaluated += len(regions)
            self.report("progress", stage="inference", done=evaluated, total=total)
        self.windows_evaluated = evaluated * (len(MIRROR_AXES) if self.mirror else 1)
        # Normalised per class plane so that no float32 copy of all classes is ever made.
        inverse = weights.reciprocal_()
        for plane in scores:
            plane.mul_(inverse)
        return scores

    def _compute_dtype(self, device: torch.device) -> torch.dtype | None:
        if self.precision != "auto":
            return None
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_computes_bfloat16() else None

    def _probabilities(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype(batch.device)
        if dtype == torch.bfloat16:  # oneDNN's fast bfloat16 convolutions want channels-last tensors
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        autocast = torch.autocast(batch.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        flips = MIRROR_AXES if self.mirror else [()]
        total = None
        with autocast:
            for axes in flips:
                logits = model(batch.flip(axes) if axes else batch)
                p = F.softmax(logits.float(), dim=1)
                p = p.flip(axes) if axes else p
                total = p if total is None else total.add_(p)
        return total / len(flips)


def cpu_computes_bfloat16() -> bool:
    """Whether oneDNN has native bfloat16 kernels on this CPU (emulated bfloat16 is slower than float32)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def _pad_to(image: torch.Tensor, window: tuple[int, int, int]):
    """Zero-pad axes shorter than the window (evenly on both sides); returns the crop that undoes it."""
    pads, crop = [], []
    for length, edge in zip(image.shape[1:], window):
        missing = max(0, edge - length)
        before = missing // 2
        pads.append((before, missing - before))
        crop.append(slice(before, before + length))
    if any(sum(p) for p in pads):
        image = F.pad(image, [v for p in reversed(pads) for v in p])
    return image, tuple(crop)
