"""One volume from file to network input: read, check it is usable, preprocess with MONAI transforms.

Affines map voxel indices to RAS millimetres. MONAI's spatial transforms update a MetaTensor's
affine as they go, so the affine read off the result places every preprocessed voxel where it
was in the source scan.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import psutil
import torch
from monai.data import MetaTensor, NibabelReader, NrrdReader
from monai.transforms import (
    CropForeground,
    EnsureChannelFirst,
    LoadImage,
    NormalizeIntensity,
    Orientation,
    Resize,
    ScaleIntensityRange,
    Spacing,
    SpatialCrop,
    SpatialPad,
)
from monai.transforms.io.array import switch_endianness
from monai.utils import ImageMetaKey

from voco.data.sources import image_suffix
from voco.errors import VocoInputError, first_line

MODALITIES = ("auto", "ct", "ct-chest", "mri")
MIN_EDGE = 8  # voxels; the smallest VoCo crop is larger, and thinner stacks are really 2-D
# HU windows scaled to [0, 1]: VoCo's soft-tissue window, and a wide one that keeps the lungs.
CT_WINDOWS = {"ct": (-175.0, 250.0), "ct-chest": (-1000.0, 500.0)}
# Air is -1000 HU in CT; MRI intensities are arbitrary but essentially non-negative.
CT_MINIMUM = -500.0
# Image and label affines may differ by float rounding of the writer; more than this is another grid.
GEOMETRY_TOLERANCE_MM = 1e-3

# Every MONAI reader used here returns RAS affines (NRRD's LPS is converted), so RAS labels are
# given explicitly instead of letting Orientation guess them from the "space" metadata.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
_HAS_ITK = importlib.util.find_spec("itk") is not None  # without importing it: that is slow
# Deflate cannot expand data more than about 1032 times: a header declaring more than that many
# bytes per byte of gzip file is lying, and would allocate for nothing.
GZIP_MAX_RATIO = 1032
# Resampling beyond this many voxels (16 GB of float32) is a header's absurd spacing, not a scan.
MAX_RESAMPLED_VOXELS = 1 << 32


@dataclass(eq=False)  # arrays and tensors have no single truth value to compare by
class Volume:
    """A preprocessed volume and the geometry that ties it to its file."""

    path: Path
    image: torch.Tensor  # float32 (1, X, Y, Z)
    affine: np.ndarray  # 4x4 index -> RAS of `image`
    source_affine: np.ndarray  # 4x4 index -> RAS of the file as read
    source_shape: tuple[int, int, int]
    modality: str  # "ct" or "mri"


@dataclass(frozen=True)
class Preprocessing:
    """How volumes are brought to a common form before cropping."""

    modality: str = "auto"  # auto, ct, ct-chest or mri
    spacing: tuple[float, float, float] | None = None  # mm; None keeps the file's spacing
    resize_to: tuple[int, int, int] | None = None  # VoCo v1 resizes the foreground box to one patch
    pad_to: tuple[int, int, int] | None = None  # pad each axis with 0 up to at least this size
    foreground_crop: bool = True

    @classmethod
    def for_preset(cls, preset, modality: str = "auto") -> "Preprocessing":
        """What a VoCo preset needs: its spacing, v1's resize of the whole foreground to one
        patch, and padding so that every volume holds at least one patch."""
        resize = preset.patch_shape if preset.patch_mode == "resize_foreground" else None
        return cls(modality=modality, spacing=preset.spacing, resize_to=resize, pad_to=preset.patch_shape)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise VocoInputError(f"unknown modality '{self.modality}'; expected one of {', '.join(MODALITIES)}")


def read_volume(path: str | Path, device: torch.device | str = "cpu") -> MetaTensor:
    """The volume in ``path`` as a float32 MetaTensor ``(1, X, Y, Z)`` on ``device``, checked to be usable.

    The same tensor as MONAI's ``LoadImage(image_only=True, ensure_channel_first=True,
    dtype=np.float32)``, without its numpy copy into C order: NIfTI and NRRD store the first
    axis fastest, and that transposing copy took seconds for a 512x512x300 volume. Here the
    voxels go to ``device`` in the file's own type and order and become C-ordered float32
    there (see ``c_ordered_float32``)."""
    path = Path(path)
    if not path.exists():
        raise VocoInputError("does not exist", path)
    if not path.is_file():
        raise VocoInputError("is not a file", path)
    suffix = image_suffix(path)
    if suffix in (".nrrd", ".nhdr"):
        _check_nrrd_header(path)
    if suffix in (".mha", ".mhd") and not _HAS_ITK:
        raise VocoInputError("cannot be read as an image: .mha/.mhd files need ITK (pip install itk)", path)
    if suffix in (".nii", ".nii.gz"):
        _check_nifti_geometry(path)
    check_declared_size(path)
    try:
        image = _load_image(path, suffix, torch.device(device))
    except Exception as error:  # each library fails its own way on a bad file; all mean "unreadable"
        raise VocoInputError(f"cannot be read as an image: {first_line(error)}", path) from None
    image = _single_volume(image, path)
    _check_geometry(image.affine.numpy(), path)
    _check_content(image, path)
    return image


def _load_image(path: Path, suffix: str, device: torch.device) -> MetaTensor:
    """What LoadImage gives (the reader it would pick for the suffix, its metadata), on ``device``."""
    if suffix in (".nii", ".nii.gz"):
        reader = NibabelReader()
    elif suffix in (".nrrd", ".nhdr"):  # LoadImage has no reader for detached headers; pynrrd reads them
        # in the file's own type: NrrdReader's default float32 would be a copy on the host
        reader = NrrdReader(dtype=nrrd.reader._determine_datatype(nrrd.read_header(str(path))))
    else:
        return LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(str(path)).to(device)
    array, meta = reader.get_data(reader.read(str(path)))
    meta = switch_endianness(meta, "<")
    meta[ImageMetaKey.FILENAME_OR_OBJ] = str(path)
    image = MetaTensor.ensure_torch_and_prune_meta(c_ordered_float32(array, device), meta)
    return EnsureChannelFirst()(image, meta_dict=meta)


# numpy types torch converts itself; others (uint16, big-endian, ...) become float32 in numpy first
_TORCH_TYPES = {np.dtype(t) for t in (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16,
                                      np.float32, np.float64)}
# slices of the slowest axis per copy: about 8 MB of a 512x512 int16 volume, which stays in cache
_COPY_BLOCK = 8


def c_ordered_float32(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a C-contiguous float32 tensor on ``device``, with the values numpy's
    ``astype(np.float32)`` gives. The voxels cross to a GPU as they are (half the bytes of
    float32 for int16) and are reordered there; on the CPU the reordering copy goes in blocks of
    the slowest axis, several times faster than one copy that strides through the whole volume."""
    if array.dtype not in _TORCH_TYPES:
        array = array.astype(np.float32, order="K")
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        array = np.ascontiguousarray(array)
    with warnings.catch_warnings():  # a read-only memory map: torch only reads it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(array)
    if device.type != "cpu":
        return source.to(device).to(torch.float32, memory_format=torch.contiguous_format)
    if source.is_contiguous():
        return source.to(torch.float32)
    out = torch.empty(source.shape, dtype=torch.float32)
    axis = int(np.argmax(source.stride()))
    for start in range(0, source.shape[axis], _COPY_BLOCK):
        length = min(_COPY_BLOCK, source.shape[axis] - start)
        out.narrow(axis, start, length).copy_(source.narrow(axis, start, length))
    return out


