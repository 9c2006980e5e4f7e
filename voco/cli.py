"""``voco`` command line: parses arguments and calls one function per subcommand.

Exit codes: 0 success, 2 bad input (one line on stderr, and an ``error`` event with
``--progress jsonl``; this includes training data whose loss is not finite five steps in a row,
and a full disk), 128 + signal when a job was stopped after saving its checkpoint.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from .errors import VocoInputError

# Help, usage errors, `models list`, `samples list` and `checkpoint inspect` import neither torch nor
# MONAI (seconds; the Slicer module lists models on every enter): the parser takes its choices from
# torch-free modules (models.architectures, presets) and each command imports what it computes with
# inside its function. Testing/python/test_fast_commands.py fails on a heavy import on these paths.


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2) instead of the usage text."""

    def error(self, message):
        raise VocoInputError(f"{self.prog}: {message}")


def _seed(text: str) -> int:
    """A seed numpy's and torch's generators both take (torch refuses a negative one or one above 2**64)."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED}, got {text!r}")
    return seed


MAX_SEED = 2**32 - 1


def _add_preset_options(p) -> None:
    from .presets import PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default=None, help="method variant (default: v2; demo for the demo)")
    p.add_argument("--grid", help="custom base grid NX,NY,NZ")
    p.add_argument("--crop-edge", type=int, help="custom crop edge in voxels (multiple of 32)")
    p.add_argument("--targets", type=int, help="custom number of target crops per volume")
    p.add_argument("--spacing", help="resample to X,Y,Z mm, or 'native'")
    p.add_argument("--norm-scope", choices=["volume", "batch"], default=None,
                   help="projection-head normalisation over the crops of each volume (default; a DDP split "
                        "changes nothing) or of the whole batch in the process (the official code)")
    p.add_argument("--modality", choices=["auto", "ct", "ct-chest", "mri"], default=None,
                   help="intensity preprocessing: CT window -175..250 HU, chest CT -1000..500, MRI z-score")


def _workers(text: str) -> int:
    try:
        workers = int(text)
    except ValueError:
        workers = -1
    if workers < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, got {text!r}")
    return workers


def _add_workers_option(p, what: str) -> None:
    p.add_argument("--workers", type=_workers, default=None, help=f"{what} (default: min(4, CPUs - 1))")


def _default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def _add_finetuning_options(p) -> None:
    """The fine-tuning settings voco finetune and voco evaluate both take."""
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None, help="training patch edge in voxels (multiple of 32)")
    p.add_argument("--modality", choices=["auto", "ct", "ct-chest", "mri"], default=None)
    p.add_argument("--lr", type=float, default=None)


def build_parser() -> argparse.ArgumentParser:
    from .models.architectures import BACKBONES

    parser = _Parser(prog="voco", description="VoCo pretraining engine for 3D medical images")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("pretrain", help="pretrain a backbone with VoCo (torchrun for several GPUs)")
    p.add_argument("--data", nargs="+", help="images, folders, dataset.json or list files; or one store "
                                             "made by voco preprocess, streamed")
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, metrics.jsonl, config.json)")
    _add_preset_options(p)
    p.add_argument("--backbone", choices=BACKBONES, default=None, help="default: swinunetr-b (swinunetr-tiny for CPU)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="volumes per process and step (default 2)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 100)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: the preset's)")
    p.add_argument("--seed", type=_seed, default=None)
    p.add_argument("--log-every", type=int, default=None, help="steps between progress events (default 1)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    _add_workers_option(p, "processes reading a store's patches ahead (0: in the training process)")

    p = sub.add_parser("preprocess", help="preprocess volumes once into a store that voco pretrain (or, with "
                                          "--labels, voco finetune) streams")
    p.add_argument("--data", nargs="+", required=True, help="images, folders, dataset.json or list files; with "
                                                            "--labels, one labelled dataset as voco finetune takes it")
    p.add_argument("--out", required=True, help="store folder (plan.json, index.json, one .vox file per volume)")
    p.add_argument("--labels", action="store_true",
                   help="store each case's label map too, preprocessed for voco finetune (--spacing, default 1.5; "
                        "--modality; --patch-size)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="with --labels: the largest fine-tuning patch edge; cases are padded to it (default 96)")
    _add_preset_options(p)
    _add_workers_option(p, "processes preprocessing volumes in parallel")

    p = sub.add_parser("crops", help="draw the crop layout of one image")
    p.add_argument("image")
    p.add_argument("--out", required=True)
    _add_preset_options(p)
    p.add_argument("--seed", type=_seed, default=0)

    p = sub.add_parser("positions", help="predicted vs true target positions of a pretrained model")
    p.add_argument("image")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--target", type=int, default=0, help="target whose heatmap goes into positions.nii.gz")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("finetune", help="fine-tune a segmentation network on labelled volumes")
    p.add_argument("--data", help="dataset.json (MSD / nnU-Net v2), a folder with imagesTr/ + labelsTr/, or a "
                                  "store made by voco preprocess --labels, streamed")
    p.add_argument("--out", required=True, help="run folder (last.pt, best.pt, metrics.jsonl, model/)")
    p.add_argument("--init", help="starting weights: a checkpoint of any published layout, a model package or a "
                                  "registry name (default: random initialisation)")
    p.add_argument("--backbone", choices=BACKBONES, default=None,
                   help="architecture (default: the one of --init, else swinunetr-tiny)")
    p.add_argument("--steps", type=int, default=None)
    _add_finetuning_options(p)
    p.add_argument("--spacing", help="resample to X,Y,Z mm (default: that of --init's model card, else 1.5)")
    p.add_argument("--val-every", type=int, default=None, help="steps between validations")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--val-cases", type=int, default=None, help="cases held out for validation (default: 1 in 5)")
    p.add_argument("--name", help="name of the resulting model (default: the run folder's name)")
    p.add_argument("--seed", type=_seed, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    _add_workers_option(p, "processes reading a store's patches ahead (0: in the training process)")

    p = sub.add_parser("evaluate", help="does an initialisation help? fine-tune from each, score on held-out cases")
    p.add_argument("--data", required=True, help="labelled dataset, as voco finetune takes it")
    p.add_argument("--init", action="append", required=True,
                   help="an initialisation to compare (repeat): scratch (random weights), or [LABEL=]a checkpoint, "
                        "model package or registry name, as voco finetune --init takes it")
    p.add_argument("--seeds", type=int, required=True, help="seeds 0..N-1: data order, subset and head weights")
    p.add_argument("--steps", type=int, required=True, help="fine-tuning steps of every run")
    p.add_argument("--fractions", help="fractions of the training cases to fine-tune on, e.g. 1,0.5,0.25 (default 1)")
    p.add_argument("--test-cases", help="case names never trained on, comma-separated (default: one case in five)")
    p.add_argument("--out", required=True,
                   help="folder: config.json, runs/, results/, evaluation.json, evaluation.png")
    p.add_argument("--backbone", choices=BACKBONES, default=None,
                   help="architecture (default: the one of the first --init that has one, else swinunetr-tiny)")
    _add_finetuning_options(p)
    p.add_argument("--spacing", help="resample to X,Y,Z mm (default 1.5)")
    p.add_argument("--val-every", type=int, default=None, help="steps between test-Dice points of the learning curve")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (under torchrun: cuda:LOCAL_RANK)")

    p = sub.add_parser("segment", help="segment a volume with a model package or registry model")
    p.add_argument("image")
    p.add_argument("output", help="label map to write (.nii.gz, .nii or .nrrd); a .json sidecar goes beside it")
    p.add_argument("--model", required=True, help="model package folder or installed/registry model name")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--fast", action="store_true", help="coarser spacing: several times faster, less detail")
    p.add_argument("--tta", action="store_true", help="average over the 8 axis mirrorings (8x slower)")
    roi = p.add_mutually_exclusive_group()
    roi.add_argument("--roi", help="x0,y0,z0,x1,y1,z1 in voxels of IMAGE (end exclusive)")
    roi.add_argument("--roi-ras", help="x0,y0,z0,x1,y1,z1: two opposite corners in RAS millimetres")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: 4 on GPU, 1 on CPU)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap in [0, 1) (default 0.5)")
    p.add_argument("--precision", choices=["auto", "float32"], default="auto",
                   help="auto: float16 on CUDA, bfloat16 on CPUs with native support; float32: reproducible")
    p.add_argument("--uncompressed", action="store_true",
                   help="write a .nrrd label map raw (.nii is always uncompressed): quicker to write and read back")

    p = sub.add_parser("serve", help="a warm engine: segment requests as JSON lines on stdin, events on stdout")
    p.add_argument("--cache-size", type=int, default=None,
                   help="networks kept loaded on their device (default: $VOCO_SERVE_CACHE, else 2)")

    p = sub.add_parser("checkpoint", help="look into checkpoint files")
    checkpoint = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    q = checkpoint.add_parser("inspect", help="detected layout, architecture and what loads into it")
    q.add_argument("path")
    q.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("models", help="the model registry: list, download, import")
    models = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    models.add_parser("list", help="registry and installed models")
    q = models.add_parser("download", help="download a registry model into the cache")
    q.add_argument("name")
    q.add_argument("--sha256", help="expected checksum, for entries that publish none")
    q = models.add_parser("import", help="install a local model package, .zip or checkpoint (offline sites)")
    q.add_argument("path")
    q.add_argument("--name", help="name to install it under")

    p = sub.add_parser("samples", help="real volumes that ship inside PyPI wheels: list, fetch (checked by sha256)")
    samples = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    samples.add_parser("list", help="the sample volumes")
    q = samples.add_parser("fetch", help="download one into the cache and print its path")
    q.add_argument("name")

    p = sub.add_parser("demo", help="the main job: pretrain on real volumes shipped in packages, draw the results")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the demo's)")
    p.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps (default: the demo's)")
    for command in _leaf_parsers(sub):
        command.add_argument("--progress", choices=["jsonl", "human"], default="human",
                             help="jsonl: one JSON event per line on stdout (see README)")
    return parser


def _leaf_parsers(subparsers):
    for command in subparsers.choices.values():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            yield from _leaf_parsers(nested[0])
        else:
            yield command


def _preset(args, default: str):
    from .presets import resolve_preset

    return resolve_preset(args.preset or default, args.grid, args.crop_edge, args.targets, args.spacing,
                          args.norm_scope)


def cmd_pretrain(args, reporter) -> int:
    from .jobs.run_lock import run_lock

    with run_lock(args.out, rank=int(os.environ.get("RANK", "0"))):
        return _pretrain(args, reporter)


def _pretrain(args, reporter) -> int:
    from .training.pretrain import PretrainConfig, pretrain, resumable_config

    given = {k: v for k, v in vars(args).items() if v is not None}
    if args.resume:
        config = resumable_config(args.out, given)
        if any(k in given for k in ("preset", "grid", "crop_edge", "targets", "spacing", "norm_scope")):
            config.preset = _preset(args, "v2")
    else:
        if not args.data:
            raise VocoInputError("voco pretrain: --data is required (images, folders, dataset.json or list files)")
        config = PretrainConfig(data=args.data, out=args.out, preset=_preset(args, "v2"),
                                backbone=args.backbone or "swinunetr-b")
        for name in ("steps", "batch_size", "checkpoint_every", "lr", "seed", "log_every", "modality"):
            if name in given:
                setattr(config, name, given[name])
    workers = _default_workers() if args.workers is None else args.workers
    return pretrain(config, reporter, device=args.device, resume=args.resume, workers=workers)


def cmd_preprocess(args, reporter) -> int:
    from .data.preprocess_store import preprocess_store
    from .data.sources import list_images
    from .data.volumes import Preprocessing
    from .jobs.run_lock import run_lock

    workers = _default_workers() if args.workers is None else args.workers
    if args.labels:
        options, pairs, names = _labelled_preprocessing(args)
        with run_lock(args.out):
            counts = preprocess_store([image for image, _ in pairs], args.out, options, reporter, workers,
                                      label_maps=[label for _, label in pairs], label_names=names)
    else:
        if args.patch_size is not None:
            raise VocoInputError("voco preprocess: --patch-size is for --labels; a preset sets pretraining's patches")
        options = Preprocessing.for_preset(_preset(args, "v2"), args.modality or "auto")
        images = list_images(args.data)
        with run_lock(args.out):
            counts = preprocess_store(images, args.out, options, reporter, workers)
    reporter.emit("done", **counts)
    return 0


def _labelled_preprocessing(args):
    """``voco preprocess --labels``: fine-tuning's preprocessing, the cases and their label names."""
    from .data.sources import dataset_label_names, list_labelled_cases
    from .data.volumes import Preprocessing
    from .presets import parse_triple
    from .training.finetune import DEFAULT_SPACING, FinetuneConfig

    pretraining = [f"--{name.replace('_', '-')}" for name in ("preset", "grid", "crop_edge", "targets", "norm_scope")
                   if getattr(args, name) is not None]
    if pretraining:
        raise VocoInputError(f"voco preprocess --labels: {pretraining[0]} is a pretraining option")
    if len(args.data) != 1:
        raise VocoInputError("voco preprocess --labels: --data takes one labelled dataset (dataset.json or a folder "
                             "with imagesTr/ + labelsTr/)")
    patch = 96 if args.patch_size is None else args.patch_size
    FinetuneConfig(data=args.data[0], out=args.out, patch_size=patch).validate()
    spacing = parse_triple(args.spacing, float, "--spacing") if args.spacing else DEFAULT_SPACING
    options = Preprocessing(modality=args.modality or "auto", spacing=spacing, pad_to=(patch,) * 3)
    return options, list_labelled_cases(args.data[0]), dataset_label_names(args.data[0])


