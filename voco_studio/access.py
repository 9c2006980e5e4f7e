"""What a page user may reach on the server, and who may open the page's WebSocket.

Whoever has the page can type paths and upload files, so:

- an upload is read only when it is a self-contained volume: a single-file NIfTI (``.nii``,
  ``.nii.gz``) or an NRRD with its data inside (``.nrrd``), checked in its bytes, not only its
  name (a detached header's ``data file: /etc/passwd`` would have the server read that file and
  stream it to the page as an image);
- a path typed on the page is resolved (symlinks, ``..``) and must lie under the folders named by
  ``--data`` or the workdir (or be one of the files ``--data`` lists); outside them, an existing
  file and a missing one get the same answer;
- the WebSocket takes a per-start secret (trame's client sends the ``secret`` of the page's URL in
  its first message; wslink refuses every call until it matches) and a browser's connection only
  from the address the page was served from (its ``Origin`` against its ``Host``), so another
  site open in the same browser cannot drive the page's server.
"""

from __future__ import annotations

import gzip
import io
import re
import secrets
import zlib
from pathlib import Path
from urllib.parse import urlsplit

MAX_UPLOAD_MB = 2048
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
NOT_SELF_CONTAINED = ("not a self-contained volume: uploads take a .nii, .nii.gz or .nrrd file with its data "
                      "inside (a header that names another file is refused)")
PUBLIC_SECRET = "wslink-secret"  # trame's client sends this when the page's URL has no secret
_NRRD_DATA_FILE_FIELDS = {"data file", "datafile"}
_NIFTI_HEADER_BYTES = 544       # NIfTI-2's 540-byte header, and NIfTI-1's 348 with its magic


# --- uploads ---------------------------------------------------------------------------------------

def check_upload(name: str, content: bytes, max_bytes: int) -> None:
    """Raise ValueError (a message for the page) unless ``content`` is a self-contained volume of
    at most ``max_bytes`` whose name says what it holds."""
    if len(content) > max_bytes:
        raise ValueError(f"{name}: {len(content) / 2**20:.1f} MB is over the {max_bytes / 2**20:g} MB upload "
                         f"limit (voco-studio --max-upload-mb)")
    lower = name.lower()
    suffix = next((s for s in UPLOAD_SUFFIXES if lower.endswith(s)), None)
    if suffix == ".nrrd":
        readable = _attached_nrrd(content)
    elif suffix == ".nii.gz":
        readable = _single_file_nifti(_gunzipped_start(content))
    else:
        readable = suffix == ".nii" and _single_file_nifti(content[:_NIFTI_HEADER_BYTES])
    if not readable:
        raise ValueError(f"{name}: {NOT_SELF_CONTAINED}")


def _gunzipped_start(content: bytes) -> bytes:
    try:
        return gzip.GzipFile(fileobj=io.BytesIO(content)).read(_NIFTI_HEADER_BYTES)
    except (OSError, EOFError, zlib.error):
        return b""


def _single_file_nifti(header: bytes) -> bool:
    """NIfTI-1 ``n+1`` or NIfTI-2 ``n+2``: header and data in one file (``ni1``/``ni2`` name an .img)."""
    def sizeof_hdr(size: int) -> bool:
        return size in (int.from_bytes(header[:4], "little"), int.from_bytes(header[:4], "big"))

    return ((len(header) >= 348 and sizeof_hdr(348) and header[344:348] == b"n+1\0")
            or (len(header) >= 540 and sizeof_hdr(540) and header[4:8] == b"n+2\0"))


def _attached_nrrd(content: bytes) -> bool:
    """An NRRD header that ends (a blank line) before its data and names no ``data file``."""
    if not content.startswith(b"NRRD000"):
        return False
    end = re.search(rb"\r?\n\r?\n", content)
    if end is None:
        return False
    for line in content[:end.start()].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":=" in line.split(": ", 1)[0]:
            continue  # comments and key/value pairs
        if line.split(":", 1)[0].strip().lower() in _NRRD_DATA_FILE_FIELDS:
            return False
    return True


# --- server paths ----------------------------------------------------------------------------------

class ServerPaths:
    """The files a path typed on the page may name: under ``folders`` or one of ``files``."""

    def __init__(self, folders, files=()):
        self.folders = [Path(f).expanduser().resolve() for f in folders]
        self.files = {Path(f).expanduser().resolve() for f in files}

    def resolve(self, text: str) -> Path:
        """The file ``text`` names, symlinks resolved; ValueError, with one message whether or
        not it exists, when that is not a file this server offers."""
        path = Path(text).expanduser().resolve()
        if path in self.files or any(path.is_relative_to(folder) for folder in self.folders):
            return path
        raise ValueError(f"{text}: not under the folders this server offers (voco-studio --data, the workdir)")


# --- the WebSocket ---------------------------------------------------------------------------------

def page_keeps_as_text(token: str) -> bool:
    """Whether trame's client sends the URL's ``secret`` back as the same text: URL-safe
    characters, and not something it reads as a number, a list or a keyword."""
    return bool(re.fullmatch(r"[A-Za-z0-9_-]{8,}", token)) and not re.fullmatch(
        r"[+-]?(\d+\.?\d*(e[+-]?\d+)?|0x[0-9a-f]+|0b[01]+|0o[0-7]+|infinity|null|true|false|undefined)",
        token, re.IGNORECASE)


def new_token() -> str:
    while not page_keeps_as_text(token := secrets.token_urlsafe(24)):
        pass
    return token


def same_origin(origin: str | None, host: str | None) -> bool:
    """A browser's connection comes from a page of this server: its Origin is the Host it asked.
    No Origin: not a browser (no other site's page behind it); the secret still applies."""
    return origin is None or (bool(host) and urlsplit(origin).netloc.lower() == host.lower())


def guard_websocket(server, token: str | None) -> None:
    """Before ``server.start()``: the WebSocket wants ``token`` (None: trame's public default, for
    ``--no-token``) and a browser's connection only from the page's own address."""
    from aiohttp import web

    server.cli.set_defaults(authKey=token or PUBLIC_SECRET)

    @web.middleware
    async def same_origin_websockets(request, handler):
        if request.headers.get("Upgrade", "").lower() == "websocket" and \
                not same_origin(request.headers.get("Origin"), request.host):
            raise web.HTTPForbidden(text="VoCo Studio: a WebSocket from another site's page is refused\n")
        return await handler(request)

    server.controller.on_server_bind.add(lambda wslink_server: wslink_server.app.middlewares.append(
        same_origin_websockets))