def read_label_map(path: str | Path, image: MetaTensor) -> MetaTensor:
    """The label map in ``path``, checked to be non-negative whole numbers on ``image``'s grid."""
    path = Path(path)
    if not path.is_file():
        raise VocoInputError("label map does not exist", path)
    check_declared_size(path)
    try:
        label = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(str(path))
    except Exception as error:
        raise VocoInputError(f"cannot be read as a label map: {first_line(error)}", path) from None
    label = _single_volume(label, path)
    if tuple(label.shape) != tuple(image.shape):
        raise VocoInputError(f"label map does not match its image: shape {_shape_text(label.shape[1:])} vs "
                             f"{_shape_text(image.shape[1:])} ({Path(image.meta['filename_or_obj']).name})", path)
    corners = np.abs(label.affine.numpy() - image.affine.numpy()).max()
    if corners > GEOMETRY_TOLERANCE_MM:
        raise VocoInputError(f"label map does not match its image: origin/spacing/direction differ by up to "
                             f"{corners:.3g} ({Path(image.meta['filename_or_obj']).name})", path)
    values = label.as_tensor()
    if not torch.isfinite(values).all() or (values < 0).any() or (values != values.round()).any():
        raise VocoInputError("is not a label map: values must be non-negative whole numbers", path)
    return label