def cmd_crops(args, reporter) -> int:
    from .checkpoints.files import check_output_folder
    from .layout import crop_layout, write_layout

    check_output_folder(args.out)
    layout = crop_layout(args.image, _preset(args, "v2"), args.seed, args.modality or "auto")
    paths = write_layout(layout, args.out)
    reporter.emit("done", **{k: str(v) for k, v in paths.items()})
    return 0


def cmd_positions(args, reporter) -> int:
    from .checkpoints.files import check_output_folder
    from .positions import write_positions

    check_output_folder(args.out)
    paths = write_positions(args.image, args.checkpoint, args.out, args.seed, args.target, args.device)
    reporter.emit("done", **{k: str(v) for k, v in paths.items()})
    return 0


def cmd_demo(args, reporter) -> int:
    from .checkpoints.files import check_output_folder
    from .demo import run_demo

    check_output_folder(args.out)
    return run_demo(args.out, reporter, steps=args.steps, finetune_steps=args.finetune_steps)


def cmd_finetune(args, reporter) -> int:
    from .jobs.run_lock import run_lock
    from .training.finetune import finetune_from_args

    with run_lock(args.out):
        return finetune_from_args(args, reporter, _default_workers() if args.workers is None else args.workers)


def cmd_evaluate(args, reporter) -> int:
    from .training.evaluate import evaluate_from_args

    return evaluate_from_args(args, reporter)  # it takes the folder's lock itself (rank 0)


