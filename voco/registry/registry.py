"""The model registry, the model cache, and how a model named on the command line is found.

Registry (``$VOCO_REGISTRY``, else the extension's ``Resources/models.json``)::

    {"format": "voco-registry", "format_version": 1, "models": [entry, ...]}

An entry: ``name``, ``version``, ``kind`` ("backbone": pretrained weights for ``voco finetune
--init``; "segmentation": a model for ``voco segment``, distributed as a .zip of a package folder
or as a published checkpoint such as VoComni_B.pt), ``url``, ``sha256`` (null: the server's
X-Linked-Etag or ``--sha256`` decides), ``size_bytes``, ``file``, ``architecture``,
``in_channels``, ``preprocessing`` (the fields of ``package.Preprocessing``; modality "ct" is the
CT window -175..250 HU scaled to [0, 1]), ``labels`` (those of ``package.Label``, or the name of
one of the registry's ``label_sets``), ``metrics``, ``description``, ``citation``, ``license``.
A segmentation checkpoint carries no card, so its entry must give labels and preprocessing: at
install the engine checks the file holds that network and writes the card beside it.
A name may be listed in several versions; the last one listed is the current one.

Cache (``$VOCO_MODELS_DIR``, else ``~/.cache/voco/models``)::

    <name>/<version>/entry.json   the entry, plus the verified sha256, where that came from, the
                                  source (URL or imported path), the installed size, and
                                  ``verified`` (false, with ``unverified_reason``, when only the
                                  server's own X-Linked-Etag named the sha256)
    <name>/<version>/<file>       a backbone, or
    <name>/<version>/model.json + weights.pt   a model package (or + the published checkpoint)
    .partial/<file>.part(.json)   an unfinished download and the sha256 it must have

A model folder is assembled beside the cache's entries and appears in one rename, so a folder with
an ``entry.json`` is complete: a failed, interrupted or wrong download never looks installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from ..checkpoints.files import replace_folder, sha256_of
from ..errors import VocoInputError
from ..models.architectures import BACKBONES
from .package import (CARD_NAME, WEIGHTS_NAME, Label, ModelCard, ModelPackage, Preprocessing, published_state_dict,
                      read_package)

FORMAT = "voco-registry"
KINDS = ("backbone", "segmentation")
ENTRY_NAME = "entry.json"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
REQUIRED = ("name", "version", "kind", "url", "file", "architecture", "in_channels")
OPTIONAL = {"sha256": None, "size_bytes": None, "preprocessing": None, "labels": [], "metrics": {},
            "description": "", "citation": None, "license": None}
# Names and versions become folder names, and files are joined to folders: no separators, no "..".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
SERVER_SHA256 = "X-Linked-Etag"  # the sha256_source of a download that only its own server vouched for


def registry_path() -> Path:
    default = Path(__file__).resolve().parents[2] / "Resources" / "models.json"
    return Path(os.environ.get("VOCO_REGISTRY") or default)


def models_dir() -> Path:
    return Path(os.environ.get("VOCO_MODELS_DIR") or Path.home() / ".cache" / "voco" / "models")


def registry_entries() -> list[dict]:
    """The registry's entries, checked, with absent optional fields filled in."""
    path = registry_path()
    if not path.is_file():
        if os.environ.get("VOCO_REGISTRY"):
            raise VocoInputError("model registry does not exist (set by VOCO_REGISTRY)", path)
        return []  # an engine installed without the extension's Resources: imported models only
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VocoInputError(f"invalid JSON: {exc}", path) from None
    if not isinstance(values, dict) or values.get("format") != FORMAT or not isinstance(values.get("models"), list):
        raise VocoInputError(f"not a {FORMAT} file with a list of models", path)
    label_sets = values.get("label_sets") or {}
    entries = [{**OPTIONAL, **_with_labels(entry, label_sets, index, path)} for index, entry in enumerate(values["models"])]
    return [_checked_entry(entry, index, path) for index, entry in enumerate(entries)]


def _with_labels(entry, label_sets: dict, index: int, path: Path):
    """``entry`` with a label set's name replaced by its labels."""
    if isinstance(entry, dict) and isinstance(entry.get("labels"), str):
        if not isinstance(label_sets.get(entry["labels"]), list):
            raise VocoInputError(f"model {index} ({entry.get('name', '?')}): no label set {entry['labels']!r}", path)
        return {**entry, "labels": label_sets[entry["labels"]]}
    return entry


