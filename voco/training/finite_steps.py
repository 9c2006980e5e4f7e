"""Training steps whose loss or gradients are not finite: skipped, counted, and never saved.

One extreme voxel (3e38 in an MRI) makes the loss infinite; one optimiser step on it turns every
weight to NaN, and the next checkpoint would replace a good one with them. Such a step leaves the
weights as they are (no optimiser step) and is reported as a ``warning``; after
``MAX_NON_FINITE_STEPS`` in a row the data, not chance, is the cause, and the run stops with
one error line (exit code 2); the last checkpoint, whose weights are finite, is kept.
"""

from __future__ import annotations

from ..errors import VocoInputError

MAX_NON_FINITE_STEPS = 5


class NonFiniteSteps:
    def __init__(self, reporter, run_dir):
        self.reporter, self.run_dir = reporter, run_dir
        self.in_a_row = 0

    def count(self, step: int, finite: bool, what: str = "loss") -> None:
        """Record whether ``step`` was finite; raise once ``MAX_NON_FINITE_STEPS`` in a row were not."""
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.reporter.emit("warning", step=step,
                           message=f"step {step}: the {what} is not finite (NaN or infinite); the step is skipped "
                                   "and the weights are unchanged")
        if self.in_a_row >= MAX_NON_FINITE_STEPS:
            raise VocoInputError(f"training stopped at step {step}: the loss or its gradients were not finite in {self.in_a_row} steps "
                                 "in a row; the data probably hold extreme or corrupt values; the last checkpoint, with "
                                 "finite weights, is kept", self.run_dir)
