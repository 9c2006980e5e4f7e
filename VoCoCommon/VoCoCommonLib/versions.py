"""How well each model version does on cases it never trained on, which version is current, and
which fine-tune did worse than the version it started from.

The numbers, from the most to the least telling:

- **Dice on unseen cases**: when a corrected case is added to the training set, the version that
  made the segmentation is scored against the correction first (``case_score``: Dice per label and
  their mean, on a case that version had never seen). The score is stored with the case in
  dataset.json (``unseen_dice``); a version's figure is the mean over the cases it scored, with
  their number n. A segmentation drawn by hand has no score.
- **Held-out validation Dice**: ``voco finetune`` validates on one case in five, held out of its
  training, once there are two cases or more (its card's ``mean_val_dice`` with
  ``on_training_data`` false, over ``val_cases``). A published model's card gives its publisher's
  validation Dice (n unknown).
- **Dice on its training cases**: with a single case, ``voco finetune`` can only validate on the
  case it trained on; that figure is shown only when there is nothing else, and always says so.

The flag (``worse_than_parent``): a version is flagged when it does worse than the version it
was fine-tuned from (its card's ``training.parent``, else the version before it):

1. once both have scored unseen cases: when its mean Dice on unseen cases is lower than its
   parent's;
2. before it has scored any (right after the import): when its held-out validation Dice is lower
   than what its parent scored on those same validation cases when it first segmented them, or,
   when the parent segmented none of them, than its parent's Dice on unseen cases.

With few cases these are noisy comparisons; n goes with every figure so the user can judge.

The current version of each model (``CurrentVersions``) is the one segmentation selects and the
next fine-tune starts from: the newest, until the user rolls back to an earlier one, and again the
newest once a version newer than those of the roll-back appears (whichever module fine-tuned it).
The choice is kept in the runs workspace (``current-versions.json``), which both modules and VoCo
Studio share, so it outlives the session; rolling back deletes nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCORE_KEY = "unseen_dice"  # in a dataset.json training entry
CURRENT_FILE = "current-versions.json"


@dataclass(frozen=True)
class Measure:
    mean: float
    n: int | None  # cases it is a mean over; None when the card does not say

    def text(self) -> str:
        return f"{self.mean:.3f}" + (f" (n={self.n})" if self.n is not None else "")


def case_score(predicted: np.ndarray, predicted_names: dict, corrected: np.ndarray,
               corrected_names: dict) -> dict | None:
    """Dice per label between a model's output and the corrected labels (the same grid), matched by
    label name, and their mean. Labels of the correction the model does not have, and labels empty
    in both, are left out; None when nothing is left (or the grids differ)."""
    if predicted.shape != corrected.shape:
        return None
    value_of = {name: int(value) for value, name in predicted_names.items()}
    dice = {}
    for value, name in corrected_names.items():
        if name not in value_of:
            continue
        mine, truth = predicted == value_of[name], corrected == int(value)
        total = int(np.count_nonzero(mine)) + int(np.count_nonzero(truth))
        if total:
            dice[name] = 2.0 * int(np.count_nonzero(mine & truth)) / total
    if not dice:
        return None
    return {"dice": dice, "mean_dice": float(np.mean(list(dice.values())))}


def unseen_scores(cases: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """``(model name, version) -> {case id: mean Dice}`` from the training set's cases."""
    scores: dict[tuple[str, str], dict[str, float]] = {}
    for case in cases:
        score = case.get(SCORE_KEY)
        if isinstance(score, dict) and isinstance(score.get("mean_dice"), (int, float)):
            key = (str(score.get("model")), str(score.get("version")))
            scores.setdefault(key, {})[case["case_id"]] = float(score["mean_dice"])
    return scores


def measure_of(values) -> Measure | None:
    values = list(values)
    return Measure(float(np.mean(values)), len(values)) if values else None


