"""A PyTorch checkpoint's contents with each tensor's dtype and shape in place of the tensor, read
without torch and without reading tensor bytes (``voco checkpoint inspect``: torch's import alone
takes seconds).

``torch.save`` writes a zip: ``<archive>/data.pkl`` pickles the object, every tensor as a call of
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` whose storage is a
persistent id ``("storage", torch.FloatStorage, key, location, numel)``; the bytes are the record
``<archive>/data/<key>``. Files of torch < 1.6 (``_use_new_zipfile_serialization=False``) are
pickles in a row: a magic number, a protocol version, system info, the object (storage ids
``(..., key, location, numel, view)``), the storage keys, then each storage's bytes.

The unpickler resolves only the names listed in ``_GLOBALS`` (containers, storages, tensors,
dtypes, devices); any other global is refused without being imported, as ``torch.load
(weights_only=True)`` refuses it. Other torch names that torch's own weights-only loader accepts
(sparse, quantised, nested tensors, tensor subclasses) raise ``NeedsTorch``: the caller then loads
the file with torch.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import VocoInputError, first_line
from .files import checkpoint_refused, checkpoint_unreadable

_FLOATING = ("float64", "float32", "float16", "bfloat16", "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz",
             "float8_e4m3fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2")
# torch's legacy storage classes (torch/storage.py, _LegacyStorage subclasses) and their dtypes
_STORAGES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
             "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
             "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexDoubleStorage": "complex128",
             "ComplexFloatStorage": "complex64", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
             "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
             "UntypedStorage": "uint8"}
_ITEM_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
               "int8": 1, "uint8": 1, "bool": 1, "complex128": 16, "complex64": 8, "qint8": 1, "quint8": 1,
               "qint32": 4, "quint4x2": 1, "quint2x4": 1, "uint16": 2, "uint32": 4, "uint64": 8}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER, PROTOCOL_VERSION
_LEGACY_PROTOCOL = 1001


class NeedsTorch(Exception):
    """The file uses a torch name this reader does not model; torch's loader can tell."""


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int
    view_offset: int = 0  # legacy files: a storage that is a view of another at this element offset


@dataclass(frozen=True)
class TensorHeader:
    """What ``torch.load`` would give as a tensor, without its values."""

    dtype: str  # torch's name without "torch.": "float32", "int64", ...
    shape: tuple[int, ...]
    storage: str  # storage key: tensors with the same (storage, offset, shape) are one tensor saved twice
    offset: int

    def is_floating_point(self) -> bool:
        return self.dtype in _FLOATING

    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


class Size(tuple):
    """torch.Size as a tuple (what it is), printed as torch prints it."""

    def __repr__(self) -> str:
        return f"torch.Size({list(self)})"


@dataclass(frozen=True)
class Dtype:
    name: str

    def __repr__(self) -> str:
        return f"torch.{self.name}"


@dataclass(frozen=True)
class Device:
    type: str
    index: int | None = None

    def __repr__(self) -> str:
        return f"device(type={self.type!r}" + ("" if self.index is None else f", index={self.index}") + ")"

    def __str__(self) -> str:
        return self.type + ("" if self.index is None else f":{self.index}")


def _device(spec, index=None) -> Device:
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"device {spec!r}")
    kind, _, number = spec.partition(":")
    return Device(kind, int(number) if number else index)


def _rebuild_tensor(storage, offset, size, stride, *rest) -> TensorHeader:
    """torch._utils._rebuild_tensor / _v2 (storage, offset, size, stride, requires_grad, hooks, metadata)."""
    if not isinstance(storage, _Storage) or not isinstance(offset, int) or not all(isinstance(n, int) for n in size):
        raise pickle.UnpicklingError("a tensor without a storage, offset and size")
    return TensorHeader(storage.dtype, Size(size), storage.key, storage.view_offset + offset)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None) -> TensorHeader:
    """An untyped storage, the dtype given beside it."""
    if not isinstance(dtype, Dtype):
        raise pickle.UnpicklingError("a tensor without a dtype")
    header = _rebuild_tensor(storage, offset, size, stride)
    return TensorHeader(dtype.name, header.shape, header.storage, header.offset)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if not isinstance(data, TensorHeader):
        raise pickle.UnpicklingError("a parameter without a tensor")
    return data


