"""VoCo Studio: the VoCoSegmentation and VoCoPretrain workflows in a browser, on Slicer's MRML.

trame-slicer's ``SlicerApp`` holds the scene and the module logics; its remote-rendered slice and
3D views show it. The page is a view of the same sessions the Slicer widgets show
(``SegmentationSession``, ``PretrainSession``): each callback calls one session method, and
``poll_once`` (an asyncio task every ``POLL_S``) ticks them and copies what they decided into the
shared trame state, so every browser tab sees the same jobs. Long work runs in the engine's own
processes, as in Slicer. The page can set any state value and call any callback with any
arguments, so each value is taken only if it is one the server offered (a model, device, run id,
layout, sample, segment, effect of its own lists; paths and uploads: access.py). Element ids:
README_TESTIDS.md.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import numpy as np

from .headless import configure_offscreen_rendering, disable_depth_peeling

ROOT = Path(__file__).resolve().parents[1]
for _module in ("VoCoCommon", "VoCoSegmentation", "VoCoPretrain"):  # a source checkout; a wheel has them installed
    if (ROOT / _module).is_dir() and str(ROOT / _module) not in sys.path:
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
from VoCoCommonLib.client import EngineClient  # noqa: E402
from VoCoCommonLib.runs import PRETRAIN, Runs  # noqa: E402
from VoCoCommonLib.settings import read_settings  # noqa: E402
from VoCoCommonLib.training_set import TrainingSet  # noqa: E402
from VoCoPretrainLib.session import PretrainSession  # noqa: E402
from VoCoSegmentationLib.session import SegmentationSession  # noqa: E402

from voco.data.sources import image_suffix  # noqa: E402

from .access import MAX_UPLOAD_MB, ServerPaths, check_upload  # noqa: E402
from .chart import loss_chart_svg, table_columns  # noqa: E402
from . import demo_model  # noqa: E402

POLL_S = 0.5
SAMPLES = ["mni152-t1", "spine-ct"]
LOG_LINES = 200  # of each session's engine log, on the page
TESTID = [("data_testid", "data-testid")]


def tid(name: str, **kwargs) -> dict:
    """``id`` and ``data-testid`` both set to ``name`` (README_TESTIDS.md)."""
    return {"id": name, "__properties": TESTID, "data_testid": name, **kwargs}


def job_id(job) -> str:
    """A job's row id in the jobs table."""
    return f"{job.kind}-{id(job):x}"


def job_row(job) -> dict:
    state = ("cancelled" if job.cancelled else "queued" if not job.started else "running" if not job.finished
             else "finished" if job.succeeded else "failed")
    return {"id": job_id(job), "kind": job.kind, "state": state, "progress": round(100 * job.fraction),
            "status": job.error or job.status}


