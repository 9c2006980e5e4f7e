"""Fine-tuning data streamed from a labelled store (``voco preprocess --labels``).

The training process keeps only each case's name and shape; DataLoader workers read each step's
patches (image and label map) from the store, drawn and augmented as fine-tuning from cases in
memory does (``voco.data.patches``): from a store padded to the run's patch size, the same
patches. Validation decodes one whole case at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.patches import augment_patch, draw_patch
from ..data.preprocess_store import foreground_key, label_key
from ..data.sources import case_name
from ..data.store import Store, VolumeFile
from ..errors import VocoInputError


class StoredCase:
    """One labelled case of a store."""

    def __init__(self, folder: Path, entry: dict, name: str):
        self.name = name
        self.shape = tuple(entry["shape"][1:])
        self.image_file = VolumeFile(folder / entry["key"])
        self.label_file = VolumeFile(folder / label_key(entry["key"]))
        self.foreground = ForegroundRows(folder / foreground_key(entry["key"]), entry["foreground_voxels"])

    def region(self, start, shape, lookup: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The image (float32) and its network classes (uint8) in ``shape`` voxels from ``start``."""
        classes = lookup[self.label_file.read_stored_patch(start, shape)]
        return torch.from_numpy(self.image_file.read_patch(start, shape)), torch.from_numpy(classes)

    def whole(self, lookup: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole image and its classes (validation)."""
        return self.region((0, 0, 0), self.shape, lookup)


class ForegroundRows:
    """A case's foreground sample, read a row at a time where a draw needs one: nothing is kept
    open, however many cases a worker draws from."""

    def __init__(self, path: Path, count: int):
        self.path, self.count = path, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row: int) -> np.ndarray:
        try:
            return np.array(np.load(self.path, mmap_mode="r")[row])
        except (OSError, ValueError, IndexError) as error:
            raise VocoInputError(f"cannot be read ({error}); run voco preprocess again", self.path) from None


class LabelledStore:
    """A store made by ``voco preprocess --labels``, checked against what a fine-tuning run needs."""

    def __init__(self, folder):
        self.store = Store(folder)
        if "label_names" not in self.store.plan:
            raise VocoInputError("this store holds no label maps: make one for fine-tuning with "
                                 "voco preprocess --labels", self.store.folder)
        preprocessing = self.store.plan["preprocessing"]
        self.spacing = tuple(preprocessing["spacing"])
        self.pad_edge = min(preprocessing["pad_to"])
        self.label_names = {int(value): name for value, name in self.store.plan["label_names"].items()}
        self.label_values = set()
        for entry in self.store.entries:
            self.label_values |= set(entry["label_values"])
        modalities = sorted({entry["modality"] for entry in self.store.entries})
        if len(modalities) > 1:
            raise VocoInputError(f"the store's cases were scaled as {' and '.join(modalities)}; fine-tuning scales "
                                 "every case alike: preprocess again with --modality", self.store.folder)
        self.modality = modalities[0]
        self.cases = [StoredCase(self.store.folder, entry, case_name(entry["source"])) for entry in self.store.entries]

    def check(self, spacing, patch_size: int, modality: str) -> None:
        """Refuse a run that would preprocess otherwise than the store was made."""
        folder = self.store.folder
        if tuple(spacing) != self.spacing:
            raise VocoInputError(f"the store was resampled to {_mm(self.spacing)}, the run wants {_mm(spacing)}: "
                                 "give --spacing as the store has it or preprocess again", folder)
        if patch_size > self.pad_edge:
            raise VocoInputError(f"the store pads cases to {self.pad_edge} voxels, fewer than the patch size "
                                 f"{patch_size}: preprocess again with --patch-size {patch_size}", folder)
        if modality not in ("auto", self.modality):
            raise VocoInputError(f"the store's cases were scaled as {self.modality}, the run wants {modality}",
                                 folder)


    def require_named(self, labels) -> None:
        """Refuse a store holding a label value the run's labels (a resumed run's) do not name."""
        unnamed = sorted(self.label_values - {0} - {label.value for label in labels})
        if unnamed:
            raise VocoInputError(f"has label value {unnamed[0]}, which the model's labels do not name",
                                 self.store.folder)


def _mm(spacing) -> str:
    return "x".join(f"{v:g}" for v in spacing) + " mm"


class FinetuneSteps(Dataset):
    """Item ``step``: the images ``(B, 1, e, e, e)`` and classes of that step's samples."""

    def __init__(self, cases: list[StoredCase], lookup: np.ndarray, edge: int, positive_fraction: float, seed: int,
                 batch_size: int):
        self.cases, self.lookup, self.edge = cases, lookup, edge
        self.positive_fraction, self.seed, self.batch_size = positive_fraction, seed, batch_size

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = [], []
        for index in range(self.batch_size):
            draw = draw_patch(self.cases, self.edge, self.positive_fraction, self.seed, step, index)
            patch = self.cases[draw.case].region(draw.start, (self.edge,) * 3, self.lookup)
            image, target = augment_patch(*patch, draw)
            images.append(image)
            targets.append(target)
        return torch.stack(images), torch.stack(targets)
