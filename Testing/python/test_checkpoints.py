"""Reading every published checkpoint layout and loading it by name (voco.checkpoints.layouts).

Each test writes a checkpoint in the published key layout from known random tensors, reads it back
and checks the reported counts and that every tensor landed in the parameter of the same name.
Real loads use the tiny SwinUNETR; the published sizes and ResEnc-L are checked on the meta device
(files of stride-0 tensors hold one value per tensor, so they stay a few kilobytes).

Counts of the tiny SwinUNETR segmentation network (MONAI names): 219 tensors, 167 in the backbone
(``swinViT`` 134, ``encoder1..4``/``encoder10`` 33), 52 in ``decoder1..5`` and ``out``.
"""

import json
import os

import pytest
import torch

from conftest import run_voco
from published_files import stride0_state
from voco.checkpoints.layouts import (MIN_BACKBONE_FRACTION, STUDENT_NOTE, _meta_device, describe_inspection,
                                      inspect_checkpoint, load_weights, read_weights)
from voco.cli import main
from voco.errors import VocoInputError
from voco.models.segmentation import build_segmentation_network, is_backbone_key
from voco.models.voco import Student, build_teacher
from voco.presets import PRESETS
from voco.registry.package import ModelCard, Preprocessing, default_labels, write_package

TINY = "swinunetr-tiny"
TOTAL, BACKBONE, SWIN_VIT = 219, 167, 134
# MONAI's SSL pretext heads: rotation (4 classes), contrastive projection, reconstruction.
MONAI_HEADS = {"rotation_head.weight": (4, 12), "rotation_head.bias": (4,), "contrastive_head.weight": (512, 12),
               "contrastive_head.bias": (512,), "convTrans3d.weight": (12, 1, 1, 1, 1), "convTrans3d.bias": (1,)}
VOCO_HEAD = {"head.layer1.weight": (8, 8), "head.layer1.bias": (8,)}


