"""Writing checkpoints and outputs so that a crash never leaves a half-written file, and reading
checkpoints without ever running code from them.

A file is written under a temporary name beside it and renamed over it (``atomic_path``); a
folder of several files (a model package) is written as a new folder and swapped in
(``atomic_folder``). What a SIGKILL leaves of either (temporaries, a folder moved aside) is
recognised by its name and cleaned by the next writer.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import pickle
import re
import shutil
import tempfile
import uuid
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import VocoInputError, first_line

if TYPE_CHECKING:
    import torch

# torch is imported only by the functions that save or load tensors: the paths, checksums and
# atomic writes here serve commands that must answer without it (voco models list, --help).


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    The temporary name ends in the same suffixes (``.nii.gz``), so writers that pick the format
    from the name (nibabel, matplotlib) write the right one.

    On any error the temporary file is removed and ``path`` keeps its old content (or stays absent);
    a full disk is reported as such (one line naming ``path``), whoever wrote the bytes.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_MARK + "".join(path.suffixes), dir=path.parent)
    except OSError as error:  # a read-only folder, a file where a folder should be, a full disk
        raise VocoInputError(f"cannot be written ({error.strerror})", path) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; outputs get the usual mode
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(exc):
            raise VocoInputError(f"disk full: could not write it ({_free_text(path.parent)})", path) from None
        raise


# atomic_path's temporaries: ".<name>.<8 characters of mkstemp>.tmp<suffixes of name>"
_TEMP_MARK = ".tmp"
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)*")
# torch.save's C++ writer reports a failed write without its errno ("file write failed",
# or "unexpected pos" when the zip writer notices the short write itself)
_TORCH_WRITE_FAILED = ("file write failed", "PytorchStreamWriter failed", "unexpected pos")


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _TORCH_WRITE_FAILED)


def _free_text(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free there"
    except OSError:
        return "free space unknown"


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove what a killed writer left in ``folder``: ``atomic_path`` temporaries and the new
    folders of ``atomic_folder`` that were never swapped in. Call it only while no other process
    writes there (a run holding its lock). Returns the removed paths."""
    removed = []
    for entry in Path(folder).iterdir():
        if entry.is_file() and _TEMPORARY.fullmatch(entry.name):
            entry.unlink(missing_ok=True)
        elif entry.is_dir() and _STAGING.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            continue
        removed.append(entry)
    return removed


# atomic_folder's names beside ``<name>``: the new folder being written, and the old one moved aside
_STAGING = re.compile(r"\..+\.new-[0-9a-f]{32}")


def _aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*"), key=lambda p: p.stat().st_mtime)


@contextmanager
def atomic_folder(path: str | Path):
    """Yield a new empty folder beside ``path``; on success it takes the place of ``path``.

    A folder cannot be renamed onto a non-empty one, so the old folder is first renamed aside,
    then the new one in. A kill between the two renames leaves no folder at ``path`` and the
    complete old one aside: ``complete_folder`` reads that one, and the next ``atomic_folder``
    puts it back before writing. A kill while the new folder is written leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_folder(path)
    staging = path.with_name(f".{path.name}.new-{uuid.uuid4().hex}")
    staging.mkdir()
    try:
        yield staging
        replace_folder(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an old ``target`` is renamed aside first (a folder cannot be
    renamed onto a non-empty one) and removed after."""
    if target.exists():
        aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        os.replace(target, aside)
        os.replace(new, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(new, target)


def complete_folder(path: str | Path) -> Path:
    """``path``, or the complete old folder an interrupted ``atomic_folder`` swap left aside."""
    path = Path(path)
    if path.exists():
        return path
    aside = _aside(path)
    return aside[-1] if aside else path


def _recover_folder(path: Path) -> None:
    aside = _aside(path)
    if aside and not path.exists():
        os.replace(aside.pop(), path)
    for old in aside:
        shutil.rmtree(old, ignore_errors=True)
    for staging in path.parent.glob(f".{glob.escape(path.name)}.new-*"):
        shutil.rmtree(staging, ignore_errors=True)


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
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        torch.save(state, stream)  # through a Python file, a full disk raises OSError(ENOSPC), not torch's text
    return Path(path)


def require_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse to save weights with NaN or infinite values: they would replace good ones."""
    import torch

    bad = [name for name, value in tensors.items()
           if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise VocoInputError(f"not saved: {len(bad)} of {len(tensors)} weight tensors are not finite "
                             f"(e.g. {bad[0]}); the previous file is kept", path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)`` with one-line errors for missing, truncated, foreign
    and code-carrying files."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise VocoInputError("checkpoint does not exist", path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the user needs one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL (\S+)", str(exc))
        raise checkpoint_refused(path, named and f"GLOBAL {named.group(1)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise checkpoint_unreadable(path, first_line(exc)) from None
    if not isinstance(state, dict):
        raise VocoInputError(f"not a checkpoint dictionary (found {type(state).__name__})", path)
    return state


def checkpoint_refused(path: Path, name: str | None) -> VocoInputError:
    """The error for a checkpoint that pickles code or objects (``name``: the global it names)."""
    what = f" ({name[:120]})" if name else ""
    return VocoInputError(f"refused: it contains pickled code or objects{what}; only tensors and plain data are "
                          "loaded (weights_only=True)", path)


def checkpoint_unreadable(path: Path, reason: str) -> VocoInputError:
    return VocoInputError(f"not a readable PyTorch checkpoint (truncated or corrupt?): {reason}", path)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
