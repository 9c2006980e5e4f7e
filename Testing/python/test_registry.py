"""The model registry, the cache and the downloader, against a local HTTP server that can resume,
cut connections, ignore Range requests and redirect the way Hugging Face does."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import events, run_voco
from voco.cli import main
from voco.errors import VocoInputError
from voco.jobs.progress import SilentReporter
from voco.registry import registry
from voco.registry.package import Label, ModelCard, Preprocessing, read_package, write_package

BACKBONE = bytes(range(256)) * 160  # 40 KB: several read chunks, cut part way
BACKBONE_SHA = hashlib.sha256(BACKBONE).hexdigest()


class Events:
    def __init__(self):
        self.seen = []

    def emit(self, event, **fields):
        self.seen.append((event, fields))


class FileServer(BaseHTTPRequestHandler):
    """GET /files/NAME serves bytes with Range support; /redirect/NAME answers 302 to /files/NAME
    with the sha256 in X-Linked-Etag, as huggingface.co does for LFS files on its /resolve/ URLs."""

    def do_GET(self):
        state = self.server.state
        kind, _, name = self.path.lstrip("/").partition("/")
        data = state["files"].get(name)
        if data is None:
            return self.send_error(404)
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", f"/files/{name}")
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        asked = self.headers.get("Range")
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and not state["ignore_range"] else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if state["etag"]:
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
        length = state["content_length"] if state["content_length"] is not None else len(data) - start
        if length != "omit":  # without it the body ends when the connection closes (HTTP/1.0)
            self.send_header("Content-Length", str(length))
        self.end_headers()
        body = data[start:start + state["cut_after"]] if state["cut_after"] is not None else data[start:]
        body += state["extra"]
        try:
            self._send(body, state["trickle_s"])
        except OSError:  # the client gave up
            pass
        state["requests"].append({"name": name, "range": asked, "served": len(body)})

    def _send(self, body: bytes, trickle_s: float | None):
        if trickle_s is None:
            return self.wfile.write(body)
        for index in range(len(body)):  # one byte at a time, each sent at once
            self.wfile.write(body[index:index + 1])
            self.wfile.flush()
            time.sleep(trickle_s)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FileServer)
    httpd.state = {"files": {}, "requests": [], "cut_after": None, "ignore_range": False, "etag": False,
                   "content_length": None, "extra": b"", "trickle_s": None}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _card(name="spleen"):
    return ModelCard(name=name, version="2.0", architecture="swinunetr-tiny", in_channels=1,
                     labels=[Label(1, "spleen", "#9d6c62", {"scheme": "SCT", "code": "78961009", "meaning": "Spleen"})],
                     preprocessing=Preprocessing("ct", (1.5, 1.5, 1.5), (64, 64, 64)))


def _package_zip(folder: Path, top="spleen/", extra=()) -> bytes:
    package = write_package(folder / "package", _card(), {"out.weight": torch.arange(6.0).reshape(2, 3)})
    archive = folder / "spleen.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in package.folder.iterdir():
            zipped.write(file, top + file.name)
        for member, text in extra:
            zipped.writestr(member, text)
    return archive.read_bytes()


def _entry(server, name, file, kind="backbone", sha256=None, route="files", architecture="swinunetr-b",
           size_bytes=None):
    return {"name": name, "version": "1.0", "kind": kind, "url": f"{server.url}/{route}/{file}", "sha256": sha256,
            "size_bytes": size_bytes, "file": file, "architecture": architecture, "in_channels": 1, "labels": [],
            "description": f"test model {name}"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A temporary model cache, and a temporary registry that ``_register`` writes."""
    monkeypatch.setenv("VOCO_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("VOCO_REGISTRY", str(tmp_path / "models.json"))
    return tmp_path / "models"


def _register(*entries):
    Path(os.environ["VOCO_REGISTRY"]).write_text(json.dumps({"format": "voco-registry", "format_version": 1,
                                                             "models": list(entries)}))


def _installed_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_download_verifies_installs_and_second_call_is_a_cache_hit(server, cache):
    server.state["files"]["b.pt"] = BACKBONE
    _register(_entry(server, "tiny-b", "b.pt", sha256=BACKBONE_SHA))
    seen = Events()
    path = registry.download("tiny-b", seen)
    assert path == cache / "tiny-b" / "1.0" / "b.pt" and path.read_bytes() == BACKBONE
    record = json.loads((cache / "tiny-b" / "1.0" / "entry.json").read_text())
    assert (record["sha256"], record["sha256_source"], record["installed_bytes"]) == (BACKBONE_SHA, "registry", 40960)
    progress = [fields for event, fields in seen.seen if event == "download"]
    assert progress[-1] == {"name": "tiny-b", "bytes": 40960, "total": 40960, "percent": 100.0}
    assert _installed_files(cache) == ["tiny-b/1.0/b.pt", "tiny-b/1.0/entry.json"]  # no partial left
    assert registry.download("tiny-b", seen) == path
    assert len(server.state["requests"]) == 1
    rows = registry.list_models()
    assert [(r["name"], r["installed"], r["path"]) for r in rows] == [("tiny-b", True, str(path))]
    assert rows[0]["verified"] is True and record["verified"] is True
    assert registry.describe_models(rows).splitlines()[1].split()[-2:] == ["sha256", str(path)]


def test_wrong_checksum_installs_nothing_and_deletes_the_partial(server, cache):
    server.state["files"]["b.pt"] = BACKBONE
    _register(_entry(server, "tiny-b", "b.pt", sha256="0" * 64))
    with pytest.raises(VocoInputError, match=f"sha256 {BACKBONE_SHA} differs from the expected 0{{64}}"):
        registry.download("tiny-b", SilentReporter())
    assert _installed_files(cache) == []
    assert registry.list_models()[0]["installed"] is False


@pytest.mark.parametrize("route, sha256", [("files", BACKBONE_SHA), ("redirect", None)], ids=["registry", "etag"])
def test_interrupted_download_resumes_with_a_range_request(server, cache, route, sha256):
    server.state["files"]["b.pt"] = BACKBONE
    _register(_entry(server, "tiny-b", "b.pt", sha256=sha256, route=route))
    server.state["cut_after"] = 15000
    with pytest.raises(VocoInputError, match="interrupted after 15000 of 40960 bytes"):
        registry.download("tiny-b", SilentReporter())
    assert _installed_files(cache) == [".partial/b.pt.part", ".partial/b.pt.part.json"]
    server.state["cut_after"] = None
    path = registry.download("tiny-b", SilentReporter())
    assert path.read_bytes() == BACKBONE
    assert [(r["range"], r["served"]) for r in server.state["requests"]] == [(None, 15000), ("bytes=15000-", 25960)]
    assert _installed_files(cache) == ["tiny-b/1.0/b.pt", "tiny-b/1.0/entry.json"]


def test_server_that_ignores_range_restarts_the_download(server, cache):
    server.state["files"]["b.pt"] = BACKBONE
    _register(_entry(server, "tiny-b", "b.pt", sha256=BACKBONE_SHA))
    server.state.update(cut_after=15000, ignore_range=True)
    with pytest.raises(VocoInputError, match="interrupted"):
        registry.download("tiny-b", SilentReporter())
    server.state["cut_after"] = None
    assert registry.download("tiny-b", SilentReporter()).read_bytes() == BACKBONE
    assert [(r["range"], r["served"]) for r in server.state["requests"]] == [(None, 15000), ("bytes=15000-", 40960)]


def test_partial_of_another_file_is_not_resumed(server, cache):
    """A partial download recorded for other bytes (the registry's sha256 changed) starts over."""
    server.state["files"]["b.pt"] = BACKBONE
    _register(_entry(server, "tiny-b", "b.pt", sha256=BACKBONE_SHA))
    (cache / ".partial").mkdir(parents=True)
    (cache / ".partial" / "b.pt.part").write_bytes(b"x" * 15000)
    (cache / ".partial" / "b.pt.part.json").write_text(json.dumps({"url": "old", "sha256": "1" * 64}))
    assert registry.download("tiny-b", SilentReporter()).read_bytes() == BACKBONE
    assert [r["range"] for r in server.state["requests"]] == [None]


def test_sha256_from_x_linked_etag_of_a_redirect_like_hugging_face_installs_unverified(server, cache):
    """The server's own checksum shows the bytes arrived intact, not that they are the published file."""
    server.state["files"]["b.pt"] = BACKBONE
    _register(_entry(server, "tiny-b", "b.pt", route="redirect"))
    assert [row["verified"] for row in registry.list_models()] == [False]  # what a download would be
    path = registry.download("tiny-b", SilentReporter())
    record = json.loads((path.parent / "entry.json").read_text())
    assert (path.read_bytes(), record["sha256"], record["sha256_source"]) == (BACKBONE, BACKBONE_SHA, "X-Linked-Etag")
    assert record["verified"] is False and "no published sha256" in record["unverified_reason"]
    [row] = registry.list_models()
    assert (row["installed"], row["verified"]) == (True, False)
    assert registry.describe_models([row]).splitlines()[1].split()[-2:] == ["unverified", str(path)]


def test_no_known_checksum_is_refused_and_sha256_option_allows_it(server, cache):
    server.state["files"]["b.pt"] = BACKBONE
    _register(_entry(server, "tiny-b", "b.pt"))
    with pytest.raises(VocoInputError, match="refused: no sha256 is known"):
        registry.download("tiny-b", SilentReporter())
    assert _installed_files(cache) == []
    path = registry.download("tiny-b", SilentReporter(), sha256=BACKBONE_SHA.upper())
    assert json.loads((path.parent / "entry.json").read_text())["sha256_source"] == "--sha256"


def test_server_naming_another_sha256_is_refused_before_downloading(server, cache):
    server.state["files"]["b.pt"] = BACKBONE
    server.state["etag"] = True
    _register(_entry(server, "tiny-b", "b.pt", sha256="2" * 64))
    with pytest.raises(VocoInputError, match=f"offers a file with sha256 {BACKBONE_SHA}, not the expected 2{{64}}"):
        registry.download("tiny-b", SilentReporter())
    assert not (cache / ".partial" / "b.pt.part").exists()


def test_a_server_that_trickles_is_stopped_by_the_overall_deadline(server, cache, monkeypatch):
    """One byte every 0.05 s never trips the per-read timeout; the deadline for the whole file does."""
    monkeypatch.setenv("VOCO_DOWNLOAD_DEADLINE_S", "0.5")
    server.state.update(files={"b.pt": BACKBONE}, trickle_s=0.05)
    _register(_entry(server, "tiny-b", "b.pt", sha256=BACKBONE_SHA, size_bytes=len(BACKBONE)))
    started = time.monotonic()
    with pytest.raises(VocoInputError, match=r"/files/b.pt: download took longer than its 0.5 s deadline "
                                             r"\(VOCO_DOWNLOAD_DEADLINE_S\) after \d+ of 40960 bytes"):
        registry.download("tiny-b", SilentReporter())
    assert time.monotonic() - started < 3
    assert registry.list_models()[0]["installed"] is False


def test_the_deadline_is_set_by_the_expected_size_and_a_minimum_rate(monkeypatch):
    from voco.registry import download

    monkeypatch.delenv("VOCO_DOWNLOAD_DEADLINE_S", raising=False)
    assert download.deadline_s(None) == download.DEADLINE_UNKNOWN_SIZE_S
    assert download.deadline_s(4_650_986_176) == pytest.approx(download.DEADLINE_BASE_S + 4_650_986_176 / 100_000)
    monkeypatch.setenv("VOCO_DOWNLOAD_DEADLINE_S", "soon")
    with pytest.raises(VocoInputError, match="VOCO_DOWNLOAD_DEADLINE_S must be a positive number of seconds, not 'soon'"):
        download.deadline_s(None)


def test_a_content_length_other_than_the_registry_size_is_refused_before_any_byte(server, cache):
    server.state.update(files={"b.pt": BACKBONE}, content_length=len(BACKBONE) * 1000)
    _register(_entry(server, "tiny-b", "b.pt", sha256=BACKBONE_SHA, size_bytes=len(BACKBONE)))
    with pytest.raises(VocoInputError, match=r"/files/b.pt: refused: the server announces 40960000 bytes, "
                                             r"the registry lists 40960"):
        registry.download("tiny-b", SilentReporter())
    assert _installed_files(cache) == []


def test_a_server_sending_more_than_the_registry_size_is_cut_off_and_nothing_kept(server, cache):
    server.state.update(files={"b.pt": BACKBONE}, content_length="omit", extra=b"x" * 200_000)
    _register(_entry(server, "tiny-b", "b.pt", sha256=BACKBONE_SHA, size_bytes=len(BACKBONE)))
    with pytest.raises(VocoInputError, match=r"/files/b.pt: refused: the server sent more than the 40960 bytes "
                                             r"the registry lists; the download was deleted"):
        registry.download("tiny-b", SilentReporter())
    assert _installed_files(cache) == []


def test_a_full_disk_during_a_download_says_so_and_removes_the_partial(server, cache, monkeypatch):
    from voco.registry import download

    def full_after_20000_bytes(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        write = file.write

        def limited(block):
            if file.tell() + len(block) > 20000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(block)

        file.write = limited
        return file

    monkeypatch.setattr(download, "open", full_after_20000_bytes, raising=False)
    server.state["files"]["b.pt"] = BACKBONE
    _register(_entry(server, "tiny-b", "b.pt", sha256=BACKBONE_SHA))
    part = cache / ".partial" / "b.pt.part"
    with pytest.raises(VocoInputError) as raised:
        registry.download("tiny-b", SilentReporter())
    assert re.fullmatch(rf"{re.escape(str(part))}: disk full after writing \d+ of 40960 bytes; the partial "
                        "download was removed", str(raised.value))
    assert _installed_files(cache) == []


def test_zip_package_download_installs_a_readable_package(server, cache, tmp_path):
    data = _package_zip(tmp_path)
    server.state["files"]["spleen.zip"] = data
    _register(_entry(server, "spleen", "spleen.zip", kind="segmentation", architecture="swinunetr-tiny",
                          sha256=hashlib.sha256(data).hexdigest()))
    package = registry.resolve_package("spleen", SilentReporter())
    assert package.folder == cache / "spleen" / "1.0"
    assert package.card.labels[0].terminology["code"] == "78961009"
    assert torch.equal(package.load_state_dict()["out.weight"], torch.arange(6.0).reshape(2, 3))
    assert registry.resolve_weights("spleen", SilentReporter()) == package.folder
    assert _installed_files(cache) == ["spleen/1.0/entry.json", "spleen/1.0/model.json", "spleen/1.0/weights.pt"]


def test_zip_with_parent_directory_members_is_refused(server, cache, tmp_path):
    data = _package_zip(tmp_path, extra=[("../evil.txt", "x")])
    server.state["files"]["spleen.zip"] = data
    _register(_entry(server, "spleen", "spleen.zip", kind="segmentation", architecture="swinunetr-tiny",
                          sha256=hashlib.sha256(data).hexdigest()))
    with pytest.raises(VocoInputError, match="refused: member '../evil.txt' would be written outside"):
        registry.download("spleen", SilentReporter())
    assert _installed_files(cache) == [] and not (tmp_path / "evil.txt").exists()


def test_backbone_is_not_a_segmentation_model(server, cache):
    _register(_entry(server, "tiny-b", "b.pt", sha256=BACKBONE_SHA))
    with pytest.raises(VocoInputError, match="tiny-b is a pretrained backbone without a segmentation head; "
                                             "fine-tune it first: voco finetune --init tiny-b"):
        registry.resolve_package("tiny-b", SilentReporter())
    assert server.state["requests"] == []


def test_import_package_folder_and_zip(cache, tmp_path):
    _register()
    _package_zip(tmp_path)
    seen = Events()
    folder = registry.import_model(tmp_path / "package", seen)
    assert folder == cache / "spleen" / "2.0" and read_package(folder, verify=True).card.name == "spleen"
    assert registry.import_model(tmp_path / "package", seen) == folder  # same bytes: nothing to do
    assert [event for event, _ in seen.seen] == ["imported"]
    zipped = registry.import_model(tmp_path / "spleen.zip", seen, name="spleen zip")
    assert zipped == cache / "spleen-zip" / "2.0"
    assert read_package(zipped, verify=True).card.labels[0].name == "spleen"
    assert registry.resolve_package(tmp_path / "package", seen).folder == tmp_path / "package"
    assert [(r["name"], r["kind"], r["installed"]) for r in registry.list_models()] == [
        ("spleen", "segmentation", True), ("spleen-zip", "segmentation", True)]


def _swin_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {"swinViT.patch_embed.proj.weight": torch.zeros(12, 1, 2, 2, 2),
                               "swinViT.patch_embed.proj.bias": torch.zeros(12)}}, path)
    return path