def preprocess(image: MetaTensor, options: Preprocessing) -> tuple[torch.Tensor, np.ndarray, str]:
    """``(image, affine, modality)`` after reorienting, cropping, resampling and intensity scaling.

    ``image`` is what ``read_volume`` returns; the result is a plain float32 tensor, the 4x4
    index -> RAS affine of its grid and the modality used ("ct" or "mri").
    """
    image, _, affine, modality = _preprocess(image, None, options)
    return image, affine, modality


def preprocess_pair(image: MetaTensor, label: MetaTensor, options: Preprocessing
                    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, str]:
    """``(image, label, affine, modality)``: ``label`` (same grid as ``image``) follows every
    spatial step of the image with nearest-neighbour resampling and ends as int64 class values."""
    image, label, affine, modality = _preprocess(image, label, options)
    return image, label.round().to(torch.int64), affine, modality


def _preprocess(image: MetaTensor, label: MetaTensor | None, options: Preprocessing):
    both = [image] if label is None else [image, label]

    def spatial(transform_for):  # the same spatial step on the image and, nearest-neighbour, on the label
        return [transform_for(i == 1)(volume) for i, volume in enumerate(both)]

    both = spatial(lambda _: Orientation(axcodes="RAS", labels=_RAS_LABELS))
    modality = _resolve_modality(both[0], options.modality)
    if options.foreground_crop:
        threshold = CT_WINDOWS[modality][0] if modality in CT_WINDOWS else 0.0
        start, end = CropForeground(select_fn=lambda values: values > threshold).compute_bounding_box(both[0])
        if np.any(np.asarray(end) <= np.asarray(start)):
            raise VocoInputError(f"has no foreground above {threshold:g}", both[0].meta.get("filename_or_obj"))
        both = spatial(lambda _: SpatialCrop(roi_start=start, roi_end=end))
    if options.spacing is not None:
        _check_resampled_size(both[0], options.spacing)
        both = spatial(lambda is_label: Spacing(pixdim=options.spacing, mode="nearest" if is_label else "bilinear"))
    image = both[0]
    if modality in CT_WINDOWS:
        low, high = CT_WINDOWS[modality]
        image = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(image)
    else:
        _check_z_score_range(image)
        image = NormalizeIntensity(nonzero=True)(image)
    both[0] = image
    if options.resize_to is not None:
        both = spatial(lambda is_label: Resize(spatial_size=options.resize_to, mode="nearest" if is_label else "trilinear"))
    if options.pad_to is not None:
        both = spatial(lambda _: SpatialPad(spatial_size=options.pad_to, value=0))
    affine = both[0].affine.numpy().astype(np.float64)
    image = both[0].as_tensor().to(torch.float32).contiguous()
    label = both[1].as_tensor().contiguous() if label is not None else None
    return image, label, affine, "ct" if modality in CT_WINDOWS else "mri"


def load_volume(path: str | Path, options: Preprocessing = Preprocessing()) -> Volume:
    """Read ``path`` and preprocess it."""
    source = read_volume(path)
    # Taken before preprocessing, which may hand back the very tensor it was given.
    source_affine = source.affine.numpy().astype(np.float64)
    source_shape = tuple(int(edge) for edge in source.shape[1:])
    image, affine, modality = preprocess(source, options)
    return Volume(Path(path), image, affine, source_affine, source_shape, modality)


# Above this an intensity's square overflows float32: the z-score's variance becomes infinite and
# the image all zeros, or, once resampling spreads the value, its mean too and the image NaN.
MAX_Z_SCORE_INTENSITY = float(np.sqrt(np.finfo(np.float32).max) / 1e3)


def _check_z_score_range(image: MetaTensor) -> None:
    peak = float(image.abs().max())
    if peak > MAX_Z_SCORE_INTENSITY:
        raise VocoInputError(f"holds an intensity of {peak:.3g}, too extreme for the MRI z-score (at most "
                             f"{MAX_Z_SCORE_INTENSITY:.1e}): a corrupt voxel?", image.meta.get("filename_or_obj"))


