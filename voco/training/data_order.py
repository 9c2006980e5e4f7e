"""Which volume feeds which sample: the data order of a run, a function of the seed and the step."""

from __future__ import annotations

import numpy as np


def sample_order(seed: int, count: int, positions: np.ndarray) -> np.ndarray:
    """Which volume feeds each global sample position: a fresh permutation every epoch."""
    epochs = positions // count
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(count)
        chosen = epochs == epoch
        out[chosen] = perm[positions[chosen] % count]
    return out


def batch_positions(step: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """The global sample positions of this rank's part of ``step``: they seed each sample's draws."""
    return step * batch_size * world_size + rank * batch_size + np.arange(batch_size)