def test_import_bare_checkpoint_records_its_architecture(cache, tmp_path):
    _register()
    path = registry.import_model(_swin_checkpoint(tmp_path / "my run.pt"), SilentReporter())
    record = json.loads((path.parent / "entry.json").read_text())
    assert (record["name"], record["kind"], record["architecture"]) == ("my-run", "backbone", "swinunetr-tiny")
    assert path.read_bytes() == (tmp_path / "my run.pt").read_bytes()
    assert registry.resolve_weights("my-run", SilentReporter()) == path


def test_import_file_named_like_a_registry_entry_installs_that_entry(server, cache, tmp_path):
    server.state["files"]["b.pt"] = BACKBONE
    (tmp_path / "b.pt").write_bytes(BACKBONE)
    _register(_entry(server, "tiny-b", "b.pt", sha256=BACKBONE_SHA))
    path = registry.import_model(tmp_path / "b.pt", SilentReporter())
    assert path == cache / "tiny-b" / "1.0" / "b.pt"
    assert json.loads((path.parent / "entry.json").read_text())["sha256_source"] == "registry"
    assert registry.resolve_weights("tiny-b", SilentReporter()) == path
    assert server.state["requests"] == []  # offline: the import is the install
    (tmp_path / "b.pt").write_bytes(BACKBONE[:-1] + b"!")
    with pytest.raises(VocoInputError, match="differs from the registry's"):
        registry.import_model(tmp_path / "b.pt", SilentReporter())


