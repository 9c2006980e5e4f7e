"""Segment one volume twice with the same weights in one process and compare:

(a) this engine's default path (``voco segment``: sliding window with gaussian blending at the
    model card's settings, half-precision accumulation, slab-wise resampling to the input grid);
(b) the reference protocol of the official VoCo fine-tuning code: MONAI
    ``sliding_window_inference`` with roi 96, overlap 0.75, constant blending, float32
    probabilities resampled back to the input grid with MONAI's ``SpatialResample``, argmax.

Both read the same file and compute the same network input (the engine's read and preprocessing
give exactly the tensors of MONAI's LoadImage and transforms; the reference runs those on the
host, as the official code does, the engine on its device). End to end means from the start of
reading the input file to the label map on disk (the engine's: renamed into place with its sidecar
and announced by its ``done`` event); the input is what a front end hands over (``--input nrrd``:
a raw int16 NRRD, first axis fastest, as the Slicer module writes it; or the ``.nii.gz``), the
engine writes what the front end asks for (``--engine-output``: a raw ``.nrrd``, or ``.nii.gz``
as a command-line user would), the reference a ``.nii.gz`` as the official code does. Printed:
end-to-end time split into read, preprocess, load network, inference, resample back (with the
engine's voxel counts), write; peak memory above the start of each run (host RSS, sampled; on CUDA
also the allocator's peak), windows evaluated, GFLOP/s inside one window against this machine's
float32 matmul rate, and the Dice agreement of (a) with (b). Ratios, not absolute times, are the
result: the machines are noisy.

The volume: the MNI152 T1 (nilearn wheel) resampled onto a 512x512x300 grid over its own field
of view (0.38 x 0.46 x 0.63 mm), stored as int16 like a CT. The model: ``--model`` (a package),
``--random-model ARCH`` (random weights at the tiny model's settings: for times only, its Dice
agreement is no quality figure), or a tiny SwinUNETR fine-tuned here for ``--train-steps`` on the
MNI152 grey/white matter labels.

    .venv/bin/python Testing/benchmarks/bench_segment.py [--device cuda] [--model PACKAGE | --random-model swinunetr-b]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from voco.data.brain_tissue import write_training_dataset
from voco.data.sample_data import fetch
from voco.data.volumes import Preprocessing, preprocess
from voco.inference import segment as segment_module
from voco.inference.segment import SegmentOptions, load_network, model_spacing, segment
from voco.inference.sliding_window import SlidingWindowPredictor
from voco.jobs.progress import SilentReporter
from voco.models.segmentation import build_segmentation_network
from voco.registry.package import Label, ModelCard, Preprocessing as CardPreprocessing, read_package, write_package
from voco.training.distributed import choose_device
from voco.training.finetune import PACKAGE_DIR, FinetuneConfig, finetune

REFERENCE = {"roi": 96, "overlap": 0.75, "mode": "constant", "sw_batch_size": 4}


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every millisecond from /proc."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.cuda_start = torch.cuda.memory_allocated()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.host_mb = (self.peak - self.start) / 2**20
        self.cuda_mb = ((torch.cuda.max_memory_allocated() - self.cuda_start) / 2**20
                        if torch.cuda.is_available() else None)


def benchmark_volume(path: Path, shape=(512, 512, 300)) -> Path:
    """The MNI152 T1 on a ``shape`` grid spanning the same field of view, as int16."""
    if path.is_file():
        return path
    source = nib.load(str(fetch("mni152-t1")))
    data = torch.from_numpy(np.asarray(source.dataobj, dtype=np.float32))[None, None]
    gx, gy, gz = (torch.linspace(-1, 1, n) for n in shape)
    resampled = np.empty(shape, dtype=np.int16)
    for x0 in range(0, shape[0], 32):  # in slabs: a full grid would take a gigabyte
        xs, ys, zs = torch.meshgrid(gx[x0:x0 + 32], gy, gz, indexing="ij")
        # grid_sample reads the last grid axis as (W, H, D) = our (z, y, x)
        slab = F.grid_sample(data, torch.stack([zs, ys, xs], -1)[None], align_corners=True)[0, 0]
        resampled[x0:x0 + 32] = slab.round().numpy().astype(np.int16)
    scale = (np.array(source.shape) - 1) / (np.array(shape) - 1)
    affine = source.affine.copy()
    affine[:3, :3] = source.affine[:3, :3] * scale
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(resampled, affine), str(path))
    return path


def hand_off_nrrd(volume: Path) -> Path:
    """The volume as the Slicer module hands it over: a raw NRRD, first axis fastest, its own type."""
    path = volume.with_name(volume.name.replace(".nii.gz", ".nrrd"))
    if not path.is_file():
        sys.path.insert(0, str(Path(__file__).parents[2] / "VoCoCommon"))
        from VoCoCommonLib.volumes import write_nrrd

        image = nib.load(str(volume))
        write_nrrd(np.asarray(image.dataobj).transpose(2, 1, 0), image.affine, path)
    return path


def random_model(work: Path, architecture: str, spacing: float) -> Path:
    """A package of ``architecture`` with random weights, at the tiny model's settings but ``spacing``."""
    folder = work / f"random-{architecture}-{spacing:g}mm"
    if not (folder / "model.json").is_file():
        torch.manual_seed(0)
        network = build_segmentation_network(architecture, 1, 3)
        card = ModelCard(name=f"bench-random-{architecture}", version="1", architecture=architecture, in_channels=1,
                         labels=[Label(1, "grey matter", "#808080"), Label(2, "white matter", "#ffffff")],
                         preprocessing=CardPreprocessing("mri", (spacing,) * 3, (96, 96, 96)))
        write_package(folder, card, network.state_dict())
    return folder