def is_checkpoint_model(entry: dict) -> bool:
    """A segmentation model distributed as a published checkpoint, not as a package .zip."""
    return entry["kind"] == "segmentation" and str(entry["file"]).lower().endswith(CHECKPOINT_SUFFIXES)


def _checked_entry(entry, index: int, path: Path) -> dict:
    if not isinstance(entry, dict):
        raise VocoInputError(f"model {index} is not an object", path)
    missing = [key for key in REQUIRED if key not in entry]
    problems = [
        (missing, f"lacks {', '.join(missing)}"),
        (entry.get("kind") not in KINDS, f"kind must be one of {', '.join(KINDS)}"),
        (not all(isinstance(entry.get(k), str) and _NAME.fullmatch(entry[k]) for k in ("name", "version", "file")),
         "name, version and file must be plain names (letters, digits, . _ + -)"),
        (entry.get("sha256") is not None and not _SHA256.fullmatch(str(entry["sha256"])),
         "sha256 must be null or 64 lowercase hex digits"),
        (entry.get("architecture") not in BACKBONES, f"architecture must be one of {', '.join(BACKBONES)}"),
        (entry.get("kind") == "segmentation" and not str(entry.get("file")).lower().endswith((".zip", *CHECKPOINT_SUFFIXES)),
         f"a segmentation model is distributed as a .zip of its package folder or a checkpoint "
         f"({', '.join(CHECKPOINT_SUFFIXES)})"),
        (entry.get("kind") == "segmentation" and str(entry.get("file")).lower().endswith(CHECKPOINT_SUFFIXES)
         and not (entry.get("labels") and entry.get("preprocessing")),
         "a segmentation checkpoint has no model card: its entry must give labels and preprocessing"),
    ]
    for failed, message in problems:
        if failed:
            raise VocoInputError(f"model {index} ({entry.get('name', '?')}): {message}", path)
    return entry


def registry_entry(name: str, version: str | None = None) -> dict:
    """The registry entry of ``name``: ``version``, or the current one."""
    entries = [entry for entry in registry_entries() if entry["name"] == name]
    if not entries:
        raise _unknown_model(name, registry_only=True)
    if version is None:
        return entries[-1]
    for entry in entries:
        if entry["version"] == version:
            return entry
    raise VocoInputError(f"model {name} has no version {version}; it has {', '.join(e['version'] for e in entries)}")


def _unknown_model(spec: str, registry_only: bool = False) -> VocoInputError:
    names = dict.fromkeys(entry["name"] for entry in registry_entries())
    if not registry_only:
        names.update(dict.fromkeys(record["name"] for record in installed_models()))
    what = "a known model" if registry_only else "an existing file or folder, nor a known model"
    return VocoInputError(f"'{spec}' is not {what}; known models: {', '.join(names) or 'none'} (see voco models list)")


# --- the cache -------------------------------------------------------------------------------

def installed_path(record: dict) -> Path:
    """The file of an installed backbone, the folder of an installed package."""
    folder = models_dir() / record["name"] / record["version"]
    return folder / record["file"] if record["kind"] == "backbone" else folder


def installed_record(name: str, version: str) -> dict | None:
    """The entry.json of an installed model, or None when it is absent or its file has lost bytes.

    Checksums are verified at install; this check is by size only, so that finding a 3 GB model
    does not read it."""
    try:
        record = json.loads((models_dir() / name / version / ENTRY_NAME).read_text(encoding="utf-8"))
        main = installed_path(record)
        main = main if record["kind"] == "backbone" else main / record.get("weights_file", WEIGHTS_NAME)
        return record if main.is_file() and main.stat().st_size == record["installed_bytes"] else None
    except (OSError, ValueError, KeyError, TypeError):  # absent, half-deleted or hand-edited
        return None


def installed_models() -> list[dict]:
    records = (installed_record(path.parent.parent.name, path.parent.name)
               for path in sorted(models_dir().glob(f"[!.]*/[!.]*/{ENTRY_NAME}")))
    return [record for record in records if record is not None]


def list_models() -> list[dict]:
    """Registry entries and installed models (imported ones too), each with ``installed`` and ``path``."""
    installed = {(record["name"], record["version"]): record for record in installed_models()}
    rows = []
    for entry in registry_entries():
        record = installed.pop((entry["name"], entry["version"]), None)
        rows.append(_row(record or entry, record is not None))
    return rows + [_row(record, True) for record in installed.values()]


