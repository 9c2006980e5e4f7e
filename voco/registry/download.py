"""Downloading one file over HTTP(S) with resume, progress events and a sha256 check (urllib only).

The bytes go to ``<file>.part``, and ``<file>.part.json`` beside it records the sha256 they must
add up to. A later call resumes with an HTTP Range request only when it expects that same sha256,
and only appends when the server answers with exactly the missing range; anything else (a server
that ignores Range, a different file behind the URL) restarts from zero. So a resumed file is never
made of two different files, and a file that does not match its sha256 is deleted, never kept.

Nothing is downloaded without a known sha256: the caller's, or the one the server names in
``X-Linked-Etag``. Hugging Face sends that header, quoted, on the ``/resolve/`` URL of every LFS file
(on its redirect to the CDN, which does not repeat it); huggingface_hub reads it the same way.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from .. import __version__
from ..checkpoints.files import sha256_of
from ..errors import VocoInputError

CHUNK_BYTES = 1 << 16
TIMEOUT_S = 60  # per socket operation: a stalled connection fails instead of hanging
PROGRESS_INTERVAL_S = 0.1  # at most ~10 download events per second
_SHA256 = re.compile(r"[0-9a-f]{64}")


def fetch(url: str, part: Path, name: str, reporter, sha256: str | None = None) -> str:
    """Download ``url`` into ``part`` (resuming an earlier partial download of the same file) and
    verify it; returns the sha256 it was checked against.

    ``sha256`` is the expected checksum; without one, the server's ``X-Linked-Etag`` is used, and
    with neither the download is refused before any byte is written. On success ``part`` is the
    whole verified file and its record is gone; on a failed connection ``part`` stays for a resume.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    record = part.with_name(part.name + ".json")
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
        record.write_text(json.dumps({"url": url, "sha256": expected}))
        _receive(response, part, offset, name, reporter, url)
    finally:
        response.close()
    record.unlink()
    actual = sha256_of(part)
    if actual != expected:
        part.unlink()
        raise VocoInputError(f"sha256 {actual} differs from the expected {expected}; the download was deleted", url)
    return expected


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


def _receive(response, part: Path, offset: int, name: str, reporter, url: str) -> None:
    """Write the body after the first ``offset`` bytes of ``part``, emitting ``download`` events."""
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length and length.isdigit() else None
    done, reported, last_event = offset, None, 0.0
    with open(part, "r+b" if offset else "wb") as out:
        out.seek(offset)
        out.truncate()
        try:
            while block := response.read(CHUNK_BYTES):
                out.write(block)
                done += len(block)
                if time.monotonic() - last_event >= PROGRESS_INTERVAL_S:
                    last_event, reported = time.monotonic(), done
                    _emit_progress(reporter, name, done, total)
        except (OSError, http.client.HTTPException) as exc:  # resets, timeouts, incomplete reads
            raise _interrupted(url, done, total, exc) from None
    # http.client ends a body cut short without an error; the length it announced tells.
    if total is not None and done != total:
        raise _interrupted(url, done, total, "connection closed early")
    if reported != done:  # the last event tells the whole size, once
        _emit_progress(reporter, name, done, total)


def _emit_progress(reporter, name: str, done: int, total: int | None) -> None:
    percent = round(100 * done / total, 1) if total else None
    reporter.emit("download", name=name, bytes=done, total=total, percent=percent)


def _interrupted(url: str, done: int, total: int | None, reason) -> VocoInputError:
    of = f" of {total}" if total is not None else ""
    return VocoInputError(f"download interrupted after {done}{of} bytes ({reason}); run the same command again "
                          "to resume", url)