def whole_number(value, what: str, minimum: int = 1) -> int:
    """A count typed on the page, as an int (ValueError with a message for the page otherwise)."""
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{what} must be a whole number of at least {minimum}, not {value!r}")
    return number


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
    def __init__(self, server=None, workdir=None, data=(), load_default: bool = True, rca_encoder=None,
                 data_folders=(), max_upload_mb: float = MAX_UPLOAD_MB):
        """``data``: the volumes ``--data`` lists; ``data_folders``: the folders it names. Paths typed
        on the page may name files under those folders and the workdir, or one of ``data``."""
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.workdir = Path(workdir or Path(tempfile.gettempdir()) / "voco-studio")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_paths = [str(p) for p in data]
        self.server_paths = ServerPaths([self.workdir, *data_folders], files=self.data_paths)
        self.uploads_dir = self.workdir / "uploads"
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.remove_uploads()  # a killed session's
        self.ctrl.on_server_exited.add(self.remove_uploads)

        self.slicer_app = SlicerApp()
        install_slicer_globals(self.slicer_app)
        self._register_views(rca_encoder)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(layouts())

        # Both sessions on one client and one runs workspace, as the two Slicer modules share them.
        settings = read_settings()
        client, runs = EngineClient(settings), Runs(self.workdir / "runs", settings)
        training_set = TrainingSet(self.workdir / "training-set")
        self.segmentation = SegmentationSession(client, training_set, runs)
        self.ctrl.on_server_exited.add(lambda **_: client.close())  # the warm engine goes with the server
        self.pretrain = PretrainSession(client, runs, training_set)
        self.segmentation.resultReady.connect(self._show_segmentation)
        self.segmentation.modelSelected.connect(self._model_ready)
        self.segmentation.errorOccurred.connect(self._error)
        self.pretrain.errorOccurred.connect(self._error)
        self.pretrain.overlayReady.connect(self._show_overlay)
        self.pretrain.curvesReady.connect(self._update_chart)
        self.pretrain.modelReady.connect(self._finetuned)
        self.volume_node = None
        self.segmentation_node = None
        self._poll_task = None
        self._segments_mtime = 0
        self._demo_run = None      # the demo model's fine-tuning run while it trains
        self._cancelling = False   # "Cancelled" is said once the engine has stopped
        self._positions_heatmap = None

        self._init_state()
        self._build_ui()
        self.layout_manager.set_layout(self.state.layout)
        self._fix_threed_views()
        self.segmentation.refresh()  # devices and models, asked in the background
        self._publish()  # runs an earlier session left in the workdir
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
        s.training_set_count = self.segmentation.state.training_set_count
        s.finetune_steps = 20
        s.versions = []
        s.jobs = []
        s.pretrain_runs = []
        s.pretrain_run = ""
        s.pretrain_steps = 20
        s.pretrain_state = "idle"
        s.finetune_inits = []
        s.finetune_init = ""
        s.pretrain_finetune_steps = 20
        s.finetune_patch_size = 64  # the least the published backbones take: CPU-sized
        s.finetune_batch_size = 1
        s.engine_log = ""
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
        from voco.data.volumes import check_declared_size  # here: it imports MONAI, which the page never needs

        check_declared_size(path)  # Slicer's readers would allocate whatever the header declares
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

        def load():
            sample = name or self.state.sample
            if sample not in SAMPLES:
                raise ValueError(f"no such sample: {sample} (the samples are {', '.join(SAMPLES)})")
            return self.load_file(fetch(sample), sample)

        return self._guarded(load)

    def load_path(self, path: str | None = None):
        path = str(path or self.state.volume_path or "")
        return self._guarded(lambda: self.load_file(self.server_paths.resolve(path)))

    @change("upload_files")
    def _on_upload(self, upload_files, **_):
        if not upload_files:
            return
        upload = ClientFile(upload_files[0] if isinstance(upload_files, list) else upload_files)
        self.state.upload_files = None  # the same file can be chosen again
        self._guarded(lambda: self.load_upload(str(upload.name or ""), upload.content or b""))

    def load_upload(self, name: str, content: bytes):
        """Load an uploaded volume, kept in the workdir's uploads/ until the server stops; nothing
        is written unless it is a self-contained volume, and nothing is kept if it does not load."""
        name = Path(name).name  # only the base name: a client-chosen "../x" must not leave the folder
        check_upload(name, content, self.max_upload_bytes)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.uploads_dir))
        try:
            (folder / name).write_bytes(content)
            return self.load_file(folder / name)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def remove_uploads(self, **_) -> None:
        shutil.rmtree(self.uploads_dir, ignore_errors=True)

    @change("layout")
    def _on_layout(self, layout, **_):
        if layout not in self.layout_manager.get_layout_ids():  # the page offers these alone
            self.state.layout = self.layout_manager.layout_id
            return
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

    # --- what the page picked: only what the server offered (the page can set any state value) -----

    def _offered_model(self):
        """The segmentation model picked on the page: one of those ``model-select`` offers."""
        entry = next((m for m in self.segmentation.state.segmentation_models if m.spec == self.state.model), None)
        if entry is None:
            raise ValueError("pick a model (or train the demo model)")
        return entry

    def _offered_device(self) -> str:
        offered = [d.id for d in self.segmentation.state.devices] or ["auto", "cpu"]  # before the engine said
        if self.state.device not in offered:
            raise ValueError(f"pick a device ({', '.join(offered)})")
        return self.state.device

    def _pretrain_run_dir(self, name) -> Path | None:
        """The folder of the pretraining run the page picked by its id, if the workdir has it."""
        run = next((r for r in self.pretrain.state.runs if r.kind == PRETRAIN and r.name == name), None)
        if run is not None:
            return Path(run.path)
        selected = self.pretrain.state.selected  # a run just started here is listed once it launched
        if name and selected and Path(selected) == self.pretrain.runs.workspace / name:
            return Path(selected)
        return None

    def _picked_run_dir(self) -> Path:
        run_dir = self._pretrain_run_dir(self.state.pretrain_run)
        if run_dir is None:
            raise ValueError("pick a pretraining run")
        return run_dir

    def _guarded(self, action):
        try:
            return action()
        except Exception as exc:  # shown to the user, as tryWithErrorDisplay does in Slicer
            traceback.print_exc()
            self.state.status_text = f"Error: {exc}"
            return None

    # --- segmentation workflow -----------------------------------------------------------------

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
        """A fine-tuning run from scratch (the session's, as in Slicer) that makes the demo model."""

        def start():
            self._demo_run = self.segmentation.finetune(
                None, steps=demo_model.STEPS, device=self._offered_device(), dataset=dataset or self._demo_dataset(),
                name=demo_model.NAME, backbone="swinunetr-tiny", extra_args=demo_model.EXTRA_ARGS,
                val_every=demo_model.STEPS)
            self.state.status_text = "Training the demo model"
            self.pretrain.refresh_runs()  # the run joins the jobs table at once
            self._publish()
            return self._demo_run

        return self._guarded(start)

    def _model_ready(self, spec: str) -> None:
        """A new model version was imported (the demo model, or a fine-tuned one): select it."""
        entry = self.segmentation.model(spec)
        self.state.model = spec
        if self._demo_run is not None:
            self._demo_run = None
            self.state.status_text = "Demo model ready" + (f": {entry.measures}" if entry and entry.measures else "")
        else:
            self.state.status_text = self.segmentation.state.status
        self._publish()

    def add_model_path(self):
        """Install a model package (or checkpoint) from a server path; it joins the model list."""
        path = str(self.state.model_path or "").strip()
        if path:
            self._guarded(lambda: self.segmentation.import_model(self.server_paths.resolve(path)))

    def run_segmentation(self):
        def run():
            if self.volume_node is None:
                raise ValueError("load a volume first")
            model = self._offered_model()
            job = self.segmentation.segment(self.volume_node, model, device=self._offered_device(),
                                            name=self._result_name(model.spec))
            self.state.status_text = "Segmenting"
            self._publish()
            return job_id(job)

        return self._guarded(run)

    def cancel_segmentation(self):
        self.segmentation.cancel()  # returns at once; the engine stops in the background
        self._cancelling = True
        self.state.status_text = "Cancelling"
        self._publish()

    def _result_name(self, spec: str) -> str:
        entry = self.segmentation.model(spec)
        title = f"{entry.name} v{entry.version}" if entry else Path(spec).name
        return f"{self.volume_node.GetName()} segmentation ({title})"

    def _show_segmentation(self, node, volume_node) -> None:
        if self.segmentation_node is not None and self.segmentation_node.GetDisplayNode() is not None:
            # The previous result stays for comparison, drawn as outlines under the new one's fill.
            self.segmentation_node.GetDisplayNode().SetVisibility2DFill(False)
            self.segmentation_node.GetDisplayNode().SetVisibility3D(False)
        self.segmentation_node = node
        node.CreateDefaultDisplayNodes()
        # The volume rendering would hide the segments' surfaces in 3D (Slicer shows them alone too).
        rendering = self.slicer_app.volume_rendering.get_vr_display_node(volume_node)
        if rendering is not None:
            rendering.SetVisibility(False)
        # Surfaces in 3D, kept up to date through the editor's logic as the segment editor changes them.
        self.slicer_app.segmentation_editor.set_active_segmentation(node, volume_node).enable_surface_representation()
        self.state.segmentation_name = node.GetName()
        self._publish_segments()
        self.render_views()
        self.state.status_text = f"Segmentation done: {len(self.state.segments)} segments"

    def _error(self, message: str) -> None:
        self.state.status_text = f"Error: {message}"

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
        if effect not in kinds:
            self.state.status_text = f"Error: no such editor effect: {effect}"
            return
        editor.set_active_effect_type(kinds[effect])
        self.state.editor_effect = effect

    def select_segment(self, segment_id: str):
        node = self.segmentation_node  # an id of one of its segments, nothing else the page sends
        if node is not None and isinstance(segment_id, str) and node.GetSegmentation().GetSegment(segment_id):
            self.slicer_app.segmentation_editor.set_active_segment_id(segment_id)

    def add_to_training_set(self):
        def add():
            if self.segmentation_node is None:
                raise ValueError("run a segmentation first")
            job = self.segmentation.add_to_training_set(self.volume_node, self.segmentation_node, self.state.model)
            self.state.status_text = "Adding the case to the training set"
            return job_id(job)

        return self._guarded(add)

    def finetune(self):
        def start():
            run = self.segmentation.finetune(self._offered_model(), device=self._offered_device(),
                                             steps=whole_number(self.state.finetune_steps, "steps"))
            self.state.status_text = "Fine-tuning"
            self.pretrain.refresh_runs()
            self._publish()
            return run

        return self._guarded(start)

    def compare_versions(self):
        """Segment with the two latest versions of the selected model; both results stay in the scene."""
        entry = self.segmentation.model(self.state.model)
        versions = self.segmentation.versions(entry.name) if entry else []
        if self.volume_node is None or len(versions) < 2:
            self.state.status_text = "Error: need two model versions (fine-tune first)"
            return
        older, newer = versions[-2:]
        self._guarded(lambda: self.segmentation.compare_versions(
            self.volume_node, [older.spec, newer.spec], device=self._offered_device(),
            names=[self._result_name(older.spec), self._result_name(newer.spec)]))
        self.state.status_text = f"Comparing {older.version} and {newer.version}"
        self._publish()

    def roll_back(self, spec):
        """A versions-table row's button: that version becomes the current one (the session takes only
        a version of its own model list)."""
        self._guarded(lambda: self.segmentation.roll_back(spec))
        self._publish()

    # --- pretrain workflow ---------------------------------------------------------------------

    def start_pretraining(self):
        def start():
            if self.volume_node is None:
                raise ValueError("load a volume first")
            # The demo preset's 32-voxel crops need the tiny backbone (the B backbone needs 64).
            run_dir = self.pretrain.start([self.volume_node], preset="demo", backbone="swinunetr-tiny",
                                          steps=whole_number(self.state.pretrain_steps, "steps"), batch_size=2,
                                          checkpoint_every=5, device=self._offered_device())
            self.state.pretrain_run = run_dir.name
            self._publish()
            return run_dir

        return self._guarded(start)

    def stop_pretraining(self):
        self._guarded(lambda: self.pretrain.stop(self._picked_run_dir()))
        self._publish()

    def resume_pretraining(self):
        self._guarded(lambda: self.pretrain.resume(self._picked_run_dir(),
                                                   steps=whole_number(self.state.pretrain_steps, "steps")))
        self._publish()

    def start_finetuning(self):
        """A fine-tuning run from the start picked on the page (one of those offered, nothing
        else) on the training set; its model joins the model list when it is done."""

        def start():
            offered = {spec for spec, _ in self.pretrain.finetune_starts()}
            if self.state.finetune_init not in offered:
                raise ValueError("pick what fine-tuning starts from")
            run = self.pretrain.start_finetuning(
                self.state.finetune_init, steps=whole_number(self.state.pretrain_finetune_steps, "steps"),
                device=self._offered_device(),
                patch_size=whole_number(self.state.finetune_patch_size, "patch size", minimum=0) or None,
                batch_size=whole_number(self.state.finetune_batch_size, "batch size", minimum=0) or None)
            self.state.status_text = f"Fine-tuning: {run.name}"
            self._publish()
            return run

        return self._guarded(start)

    def _finetuned(self, package: str) -> None:
        """A fine-tuning run of the Pretrain tab is done: its model joins the model list."""
        self.segmentation.refresh_models()
        try:  # a card of a few KB, which the engine wrote
            card = json.loads((Path(package) / "model.json").read_text(encoding="utf-8"))
            self.state.status_text = f"New model: {card['name']} v{card['version']}"
        except (OSError, ValueError, KeyError):
            self.state.status_text = f"New model in {Path(package).parent.name}"

    def show_crop_layout(self):
        return self._guarded(lambda: job_id(self.pretrain.crop_layout(
            self.volume_node, preset=None, out_dir=self.workdir / "crops" / str(int(time.time())))))

    def show_positions(self):
        def positions():
            return job_id(self.pretrain.positions(self.volume_node, self._picked_run_dir(),
                                                  out_dir=self.workdir / "positions" / str(int(time.time()))))

        return self._guarded(positions)

    def _show_overlay(self, kind: str, nodes, volume_node) -> None:
        self._hide_segmentations()
        if kind == "crops":
            self.slicer_app.display_manager.show_volume_in_slice_foreground(nodes.labelmap)
            for view in self.slicer_app.view_manager.get_slice_views():
                view.set_foreground_opacity(0.4)
            self._fix_threed_views()
            self.state.status_text = f"Crop layout: {len(nodes.bases)} bases, {len(nodes.targets)} targets"
        else:
            self._positions_heatmap = nodes.heatmap
            if self.state.heatmap_visible:
                self.slicer_app.display_manager.show_volume_in_slice_foreground(nodes.heatmap)
            columns = table_columns(nodes.table)
            n = len(next(iter(columns.values()), []))
            self.state.positions_columns = list(columns)
            self.state.positions = [{k: (round(v[i], 3) if isinstance(v[i], float) else v[i])
                                     for k, v in columns.items()} for i in range(n)]
            self.state.status_text = f"Position predictions: {n} rows"
        self.render_views()

    def _hide_segmentations(self) -> None:
        """The pretraining overlays are drawn alone; a new segmentation run shows its result again."""
        for node in self.slicer_app.scene.GetNodesByClass("vtkMRMLSegmentationNode"):
            if node.GetDisplayNode() is not None:
                node.GetDisplayNode().SetVisibility(False)

    @change("heatmap_visible")
    def _on_heatmap(self, heatmap_visible, **_):
        if self._positions_heatmap is not None:
            self.slicer_app.display_manager.show_volume_in_slice_foreground(
                self._positions_heatmap if heatmap_visible else None)

    @change("pretrain_run")
    def _on_pretrain_run(self, pretrain_run, **_):
        run_dir = self._pretrain_run_dir(pretrain_run) if pretrain_run else None
        if pretrain_run and run_dir is None:  # no run of the workdir: nothing the page offered
            self.state.pretrain_run = ""
        self.pretrain.select(run_dir)
        self._update_chart()

    def _update_chart(self, *_) -> None:
        curves = self.pretrain.curves
        self.state.loss_svg = loss_chart_svg(table_columns(curves.loss_table) if curves else {})

    # --- jobs ----------------------------------------------------------------------------------

    def _publish(self) -> None:
        """The sessions' state as the page shows it (every tab: the state is the server's)."""
        seg, pre = self.segmentation.state, self.pretrain.state
        self.state.seg_running = seg.job == "segment" or self.segmentation.busy
        if seg.job == "segment":
            self.state.seg_progress, self.state.seg_status = round(100 * seg.fraction), seg.status
        elif self.segmentation.history and self.segmentation.history[-1].kind == "segment":
            last = self.segmentation.history[-1]
            self.state.seg_progress = 100 if last.succeeded else self.state.seg_progress
            self.state.seg_status = last.status
        if self._cancelling and not self.segmentation.busy:
            self._cancelling = False
            self.state.status_text = "Cancelled"
        if seg.environment is not None:
            self.state.devices = [{"value": d.id, "title": d.title} for d in seg.devices]
            self.state.device_note = seg.environment.message or ""
        self.state.model_options = [{"value": m.spec, "title": m.title} for m in seg.segmentation_models]
        if not self.state.model and seg.segmentation_models:  # the newest installed one, else the first
            installed = [m for m in seg.segmentation_models if m.installed]
            self.state.model = (installed or seg.segmentation_models[:1])[-1].spec
        entry = self.segmentation.model(self.state.model) if self.state.model else None
        self.state.versions = [row.to_dict() for row in self.segmentation.version_rows(entry.name)] if entry else []
        self.state.training_set_count = seg.training_set_count
        # One vocabulary on the page: a run that is "done" is "finished" like every other job.
        runs = [{"id": r.name, "kind": r.kind, "state": "finished" if r.state == "done" else r.state,
                 "progress": round(100 * r.step / r.total) if r.total and r.step is not None else None,
                 "status": r.message if r.state == "failed" else ""} for r in pre.runs]
        self.state.pretrain_runs = [{"value": r.name, "title": f"{r.name} ({row['state']})"}
                                    for r, row in zip(pre.runs, runs) if r.kind == PRETRAIN]
        run_dir = self._pretrain_run_dir(self.state.pretrain_run)
        picked = pre.run(run_dir) if run_dir else None
        self.state.pretrain_state = ("finished" if picked.state == "done" else picked.state) if picked else "idle"
        jobs = [job_row(job) for job in self.segmentation.history + self.pretrain.history]
        self.state.jobs = jobs + runs
        pre.models = seg.models  # one model list on the page: what fine-tuning can start from, too
        starts = self.pretrain.finetune_starts()
        self.state.finetune_inits = [{"value": spec, "title": title} for spec, title in starts]
        if self.state.finetune_init not in {spec for spec, _ in starts}:
            self.state.finetune_init = starts[0][0]
        self.state.engine_log = "\n".join(list(self.segmentation.log.lines)[-LOG_LINES:] +
                                          list(self.pretrain.log.lines)[-LOG_LINES:])

    def poll_once(self) -> None:
        """Tick both sessions (engine events -> their state) and show it on the page (all tabs)."""
        with self.state:
            self.segmentation.tick()
            self.pretrain.tick()
            node = self.segmentation_node
            if node is not None and node.GetSegmentation().GetMTime() != self._segments_mtime:
                self._publish_segments()
            self._publish()

    def _start_polling(self, **_):
        async def loop():
            while True:
                try:
                    self.poll_once()
                except Exception:
                    traceback.print_exc()
                await asyncio.sleep(POLL_S)

        self._poll_task = asyncio.get_event_loop().create_task(loop())

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
                    with v.VExpansionPanels(**tid("engine-log-panel")):
                        with v.VExpansionPanel(title="Engine log"):
                            with v.VExpansionPanelText():
                                html.Pre("{{ engine_log }}", **tid("engine-log"),
                                         style="font-size:10px;max-height:240px;overflow:auto;white-space:pre-wrap")
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
            with html.Tr(v_if="versions.length"):
                for heading in ("Version", "Dice on unseen cases", "Validation Dice", "Note", ""):
                    html.Th(heading, classes="px-1")
            with html.Tr(v_for="m in versions", key="m.spec",
                         __properties=TESTID + [("data_current", "data-current"), ("data_worse", "data-worse")],
                         data_testid="version-row", data_current=("m.current",), data_worse=("m.worse",)):
                html.Td("{{ m.name }} v{{ m.version }}")
                html.Td("{{ m.unseen }}")
                html.Td("{{ m.validation }}")
                html.Td("{{ m.note }}")
                with html.Td():
                    v.VBtn("Roll back", click=(self._cb(self.roll_back), "[m.spec]"), disabled=("m.current",),
                           size="x-small", __properties=TESTID, data_testid="roll-back-button")
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
        v.VDivider(classes="my-2")
        html.Div("Fine-tuning", classes="text-subtitle-2")
        self._select("finetune_init", "finetune_inits", "finetune-init-select")
        html.Div("on the training set ({{ training_set_count }} cases)", classes="text-caption")
        with html.Div(classes="d-flex ga-1"):
            v.VTextField(v_model=("pretrain_finetune_steps",), type="number", label="Steps", density="compact",
                         hide_details=True, **tid("pretrain-finetune-steps-input"))
            v.VTextField(v_model=("finetune_patch_size",), type="number", label="Patch", density="compact",
                         hide_details=True, **tid("finetune-patch-input"))
            v.VTextField(v_model=("finetune_batch_size",), type="number", label="Batch", density="compact",
                         hide_details=True, **tid("finetune-batch-input"))
        v.VBtn("Start fine-tuning", click=self._cb(self.start_finetuning), size="small",
               **tid("pretrain-finetune-button"))
        v.VDivider(classes="my-2")
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
