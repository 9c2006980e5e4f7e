"""VoCo Studio end to end, in headless Debian chromium: open the page, load a shipped volume, build a
tiny model and segment, pretrain briefly and watch the loss chart, show the crop layout, cancel a
job. Element ids: voco_studio/README_TESTIDS.md. The tests run in file order on one page, each
step a test; screenshots go to artifacts/test_studio_e2e/, the README's to artifacts/publish/.

Skipped (with the reason) while `python -m voco studio` does not exist yet or its dependencies are
not installed; once it starts, a server that does not come up fails. Opt-in (VOCO_E2E_STUDIO=1)
until the app passes them, so that `make test` stays green meanwhile."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from e2e_harness import REPO, free_port, start_server

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
from playwright.sync_api import expect  # noqa: E402

START_TIMEOUT = 300  # the first start fetches the sample volume
JOB_TIMEOUT = 600_000  # ms; a 2-core CPU shared with other jobs
STOPPED_STATES = {"stopped", "cancelled", "canceled"}


def studio_unavailable() -> str | None:
    try:
        probe = subprocess.run([sys.executable, "-m", "voco", "studio", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return None  # let the real start report it
    if probe.returncode == 0:
        return None
    tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"`python -m voco studio` is not available yet: {tail[0]}"


@pytest.fixture(scope="module")
def studio(tmp_path_factory, chromium_context):
    if os.environ.get("VOCO_E2E_STUDIO") != "1":
        pytest.skip("VoCo Studio browser tests are opt-in until the app passes them: VOCO_E2E_STUDIO=1")
    reason = studio_unavailable()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("studio-work")
    port = free_port()
    command = [sys.executable, "-m", "voco", "studio", "--host", "127.0.0.1", "--port", str(port),
               "--workdir", str(workdir)]
    server = None
    try:
        server = start_server("studio", command, timeout=START_TIMEOUT)
    except pytest.fail.Exception:
        if "ModuleNotFoundError" in (REPO / "Testing/e2e/artifacts/studio.log").read_text(errors="replace"):
            pytest.skip("VoCo Studio's dependencies are not installed (ModuleNotFoundError; "
                        "see Testing/e2e/artifacts/studio.log)")
        raise
    assert server.url == f"http://127.0.0.1:{port}/"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(studio, chromium_context):
    page = chromium_context.new_page()
    page.set_default_timeout(60_000)
    messages = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.goto(studio.url)
    yield page
    (REPO / "Testing/e2e/artifacts/studio_console.log").write_text("\n".join(messages) + "\n")
    page.close()


def tid(page, name):
    return page.locator(f"[data-testid={name}]").first


def input_of(page, name):
    """The <input> of a text/number field (the element itself, or the one inside a Vuetify field)."""
    element = tid(page, name)
    if element.evaluate("e => e.tagName") in ("INPUT", "TEXTAREA"):
        return element
    return element.locator("input, textarea").first


def choose(page, name, option):
    """Pick `option` in a native <select> or a Vuetify select."""
    element = tid(page, name)
    if element.evaluate("e => e.tagName") == "SELECT":
        element.select_option(label=option)
    else:
        element.click()
        page.get_by_role("option", name=option, exact=True).click()


def idle(page, timeout=JOB_TIMEOUT):
    expect(page.locator("[data-testid=busy-indicator]")).to_have_count(0, timeout=timeout)


def views_png(page) -> bytes:
    return b"".join(tid(page, v).screenshot() for v in ("view-red", "view-yellow", "view-green")
                    if tid(page, v).is_visible())


def status(page):
    return tid(page, "status-text")


def test_open_page(page, module_shots):
    expect(tid(page, "studio-root")).to_be_visible()
    expect(status(page)).to_contain_text("Loaded mni152-t1", timeout=120_000)
    idle(page)
    for view in ("view-red", "view-yellow", "view-green", "view-3d"):
        expect(tid(page, view)).to_be_attached()
    expect(page.locator("[data-testid=view-red] img, [data-testid=view-red] canvas").first).to_be_visible()
    assert tid(page, "volume-name").inner_text().strip()
    module_shots(page, "open", publish="studio_open")


def test_load_shipped_volume(page, module_shots):
    tid(page, "tab-segmentation").click()
    before = views_png(page)
    choose(page, "sample-select", "spine-ct")
    tid(page, "load-sample-button").click()
    expect(status(page)).to_contain_text("Loaded spine-ct", timeout=300_000)
    idle(page)
    assert views_png(page) != before, "the slice views did not change after loading spine-ct"
    module_shots(page, "load_spine_ct", publish="studio_load_volume")
    choose(page, "sample-select", "mni152-t1")  # back to the brain for the tiny brain model
    tid(page, "load-sample-button").click()
    expect(status(page)).to_contain_text("Loaded mni152-t1", timeout=300_000)
    idle(page)


def test_segmentation(page, module_shots):
    tid(page, "build-tiny-model-button").click()
    idle(page)
    expect(status(page)).not_to_contain_text("Error:")
    choose(page, "device-select", "cpu")
    before = views_png(page)
    expect(tid(page, "run-button")).to_be_enabled()
    tid(page, "run-button").click()
    expect(status(page)).to_have_text(re.compile(r"Segmentation done: \d+ segments"), timeout=JOB_TIMEOUT)
    idle(page)
    count = int(re.search(r"(\d+) segments", status(page).inner_text()).group(1))
    items = page.locator("[data-testid=segment-item]")
    expect(items).to_have_count(count)
    assert count >= 1
    for i in range(count):
        assert re.fullmatch(r"#[0-9a-fA-F]{6}", items.nth(i).get_attribute("data-segment-color") or "")
        assert items.nth(i).get_attribute("data-segment-name")
    expect(tid(page, "progress-bar")).to_have_attribute("aria-valuenow", re.compile(r"^100(\.0+)?$"))
    expect(tid(page, "run-button")).to_be_enabled()
    assert views_png(page) != before, "the slice views did not change: the segmentation is not shown"
    module_shots(page, "segmentation", publish="studio_segmentation")


def loss_points(page) -> int:
    series = page.locator("[data-testid=loss-series]")
    return max([int(series.nth(i).get_attribute("data-points") or 0) for i in range(series.count())],
               default=0)


def test_pretrain_loss_chart(page, module_shots):
    tid(page, "tab-pretrain").click()
    expect(tid(page, "panel-pretrain")).to_be_visible()
    input_of(page, "pretrain-steps-input").fill("12")
    tid(page, "pretrain-start-button").click()
    expect(tid(page, "pretrain-state")).to_have_text(re.compile("running|finished"), timeout=120_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=loss-series]')]"
        ".some(p => Number(p.dataset.points) >= 2)", timeout=JOB_TIMEOUT)
    first = loss_points(page)
    module_shots(page, "pretrain_running")
    expect(tid(page, "pretrain-state")).to_have_text("finished", timeout=JOB_TIMEOUT)
    page.wait_for_function(
        f"() => [...document.querySelectorAll('[data-testid=loss-series]')]"
        f".some(p => Number(p.dataset.points) > {first})", timeout=60_000) if first < 12 else None
    assert loss_points(page) > first or first >= 12, "the loss chart did not update"
    rows = page.locator("[data-testid=job-row][data-job-kind*=pretrain]")
    assert rows.count() >= 1
    expect(rows.last).to_have_attribute("data-job-state", "finished")
    module_shots(page, "pretrain_finished", publish="studio_pretrain_loss")


def test_crop_layout(page, module_shots):
    choose(page, "layout-select", "Four-up")
    before = views_png(page)
    tid(page, "crop-layout-button").click()
    idle(page)
    expect(status(page)).not_to_contain_text("Error:")
    assert views_png(page) != before, "the crop layout did not show in the slice views"
    module_shots(page, "crop_layout", publish="studio_crop_layout")


def test_cancel_job(page, module_shots):
    tid(page, "tab-pretrain").click()
    input_of(page, "pretrain-steps-input").fill("100000")
    tid(page, "pretrain-start-button").click()
    expect(tid(page, "pretrain-state")).to_have_text("running", timeout=120_000)
    expect(tid(page, "pretrain-stop-button")).to_be_enabled()
    tid(page, "pretrain-stop-button").click()
    expect(tid(page, "pretrain-state")).to_have_text(re.compile("stopped|cancell?ed"), timeout=120_000)
    row = page.locator("[data-testid=job-row][data-job-kind*=pretrain]").last
    expect(row).to_have_attribute("data-job-state", re.compile("stopped|cancell?ed"))
    module_shots(page, "cancelled", publish="studio_cancel")
