"""The preprocessed store (``voco preprocess``) against today's in-memory data and the reference cache.

The volumes: N distinct CTs made from the real lumbar spine CT that ships in the TPTBox wheel
(``voco samples``: 73x47x73 voxels of 1.5 mm, int16). Volume i is a random sub-box of 80-100 % of
the original's extent along each axis (its affine's origin moved with it), flipped along a random
subset of the axes, shifted by a random whole number of HU in -30..30 (never 0) and given an air
border (-1024 HU) of 1-6 voxels on each side, written as int16 .nii.gz; volume i is the same in
every N, and every file's sha256 is checked to be unique.

Measured in one run, every figure against a baseline of the same run:

1. memory: for each N in ``--counts``, in fresh processes, (a) today's path, ``voco pretrain --data
   FOLDER`` (every volume preprocessed and held in memory) and (b) ``voco preprocess`` once, then
   ``voco pretrain --data STORE --workers W``, both with ``--preset --backbone --steps --seed``. The
   peak of the whole process tree (trainer + DataLoader workers, or preprocess + its pool), sampled
   from /proc every 20 ms: the sum of RSS over the processes (pages a forked worker shares with the
   trainer count once per process) and the sum of PSS (shared pages split between them: what the tree
   occupies); also the trainer's own peak RSS as the kernel counts it (VmHWM, its last sample).
   Ratios peak(N) / peak(first N) for both paths.
2. size: bytes on disk of the store folder against the cache_dir of a MONAI ``PersistentDataset``
   over the same files with the deterministic prefix of the official VoCo-v2 pipeline
   (Luffy03/Large-Scale-Medical, Self-supervised/utils/data_trans.py, get_abdomen_trans_without_label,
   everything before its first random transform): LoadImaged, EnsureChannelFirstd, Orientationd RAS,
   Spacingd (the preset's spacing, bilinear), ScaleIntensityRanged (the CT window -175..250 HU to
   0..1, clipped), CropForegroundd (source image, > 0), SpatialPadd (the preset's patch, constant).
   Goal: store / cache <= 1/8.
3. speed: the same pretraining run (N = ``--speed-volumes``) from the folder (in memory) and from the
   store with ``--workers`` 1 and 2, each in its own process, runs in turns (ABC CBA ...). steps/s =
   the timed steps / the time between their step events (the events' own clock), after ``--warmup``
   steps; the ratio store / memory per round (goal >= 0.9); and the median time a step waited for
   its batch (``timed_pretrain.py`` adds it to the step events).
4. reference (on ``--device``; B backbone on CUDA, the tiny one on CPU): the official data path --
   the PersistentDataset above, then per volume a random patch and targets cut with MONAI transforms
   one crop at a time (``bench_pretrain.baseline_crops``) in MONAI DataLoader workers on the CPU,
   pinned and copied to the device -- against ``voco pretrain --data STORE`` on the same device.
   Same network and loss (the engine's) on both sides, so only the data path differs; printed:
   steps/s, the ratio (goal on a GPU >= 3) and the reference's median wait for data per step.

    .venv/bin/python Testing/benchmarks/bench_store.py [--counts 3,24,200] [--device cuda]

With another engine checkout first on PYTHONPATH, every ``voco`` process runs that code (the
benchmark prints which).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import voco
from voco.checkpoints.files import sha256_of
from voco.data.sample_data import fetch
from voco.data.volumes import CT_WINDOWS
from voco.presets import PRESETS, resolve_preset

sys.path.insert(0, str(Path(__file__).parent))
from bench_pretrain import Engine, baseline_crops, baseline_layout  # noqa: E402

SOURCE = "spine-ct"
AIR_HU = -1024
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # MONAI's old default, what the official code got
SEED = 0
MB = 2**20


# --- the volumes --------------------------------------------------------------------------------

def make_volumes(folder: Path, count: int) -> list[Path]:
    """``count`` distinct CTs derived from the spine CT (see the module docstring) in ``folder``."""
    source = nib.load(fetch(SOURCE))
    data, affine = np.asarray(source.dataobj, dtype=np.int16), source.affine
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng([SEED, i])
        sizes = [int(rng.integers(round(0.8 * s), s + 1)) for s in data.shape]
        starts = [int(rng.integers(0, s - k + 1)) for s, k in zip(data.shape, sizes)]
        box = data[tuple(slice(a, a + k) for a, k in zip(starts, sizes))]
        flips = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))
        offset = int(rng.choice([*range(-30, 0), *range(1, 31)]))
        volume = (np.flip(box, flips) if flips else box).astype(np.int32) + offset
        # An air border (its width another random draw): a sub-box may have lost all the original's
        # air, and the engine tells CT from MRI by it (``--modality auto``).
        border = [(int(rng.integers(1, 7)), int(rng.integers(1, 7))) for _ in range(3)]
        volume = np.pad(volume, border, constant_values=AIR_HU)
        moved = affine.copy()
        moved[:3, 3] = affine[:3, :3] @ (np.array(starts) - [b[0] for b in border]) + affine[:3, 3]
        path = folder / f"ct_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.clip(volume, AIR_HU, 3071).astype(np.int16), moved), path)
        paths.append(path)
    shas = {sha256_of(p) for p in paths}
    assert len(shas) == count, f"only {len(shas)} distinct files among {count}"
    return paths


# --- memory of a process tree -------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the process ended between listing and reading
        return ""


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from the kernel's children lists."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        for task in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else ():
            todo += [int(c) for c in _read(f"/proc/{p}/task/{task}/children").split()]
    return tree


def _status_kb(text: str, field: str) -> int:
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class TreeMemory:
    """Peak memory of a process and its descendants, sampled from /proc while it runs: every
    ``interval`` s the sums of RSS and of anonymous RSS (heap, tensors: what grows with data) over
    the processes, and every ``pss_interval`` s the sum of PSS (reading it walks the page tables,
    ~0.1 s for a 3 GB process, so it is sampled sparsely: its peak is a lower bound)."""

    def __init__(self, pid: int, interval: float = 0.02, pss_interval: float = 1.0):
        self.pid, self.interval, self.pss_interval = pid, interval, pss_interval
        self.rss = self.anon = self.pss = self.hwm = 0  # bytes
        self.processes = 1
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        last_pss = 0.0
        while self.running:
            tree = process_tree(self.pid)
            status = [_read(f"/proc/{p}/status") for p in tree]
            rss = sum(_status_kb(s, "VmRSS") for s in status) * 1024
            if rss > self.rss:
                self.rss, self.processes = rss, len(tree)
            self.anon = max(self.anon, sum(_status_kb(s, "RssAnon") for s in status) * 1024)
            self.hwm = max(self.hwm, _status_kb(status[0], "VmHWM") * 1024)
            if time.monotonic() - last_pss >= self.pss_interval:
                last_pss = time.monotonic()
                self.pss = max(self.pss, sum(_status_kb(_read(f"/proc/{p}/smaps_rollup"), "Pss") for p in tree) * 1024)
            time.sleep(self.interval)

    def stop(self) -> "TreeMemory":
        self.running = False
        self.thread.join()
        return self

    def __str__(self) -> str:
        return (f"RSS sum {_mb(self.rss)} ({self.processes} processes), anonymous {_mb(self.anon)}, "
                f"PSS sum {_mb(self.pss)}, main VmHWM {_mb(self.hwm)}")


TIMED_PRETRAIN = Path(__file__).with_name("timed_pretrain.py")
# Every voco process runs the engine this benchmark imported (python -m puts the working folder first).
ENGINE_ROOT = str(Path(voco.__file__).resolve().parent.parent)


class Run:
    """One ``voco`` command in a fresh process (pretrain through ``timed_pretrain.py``, which adds
    ``data_wait_s`` to the step events): its JSON events, wall time and memory."""

    def __init__(self, *args, timeout: float = 3600):
        entry = [str(TIMED_PRETRAIN)] if args[0] == "pretrain" else ["-m", "voco"]
        command = [sys.executable, *entry, *map(str, args), "--progress", "jsonl"]
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([ENGINE_ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                   cwd=tempfile.gettempdir())
        memory = TreeMemory(process.pid)
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            memory.stop()
        self.seconds, self.memory = time.perf_counter() - start, memory
        if process.returncode != 0:
            raise SystemExit(f"failed (exit {process.returncode}): {' '.join(command)}\n{err[-3000:]}")
        self.events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    def speed(self, warmup: int) -> dict:
        """steps/s between the step events after ``warmup`` and the last, and the median data wait."""
        steps = self.of("step")
        timed = steps[warmup - 1:] if warmup else steps
        seconds = timed[-1]["time"] - timed[0]["time"]
        waits = [e["data_wait_s"] for e in steps[warmup:] if "data_wait_s" in e]
        return {"steps_per_s": (len(timed) - 1) / seconds, "steps": len(timed) - 1,
                "wait_s": statistics.median(waits) if waits else None}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _ratios(memory: TreeMemory, base: TreeMemory) -> str:
    return ", ".join(f"{name} {getattr(memory, name) / getattr(base, name):.2f}x" for name in ("rss", "anon", "pss"))


def _mb(value: int) -> str:
    return f"{value / MB:.0f} MB"


# --- the reference: MONAI PersistentDataset and per-crop transforms in DataLoader workers ---------

def reference_prefix(preset):
    """The deterministic prefix of the official v2 pipeline (see the module docstring)."""
    from monai.transforms import (CropForegroundd, EnsureChannelFirstd, LoadImaged, Orientationd,
                                  ScaleIntensityRanged, SpatialPadd, Spacingd)

    low, high = CT_WINDOWS["ct"]
    spacing = [Spacingd(keys=["image"], pixdim=preset.spacing, mode="bilinear")] if preset.spacing else []
    return [LoadImaged(keys=["image"]), EnsureChannelFirstd(keys=["image"]), Orientationd(keys=["image"], axcodes="RAS", labels=RAS_LABELS),
            *spacing, ScaleIntensityRanged(keys=["image"], a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd(keys=["image"], source_key="image"),
            SpatialPadd(keys=["image"], spatial_size=preset.patch_shape, mode="constant")]


def persistent_dataset(paths, preset, cache_dir: Path, crops=None):
    from monai.data import PersistentDataset
    from monai.transforms import Compose
    import pickle

    transform = Compose(reference_prefix(preset) + ([crops] if crops is not None else []))
    # weights_only=False: MONAI 1.6 otherwise refuses its own cached items (their metadata) and
    # recomputes them on every read; the official code's MONAI loaded them.
    return PersistentDataset([{"image": str(p)} for p in paths], transform, cache_dir=str(cache_dir),
                             pickle_protocol=pickle.HIGHEST_PROTOCOL, weights_only=False)


def reference_cache(paths, preset, cache_dir: Path) -> tuple[int, int]:
    """(bytes on disk, voxels of the cached images) of a PersistentDataset cache over ``paths``;
    torch.save keeps a cropped view's whole storage, so its files hold more than 4 bytes per voxel."""
    dataset = persistent_dataset(paths, preset, cache_dir)
    voxels = sum(dataset[i]["image"].numel() for i in range(len(dataset)))  # each computed and written
    return folder_bytes(cache_dir), voxels


