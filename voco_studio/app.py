"""VoCo Studio: the VoCoSegmentation and VoCoPretrain workflows in a browser, on Slicer's MRML.

trame-slicer's ``SlicerApp`` holds the scene and the module logics; its remote-rendered slice and
3D views show it. The side panel calls ``SegmentationLogic`` / ``PretrainLogic`` from the
modules' Lib packages unchanged. Long work runs in the engine's own processes (as in Slicer);
``poll_once`` (an asyncio task every ``POLL_S``) moves their state into the shared trame state,
so every browser tab sees the same jobs. Element ids: README_TESTIDS.md.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import numpy as np

from .headless import configure_offscreen_rendering, disable_depth_peeling

ROOT = Path(__file__).resolve().parents[1]
for _module in ("VoCoSegmentation", "VoCoPretrain"):
    if str(ROOT / _module) not in sys.path:
        sys.path.insert(0, str(ROOT / _module))

configure_offscreen_rendering()

import slicer  # noqa: E402
from trame.app import TrameApp  # noqa: E402
from trame.app.file_upload import ClientFile  # noqa: E402
from trame.decorators import change  # noqa: E402
from trame.ui.vuetify3 import SinglePageWithDrawerLayout  # noqa: E402
from trame.widgets import html  # noqa: E402
from trame.widgets import vuetify3 as v  # noqa: E402
from trame_slicer import module as trame_slicer_module  # noqa: E402
from trame_slicer.core import LayoutManager, SlicerApp  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402
from trame_slicer.segmentation import (  # noqa: E402
    SegmentationEffectErase,
    SegmentationEffectNoTool,
    SegmentationEffectPaint,
)
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition  # noqa: E402
from VoCoPretrainLib.logic import PretrainLogic  # noqa: E402
from VoCoSegmentationLib.logic import SegmentationLogic  # noqa: E402
from VoCoSegmentationLib.training_set import TrainingSet  # noqa: E402

from voco.data.sources import image_suffix  # noqa: E402

from .chart import loss_chart_svg, table_columns  # noqa: E402
from . import demo_model  # noqa: E402

POLL_S = 0.5
SAMPLES = ["mni152-t1", "spine-ct"]
TESTID = [("data_testid", "data-testid")]


def tid(name: str, **kwargs) -> dict:
    """``id`` and ``data-testid`` both set to ``name`` (README_TESTIDS.md)."""
    return {"id": name, "__properties": TESTID, "data_testid": name, **kwargs}


def dice_suffix(dice: float | None) -> str:
    """`` (Dice 0.853)`` after a model's name, or nothing when it has no validation Dice."""
    return f" (Dice {dice:.3f})" if dice is not None else ""


def layouts() -> dict:
    red, yellow, green = (ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.sagittal_view(),
                          ViewLayoutDefinition.coronal_view())
    three_d = ViewLayoutDefinition.threed_view()
    return {
        "Four-up": Layout(LayoutDirection.Horizontal, [Layout(LayoutDirection.Vertical, [red, three_d]),
                                                      Layout(LayoutDirection.Vertical, [yellow, green])]),
        "Axial": Layout(LayoutDirection.Vertical, [red]),
        "3D": Layout(LayoutDirection.Vertical, [three_d]),
    }


def install_slicer_globals(slicer_app: SlicerApp) -> None:
    """``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` as in Slicer, for ``slicer.util``
    and the Lib packages."""
    logics = {"colors": slicer_app.color_logic, "volumes": slicer_app.volumes_logic,
              "segmentations": slicer_app.segmentations_logic, "subjecthierarchy": slicer_app.subject_hierarchy_logic,
              "terminologies": slicer_app.terminologies_logic, "data": slicer_app.data_logic}
    slicer.mrmlScene = slicer_app.scene
    slicer.modules = types.SimpleNamespace(
        **{name: types.SimpleNamespace(logic=lambda logic=logic: logic) for name, logic in logics.items()})


def _marker_ui(name: str, default_ui):
    """A view's overlay UI plus a transparent layer over the whole view carrying its test id (trame-slicer's
    view container takes no attributes); the layer's parent holds the view's image."""

    def populate(server, view_id, slicer_view):
        default_ui(server, view_id, slicer_view)
        html.Div(**tid(name), style="position:absolute;inset:0;pointer-events:none")

    return populate


