"""``voco preprocess``: bring volumes into a store once (``voco.data.store``), incrementally.

Each source is read, preprocessed as the preset asks and encoded by a worker process, which
writes its volume file itself (atomically); the main process keeps the index and rewrites it
after every volume, so a killed run loses at most the volumes in progress and a rerun goes on
from there. A source whose size and mtime match the index is not read again; one whose stat
changed is hashed, and only new content is preprocessed again. Sources no longer given leave
the index, and their files the store. An unusable volume is listed as skipped with its reason.

For fine-tuning (``label_maps`` given) each image comes with its label map: both follow the
same spatial steps, and a change to either file makes the case new.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from ..checkpoints.files import atomic_path
from ..errors import VocoInputError
from ..jobs.quiet_monai import quiet_monai
from .patches import foreground_sample
from .sources import MAX_LABEL_VALUE
from .store import (FOREGROUND_SUFFIX, INDEX_NAME, LABEL_SUFFIX, PLAN_NAME, VOLUME_SUFFIX, plan_for, read_json,
                    write_json, write_label_volume, write_volume)
from .volumes import Volume, load_volume, preprocess_pair, read_label_map, read_volume

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


def label_key(key: str) -> str:
    return key.removesuffix(VOLUME_SUFFIX) + LABEL_SUFFIX


def foreground_key(key: str) -> str:
    return key.removesuffix(VOLUME_SUFFIX) + FOREGROUND_SUFFIX


def stored_files(entry: dict) -> list[str]:
    """The store's files of an index entry."""
    key = entry["key"]
    return [key, label_key(key), foreground_key(key)] if "label" in entry else [key]


