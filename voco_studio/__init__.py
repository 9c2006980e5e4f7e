"""VoCo Studio: the VoCoSegmentation / VoCoPretrain workflows in a browser, served by trame-slicer.

Start: ``voco-studio --host 127.0.0.1 --port 8080 [--data FILE ...]``; it prints
``VoCo Studio ready on http://HOST:PORT/`` on stdout once it serves (trame's own messages go
to stderr). Element ids: README_TESTIDS.md.
"""

from __future__ import annotations

import contextlib
import sys


def serve(host: str = "127.0.0.1", port: int = 8080, data=(), workdir=None) -> None:
    from trame.app import get_server

    from .app import StudioApp

    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        server = get_server("voco-studio", client_type="vue3")
        app = StudioApp(server, workdir=workdir, data=data)

        def ready(**_):
            print(f"VoCo Studio ready on http://{host}:{port}/", file=stdout, flush=True)

        app.ctrl.on_server_ready.add(ready)
        app.server.start(host=host, port=port, open_browser=False, show_connection_info=False)
