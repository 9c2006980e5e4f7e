"""The demo model a newcomer can make in the page: SwinUNETR-tiny trained from scratch on the grey
and white matter of the MNI152 template that ships in nilearn's wheel (the labels come from the
template's own tissue maps, voco.data.brain_tissue). At 3 mm with 32^3 patches, 60 steps take about
20 s on a 2-core CPU and reach a validation Dice of about 0.85 on that (training) case: a coarse but
real model, so the segmentation workflow shows real anatomy without downloading weights."""

from __future__ import annotations

from pathlib import Path

NAME = "brain-tissue-demo"
STEPS = 60
# voco finetune options beyond the Runs API's own (steps, validation and checkpoint interval, device)
EXTRA_ARGS = ("--batch-size", "2", "--patch-size", "32", "--spacing", "3,3,3")


def demo_dataset(folder) -> Path:
    """dataset.json of the MNI152 brain-tissue case, written once into ``folder``."""
    from voco.data.brain_tissue import write_training_dataset

    dataset = Path(folder) / "dataset.json"
    return dataset if dataset.is_file() else write_training_dataset(folder)