def _row(values: dict, installed: bool) -> dict:
    """``values`` with ``installed``, ``path`` and ``verified``: for an installed model whether its
    sha256 was one the server did not choose (records written before that field say so by their
    ``sha256_source``), for one not installed whether a download would be checked that way."""
    if installed:
        verified = values.get("verified", values.get("sha256_source") != SERVER_SHA256)
    else:
        verified = values["sha256"] is not None
    return {**values, "installed": installed, "path": str(installed_path(values)) if installed else None,
            "verified": verified}


def describe_models(rows: list[dict]) -> str:
    columns = ("name", "version", "kind", "architecture", "size", "checked", "installed")
    table = [columns] + [(row["name"], row["version"], row["kind"], row["architecture"],
                          _size(row.get("installed_bytes") or row.get("size_bytes")),
                          "sha256" if row["verified"] else "unverified",
                          row["path"] if row["installed"] else "no") for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1] for line in table]
    return "\n".join(lines + [f"cache: {models_dir()}   registry: {registry_path()}"])


def _size(count: int | None) -> str:
    return "?" if count is None else f"{count / 1e6:.1f} MB"


# --- installing ------------------------------------------------------------------------------

def download(name: str, reporter, sha256: str | None = None, version: str | None = None) -> Path:
    """Download registry model ``name`` into the cache (nothing to do when it is installed) and
    return its installed path: the backbone file or the package folder."""
    entry = registry_entry(name, version)
    sha256 = sha256.lower() if sha256 else None
    if entry["sha256"] and sha256 and sha256 != entry["sha256"]:
        raise VocoInputError(f"--sha256 {sha256} contradicts the registry's {entry['sha256']} for {name}")
    expected = entry["sha256"] or sha256
    record = installed_record(entry["name"], entry["version"])
    if record and expected in (None, record["sha256"]):
        return installed_path(record)
    from .download import fetch  # http.client and urllib: not for listing models

    part = models_dir() / ".partial" / f"{entry['file']}.part"
    digest = fetch(entry["url"], part, name, reporter, expected, size=entry["size_bytes"])
    source = "registry" if entry["sha256"] else "--sha256" if sha256 else SERVER_SHA256
    record = {**entry, "sha256": digest, "source": entry["url"], "sha256_source": source, **_verification(source)}
    try:
        if entry["kind"] == "backbone" or is_checkpoint_model(entry):
            return _install(record, part, move=True)
        with _unzipped(part, shown_as=entry["url"]) as package:
            return _install(record, package.folder, move=True)
    finally:
        part.unlink(missing_ok=True)  # verified but not installable (a bad package): not worth keeping


def _verification(sha256_source: str) -> dict:
    """``verified``: whether the bytes match a sha256 the server that sent them did not choose."""
    if sha256_source != SERVER_SHA256:
        return {"verified": True}
    return {"verified": False, "unverified_reason": "no published sha256 (the registry lists none and none was "
                                                    "given with --sha256): only the server's own X-Linked-Etag "
                                                    "vouches for these bytes"}


def import_model(path: str | Path, reporter, name: str | None = None) -> Path:
    """Install a local model package folder, package .zip or checkpoint file (offline sites) and
    return its installed path.

    A file whose sha256 or file name matches a registry entry is installed as that entry (checked
    against the registry's sha256 when it lists one); ``name`` picks the entry, or names the model."""
    source = Path(path)
    suffix = source.suffix.lower()
    if source.is_dir():
        package = _checked_package(source, source)
        digest = package.card.weights_sha256 or sha256_of(package.weights_path)
        return _install_import(_package_record(package, name, digest), source, reporter)
    if source.is_file() and suffix == ".zip":
        digest = sha256_of(source)
        entry = _registry_match(source, digest, name)
        with _unzipped(source) as package:
            record = _entry_record(entry, digest, source) if entry else _package_record(package, name, digest)
            return _install_import(record, package.folder, reporter, source, move=True)
    if source.is_file() and suffix in CHECKPOINT_SUFFIXES:
        digest = sha256_of(source)
        entry = _registry_match(source, digest, name)
        record = _entry_record(entry, digest, source) if entry else _checkpoint_record(source, name, digest)
        return _install_import(record, source, reporter)
    if source.exists():
        raise VocoInputError("not a model package folder, package .zip or checkpoint "
                             f"({', '.join(CHECKPOINT_SUFFIXES)})", source)
    raise VocoInputError("does not exist", source)


def _install_import(record: dict, content: Path, reporter, source: Path | None = None, move: bool = False) -> Path:
    source = source or content
    installed = installed_record(record["name"], record["version"])
    if installed and installed["sha256"] == record["sha256"]:
        return installed_path(installed)  # the same bytes are there already
    path = _install({**record, "source": str(source.resolve())}, content, move)
    reporter.emit("imported", name=record["name"], version=record["version"], path=str(path))
    return path