def test_unknown_names_and_network_errors(server, cache):
    _register(_entry(server, "tiny-b", "b.pt", sha256=BACKBONE_SHA),
                   {**_entry(server, "gone", "gone.pt", sha256=BACKBONE_SHA), "url": "http://127.0.0.1:9/gone.pt"})
    with pytest.raises(VocoInputError, match="'nope' is not a known model; known models: tiny-b, gone"):
        registry.download("nope", SilentReporter())
    with pytest.raises(VocoInputError, match="'nope' is not an existing file or folder, nor a known model"):
        registry.resolve_weights("nope", SilentReporter())
    with pytest.raises(VocoInputError, match=r"/files/b.pt: download failed: HTTP 404"):
        registry.download("tiny-b", SilentReporter())
    with pytest.raises(VocoInputError, match=r"http://127.0.0.1:9/gone.pt: cannot download: .*refused"):
        registry.download("gone", SilentReporter())


def test_cli_models_list_download_import_and_unknown_name(server, cache, tmp_path):
    server.state["files"]["b.pt"] = BACKBONE
    _register(_entry(server, "tiny-b", "b.pt", sha256=BACKBONE_SHA))
    env = {"VOCO_MODELS_DIR": os.environ["VOCO_MODELS_DIR"], "VOCO_REGISTRY": os.environ["VOCO_REGISTRY"]}
    listed = run_voco("models", "list", "--progress", "jsonl", env=env)
    assert listed.returncode == 0, listed.stderr
    [models] = events(listed.stdout)
    assert models["event"] == "models"
    assert [(m["name"], m["installed"], m["verified"]) for m in models["models"]] == [("tiny-b", False, True)]
    fetched = run_voco("models", "download", "tiny-b", "--progress", "jsonl", env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert events(fetched.stdout)[-1]["path"] == str(cache / "tiny-b" / "1.0" / "b.pt")
    _package_zip(tmp_path)
    imported = run_voco("models", "import", tmp_path / "spleen.zip", env=env)
    assert imported.returncode == 0, imported.stderr
    assert (cache / "spleen" / "2.0" / "model.json").is_file()
    unknown = run_voco("models", "download", "nope", env=env)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.splitlines() == ["error: 'nope' is not a known model; known models: tiny-b (see voco models list)"]


# --- segmentation models published as checkpoints (VoComni) -----------------------------------

VOCOMNI_NAMES = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
                 "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland",
                 "left adrenal gland", "liver tumor", "pancreas tumor", "kidney tumor", "COVID-19 lesion", "colon",
                 "colon cancer", "lung cancer"]


