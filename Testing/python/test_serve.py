"""``voco serve``, the warm engine, as a front end drives it: a real server process, requests as
JSON lines on its stdin, events read from its stdout.

Two requests in one server give exactly ``voco segment``'s label maps and read the weights once;
bad requests get an ``error`` and exit code 2 and the server answers the next; a cancelled
request writes nothing and the server goes on; the end of stdin, ``shutdown`` and SIGTERM end it.
Networks: a real tiny SwinUNETR package, and for a known answer or slow windows the toy network
that ``engine_side.toy`` puts in the server (a sitecustomize: ``VOCO_TEST_TOY``, ``VOCO_TEST_SLOW``).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading

import nibabel as nib
import numpy as np
import pytest
import torch

import engine_side
from conftest import REPO, voco_command
from phantoms import oblique_affine, sphere_image
from test_segment import write_nifti
from voco.inference.network_cache import NetworkCache
from voco.registry.package import read_package, write_package

LABELS = [{"value": 1, "name": "liver", "color": "#dd8244"}, {"value": 5, "name": "spleen", "color": "#9d6c62"}]
CANCELLED = 128 + signal.SIGTERM


class Server:
    """``voco serve`` in a process; its events are read in a thread, so a test never hangs on them."""

    def __init__(self, env=None, timeout=120.0):
        self.timeout = timeout
        self.process = subprocess.Popen(voco_command("serve"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, bufsize=1, cwd=REPO,
                                        env={**os.environ, **(env or {})})
        self._events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.next()

    def _read(self):
        for line in self.process.stdout:
            self._events.put(json.loads(line))  # every stdout line must be an event
        self._events.put(None)

    def send(self, message) -> None:
        self.process.stdin.write((message if isinstance(message, str) else json.dumps(message)) + "\n")
        self.process.stdin.flush()

    def segment(self, rid, *args) -> None:
        self.send({"id": rid, "command": "segment", "args": [str(a) for a in args]})

    def next(self) -> dict:
        event = self._events.get(timeout=self.timeout)
        assert event is not None, f"the server ended: {self.process.stderr.read()[-2000:]}"
        return event

    def until(self, rid, kind="exit") -> list[dict]:
        """The events up to the ``kind`` event of request ``rid`` (all requests' events, in order)."""
        seen = []
        while not seen or (seen[-1].get("request"), seen[-1]["event"]) != (rid, kind):
            seen.append(self.next())
        return seen

    def ended(self) -> int:
        returncode = self.process.wait(timeout=self.timeout)
        assert self._events.get(timeout=5) is None  # nothing was said after the last answer
        return returncode

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def server_with():
    """``server_with(env)`` starts a server; every one is gone after the test."""
    started = []

    def start(env=None):
        started.append(Server(env))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def labels(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def of(events, rid) -> list[dict]:
    return [e for e in events if e.get("request") == rid]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    shape = (48, 40, 20)
    affine = oblique_affine(shape=shape)
    return write_nifti(tmp_path_factory.mktemp("image") / "sphere.nii.gz", sphere_image(affine, shape), affine)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy network's package and the site folder that puts it into a server."""
    package = engine_side.toy(tmp_path_factory.mktemp("toy"))
    return package, package.parent / "site"


def toy_env(toy, slow=False) -> dict:
    site = str(toy[1])
    return {"VOCO_TEST_TOY": "1", "VOCO_TEST_SLOW": "1" if slow else "",
            "PYTHONPATH": os.pathsep.join(p for p in (site, str(REPO), os.environ.get("PYTHONPATH")) if p)}


# --- the network cache ----------------------------------------------------------------------------------

def test_a_kept_network_carries_no_request_s_memory_layout_into_the_next():
    """A bfloat16 request on the CPU turns the network channels-last; a float32 one after it, on
    the same network that voco serve kept, must compute as a cold start does."""
    from voco.inference.sliding_window import SlidingWindowPredictor

    network = torch.nn.Conv3d(2, 2, 3, padding=1).to(memory_format=torch.channels_last_3d)
    assert not network.weight.is_contiguous()
    SlidingWindowPredictor(network, (16, 16, 16), torch.device("cpu")).predict(torch.rand(2, 20, 20, 20), 2)
    assert network.weight.is_contiguous()


def test_the_cache_keeps_the_last_networks_and_reads_a_changed_package_again(tmp_path, monkeypatch):
    from voco.inference import segment as segment_module

    loaded = []
    monkeypatch.setattr(segment_module, "load_network", lambda package, device: loaded.append(package) or object())
    packages = [write_package(tmp_path / name, engine_side.card(name, LABELS, {}), {"w": torch.zeros(1)})
                for name in ("a", "b")]
    cache, cpu = NetworkCache(size=1), torch.device("cpu")
    first = cache(packages[0], cpu)
    assert cache.last == "miss" and cache(packages[0], cpu) is first and cache.last == "hit"
    cache(packages[1], cpu)
    assert cache.last == "miss"
    cache(packages[0], cpu)
    assert cache.last == "miss" and len(loaded) == 3  # one kept: b pushed a out
    renewed = write_package(tmp_path / "a", engine_side.card("a", LABELS, {}), {"w": torch.ones(1)})
    cache(read_package(renewed.folder), cpu)
    assert cache.last == "miss"  # a new version in the same folder: another checksum


# --- requests ---------------------------------------------------------------------------------------------

def test_two_requests_give_voco_segments_label_maps_and_the_second_keeps_the_weights(server_with, image, tmp_path):
    package = engine_side.package(tmp_path / "organs", "organs", LABELS)
    from voco.cli import main

    assert main(["segment", str(image), str(tmp_path / "reference.nii.gz"), "--model", str(package), "--device", "cpu",
                 "--progress", "jsonl"]) == 0  # voco segment, in this process
    server = server_with()
    assert server.ready["event"] == "ready" and server.ready["pid"] == server.process.pid
    assert server.ready["commands"] == ["segment"] and "cpu" in server.ready["devices"]
    for rid in ("first", "second"):
        server.segment(rid, image, tmp_path / f"{rid}.nii.gz", "--model", package, "--device", "cpu")
    seen = server.until("second")
    starts = [e for e in seen if e["event"] == "start"]
    assert [(e["request"], e["model_cache"]) for e in starts] == [("first", "miss"), ("second", "hit")]
    for rid in ("first", "second"):
        kinds = [e["event"] for e in of(seen, rid)]
        assert kinds[0] == "start" and kinds[-2:] == ["done", "exit"] and of(seen, rid)[-1]["returncode"] == 0
        np.testing.assert_array_equal(labels(tmp_path / f"{rid}.nii.gz"), labels(tmp_path / "reference.nii.gz"))
    server.process.stdin.close()  # the end of stdin: a clean exit
    assert server.ended() == 0


def test_bad_requests_get_an_error_and_exit_2_and_the_server_answers_the_next(server_with, image, toy, tmp_path,
                                                                              capsys):
    from voco.cli import main

    assert main(["segment", str(image), str(tmp_path / "x.nii.gz"), "--progress", "jsonl"]) == 2
    missing_model = json.loads(capsys.readouterr().out.splitlines()[-1])["message"]  # what voco segment says
    server = server_with(toy_env(toy))
    bad = [("not json", None), ('["a", "list"]', None), ({"command": "segment", "args": []}, None),
           ({"id": "finetune", "command": "finetune", "args": []}, "finetune"),
           ({"id": "types", "command": "segment", "args": [1, 2]}, "types"),
           ({"id": "parser", "command": "segment", "args": [str(image), str(tmp_path / "x.nii.gz")]}, "parser"),
           ({"id": "help", "command": "segment", "args": ["--help"]}, "help"),  # its text is no event: not on stdout
           ({"id": "nofile", "command": "segment", "args": [str(tmp_path / "none.nii.gz"), str(tmp_path / "y.nii.gz"),
                                                             "--model", str(toy[0]), "--device", "cpu"]}, "nofile")]
    messages = {}
    for message, rid in bad:
        server.send(message)
        error, end = server.next(), server.next()
        assert (error["event"], end["event"], end["returncode"]) == ("error", "exit", 2), (message, error, end)
        assert error.get("request") == end.get("request") == rid
        messages[rid] = error["message"]
    assert messages["parser"] == missing_model
    assert "finetune" in messages["finetune"] and "none.nii.gz" in messages["nofile"]

    server.process.stdin.flush()
    server.process.stdin.buffer.write(b'{"id": "\xff\xfe"}\n')  # not UTF-8: it once ended the server
    server.send("[" * 100000 + "]" * 100000)  # deeper than the JSON parser goes: that too
    for _ in range(2):
        error, end = server.next(), server.next()
        assert (error["event"], end["event"], end["returncode"]) == ("error", "exit", 2), (error, end)
    arguments = [str(image), str(tmp_path / "twice.nii.gz"), "--model", str(toy[0]), "--device", "cpu"]
    line = json.dumps({"id": "twice", "command": "segment", "args": arguments})
    server.send(line + "\n" + line)  # the second arrives while the first runs: refused, not mixed with it
    seen = server.until("twice")
    refusal = [e for e in seen if e["event"] == "error"]
    assert len(refusal) == 1 and "request id 'twice' is queued or running already" in refusal[0]["message"]
    assert "request" not in refusal[0] and of(seen, "twice")[-1]["returncode"] == 0
    server.segment("good", image, tmp_path / "good.nii.gz", "--model", toy[0], "--device", "cpu")
    assert of(server.until("good"), "good")[-1]["returncode"] == 0 and (tmp_path / "good.nii.gz").is_file()
    server.send({"command": "shutdown"})
    assert server.ended() == 0


def test_cancel_writes_nothing_the_next_request_works_and_sigterm_ends_the_server(server_with, image, toy, tmp_path):
    shape = (120, 120, 40)  # 24 windows of about a second each
    affine = oblique_affine(shape=shape)
    big = write_nifti(tmp_path / "big.nii.gz", sphere_image(affine, shape), affine)
    out = tmp_path / "out"
    out.mkdir()
    server = server_with(toy_env(toy, slow=True))
    model = ["--model", str(toy[0]), "--device", "cpu"]

    server.segment("slow", big, out / "slow.nii.gz", *model)
    windows = server.until("slow", "start")[-1]["windows"]
    server.send({"id": "slow", "cancel": True})
    seen = of(server.until("slow"), "slow")
    assert [e["event"] for e in seen[-2:]] == ["cancelled", "exit"] and seen[-1]["returncode"] == CANCELLED
    done = [e["done"] for e in seen if e["event"] == "progress" and e.get("stage") == "inference"]
    assert windows == 24 and max(done, default=0) < 4  # it stopped at the next window
    assert os.listdir(out) == []  # no label map, no sidecar, no temporary file

    server.segment("next", image, out / "next.nii.gz", *model)  # one window
    assert of(server.until("next"), "next")[-1]["returncode"] == 0 and (out / "next.nii.gz").is_file()

    server.segment("stopped", big, out / "stopped.nii.gz", *model)
    server.until("stopped", "start")
    server.process.send_signal(signal.SIGTERM)
    seen = of(server.until("stopped"), "stopped")
    assert seen[-2]["event"] == "cancelled" and seen[-1]["returncode"] == CANCELLED
    assert server.ended() == CANCELLED and not (out / "stopped.nii.gz").exists()
    assert "Traceback" not in server.process.stderr.read()
