"""The preprocessed store: volumes preprocessed once, kept compactly, read back patch by patch.

A store is a folder:

* ``plan.json``: the format and its version, the ``Preprocessing`` every volume went through,
  the encoding of each modality and the engine version that wrote it;
* ``index.json``: per source volume (in the order given), where it came from (resolved path,
  size, mtime, sha256), its status (``ok``, or ``skipped`` with the one-line reason), and for
  stored ones the file (``key``), shape, affines and modality;
* one ``<key>.vox`` file per stored volume.

A store made for fine-tuning (``voco preprocess --labels``) also keeps each case's label map,
preprocessed with its image (nearest neighbour), as ``<key>.label.vox`` (uint8, or uint16 for
values above 255), and a sample of its foreground voxels as ``<key>.foreground.npy``; its plan
names the labels of the dataset.

A ``.vox`` file holds one volume ``(C, X, Y, Z)`` cut into cubic chunks, each compressed on its
own (zlib, fast level), behind a table of their offsets, so reading a patch decompresses only the
chunks it overlaps. Windowed CT is in [0, 1] and stored as uint8 (``round(v * 255)``, at most
1/510 off); the MRI z-score as float16; label values as they are. The reader seeks to the
chunks it needs: nothing of a file is mapped or kept open by the process, so its memory does not
grow with the store.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..checkpoints.files import atomic_path
from ..errors import VocoInputError

FORMAT, FORMAT_VERSION = "voco-store", 1
PLAN_NAME, INDEX_NAME, VOLUME_SUFFIX = "plan.json", "index.json", ".vox"
LABEL_SUFFIX, FOREGROUND_SUFFIX = ".label.vox", ".foreground.npy"
CHUNK_EDGE = 32
ZLIB_LEVEL = 1  # the fast level: windowed CT is mostly runs of 0 and 255 that any level finds
# The encoding of each modality's preprocessed values: (dtype, scale applied before storing).
ENCODINGS = {"ct": ("uint8", 255.0), "mri": ("float16", 1.0)}
_MAGIC = b"VOCOVOX1"
_HEADER = struct.Struct("<8sQ")  # magic, length of the JSON header that follows


def is_store(path) -> bool:
    return (Path(path) / PLAN_NAME).is_file()


def plan_for(preprocessing, label_names: dict[int, str] | None = None) -> dict:
    """What ``plan.json`` holds for volumes preprocessed with ``preprocessing``; with
    ``label_names`` (value -> name, possibly empty), a store of labelled cases."""
    plan = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "preprocessing": json.loads(json.dumps(dataclasses.asdict(preprocessing))),
            "encodings": {m: {"dtype": d, "scale": s} for m, (d, s) in ENCODINGS.items()},
            "chunk_edge": CHUNK_EDGE, "engine_version": __version__}
    if label_names is not None:
        plan["label_names"] = {str(value): name for value, name in sorted(label_names.items())}
    return plan


def write_json(path: Path, value) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1))


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise VocoInputError(f"cannot read the store's {what}: {error}", path) from None


# --- one volume file ------------------------------------------------------------------------------
def write_volume(path: Path, image: np.ndarray, modality: str) -> None:
    """``image`` float32 ``(C, X, Y, Z)`` encoded for ``modality`` into ``path``, atomically."""
    dtype, scale = ENCODINGS[modality]
    values = np.round(np.clip(image, 0.0, 1.0) * scale) if dtype == "uint8" else image
    _write_chunked(path, values.astype(dtype), scale)


def write_label_volume(path: Path, label: np.ndarray) -> None:
    """A label map ``(1, X, Y, Z)`` of whole numbers up to 65535 into ``path``, atomically."""
    _write_chunked(path, label.astype(np.uint8 if label.max(initial=0) <= 255 else np.uint16), 1.0)


def _write_chunked(path: Path, values: np.ndarray, scale: float) -> None:
    values, dtype = np.ascontiguousarray(values), values.dtype.name
    grid = [range(0, n, CHUNK_EDGE) for n in values.shape[1:]]
    chunks = [zlib.compress(np.ascontiguousarray(values[:, x:x + CHUNK_EDGE, y:y + CHUNK_EDGE, z:z + CHUNK_EDGE]),
                            ZLIB_LEVEL)
              for x in grid[0] for y in grid[1] for z in grid[2]]
    header = json.dumps({"shape": list(values.shape), "dtype": dtype, "scale": scale,
                         "chunk_edge": CHUNK_EDGE}).encode()
    offsets = np.cumsum([0] + [len(c) for c in chunks], dtype=np.uint64)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(_HEADER.pack(_MAGIC, len(header)) + header + offsets.tobytes())
        for chunk in chunks:
            out.write(chunk)


class VolumeFile:
    """Reads patches of one ``.vox`` file, decompressing only the chunks a patch overlaps."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as file:
                self._read_header(file)
                size = os.fstat(file.fileno()).st_size
        except (OSError, ValueError, KeyError, struct.error) as error:  # missing, unreadable, not ours
            raise VocoInputError(f"cannot be read as a store volume ({getattr(error, 'strerror', None) or error}); "
                                 "run voco preprocess again", self.path) from None
        if size != self.data_start + int(self.offsets[-1]):  # cut short (a full disk, a copy stopped)
            raise VocoInputError(f"is damaged: {size} bytes instead of {self.data_start + int(self.offsets[-1])}; "
                                 "run voco preprocess again", self.path)

    def _read_header(self, file) -> None:
        magic, length = _HEADER.unpack(file.read(_HEADER.size))
        if magic != _MAGIC:
            raise ValueError("no voco store volume header")
        header = json.loads(file.read(length))
        self.shape = tuple(header["shape"])
        self.dtype, self.scale, self.edge = np.dtype(header["dtype"]), header["scale"], header["chunk_edge"]
        self.grid = tuple(-(-n // self.edge) for n in self.shape[1:])
        count = int(np.prod(self.grid)) + 1
        self.offsets = np.frombuffer(file.read(8 * count), dtype=np.uint64)
        if len(self.offsets) != count:
            raise ValueError("its chunk table is cut short")
        self.data_start = file.tell()

    def _chunk(self, file, cx: int, cy: int, cz: int) -> np.ndarray:
        i = (cx * self.grid[1] + cy) * self.grid[2] + cz
        begin, end = int(self.offsets[i]), int(self.offsets[i + 1])
        file.seek(self.data_start + begin)
        try:
            data = zlib.decompress(file.read(end - begin))
        except zlib.error as error:
            raise VocoInputError(f"is damaged: chunk {i} does not decompress ({error}); run voco preprocess again",
                                 self.path) from None
        size = [min(self.edge, n - c * self.edge) for n, c in zip(self.shape[1:], (cx, cy, cz))]
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape[0], *size)

    def read_patch(self, start, shape) -> np.ndarray:
        """float32 ``(C, *shape)`` starting at voxel ``start``; it must lie inside the volume."""
        out = self.read_stored_patch(start, shape).astype(np.float32)
        if self.scale != 1.0:
            out /= self.scale
        return out

    def read_stored_patch(self, start, shape) -> np.ndarray:
        """The patch as stored (uint8, float16 or uint16): label values come back as they are."""
        start, shape = [int(v) for v in start], [int(v) for v in shape]
        if any(s < 0 or s + n > m for s, n, m in zip(start, shape, self.shape[1:])):
            raise ValueError(f"patch {start}+{shape} outside the volume {self.shape[1:]}")
        stored = np.empty((self.shape[0], *shape), dtype=self.dtype)  # assembled as stored, converted once
        ranges = [range(s // self.edge, (s + n - 1) // self.edge + 1) for s, n in zip(start, shape)]
        with open(self.path, "rb") as file:  # opened per patch: no descriptor held per volume
            for cx, cy, cz in itertools.product(*ranges):
                chunk, corner = self._chunk(file, cx, cy, cz), (cx * self.edge, cy * self.edge, cz * self.edge)
                lo = [max(s, c) for s, c in zip(start, corner)]
                hi = [min(s + n, c + e) for s, n, c, e in zip(start, shape, corner, chunk.shape[1:])]
                into = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
                source = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, corner))
                stored[(slice(None), *into)] = chunk[(slice(None), *source)]
        return stored

    def read(self) -> np.ndarray:
        return self.read_patch((0, 0, 0), self.shape[1:])


# --- the store as a whole -------------------------------------------------------------------------
class Store:
    """A store folder opened for reading: its plan and the volumes it holds."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.plan = read_json(self.folder / PLAN_NAME, PLAN_NAME)
        if self.plan.get("format") != FORMAT or self.plan.get("format_version") != FORMAT_VERSION:
            raise VocoInputError(f"is not a {FORMAT} version {FORMAT_VERSION} store (plan.json says "
                                 f"{self.plan.get('format')} {self.plan.get('format_version')})", self.folder)
        index = read_json(self.folder / INDEX_NAME, INDEX_NAME) if (self.folder / INDEX_NAME).is_file() else []
        self.entries = [e for e in index if e["status"] == "ok"]
        self.skipped = [e for e in index if e["status"] != "ok"]
        if not self.entries:
            raise VocoInputError("the store holds no usable volume (run voco preprocess)", self.folder)

    def require_preprocessing(self, preprocessing) -> None:
        """Refuse a run whose preset preprocesses otherwise than the store was made."""
        wanted = plan_for(preprocessing)["preprocessing"]
        have = self.plan["preprocessing"]
        if wanted != have:
            changed = ", ".join(f"{k} {have.get(k)} (run wants {v})" for k, v in wanted.items() if have.get(k) != v)
            raise VocoInputError(f"the store was preprocessed with {changed}; give the options it was made with "
                                 "(--preset, --grid, --crop-edge, --spacing, --modality) or make another store "
                                 "(voco preprocess --out ANOTHER)", self.folder)

    def volume(self, i: int) -> VolumeFile:
        return VolumeFile(self.folder / self.entries[i]["key"])

    def image(self, i: int) -> torch.Tensor:
        """The whole decoded volume ``i``, float32 ``(C, X, Y, Z)`` (tests and small tools)."""
        return torch.from_numpy(self.volume(i).read())


def shard(count: int, rank: int, world_size: int) -> np.ndarray:
    """The volumes rank ``rank`` of ``world_size`` reads: ``rank, rank + world_size, ...``."""
    return np.arange(rank, count, world_size)