def _file_record(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def prepare_volume(source: str, preprocessing, folder: str, known: dict | None, label_source: str | None = None
                   ) -> dict:
    """One source (with ``label_source``, a labelled case) into the store: its index entry,
    ``unchanged`` if its files hash as those of ``known``, its earlier entry. Runs in a worker process."""
    path = Path(source)
    entry = {"source": source, "size": None, "mtime_ns": None, "sha256": None, "key": volume_key(path)}
    try:
        entry.update(_file_record(path))
        if label_source is not None:
            entry["label"] = {"source": label_source, "size": None, "mtime_ns": None, "sha256": None}
            entry["label"].update(_file_record(Path(label_source)))
    except OSError as error:
        return {**entry, "status": "skipped", "reason": f"{error.filename}: cannot be read ({error.strerror})"}
    if known is not None and entry["sha256"] == known["sha256"] and \
            (entry.get("label") or {}).get("sha256") == (known.get("label") or {}).get("sha256"):
        return {**entry, "status": "unchanged"}
    try:
        if label_source is None:
            volume = load_volume(path, preprocessing)
        else:
            volume, extra = _prepare_case(path, Path(label_source), preprocessing, Path(folder) / entry["key"])
            entry.update(extra)
    except VocoInputError as error:
        return {**entry, "status": "skipped", "reason": str(error)}
    write_volume(Path(folder) / entry["key"], volume.image.numpy(), volume.modality)
    return {**entry, "status": "ok", "shape": list(volume.image.shape), "affine": volume.affine.tolist(),
            "source_affine": volume.source_affine.tolist(), "source_shape": list(volume.source_shape),
            "modality": volume.modality}


def _prepare_case(image_path: Path, label_path: Path, preprocessing, image_file: Path) -> tuple[Volume, dict]:
    """A labelled case preprocessed: its label map and foreground sample written beside
    ``image_file``, and what the index says of them (the label values of the whole file, as
    fine-tuning from the source files counts them)."""
    source = read_volume(image_path)
    label = read_label_map(label_path, source)
    values = np.unique(label.as_tensor().numpy()).astype(np.int64)
    if values.max(initial=0) > MAX_LABEL_VALUE:
        raise VocoInputError(f"is not a label map: values must be whole numbers up to {MAX_LABEL_VALUE}", label_path)
    # Taken before preprocessing, which may hand back the very tensor it was given.
    source_affine, source_shape = source.affine.numpy().astype(np.float64), tuple(int(n) for n in source.shape[1:])
    image, label, affine, modality = preprocess_pair(source, label, preprocessing)
    volume = Volume(image_path, image, affine, source_affine, source_shape, modality)
    write_label_volume(image_file.with_name(label_key(image_file.name)), label.numpy())
    foreground = foreground_sample(label[0] != 0).numpy().astype(np.int32)
    with atomic_path(image_file.with_name(foreground_key(image_file.name))) as tmp, open(tmp, "wb") as out:
        np.save(out, foreground)
    return volume, {"label_values": values.tolist(), "foreground_voxels": len(foreground)}


def _stat_matches(entry: dict, path: Path, label_path: Path | None) -> bool:
    def same(record: dict, path: Path) -> bool:
        stat = path.stat()
        return record["size"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns

    if (label_path is None) != ("label" not in entry):
        return False
    try:
        return same(entry, path) and (label_path is None or
                                      (entry["label"]["source"] == str(label_path) and same(entry["label"], label_path)))
    except OSError:  # a label map gone: prepared again, and listed as skipped with its reason
        return False


def _settle_plan(folder: Path, plan: dict) -> None:
    """Write the plan of a new store; refuse to add to one made with other preprocessing or
    for the other kind of training. The label names follow the dataset's latest."""
    if (folder / PLAN_NAME).is_file():
        have = read_json(folder / PLAN_NAME, PLAN_NAME)
        if have.get("preprocessing") != plan["preprocessing"] or have.get("format_version") != plan["format_version"]:
            raise VocoInputError(f"the store was made with other preprocessing ({have.get('preprocessing')}); "
                                 "use another --out for this one", folder)
        if ("label_names" in have) != ("label_names" in plan):
            made = "with" if "label_names" in have else "without"
            raise VocoInputError(f"the store was made {made} --labels; use another --out for this one", folder)
        if have == plan:
            return
    write_json(folder / PLAN_NAME, plan)


def preprocess_store(sources: list[Path], folder, preprocessing, reporter, workers: int = 1,
                     label_maps: list[Path] | None = None, label_names: dict[int, str] | None = None) -> dict:
    """Bring ``folder`` up to date with ``sources`` (with ``label_maps``, one per source, a store
    for fine-tuning whose plan names ``label_names``); returns the counts of the ``done`` event.
    The caller holds the folder's run lock."""
    folder = Path(folder)
    sources = [Path(s).resolve() for s in sources]
    labels_of = {str(s): Path(label).resolve() for s, label in zip(sources, label_maps)} if label_maps else {}
    given = {str(s) for s in sources}
    _settle_plan(folder, plan_for(preprocessing, None if label_maps is None else (label_names or {})))
    known = {e["source"]: e for e in (read_json(folder / INDEX_NAME, INDEX_NAME)
                                      if (folder / INDEX_NAME).is_file() else [])}

    def intact(entry: dict) -> bool:  # a stored volume's files may have been deleted since
        return entry["status"] != "ok" or all((folder / name).is_file() for name in stored_files(entry))

    entries = {str(s): known[str(s)] for s in sources if str(s) in known and intact(known[str(s)])
               and _stat_matches(known[str(s)], s, labels_of.get(str(s)))}
    counts = {"ok": 0, "skipped": 0, "unchanged": len(entries), "removed": 0}
    for source, entry in known.items():  # no longer given: out of the store
        if source not in given:
            for name in stored_files(entry):
                (folder / name).unlink(missing_ok=True)
            counts["removed"] += 1
    todo = [str(s) for s in sources if str(s) not in entries]

    def save_index():
        write_json(folder / INDEX_NAME, [entries[str(s)] for s in sources if str(s) in entries])

    def record(entry: dict):
        if entry["status"] == "unchanged":
            previous = known[entry["source"]]
            entry = {**previous, "size": entry["size"], "mtime_ns": entry["mtime_ns"],
                     **({"label": entry["label"]} if "label" in entry else {})}
            counts["unchanged"] += 1
        else:
            counts[entry["status"]] += 1
            if entry["status"] == "skipped":  # no longer usable: what it had stored goes
                for name in stored_files(entry):
                    (folder / name).unlink(missing_ok=True)
                reporter.emit("warning", message=entry["reason"], file=entry["source"])
        entries[entry["source"]] = entry
        save_index()
        reporter.emit("progress", stage="preprocess", done=len(entries), total=len(sources))

    save_index()  # removed sources leave the index before any work
    jobs = {s: (s, preprocessing, str(folder), known[s] if s in known and intact(known[s]) else None,
                str(labels_of[s]) if s in labels_of else None) for s in todo}
    if workers <= 1 or len(todo) <= 1:
        for source in todo:
            record(prepare_volume(*jobs[source]))
    else:
        # spawn: a fork of a process that has loaded torch may deadlock in its thread pools
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=quiet_monai) as pool:
            pending = {pool.submit(prepare_volume, *jobs[s]) for s in todo}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    record(future.result())
    stored = [e for e in entries.values() if e["status"] == "ok"]
    if not stored:
        raise VocoInputError(f"none of the {len(sources)} images could be used", folder)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {**counts, "volumes": len(stored), "store_bytes": size, "store": str(folder)}