def load_volumes(
    paths: Sequence[str | Path],
    options: Preprocessing,
    on_warning: Callable[[str, Path], None],
) -> list[Volume]:
    """Load every usable volume of ``paths``.

    With one path its error propagates. With several, each unusable file is reported as
    ``on_warning(message, path)`` (``message`` is the one-line error, naming the file) and
    skipped; only when none is usable is there an error.
    """
    if not paths:
        raise VocoInputError("no images given")
    if len(paths) == 1:
        return [load_volume(paths[0], options)]
    volumes, problems = [], []
    for path in paths:
        try:
            volumes.append(load_volume(path, options))
        except VocoInputError as error:
            problems.append(str(error))
            on_warning(str(error), Path(path))
    if not volumes:
        raise VocoInputError(f"none of the {len(paths)} images could be used; first problem: {problems[0]}")
    return volumes


def _check_nrrd_header(path: Path) -> None:
    """Reject NRRDs MONAI's reader cannot place in space: no geometry, or several components."""
    try:
        header = nrrd.read_header(str(path))
    except Exception as error:
        raise VocoInputError(f"cannot be read as an image: {first_line(error)}", path) from None
    directions = header.get("space directions")
    if directions is None:
        raise VocoInputError("has no 'space directions': its voxel spacing and orientation are unknown", path)
    # pynrrd gives a non-spatial axis (vector components, time) a row of NaN directions.
    non_spatial = np.isnan(np.asarray(directions, dtype=np.float64)).all(axis=1)
    points = int(np.prod(np.asarray(header["sizes"])[non_spatial]))
    if points > 1:
        raise VocoInputError(f"has {points} channels/time points; expected one 3-D volume", path)


def check_declared_size(path: str | Path) -> None:
    """Refuse a NIfTI or NRRD header that declares more voxels than its file can hold, or than
    memory can take, before any of them is allocated (by this engine's readers or a front end's)."""
    path = Path(path)
    declared = _declared_data(path, image_suffix(path))
    if declared is None:
        return
    shape, dtype, stored, compressed = declared
    count = int(np.prod(shape, dtype=np.float64))
    size = count * dtype.itemsize
    voxels = f"{_shape_text(shape)} {dtype.name} voxels"
    held = f"a gzip file of {stored} bytes holds at most {stored * GZIP_MAX_RATIO}" if compressed else \
        f"the file holds {stored}"
    if stored is not None and size > (stored * GZIP_MAX_RATIO if compressed else stored):
        raise VocoInputError(f"declares {voxels} ({size} bytes), but {held} bytes; refused before reading", path)
    needed = count * (dtype.itemsize + 4)  # the file's values and their float32 copy
    available = _available_memory()
    if needed > available:
        raise VocoInputError(f"needs {needed} bytes of memory to read {voxels}, but only {available} are "
                             "available; refused before reading", path)


def _available_memory() -> int:
    return int(psutil.virtual_memory().available)


def _declared_data(path: Path, suffix: str):
    """``(shape, dtype, stored bytes or None, compressed)`` as the header of a NIfTI or NRRD file
    declares them, or None for other formats and headers the readers will refuse anyway."""
    if suffix in (".nii", ".nii.gz"):
        try:
            header = nib.load(str(path)).header
            shape, dtype = header.get_data_shape(), header.get_data_dtype()
        except Exception:  # the reader says why, in its words
            return None
        return shape, dtype, path.stat().st_size, suffix == ".nii.gz"
    if suffix in (".nrrd", ".nhdr"):
        return _declared_nrrd_data(path)
    return None


def _declared_nrrd_data(path: Path):
    try:
        with open(path, "rb") as file:
            header = nrrd.read_header(file)
            data_start = file.tell()
        shape = tuple(int(size) for size in header["sizes"])
        dtype = np.dtype(nrrd.reader._determine_datatype(header))
    except Exception:  # _check_nrrd_header has said why already, or the reader will
        return None
    encoding = str(header.get("encoding", "raw")).lower()
    data_file = header.get("data file") or header.get("datafile")
    if data_file is not None:
        data = path.parent / str(data_file)
        stored = data.stat().st_size if isinstance(data_file, str) and data.is_file() else None
    else:
        stored = path.stat().st_size - data_start
    if encoding not in ("raw", "gzip", "gz"):  # text and bzip2: no bound from the file size
        stored = None
    return shape, dtype, stored, encoding in ("gzip", "gz")