def _reference_crops(preset):
    from monai.transforms import Randomizable

    class ReferenceCrops(Randomizable):
        """One volume's random patch, bases and targets, cut one crop at a time as the reference does."""

        def randomize(self, data=None):
            self.rng = np.random.default_rng(int(self.R.randint(2**31)))

        def __call__(self, data):
            self.randomize()
            layout = baseline_layout(self.rng, data["image"].shape[1:], preset)
            crops, labels = baseline_crops([data["image"]], preset, [layout])
            return {"crops": crops[0], "labels": labels[0], "seed": int(self.rng.integers(2**62))}

    return ReferenceCrops()


class ReferenceDataPath(Engine):
    """The engine's network, loss and EMA fed by the reference's DataLoader; ``waits`` per step."""

    name = "reference"

    def __init__(self, paths, cache_dir, workers, preset, backbone, batch_size, device, total_steps):
        from monai.data import DataLoader

        super().__init__(preset, backbone, [], batch_size, device, total_steps)
        dataset = persistent_dataset(paths, preset, cache_dir, _reference_crops(preset))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                            generator=torch.Generator().manual_seed(SEED))
        self.batches = self._cycle(loader)
        self.waits = []

    @staticmethod
    def _cycle(loader):
        while True:
            yield from loader

    def data(self, step):
        start = time.perf_counter()
        batch = next(self.batches)
        self.waits.append(time.perf_counter() - start)
        keep = self.keep_mask([torch.Generator().manual_seed(int(s)) for s in batch["seed"]])
        return (batch["crops"].to(self.device, non_blocking=True), batch["labels"].to(self.device, non_blocking=True),
                keep)


