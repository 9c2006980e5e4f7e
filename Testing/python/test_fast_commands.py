"""Commands that compute nothing answer at once: help, usage errors, the model and sample lists and
``voco checkpoint inspect`` never import torch or MONAI (seconds of imports; the Slicer module runs
``voco models list`` on every enter).

Each command runs in a fresh interpreter that reports which heavy packages it imported. A module-level
``import torch`` anywhere on these paths (cli.py's parser, the registry, model cards, checkpoints.files,
the checkpoint reader) fails here: import torch inside the function that needs tensors instead.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

HEAVY = ("torch", "monai", "nibabel", "scipy")
PROBE = """
import json, sys
import voco.cli
try:
    code = voco.cli.main(sys.argv[1:])
except SystemExit as exit:  # argparse's --help
    code = exit.code
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(%r))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
""" % (HEAVY,)


def probe(*args, env=None) -> tuple[dict, subprocess.CompletedProcess]:
    """(exit code and heavy packages imported, the process) of ``voco ARGS`` in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env=env)
    return json.loads(result.stderr.strip().splitlines()[-1]), result


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from published_files import write_published_layouts

    return write_published_layouts(tmp_path_factory.mktemp("published"))


@pytest.mark.parametrize("args, code", [
    (["--help"], 0), (["pretrain", "--help"], 0), (["segment", "--help"], 0), (["checkpoint", "inspect", "--help"], 0),
    (["pretrain", "--steps", "many"], 2), (["frobnicate"], 2), (["segment", "a.nii.gz"], 2),
    (["models", "list"], 0), (["models", "list", "--progress", "jsonl"], 0),
    (["samples", "list"], 0), (["samples", "list", "--progress", "jsonl"], 0),
])
def test_help_usage_errors_and_lists_import_no_torch(args, code):
    seen, result = probe(*args)
    assert seen == {"code": code, "heavy": []}, result.stderr
    if code == 2:  # a usage error is one line
        assert len(result.stderr.strip().splitlines()) == 2 and result.stderr.startswith("error: voco"), result.stderr


@pytest.mark.parametrize("what", ["VoComni_B.pt", "nnssl_checkpoint_final.pth", "model package"])
@pytest.mark.parametrize("output", [[], ["--json"], ["--progress", "jsonl"]])
def test_checkpoint_inspect_imports_no_torch(published, what, output):
    seen, result = probe("checkpoint", "inspect", published[what], *output)
    assert seen == {"code": 0, "heavy": []}, result.stderr
    assert str(published[what]) in result.stdout


def test_registry_cards_checksums_and_atomic_writes_import_no_torch():
    modules = ("voco.checkpoints.files", "voco.checkpoints.layouts", "voco.registry.registry", "voco.registry.package",
               "voco.models.architectures", "voco.models.network_shapes", "voco.presets", "voco.data.sample_data")
    code = (f"import sys; import {', '.join(modules)}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