def trained_model(work: Path, steps: int, device: str) -> Path:
    run = work / "model_run"
    if not (run / PACKAGE_DIR / "model.json").is_file():
        dataset = write_training_dataset(work / "brain_tissue")
        config = FinetuneConfig(data=str(dataset), out=str(run), architecture="swinunetr-tiny", steps=steps,
                                patch_size=96, spacing=(1.5, 1.5, 1.5), val_every=steps, checkpoint_every=steps,
                                name="bench-brain-tissue")
        finetune(config, SilentReporter(), device=device)
    return run / PACKAGE_DIR


STAGES = ("read", "preprocess", "load network", "inference", "resample back", "write")


class StageTimer:
    """Seconds per stage: the engine's own functions, timed where segment() calls them (a CUDA
    stage ends when its kernels have), or the reference's steps in ``stage`` blocks."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, dict.fromkeys(STAGES, 0.0)

    def stage(self, name):
        timer = self

        class Block:
            def __enter__(self):
                _sync(timer.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                _sync(timer.device)
                timer.seconds[name] += time.perf_counter() - self.start

        return Block()

    def timed(self, name, function):
        def run(*args, **kwargs):
            with self.stage(name):
                return function(*args, **kwargs)

        return run

    def wrap_engine(self):
        """Patch segment()'s stages; returns a function that undoes it."""
        names = {"read_volume": "read", "preprocess": "preprocess", "load_network": "load network",
                 "label_map_and_counts": "resample back", "write_outputs": "write"}
        originals = {attribute: getattr(segment_module, attribute) for attribute in names}
        for attribute, name in names.items():
            setattr(segment_module, attribute, self.timed(name, originals[attribute]))
        predict = SlidingWindowPredictor.predict
        SlidingWindowPredictor.predict = self.timed("inference", predict)

        def undo():
            for attribute, function in originals.items():
                setattr(segment_module, attribute, function)
            SlidingWindowPredictor.predict = predict

        return undo

    def line(self) -> str:
        return ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in self.seconds.items()) + " s"


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.windows = model, 0

    def forward(self, x):
        self.windows += x.shape[0]
        return self.model(x)