def missing_geometry(path: str | Path) -> str | None:
    """Why the affine of the file in ``path`` is made up, or None when the file gives one.

    A NIfTI with qform_code and sform_code 0 (ANALYZE's "no orientation") has an affine that
    nibabel builds from pixdim alone: usable as a grid, but no measure of anything."""
    if image_suffix(Path(path)) not in (".nii", ".nii.gz"):
        return None
    header = nib.load(str(path)).header
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        return "has no orientation or origin (its NIfTI qform_code and sform_code are 0)"
    return None


def _check_nifti_geometry(path: Path) -> None:
    """The header's own affine: MONAI's reader replaces a non-finite one with the identity."""
    try:
        affine = nib.load(str(path)).affine
    except Exception:  # the reader says why, in its words
        return
    _check_geometry(affine, path)


def _check_geometry(affine: np.ndarray, path: Path) -> None:
    """Refuse an index -> RAS matrix that places no voxel anywhere: volumes in ml, resampling and
    every position would be made up."""
    matrix = affine[:3, :3]
    if not np.isfinite(affine).all():
        raise VocoInputError("has no usable geometry: its voxel-to-world matrix is not finite", path)
    spacing = np.linalg.norm(matrix, axis=0)
    if spacing.min() == 0 or abs(np.linalg.det(matrix)) <= 1e-6 * np.prod(spacing):
        raise VocoInputError("has no usable geometry: its voxel-to-world matrix is singular (zero spacing or "
                             "collapsed axes)", path)


def _check_resampled_size(image: MetaTensor, spacing: Sequence[float]) -> None:
    """Refuse resampling to ``spacing`` when the grid it makes could not be allocated."""
    current = np.linalg.norm(image.affine.numpy()[:3, :3], axis=0)
    shape = np.ceil(np.asarray(image.shape[1:]) * current / np.asarray(spacing)).astype(np.int64)
    count = int(np.prod(shape, dtype=np.float64))
    limit = min(MAX_RESAMPLED_VOXELS, _available_memory() // 16)  # float32 image, its copies and the label
    if count > limit:
        raise VocoInputError(f"resampling its {_shape_text(f'{v:g}' for v in current)} mm voxels to "
                             f"{_shape_text(f'{v:g}' for v in spacing)} mm would make a grid of {_shape_text(shape)} "
                             f"voxels ({count}), more than the {limit} that can be allocated here",
                             image.meta.get("filename_or_obj"))


def _single_volume(image: MetaTensor, path: Path) -> MetaTensor:
    """``image`` as ``(1, X, Y, Z)``, or the error saying why it is not one 3-D volume.

    LoadImage with ensure_channel_first gives ``(C, X, Y, Z[, ...])`` for 4-D/5-D NIfTI (the
    last axis moved first), ``(1, X, Y)`` for 2-D ones and a flat ``(0,)`` for empty ones.
    """
    if image.numel() == 0:
        raise VocoInputError("is empty (0 voxels)", path)
    points = int(np.prod(image.shape[:1] + image.shape[4:]))
    if image.ndim >= 4 and points > 1:
        raise VocoInputError(f"has {points} channels/time points; expected one 3-D volume", path)
    image = image.reshape(image.shape[:4])
    spatial = tuple(image.shape[1:])
    extent_dims = sum(edge > 1 for edge in spatial)
    if len(spatial) < 3 or extent_dims < 3:
        raise VocoInputError(f"is {extent_dims}-D (shape {_shape_text(spatial)}); expected a 3-D volume", path)
    if min(spatial) < MIN_EDGE:
        raise VocoInputError(
            f"is too small (shape {_shape_text(spatial)}); every axis needs at least {MIN_EDGE} voxels", path
        )
    return image


def _check_content(image: torch.Tensor, path: Path) -> None:
    low, high = image.aminmax()  # one pass: a NaN makes both NaN, an infinity is the minimum or maximum
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise VocoInputError("contains NaN or infinite values", path)
    if low == high:
        raise VocoInputError(f"is constant (value {low.item():g}): no image content", path)


def _resolve_modality(image: torch.Tensor, modality: str) -> str:
    """``modality`` with "auto" decided: CT when the image reaches air-like values."""
    if modality != "auto":
        return modality
    return "ct" if image.min().item() < CT_MINIMUM else "mri"


def _shape_text(shape) -> str:
    return "x".join(str(edge) for edge in shape)