@pytest.fixture(scope="module")
def vocomni_b(tmp_path_factory):
    """VoComni_B.pt as the authors publish it (a SwinUNETR-B with 21 outputs under state_dict)."""
    from published_files import write_vocomni_checkpoint

    return write_vocomni_checkpoint(tmp_path_factory.mktemp("published") / "VoComni_B.pt")


def test_shipped_registry_offers_vocomni_models_that_segment_with_coded_labels(monkeypatch):
    monkeypatch.delenv("VOCO_REGISTRY", raising=False)
    entries = {entry["name"]: entry for entry in registry.registry_entries()}
    for size, architecture in (("b", "swinunetr-b"), ("l", "swinunetr-l"), ("h", "swinunetr-h")):
        entry = entries[f"vocomni-{size}"]
        assert (entry["kind"], entry["file"], entry["architecture"]) == (
            "segmentation", f"VoComni_{size.upper()}.pt", architecture)
        assert entry["url"] == f"https://huggingface.co/Luffy503/VoCo/resolve/main/VoComni_{size.upper()}.pt"
        assert len(entry["sha256"]) == 64 and entry["size_bytes"] > 0
        assert [(label["value"], label["name"]) for label in entry["labels"]] == list(enumerate(VOCOMNI_NAMES, 1))
        assert entry["preprocessing"] == {"modality": "ct", "spacing": [1.5, 1.5, 1.5], "patch_size": [96, 96, 96],
                                          "fast_spacing": None}
    labels = {label["name"]: label for label in entries["vocomni-b"]["labels"]}
    assert labels["left kidney"]["terminology"]["modifier"]["meaning"] == "Left"
    assert labels["liver tumor"]["terminology"]["region"]["meaning"] == "Liver"
    assert labels["COVID-19 lesion"]["terminology"] is None  # no code of Slicer's lists says it: none rather than a wrong one
    assert len({label["color"] for label in labels.values()}) == 19  # the two kidneys share Slicer's kidney colour
    assert all(entries[f"voco-{size}"]["sha256"] for size in "blh")


