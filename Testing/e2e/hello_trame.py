"""A one-button trame page (or, without trame, a plain http.server page with the same ids) that
proves the e2e harness: started as a subprocess, it prints `Hello ready on http://HOST:PORT/`."""

import argparse
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--plain", action="store_true", help="http.server even if trame is installed")
args = parser.parse_args()
READY = f"Hello ready on http://{args.host}:{args.port}/"

try:
    if args.plain:
        raise ImportError
    from trame.app import get_server
    from trame.ui.html import DivLayout
    from trame.widgets import html
except ImportError:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    PAGE = b"""<!doctype html><html><body><div id="hello-root" data-testid="hello-root">
<p id="kind" data-testid="kind">http.server</p>
<button id="click-button" data-testid="click-button"
 onclick="var c=document.getElementById('count'); c.textContent=Number(c.textContent)+1">Click</button>
<span id="count" data-testid="count">0</span></div></body></html>"""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(PAGE)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer((args.host, args.port), Page)
    print(READY, flush=True)
    httpd.serve_forever()
    sys.exit(0)

server = get_server("voco_e2e_hello", client_type="vue3")
server.state.count = 0


def click():
    server.state.count += 1  # counted on the server: the click went through trame's websocket


with DivLayout(server) as layout:
    with html.Div(id="hello-root", __properties=[("data_testid", "data-testid")], data_testid="hello-root"):
        html.P("trame", id="kind", data_testid="kind", __properties=[("data_testid", "data-testid")])
        html.Button("Click", id="click-button", click=click, data_testid="click-button",
                    __properties=[("data_testid", "data-testid")])
        html.Span("{{ count }}", id="count", data_testid="count",
                  __properties=[("data_testid", "data-testid")])


@server.controller.add("on_server_ready")
def ready(**_):
    print(READY, flush=True)


server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False)
