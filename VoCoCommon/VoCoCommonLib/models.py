"""The model list both modules offer: registry entries, installed and imported models, fine-tuned
versions, each with what it has been measured to do (VoCoCommonLib.versions says what the
numbers mean and when a version is flagged).

It comes from ``python -m voco models list --progress jsonl`` (``ModelsJob``, in the
background) plus the model packages of fine-tuning runs in the runs workspace
(``<runs>/*/model/model.json``) that have not been imported yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from VoCoCommonLib import events as ev
from VoCoCommonLib.jobs import Job
from VoCoCommonLib.versions import Measure


@dataclass
class ModelEntry:
    name: str
    version: str
    kind: str  # "segmentation" (runs in voco segment) or "backbone" (needs fine-tuning first)
    installed: bool
    path: str | None = None  # installed package folder / backbone file, or a fine-tuning run's package
    architecture: str | None = None
    labels: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    description: str = ""
    source: str = "registry"  # "registry", "installed" (imported/cached only) or "run" (a local fine-tuning run)
    parent_version: str | None = None  # the version it was fine-tuned from (its card's), else the one before it
    size_bytes: int | None = None  # of the download, for a registry model not installed yet
    verified: bool = True  # False: no published sha256 vouches for it (only its server's own checksum)
    unseen: Measure | None = None  # Dice on corrected cases it segmented before training on them (versions.annotate)
    worse: str = ""  # why it is flagged against its parent, or ""
    current: bool = False  # the version segmentation selects and the next fine-tune starts from

    @property
    def usable(self) -> bool:
        """Can segment (a segmentation model); a backbone must be fine-tuned first."""
        return self.kind == "segmentation"

    @property
    def needs_finetuning(self) -> bool:
        return self.kind == "backbone"

    @property
    def validation(self) -> Measure | None:
        """Its card's validation Dice when that was measured on cases held out of its training."""
        if self._card_dice is None or self.metrics.get("on_training_data") is True:
            return None
        cases = self.metrics.get("val_cases")
        return Measure(self._card_dice, len(cases) if isinstance(cases, list) else None)

    @property
    def validation_cases(self) -> list[str]:
        cases = self.metrics.get("val_cases") if isinstance(self.metrics, dict) else None
        return [str(case) for case in cases] if isinstance(cases, list) else []

    @property
    def training_case_dice(self) -> Measure | None:
        """Its card's validation Dice when it was measured on its own training case(s)."""
        if self._card_dice is None or self.metrics.get("on_training_data") is not True:
            return None
        return Measure(self._card_dice, len(self.validation_cases) or None)

    @property
    def _card_dice(self) -> float | None:
        value = self.metrics.get("mean_val_dice") if isinstance(self.metrics, dict) else None
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def measures(self) -> str:
        """What it has been measured to do, e.g. ``Dice on unseen cases 0.812 (n=3), held-out
        validation 0.790 (n=1)``; the Dice on its training cases only when there is nothing else."""
        parts = []
        if self.unseen is not None:
            parts.append(f"Dice on unseen cases {self.unseen.text()}")
        if self.validation is not None:
            parts.append(f"{'held-out ' if self.validation.n else ''}validation Dice {self.validation.text()}")
        if not parts and self.training_case_dice is not None:
            parts.append(f"Dice on its training cases {self.training_case_dice.text()}")
        return ", ".join(parts)

    @property
    def spec(self) -> str:
        """What ``voco segment --model`` / ``voco finetune --init`` are given: the exact version's
        path when it is on disk, else the name (the engine downloads the current version)."""
        return self.path if self.installed and self.path else self.name

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.version

    @property
    def title(self) -> str:
        """One line for the combo box, e.g. ``liver v2 — Dice on unseen cases 0.871 (n=4) — worse than v1: ...``."""
        text = f"{self.name} v{self.version}"
        if self.needs_finetuning:
            text += " — backbone, fine-tune first"
        elif self.measures:
            text += f" — {self.measures}"
        if self.worse:
            text += f" — {self.worse}"
        if not self.installed and self.kind == "segmentation":
            text += " — will download" + (f" {self.size_bytes / 1e6:.0f} MB" if self.size_bytes else "")
        return text + self.trust_note

    @property
    def trust_note(self) -> str:
        """What a title adds for a model no published checksum vouches for."""
        return "" if self.verified else " — unverified: no published sha256"


