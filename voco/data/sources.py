"""Which image files a dataset holds: files, folders, MSD / nnU-Net v2 dataset.json and list files.

Pretraining needs no labels, so a dataset contributes its training *and* test images.
Every problem is a ``VocoInputError`` naming the file at fault.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from voco.errors import VocoInputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LIST_SUFFIXES = (".txt", ".lst", ".csv")
# The largest label value a dataset may use: that of uint16 label maps (Slicer's, nnU-Net's), which
# keeps the value -> class table that training builds small (a value of 1e11 asked for 93 GiB).
MAX_LABEL_VALUE = 65535

# nnU-Net names the channels of a case {case}_0000, {case}_0001, ...; channel 0 stands for the case.
_FIRST_CHANNEL = "_0000"
_SUFFIX_TEXT = ", ".join(IMAGE_SUFFIXES[:3]) + ", ..."
_NO_IMAGES = f"no images ({_SUFFIX_TEXT}) found"
_NOT_A_SOURCE = f"not an image ({_SUFFIX_TEXT}), folder, dataset.json or list file"


def image_suffix(path: str | Path) -> str | None:
    """The image suffix ``path`` ends with (``".nii.gz"``, ...), or None when it is no image name."""
    name = Path(path).name.lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if name.endswith(suffix)), None)


def case_name(path: str | Path) -> str:
    """A case's name: its image file's name without the suffix and nnU-Net's ``_0000`` channel tag."""
    name = Path(path).name
    return name[: -len(image_suffix(name) or "")].removesuffix("_0000")


def list_images(paths: list[str | Path]) -> list[Path]:
    """The image files that ``paths`` name, in order, each once (compared by resolved path).

    Each path is an image file, a folder, a dataset.json (MSD or nnU-Net v2) or a list file
    (``.txt``/``.lst``/``.csv``, one path per line).
    """
    images: dict[Path, Path] = {}
    for path in map(Path, paths):
        for image in _images_in_source(path):
            images.setdefault(image.resolve(), image)
    return list(images.values())


def list_labelled_cases(path: str | Path) -> list[tuple[Path, Path]]:
    """``(image, label)`` pairs of a labelled dataset, for fine-tuning.

    ``path`` is a dataset.json (MSD ``training`` pairs, or nnU-Net v2 ``imagesTr``/``labelsTr``),
    or a folder holding one, or a folder with ``imagesTr/`` and ``labelsTr/`` whose file names
    match once nnU-Net's ``_0000`` channel tag is stripped.
    """
    path = Path(path)
    _require_readable(path)
    if path.is_dir() and (path / "dataset.json").is_file():
        path = path / "dataset.json"
    if path.is_dir():
        if not (path / "imagesTr").is_dir() or not (path / "labelsTr").is_dir():
            raise VocoInputError("has no dataset.json and no imagesTr/ + labelsTr/ folders", path)
        cases = _folder_cases(path)
    elif path.suffix.lower() == ".json":
        cases = _dataset_json_cases(path)
    else:
        raise VocoInputError("not a dataset.json or a dataset folder", path)
    if not cases:
        raise VocoInputError("no labelled cases found", path)
    return cases


def dataset_label_names(path: str | Path) -> dict[int, str]:
    """Label value -> name from a dataset.json's ``labels`` (MSD ``{"1": "liver"}`` or nnU-Net v2
    ``{"liver": 1}``); empty for a folder pair without one. Background (0) is left out."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
        if not path.is_file():
            return {}
    dataset = _read_dataset_json(path)
    labels, nnunet = dataset.get("labels") or {}, _is_nnunet_v2(dataset)
    if not isinstance(labels, dict):
        raise VocoInputError('"labels" must map values to names', path)
    names = {}
    for key, value in labels.items():
        written, name = (value, key) if nnunet else (key, value)
        number = _label_value(written)
        if number is None:
            raise VocoInputError(f'"labels" entry {key!r}: {written!r} is not a label value '
                                 f"(a whole number from 0 to {MAX_LABEL_VALUE}; nnU-Net region labels are not supported)",
                                 path)
        if number != 0:
            names[number] = str(name)
    return names


def _label_value(written) -> int | None:
    """The label value a dataset.json writes (``"3"`` as an MSD key, ``3`` as an nnU-Net value), or
    None when it is none: fractional, negative, a list (nnU-Net region), beyond MAX_LABEL_VALUE."""
    if isinstance(written, str) and written.strip().isdecimal():
        written = int(written)
    if not isinstance(written, int) or isinstance(written, bool):
        return None
    return written if 0 <= written <= MAX_LABEL_VALUE else None


def _images_in_source(path: Path) -> list[Path]:
    _require_readable(path)
    if path.is_dir():
        images = _images_in_folder(path)
    elif image_suffix(path):
        return [path]
    elif path.suffix.lower() == ".json":
        images = _images_in_dataset_json(path)
    elif path.suffix.lower() in LIST_SUFFIXES:
        images = _images_in_list_file(path)
    else:
        raise VocoInputError(_NOT_A_SOURCE, path)
    if not images:
        raise VocoInputError(_NO_IMAGES, path)
    return images


def _images_in_folder(folder: Path) -> list[Path]:
    if (folder / "dataset.json").is_file():
        return _images_in_dataset_json(folder / "dataset.json")
    if (folder / "imagesTr").is_dir():
        return _image_files(folder / "imagesTr") + _image_files(folder / "imagesTs")
    return _image_files(folder)


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (none when it does not exist), sorted by name."""
    if not folder.is_dir():
        return []
    # Dot files are macOS "._name.nii.gz" resource forks and the like, never images.
    return sorted(
        p for p in folder.iterdir() if p.is_file() and image_suffix(p) and not p.name.startswith(".")
    )