# --- the sections ---------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.train = ["--preset", args.preset, "--backbone", args.backbone, "--seed", SEED, "--batch-size",
                      args.batch_size, "--device", "cpu"]
        self.folders, self.stores, self.preprocess_runs = {}, {}, {}

    def folder(self, n: int) -> Path:
        if n not in self.folders:
            self.folders[n] = self.work / f"ct{n}"
            make_volumes(self.folders[n], n)
        return self.folders[n]

    def store(self, n: int) -> Path:
        if n not in self.stores:
            self.stores[n] = self.work / f"store{n}"
            self.preprocess_runs[n] = Run("preprocess", "--data", self.folder(n), "--out", self.stores[n], "--preset",
                                          self.args.preset, "--workers", self.args.preprocess_workers)
            index = json.loads((self.stores[n] / "index.json").read_text())
            kinds = sorted({f"{e['status']} {e.get('modality')}" for e in index})
            print(f"store of N={n}: {len(index)} volumes ({', '.join(kinds)}), {_mb(folder_bytes(self.stores[n]))}")
        return self.stores[n]

    def pretrain(self, data: Path, name: str, steps: int, *extra) -> Run:
        return Run("pretrain", "--data", data, "--out", self.work / "runs" / name, *self.train, "--steps", steps,
                   "--checkpoint-every", steps, *extra)

    def memory(self) -> None:
        args = self.args
        print(f"== memory: peak of the process tree, {args.steps} steps, store path with --workers {args.workers} ==")
        rows = {}
        for n in args.counts:
            memory = self.pretrain(self.folder(n), f"mem-folder-{n}", args.steps)
            store = self.pretrain(self.store(n), f"mem-store-{n}", args.steps, "--workers", args.workers)
            prep = self.preprocess_runs[n]
            rows[n] = (memory.memory, store.memory)
            for label, run in (("in memory", memory), ("store", store), ("preprocess", prep)):
                print(f"N={n:4d} {label:>10}: peak {run.memory}; {run.seconds:.1f} s")
        first = args.counts[0]
        for n in args.counts[1:]:
            (m, s), (m0, s0) = rows[n], rows[first]
            print(f"peak(N={n}) / peak(N={first}): in memory {_ratios(m, m0)}; store {_ratios(s, s0)}")
        last = args.counts[-1]
        print(f"store / in memory at N={last}: {_ratios(*rows[last][::-1])}")

    def size(self) -> None:
        print("== size: store folder vs MONAI PersistentDataset cache_dir (official v2 prefix) ==")
        preset = resolve_preset(self.args.preset)
        for n in self.args.counts:
            paths = sorted(self.folder(n).glob("*.nii.gz"))
            source = sum(p.stat().st_size for p in paths)
            start = time.perf_counter()
            cache, voxels = reference_cache(paths, preset, self.work / f"cache{n}")
            seconds = time.perf_counter() - start
            store = folder_bytes(self.store(n))
            print(f"N={n:4d}: sources {_mb(source)}, PersistentDataset cache {_mb(cache)} ({seconds:.1f} s), "
                  f"store {_mb(store)} (preprocess {self.preprocess_runs[n].seconds:.1f} s); "
                  f"store / cache {store / cache:.3f} (goal <= 0.125); bytes per cached voxel: cache "
                  f"{cache / voxels:.2f}, store {store / voxels:.2f}")

    def speed(self) -> None:
        args = self.args
        n, steps = args.speed_volumes, args.warmup + args.speed_steps
        print(f"== speed: N={n}, {args.speed_steps} timed steps after {args.warmup}, {args.rounds} rounds ==")
        sides = {"in memory": (self.folder(n), ()), "store W=1": (self.store(n), ("--workers", 1)),
                 "store W=2": (self.store(n), ("--workers", 2))}
        figures = {name: [] for name in sides}
        for r in range(args.rounds):
            for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                data, extra = sides[name]
                figures[name].append(self.pretrain(data, f"speed-{r}-{name[-3:]}", steps, *extra).speed(args.warmup))
        base = figures["in memory"]
        for name, runs in figures.items():
            rates = " ".join(f"{f['steps_per_s']:.3f}" for f in runs)
            ratios = " ".join(f"{f['steps_per_s'] / b['steps_per_s']:.2f}" for f, b in zip(runs, base))
            waits = [f["wait_s"] for f in runs if f["wait_s"] is not None]
            wait = f"; data wait {statistics.median(waits) * 1e3:.0f} ms/step" if waits else ""
            print(f"{name:>10}: steps/s per round {rates}; / in memory per round {ratios}{wait}")
        for name in list(figures)[1:]:
            ratio = statistics.median(f["steps_per_s"] for f in figures[name]) / statistics.median(
                f["steps_per_s"] for f in base)
            print(f"{name} / in memory (medians): {ratio:.2f} (goal >= 0.9)")

    def reference(self) -> None:
        args = self.args
        device = torch.device(args.device)
        backbone = args.reference_backbone or ("swinunetr-b" if device.type == "cuda" else args.backbone)
        n, steps = args.speed_volumes, args.warmup + args.speed_steps
        preset = resolve_preset(args.preset)
        print(f"== reference data path vs store on {device.type}: {backbone}, N={n}, {args.speed_steps} timed steps, "
              f"{args.workers} workers ==")
        paths = sorted(self.folder(n).glob("*.nii.gz"))
        reference = ReferenceDataPath(paths, self.work / f"cache{n}", args.workers, preset, backbone,
                                      args.batch_size, device, steps)
        times = [reference.step(step) for step in range(steps)][args.warmup:]
        ref_rate = len(times) / sum(sum(t.values()) for t in times)
        wait = statistics.median(reference.waits[args.warmup:])
        del reference
        ours = Run("pretrain", "--data", self.store(n), "--out", self.work / "runs" / f"ours-{device.type}",
                   "--preset", args.preset, "--backbone", backbone, "--seed", SEED, "--batch-size", args.batch_size,
                   "--device", args.device, "--steps", steps, "--checkpoint-every", steps, "--workers", args.workers)
        mine = ours.speed(args.warmup)
        my_wait = f", data wait {mine['wait_s'] * 1e3:.0f} ms/step" if mine["wait_s"] is not None else ""
        print(f"reference: {ref_rate:.3f} steps/s, waits {wait * 1e3:.0f} ms/step for data (median)")
        print(f"    store: {mine['steps_per_s']:.3f} steps/s{my_wait}")
        print(f"store / reference: {mine['steps_per_s'] / ref_rate:.2f}x (goal on a GPU >= 3; {device.type})")


