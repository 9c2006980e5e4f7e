"""A real labelled dataset from volumes shipped in PyPI wheels: grey and white matter.

Training case: the MNI152 2009a T1 template (nilearn) with labels from its own grey/white matter
probability maps, skull-stripped with a mask closed over sulci and ventricles (so that it looks
like the held-out volume, which is skull-stripped too).

Held-out case: a different template, deepmriprep's (CAT12) 0.5 mm skull-stripped T1, with
reference labels from its own 1.5 mm tissue probabilities (channels: grey, white, other). Its
contrast, resolution and the labelling protocol all differ from the training case: a fair,
if small, test of generalisation. (The two protocols themselves agree only to Dice ~0.83.)
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoints.files import atomic_path
from ..inference.resample import label_map_on_grid
from ..layout import write_json
from .sample_data import fetch

LABEL_NAMES = {1: "grey matter", 2: "white matter"}
CLOSING_RADIUS_MM = 7  # fills sulci and lateral ventricles, keeps the skull out


def write_training_dataset(folder: str | Path) -> Path:
    """An MSD-style dataset (dataset.json, imagesTr/, labelsTr/) with the MNI152 case; returns dataset.json."""
    folder = Path(folder)
    t1 = nib.load(str(fetch("mni152-t1")))
    grey = np.asarray(nib.load(str(fetch("mni152-gm"))).dataobj, dtype=np.float32) / 255
    white = np.asarray(nib.load(str(fetch("mni152-wm"))).dataobj, dtype=np.float32) / 255
    other = np.clip(1 - grey - white, 0, 1)
    labels = np.argmax(np.stack([other, grey, white]), axis=0).astype(np.uint8)
    brain = _closed(grey + white > 0.5, CLOSING_RADIUS_MM)
    image = np.asarray(t1.dataobj, dtype=np.float32) * brain
    _save(nib.Nifti1Image(image, t1.affine), folder / "imagesTr" / "mni152.nii.gz")
    _save(nib.Nifti1Image(labels, t1.affine), folder / "labelsTr" / "mni152.nii.gz")
    dataset = {"name": "brain tissue (MNI152 2009a)", "modality": {"0": "MRI"},
               "labels": {"0": "background", **{str(k): v for k, v in LABEL_NAMES.items()}},
               "training": [{"image": "./imagesTr/mni152.nii.gz", "label": "./labelsTr/mni152.nii.gz"}]}
    write_json(dataset, folder / "dataset.json")
    return folder / "dataset.json"


def write_heldout_reference(path: str | Path) -> tuple[Path, Path]:
    """``(image, reference)``: the held-out T1 and its reference labels on the T1's own 0.5 mm grid."""
    image_path = fetch("brain-t1-05mm")
    image = nib.load(str(image_path))
    tissue = nib.load(str(fetch("brain-tissue-15mm")))
    probabilities = np.asarray(tissue.dataobj, dtype=np.float32)  # (X, Y, Z, [grey, white, other])
    scores = torch.from_numpy(np.moveaxis(probabilities[..., [2, 0, 1]], -1, 0).copy()).to(torch.float16)
    reference = label_map_on_grid(scores, tissue.affine, image.shape, image.affine, [0, 1, 2])
    _save(nib.Nifti1Image(reference, image.affine), Path(path))
    return image_path, Path(path)


def dice_per_label(predicted: np.ndarray, reference: np.ndarray, names: dict[int, str] = LABEL_NAMES) -> dict:
    scores = {}
    for value, name in names.items():
        p, r = predicted == value, reference == value
        scores[name] = float(2 * np.count_nonzero(p & r) / max(1, np.count_nonzero(p) + np.count_nonzero(r)))
    return scores


def _closed(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological closing with a cube: dilate, then erode (dilate the complement)."""
    volume = torch.from_numpy(mask.astype(np.float32))[None, None]
    closed = 1 - _dilated(1 - _dilated(volume, radius), radius)
    return closed[0, 0].numpy()


def _dilated(volume: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over a cube of edge 2r+1, as three 1-D passes (a cube is separable)."""
    size = 2 * radius + 1
    for kernel in ((size, 1, 1), (1, size, 1), (1, 1, size)):
        volume = F.max_pool3d(volume, kernel, stride=1, padding=tuple(k // 2 for k in kernel))
    return volume


def _save(image: nib.Nifti1Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
