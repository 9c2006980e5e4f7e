"""A new user's first run in VoCo Studio, in headless Chromium, through the page alone: the
published models are listed -> VoComni_B.pt (written in the published layout, vouched for by the
registry the server is given) is added from a server path -> the real spine CT is segmented into
the 20 VoComni structures -> a segment is painted -> the case is added -> the Pretrain tab
fine-tunes vocomni-b on it -> the new version is in the model list and the versions table."""

from __future__ import annotations

import re
import sys

import pytest

from e2e_harness import free_port, start_server
from test_studio_e2e import JOB_TIMEOUT, START_TIMEOUT, choose, idle, input_of, paint_stroke, status, \
    studio_unavailable, tid

from playwright.sync_api import expect  # noqa: E402  (test_studio_e2e skips without playwright)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, chromium_context):
    from published_files import registry_for, write_vocomni_checkpoint

    reason = studio_unavailable()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("first-run")
    published = workdir / "studio" / "published"  # the page adds models from under its workdir alone
    published.mkdir(parents=True)
    checkpoint = write_vocomni_checkpoint(published / "VoComni_B.pt")
    registry = registry_for(published, {checkpoint.name: checkpoint})
    port = free_port()
    command = [sys.executable, "-m", "voco_studio", "--host", "127.0.0.1", "--port", str(port),
               "--workdir", str(workdir / "studio")]
    server = start_server("studio-first-run", command, timeout=START_TIMEOUT,
                          env={"VOCO_MODELS_DIR": str(workdir / "models"), "VOCO_REGISTRY": str(registry)})
    page = chromium_context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server.url)
    yield page, checkpoint
    page.close()
    server.stop()


def test_a_new_user_segments_a_ct_with_vocomni_and_fine_tunes_it(first_run, module_shots):
    page, checkpoint = first_run
    expect(status(page)).to_contain_text("Loaded mni152-t1", timeout=120_000)
    options = tid(page, "model-select").locator("option")
    expect(options).to_have_text(["vocomni-b v1.0 — will download 299 MB", "vocomni-h v1.0 — will download 4651 MB",
                                  "vocomni-l v1.0 — will download 1169 MB"], timeout=120_000)
    choose(page, "sample-select", "spine-ct")
    tid(page, "load-sample-button").click()
    expect(status(page)).to_contain_text("Loaded spine-ct", timeout=300_000)

    input_of(page, "model-path-input").fill(str(checkpoint))
    tid(page, "add-model-button").click()
    expect(status(page)).to_contain_text("new model vocomni-b v1.0", timeout=JOB_TIMEOUT)
    expect(tid(page, "model-select")).to_have_value(re.compile(r"vocomni-b/1\.0$"))
    tid(page, "device-select").select_option(value="cpu")
    tid(page, "run-button").click()
    expect(status(page)).to_have_text("Segmentation done: 20 segments", timeout=JOB_TIMEOUT)
    idle(page)
    items = page.locator("[data-testid=segment-item]")
    expect(items.first).to_have_attribute("data-segment-name", "spleen")
    expect(items.nth(2)).to_have_attribute("data-segment-name", "left kidney")
    module_shots(page, "vocomni_segmentation", publish="studio_vocomni_segmentation")

    paint_stroke(page, "liver", start_dx=-30, steps=15)
    tid(page, "editor-off-button").click()
    tid(page, "add-to-training-set-button").click()
    expect(tid(page, "training-set-count")).to_contain_text("1 case", timeout=60_000)

    tid(page, "tab-pretrain").click()
    # The version that segmented the case was scored on the correction: its title says so.
    scored = tid(page, "finetune-init-select").locator("option", has_text="vocomni-b v1.0").first.text_content().strip()
    assert scored.startswith("vocomni-b v1.0 — Dice on unseen cases ") and "(n=1)" in scored, scored
    choose(page, "finetune-init-select", scored)
    input_of(page, "pretrain-finetune-steps-input").fill("1")
    input_of(page, "finetune-patch-input").fill("64")
    input_of(page, "finetune-batch-input").fill("1")
    tid(page, "pretrain-finetune-button").click()
    expect(page.locator("[data-testid=job-row][data-job-kind=finetune]")).to_have_count(1, timeout=60_000)
    expect(status(page)).to_have_text("New model: vocomni-b v2", timeout=JOB_TIMEOUT)
    tid(page, "tab-segmentation").click()
    expect(options.filter(has_text=re.compile(r"^vocomni-b v2 — Dice "))).to_have_count(1, timeout=120_000)
    choose(page, "model-select", options.filter(has_text="vocomni-b v2").first.inner_text())
    expect(page.locator("[data-testid=version-row]")).to_have_count(2, timeout=60_000)
    expect(tid(page, "versions-table")).to_contain_text("vocomni-b v2")
    tid(page, "engine-log-panel").click()
    expect(tid(page, "engine-log")).to_contain_text("vocomni-b-", timeout=60_000)  # the run's events
    module_shots(page, "vocomni_finetuned", publish="studio_vocomni_finetuned")
