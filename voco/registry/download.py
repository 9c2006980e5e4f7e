"""Downloading one file over HTTP(S) with resume, progress events and a sha256 check (urllib only).

The bytes go to ``<file>.part``, and ``<file>.part.json`` beside it records the sha256 they must
add up to. A later call resumes with an HTTP Range request only when it expects that same sha256,
and only appends when the server answers with exactly the missing range; anything else (a server
that ignores Range, a different file behind the URL) restarts from zero. So a resumed file is never
made of two different files, and a file that does not match its sha256 is deleted, never kept.

Nothing is downloaded without a known sha256: the caller's, or the one the server names in
``X-Linked-Etag``. Hugging Face sends that header, quoted, on the ``/resolve/`` URL of every LFS file
(on its redirect to the CDN, which does not repeat it); huggingface_hub reads it the same way. That
header only shows the bytes arrived as the server meant them: a server that lies names its own
file's sha256, so the caller marks such a download unverified.

A download has an overall deadline (``$VOCO_DOWNLOAD_DEADLINE_S``, else enough time for the
expected size at ``MIN_RATE_BYTES_S``): the per-read timeout alone lets a server that trickles a
byte at a time hold it forever. With an expected size, a ``Content-Length`` that differs is refused
before any byte is written, and a body that runs past it is cut off. Only a broken connection or
the deadline keeps the ``.part`` for a resume; any other failure (a full disk, too many bytes, a
wrong sha256) removes it.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from .. import __version__
from ..checkpoints.files import sha256_of
from ..errors import VocoInputError

CHUNK_BYTES = 1 << 16
TIMEOUT_S = 60  # per socket operation: a stalled connection fails instead of hanging
PROGRESS_INTERVAL_S = 0.1  # at most ~10 download events per second
DEADLINE_VARIABLE = "VOCO_DOWNLOAD_DEADLINE_S"
DEADLINE_BASE_S = 600.0  # connecting, redirects and a slow start, on top of the time the bytes take
MIN_RATE_BYTES_S = 100_000  # slower than 100 kB/s on average counts as stalled (VoComni_H: 13 h)
DEADLINE_UNKNOWN_SIZE_S = 12 * 3600.0
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_SHA256 = re.compile(r"[0-9a-f]{64}")


def fetch(url: str, part: Path, name: str, reporter, sha256: str | None = None, size: int | None = None) -> str:
    """Download ``url`` into ``part`` (resuming an earlier partial download of the same file) and
    verify it; returns the sha256 it was checked against.

    ``sha256`` is the expected checksum; without one, the server's ``X-Linked-Etag`` is used, and
    with neither the download is refused before any byte is written. ``size`` is the expected
    number of bytes, when known. On success ``part`` is the whole verified file and its record is
    gone; on a broken connection or a missed deadline ``part`` stays for a resume, on any other
    failure it is removed.
    """
    deadline = time.monotonic() + deadline_s(size)
    record = part.with_name(part.name + ".json")
    with _written(part, record):
        part.parent.mkdir(parents=True, exist_ok=True)
    recorded = _recorded_sha256(record)
    offset = part.stat().st_size if part.is_file() and recorded and sha256 in (None, recorded) else 0
    response, linked = _open(url, offset)
    try:
        expected = sha256 or linked
        if expected is None:
            raise VocoInputError("refused: no sha256 is known for this file (the registry lists none and the "
                                 "server sends no X-Linked-Etag); pass the published one with --sha256", url)
        if linked and linked != expected:
            raise VocoInputError(f"the server offers a file with sha256 {linked}, not the expected {expected}", url)
        if offset and (expected != recorded or _first_byte(response) != offset):
            offset = 0
            if response.status == 206:  # a range of some other file, or the wrong range: start again
                response.close()
                response, _ = _open(url, 0)
        with _removed_unless_resumable(part, record):
            _check_announced_size(response, offset, size, url)
            with _written(part, record):
                record.write_text(json.dumps({"url": url, "sha256": expected}))
            _receive(response, part, offset, _Progress(name, reporter, size), url, deadline)
    finally:
        response.close()
    record.unlink()
    actual = sha256_of(part)
    if actual != expected:
        part.unlink()
        raise VocoInputError(f"sha256 {actual} differs from the expected {expected}; the download was deleted", url)
    return expected


def deadline_s(size: int | None) -> float:
    """Seconds a whole download may take: ``$VOCO_DOWNLOAD_DEADLINE_S``, else enough for ``size``
    bytes at the minimum rate."""
    value = os.environ.get(DEADLINE_VARIABLE)
    if not value:
        return DEADLINE_UNKNOWN_SIZE_S if size is None else DEADLINE_BASE_S + size / MIN_RATE_BYTES_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:  # also NaN
        raise VocoInputError(f"{DEADLINE_VARIABLE} must be a positive number of seconds, not {value!r}")
    return seconds


class _Resumable(VocoInputError):
    """A download stopped by the network or the deadline: what arrived is kept for a resume."""


@contextmanager
def _removed_unless_resumable(part: Path, record: Path):
    try:
        yield
    except _Resumable:
        raise
    except BaseException:
        part.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
        raise


@contextmanager
def _written(part: Path, record: Path, total: int | None = None):
    """Turns a failed write of the partial download into one line that names it, removing it."""
    try:
        yield
    except OSError as exc:
        done = part.stat().st_size if part.is_file() else 0
        part.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
        of = f" of {total}" if total is not None else ""
        problem = "disk full" if exc.errno in _DISK_FULL else f"cannot write ({exc.strerror or exc})"
        raise VocoInputError(f"{problem} after writing {done}{of} bytes; the partial download was removed",
                             part) from None


def _check_announced_size(response, offset: int, size: int | None, url: str) -> None:
    announced = _announced_total(response, offset)
    if size is not None and announced is not None and announced != size:
        raise VocoInputError(f"refused: the server announces {announced} bytes, the registry lists {size}", url)


def _announced_total(response, offset: int) -> int | None:
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _recorded_sha256(record: Path) -> str | None:
    try:
        return json.loads(record.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _LinkedEtags(urllib.request.HTTPRedirectHandler):
    """Follows redirects as usual, keeping the X-Linked-Etag of every redirect response."""

    def __init__(self):
        self.seen = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.append(headers.get("X-Linked-Etag"))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(url: str, offset: int):
    """The response to a GET of ``url`` from byte ``offset``, and the sha256 the server names (or None)."""
    redirects = _LinkedEtags()
    headers = {"User-Agent": f"voco/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.build_opener(redirects).open(urllib.request.Request(url, headers=headers),
                                                               timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:  # the partial file is not a prefix of what is there now
            return _open(url, 0)
        raise VocoInputError(f"download failed: HTTP {exc.code} {exc.reason}", url) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise VocoInputError(f"cannot download: {getattr(exc, 'reason', None) or exc}", url) from None
    return response, _sha256_in([*redirects.seen, response.headers.get("X-Linked-Etag")])


def _sha256_in(etags) -> str | None:
    """The first ETag that is a sha256 (Hugging Face's LFS files); a git blob's sha1 is not one."""
    for etag in etags:
        value = (etag or "").removeprefix("W/").strip('"').lower()
        if _SHA256.fullmatch(value):
            return value
    return None


def _first_byte(response) -> int:
    """Where the body starts in the file: 0 for a whole file (200), the range start for a 206."""
    if response.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else -1


class _Progress:
    """``download`` events, at most one per ``PROGRESS_INTERVAL_S`` and always the last one."""

    def __init__(self, name: str, reporter, size: int | None):
        self.name, self.reporter, self.size = name, reporter, size
        self.total, self.reported, self.last_event = size, None, 0.0

    def update(self, done: int, final: bool = False) -> None:
        if final and self.reported == done:
            return
        if final or time.monotonic() - self.last_event >= PROGRESS_INTERVAL_S:
            self.last_event, self.reported = time.monotonic(), done
            _emit_progress(self.reporter, self.name, done, self.total)


def _receive(response, part: Path, offset: int, progress: _Progress, url: str, deadline: float) -> None:
    """Write the body after the first ``offset`` bytes of ``part``, emitting ``download`` events;
    stops at ``deadline`` (time.monotonic) and as soon as more than the expected size arrived."""
    progress.total = _announced_total(response, offset) or progress.size
    total, size, done = progress.total, progress.size, offset
    with _written(part, part.with_name(part.name + ".json"), total):
        with open(part, "r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate()
            while block := _read(response, url, done, total):
                if size is not None and done + len(block) > size:
                    raise VocoInputError(f"refused: the server sent more than the {size} bytes the registry "
                                         "lists; the download was deleted", url)
                out.write(block)
                done += len(block)
                progress.update(done)
                if time.monotonic() > deadline:
                    raise _Resumable(f"download took longer than its {deadline_s(size):g} s deadline "
                                     f"({DEADLINE_VARIABLE}) after {done} of {total if total is not None else '?'} "
                                     "bytes; run the same command again to resume", url)
    # http.client ends a body cut short without an error; the length it announced tells.
    if total is not None and done != total:
        raise _interrupted(url, done, total, "connection closed early")
    progress.update(done, final=True)  # the last event tells the whole size, once


def _read(response, url: str, done: int, total: int | None) -> bytes:
    """The next bytes of the body, as soon as any arrived (``read`` would wait for a whole chunk,
    however slowly it comes)."""
    try:
        return response.read1(CHUNK_BYTES)
    except (OSError, http.client.HTTPException) as exc:  # resets, timeouts, incomplete reads
        raise _interrupted(url, done, total, exc) from None


def _emit_progress(reporter, name: str, done: int, total: int | None) -> None:
    percent = round(100 * done / total, 1) if total else None
    reporter.emit("download", name=name, bytes=done, total=total, percent=percent)


def _interrupted(url: str, done: int, total: int | None, reason) -> VocoInputError:
    of = f" of {total}" if total is not None else ""
    return _Resumable(f"download interrupted after {done}{of} bytes ({reason}); run the same command again "
                          "to resume", url)
