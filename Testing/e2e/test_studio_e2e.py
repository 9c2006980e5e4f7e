"""VoCo Studio end to end, in headless Debian chromium, one page through every workflow: open the
page on the shipped volume, load another sample, upload a file, build a demo model (trained in the page, seconds) and segment,
correct with the segment editor, add the case to the training set, fine-tune a new version and
compare versions, pretrain briefly and watch the loss chart, show position predictions and the
crop layout, stop and resume a job from two tabs. Element ids: voco_studio/README_TESTIDS.md. The
tests run in file order, each step a test; screenshots go to artifacts/test_studio_e2e/, the
README's to artifacts/publish/ (publish_screenshots.py copies them to Resources/Screenshots/).

Skipped (with the reason) when trame-slicer (the test extra) is not installed; a server that does
not come up fails."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from e2e_harness import REPO, free_port, start_server

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
from playwright.sync_api import expect  # noqa: E402

START_TIMEOUT = 300  # the first start fetches the sample volume
JOB_TIMEOUT = 600_000  # ms; a 2-core CPU shared with other jobs


def studio_unavailable() -> str | None:
    try:
        probe = subprocess.run([sys.executable, "-m", "voco_studio", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return None  # let the real start report it
    if probe.returncode == 0:
        return None
    tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"`python -m voco_studio` is not available yet: {tail[0]}"


@pytest.fixture(scope="module")
def studio(tmp_path_factory, chromium_context):
    reason = studio_unavailable()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("studio-work")
    port = free_port()
    command = [sys.executable, "-m", "voco_studio", "--host", "127.0.0.1", "--port", str(port),
               "--workdir", str(workdir)]
    server = None
    try:
        server = start_server("studio", command, timeout=START_TIMEOUT,
                              env={"VOCO_MODELS_DIR": str(workdir / "installed-models")})
    except pytest.fail.Exception:
        if "ModuleNotFoundError" in (REPO / "Testing/e2e/artifacts/studio.log").read_text(errors="replace"):
            pytest.skip("VoCo Studio's dependencies are not installed (ModuleNotFoundError; "
                        "see Testing/e2e/artifacts/studio.log)")
        raise
    assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/\?secret=[A-Za-z0-9_-]{{20,}}", server.url), server.url
    server.workdir = workdir
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


def views_change_from(page, before: bytes, what: str, timeout_s: float = 60) -> None:
    """The views' pictures arrive a little after the server's state: wait for them to differ."""
    deadline = time.monotonic() + timeout_s
    while views_png(page) == before:
        assert time.monotonic() < deadline, f"the slice views did not change: {what}"
        page.wait_for_timeout(500)


def status(page):
    return tid(page, "status-text")


def test_open_page(page, module_shots):
    expect(tid(page, "studio-root")).to_be_visible()
    expect(status(page)).to_contain_text("Loaded mni152-t1", timeout=120_000)
    idle(page)
    for view in ("view-red", "view-yellow", "view-green", "view-3d"):
        expect(tid(page, view)).to_be_attached()
    expect(tid(page, "view-red").locator("xpath=..").locator("img, canvas").first).to_be_visible()
    assert tid(page, "volume-name").inner_text().strip()
    module_shots(page, "open", publish="studio_open")


def test_the_page_connects_only_with_the_printed_token_and_from_its_own_address(studio, chromium_context):
    """The printed URL carries this start's secret (every other test opens it); a page without it
    gets nothing from the server, and a WebSocket from another site's page is refused outright."""
    base = studio.url.split("?")[0]
    stranger = chromium_context.new_page()
    with stranger.expect_console_message(lambda m: "Authentication failed" in m.text, timeout=60_000):
        stranger.goto(base + "?secret=not-this-start-s-token")
    expect(stranger.locator("[data-testid=studio-root]")).to_have_count(0)
    stranger.close()
    assert websocket_handshake_status(base, origin="http://evil.example") == 403
    assert websocket_handshake_status(base, origin=base.rstrip("/")) == 101