def _registry_match(source: Path, digest: str, name: str | None) -> dict | None:
    """The registry entry a local file is: the one with its sha256, else the current one called
    ``name``, or (without a name) the current one with its file name."""
    entries = [entry for entry in registry_entries() if name in (None, entry["name"])]
    same_bytes = [entry for entry in entries if entry["sha256"] == digest]
    same_name = entries if name else [entry for entry in entries if entry["file"] == source.name]
    return (same_bytes or same_name or [None])[-1]


def _entry_record(entry: dict, digest: str, source: Path) -> dict:
    """The record of local file ``source`` installed as registry ``entry``."""
    if entry["sha256"] and entry["sha256"] != digest:
        raise VocoInputError(f"sha256 {digest} differs from the registry's {entry['sha256']} for "
                             f"{entry['name']} {entry['version']}", source)
    is_zip = source.suffix.lower() == ".zip"
    if is_zip != (entry["file"].lower().endswith(".zip")):
        raise VocoInputError(f"registry model {entry['name']} is distributed as {entry['file']}, not as a "
                             f"{'package .zip' if is_zip else 'checkpoint'}", source)
    if not entry["sha256"] and entry["kind"] == "backbone":  # no checksum vouches for it: at least look inside
        from ..checkpoints.layouts import read_weights

        detected = read_weights(source).architecture
        if detected != entry["architecture"]:
            raise VocoInputError(f"holds {detected} weights, but registry model {entry['name']} is "
                                 f"{entry['architecture']}", source)
    return {**entry, "sha256": digest, "sha256_source": "registry" if entry["sha256"] else "computed at import"}


def _checkpoint_record(source: Path, name: str | None, digest: str) -> dict:
    """A bare checkpoint of unknown provenance becomes a backbone of the architecture it holds."""
    from ..checkpoints.layouts import read_weights

    weights = read_weights(source)  # refuses files whose architecture it cannot tell
    return {**OPTIONAL, "name": _plain_name(name or source.stem, source), "version": digest[:12], "kind": "backbone",
            "url": None, "file": _plain_name(source.name, source), "architecture": weights.architecture,
            "in_channels": weights.in_channels, "sha256": digest, "sha256_source": "computed at import",
            "size_bytes": source.stat().st_size, "description": f"imported {source.name} ({weights.layout} layout)"}


def _package_record(package: ModelPackage, name: str | None, digest: str) -> dict:
    card = package.card
    return {**OPTIONAL, "name": _plain_name(name or card.name, package.folder),
            "version": _plain_name(card.version, package.folder), "kind": "segmentation", "url": None, "file": None,
            "architecture": card.architecture, "in_channels": card.in_channels,
            "preprocessing": asdict(card.preprocessing), "labels": [asdict(label) for label in card.labels],
            "metrics": card.metrics, "description": card.description, "sha256": digest,
            "weights_file": card.weights_file, "sha256_source": "computed at import"}


