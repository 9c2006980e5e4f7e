"""Writing checkpoints and outputs so that a crash never leaves a half-written file, and reading
checkpoints without ever running code from them."""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import VocoInputError


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    The temporary name ends in the same suffixes (``.nii.gz``), so writers that pick the format
    from the name (nibabel, matplotlib) write the right one.

    On any error the temporary file is removed and ``path`` keeps its old content (or stays absent).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    except OSError as error:  # a read-only folder, a file where a folder should be, a full disk
        raise VocoInputError(f"cannot be written ({error.strerror})", path) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; outputs get the usual mode
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable_folder(folder: str | Path) -> Path:
    """``folder`` (existing or still to be made), or an error naming it when no file can be written
    there: a file where a folder should be, a read-only or foreign folder. Creates nothing, so a
    command can check its outputs before any work and leave nothing behind when it fails."""
    folder = Path(folder)
    existing = folder
    try:
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise VocoInputError(f"cannot be made: {existing} is a file, not a folder", folder)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise VocoInputError(f"cannot be written ({error.strerror})", folder) from None
    return folder


def check_output_folder(folder: str | Path) -> Path:
    """Like ``check_writable_folder``, for an ``--out`` folder that must not be an existing file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise VocoInputError("is a file; --out needs a folder", folder)
    return check_writable_folder(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(state: dict, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)`` with one-line errors for missing, truncated, foreign
    and code-carrying files."""
    path = Path(path)
    if not path.is_file():
        raise VocoInputError("checkpoint does not exist", path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the user needs one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        named = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
        what = f" ({named[0][:120]})" if named else ""
        raise VocoInputError(f"refused: it contains pickled code or objects{what}; only tensors and plain "
                             "data are loaded (weights_only=True)", path) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VocoInputError(f"not a readable PyTorch checkpoint (truncated or corrupt?): {first[:160]}", path) from None
    if not isinstance(state, dict):
        raise VocoInputError(f"not a checkpoint dictionary (found {type(state).__name__})", path)
    return state


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