def reference_segment(image_path: Path, output: Path, package, device: torch.device, stages: StageTimer) -> dict:
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import LoadImage, SpatialResample

    card = package.card
    with stages.stage("read"):
        source = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(str(image_path))
    source_affine, source_shape = source.affine.clone(), tuple(source.shape[1:])
    with stages.stage("preprocess"):
        image, affine, _ = preprocess(source, Preprocessing(modality=card.preprocessing.modality,
                                                            spacing=model_spacing(package, False)))
    del source
    with stages.stage("load network"):
        model = CountingModel(load_network(package, device))
    with stages.stage("inference"), torch.inference_mode(), torch.autocast("cuda", enabled=device.type == "cuda"):
        logits = sliding_window_inference(image[None].to(device), (REFERENCE["roi"],) * 3, REFERENCE["sw_batch_size"],
                                          model, overlap=REFERENCE["overlap"], mode=REFERENCE["mode"])
    with stages.stage("resample back"):
        probabilities = MetaTensor(torch.softmax(logits[0].float(), 0), affine=torch.as_tensor(affine))
        del logits
        restored = SpatialResample(mode="bilinear")(probabilities, dst_affine=source_affine, spatial_size=source_shape)
        labels = torch.as_tensor(card.class_values())[restored.argmax(0).cpu()].numpy().astype(np.uint8)
    with stages.stage("write"):
        nib.save(nib.Nifti1Image(labels, source_affine.numpy()), str(output))
    return {"windows": model.windows}


def window_rate(network: torch.nn.Module, device: torch.device, edge: int, precision: str,
                repeats: int = 3) -> tuple[float, float]:
    """(GFLOP per window, GFLOP/s) of one ``edge``^3 window, run the way the engine runs it."""
    from torch.utils.flop_counter import FlopCounterMode

    predictor = SlidingWindowPredictor(network, (edge,) * 3, device, precision=precision)
    if predictor._compute_dtype(device) == torch.bfloat16:
        network = network.to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 1, edge, edge, edge, device=device)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            network(x)
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            predictor._probabilities(network, x)
            _sync(device)
            times.append(time.perf_counter() - start)
    gflop = counter.get_total_flops() / 1e9
    return gflop, gflop / min(times)


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul GFLOP/s (TF32 off: the honest sgemm figure on CUDA too)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.backends.cuda.matmul.allow_tf32 = False
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dice_agreement(a: Path, b: Path, values: list[int]) -> dict[int, float]:
    from monai.transforms import LoadImage

    x, y = (LoadImage(image_only=True, dtype=None)(str(path)).numpy() for path in (a, b))
    return {v: 2 * np.count_nonzero((x == v) & (y == v)) / max(1, np.count_nonzero(x == v) + np.count_nonzero(y == v))
            for v in values}