def finetuned_name(model) -> str:
    """The name the fine-tuned package gets: the same as a segmentation model's (so it becomes its
    next version), ``<backbone>-seg`` for a backbone (a backbone's name and version are taken)."""
    if isinstance(model, ModelEntry):
        return f"{model.name}-seg" if model.needs_finetuning else model.name
    path = Path(str(model))
    card = path / "model.json"
    if card.is_file():
        try:
            return str(json.loads(card.read_text(encoding="utf-8"))["name"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if path.is_file():  # a checkpoint file
        return f"{path.name.split('.')[0]}-seg"
    return str(model)  # a registry name


def entries_from_event(event: dict) -> list[ModelEntry]:
    """The ``models`` event of ``voco models list`` as entries."""
    entries = []
    for row in event.get("models", []):
        from_registry = bool(row.get("url"))
        entries.append(ModelEntry(name=str(row["name"]), version=str(row["version"]), kind=row.get("kind", "segmentation"),
                                  installed=bool(row.get("installed")), path=row.get("path"),
                                  architecture=row.get("architecture"), labels=list(row.get("labels") or []),
                                  metrics=dict(row.get("metrics") or {}), description=row.get("description") or "",
                                  source="registry" if from_registry else "installed",
                                  size_bytes=row.get("size_bytes") if isinstance(row.get("size_bytes"), int) else None,
                                  verified=row.get("verified") is not False))
    return entries


def entries_from_runs(runs_folder) -> list[ModelEntry]:
    """Model packages written by fine-tuning runs in ``runs_folder`` (``<run>/model/model.json``)."""
    entries = []
    folder = Path(runs_folder) if runs_folder else None
    if folder is None or not folder.is_dir():
        return entries
    for card_path in sorted(folder.glob("*/model/model.json")):
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            entries.append(ModelEntry(name=str(card["name"]), version=str(card["version"]), kind="segmentation",
                                      installed=True, path=str(card_path.parent), architecture=card.get("architecture"),
                                      labels=list(card.get("labels") or []), metrics=dict(card.get("metrics") or {}),
                                      description=card.get("description") or "", source="run",
                                      parent_version=card_parent(card)))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a run still writing its first package, or a damaged one
    return entries


def merge_entries(entries: list[ModelEntry], parents: dict | None = None) -> list[ModelEntry]:
    """Drop duplicates (first wins), order by name then version, and fill in each version's parent:
    the one its card says it was fine-tuned from (``parents``: (name, version) -> version), else the
    version before it."""
    unique: dict[tuple[str, str], ModelEntry] = {}
    for entry in entries:
        unique.setdefault(entry.key, entry)
    ordered = sorted(unique.values(), key=lambda e: (e.name.lower(), _version_key(e.version)))
    parents = parents or {}
    previous: dict[str, ModelEntry] = {}
    for entry in ordered:
        before = previous.get(entry.name)
        entry.parent_version = entry.parent_version or parents.get(entry.key) or (before.version if before else None)
        previous[entry.name] = entry
    return ordered


def card_parent(card: dict) -> str | None:
    """The version of the same model a card says it was fine-tuned from, if any."""
    training = card.get("training") if isinstance(card, dict) else None
    parent = training.get("parent") if isinstance(training, dict) else None
    if isinstance(parent, dict) and parent.get("name") == card.get("name") and parent.get("version") is not None:
        return str(parent["version"])
    return None


def installed_parents(models_dir) -> dict[tuple[str, str], str]:
    """(name, version) -> parent version, from the cards of the installed packages
    (``<models>/<name>/<version>/model.json``)."""
    parents = {}
    folder = Path(models_dir) if models_dir else None
    for card_path in sorted(folder.glob("*/*/model.json")) if folder is not None and folder.is_dir() else []:
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            parent = card_parent(card)
            if parent is not None:
                parents[(str(card["name"]), str(card["version"]))] = parent
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged card: the version before it stands in for its parent
    return parents


def _version_key(version: str):
    parts = str(version).replace("-", ".").split(".")
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts]


class ModelsJob(Job):
    """``voco models list`` in the background; ``models()`` is the merged list once it finished."""

    def __init__(self, client, runs_folder=None):
        super().__init__("models", lambda: client.voco(["models", "list"]), status="listing models",
                         load=lambda: (entries_from_runs(runs_folder), installed_parents(client.settings.models_dir)))

    def models(self) -> list[ModelEntry]:
        listed = [e for e in self.events if e.get("event") == ev.MODELS]
        if not self.succeeded or not listed:
            raise RuntimeError(f"could not list models: {self.error or 'no answer from the engine'}")
        from_runs, parents = self.result
        return merge_entries(entries_from_event(listed[-1]) + from_runs, parents)


def latest_version(entries: list[ModelEntry], name: str) -> ModelEntry | None:
    versions = [e for e in entries if e.name == name]
    return versions[-1] if versions else None
