"""What the Slicer-side tests need from the engine, run in the engine's interpreter (the tests
themselves run where torch may not be installed, as Slicer's own Python is before set-up).

``ENGINE_PYTHON engine_side.py package FOLDER NAME LABELS_JSON [METRICS_JSON]``: a tiny SwinUNETR
model package with random weights (seed 0); ``... toy FOLDER``: a package and a ``site`` folder
whose sitecustomize replaces the network, inside the engine process, by toy_networks.Threshold,
a 1x1 convolution that thresholds the intensity (``VOCO_TEST_TOY=1``; ``VOCO_TEST_SLOW=1``: a
second per window), so the right segmentation is known; ``... sample NAME``: the path of a shipped sample volume;
``... vocomni FOLDER``: VoComni_B.pt written in the published layout (published_files.py) and
the shipped registry pinned to its sha256 (FOLDER/models.json); prints the checkpoint's path;
``... omni FOLDER URL``: a tiny segmentation checkpoint in the VoComni layout (FOLDER/omni.pt) and
a registry (FOLDER/models.json) whose model "omni" downloads it from URL/omni.pt;
``... read IMAGE``: what the engine reads in an image file (shape, affine, voxel sum, dtype);
``... write-nrrd PATH``: a label map written by the engine's own NRRD writer (pynrrd).
"""

import json
import sys
from pathlib import Path

TOY_SITE = """
import os, sys
if os.environ.get("VOCO_TEST_TOY"):
    sys.path.insert(0, {testing!r})
    import voco.inference.segment as segment_module
    from toy_networks import Threshold

    slow = 1.0 if os.environ.get("VOCO_TEST_SLOW") else 0.0
    segment_module.load_network = lambda package, device: Threshold(slow).to(device).eval()
"""


def card(name, labels, metrics):
    from voco.registry.package import Label, ModelCard, Preprocessing

    return ModelCard(name=name, version="1", architecture="swinunetr-tiny", in_channels=1,
                     labels=[Label(**label) for label in labels],
                     preprocessing=Preprocessing("mri", (2.0, 2.0, 2.0), (32, 32, 32)), metrics=metrics)


def package(folder, name, labels, metrics=None):
    import torch

    from voco.models.segmentation import build_segmentation_network
    from voco.registry.package import write_package

    torch.manual_seed(0)
    network = build_segmentation_network("swinunetr-tiny", 1, len(labels) + 1)
    return write_package(folder, card(name, labels, metrics or {}), network.state_dict()).folder


def toy(folder):
    import torch

    from voco.registry.package import write_package

    folder = Path(folder)
    (folder / "site").mkdir(parents=True, exist_ok=True)
    (folder / "site" / "sitecustomize.py").write_text(TOY_SITE.format(testing=str(Path(__file__).resolve().parents[1])))
    labels = [{"value": 3, "name": "sphere", "color": "#ff0000"}]
    return write_package(folder / "package", card("sphere-model", labels, {}), {"w": torch.zeros(1)}).folder


def main(argv):
    command = argv[1]
    if command == "package":
        print(package(argv[2], argv[3], json.loads(argv[4]), json.loads(argv[5]) if len(argv) > 5 else None))
    elif command == "toy":
        print(toy(argv[2]))
    elif command == "vocomni":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from published_files import registry_for, write_vocomni_checkpoint

        folder = Path(argv[2])
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint = write_vocomni_checkpoint(folder / "VoComni_B.pt")
        registry_for(folder, {checkpoint.name: checkpoint})
        print(checkpoint)
    elif command == "omni":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from published_files import sha256_of, write_vocomni_checkpoint

        folder = Path(argv[2])
        checkpoint = write_vocomni_checkpoint(folder / "omni.pt", "swinunetr-tiny", classes=2)
        entry = {"name": "omni", "version": "1.0", "kind": "segmentation", "url": f"{argv[3]}/omni.pt",
                 "sha256": sha256_of(checkpoint), "size_bytes": checkpoint.stat().st_size, "file": "omni.pt",
                 "architecture": "swinunetr-tiny", "in_channels": 1,
                 "labels": [{"value": 1, "name": "sphere", "color": "#ff0000"}],
                 "preprocessing": {"modality": "mri", "spacing": [2.0, 2.0, 2.0], "patch_size": [32, 32, 32]}}
        (folder / "models.json").write_text(json.dumps({"format": "voco-registry", "format_version": 1,
                                                        "models": [entry]}))
        print(checkpoint)
    elif command == "read":
        from voco.data.volumes import read_volume

        image = read_volume(argv[2])
        print(json.dumps({"shape": list(image.shape[1:]), "affine": image.affine.numpy().tolist(),
                          "sum": float(image.numpy().sum()), "dtype": str(image.numpy().dtype)}))
    elif command == "write-nrrd":
        import numpy as np

        from voco.data.label_maps import _write_nrrd

        labels = np.zeros((5, 4, 3), np.uint8)  # I, J, K
        labels[1, 2, 0], labels[4, 3, 2] = 1, 7
        affine = np.array([[0.0, -0.8, 0, 10], [1.2, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
        _write_nrrd(labels, affine, Path(argv[2]), compress=True)
        print(json.dumps({"affine": affine.tolist(), "ones": [1, 2, 0], "sevens": [4, 3, 2]}))
    elif command == "sample":
        from voco.data.sample_data import fetch

        print(fetch(argv[2]))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv)
