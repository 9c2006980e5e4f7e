"""Apply -> segmentation shown, for the first and the second case of one session: the warm engine
(``voco serve``, one process that keeps the network loaded) against one engine process per job.

What is timed is what a user waits for: ``SegmentationSession.segment`` on a volume node of real
MRML (slicer-core), the session ticked as the module's timer does, until the job has finished
and its segmentation node is in the scene (the volume hand-off, the engine, reading the label
map back, making the node). Each mode gets a session of its own, its two cases one after the
other; the rounds alternate which mode goes first. Ratios against the other mode of the same
run are the result: the machine is noisy.

The volume: a real one shipped in a PyPI wheel (default the MNI152 T1 of nilearn's, 197x233x189
at 1 mm), loaded twice as two cases. The model: ``--model`` (a package folder or installed model;
the B model on a GPU), else an ``--architecture`` (default the tiny SwinUNETR) at VoCo Studio's
demo settings (3 mm, 32^3 patches) with random weights (seed 0): the time does not depend on
what the weights learnt.

    .venv/bin/python Testing/benchmarks/bench_serve.py [--device cuda] [--model PACKAGE | --architecture A]
        [--fast] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO, REPO / "Testing" / "extension", REPO / "VoCoCommon", REPO / "VoCoSegmentation",
              REPO / "VoCoPretrain"):
    sys.path.insert(0, str(_path))

MODES = ("per job", "warm")


def random_package(folder: Path, architecture: str) -> Path:
    """A package of ``architecture`` with random weights (seed 0) at the demo's 3 mm and 32^3 patches."""
    import torch

    from voco.models.segmentation import build_segmentation_network
    from voco.registry.package import Label, ModelCard, Preprocessing, write_package

    torch.manual_seed(0)
    card = ModelCard(name=f"{architecture}-bench", version="1", architecture=architecture, in_channels=1,
                     labels=[Label(1, "grey matter", "#80ae80"), Label(2, "white matter", "#f1d691")],
                     preprocessing=Preprocessing("mri", (3.0, 3.0, 3.0), (32, 32, 32)))
    network = build_segmentation_network(architecture, 1, 3)
    return write_package(folder / card.name, card, network.state_dict()).folder


def load_case(path, name: str):
    import slicer.util

    from VoCoPretrainLib import overlays

    array, ijk_to_ras = overlays.read_nifti(path)
    return slicer.util.addVolumeFromArray(array.astype("float32"), ijk_to_ras, name)


def apply_until_shown(session, volume, model: str, device: str, fast: bool,
                      timeout: float = 1800.0) -> tuple[float, dict]:
    """Seconds from Apply to the segmentation node in the scene, and the engine's start event."""
    started = time.perf_counter()
    job = session.segment(volume, model, device=device, fast=fast)
    deadline = time.monotonic() + timeout
    while not (job.finished and (job.node is not None or not job.succeeded)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result after {timeout:.0f} s: {session.state.status}")
        session.tick()
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    if not job.succeeded or job.node is None:
        raise RuntimeError(f"the segmentation failed: {job.error}")
    return seconds, next((e for e in job.events if e.get("event") == "start"), {})


def one_session(mode: str, volumes, model: str, device: str, fast: bool, engine_python: str,
                temp: Path) -> list[tuple]:
    from VoCoCommonLib.client import EngineClient
    from VoCoCommonLib.settings import read_settings
    from VoCoSegmentationLib.session import SegmentationSession

    settings = read_settings({**os.environ, "VOCO_ENGINE_PYTHON": engine_python,
                              "VOCO_WARM_ENGINE": "1" if mode == "warm" else "0"})
    session = SegmentationSession(EngineClient(settings), temp_root=temp)
    try:
        return [apply_until_shown(session, volume, model, device, fast) for volume in volumes]
    finally:
        session.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="model package folder or installed model (default: --architecture's)")
    parser.add_argument("--architecture", default="swinunetr-tiny", help="of the random-weights package made without --model")
    parser.add_argument("--fast", action="store_true", help="the module's Fast option (twice the model's spacing)")
    parser.add_argument("--sample", default="mni152-t1", help="shipped sample volume (voco samples list)")
    parser.add_argument("--rounds", type=int, default=1, help="sessions per mode (alternating which goes first)")
    parser.add_argument("--engine-python", default=os.environ.get("VOCO_ENGINE_PYTHON") or sys.executable)
    args = parser.parse_args(argv)

    from slicer_core_app import SlicerCoreApp
    from voco.data.sample_data import fetch

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    os.environ.setdefault("VOCO_SLICER_HOME", str(work / "home"))
    model = args.model or str(random_package(work, args.architecture))
    app = SlicerCoreApp()
    app.install()
    path = fetch(args.sample)
    volumes = [load_case(path, f"case {n}") for n in (1, 2)]
    print(f"volume {args.sample} {volumes[0].GetImageData().GetDimensions()}, model {Path(model).name}, "
          f"device {args.device}{', fast' if args.fast else ''}, OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', '-')}, "
          f"engine {args.engine_python}")

    seconds = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
            temp = work / f"temp-{mode.replace(' ', '-')}-{round_}"
            temp.mkdir()
            cases = one_session(mode, volumes, model, args.device, args.fast, args.engine_python, temp)
            seconds[mode].append([s for s, _ in cases])
            caches = [start.get("model_cache", "-") for _, start in cases]
            print(f"round {round_ + 1} {mode:>8}: first case {cases[0][0]:7.2f} s, second case {cases[1][0]:7.2f} s"
                  f"   (windows {cases[0][1].get('windows')}, model cache {'/'.join(caches)})")
    app.close()

    median = {mode: [statistics.median(r[i] for r in seconds[mode]) for i in (0, 1)] for mode in MODES}
    print(f"\nmedian of {args.rounds} round(s), Apply -> segmentation shown:")
    for mode in MODES:
        print(f"  {mode:>8}: first case {median[mode][0]:7.2f} s, second case {median[mode][1]:7.2f} s")
    print(f"second case, per job / warm: {median['per job'][1] / median['warm'][1]:.2f}x (goal: at least 3x)")
    print(f"first case,  per job / warm: {median['per job'][0] / median['warm'][0]:.2f}x")
    print(f"warm, first / second case:   {median['warm'][0] / median['warm'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
