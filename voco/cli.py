"""``voco`` command line: parses arguments and calls one function per subcommand.

Exit codes: 0 success, 2 bad input (one line on stderr, and an ``error`` event with
``--progress jsonl``), 128 + signal when a job was stopped after saving its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import VocoInputError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2) instead of the usage text."""

    def error(self, message):
        raise VocoInputError(f"{self.prog}: {message}")


def _add_preset_options(p) -> None:
    from .presets import PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default=None, help="method variant (default: v2; demo for the demo)")
    p.add_argument("--grid", help="custom base grid NX,NY,NZ")
    p.add_argument("--crop-edge", type=int, help="custom crop edge in voxels (multiple of 32)")
    p.add_argument("--targets", type=int, help="custom number of target crops per volume")
    p.add_argument("--spacing", help="resample to X,Y,Z mm, or 'native'")
    p.add_argument("--modality", choices=["auto", "ct", "ct-chest", "mri"], default=None,
                   help="intensity preprocessing: CT window -175..250 HU, chest CT -1000..500, MRI z-score")


def build_parser() -> argparse.ArgumentParser:
    from .models.backbones import BACKBONES

    parser = _Parser(prog="voco", description="VoCo pretraining engine for 3D medical images")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("pretrain", help="pretrain a backbone with VoCo (torchrun for several GPUs)")
    p.add_argument("--data", nargs="+", help="images, folders, dataset.json or list files")
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, metrics.jsonl, config.json)")
    _add_preset_options(p)
    p.add_argument("--backbone", choices=BACKBONES, default=None, help="default: swinunetr-b (swinunetr-tiny for CPU)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="volumes per process and step (default 2)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 100)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: the preset's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None, help="steps between progress events (default 1)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")

    p = sub.add_parser("crops", help="draw the crop layout of one image")
    p.add_argument("image")
    p.add_argument("--out", required=True)
    _add_preset_options(p)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("positions", help="predicted vs true target positions of a pretrained model")
    p.add_argument("image")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=int, default=0, help="target whose heatmap goes into positions.nii.gz")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("demo", help="the main job: pretrain on real volumes shipped in packages, draw the results")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    for command in sub.choices.values():
        command.add_argument("--progress", choices=["jsonl", "human"], default="human",
                             help="jsonl: one JSON event per line on stdout (see README)")
    return parser


def _preset(args, default: str):
    from .presets import resolve_preset

    return resolve_preset(args.preset or default, args.grid, args.crop_edge, args.targets, args.spacing)


def cmd_pretrain(args, reporter) -> int:
    from .training.pretrain import PretrainConfig, pretrain, resumable_config

    given = {k: v for k, v in vars(args).items() if v is not None}
    if args.resume:
        config = resumable_config(args.out, given)
        if any(k in given for k in ("preset", "grid", "crop_edge", "targets", "spacing")):
            config.preset = _preset(args, "v2")
    else:
        if not args.data:
            raise VocoInputError("voco pretrain: --data is required (images, folders, dataset.json or list files)")
        config = PretrainConfig(data=args.data, out=args.out, preset=_preset(args, "v2"),
                                backbone=args.backbone or "swinunetr-b")
        for name in ("steps", "batch_size", "checkpoint_every", "lr", "seed", "log_every", "modality"):
            if name in given:
                setattr(config, name, given[name])
    return pretrain(config, reporter, device=args.device, resume=args.resume)


def cmd_crops(args, reporter) -> int:
    from .layout import crop_layout, write_layout

    layout = crop_layout(args.image, _preset(args, "v2"), args.seed, args.modality or "auto")
    paths = write_layout(layout, args.out)
    reporter.emit("done", **{k: str(v) for k, v in paths.items()})
    return 0


def cmd_positions(args, reporter) -> int:
    from .positions import write_positions

    paths = write_positions(args.image, args.checkpoint, args.out, args.seed, args.target, args.device)
    reporter.emit("done", **{k: str(v) for k, v in paths.items()})
    return 0


def cmd_demo(args, reporter) -> int:
    from .demo import run_demo

    return run_demo(args.out, reporter, steps=args.steps)


COMMANDS = {"pretrain": cmd_pretrain, "crops": cmd_crops, "positions": cmd_positions, "demo": cmd_demo}


def main(argv=None) -> int:
    from .jobs.progress import make_reporter

    argv = sys.argv[1:] if argv is None else list(argv)
    # Decided before parsing, so that a usage error also reaches a JSON-lines reader as an event.
    jsonl = "--progress=jsonl" in argv or any(a == "--progress" and b == "jsonl" for a, b in zip(argv, argv[1:]))
    reporter = make_reporter("jsonl" if jsonl else None, rank=int(os.environ.get("RANK", "0")))
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, reporter)
    except VocoInputError as exc:
        message = " ".join(str(exc).split())
        if jsonl:
            reporter.emit("error", message=message)
        print(f"error: {message}", file=sys.stderr)
        return 2
