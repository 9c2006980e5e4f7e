"""``voco preprocess``: bring volumes into a store once (``voco.data.store``), incrementally.

Each source is read, preprocessed as the preset asks and encoded by a worker process, which
writes its volume file itself (atomically); the main process keeps the index and rewrites it
after every volume, so a killed run loses at most the volumes in progress and a rerun goes on
from there. A source whose size and mtime match the index is not read again; one whose stat
changed is hashed, and only new content is preprocessed again. Sources no longer given leave
the index, and their files the store. An unusable volume is listed as skipped with its reason.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from ..errors import VocoInputError
from ..jobs.quiet_monai import quiet_monai
from .store import INDEX_NAME, PLAN_NAME, VOLUME_SUFFIX, plan_for, read_json, write_json, write_volume
from .volumes import load_volume

_HASH_BLOCK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def volume_key(source: Path) -> str:
    """The store's file name for a source: stable across runs, distinct for distinct paths."""
    return hashlib.sha256(str(source).encode()).hexdigest()[:16] + VOLUME_SUFFIX


def prepare_volume(source: str, preprocessing, folder: str, known_sha: str | None) -> dict:
    """One source into the store: its index entry (``unchanged`` if its content hashes to
    ``known_sha``). Runs in a worker process."""
    path = Path(source)
    stat = path.stat()
    entry = {"source": source, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": None,
             "key": volume_key(path)}
    try:
        entry["sha256"] = file_sha256(path)
    except OSError as error:
        return {**entry, "status": "skipped", "reason": f"{source}: cannot be read ({error.strerror})"}
    if entry["sha256"] == known_sha:
        return {**entry, "status": "unchanged"}
    try:
        volume = load_volume(path, preprocessing)
    except VocoInputError as error:
        return {**entry, "status": "skipped", "reason": str(error)}
    write_volume(Path(folder) / entry["key"], volume.image.numpy(), volume.modality)
    return {**entry, "status": "ok", "shape": list(volume.image.shape), "affine": volume.affine.tolist(),
            "source_affine": volume.source_affine.tolist(), "source_shape": list(volume.source_shape),
            "modality": volume.modality}


def _stat_matches(entry: dict, path: Path) -> bool:
    stat = path.stat()
    return entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns


def _settle_plan(folder: Path, plan: dict) -> None:
    """Write the plan of a new store; refuse to add to one made with other preprocessing."""
    if not (folder / PLAN_NAME).is_file():
        write_json(folder / PLAN_NAME, plan)
        return
    have = read_json(folder / PLAN_NAME, PLAN_NAME)
    if have.get("preprocessing") != plan["preprocessing"] or have.get("format_version") != plan["format_version"]:
        raise VocoInputError(f"the store was made with other preprocessing ({have.get('preprocessing')}); "
                             "use another --out for this one", folder)


def preprocess_store(sources: list[Path], folder, preprocessing, reporter, workers: int = 1) -> dict:
    """Bring ``folder`` up to date with ``sources``; returns the counts of the ``done`` event.
    The caller holds the folder's run lock."""
    folder = Path(folder)
    sources = [Path(s).resolve() for s in sources]
    given = {str(s) for s in sources}
    _settle_plan(folder, plan_for(preprocessing))
    known = {e["source"]: e for e in (read_json(folder / INDEX_NAME, INDEX_NAME)
                                      if (folder / INDEX_NAME).is_file() else [])}

    def intact(entry: dict) -> bool:  # a stored volume's file may have been deleted since
        return entry["status"] != "ok" or (folder / entry["key"]).is_file()

    entries = {str(s): known[str(s)] for s in sources
               if str(s) in known and intact(known[str(s)]) and _stat_matches(known[str(s)], s)}
    counts = {"ok": 0, "skipped": 0, "unchanged": len(entries), "removed": 0}
    for source, entry in known.items():  # no longer given: out of the store
        if source not in given:
            (folder / entry["key"]).unlink(missing_ok=True)
            counts["removed"] += 1
    todo = [str(s) for s in sources if str(s) not in entries]

    def save_index():
        write_json(folder / INDEX_NAME, [entries[str(s)] for s in sources if str(s) in entries])

    def record(entry: dict):
        if entry["status"] == "unchanged":
            previous = known[entry["source"]]
            entry = {**previous, "size": entry["size"], "mtime_ns": entry["mtime_ns"]}
            counts["unchanged"] += 1
        else:
            counts[entry["status"]] += 1
            if entry["status"] == "skipped":
                reporter.emit("warning", message=entry["reason"], file=entry["source"])
        entries[entry["source"]] = entry
        save_index()
        reporter.emit("progress", stage="preprocess", done=len(entries), total=len(sources))

    save_index()  # removed sources leave the index before any work
    for_source = {s: known[s]["sha256"] if s in known and intact(known[s]) else None for s in todo}
    if workers <= 1 or len(todo) <= 1:
        for source in todo:
            record(prepare_volume(source, preprocessing, str(folder), for_source[source]))
    else:
        # spawn: a fork of a process that has loaded torch may deadlock in its thread pools
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=quiet_monai) as pool:
            pending = {pool.submit(prepare_volume, s, preprocessing, str(folder), for_source[s]) for s in todo}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    record(future.result())
    stored = [e for e in entries.values() if e["status"] == "ok"]
    if not stored:
        raise VocoInputError(f"none of the {len(sources)} images could be used", folder)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {**counts, "volumes": len(stored), "store_bytes": size, "store": str(folder)}