def test_import_of_a_published_vocomni_checkpoint_makes_the_entry_segment_offline(cache, vocomni_b, tmp_path,
                                                                                 monkeypatch):
    from published_files import registry_for

    from voco.inference.segment import load_network

    env = {"VOCO_MODELS_DIR": str(cache), "VOCO_REGISTRY": str(registry_for(tmp_path, {"VoComni_B.pt": vocomni_b}))}
    imported = run_voco("models", "import", vocomni_b, "--progress", "jsonl", env=env)
    assert imported.returncode == 0, imported.stderr
    assert [e["event"] for e in events(imported.stdout)] == ["imported", "done"]
    folder = cache / "vocomni-b" / "1.0"
    assert sorted(p.name for p in folder.iterdir()) == ["VoComni_B.pt", "entry.json", "model.json"]
    assert (folder / "VoComni_B.pt").read_bytes() == vocomni_b.read_bytes()  # installed as published
    monkeypatch.setenv("VOCO_REGISTRY", env["VOCO_REGISTRY"])
    package = registry.resolve_package("vocomni-b", SilentReporter())
    assert package.folder == folder and package.card.weights_file == "VoComni_B.pt"
    assert [label.name for label in package.card.labels] == VOCOMNI_NAMES and package.card.num_classes == 21
    network = load_network(package, torch.device("cpu"))  # strict: every tensor of the file has its place
    assert network.out.conv.conv.weight.shape[0] == 21
    assert [r["installed"] for r in registry.list_models() if r["name"] == "vocomni-b"] == [True]


