"""The harness itself, on a one-button page: server subprocess + ready line, chromium through
Playwright, a click that goes through the server, screenshots."""

import importlib.util

import pytest

from e2e_harness import HERE, free_port, python_command, start_server

KINDS = ["plain"] + (["trame"] if importlib.util.find_spec("trame") else [])


@pytest.fixture(scope="module", params=KINDS)
def hello(request):
    plain = ["--plain"] if request.param == "plain" else []
    server = start_server(f"hello-{request.param}", python_command(
        HERE / "hello_trame.py", "--host", "127.0.0.1", "--port", free_port(), *plain), timeout=60)
    yield request.param, server.url
    server.stop()
    assert server.process.poll() is not None


def test_click_and_screenshot(hello, chromium_context, shots):
    kind, url = hello
    page = chromium_context.new_page()
    try:
        page.goto(url)
        page.locator("[data-testid=click-button]").wait_for()
        assert page.locator("#kind").inner_text() == ("trame" if kind == "trame" else "http.server")
        assert page.locator("[data-testid=count]").inner_text() == "0"
        shots(page, "before")
        page.locator("[data-testid=click-button]").click()
        page.locator("[data-testid=click-button]").click()
        page.wait_for_function("document.querySelector('#count').textContent.trim() === '2'")
        path = shots(page, "after")
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        page.close()