def _plain_name(text: str, source) -> str:
    """``text`` as a folder name: runs of other characters become '-'."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(text)).strip("-.")
    if not name:
        raise VocoInputError(f"cannot make a model name of {text!r}; give one with --name", source)
    return name


def _install(record: dict, content: Path, move: bool = False) -> Path:
    """Put ``content`` (a backbone file or a package folder) into the cache as ``record``'s model,
    in one rename; returns its installed path. ``move``: ``content`` is the cache's own to take."""
    cache = models_dir()
    cache.mkdir(parents=True, exist_ok=True)
    staging = cache / f".install-{uuid.uuid4().hex}"
    try:
        if content.is_dir():
            (os.replace if move else shutil.copytree)(content, staging)
        else:
            staging.mkdir()
            (os.replace if move else shutil.copyfile)(content, staging / record["file"])
            if record["kind"] == "segmentation":
                record = _write_checkpoint_card(record, staging, shown_as=record.get("source") or content)
        main = staging / (record["file"] if record["kind"] == "backbone" else record.get("weights_file", WEIGHTS_NAME))
        record = {**record, "installed_bytes": main.stat().st_size,
                  "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (staging / ENTRY_NAME).write_text(json.dumps(record, indent=1), encoding="utf-8")
        _replace_folder(staging, cache / record["name"] / record["version"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return installed_path(record)


def _write_checkpoint_card(record: dict, folder: Path, shown_as) -> dict:
    """The card of a segmentation model published as a bare checkpoint, written beside it from its
    registry entry, once the file is known to hold that network; returns the record with its
    ``weights_file``."""
    card = ModelCard(name=record["name"], version=record["version"], architecture=record["architecture"],
                     in_channels=record["in_channels"], labels=[Label(**label) for label in record["labels"]],
                     preprocessing=Preprocessing(**record["preprocessing"]), description=record["description"],
                     metrics=record["metrics"], training={"published": record.get("url"), "citation": record["citation"]},
                     weights_sha256=record["sha256"], weights_file=record["file"])
    card.validate(shown_as)
    try:
        published_state_dict(folder / record["file"], card)
    except VocoInputError as exc:
        raise VocoInputError(str(exc).replace(str(folder / record["file"]), str(shown_as))) from None
    (folder / CARD_NAME).write_text(json.dumps(card.to_dict(), indent=1), encoding="utf-8")
    return {**record, "weights_file": record["file"]}


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``, replacing an older copy there (damaged, or other bytes); a
    kill in between leaves the old copy aside, where ``read_package`` still finds it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    replace_folder(new, target)


@contextmanager
def _unzipped(archive: Path, shown_as=None):
    """The checked model package in ``archive``, extracted into a folder of the cache that is
    removed afterwards. Errors name ``shown_as`` (default: the archive)."""
    shown_as = shown_as or archive
    folder = models_dir() / f".unzip-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True)
        _extract(archive, folder, shown_as)
        yield _checked_package(_package_root(folder, shown_as), shown_as)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _extract(archive: Path, folder: Path, shown_as) -> None:
    """Extract ``archive`` into ``folder``, refusing any member that would land outside it."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.namelist():
                parts = PurePosixPath(member.replace("\\", "/")).parts
                if member.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise VocoInputError(f"refused: member {member!r} would be written outside the model folder",
                                         shown_as)
            zipped.extractall(folder)
    except (zipfile.BadZipFile, OSError) as exc:
        raise VocoInputError(f"not a readable .zip: {exc}", shown_as) from None


def _package_root(folder: Path, shown_as) -> Path:
    """The package in an extracted zip: at its top, or in its one top-level folder."""
    if (folder / "model.json").is_file():
        return folder
    entries = [path for path in folder.iterdir() if not path.name.startswith(("__MACOSX", "."))]
    if len(entries) == 1 and (entries[0] / "model.json").is_file():
        return entries[0]
    raise VocoInputError("holds no model package (model.json and weights.pt, at its top or in one folder)", shown_as)


def _checked_package(folder: Path, shown_as) -> ModelPackage:
    """``read_package(verify=True)``, with errors that name ``shown_as`` rather than a temporary folder."""
    try:
        return read_package(folder, verify=True)
    except VocoInputError as exc:
        raise VocoInputError(str(exc).replace(str(folder), str(shown_as))) from None


# --- resolving what the user named -----------------------------------------------------------

def resolve_package(spec: str | Path, reporter) -> ModelPackage:
    """The model package for ``voco segment --model SPEC``: a package folder, a package .zip
    (installed into the cache once), or an installed or registry model of kind segmentation
    (downloaded first if need be)."""
    path = Path(spec)
    if path.is_dir():
        return _checked_package(path, path)
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise VocoInputError("not a model package (a folder with model.json and weights.pt, or its .zip)", path)
        return read_package(import_model(path, reporter))
    entry = _named(str(spec))
    if entry["kind"] == "backbone":
        raise VocoInputError(f"{spec} is a pretrained backbone without a segmentation head; fine-tune it first: "
                             f"voco finetune --init {spec} ...")
    return read_package(_fetched(entry, reporter))


def resolve_weights(spec: str | Path, reporter) -> Path:
    """The starting weights for ``voco finetune --init SPEC``: an existing file or folder as it is,
    else the installed file or package folder of a model of any kind (downloaded first if need be)."""
    path = Path(spec)
    if path.exists():
        return path
    return _fetched(_named(str(spec)), reporter)


def _named(spec: str) -> dict:
    """The current registry entry called ``spec``, else the latest installed model of that name."""
    entries = [entry for entry in registry_entries() if entry["name"] == spec]
    if entries:
        return entries[-1]
    records = sorted((r for r in installed_models() if r["name"] == spec), key=lambda r: r["installed_at"])
    if records:
        return records[-1]
    raise _unknown_model(spec)


def _fetched(entry: dict, reporter) -> Path:
    if installed_record(entry["name"], entry["version"]):
        return installed_path(entry)
    return download(entry["name"], reporter, version=entry["version"])
