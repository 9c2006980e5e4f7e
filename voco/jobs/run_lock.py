"""One run folder, one training process: an exclusive lock on ``<run>/.lock`` while it trains.

The lock is the run's sign of life that outlasts every parent: a front end that started the run
and was closed, or the PythonSlicer launcher that dies at once on SIGTERM while the engine still
writes its checkpoint. The operating system drops it when the process ends, however it ends
(SIGKILL too), so a stale lock cannot exist. The file holds the holder's PID and host, for the
message a second run gets. Front ends test the lock the same way (VoCoCommonLib.runs).

Holding the lock, a run is the folder's only writer: it removes the temporaries a killed run
left there (``remove_stale_temporaries``), which no one else could tell from files being written.
"""

from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from ..checkpoints.files import check_output_folder, remove_stale_temporaries
from ..errors import VocoInputError

LOCK_NAME = ".lock"
_HOLDER_OFFSET = 16  # Windows locks byte 0 only, so that the holder stays readable after it


def _try_lock(handle) -> bool:
    if sys.platform == "win32":
        import msvcrt

        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def holder(run_dir) -> str:
    try:
        return (Path(run_dir) / LOCK_NAME).read_bytes()[_HOLDER_OFFSET:].decode(errors="replace").strip()
    except OSError:
        return ""


@contextmanager
def run_lock(run_dir, rank: int = 0):
    """Hold the run folder's lock (rank 0 of a distributed run holds it for all ranks). A folder
    made here for a command that then fails (bad input) is removed again: nothing half-written."""
    if rank != 0:
        yield
        return
    run_dir = check_output_folder(run_dir)  # also a folder that exists but is read-only
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_NAME, "a+b")
    except OSError as exc:
        raise VocoInputError(f"cannot use this as a run folder ({exc.strerror})", run_dir) from None
    try:
        if not _try_lock(handle):
            raise VocoInputError(f"the run folder is in use by another training process ({holder(run_dir) or 'unknown'})",
                                 run_dir)
        handle.seek(0)
        handle.truncate()
        handle.write(b" " * _HOLDER_OFFSET + f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        handle.flush()
        remove_stale_temporaries(run_dir)
        yield
    except BaseException:
        handle.close()
        if created and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
            (run_dir / LOCK_NAME).unlink()
            run_dir.rmdir()
        raise
    handle.close()  # closing the file releases the lock