def worse_than_parent(entry, parent, scores: dict) -> str:
    """Why ``entry`` is flagged against ``parent`` (the rules of the module docstring), or ""."""
    if parent is None or (entry.unseen is None and entry.validation is None):
        return ""
    if entry.unseen is not None:
        if parent.unseen is not None and entry.unseen.mean < parent.unseen.mean:
            return (f"worse than v{parent.version}: Dice on unseen cases {entry.unseen.mean:.3f} < "
                    f"{parent.unseen.mean:.3f}")
        return ""
    parent_scores = scores.get(parent.key, {})
    same_cases = [parent_scores[case] for case in entry.validation_cases if case in parent_scores]
    reference = measure_of(same_cases) or parent.unseen
    if reference is not None and entry.validation.n is not None and entry.validation.mean < reference.mean:
        where = "on the same cases" if same_cases else "on unseen cases"
        return (f"worse than v{parent.version}: held-out validation Dice {entry.validation.mean:.3f} < "
                f"{reference.mean:.3f} {where}")
    return ""


def annotate(entries: list, cases: list[dict], current: dict) -> None:
    """Fill in each entry's Dice on unseen cases, flag and whether it is current (``current``:
    name -> (the version rolled back to, the newest version then); otherwise, or once a newer
    version is listed, a model's newest version is current). ``entries`` are in ``merge_entries`` order."""
    scores = unseen_scores(cases)
    by_key = {entry.key: entry for entry in entries}
    for entry in entries:
        entry.unseen = measure_of(scores.get(entry.key, {}).values())
    newest = {entry.name: entry.version for entry in entries if entry.usable}
    for entry in entries:
        parent = by_key.get((entry.name, entry.parent_version)) if entry.parent_version else None
        entry.worse = worse_than_parent(entry, parent, scores)
        chosen, newest_then = current.get(entry.name, (None, None))
        listed = {e.version for e in entries if e.name == entry.name and e.usable}
        if chosen not in listed or newest_then != newest.get(entry.name):
            chosen = newest.get(entry.name)
        entry.current = entry.usable and entry.version == chosen


@dataclass
class VersionRow:
    """One row of the versions table, as both front ends show it."""

    spec: str
    name: str
    version: str
    unseen: str       # "0.812 (n=3)" or "—"
    validation: str   # "0.790 (held out, n=1)", "0.950 on its training cases (n=1)", "0.250" or "—"
    note: str         # "current", the flag, or ""
    current: bool
    worse: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def version_row(entry) -> VersionRow:
    unseen = entry.unseen.text() if entry.unseen else "—"
    if entry.validation is not None:
        validation = (f"{entry.validation.mean:.3f} (held out, n={entry.validation.n})" if entry.validation.n
                      else f"{entry.validation.mean:.3f}")
    elif entry.training_case_dice is not None:
        validation = f"{entry.training_case_dice.text()} on its training cases"
    else:
        validation = "—"
    note = "; ".join(text for text in ("current" if entry.current else "", entry.worse) if text)
    return VersionRow(entry.spec, entry.name, entry.version, unseen, validation, note, entry.current, bool(entry.worse))


class CurrentVersions:
    """``{model name: [version rolled back to, newest version then]}`` in
    ``<runs workspace>/current-versions.json``; the last one set is the model a session starts with."""

    def __init__(self, folder):
        self.path = Path(folder) / CURRENT_FILE

    def read(self) -> dict[str, tuple[str, str]]:
        try:
            values = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(values, dict):
            return {}
        return {str(name): (str(pair[0]), str(pair[1])) for name, pair in values.items()
                if isinstance(pair, list) and len(pair) == 2}

    def set(self, name: str, version: str, newest: str) -> None:
        values = {key: list(pair) for key, pair in self.read().items() if key != name}
        values[name] = [version, newest]  # last: the model a new session selects
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        tmp.write_text(json.dumps(values, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)  # a crash leaves the previous choice whole

    def last(self) -> str | None:
        """The model rolled back most recently."""
        return next(reversed(self.read()), None)
