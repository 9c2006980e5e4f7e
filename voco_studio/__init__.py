"""VoCo Studio: the VoCoSegmentation / VoCoPretrain workflows in a browser, served by trame-slicer.

Start: ``voco-studio --host 127.0.0.1 --port 8080 [--data FILE ...]``; it prints
``VoCo Studio ready on http://HOST:PORT/?secret=TOKEN`` on stdout once it serves (trame's own
messages go to stderr): the page connects only with that start's token in its URL. Element ids:
README_TESTIDS.md.
"""

from __future__ import annotations

import contextlib
import sys

from .access import MAX_UPLOAD_MB


def serve(host: str = "127.0.0.1", port: int = 8080, data=(), workdir=None, data_folders=(),
          token: str | None = None, max_upload_mb: float = MAX_UPLOAD_MB) -> None:
    """Serve the page; ``token`` None: no token (trame's public default, behind a tunnel of one's own)."""
    from trame.app import get_server

    from .access import guard_websocket
    from .app import StudioApp

    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        server = get_server("voco-studio", client_type="vue3")
        guard_websocket(server, token)
        app = StudioApp(server, workdir=workdir, data=data, data_folders=data_folders, max_upload_mb=max_upload_mb)
        url = f"http://{host}:{port}/" + (f"?secret={token}" if token else "")

        def ready(**_):
            print(f"VoCo Studio ready on {url}", file=stdout, flush=True)

        app.ctrl.on_server_ready.add(ready)
        app.server.start(host=host, port=port, open_browser=False, show_connection_info=False)
