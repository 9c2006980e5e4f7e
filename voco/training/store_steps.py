"""Pretraining data streamed from a store (``voco preprocess``): one DataLoader item per step.

An item holds what the CPU can do alone for this rank's samples of one step: the draws of each
sample (``draw_sample``: patch start, targets, augmentation; its generator for the dropout drawn
later) and the patch itself, read from the store without decoding the rest of the volume.
Cutting the crops, resizing and augmenting them stay on the training device
(``crops_from_patches``). Every draw is still a function of ``(seed, step, index)``, so the
workers' number and timing change nothing, and a resumed run reads what an uninterrupted one does.

Under DDP, rank ``r`` of ``W`` reads only its shard of the volumes (``r, r + W, ...``), each
epoch in a new order: no volume is read by two ranks.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.crops import SampleDraw, draw_sample
from ..data.store import Store, shard
from ..errors import VocoInputError
from .data_order import batch_positions, sample_order


@dataclass
class StepSamples:
    patches: torch.Tensor        # (B, C, X, Y, Z) float32, the patch of each sample
    draws: list[SampleDraw]

    def pin_memory(self) -> "StepSamples":  # DataLoader(pin_memory=True) calls this
        return StepSamples(self.patches.pin_memory(), self.draws)


class StoreSteps(Dataset):
    """Item ``step``: this rank's samples of that step, read from ``store``."""

    def __init__(self, store: Store, preset, seed: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.shard = shard(len(store.entries), rank, world_size)
        if not len(self.shard):
            raise VocoInputError(f"the store holds {len(store.entries)} volumes, fewer than the {world_size} "
                                 "processes: each needs at least one", store.folder)
        self.volumes = [store.volume(int(i)) for i in self.shard]
        self.preset, self.seed, self.batch_size = preset, seed, batch_size
        self.rank, self.world_size = rank, world_size

    def _in_shard(self, step: int) -> np.ndarray:
        """Places in the shard of the volumes feeding this rank's samples of ``step``: the rank's
        own sample positions run through epochs of its shard."""
        return sample_order(self.seed, len(self.shard), step * self.batch_size + np.arange(self.batch_size))

    def volumes_of(self, step: int) -> np.ndarray:
        """Store indices of the volumes feeding this rank's samples of ``step``."""
        return self.shard[self._in_shard(step)]

    def __getitem__(self, step: int) -> StepSamples:
        positions = batch_positions(step, self.batch_size, self.rank, self.world_size)
        patches, draws = [], []
        for i, position in zip(self._in_shard(step), positions.tolist()):
            volume = self.volumes[i]
            draw = draw_sample(volume.shape[1:], self.preset, self.seed, step, position)
            patches.append(volume.read_patch(draw.start, self.preset.patch_shape))
            draws.append(draw)
        return StepSamples(torch.from_numpy(np.stack(patches)), draws)


@dataclass
class ReadFailure:
    """A worker's one-line error, handed to the training process as an item (a DataLoader
    re-raises a worker's exception with the worker's whole traceback in its message)."""

    message: str


class _Reporting(Dataset):
    def __init__(self, steps: Dataset):
        self.steps = steps

    def __getitem__(self, step: int):
        try:
            return self.steps[step]
        except VocoInputError as error:
            return ReadFailure(str(error))


def _as_is(item):
    return item


def _ignore_stop_signals(_worker_id: int) -> None:
    """A front end stops a run by signalling its process group, DataLoader workers included: they
    leave the stop to the training process, which saves its checkpoint and then ends them (a
    worker killed by SIGTERM would make the DataLoader raise in the middle of a step)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stream_steps(steps: Dataset, first: int, last: int, workers: int, device: torch.device) -> Iterator:
    """Items for steps ``first .. last - 1`` in order, read ahead by ``workers`` processes; a read
    that failed raises its one-line ``VocoInputError`` here."""
    loader = DataLoader(_Reporting(steps), batch_size=None, sampler=range(first, last), num_workers=workers,
                        collate_fn=_as_is, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        worker_init_fn=_ignore_stop_signals if workers else None,
                        # its own generator: creating the iterator must not draw from torch's global one
                        generator=torch.Generator().manual_seed(0))
    for item in loader:
        if isinstance(item, ReadFailure):
            raise VocoInputError(item.message)
        yield item
