"""``voco checkpoint inspect`` without torch: the checkpoint's names, dtypes and shapes from its
pickle (voco.checkpoints.tensor_headers), matched against the networks' table
(voco.models.network_shapes), give the report that loading the file and building the network
with torch gives."""

from __future__ import annotations

import pytest
import torch

from published_files import stride0_state, write_published_layouts
from test_checkpoints import Exploit
from test_fast_commands import probe
from voco.checkpoints import layouts
from voco.checkpoints.tensor_headers import NeedsTorch, TensorHeader, read_tensor_headers
from voco.errors import VocoInputError
from voco.models.architectures import BACKBONES, is_backbone_key
from voco.models.network_shapes import _built, network_shapes


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    folder = tmp_path_factory.mktemp("published")
    paths = write_published_layouts(folder)
    backbone = {k: v for k, v in stride0_state("swinunetr-b").items() if is_backbone_key("swinunetr-b", k)}
    # torch < 1.6's format; and the plain objects torch's weights-only loader accepts beside tensors
    torch.save(backbone, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": {**backbone, "alias": backbone["swinViT.patch_embed.proj.weight"]},
                "dtype": torch.float16, "device": torch.device("cuda:1"), "size": torch.Size([2, 3]),
                "bytes": b"\x00\xff", "set": {1, 2}, "plan": {"edges": (96, 96, 96)}}, folder / "extras.pt")
    # A network the table does not describe (tiny's encoder1 has no 1x1 convolution at 12 channels)
    torch.save(stride0_state("swinunetr-tiny", in_channels=12, num_classes=3), folder / "tiny_12_channels.pt")
    return {**paths, **{name: folder / name for name in ("legacy.pt", "extras.pt", "tiny_12_channels.pt")}}


def torch_report(path, monkeypatch) -> dict:
    """The report as it was before: file loaded with torch.load, network built with torch."""
    with monkeypatch.context() as patch:
        patch.setattr(layouts, "read_tensor_headers", layouts.load_checkpoint)
        patch.setattr(layouts, "network_shapes", lambda *args: None)
        return layouts.inspect_checkpoint(path)


@pytest.mark.parametrize("what", ["VoCo_B_SSL_head.pt", "VoCo_B_SSL_head_state_dict.pt", "VoComni_B.pt",
                                  "VoCo_v1_training.pt", "VoCo_v2_training.pt", "model_swinvit.pt",
                                  "monai_bare_swin.pt", "VoCo_L_4channels.pt", "nnssl_checkpoint_final.pth",
                                  "voco_pretrain_checkpoint.pt", "model package", "legacy.pt", "extras.pt",
                                  "tiny_12_channels.pt"])
def test_inspect_without_torch_reports_what_torch_reports(published, what, monkeypatch):
    fast, slow = layouts.inspect_checkpoint(published[what]), torch_report(published[what], monkeypatch)
    assert list(fast) == list(slow)
    for field in slow:
        assert fast[field] == slow[field], field


def test_headers_are_the_tensors_without_their_values(published):
    state = read_tensor_headers(published["extras.pt"])
    loaded = torch.load(published["extras.pt"], weights_only=True)
    for name, tensor in loaded["state_dict"].items():
        header = state["state_dict"][name]
        assert isinstance(header, TensorHeader) and header.shape == tuple(tensor.shape), name
        assert "torch." + header.dtype == str(tensor.dtype) and header.numel() == tensor.numel()
    alias, original = state["state_dict"]["alias"], state["state_dict"]["swinViT.patch_embed.proj.weight"]
    assert (alias.storage, alias.offset) == (original.storage, original.offset)
    for name in ("dtype", "device", "size"):  # as a report prints them (json.dumps(default=str))
        assert (repr(state[name]), str(state[name])) == (repr(loaded[name]), str(loaded[name])), name
    assert (state["bytes"], state["set"], state["plan"]) == (b"\x00\xff", {1, 2}, {"edges": (96, 96, 96)})


@pytest.mark.parametrize("architecture", BACKBONES)
def test_the_table_is_the_networks_state_dict(architecture):
    assert network_shapes(architecture, 3, 4) == _built(architecture, 3, 4)


def test_a_network_the_table_does_not_describe_is_left_to_torch():
    assert network_shapes("swinunetr-tiny", 12, 3) is None and network_shapes("swinunetr-b", 12, 1) is None


def test_a_pickle_that_names_os_system_is_refused_without_torch_and_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"swinViT.patch_embed.proj.weight": Exploit(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(VocoInputError, match=r"evil\.pt: refused: it contains pickled code or objects "
                                             r"\(GLOBAL posix\.system\)"):
        read_tensor_headers(tmp_path / "evil.pt")
    seen, result = probe("checkpoint", "inspect", tmp_path / "evil.pt")
    assert seen == {"code": 2, "heavy": []} and result.stdout == ""
    assert result.stderr.startswith(f"error: {tmp_path / 'evil.pt'}: refused: it contains pickled code")
    assert len(result.stderr.splitlines()) == 2 and not marker.exists()  # one error line, then the probe's


def test_torch_objects_it_does_not_model_are_left_to_torch(tmp_path):
    torch.save({"weights": torch.zeros(3, 3).to_sparse()}, tmp_path / "sparse.pt")
    with pytest.raises(NeedsTorch):
        read_tensor_headers(tmp_path / "sparse.pt")


@pytest.mark.parametrize("legacy", [False, True])
def test_a_cut_file_is_unreadable_as_with_torch(tmp_path, legacy):
    torch.save({"weight": torch.zeros(64)}, tmp_path / "whole.pt", _use_new_zipfile_serialization=not legacy)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:-20])
    for read in (read_tensor_headers, layouts.load_checkpoint):
        with pytest.raises(VocoInputError, match=r"cut\.pt: not a readable PyTorch checkpoint \(truncated or corrupt\?\)"):
            read(tmp_path / "cut.pt")