def cmd_segment(args, reporter) -> int:
    from .inference.segment import segment_from_args

    return segment_from_args(args, reporter)


def cmd_serve(args, reporter) -> int:
    from .inference.serve import serve

    return serve(size=args.cache_size)


def cmd_checkpoint(args, reporter) -> int:
    import json

    from .checkpoints.layouts import describe_inspection, inspect_checkpoint

    report = inspect_checkpoint(args.path)
    if args.progress == "jsonl":  # stdout carries only events: the report is the "done" event
        reporter.emit("done", **report)
    else:
        print(json.dumps(report, indent=1, default=str) if args.json else describe_inspection(report))
    return 0


def cmd_models(args, reporter) -> int:
    from .registry import registry

    if args.action == "list":
        models = registry.list_models()
        if args.progress == "jsonl":  # stdout carries only events
            reporter.emit("models", models=models, cache=str(registry.models_dir()))
        else:
            print(registry.describe_models(models))
        return 0
    if args.action == "download":
        path = registry.download(args.name, reporter, sha256=args.sha256)
    else:
        path = registry.import_model(args.path, reporter, name=args.name)
    reporter.emit("done", path=str(path))
    return 0


def cmd_samples(args, reporter) -> int:
    from .data import sample_data

    if args.action == "list":
        samples = [{"name": s.name, "modality": s.modality, "description": s.description} for s in sample_data.SAMPLES]
        if args.progress == "jsonl":  # stdout carries only events
            reporter.emit("samples", samples=samples)
        else:
            print("\n".join(f"{s['name']:<22} {s['modality']:<6} {s['description']}" for s in samples))
        return 0
    path = sample_data.fetch(args.name)
    if args.progress == "jsonl":
        reporter.emit("done", path=str(path))
    else:
        print(path)
    return 0


