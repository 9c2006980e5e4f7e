"""Harness for the browser tests: a server started as a subprocess (its own process group),
Debian's chromium driven by Playwright (never `playwright install`), and screenshots of every step
under Testing/e2e/artifacts/ (gitignored); `publish_screenshots.py` copies the ones meant for the
README to Resources/Screenshots/. Loaded as a pytest plugin (`-p e2e_harness` in pyproject.toml),
so its session fixtures exist once; a conftest.py here would shadow Testing/python's."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ARTIFACTS = HERE / "artifacts"
CHROMIUM = os.environ.get("VOCO_E2E_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
READY = re.compile(r"ready on (http://\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A subprocess that prints `... ready on http://HOST:PORT/` on stdout once it serves. Both
    streams go to a log file under artifacts/, which is shown when it fails to start."""

    def __init__(self, name: str, command: list[str], timeout: float, env: dict | None = None):
        self.name, self.command, self.timeout = name, command, timeout
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log_path = ARTIFACTS / f"{name}.log"
        self._log = open(self.log_path, "w", buffering=1)
        self._log.write(f"$ {' '.join(command)}\n")
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.process.stdout:
            self._log.write(line)
            match = READY.search(line)
            if match and not self._ready.is_set():
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()  # the process ended

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> str | None:
        """The URL, or None if the process ended or timed out first (see log())."""
        self._ready.wait(self.timeout)
        return self.url

    def stop(self):
        if self.process.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:  # the leader is gone; children it left in the group must go too
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def start_server(name: str, command: list[str], timeout: float, env=None) -> Server:
    server = Server(name, command, timeout, env)
    if server.wait_ready() is None:
        server.stop()
        state = "exited with code %s" % server.process.returncode
        pytest.fail(f"{name} did not print its ready line within {timeout:.0f} s ({state}); "
                    f"log {server.log_path}:\n{server.log()[-6000:]}", pytrace=False)
    return server


def browser_missing_reason() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return (f"no browser at {CHROMIUM}: run Testing/e2e/install_system_packages.sh as root "
                f"(apt-get install chromium); `make test` does this where it may")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -c constraints.txt -e '.[test]')"
    return None


@pytest.fixture(scope="session")
def chromium_context(tmp_path_factory):
    """A headless Debian chromium with a fresh user-data dir, driven by Playwright."""
    reason = browser_missing_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()


class Shots:
    """Screenshots of one test's steps: artifacts/<test>/<NN>_<step>.png. A step given
    `publish="studio_x"` is also written to artifacts/publish/studio_x.png, which
    publish_screenshots.py copies to Resources/Screenshots/ for the README."""

    def __init__(self, directory: Path):
        self.directory = directory
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        self.count = 0

    def __call__(self, page, step: str, publish: str | None = None, element=None) -> Path:
        self.count += 1
        path = self.directory / f"{self.count:02d}_{step}.png"
        (element or page).screenshot(path=str(path))
        if publish:
            (ARTIFACTS / "publish").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, ARTIFACTS / "publish" / f"{publish}.png")
        return path


@pytest.fixture
def shots(request):
    return Shots(ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name))


@pytest.fixture(scope="module")
def module_shots(request):
    return Shots(ARTIFACTS / request.module.__name__.rsplit(".", 1)[-1])


def python_command(*args) -> list[str]:
    return [sys.executable, *map(str, args)]

