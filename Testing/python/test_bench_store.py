"""The store benchmark's own measuring parts (Testing/benchmarks/bench_store.py), so that they do not rot:
its volumes are distinct real CTs, and its process-tree memory sees the memory of grandchildren."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from voco.checkpoints.files import sha256_of
from voco.data.volumes import CT_MINIMUM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_store  # noqa: E402


def test_volumes_are_distinct_cts_of_the_sample(tmp_path, shipped):
    paths = bench_store.make_volumes(tmp_path, 4)
    assert len({sha256_of(p) for p in paths}) == 4
    source = nib.load(shipped["spine-ct"])
    for path in paths:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
        assert data.dtype == np.int16 and data.min() < CT_MINIMUM  # told apart from MRI as CT
        assert all(s <= o + 12 for s, o in zip(data.shape, source.shape))
        assert image.header.get_zooms() == source.header.get_zooms()
    again = bench_store.make_volumes(tmp_path / "again", 2)
    assert [sha256_of(p) for p in again] == [sha256_of(p) for p in paths[:2]]  # volume i is the same in every N


def test_tree_memory_sums_the_descendants(tmp_path):
    megabytes = 200
    grandchild = f"b = b'x' * ({megabytes} * 2**20); import time; time.sleep(1.5)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    process = subprocess.Popen([sys.executable, "-c", child])
    memory = bench_store.TreeMemory(process.pid, pss_interval=0.2)
    process.wait(timeout=60)
    memory.stop()
    assert memory.processes == 2
    assert memory.anon >= megabytes * 2**20 and memory.rss >= memory.anon
    assert memory.pss >= megabytes * 2**20
    assert memory.hwm < megabytes * 2**20  # the child's own peak: the bytes are its child's