def _images_in_dataset_json(path: Path) -> list[Path]:
    dataset = _read_dataset_json(path)
    if _is_nnunet_v2(dataset):
        ending = dataset["file_ending"]
        return [
            image
            for images_dir in ("imagesTr", "imagesTs")
            for image in _nnunet_first_channels(path.parent / images_dir, ending)
        ]
    entries = dataset["training"] + dataset.get("test", [])
    return [_referenced_file(path, _msd_image(path, entry)) for entry in entries]


def _dataset_json_cases(path: Path) -> list[tuple[Path, Path]]:
    dataset = _read_dataset_json(path)
    if _is_nnunet_v2(dataset):
        ending = dataset["file_ending"]
        cases = []
        for image in _nnunet_first_channels(path.parent / "imagesTr", ending):
            label = path.parent / "labelsTr" / (image.name[: -len(_FIRST_CHANNEL + ending)] + ending)
            if not label.is_file():
                raise VocoInputError(f"image {image.name} has no label {label}", path)
            cases.append((image, label))
        return cases
    cases = []
    for entry in dataset["training"]:
        image = _referenced_file(path, _msd_image(path, entry))
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
            raise VocoInputError(f"training case {image.name} has no label", path)
        cases.append((image, _referenced_file(path, entry["label"])))
    return cases


def _folder_cases(folder: Path) -> list[tuple[Path, Path]]:
    images = _image_files(folder / "imagesTr")
    # In nnU-Net layout only channel 0 names the case; the other channels share its label.
    if any(map(_is_first_channel, images)):
        images = [image for image in images if _is_first_channel(image)]
    labels = {_case_id(label): label for label in _image_files(folder / "labelsTr")}
    cases = []
    for image in images:
        label = labels.get(_case_id(image))
        if label is None:
            raise VocoInputError(f"image {image.name} has no label in labelsTr/", folder)
        cases.append((image, label))
    return cases


def _read_dataset_json(path: Path) -> dict:
    try:
        dataset = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise VocoInputError(f"invalid JSON: {error.msg} (line {error.lineno}, column {error.colno})", path) from None
    except (OSError, UnicodeDecodeError) as error:
        raise VocoInputError(f"cannot be read: {error}", path) from None
    if not isinstance(dataset, dict) or not (_is_nnunet_v2(dataset) or isinstance(dataset.get("training"), list)):
        raise VocoInputError(
            'neither an MSD dataset.json ("training" list) nor an nnU-Net v2 one ("file_ending", "channel_names")',
            path,
        )
    return dataset


def _is_nnunet_v2(dataset) -> bool:
    return isinstance(dataset, dict) and isinstance(dataset.get("file_ending"), str) and "channel_names" in dataset


def _nnunet_first_channels(images_dir: Path, ending: str) -> list[Path]:
    if not images_dir.is_dir():
        return []
    return sorted(p for p in images_dir.iterdir() if p.is_file() and p.name.endswith(_FIRST_CHANNEL + ending))


def _msd_image(path: Path, entry) -> str:
    """The image path of an MSD ``training``/``test`` entry: a string or ``{"image": ...}``."""
    image = entry.get("image") if isinstance(entry, dict) else entry
    if not isinstance(image, str):
        raise VocoInputError(f"entry {json.dumps(entry)[:80]} names no image", path)
    return image


def _images_in_list_file(path: Path) -> list[Path]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except (OSError, UnicodeDecodeError) as error:
        raise VocoInputError(f"cannot be read: {error}", path) from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if path.suffix.lower() == ".csv":
        lines = [row[0].strip() for row in csv.reader(lines) if row and row[0].strip()]
        if lines and not _resolve_listed(path, lines[0]).is_file():
            lines = lines[1:]  # a header row such as "image,label"
    images = []
    for line in lines:
        image = _referenced_file(path, line)
        if not image_suffix(image):
            raise VocoInputError(f"lists {image}, which is not an image ({_SUFFIX_TEXT})", path)
        images.append(image)
    return images


def _referenced_file(source: Path, reference: str) -> Path:
    """The file a dataset.json or list file names, which must exist."""
    file = _resolve_listed(source, reference)
    if not file.is_file():
        raise VocoInputError(f"lists {file}, which does not exist", source)
    return file


def _resolve_listed(source: Path, reference: str) -> Path:
    """A path written in ``source``: relative ones are relative to ``source``'s folder."""
    return source.parent / Path(reference).expanduser()


def _require_readable(path: Path) -> None:
    try:
        if not path.exists():
            raise VocoInputError("does not exist", path)
        if path.is_dir():
            with os.scandir(path) as entries:
                next(entries, None)
        else:
            open(path, "rb").close()
    except OSError as error:
        raise VocoInputError(f"cannot be read ({error.strerror})", path) from None


def _stem(path: Path) -> str:
    """The file name without its image suffix."""
    return path.name[: -len(image_suffix(path))]


def _is_first_channel(path: Path) -> bool:
    return _stem(path).endswith(_FIRST_CHANNEL)


def _case_id(path: Path) -> str:
    """The case a file belongs to: its name without image suffix and nnU-Net channel tag ``_0000``."""
    stem = _stem(path)
    return stem[: -len(_FIRST_CHANNEL)] if _is_first_channel(path) else stem