def randomised(state: dict, seed: int = 0) -> dict:
    """The same names with distinct random floats (fresh norms are all ones and would match anything)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def tiny_network(in_channels: int = 1, num_classes: int = 3):
    return build_segmentation_network(TINY, in_channels, num_classes)


def tiny_state(in_channels: int = 1, num_classes: int = 3, seed: int = 0) -> dict:
    return randomised(tiny_network(in_channels, num_classes).state_dict(), seed)


def backbone_of(state: dict, architecture: str = TINY) -> dict:
    return {k: v for k, v in state.items() if is_backbone_key(architecture, k)}


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def shaped(shapes: dict, seed: int = 1) -> dict:
    return randomised({k: torch.empty(shape) for k, shape in shapes.items()}, seed)


def meta_state(architecture: str) -> dict:
    return stride0_state(architecture)


def save(tmp_path, content, name="weights.pt"):
    torch.save(content, tmp_path / name)
    return tmp_path / name


def counts(report) -> tuple:
    return len(report.matched), len(report.missing), len(report.shape_mismatched), len(report.unexpected)


def assert_loaded(model, state: dict, names) -> None:
    loaded = model.state_dict()
    for name in names:
        assert torch.equal(loaded[name], state[name]), name


# -- the published layouts -----------------------------------------------------------------------

@pytest.mark.parametrize("under_state_dict", [False, True])
def test_voco_ssl_head_loads_the_whole_backbone(tmp_path, under_state_dict):
    state = tiny_state()
    backbone = backbone_of(state)
    path = save(tmp_path, {"state_dict": backbone} if under_state_dict else backbone, "VoCo_T_SSL_head.pt")
    weights = read_weights(path)
    assert (weights.layout, weights.architecture, weights.in_channels, weights.num_classes) == \
        ("voco-ssl-head", TINY, 1, None)
    assert weights.notes == [] and weights.plan is None
    model = tiny_network()
    decoder_before = model.decoder1.conv_block.conv1.conv.weight.clone()
    report = load_weights(model, weights, TINY)
    assert counts(report) == (BACKBONE, TOTAL - BACKBONE, 0, 0)
    assert (report.backbone_matched, report.backbone_total, report.fraction) == (BACKBONE, BACKBONE, 1.0)
    assert_loaded(model, state, backbone)
    assert torch.equal(model.decoder1.conv_block.conv1.conv.weight, decoder_before)


def _training_layouts(backbone: dict, teacher: dict, head: dict) -> dict:
    """Published training-checkpoint layouts and the notes each should produce."""
    return {
        "ddp": ({"state_dict": prefixed(backbone, "module.")}, ["stripped prefix module."], 0),
        "v2": ({"network_weights": {**prefixed(backbone, "backbone."), **head}}, ["stripped prefix backbone."], 2),
        "v2-ddp": ({"net": prefixed({**prefixed(backbone, "backbone."), **head}, "module.")},
                   ["stripped prefix module.", "stripped prefix backbone."], 2),
        "v1": ({"model": {**prefixed(backbone, "student."), **prefixed(teacher, "teacher.")}},
               [STUDENT_NOTE, "stripped prefix student."], 0),
        "v1-dicts": ({"student": backbone, "teacher": teacher, "epoch": 7}, [STUDENT_NOTE], 0),
        "v1-ddp": ({"state_dict": prefixed({**prefixed(backbone, "student.backbone."),
                                            **prefixed(teacher, "teacher.backbone.")}, "module.")},
                   ["stripped prefix module.", STUDENT_NOTE, "stripped prefix student.", "stripped prefix backbone."], 0),
    }


@pytest.mark.parametrize("layout", ["ddp", "v2", "v2-ddp", "v1", "v1-dicts", "v1-ddp"])
def test_training_checkpoints_lose_their_prefixes_and_load_the_student(tmp_path, layout):
    student = backbone_of(tiny_state(seed=0))
    teacher = backbone_of(tiny_state(seed=1))
    content, notes, unexpected = _training_layouts(student, teacher, shaped(VOCO_HEAD))[layout]
    weights = read_weights(save(tmp_path, content))
    assert (weights.layout, weights.architecture, weights.notes) == ("voco-training", TINY, notes)
    model = tiny_network()
    report = load_weights(model, weights, TINY)
    assert counts(report) == (BACKBONE, TOTAL - BACKBONE, 0, unexpected)
    assert report.unexpected == list(VOCO_HEAD)[:unexpected]
    assert_loaded(model, student, student)


@pytest.mark.parametrize("naming, note", [("swin_vit.", "renamed swin_vit to swinViT"),
                                          ("", "named the bare Swin transformer keys swinViT.*")])
def test_monai_ssl_weights_fill_the_swin_transformer(tmp_path, naming, note):
    state = tiny_state()
    transformer = {k.removeprefix("swinViT."): v for k, v in state.items() if k.startswith("swinViT.")}
    content = {"state_dict": prefixed({**prefixed(transformer, naming), **shaped(MONAI_HEADS)}, "module.")}
    weights = read_weights(save(tmp_path, content, "model_swinvit.pt"))
    assert (weights.layout, weights.architecture, weights.in_channels) == ("monai-ssl", TINY, 1)
    assert weights.notes == ["stripped prefix module.", note]
    model = tiny_network()
    report = load_weights(model, weights, TINY)
    assert counts(report) == (SWIN_VIT, TOTAL - SWIN_VIT, 0, len(MONAI_HEADS))
    assert sorted(report.unexpected) == sorted(MONAI_HEADS)
    # MONAI's SSL model had only the transformer: the fraction rule counts what it could provide.
    assert (report.backbone_matched, report.backbone_total) == (SWIN_VIT, SWIN_VIT)
    assert_loaded(model, state, [k for k in state if k.startswith("swinViT.")])
    with _meta_device():
        resenc = build_segmentation_network("resencl", 1, 2)
    with pytest.raises(VocoInputError, match="only 0 of 224 backbone tensors match the resencl network"):
        load_weights(resenc, weights, "resencl")


NNSSL_PLAN = {"architecture_plans": {"arch_class_name": "ResEncL"}, "pretrain_num_input_channels": 1,
              "recommended_downstream_patchsize": [160, 160, 160], "key_to_encoder": "encoder.stages",
              "key_to_stem": "encoder.stem", "keys_to_in_proj": ["encoder.stem.convs.0.conv",
                                                                 "encoder.stem.convs.0.all_modules.0"],
              "key_to_lpe": None}
# nnssl's VoCo projector on ResEnc-L's 1120 pooled features (VoCoArchitecture in nnssl).
NNSSL_PROJECTOR = {"projector.layer1.0.weight": (2048, 1120), "projector.layer1.0.bias": (2048,),
                   "projector.layer2.0.weight": (2048, 2048), "projector.layer2.0.bias": (2048,),
                   "projector.layer3.0.weight": (2048, 2048), "projector.layer3.0.bias": (2048,)}
# ResEnc-L UNet: 956 state-dict names, 264 distinct tensors (``all_modules`` and ``decoder.encoder``
# re-register modules), 224 of them in the encoder (448 names).
RESENC_TOTAL, RESENC_ENCODER = 264, 224


def test_nnssl_resenc_checkpoint_keeps_encoder_names_and_reports_its_plan(tmp_path):
    encoder = {k: v for k, v in meta_state("resencl").items() if k.startswith("encoder.")}
    projector = {k: torch.zeros(1).expand(shape) for k, shape in NNSSL_PROJECTOR.items()}
    path = save(tmp_path, {"network_weights": {**encoder, **projector}, "nnssl_adaptation_plan": NNSSL_PLAN,
                           "citations": []}, "checkpoint_final.pth")
    weights = read_weights(path)
    assert (weights.layout, weights.architecture, weights.in_channels, weights.num_classes) == ("nnssl", "resencl", 1, None)
    assert weights.plan == NNSSL_PLAN and weights.notes == []
    assert len(encoder) == 448 and all(torch.equal(weights.state[k], v) for k, v in encoder.items())

    report = inspect_checkpoint(path)
    assert report["load"] | {"examples": None} == {
        "matched": RESENC_ENCODER, "missing": RESENC_TOTAL - RESENC_ENCODER, "shape_mismatched": 0,
        "unexpected": len(NNSSL_PROJECTOR), "backbone_total": RESENC_ENCODER, "backbone_matched": RESENC_ENCODER,
        "fraction": 1.0, "examples": None}
    assert report["recommended_patch_size"] == [160, 160, 160] and report["loads"]
    assert report["parameters"] == sum(v.numel() for v in {id(v): v for v in encoder.values()}.values()) + \
        sum(torch.Size(shape).numel() for shape in NNSSL_PROJECTOR.values())
    assert "recommended patch size: 160x160x160" in describe_inspection(report)


def test_resenc_encoder_prefix_is_never_stripped(tmp_path):
    encoder = {k: v for k, v in meta_state("resencl").items() if k.startswith("encoder.")}
    weights = read_weights(save(tmp_path, encoder))  # every key starts with "encoder."
    assert weights.architecture == "resencl" and list(weights.state) == list(encoder)


def test_voco_pretrain_checkpoint_loads_the_student_backbone(tmp_path):
    preset = PRESETS["demo"]
    student = Student(TINY, preset)
    state = randomised(student.state_dict())
    teacher = build_teacher(student, preset)  # demo: EMA of the head, keys module.layer1...
    path = save(tmp_path, {"format": "voco-pretrain", "format_version": 1, "step": 3, "backbone": TINY,
                           "config": {"backbone": TINY}, "student": state, "teacher": teacher.state_dict(),
                           "optimizer": {"state": {}, "param_groups": []}}, "checkpoint.pt")
    weights = read_weights(path)
    assert (weights.layout, weights.architecture) == ("voco-pretrain", TINY)
    assert weights.notes == [STUDENT_NOTE, "stripped prefix backbone."]
    model = tiny_network()
    report = load_weights(model, weights, TINY)
    head = [k for k in state if k.startswith("head.")]
    assert len(head) == 6 and report.unexpected == head
    assert counts(report) == (BACKBONE, TOTAL - BACKBONE, 0, 6)
    assert_loaded(model, {k.removeprefix("backbone."): v for k, v in state.items()}, report.matched)


@pytest.fixture
def package(tmp_path):
    state = tiny_state(num_classes=3)
    card = ModelCard(name="tiny-test", version="1.0", architecture=TINY, in_channels=1,
                     labels=default_labels([1, 2]), preprocessing=Preprocessing("ct", (1.5,) * 3, (32,) * 3))
    return write_package(tmp_path / "pkg", card, state), state


@pytest.mark.parametrize("given", ["folder", "weights.pt"])
def test_model_package_loads_the_whole_network(package, given):
    package, state = package
    weights = read_weights(package.folder if given == "folder" else package.weights_path)
    assert (weights.layout, weights.architecture, weights.in_channels, weights.num_classes) == ("voco-model", TINY, 1, 3)
    assert weights.path == package.weights_path
    assert weights.notes == (["model package tiny-test 1.0"] if given == "folder" else [])
    model = tiny_network(num_classes=3)
    assert counts(load_weights(model, weights, TINY)) == (TOTAL, 0, 0, 0)
    assert_loaded(model, state, state)


def test_another_class_count_drops_only_the_output_head(package):
    package, state = package
    model = tiny_network(num_classes=5)
    report = load_weights(model, read_weights(package.folder), TINY)
    assert counts(report) == (TOTAL - 2, 0, 2, 0)
    assert report.shape_mismatched == ["out.conv.conv.weight", "out.conv.conv.bias"]


def test_another_input_channel_count_drops_only_the_input_convolutions(tmp_path):
    state = backbone_of(tiny_state(in_channels=2))
    weights = read_weights(save(tmp_path, state))
    assert weights.in_channels == 2
    model = tiny_network(in_channels=1)
    report = load_weights(model, weights, TINY)
    # The patch embedding and encoder1's 3^3 and 1x1 residual convolutions read the input.
    assert report.shape_mismatched == ["swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight",
                                       "encoder1.layer.conv3.conv.weight"]
    assert counts(report) == (BACKBONE - 3, TOTAL - BACKBONE, 3, 0)
    assert report.fraction == pytest.approx(164 / 167) and report.fraction >= MIN_BACKBONE_FRACTION
    assert_loaded(model, state, report.matched)


# -- detection and refusals ----------------------------------------------------------------------

@pytest.mark.parametrize("feature_size, architecture", [(12, TINY), (48, "swinunetr-b"), (96, "swinunetr-l"),
                                                        (192, "swinunetr-h")])
def test_swin_size_and_input_channels_come_from_the_patch_embedding(tmp_path, feature_size, architecture):
    embedding = {"swinViT.patch_embed.proj.weight": torch.zeros(1).expand(feature_size, 4, 2, 2, 2)}
    weights = read_weights(save(tmp_path, embedding))
    assert (weights.architecture, weights.in_channels) == (architecture, 4)


def test_unknown_swin_feature_size_is_a_clear_error(tmp_path):
    path = save(tmp_path, {"swinViT.patch_embed.proj.weight": torch.zeros(24, 1, 2, 2, 2)}, "odd.pt")
    with pytest.raises(VocoInputError, match=r"odd\.pt: SwinUNETR feature size 24 is none of the known sizes: "
                                             r"12 \(swinunetr-tiny\), 48 \(swinunetr-b\)"):
        read_weights(path)


def test_published_b_checkpoint_is_recognised_and_refused_by_a_tiny_network(tmp_path):
    path = save(tmp_path, backbone_of(meta_state("swinunetr-b"), "swinunetr-b"), "VoCo_B_SSL_head.pt")
    report = inspect_checkpoint(path)
    assert (report["layout"], report["architecture"], report["in_channels"]) == ("voco-ssl-head", "swinunetr-b", 1)
    assert (report["load"]["matched"], report["load"]["missing"], report["load"]["backbone_total"]) == (145, 22, 145)
    model = tiny_network()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VocoInputError, match=r"VoCo_B_SSL_head\.pt: only 0 of 167 backbone tensors match the "
                                             r"swinunetr-tiny network \(the file holds swinunetr-b weights"):
        load_weights(model, read_weights(path), TINY)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused: nothing copied


@pytest.mark.parametrize("content, message", [
    ({"state_dict": {"foo.weight": torch.zeros(2)}}, "no VoCo/SwinUNETR/ResEnc-L weights found (first keys: foo.weight)"),
    ({"epoch": 3, "lr": 0.1}, "holds no tensors (first keys: epoch, lr)"),
])
def test_files_without_recognisable_weights_are_refused(tmp_path, content, message):
    with pytest.raises(VocoInputError) as error:
        read_weights(save(tmp_path, content, "other.pt"))
    assert str(error.value) == f"{tmp_path / 'other.pt'}: {message}"


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = save(tmp_path, {"state_dict": {"swinViT.patch_embed.proj.weight": Exploit(marker)}}, "evil.pt")
    with pytest.raises(VocoInputError, match=r"evil\.pt: refused: it contains pickled code") as error:
        read_weights(path)
    assert "\n" not in str(error.value) and not marker.exists()


def test_truncated_file_is_one_line_error(tmp_path):
    whole = save(tmp_path, backbone_of(tiny_state()))
    (tmp_path / "cut.pt").write_bytes(whole.read_bytes()[:5000])
    with pytest.raises(VocoInputError, match=r"cut\.pt: not a readable PyTorch checkpoint") as error:
        read_weights(tmp_path / "cut.pt")
    assert "\n" not in str(error.value)


# -- the command line ----------------------------------------------------------------------------

def test_cli_inspect_prints_the_counts_as_json(tmp_path):
    path = save(tmp_path, {"state_dict": prefixed(backbone_of(tiny_state()), "module.")})
    result = run_voco("checkpoint", "inspect", path, "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["layout"], report["architecture"], report["notes"]) == ("voco-training", TINY, ["stripped prefix module."])
    assert {k: report["load"][k] for k in ("matched", "missing", "shape_mismatched", "unexpected")} == \
        {"matched": BACKBONE, "missing": TOTAL - BACKBONE, "shape_mismatched": 0, "unexpected": 0}


def test_cli_inspect_describes_in_words_and_as_a_jsonl_event(tmp_path, capsys):
    path = save(tmp_path, backbone_of(tiny_state()))
    assert main(["checkpoint", "inspect", str(path)]) == 0
    words = capsys.readouterr().out
    assert "voco-ssl-head layout, swinunetr-tiny, 1 input channel(s), no segmentation head" in words
    assert "167 matched, 52 missing, 0 shape-mismatched, 0 unexpected; backbone 167 of 167 (100%)" in words
    assert main(["checkpoint", "inspect", str(path), "--progress", "jsonl"]) == 0
    [event] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert event["event"] == "done" and event["load"]["matched"] == BACKBONE


def test_cli_inspect_of_a_bad_file_is_one_error_line_and_exit_code_2(tmp_path):
    (tmp_path / "cut.pt").write_bytes(save(tmp_path, backbone_of(tiny_state())).read_bytes()[:5000])
    result = run_voco("checkpoint", "inspect", tmp_path / "cut.pt", "--json", timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'cut.pt'}: not a readable"), result.stderr


# --- writing: a full disk, and what a killed writer leaves ---------------------------------------------------

def _full_disk(how):
    """A torch.save that fails the way it does on a full disk."""
    import errno

    real_save = torch.save

    def save(state, target):
        stream = target if hasattr(target, "write") else open(target, "wb")
        stream.write(b"partial bytes")
        if how == "dev_full":  # the real thing: torch writing to a device that is always full
            with open("/dev/full", "wb") as full:
                real_save(state, full)
        if how == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    return save


@pytest.mark.parametrize("how", ["dev_full", "oserror", "torch_runtime_error"])
def test_a_full_disk_says_disk_full_keeps_the_previous_checkpoint_and_leaves_no_temporary(how, tmp_path,
                                                                                          monkeypatch):
    if how == "dev_full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    from voco.checkpoints.files import load_checkpoint, save_checkpoint

    path = save_checkpoint({"step": 1}, tmp_path / "last.pt")
    monkeypatch.setattr(torch, "save", _full_disk(how))
    with pytest.raises(VocoInputError) as error:
        save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert str(error.value).startswith(f"{path}: disk full: could not write it (") and "MB free there)" in str(error.value)
    assert "\n" not in str(error.value)
    assert load_checkpoint(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.pt"]


def _left_by_a_kill(path) -> str:
    """The name of the temporary that ``atomic_path`` writes for ``path``, left as a kill leaves it."""
    from voco.checkpoints.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(b"half a checkpoint")
        os.link(tmp, path.with_name("kept"))
        name = tmp.name
    os.replace(path.with_name("kept"), path.with_name(name))
    return name


def test_taking_the_run_lock_removes_the_temporaries_of_a_killed_run_and_nothing_else(tmp_path):
    from voco.jobs.run_lock import run_lock

    run = tmp_path / "run"
    run.mkdir()
    stale = [_left_by_a_kill(run / "last.pt"), _left_by_a_kill(run / "checkpoint.pt"),
             _left_by_a_kill(run / "config.json"), _left_by_a_kill(run / "seg.nii.gz")]
    (run / f".model.new-{'0' * 32}").mkdir()  # a model package folder never swapped in
    (run / f".model.new-{'0' * 32}" / "weights.pt").write_bytes(b"half")
    kept = ["notes.tmp.txt", ".hidden", ".last.pt.abc.tmp.pt", "my.tmp"]
    for name in kept:
        (run / name).write_text("user file")
    kept += ["last.pt", "checkpoint.pt", "config.json", "seg.nii.gz", ".lock"]
    (run / ".model.old-keepme").mkdir()  # a complete old package (atomic_folder puts it back)
    with run_lock(run):
        assert sorted(os.listdir(run)) == sorted(kept + [".model.old-keepme"])
    assert all(len(name) > len(".last.pt.") for name in stale)
