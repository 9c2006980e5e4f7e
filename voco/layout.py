"""The crop layout of one image, in every coordinate system a viewer needs.

``crop_layout`` preprocesses an image as training would, draws one training sample (patch,
base grid, targets) with a given seed, and reports the boxes in the patch, in voxel indices of
the *input* image and in RAS millimetres. ``write_layout`` saves what ``voco crops`` promises:
``layout.json``, ``layout.nii.gz`` (base-crop index map on the input grid) and ``layout.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .checkpoints.files import atomic_path
from .data.crops import CropBatch, sample_batch
from .data.volumes import Preprocessing, Volume, load_volume
from .geometry import base_grid, boxes_to_ras, grid_index_map, map_boxes
from .presets import Preset


@dataclass
class CropLayout:
    volume: Volume
    preset: Preset
    seed: int
    batch: CropBatch                 # the crops themselves, for predicting positions

    @property
    def patch_to_volume(self) -> np.ndarray:
        """Patch index coordinates -> preprocessed-volume index coordinates."""
        m = np.eye(4)
        m[:3, 3] = self.batch.patch_starts[0]
        return m

    @property
    def patch_to_source(self) -> np.ndarray:
        """Patch index coordinates -> index coordinates of the image as it was read."""
        return np.linalg.inv(self.volume.source_affine) @ self.volume.affine @ self.patch_to_volume

    @property
    def patch_to_ras(self) -> np.ndarray:
        return self.volume.affine @ self.patch_to_volume

    @property
    def base_boxes(self) -> np.ndarray:
        return base_grid(self.preset.grid, self.preset.crop_edge)

    @property
    def target_boxes(self) -> np.ndarray:
        return self.batch.target_boxes[0]

    @property
    def labels(self) -> np.ndarray:
        return self.batch.labels[0].cpu().numpy()

    def describe(self, boxes: np.ndarray, kind: str) -> list[dict]:
        source = map_boxes(boxes, self.patch_to_source)
        ras = boxes_to_ras(boxes, self.patch_to_ras)
        return [{"kind": kind, "index": i, "patch_box": boxes[i].tolist(),
                 "voxel_box": np.round(source[i], 4).tolist(),
                 "center_ras": ras["center"][i].tolist(), "size_mm": ras["size"][i].tolist(),
                 "corners_ras": ras["corners"][i].tolist()} for i in range(len(boxes))]

    def index_map(self) -> np.ndarray:
        """``k + 1`` inside base crop ``k`` on the input image's grid, 0 elsewhere."""
        return grid_index_map(self.volume.source_shape, np.linalg.inv(self.patch_to_source),
                              self.preset.grid, self.preset.crop_edge)

    def to_json(self) -> dict:
        ras_axes = boxes_to_ras(self.base_boxes[:1], self.patch_to_ras)["axes"]
        return {
            "image": str(self.volume.path), "preset": self.preset.name, "seed": self.seed,
            "grid": list(self.preset.grid), "crop_edge": self.preset.crop_edge, "label_dims": self.preset.label_dims,
            "image_shape": list(self.volume.source_shape), "image_affine": self.volume.source_affine.tolist(),
            "patch_shape": list(self.preset.patch_shape), "patch_to_ras": self.patch_to_ras.tolist(),
            "box_axes_ras": ras_axes.tolist(),
            "bases": self.describe(self.base_boxes, "base"),
            "targets": self.describe(self.target_boxes, "target"),
            "labels": self.labels.tolist(),
        }


def crop_layout(image: str | Path | Volume, preset: Preset, seed: int = 0, modality: str = "auto") -> CropLayout:
    """The crops of ``seed`` on an image file, or on a volume already loaded for ``preset``."""
    volume = image if isinstance(image, Volume) else load_volume(image, Preprocessing.for_preset(preset, modality))
    batch = sample_batch([volume.image], preset, seed, step=0, indices=[0])
    return CropLayout(volume, preset, seed, batch)


def write_json(data: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def write_label_volume(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(array, affine), str(tmp))


def write_layout(layout: CropLayout, out_dir: str | Path) -> dict[str, Path]:
    from .figures import plot_layout

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "layout.json", "volume": out / "layout.nii.gz", "figure": out / "layout.png"}
    write_json(layout.to_json(), paths["json"])
    write_label_volume(layout.index_map(), layout.volume.source_affine, paths["volume"])
    plot_layout(layout, paths["figure"])
    return paths