def compare(image: Path, package, device_name: str, device: torch.device, work: Path, engine_suffix: str) -> None:
    """Run (a) and (b) on the same volume and print their figures side by side."""
    card = package.card
    # Warm-up outside the clock: CUDA context, cuDNN/oneDNN kernel choice (the first run would pay it).
    window_rate(load_network(package, device), device, REFERENCE["roi"], "auto", repeats=1)
    options = SegmentOptions(device=device_name, compress=engine_suffix != ".nrrd")
    results = {}
    for name in ("engine", "reference"):
        out = work / f"{name}{engine_suffix if name == 'engine' else '.nii.gz'}"
        stages = StageTimer(device)
        with PeakMemory() as memory:
            start = time.perf_counter()
            if name == "engine":
                undo = stages.wrap_engine()
                try:
                    info = segment(image, out, package, options, SilentReporter())
                finally:
                    undo()
            else:
                info = reference_segment(image, out, package, device, stages)
            _sync(device)
            seconds = time.perf_counter() - start
        windows = info["windows_evaluated"] if name == "engine" else info["windows"]
        results[name] = {"seconds": seconds, "host_mb": memory.host_mb, "cuda_mb": memory.cuda_mb,
                         "windows": windows, "output": out, "stages": stages.seconds}
        cuda = f", CUDA peak {memory.cuda_mb:.0f} MB" if memory.cuda_mb is not None else ""
        print(f"{name:9s} {seconds:8.2f} s end to end ({image.name} -> {out.name})  host peak +{memory.host_mb:.0f} MB"
              f"{cuda}  windows {windows}")
        print(f"          {stages.line()}; other {seconds - sum(stages.seconds.values()):.2f} s")

    engine, reference = results["engine"], results["reference"]
    agreement = dice_agreement(engine["output"], reference["output"], [label.value for label in card.labels])
    print(f"end-to-end speed-up (reference / engine time): {reference['seconds'] / engine['seconds']:.2f}x")
    print("per stage (reference / engine): " + ", ".join(
        f"{stage} {reference['stages'][stage] / max(engine['stages'][stage], 1e-9):.1f}x" for stage in STAGES))
    print(f"host memory ratio (engine / reference): {engine['host_mb'] / reference['host_mb']:.3f}")
    if engine["cuda_mb"] is not None:
        print(f"CUDA memory ratio (engine / reference): {engine['cuda_mb'] / reference['cuda_mb']:.3f}")
    print(f"windows: engine {engine['windows']} vs reference {reference['windows']}")
    print("Dice agreement per label: " + ", ".join(f"{label.name} {agreement[label.value]:.4f}" for label in card.labels)
          + f"; mean {np.mean(list(agreement.values())):.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model package (default: train a tiny one here)")
    parser.add_argument("--random-model", metavar="ARCH", help="random weights of ARCH (e.g. swinunetr-b): times only")
    parser.add_argument("--random-spacing", type=float, default=1.5,
                        help="its spacing in mm (3: one window, to see the stages around the network on a CPU)")
    parser.add_argument("--input", choices=["nrrd", "nii.gz"], default="nrrd",
                        help="nrrd: the raw NRRD a front end hands over; nii.gz: the volume as stored")
    parser.add_argument("--engine-output", choices=[".nrrd", ".nii.gz", ".nii"], default=".nrrd",
                        help=".nrrd: the raw label map a front end asks for; .nii.gz: a command-line user's")
    parser.add_argument("--no-rates", action="store_true", help="skip the per-window GFLOP/s figures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "voco" / "bench_segment"))
    parser.add_argument("--train-steps", type=int, default=120)
    parser.add_argument("--shape", default="512,512,300")
    parser.add_argument("--rates-only", action="store_true", help="only the per-window GFLOP/s figures")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    work = Path(args.work)
    shape = tuple(int(v) for v in args.shape.split(","))
    image = benchmark_volume(work / f"mni152_{'x'.join(map(str, shape))}.nii.gz", shape)
    if args.input == "nrrd":
        image = hand_off_nrrd(image)
    model = args.model or (random_model(work, args.random_model, args.random_spacing) if args.random_model else None)
    package = read_package(model or trained_model(work, args.train_steps, args.device))
    card = package.card
    print(f"volume {image.name} {shape}, model {card.name} ({card.architecture}, window {card.preprocessing.patch_size}), "
          f"device {device}, torch threads {torch.get_num_threads()}")

    if not args.rates_only:
        compare(image, package, args.device, device, work, args.engine_output)
    if args.no_rates:
        return 0
    matmul = matmul_rate(device)
    print(f"float32 matmul rate: {matmul:.1f} GFLOP/s")
    networks = {card.name: lambda: load_network(package, device)}
    if card.architecture != "swinunetr-b":  # the published VoCo size, random weights: only its speed counts
        networks["swinunetr-b"] = lambda: build_segmentation_network("swinunetr-b", 1, card.num_classes).to(device).eval()
    edge = REFERENCE["roi"]
    for name, build in networks.items():
        for precision in ("float32", "auto"):
            gflop, rate = window_rate(build(), device, edge, precision)
            print(f"window {edge}^3 of {name}, precision {precision}: {gflop:.1f} GFLOP, {rate:.1f} GFLOP/s "
                  f"= {100 * rate / matmul:.0f}% of the float32 matmul rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
