"""Networks whose output is a known function of the input, for tests that must know the right
segmentation: used in the engine's tests directly, and inside an engine process started by the
Slicer-side tests (Testing/extension/engine_side.py installs it there)."""

from __future__ import annotations

import time

import torch
from torch import nn


class Threshold(nn.Module):
    """A 1x1 convolution: class 1 where the (normalised) intensity is above 0, else background.
    ``seconds_per_window`` makes each forward pass that slow (for tests that cancel)."""

    def __init__(self, seconds_per_window: float = 0.0):
        super().__init__()
        self.seconds_per_window = seconds_per_window
        self.conv = nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-4.0, 4.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        if self.seconds_per_window:
            time.sleep(self.seconds_per_window)
        return self.conv(x)