def test_the_shipped_registry_refuses_a_file_that_is_not_the_published_one(cache, vocomni_b, monkeypatch):
    monkeypatch.delenv("VOCO_REGISTRY", raising=False)
    with pytest.raises(VocoInputError, match="differs from the registry's b3b3e27"):
        registry.import_model(vocomni_b, SilentReporter())
    assert _installed_files(cache) == []


def test_a_segmentation_checkpoint_holding_another_network_is_refused_naming_the_file(server, cache, tmp_path):
    from published_files import write_vocomni_checkpoint

    labels = [{"value": v, "name": f"organ {v}", "color": "#808080"} for v in (1, 2)]
    entry = {**_entry(server, "omni", "omni.pt", kind="segmentation", architecture="swinunetr-tiny"), "labels": labels,
             "preprocessing": {"modality": "ct", "spacing": [1.5, 1.5, 1.5], "patch_size": [32, 32, 32]}}
    _register(entry)
    wrong = write_vocomni_checkpoint(tmp_path / "omni.pt", "swinunetr-tiny", classes=5)
    with pytest.raises(VocoInputError, match=rf"{wrong}: holds swinunetr-tiny weights with 1 input channel\(s\) and 5 "
                                             "output classes; model omni needs swinunetr-tiny, 1 channel.*3 classes"):
        registry.import_model(wrong, SilentReporter())
    assert _installed_files(cache) == []
    _register({**entry, "labels": []})
    with pytest.raises(VocoInputError, match="must give labels and preprocessing"):
        registry.registry_entries()


