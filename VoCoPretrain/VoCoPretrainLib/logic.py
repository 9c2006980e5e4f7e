"""PretrainLogic: runs, curves, crop layouts and position predictions for the VoCoPretrain module.

Everything here uses MRML, ``slicer.util``, the standard library, numpy and nibabel only; the
engine is run as a subprocess through the runner factory (``args -> ProcessProtocol``), never
imported, so torch may live in another Python.

Example (Slicer's Python console)::

    from VoCoPretrainLib.logic import PretrainLogic
    logic = PretrainLogic()
    run = logic.start_pretraining([getNode("CTChest")], preset="demo", backbone="swinunetr-tiny", steps=100)
    curves = logic.curves_for(run)          # table + chart nodes, refreshed by logic.update_curves()
    crops = logic.crop_layout(getNode("CTChest"))      # runs `voco crops`, adds ROIs + labelmap
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import slicer

from . import overlays
from .curves import TrainingCurves
from .runs import FINETUNE, PRETRAIN, RunInfo, Runs, default_runner_factory


class EngineError(RuntimeError):
    """A one-shot engine command (crops, positions) failed; the message is the engine's."""


class PretrainLogic:
    def __init__(self, workspace=None, runner_factory: Callable | None = None):
        self.runner_factory = runner_factory or default_runner_factory
        self.runs = Runs(workspace, self.runner_factory)
        self.curves: dict[str, TrainingCurves] = {}    # run folder -> its curves in this scene

    @property
    def workspace(self) -> Path:
        return self.runs.workspace

    # --- data ----------------------------------------------------------------------------------

    def export_volumes(self, volume_nodes: Sequence, folder) -> list[Path]:
        """Write scene volumes as NRRD files (their own grid) for the engine; the file paths."""
        from VoCoSegmentationLib.volumes import write_volume

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, node in enumerate(volume_nodes):
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", node.GetName() or "volume") or "volume"
            paths.append(Path(write_volume(node, folder / f"{i:03d}_{stem}.nrrd")))
        return paths

    def _data_paths(self, data, folder: Path) -> list[str]:
        """Paths as given; volume nodes (anything with GetImageData) exported into ``folder``."""
        items = [data] if isinstance(data, (str, Path)) or hasattr(data, "GetImageData") else list(data)
        nodes = [d for d in items if hasattr(d, "GetImageData")]
        paths = [str(d) for d in items if not hasattr(d, "GetImageData")]
        return paths + [str(p) for p in self.export_volumes(nodes, folder)] if nodes else paths

    # --- jobs ----------------------------------------------------------------------------------

    def start_pretraining(self, data, preset: str = "demo", backbone: str | None = None, steps: int | None = None,
                          name: str | None = None, **options) -> Path:
        """Pretrain on files/folders/dataset.json and/or scene volume nodes (exported into the run's
        ``inputs/``); returns the run folder. ``options``: batch_size, checkpoint_every, device, extra_args."""
        run_dir = self.runs.new_run_dir(name, PRETRAIN)
        paths = self._data_paths(data, run_dir / "inputs")
        return self.runs.start_pretraining(paths, preset, backbone, steps, run_dir=run_dir, **options)

    def start_finetuning(self, dataset, init: str | None = None, name: str | None = None, **options) -> Path:
        """Fine-tune on a dataset.json or a folder with imagesTr/ + labelsTr/ (e.g. the clinician's
        TrainingSet folder); ``init``: a pretraining run folder, checkpoint, model package or name.
        ``options``: backbone, steps, model_name, val_every, checkpoint_every, device, extra_args."""
        init = self.checkpoint_of(init) or init
        return self.runs.start_finetuning(dataset, init=None if init is None else str(init), name=name, **options)

    def stop(self, run) -> bool:
        return self.runs.stop(run)

    def resume(self, run, steps: int | None = None) -> Path:
        return self.runs.resume(run, steps=steps)

    def list_runs(self) -> list[RunInfo]:
        return self.runs.list_runs()

    def info(self, run) -> RunInfo:
        return self.runs.info(run)

    def checkpoint_of(self, run) -> str | None:
        """The checkpoint of a run (a run name / folder / RunInfo); None when ``run`` is no run folder."""
        if run is None:
            return None
        if not isinstance(run, RunInfo):
            path = self.runs._run_dir(run)
            if not (path / "job.json").is_file() and not (path / "config.json").is_file():
                return None
            run = self.runs.info(path)
        return run.checkpoint

    # --- curves --------------------------------------------------------------------------------

    def curves_for(self, run) -> TrainingCurves:
        """The table and chart nodes of a run, built from its files on first use (reopening the
        module rebuilds them from events.jsonl / metrics.jsonl), then fed by ``update_curves``."""
        run_dir = self.runs._run_dir(run)
        key = str(run_dir)
        curves = self.curves.get(key)
        if curves is None or slicer.mrmlScene.GetNodeByID(curves.loss_table.GetID()) is None:
            curves = TrainingCurves(run_dir.name)
            self.curves[key] = curves
            self.runs.rewind(run_dir)
            if not (run_dir / "events.jsonl").is_file():
                curves.load_run(run_dir)     # a run started outside the module: the engine's metrics
        curves.add_events(self.runs.new_events(run_dir))
        return curves

    def update_curves(self) -> dict[str, list[dict]]:
        """Feed every run's new events into its curves (call from the widget's QTimer); the new
        events by run folder, for status lines."""
        new = {}
        for key, curves in list(self.curves.items()):
            events = self.runs.new_events(key)
            curves.add_events(events)
            if events:
                new[key] = events
        return new

    # --- crop layouts and position predictions -------------------------------------------------

    def run_engine(self, args: Sequence[str], timeout: float | None = 600) -> dict:
        """Run a one-shot engine command to the end through the runner; its ``done`` event."""
        runner = self.runner_factory(list(args)).start()
        code = runner.wait(timeout)
        events = runner.poll()
        if code is None:
            runner.cancel()
            raise EngineError(f"voco {args[0]} did not finish within {timeout} s")
        errors = [e.get("message", "") for e in events if e.get("event") == "error"]
        done = [e for e in events if e.get("event") == "done"]
        if code != 0 or not done:
            raise EngineError(errors[-1] if errors else f"voco {args[0]} exited with code {code}")
        return done[-1]

    def _image_path(self, image, folder: Path) -> str:
        if hasattr(image, "GetImageData"):
            return str(self.export_volumes([image], folder)[0])
        return str(image)

    def crop_layout(self, image, out_dir=None, preset: str | None = None, seed: int = 0,
                    prefix: str = "") -> overlays.LayoutNodes:
        """``voco crops`` on a volume node or image file, then its overlays in the scene."""
        out_dir = Path(out_dir or tempfile.mkdtemp(prefix="voco-crops-"))
        args = ["crops", self._image_path(image, out_dir / "input"), "--out", str(out_dir), "--seed", str(seed)]
        if preset:
            args += ["--preset", preset]
        self.run_engine(args)
        return overlays.load_layout(out_dir, prefix)

    def position_predictions(self, image, checkpoint, out_dir=None, seed: int = 0, target: int = 0,
                             device: str | None = None, prefix: str = "") -> overlays.PositionNodes:
        """``voco positions`` for a checkpoint (or a pretraining run folder/name), then its table,
        error-coloured target boxes and heatmap volume."""
        checkpoint = self.checkpoint_of(checkpoint) or checkpoint
        out_dir = Path(out_dir or tempfile.mkdtemp(prefix="voco-positions-"))
        args = ["positions", self._image_path(image, out_dir / "input"), "--checkpoint", str(checkpoint),
                "--out", str(out_dir), "--seed", str(seed), "--target", str(target)]
        if device:
            args += ["--device", device]
        self.run_engine(args)
        return overlays.load_positions(out_dir, prefix)

    load_layout = staticmethod(overlays.load_layout)
    load_positions = staticmethod(overlays.load_positions)


__all__ = ["PretrainLogic", "EngineError", "FINETUNE", "PRETRAIN"]