def _bytes(text, encoding="latin1") -> bytes:
    """_codecs.encode, as protocol 2 pickles bytes: only a text encoding."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("_codecs.encode of something other than text")
    return text.encode(encoding)


def _bytearray(data=b"", encoding="latin1") -> bytearray:
    """bytearray of bytes or text, never of a count (bytearray(10**12) would take the memory)."""
    if isinstance(data, str):
        return bytearray(_bytes(data, encoding))
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("bytearray of something other than bytes")
    return bytearray(data)


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _bytes,
    ("torch", "Size"): Size,
    ("torch", "device"): _device,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): dtype for name, dtype in _STORAGES.items()},
    ("torch.storage", "UntypedStorage"): "uint8",
    **{("torch", name): Dtype(name) for name in (*_ITEM_BYTES, *_FLOATING)},
}


class _HeaderUnpickler(pickle.Unpickler):
    def __init__(self, stream, storage_id_length: int):
        super().__init__(stream, encoding="utf-8")
        self.storage_id_length = storage_id_length  # 5 in zip files, 6 (with a view) in legacy ones
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        # Python 2 names, as protocol 2 writes them (__builtin__.set), as pickle itself renames them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name),
                                                       (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        found = _GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch" or module.startswith("torch."):
            raise NeedsTorch(f"{module}.{name}")
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")

    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and len(saved_id) == self.storage_id_length and saved_id[0] == "storage"):
            raise pickle.UnpicklingError(f"persistent id {str(saved_id)[:60]}")
        dtype, key, numel = saved_id[1], str(saved_id[2]), saved_id[4]
        if not isinstance(dtype, str) or not isinstance(numel, int):
            raise pickle.UnpicklingError(f"storage {str(saved_id)[:60]}")
        view = saved_id[5] if self.storage_id_length == 6 else None
        storage = self.storages.setdefault(key, _Storage(key, dtype, numel))
        if view is None:
            return storage
        _, offset, _ = view  # (view key, element offset into the root, view size)
        return _Storage(key, dtype, numel, offset)  # the root's key: the bytes are the root's


def read_tensor_headers(path: str | Path) -> dict:
    """The checkpoint dictionary in ``path`` with ``TensorHeader``s for tensors; the same one-line
    errors as ``files.load_checkpoint``; ``NeedsTorch`` when only torch can tell."""
    path = Path(path)
    if not path.is_file():
        raise VocoInputError("checkpoint does not exist", path)
    try:
        with open(path, "rb") as stream:
            is_zip = stream.read(4) == b"PK\x03\x04"  # how torch.load tells the formats apart
            stream.seek(0)
            state = _read_zip(stream) if is_zip else _read_legacy(stream)
    except pickle.UnpicklingError as exc:
        name = str(exc) if str(exc).startswith("GLOBAL ") else None
        raise checkpoint_refused(path, name) from None
    except (EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise checkpoint_unreadable(path, first_line(exc)) from None
    if not isinstance(state, dict):
        raise VocoInputError(f"not a checkpoint dictionary (found {type(state).__name__})", path)
    return state


def _read_zip(stream) -> object:
    with zipfile.ZipFile(stream) as archive:
        pickles = [name for name in archive.namelist() if name.count("/") == 1 and name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError("no data.pkl in the zip: not a torch.save file")
        prefix = pickles[0].removesuffix("data.pkl")
        unpickler = _HeaderUnpickler(io.BytesIO(archive.read(pickles[0])), 5)
        state = unpickler.load()
        for storage in unpickler.storages.values():  # every storage is there, whole (a cut file fails here)
            record = archive.getinfo(f"{prefix}data/{storage.key}")
            if record.file_size < storage.numel * _item_bytes(storage.dtype):
                raise ValueError(f"record data/{storage.key} holds {record.file_size} bytes, "
                                 f"fewer than its {storage.numel} values")
    return state


def _read_legacy(stream) -> object:
    def plain():
        return _HeaderUnpickler(stream, 6).load()

    if plain() != _LEGACY_MAGIC:
        raise ValueError("invalid magic number; corrupt file?")
    if plain() != _LEGACY_PROTOCOL:
        raise ValueError("invalid protocol version")
    plain()  # system info: byte order, type sizes
    unpickler = _HeaderUnpickler(stream, 6)
    state = unpickler.load()
    keys = plain()
    if not isinstance(keys, list) or set(map(str, keys)) != set(unpickler.storages):
        raise ValueError("storage keys do not match the tensors")
    # Each storage: an 8-byte element count, then its bytes. The file must hold them all.
    needed = stream.tell() + sum(8 + s.numel * _item_bytes(s.dtype) for s in unpickler.storages.values())
    if os.fstat(stream.fileno()).st_size < needed:
        raise EOFError("the file ends before its tensors' bytes")
    return state


def _item_bytes(dtype: str) -> int:
    return _ITEM_BYTES.get(dtype, 1)
