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

import json
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
HELDOUT_CASE = "template-15mm"  # the held-out case's name in the evaluation dataset
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


def write_evaluation_dataset(folder: str | Path) -> Path:
    """The training case plus the held-out one, for ``voco evaluate --test-cases template-15mm``;
    returns dataset.json. The held-out case is on its tissue maps' own 1.5 mm grid: each voxel of
    the image is the mean of the 3 x 3 x 3 voxels of the 0.5 mm T1 it covers, and its label is the
    most probable tissue, so no label is interpolated."""
    folder = Path(folder)
    training = write_training_dataset(folder)
    tissue = nib.load(str(fetch("brain-tissue-15mm")))
    image = _block_mean_on_grid(nib.load(str(fetch("brain-t1-05mm"))), tissue.affine, tissue.shape[:3])
    probabilities = np.asarray(tissue.dataobj, dtype=np.float32)  # (X, Y, Z, [grey, white, other])
    labels = np.argmax(probabilities[..., [2, 0, 1]], axis=-1).astype(np.uint8)
    _save(nib.Nifti1Image(image, tissue.affine), folder / "imagesTr" / f"{HELDOUT_CASE}.nii.gz")
    _save(nib.Nifti1Image(labels, tissue.affine), folder / "labelsTr" / f"{HELDOUT_CASE}.nii.gz")
    dataset = json.loads(training.read_text())
    dataset["name"] = "brain tissue (MNI152 2009a; deepmriprep template held out)"
    dataset["training"].append({"image": f"./imagesTr/{HELDOUT_CASE}.nii.gz", "label": f"./labelsTr/{HELDOUT_CASE}.nii.gz"})
    write_json(dataset, training)
    return training


def _block_mean_on_grid(fine: nib.Nifti1Image, affine: np.ndarray, shape) -> np.ndarray:
    """The fine image averaged over each voxel of a coarser grid whose voxel centres are fine
    voxel centres and whose spacing is a whole multiple of the fine one."""
    to_fine = np.linalg.inv(fine.affine) @ affine
    scale = np.abs(np.diag(to_fine[:3, :3]))
    factor = scale.round().astype(int)
    if not np.allclose(to_fine[:3, :3], np.diag(np.diag(to_fine[:3, :3]))) or not np.allclose(scale, factor) \
            or len(set(factor)) != 1:
        raise ValueError("the coarse grid is not an axis-aligned whole multiple of the fine one")
    values = torch.from_numpy(np.asarray(fine.dataobj, dtype=np.float32))[None, None]
    means = F.avg_pool3d(values, factor[0], stride=1, padding=factor[0] // 2, count_include_pad=False)[0, 0]
    indices = np.indices(shape).reshape(3, -1)
    centres = (to_fine[:3, :3] @ indices + to_fine[:3, 3:]).round().astype(int)
    inside = np.all((centres >= 0) & (centres < np.array(fine.shape)[:, None]), axis=0)
    sampled = np.zeros(indices.shape[1], dtype=np.float32)
    sampled[inside] = means.numpy()[tuple(centres[:, inside])]
    return sampled.reshape(shape)


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