def test_a_segmentation_checkpoint_downloads_into_a_package_that_segments(server, cache, tmp_path):
    from published_files import sha256_of, write_vocomni_checkpoint

    labels = [{"value": 1, "name": "sphere", "color": "#80ae80"}]
    checkpoint = write_vocomni_checkpoint(tmp_path / "omni.pt", "swinunetr-tiny", classes=2)
    server.state["files"]["omni.pt"] = checkpoint.read_bytes()
    _register({**_entry(server, "omni", "omni.pt", kind="segmentation", architecture="swinunetr-tiny",
                        sha256=sha256_of(checkpoint)), "labels": labels,
               "preprocessing": {"modality": "mri", "spacing": [2.0, 2.0, 2.0], "patch_size": [32, 32, 32]}})
    reporter = Events()
    folder = registry.download("omni", reporter)
    assert [event for event, _ in reporter.seen][-1] == "download"
    assert json.loads((folder / "entry.json").read_text())["sha256_source"] == "registry"
    import numpy as np
    import nibabel as nib

    from phantoms import oblique_affine, sphere_image

    affine, shape = oblique_affine(), (48, 40, 20)
    nib.save(nib.Nifti1Image(sphere_image(affine, shape).astype(np.float32), affine), tmp_path / "ct.nii.gz")
    env = {"VOCO_MODELS_DIR": str(cache), "VOCO_REGISTRY": os.environ["VOCO_REGISTRY"]}
    done = run_voco("segment", tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", "--model", "omni", "--device", "cpu",
                    env=env)
    assert done.returncode == 0, done.stderr
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert (sidecar["model"]["name"], [label["name"] for label in sidecar["labels"]]) == ("omni", ["sphere"])


