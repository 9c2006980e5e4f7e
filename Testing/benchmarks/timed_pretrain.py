"""``voco pretrain`` with one more field in each step event: ``data_wait_s``, the seconds that step's
trainer spent getting its batch (``Pretrainer.next_batch``: the crops cut from the volumes in memory,
or the store's patches taken from the DataLoader and cut into crops). The benchmarks run this
instead of ``python -m voco`` to see how long training waited for data; without ``next_batch``
(an engine before the store) the field is left out.

    python Testing/benchmarks/timed_pretrain.py pretrain --data ... --out ... [voco pretrain options]
"""

from __future__ import annotations

import sys
import time

from voco import cli
from voco.training import pretrain


class _WaitReporter:
    """The run's reporter, adding the last measured wait to each step event."""

    def __init__(self, reporter):
        self.reporter, self.wait = reporter, None

    def emit(self, event: str, **fields) -> None:
        if event == "step" and self.wait is not None:
            fields["data_wait_s"] = self.wait
        self.reporter.emit(event, **fields)


class TimedPretrainer(pretrain.Pretrainer):
    def __init__(self, config, reporter, *args, **kwargs):
        self.timing = _WaitReporter(reporter)
        super().__init__(config, self.timing, *args, **kwargs)

    def next_batch(self):
        start = time.perf_counter()
        batch = super().next_batch()
        self.timing.wait = time.perf_counter() - start
        return batch


if __name__ == "__main__":
    if hasattr(pretrain.Pretrainer, "next_batch"):
        pretrain.Pretrainer = TimedPretrainer  # what pretrain.pretrain() builds
    sys.exit(cli.main(sys.argv[1:]))