COMMANDS = {"pretrain": cmd_pretrain, "preprocess": cmd_preprocess, "crops": cmd_crops, "positions": cmd_positions,
            "finetune": cmd_finetune, "evaluate": cmd_evaluate, "segment": cmd_segment, "serve": cmd_serve,
            "checkpoint": cmd_checkpoint, "models": cmd_models, "samples": cmd_samples, "demo": cmd_demo}


def main(argv=None) -> int:
    from .jobs.progress import make_reporter
    from .jobs.quiet_monai import quiet_monai

    argv = sys.argv[1:] if argv is None else list(argv)
    # Decided before parsing, so that a usage error also reaches a JSON-lines reader as an event.
    jsonl = "--progress=jsonl" in argv or any(a == "--progress" and b == "jsonl" for a, b in zip(argv, argv[1:]))
    reporter = make_reporter("jsonl" if jsonl else None, rank=int(os.environ.get("RANK", "0")))
    quiet_monai()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, reporter)
    except VocoInputError as exc:
        return _report_error(str(exc), reporter, jsonl)
    except OSError as exc:
        # A safety net: the commands check their paths first (VocoInputError); one they missed
        # still gets the one line. Other errors are bugs and keep their traceback.
        if exc.errno not in _PATH_ERRNOS or exc.filename is None:
            raise
        return _report_error(f"{exc.filename}: {exc.strerror}", reporter, jsonl)


# What an OSError about a path the user gave means: the user's folder, not our code, is at fault.
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOSPC, errno.EROFS,
                errno.EDQUOT}


def _report_error(message: str, reporter, jsonl: bool) -> int:
    message = " ".join(message.split())
    if jsonl:
        reporter.emit("error", message=message)
    print(f"error: {message}", file=sys.stderr)
    return 2