# --- a model package is replaced whole, and its card is checked -----------------------------------------

# Writes version 2 of the package in argv[1] and SIGKILLs itself right after its argv[2]-th rename.
_KILLED_WRITER = """
import os, signal, sys, torch
from voco.registry.package import Label, ModelCard, Preprocessing, write_package

renames, rename = [0], os.replace
def killing_rename(source, target):
    rename(source, target)
    renames[0] += 1
    if renames[0] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = killing_rename
card = ModelCard("spleen", "2", "swinunetr-tiny", 1, [Label(1, "spleen", "#9d6c62")],
                 Preprocessing("ct", (1.5, 1.5, 1.5), (64, 64, 64)))
write_package(sys.argv[1], card, {"out.weight": torch.full((2, 3), 2.0)})
"""


@pytest.mark.parametrize("renames", [1, 3])
def test_a_package_write_killed_between_its_renames_leaves_a_complete_package(renames, tmp_path):
    """Rename 1 put the new weights beside the old card (the old model failed its sha256); with
    the package written as a new folder, rename 3 moves the old folder aside for the new one."""
    import signal
    import subprocess
    import sys

    folder = tmp_path / "model"
    write_package(folder, _card(), {"out.weight": torch.ones(2, 3)})
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(folder), str(renames)], capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    survivor = read_package(folder, verify=True)  # the old package or the new one, never a mixture
    assert survivor.card.version in ("2.0", "2")
    third = _card()
    third.version = "3"
    write_package(folder, third, {"out.weight": torch.full((2, 3), 3.0)})
    assert read_package(folder, verify=True).card.version == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # what the kill left is cleaned up
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "weights.pt"]


def _card_with(**preprocessing) -> dict:
    values = _card().to_dict()
    values["preprocessing"].update(preprocessing)
    return values


@pytest.mark.parametrize("values, message", [
    (_card_with(patch_size=[0, 0, 0]), "patch_size must be three multiples of 32 up to 512, got [0, 0, 0]"),
    (_card_with(patch_size=[4096, 4096, 4096]), "patch_size must be three multiples of 32 up to 512"),
    (_card_with(patch_size=[96, 96]), "patch_size must be three multiples of 32"),
    (_card_with(patch_size="96"), "patch_size must be three multiples of 32"),
    (_card_with(spacing=[0, 1, 1]), "spacing must be three sizes of 0.05 to 20 mm, got [0, 1, 1]"),
    (_card_with(spacing=[1e308, 1, 1]), "spacing must be three sizes of 0.05 to 20 mm"),
    (_card_with(fast_spacing=[-3, 3, 3]), "fast_spacing must be three sizes of 0.05 to 20 mm"),
    (_card_with(modality="pet"), "modality must be one of ct, ct-chest, mri"),
    ({**_card().to_dict(), "in_channels": 0}, "in_channels must be 1..16, got 0"),
    ({**_card().to_dict(), "in_channels": "1"}, "in_channels must be 1..16"),
    ({**_card().to_dict(), "labels": [{"value": 1e12, "name": "x", "color": "#000000"}]}, "labels must be"),
    ({**_card().to_dict(), "labels": [{"value": 70000, "name": "x", "color": "#000000"}]}, "up to 65535"),
    ([1, 2], "not a voco-model model card"),
])
def test_a_card_with_impossible_values_is_a_one_line_error(values, message, tmp_path, capsys):
    folder = tmp_path / "bad"
    write_package(folder, _card(), {"out.weight": torch.ones(2, 3)})
    (folder / "model.json").write_text(json.dumps(values))
    with pytest.raises(VocoInputError, match="bad/model.json: ") as error:
        read_package(folder)
    assert message in str(error.value)
    image = tmp_path / "scan.nii.gz"
    assert main(["segment", str(image), str(tmp_path / "seg.nii.gz"), "--model", str(folder)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