def websocket_handshake_status(base: str, origin: str) -> int:
    """The HTTP status a browser's WebSocket request from a page at ``origin`` gets."""
    import socket

    host = base.split("//")[1].rstrip("/")
    name, port = host.rsplit(":", 1)
    with socket.create_connection((name, int(port)), timeout=30) as connection:
        connection.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                            f"Origin: {origin}\r\n\r\n").encode())
        return int(connection.recv(200).split()[1])


def test_load_shipped_volume(page, module_shots):
    tid(page, "tab-segmentation").click()
    before = views_png(page)
    choose(page, "sample-select", "spine-ct")
    tid(page, "load-sample-button").click()
    expect(status(page)).to_contain_text("Loaded spine-ct", timeout=300_000)
    idle(page)
    views_change_from(page, before, "spine-ct is not shown")
    module_shots(page, "load_spine_ct", publish="studio_load_volume")


def test_load_server_path(page, studio, module_shots):
    """A path under the workdir loads; the sample cache is outside the folders it may read."""
    import shutil

    from voco.data.sample_data import fetch

    field = input_of(page, "volume-path-input")
    field.fill(str(fetch("spine-ct")))
    field.press("Enter")
    tid(page, "load-path-button").click()
    expect(status(page)).to_contain_text("not under the folders this server offers", timeout=60_000)
    copy = shutil.copy(fetch("spine-ct"), studio.workdir / "spine-ct.nii.gz")
    field.fill(str(copy))
    field.press("Enter")
    tid(page, "load-path-button").click()
    expect(status(page)).to_contain_text("Loaded spine-ct.nii.gz", timeout=120_000)
    idle(page)


def test_upload_volume(page, module_shots):
    from voco.data.sample_data import fetch

    page.locator("input[type=file]").first.set_input_files(str(fetch("mni152-t1")))
    expect(status(page)).to_contain_text("Loaded mni152-t1.nii.gz", timeout=120_000)
    idle(page)
    expect(tid(page, "volume-name")).to_contain_text("mni152-t1")
    module_shots(page, "upload", publish="studio_upload")


def test_segmentation(page, module_shots):
    tid(page, "device-select").select_option(value="cpu")
    tid(page, "train-demo-model-button").click()
    expect(page.locator("[data-testid=job-row][data-job-kind=finetune][data-job-state=running]")).to_have_count(
        1, timeout=60_000)
    module_shots(page, "demo_model_training")
    expect(status(page)).to_contain_text("Demo model ready", timeout=JOB_TIMEOUT)
    expect(page.locator("[data-testid=version-row]")).to_have_count(1)
    tid(page, "device-select").select_option(value="cpu")
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
    views_change_from(page, before, "the segmentation is not shown")
    module_shots(page, "segmentation", publish="studio_segmentation")


def segment_voxels(page, name) -> int:
    return int(page.locator(f"[data-testid=segment-item][data-segment-name='{name}']").get_attribute(
        "data-segment-voxels"))


def paint_stroke(page, name: str, start_dx: int = -40, steps: int = 20) -> None:
    """Pick segment ``name``, paint one stroke across the axial view, wait until it has grown."""
    before = segment_voxels(page, name)
    page.locator(f"[data-testid=segment-item][data-segment-name='{name}']").click()
    tid(page, "editor-paint-button").click()
    idle(page)
    box = tid(page, "view-red").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx + start_dx, cy)
    page.mouse.down()
    for step in range(1, steps + 1):
        page.mouse.move(cx + start_dx + 4 * step, cy + step, steps=2)
    page.mouse.up()
    page.wait_for_function(
        f"() => Number(document.querySelector(\"[data-testid=segment-item][data-segment-name='{name}']\")"
        f".dataset.segmentVoxels) > {before}", timeout=60_000)


