"""``voco-studio``: VoCo Studio's own entry point (the engine's ``voco`` command knows no front end).

``voco-studio [--host H] [--port P] [--data PATH ...] [--workdir DIR] [--token T | --no-token]
[--max-upload-mb N]`` serves the page (its URL, with a token new at each start, is printed);
``voco-studio --check-rendering [--json]`` renders a test picture off screen and says what drew
it. Bad input is one ``error: ...`` line on stderr and exit code 2, before anything starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .access import MAX_UPLOAD_MB, new_token, page_keeps_as_text


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="voco-studio", description="VoCo Studio: the VoCo Slicer workflows in a browser")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--data", nargs="+", default=[],
                   help="volumes to offer (files, folders, dataset.json, list files); the first is loaded instead "
                        "of the sample")
    p.add_argument("--workdir", help="training set and runs (default: a folder in the temp dir)")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", help="the page's secret (default: a new random one each start, printed in the "
                                       "URL); fixed, e.g. for a tunnel: 8+ letters, digits, '-' or '_'")
    token.add_argument("--no-token", action="store_true",
                       help="no secret: anyone who reaches the port can use the page (a tunnel of your own only)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                   help=f"largest volume the page may upload (default: {MAX_UPLOAD_MB})")
    p.add_argument("--check-rendering", action="store_true",
                   help="render a test picture off screen, say what drew it (EGL/OSMesa, GPU or Mesa) and exit")
    p.add_argument("--json", action="store_true", help="with --check-rendering: one JSON object on stdout")
    return p


def check_rendering(as_json: bool) -> int:
    from .headless import rendering_report

    report = rendering_report()
    print(json.dumps(report) if as_json else " ".join(f"{k}={v}" for k, v in report.items()), flush=True)
    if not report["pixels_drawn"]:
        raise ValueError(f"{report['window']} ({report['renderer']}) drew nothing: the views would stay black")
    return 0


def page_token(args) -> str | None:
    if args.no_token:
        return None
    if args.token is None:
        return new_token()
    if not page_keeps_as_text(args.token):
        raise ValueError("--token: use 8 or more letters, digits, '-' or '_' (not a number: the page would read "
                         "it as one)")
    return args.token


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.check_rendering:
            return check_rendering(args.json)
        if args.max_upload_mb <= 0:
            raise ValueError(f"--max-upload-mb: {args.max_upload_mb:g} is not above 0")
        token = page_token(args)
        from voco.data.sources import list_images
        from voco.errors import VocoInputError

        try:  # folders, dataset.json and list files become their images; a bad path fails here, in one line
            data = [str(p) for p in list_images(args.data)] if args.data else []
        except VocoInputError as exc:
            raise ValueError(str(exc)) from None
        try:
            import trame_slicer  # noqa: F401
        except ImportError:
            raise ValueError("VoCo Studio needs trame-slicer: pip install '.[studio]'") from None
        from . import serve

        serve(host=args.host, port=args.port, data=data, workdir=args.workdir,
              data_folders=[p for p in args.data if Path(p).is_dir()], token=token,
              max_upload_mb=args.max_upload_mb)
        return 0
    except ValueError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
