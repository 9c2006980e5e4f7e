"""The networks ``voco serve`` keeps loaded: the last few used, each on its device, so that the
second segmentation with a model does not read its weights again.

A network is known by its weights file, the sha256 its card records and the device: a new
version installed under the same name is another file or another checksum, so it is read anew
(the registry is asked on every request; only the weights are kept).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from . import segment as segment_module

DEFAULT_SIZE = 2


class NetworkCache:
    """``cache(package, device)`` -> network, as ``segment()``'s ``networks``; ``last`` says
    whether the latest call found it loaded ("hit") or read it ("miss")."""

    def __init__(self, size: int = DEFAULT_SIZE):
        self.size = size
        self.last: str | None = None
        self._networks: OrderedDict[tuple, torch.nn.Module] = OrderedDict()

    def __call__(self, package, device: torch.device) -> torch.nn.Module:
        path = package.weights_path.resolve()
        stat = path.stat()
        # A card without a checksum (none of ours) still tells a rewritten file by its size and time.
        key = (str(path), package.card.weights_sha256 or (stat.st_size, stat.st_mtime_ns), str(device))
        network = self._networks.pop(key, None)
        self.last = "miss" if network is None else "hit"
        if network is None:
            network = segment_module.load_network(package, device)  # looked up now: a test may replace it
        if self.size > 0:
            self._networks[key] = network  # the most recently used last
            self._evict()
        return network

    def _evict(self) -> None:
        while len(self._networks) > self.size:  # its memory goes back to the device after the request
            self._networks.popitem(last=False)