def test_correct_add_finetune_compare(page, module_shots):
    """The clinician loop: paint a correction, add the case, fine-tune v2, segment with v1 and v2."""
    paint_stroke(page, page.locator("[data-testid=segment-item]").last.get_attribute("data-segment-name"))
    module_shots(page, "corrected", publish="studio_correct")
    tid(page, "editor-off-button").click()

    tid(page, "add-to-training-set-button").click()
    expect(tid(page, "training-set-count")).to_contain_text("1 case", timeout=60_000)
    input_of(page, "finetune-steps-input").fill("4")
    tid(page, "finetune-button").click()
    expect(page.locator("[data-testid=version-row]")).to_have_count(2, timeout=JOB_TIMEOUT)
    expect(tid(page, "versions-table")).to_contain_text("v2")

    tid(page, "compare-versions-button").click()
    expect(page.locator("[data-testid=job-row][data-job-kind=segment]")).to_have_count(3)
    for i in (1, 2):
        expect(page.locator("[data-testid=job-row][data-job-kind=segment]").nth(i)).to_have_attribute(
            "data-job-state", "finished", timeout=JOB_TIMEOUT)
    expect(tid(page, "run-button")).to_be_enabled(timeout=60_000)
    expect(status(page)).to_have_text(re.compile(r"Segmentation done"), timeout=60_000)
    idle(page)
    module_shots(page, "compare_versions", publish="studio_compare_versions")


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
    expect(page.locator("[data-testid=job-row][data-job-kind=pretrain][data-job-state=finished]")).to_have_count(1)
    module_shots(page, "pretrain_finished", publish="studio_pretrain_loss")


def test_position_predictions(page, module_shots):
    tid(page, "positions-button").click()
    idle(page)
    expect(status(page)).to_contain_text("Position predictions", timeout=JOB_TIMEOUT)
    rows = page.locator("[data-testid=positions-row]")
    assert rows.count() >= 1
    module_shots(page, "positions", publish="studio_positions")
    with_heatmap = views_png(page)
    tid(page, "heatmap-toggle").locator("input").first.click()
    views_change_from(page, with_heatmap, "hiding the heatmap changed nothing")
    tid(page, "heatmap-toggle").locator("input").first.click()


def test_crop_layout(page, module_shots):
    choose(page, "layout-select", "Four-up")
    before = views_png(page)
    tid(page, "crop-layout-button").click()
    expect(status(page)).to_have_text(re.compile(r"Crop layout: \d+ bases, \d+ targets"), timeout=JOB_TIMEOUT)
    idle(page)
    views_change_from(page, before, "the crop layout is not shown")
    module_shots(page, "crop_layout", publish="studio_crop_layout")


def test_stop_resume_and_a_second_tab_sees_the_same_jobs(page, studio, chromium_context, module_shots):
    """Start a long job in one tab; a second tab sees it run and stops it; the first sees it stopped,
    resumes it and stops it again."""
    other = chromium_context.new_page()
    other.goto(studio.url)  # the printed URL: the page drops the secret from its address bar
    expect(status(other)).not_to_have_text("Starting", timeout=60_000)
    tid(other, "tab-pretrain").click()
    jobs = page.locator("[data-testid=job-row]")
    expect(other.locator("[data-testid=job-row]")).to_have_count(jobs.count())

    tid(page, "tab-pretrain").click()
    input_of(page, "pretrain-steps-input").fill("100000")
    tid(page, "pretrain-start-button").click()
    expect(tid(page, "pretrain-state")).to_have_text("running", timeout=120_000)
    running = "[data-testid=job-row][data-job-kind=pretrain][data-job-state=running]"
    expect(other.locator(running)).to_have_count(1, timeout=30_000)
    module_shots(other, "second_tab_running", publish="studio_second_tab")

    # trame's state is the server's, shared by every tab: the run picked in one is picked in all.
    tid(other, "pretrain-stop-button").click()
    expect(page.locator(running)).to_have_count(0, timeout=120_000)
    expect(page.locator("[data-testid=job-row][data-job-kind=pretrain][data-job-state=stopped]")).to_have_count(1)
    expect(tid(page, "pretrain-state")).to_have_text("stopped")
    module_shots(page, "stopped", publish="studio_cancel")
    other.close()

    tid(page, "pretrain-resume-button").click()
    expect(tid(page, "pretrain-state")).to_have_text("running", timeout=120_000)
    tid(page, "pretrain-stop-button").click()
    expect(tid(page, "pretrain-state")).to_have_text("stopped", timeout=120_000)