class StudioApp(TrameApp):
    def __init__(self, server=None, workdir=None, data=(), load_default: bool = True, rca_encoder=None):
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.workdir = Path(workdir or Path(tempfile.gettempdir()) / "voco-studio")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_paths = [str(p) for p in data]

        self.slicer_app = SlicerApp()
        install_slicer_globals(self.slicer_app)
        self._register_views(rca_encoder)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(layouts())

        self.segmentation_logic = SegmentationLogic(runs_folder=self.workdir / "finetune-runs")
        self.pretrain_logic = PretrainLogic(workspace=self.workdir / "runs")
        self.training_set = TrainingSet(self.workdir / "training-set")
        self.volume_node = None
        self.segmentation_node = None
        self.jobs: dict[str, dict] = {}      # job id -> {"kind", "job"}
        self.versions: list[dict] = []
        self._poll_task = None
        self._segments_mtime = 0
        self._demo_runs: set[str] = set()  # run folders of demo-model trainings not yet added to the models
        self._runs: list[dict] = []         # the workspace's runs as job rows

        self._init_state()
        self._build_ui()
        self.layout_manager.set_layout(self.state.layout)
        self._fix_threed_views()
        self._refresh_runs()  # runs an earlier session left in the workdir
        if load_default:
            if self.data_paths:
                self.load_path(self.data_paths[0])
            else:
                self.load_sample(SAMPLES[0])
        self.ctrl.on_server_ready.add(self._start_polling)

    # --- setup ---------------------------------------------------------------------------------

    def _register_views(self, rca_encoder) -> None:
        from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui, create_vertical_view_gutter_ui

        def slice_ui_named(server, view_id, slicer_view):
            label = str(view_id).split("_")[-1].lower() if view_id else ""
            for color in ("red", "yellow", "green"):
                if color in str(view_id).lower():
                    label = color
            _marker_ui(f"view-{label}", create_vertical_slice_view_gutter_ui)(server, view_id, slicer_view)

        register_rca_factories(self.slicer_app.view_manager, self.server, rca_encoder=rca_encoder,
                               slice_view_ui_f=slice_ui_named,
                               three_d_view_ui_f=_marker_ui("view-3d", create_vertical_view_gutter_ui))

    def _fix_threed_views(self) -> None:
        for view in self.slicer_app.view_manager.get_threed_views():
            disable_depth_peeling(view.render_window())

    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "VoCo Studio"
        s.layout = "Four-up"
        s.layouts = list(layouts())
        s.tab = "segmentation"
        s.status_text = "Starting"
        s.samples = SAMPLES
        s.sample = SAMPLES[0]
        s.volume_path = self.data_paths[0] if self.data_paths else ""
        s.volume_paths = self.data_paths
        s.volume_name = ""
        s.upload_files = None
        s.model_options = []
        s.model = ""
        s.model_path = ""
        s.devices = [{"value": "auto", "title": "auto"}, {"value": "cpu", "title": "CPU"}]
        s.device = "auto"
        s.device_note = ""
        s.seg_running = False
        s.seg_progress = 0
        s.seg_status = ""
        s.segments = []
        s.segmentation_name = ""
        s.editor_effect = "none"
        s.training_set_count = self.training_set.count
        s.finetune_steps = 20
        s.versions = []
        s.jobs = []
        s.pretrain_runs = []
        s.pretrain_run = ""
        s.pretrain_steps = 20
        s.pretrain_state = "idle"
        s.loss_svg = loss_chart_svg({})
        s.positions = []
        s.positions_columns = []
        s.heatmap_visible = True

    # --- volumes -------------------------------------------------------------------------------

    def _show_volume(self, node, name: str) -> None:
        self.volume_node = node
        self.segmentation_node = None
        self.state.segments = []
        self.state.segmentation_name = ""
        for other in self.slicer_app.scene.GetNodesByClass("vtkMRMLScalarVolumeNode"):
            rendering = self.slicer_app.volume_rendering.get_vr_display_node(other)
            if other is not node and rendering is not None:  # one volume rendered in 3D, as in Slicer
                rendering.SetVisibility(False)
        self.slicer_app.display_manager.show_volume(node, vr_preset="MR-Default", do_reset_views=True)
        self._fix_threed_views()
        self.state.volume_name = node.GetName()
        self.state.status_text = f"Loaded {name}"

    def load_file(self, path, name: str | None = None):
        nodes = self.slicer_app.io_manager.load_volumes([str(path)])
        if not nodes:
            raise ValueError(f"could not read a volume from {path}")
        file_name = Path(path).name
        # "x.nii.gz" as a node name would confuse the engine's file type when the node is written out
        nodes[0].SetName(name or file_name[: len(file_name) - len(image_suffix(file_name) or "")])
        self._show_volume(nodes[0], name or Path(path).name)
        return nodes[0]

    def load_sample(self, name: str | None = None):
        from voco.data.sample_data import fetch

        name = name or self.state.sample
        return self._guarded(lambda: self.load_file(fetch(name), name))

    def load_path(self, path: str | None = None):
        path = path or self.state.volume_path
        return self._guarded(lambda: self.load_file(Path(path).expanduser()))

    @change("upload_files")
    def _on_upload(self, upload_files, **_):
        if not upload_files:
            return
        upload = ClientFile(upload_files[0] if isinstance(upload_files, list) else upload_files)
        self.state.upload_files = None  # the same file can be chosen again
        # Only the base name: a client-chosen "../x" must not leave the upload folder.
        path = Path(tempfile.mkdtemp(prefix="upload-", dir=self.workdir)) / Path(upload.name).name
        path.write_bytes(upload.content)
        self._guarded(lambda: self.load_file(path))

    @change("layout")
    def _on_layout(self, layout, **_):
        self.layout_manager.set_layout(layout)
        self._fix_threed_views()

    @staticmethod
    def _cb(method):
        """A page callback: trame sends a trigger's return value back to the page, so return nothing."""

        if asyncio.iscoroutinefunction(method):
            async def awaited(*args):  # trame awaits it; the event loop serves other tabs meanwhile
                await method(*args)

            return awaited

        def callback(*args):
            method(*args)

        return callback

    def render_views(self) -> None:
        for view in self.slicer_app.view_manager.get_views():
            view.schedule_render()

    def _guarded(self, action):
        try:
            return action()
        except Exception as exc:  # shown to the user, as tryWithErrorDisplay does in Slicer
            traceback.print_exc()
            self.state.status_text = f"Error: {exc}"
            return None

    # --- segmentation workflow -----------------------------------------------------------------

    def _add_model(self, spec: str, title: str, select: bool = True) -> None:
        options = [o for o in self.state.model_options if o["value"] != spec] + [{"value": spec, "title": title}]
        self.state.model_options = options
        if select:
            self.state.model = spec

    async def train_demo_model_from_page(self):
        """The button: the training data (about 3 s to write, once) are written off the event loop."""
        try:
            dataset = await asyncio.get_running_loop().run_in_executor(None, self._demo_dataset)
        except Exception as exc:  # shown to the user, as tryWithErrorDisplay does in Slicer
            traceback.print_exc()
            self.state.status_text = f"Error: {exc}"
            return
        self.train_demo_model(dataset)

    def _demo_dataset(self):
        return demo_model.demo_dataset(self.workdir / "brain-tissue")

    def train_demo_model(self, dataset=None):
        """A background fine-tuning run (VoCoPretrainLib's, as in Slicer) that makes the demo model."""

        def start():
            dataset_json = dataset or self._demo_dataset()
            run_dir = self.pretrain_logic.start_finetuning(
                dataset_json, name=demo_model.NAME, model_name=demo_model.NAME, backbone="swinunetr-tiny",
                steps=demo_model.STEPS, val_every=demo_model.STEPS, checkpoint_every=demo_model.STEPS,
                device=self.state.device, extra_args=demo_model.EXTRA_ARGS)
            self._demo_runs.add(str(run_dir))
            self.state.status_text = "Training the demo model"
            self._refresh_runs()
            return run_dir

        return self._guarded(start)

    def _finish_demo_runs(self, runs) -> None:
        for run in runs:
            if run.path not in self._demo_runs or run.state == "running":
                continue
            self._demo_runs.discard(run.path)
            if run.state != "done":
                self.state.status_text = f"Error: the demo model's training {run.state}: {run.message}"
                continue
            self._add_version(demo_model.NAME, "1", str(Path(run.path) / "model"), run.best_dice)
            self.state.status_text = f"Demo model ready{dice_suffix(run.best_dice)}"

    def _add_version(self, name: str, version: str, path: str, dice: float | None) -> None:
        """A model version made here (demo model, fine-tuning): selected, and a row of the versions table."""
        self._add_model(path, f"{name} v{version}{dice_suffix(dice)}")
        self.versions.append({"name": name, "version": version, "path": path, "dice": dice})
        self.state.versions = list(self.versions)

    def add_model_path(self):
        path = self.state.model_path.strip()
        if path:
            self._add_model(path, Path(path).name)

    def run_segmentation(self):
        def run():
            if self.volume_node is None:
                raise ValueError("load a volume first")
            if not self.state.model:
                raise ValueError("pick a model (or train the demo model)")
            job = self.segmentation_logic.segment(self.volume_node, self.state.model, device=self.state.device)
            job_id = self._add_job("segment", job)
            self.state.seg_running = True
            self.state.seg_progress = 0
            self.state.status_text = "Segmenting"
            return job_id

        return self._guarded(run)

    def cancel_segmentation(self):
        for entry in self.jobs.values():
            job = entry["job"]
            if entry["kind"] == "segment" and not job.finished:
                self.segmentation_logic.cancel(job)
        self.state.seg_running = False
        self.state.status_text = "Cancelled"
        self._publish_jobs()

    def _model_title(self, spec: str) -> str:
        version = next((v for v in self.versions if v["path"] == spec), None)
        return f"{version['name']} v{version['version']}" if version else Path(spec).name

    def _finish_segmentation(self, job) -> None:
        try:
            node = self.segmentation_logic.finish(
                job, name=f"{job.volume_node.GetName()} segmentation ({self._model_title(job.model)})")
        except Exception as exc:
            self.state.status_text = f"Error: {exc}"
            return
        if self.segmentation_node is not None and self.segmentation_node.GetDisplayNode() is not None:
            # The previous result stays for comparison, drawn as outlines under the new one's fill.
            self.segmentation_node.GetDisplayNode().SetVisibility2DFill(False)
            self.segmentation_node.GetDisplayNode().SetVisibility3D(False)
        self.segmentation_node = node
        node.CreateDefaultDisplayNodes()
        # The volume rendering would hide the segments' surfaces in 3D (Slicer shows them alone too).
        rendering = self.slicer_app.volume_rendering.get_vr_display_node(job.volume_node)
        if rendering is not None:
            rendering.SetVisibility(False)
        # Surfaces in 3D, kept up to date through the editor's logic as the segment editor changes them.
        self.slicer_app.segmentation_editor.set_active_segmentation(node, job.volume_node).enable_surface_representation()
        self.state.segmentation_name = node.GetName()
        self._publish_segments()
        self.state.seg_progress = 100
        self.state.seg_status = job.status
        self.render_views()
        self.state.status_text = f"Segmentation done: {len(self.state.segments)} segments"

    def _publish_segments(self) -> None:
        """Name, colour and voxel count of every segment; again whenever the segment editor changes one."""
        segments = []
        node = self.segmentation_node
        if node is not None:
            segmentation = node.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                segment_id = segmentation.GetNthSegmentID(i)
                segment = segmentation.GetNthSegment(i)
                r, g, b = segment.GetColor()
                voxels = int(np.count_nonzero(
                    slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, self.volume_node)))
                segments.append({"id": segment_id, "name": segment.GetName(), "voxels": voxels,
                                 "color": "#%02x%02x%02x" % (round(r * 255), round(g * 255), round(b * 255))})
            self._segments_mtime = segmentation.GetMTime()
        self.state.segments = segments

    def set_editor_effect(self, effect: str):
        editor = self.slicer_app.segmentation_editor
        if self.segmentation_node is None:
            self.state.status_text = "Error: no segmentation to edit yet"
            return
        kinds = {"paint": SegmentationEffectPaint, "erase": SegmentationEffectErase, "none": SegmentationEffectNoTool}
        editor.set_active_effect_type(kinds[effect])
        self.state.editor_effect = effect

    def select_segment(self, segment_id: str):
        if self.segmentation_node is not None:
            self.slicer_app.segmentation_editor.set_active_segment_id(segment_id)

    def add_to_training_set(self):
        def add():
            if self.segmentation_node is None:
                raise ValueError("run a segmentation first")
            case = self.segmentation_logic.add_to_training_set(self.training_set, self.volume_node,
                                                               self.segmentation_node)
            self.state.training_set_count = self.training_set.count
            self.state.status_text = f"Added case {case} to the training set"
            return case

        return self._guarded(add)

    def finetune(self):
        def start():
            job = self.segmentation_logic.finetune(self.training_set, self.state.model,
                                                   steps=int(self.state.finetune_steps), device=self.state.device)
            self.state.status_text = "Fine-tuning"
            return self._add_job("finetune", job)

        return self._guarded(start)

    def compare_versions(self):
        """Run the two latest model versions; both segmentations stay in the scene."""
        if len(self.versions) < 2:
            self.state.status_text = "Error: need two model versions (fine-tune first)"
            return
        for version in self.versions[-2:]:
            job = self.segmentation_logic.segment(self.volume_node, version["path"], device=self.state.device)
            self._add_job("segment", job)
        self.state.seg_running = True
        self.state.status_text = f"Comparing {self.versions[-2]['version']} and {self.versions[-1]['version']}"

    # --- pretrain workflow ---------------------------------------------------------------------

    def start_pretraining(self):
        def start():
            if self.volume_node is None:
                raise ValueError("load a volume first")
            # The demo preset's 32-voxel crops need the tiny backbone (the B backbone needs 64).
            run_dir = self.pretrain_logic.start_pretraining(
                [self.volume_node], preset="demo", backbone="swinunetr-tiny", steps=int(self.state.pretrain_steps),
                batch_size=2, checkpoint_every=5, device=self.state.device)
            self.state.pretrain_run = str(run_dir)
            self.pretrain_logic.curves_for(run_dir)
            self._refresh_runs()
            return run_dir

        return self._guarded(start)

    def stop_pretraining(self):
        if self.state.pretrain_run:
            self._guarded(lambda: self.pretrain_logic.stop(self.state.pretrain_run))
            self._refresh_runs()

    def resume_pretraining(self):
        if self.state.pretrain_run:
            self._guarded(lambda: self.pretrain_logic.resume(self.state.pretrain_run,
                                                             steps=int(self.state.pretrain_steps)))
            self._refresh_runs()

    def show_crop_layout(self):
        def crops():
            nodes = self.pretrain_logic.crop_layout(self.volume_node, self.workdir / "crops" / str(int(time.time())))
            self.slicer_app.display_manager.show_volume_in_slice_foreground(nodes.labelmap)
            self._hide_segmentations()
            for view in self.slicer_app.view_manager.get_slice_views():
                view.set_foreground_opacity(0.4)
            self._fix_threed_views()
            self.render_views()
            self.state.status_text = f"Crop layout: {len(nodes.bases)} bases, {len(nodes.targets)} targets"
            return nodes

        return self._guarded(crops)

    def show_positions(self):
        def positions():
            run = self.state.pretrain_run
            if not run:
                raise ValueError("pick a pretraining run with a checkpoint")
            nodes = self.pretrain_logic.position_predictions(self.volume_node, run,
                                                             self.workdir / "positions" / str(int(time.time())))
            self._positions_heatmap = nodes.heatmap
            self._hide_segmentations()
            if self.state.heatmap_visible:
                self.slicer_app.display_manager.show_volume_in_slice_foreground(nodes.heatmap)
            self.render_views()
            columns = table_columns(nodes.table)
            n = len(next(iter(columns.values()), []))
            self.state.positions_columns = list(columns)
            self.state.positions = [{k: (round(v[i], 3) if isinstance(v[i], float) else v[i]) for k, v in columns.items()}
                                    for i in range(n)]
            self.state.status_text = f"Position predictions: {n} rows"
            return nodes

        return self._guarded(positions)

    def _hide_segmentations(self) -> None:
        """The pretraining overlays are drawn alone; a new segmentation run shows its result again."""
        for node in self.slicer_app.scene.GetNodesByClass("vtkMRMLSegmentationNode"):
            if node.GetDisplayNode() is not None:
                node.GetDisplayNode().SetVisibility(False)

    @change("heatmap_visible")
    def _on_heatmap(self, heatmap_visible, **_):
        heatmap = getattr(self, "_positions_heatmap", None)
        if heatmap is not None:
            self.slicer_app.display_manager.show_volume_in_slice_foreground(heatmap if heatmap_visible else None)

    def _refresh_runs(self) -> None:
        runs = self.pretrain_logic.list_runs()
        self._finish_demo_runs(runs)
        # One vocabulary on the page: a run that is "done" is "finished" like every other job.
        states = {r.path: "finished" if r.state == "done" else r.state for r in runs}
        self._runs = [{"id": r.name, "kind": r.kind, "state": states[r.path],
                       "progress": round(100 * r.step / r.total) if r.total else None,
                       "status": r.message if r.state == "failed" else ""} for r in runs]
        self.state.pretrain_runs = [{"value": r.path, "title": f"{r.name} ({states[r.path]})"}
                                    for r in runs if r.kind == "pretrain"]
        self.state.pretrain_state = states.get(self.state.pretrain_run, "idle")
        self._publish_jobs()

    @change("pretrain_run")
    def _on_pretrain_run(self, pretrain_run, **_):
        if pretrain_run:
            self._guarded(lambda: self.pretrain_logic.curves_for(pretrain_run))
            self._update_chart()

    def _update_chart(self) -> None:
        run = self.state.pretrain_run
        curves = self.pretrain_logic.curves.get(str(Path(run))) if run else None
        self.state.loss_svg = loss_chart_svg(table_columns(curves.loss_table) if curves else {})

    # --- jobs ----------------------------------------------------------------------------------

    def _add_job(self, kind: str, job) -> str:
        job_id = f"{kind}-{len(self.jobs) + 1}"
        self.jobs[job_id] = {"kind": kind, "job": job, "done": False}
        self._publish_jobs()
        return job_id

    def _publish_jobs(self) -> None:
        rows = []
        for job_id, entry in self.jobs.items():
            job = entry["job"]
            state = ("cancelled" if job.cancelled else "running" if not job.finished
                     else "finished" if job.succeeded else "failed")
            rows.append({"id": job_id, "kind": entry["kind"], "state": state,
                         "progress": round(100 * job.fraction), "status": job.error or job.status})
        self.state.jobs = rows + self._runs

    def poll_once(self) -> None:
        """Advance every job: engine events -> job state -> trame state (all tabs)."""
        with self.state:
            for entry in self.jobs.values():
                job = entry["job"]
                if entry["done"]:
                    continue
                job.update()
                if entry["kind"] == "segment":
                    self.state.seg_progress = round(100 * job.fraction)
                    self.state.seg_status = job.status
                if job.finished:
                    entry["done"] = True
                    if entry["kind"] == "segment":
                        self.state.seg_running = any(not e["done"] for e in self.jobs.values() if e["kind"] == "segment")
                        if job.succeeded:
                            self._finish_segmentation(job)
                        elif job.cancelled:
                            self.state.status_text = "Cancelled"
                        else:
                            self.state.status_text = f"Error: {job.error or job.status}"
                    elif entry["kind"] == "finetune":
                        if job.succeeded and job.model_path:
                            self._add_version(job.model_name, job.model_version, job.model_path, job.best_dice)
                        self.state.status_text = job.status if job.succeeded else f"Error: {job.error}"
            node = self.segmentation_node
            if node is not None and node.GetSegmentation().GetMTime() != self._segments_mtime:
                self._publish_segments()
            if self.pretrain_logic.curves and self.pretrain_logic.update_curves():
                self._update_chart()
            if self.pretrain_logic.curves or self._demo_runs or any(r["state"] == "running" for r in self._runs):
                self._refresh_runs()
            self._publish_jobs()

    def _start_polling(self, **_):
        async def loop():
            while True:
                try:
                    self.poll_once()
                except Exception:
                    traceback.print_exc()
                await asyncio.sleep(POLL_S)

        loop_ = asyncio.get_event_loop()
        self._poll_task = loop_.create_task(loop())
        loop_.create_task(self._discover(loop_))

    async def _discover(self, loop) -> None:
        """The engine's devices and installed segmentation models, asked once in the background
        (each is an engine process, seconds), as the Slicer module fills its combo boxes."""
        devices, note = await loop.run_in_executor(None, self.segmentation_logic.devices)
        try:
            models = await loop.run_in_executor(None, self.segmentation_logic.models)
        except Exception as exc:  # the page works without the list; say why it is empty
            models = []
            self.state.status_text = f"Error: could not list the installed models: {exc}"
        with self.state:
            self.state.devices = [{"value": d.id, "title": d.title} for d in devices]
            self.state.device_note = note or ""
            for model in models:
                known = {option["value"] for option in self.state.model_options}
                if model.usable and model.installed and model.spec not in known:
                    self._add_model(model.spec, f"{model.name} v{model.version}{dice_suffix(model.dice)}",
                                    select=not self.state.model)

    # --- UI ------------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            self.ui = layout
            layout.root.theme = "dark"
            layout.title.set_text("VoCo Studio")
            with layout.toolbar:
                v.VSpacer()
                with html.Select(v_model=("layout",), **tid("layout-select"),
                                 style="background:#333;color:#fff;margin:0 8px"):
                    html.Option("{{ l }}", v_for="l in layouts", key="l", value=("l",))
                v.VProgressCircular(v_if=("trame__busy",), indeterminate=True, size=20, **tid("busy-indicator"))
                html.Span("{{ status_text }}", **tid("status-text"), style="margin:0 12px")
            with layout.drawer as drawer:
                drawer.width = 380
                with html.Div(**tid("studio-root")):
                    with v.VTabs(v_model=("tab",), density="compact"):
                        v.VTab("Segmentation", value="segmentation", **tid("tab-segmentation"))
                        v.VTab("Pretrain", value="pretrain", **tid("tab-pretrain"))
                    with html.Div(v_show="tab === 'segmentation'", **tid("panel-segmentation"), classes="pa-2"):
                        self._segmentation_panel()
                    with html.Div(v_show="tab === 'pretrain'", **tid("panel-pretrain"), classes="pa-2"):
                        self._pretrain_panel()
                    v.VDivider()
                    self._jobs_table()
            with layout.content:
                with v.VContainer(fluid=True, classes="pa-0 fill-height"):
                    self.layout_manager.initialize_layout_grid(layout)

    def _select(self, model: str, options: str, testid: str) -> None:
        with html.Select(v_model=(model,), **tid(testid), style="background:#333;color:#fff;width:100%;margin:2px 0"):
            html.Option("{{ o.title }}", v_for=f"o in {options}", key="o.value", value=("o.value",))

    def _segmentation_panel(self) -> None:
        html.Div("Volume", classes="text-subtitle-2")
        with html.Select(v_model=("sample",), **tid("sample-select"), style="background:#333;color:#fff"):
            html.Option("{{ s }}", v_for="s in samples", key="s", value=("s",))
        v.VBtn("Load sample", click=self._cb(self.load_sample), size="small", **tid("load-sample-button"))
        v.VFileInput(v_model=("upload_files",), label="Upload NIfTI / NRRD", density="compact",
                     hide_details=True, **tid("volume-upload"))
        v.VCombobox(v_model=("volume_path",), items=("volume_paths",), label="Server path", density="compact",
                    hide_details=True, **tid("volume-path-input"))
        v.VBtn("Load path", click=self._cb(self.load_path), size="small", **tid("load-path-button"))
        html.Div("Volume: {{ volume_name }}", **tid("volume-name"))
        v.VDivider(classes="my-2")
        html.Div("Segmentation", classes="text-subtitle-2")
        self._select("model", "model_options", "model-select")
        v.VBtn("Train demo model", click=self._cb(self.train_demo_model_from_page), size="small", **tid("train-demo-model-button"))
        v.VTextField(v_model=("model_path",), label="Model package path", density="compact", hide_details=True,
                     **tid("model-path-input"))
        v.VBtn("Add model", click=self._cb(self.add_model_path), size="small", **tid("add-model-button"))
        self._select("device", "devices", "device-select")
        html.Div("{{ device_note }}", v_if="device_note", **tid("device-note"), classes="text-caption")
        with html.Div(classes="d-flex ga-2 my-1"):
            v.VBtn("Run", click=self._cb(self.run_segmentation), disabled=("seg_running",), color="primary", size="small",
                   **tid("run-button"))
            v.VBtn("Cancel", click=self._cb(self.cancel_segmentation), disabled=("!seg_running",), size="small",
                   **tid("cancel-button"))
        v.VProgressLinear(model_value=("seg_progress",), height=8, **tid("progress-bar"))
        html.Div("{{ seg_progress }} %  {{ seg_status }}", **tid("progress-text"), classes="text-caption")
        html.Div("{{ segmentation_name }}", **tid("segmentation-name"), classes="text-caption")
        with html.Div(**tid("segment-list")):
            with html.Div(v_for="s in segments", key="s.id",
                          __properties=TESTID + [("data_name", "data-segment-name"), ("data_color", "data-segment-color"),
                                                 ("data_voxels", "data-segment-voxels")],
                          data_testid="segment-item", data_name=("s.name",), data_color=("s.color",),
                          data_voxels=("s.voxels",),
                          click=(self._cb(self.select_segment), "[s.id]"), style="cursor:pointer"):
                html.Span(style=("`display:inline-block;width:12px;height:12px;background:${s.color}`",))
                html.Span(" {{ s.name }}")
                html.Span(" ({{ s.voxels }} voxels)", classes="text-caption")
        with html.Div(classes="d-flex ga-1 my-1"):
            v.VBtn("Paint", click=(self._cb(self.set_editor_effect), "['paint']"), size="x-small", **tid("editor-paint-button"))
            v.VBtn("Erase", click=(self._cb(self.set_editor_effect), "['erase']"), size="x-small", **tid("editor-erase-button"))
            v.VBtn("Off", click=(self._cb(self.set_editor_effect), "['none']"), size="x-small", **tid("editor-off-button"))
        v.VBtn("Add to training set", click=self._cb(self.add_to_training_set), size="small",
               **tid("add-to-training-set-button"))
        html.Div("Training set: {{ training_set_count }} cases", **tid("training-set-count"))
        v.VTextField(v_model=("finetune_steps",), type="number", label="Fine-tune steps", density="compact",
                     hide_details=True, **tid("finetune-steps-input"))
        v.VBtn("Fine-tune", click=self._cb(self.finetune), size="small", **tid("finetune-button"))
        with html.Table(**tid("versions-table"), classes="text-caption"):
            with html.Tr(v_for="m in versions", key="m.path", __properties=TESTID, data_testid="version-row"):
                html.Td("{{ m.name }} v{{ m.version }}")
                html.Td("{{ m.dice === null ? '' : 'Dice ' + m.dice.toFixed(3) }}")
        v.VBtn("Compare versions", click=self._cb(self.compare_versions), size="small", **tid("compare-versions-button"))

    def _pretrain_panel(self) -> None:
        self._select("pretrain_run", "pretrain_runs", "pretrain-run-select")
        v.VTextField(v_model=("pretrain_steps",), type="number", label="Steps", density="compact", hide_details=True,
                     **tid("pretrain-steps-input"))
        with html.Div(classes="d-flex ga-1 my-1"):
            v.VBtn("Start", click=self._cb(self.start_pretraining), size="small", **tid("pretrain-start-button"))
            v.VBtn("Stop", click=self._cb(self.stop_pretraining), size="small", **tid("pretrain-stop-button"))
            v.VBtn("Resume", click=self._cb(self.resume_pretraining), size="small", **tid("pretrain-resume-button"))
        html.Div("{{ pretrain_state }}", **tid("pretrain-state"))
        html.Div(v_html=("loss_svg",))
        with html.Div(classes="d-flex ga-1 my-1"):
            v.VBtn("Crop layout", click=self._cb(self.show_crop_layout), size="small", **tid("crop-layout-button"))
            v.VBtn("Positions", click=self._cb(self.show_positions), size="small", **tid("positions-button"))
        v.VSwitch(v_model=("heatmap_visible",), label="Heatmap", density="compact", hide_details=True,
                  **tid("heatmap-toggle"))
        with html.Table(**tid("positions-table"), classes="text-caption"):
            with html.Tr(v_if="positions.length"):
                html.Th("{{ k }}", v_for="k in positions_columns", key="k", classes="px-1")
            with html.Tr(v_for="(row, i) in positions", key="i", __properties=TESTID, data_testid="positions-row"):
                html.Td("{{ value }}", v_for="(value, k) in row", key="k")

    def _jobs_table(self) -> None:
        html.Div("Jobs", classes="text-subtitle-2 pa-2")
        with html.Table(**tid("jobs-table"), classes="text-caption pa-2"):
            with html.Tr(v_for="j in jobs", key="j.id",
                         __properties=TESTID + [("data_kind", "data-job-kind"), ("data_state", "data-job-state")],
                         data_testid="job-row", data_kind=("j.kind",), data_state=("j.state",)):
                html.Td("{{ j.id }}")
                html.Td("{{ j.state }}")
                html.Td("{{ j.progress === null ? '' : j.progress + ' %' }}")
                html.Td("{{ j.status }}")