SECTIONS = ("memory", "size", "speed", "reference")


def _counts(text: str) -> list[int]:
    counts = [int(c) for c in text.split(",")]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected counts like 3,24,200, got {text!r}")
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=_counts, default=[3, 24, 200], help="numbers of volumes (default 3,24,200)")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated among {','.join(SECTIONS)} (default: all but reference on CPU, all on CUDA)")
    parser.add_argument("--preset", default="demo", choices=list(PRESETS))
    parser.add_argument("--backbone", default="swinunetr-tiny")
    parser.add_argument("--steps", type=int, default=5, help="pretraining steps of the memory runs")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the store path")
    parser.add_argument("--preprocess-workers", type=int, default=2)
    parser.add_argument("--speed-volumes", type=int, default=24)
    parser.add_argument("--speed-steps", type=int, default=8, help="timed steps per speed run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps of each speed run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the speed runs")
    parser.add_argument("--device", default="cpu", help="device of the reference section")
    parser.add_argument("--reference-backbone", help="default: swinunetr-b on CUDA, --backbone on CPU")
    parser.add_argument("--work", help="a new folder for volumes, stores, caches and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    sections = (args.sections.split(",") if args.sections else
                list(SECTIONS) if args.device.startswith("cuda") else list(SECTIONS[:3]))
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    print(f"volumes: distinct CTs from {SOURCE} ({fetch(SOURCE)}); preset {args.preset}, {args.backbone}, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs, torch {torch.__version__}; engine {ENGINE_ROOT}")
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        bench = Bench(args, Path(args.work) if args.work else Path(tmp))
        started = time.perf_counter()
        for section in sections:
            getattr(bench, section)()
            print(f"({section} done at {time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
