"""Writing label maps on the exact grid of the image they belong to.

A label map is only useful if it overlays its image voxel for voxel: same shape, spacing, origin
and direction. For a NIfTI input the input's own header is reused (units, qform/sform codes, the
file's affine); other inputs get their geometry from the affine the image was read with. The
format follows the output's suffix: ``.nii``/``.nii.gz`` or ``.nrrd`` (what Slicer loads as a
labelmap or segmentation).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from ..checkpoints.files import check_writable_folder
from ..errors import VocoInputError
from .sources import image_suffix

LABEL_SUFFIXES = (".nii", ".nii.gz", ".nrrd")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def check_label_output(path: str | Path, compress: bool = True) -> Path:
    """The output path, or an error before any work is done when its format is not writable
    (uncompressed, when ``compress`` is False)."""
    path = Path(path)
    if image_suffix(path) not in LABEL_SUFFIXES:
        raise VocoInputError(f"output must end in {', '.join(LABEL_SUFFIXES)}", path)
    if not compress and image_suffix(path) == ".nii.gz":
        raise VocoInputError("a .nii.gz output is compressed; for an uncompressed one give .nii or .nrrd", path)
    if path.is_dir():
        raise VocoInputError("output is a folder; give a file name", path)
    check_writable_folder(path.parent)
    return path


def write_label_map(labels: np.ndarray, affine: np.ndarray, source: str | Path, path: str | Path,
                    compress: bool = True) -> None:
    """Write ``labels`` (in ``source``'s voxel order; ``affine``: its index -> RAS) to ``path``, in
    the format its suffix names (``.nii`` is never compressed, ``.nii.gz`` always; ``.nrrd`` as
    ``compress`` says). Callers wrap it in ``atomic_path``."""
    path = Path(path)
    if image_suffix(path) == ".nrrd":
        _write_nrrd(labels, affine, path, compress)
    else:
        _write_nifti(labels, affine, Path(source), path)


def sidecar_path(path: str | Path) -> Path:
    """``seg.nii.gz`` -> ``seg.json``: the label names and colours that go with a label map."""
    path = Path(path)
    return path.with_name(path.name[: -len(image_suffix(path))] + ".json")


def _write_nifti(labels: np.ndarray, affine: np.ndarray, source: Path, path: Path) -> None:
    if image_suffix(source) in (".nii", ".nii.gz"):
        original = nib.load(str(source))
        header = original.header.copy()
        header.set_data_dtype(labels.dtype)
        header.set_slope_inter(1.0, 0.0)
        image = nib.Nifti1Image(labels, original.affine, header)
        # The header's own codes say how each transform is meant (scanner, aligned, ...): keep them.
        image.set_qform(original.get_qform(), int(original.header["qform_code"]))
        image.set_sform(original.get_sform(), int(original.header["sform_code"]))
    else:
        image = nib.Nifti1Image(labels, affine)
    image.header["descrip"] = b"VoCo segmentation"
    nib.save(image, str(path))


def _write_nrrd(labels: np.ndarray, affine: np.ndarray, path: Path, compress: bool) -> None:
    lps = _RAS_TO_LPS @ affine[:3]
    header = {"type": labels.dtype.name, "dimension": 3, "space": "left-posterior-superior",
              "space directions": lps[:, :3].T, "space origin": lps[:, 3], "kinds": ["domain"] * 3,
              "encoding": "gzip" if compress else "raw"}
    # gzip level 1, as nibabel's .nii.gz: with pynrrd's default 9 a 512x512x300 brain label map took
    # 21 s instead of 1.2 s, to be 0.8 MB instead of 1.9 MB
    nrrd.write(str(path), labels, header, index_order="F", compression_level=1)
