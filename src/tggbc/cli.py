"""The `tggbc` command line.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`;
this file only dispatches, so `tggbc --help` stays fast and optional dependencies are imported
by the one command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("tggbc.demo", "the main job: tgGBC's accuracy against its controls, and its speed, with plots"),
    "schedule": ("tggbc.cli", "print the per-layer pruning schedule for an r, n and key count"),
    "bench": ("tggbc.bench", "decoder latency: dense vs tgGBC (reference and fast) at the published shapes"),
    "export": ("tggbc.export.cli", "export a decoder with tgGBC inside to ONNX, checked against PyTorch"),
    "data": ("tggbc.data.cli", "generate synthetic six-camera driving scenes in nuScenes format"),
    "train": ("tggbc.detector.train", "train the synthetic-scene detector (defaults: the shipped recipe)"),
    "eval": ("tggbc.detector.evaluate", "nuScenes mAP/NDS of the detector: dense, tgGBC and its controls"),
}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is not there either
        return False


def r_argument(text: str) -> int | float | list[int]:
    """argparse type of every --r: `tggbc.prune.parse_r`, its error as an argparse error."""
    from .prune import parse_r

    try:
        return parse_r(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_prune_arguments(
    parser: argparse.ArgumentParser, r: str | None = None, n: int | None = 1, k: int | None = -1, k_help: str = ""
) -> None:
    """--r, --n, --k: the tgGBC setting of every command that runs a decoder (None: the command's own default)."""
    parser.add_argument(
        "--r",
        type=r_argument,
        default=None if r is None else r_argument(r),
        metavar="R",
        help=f"keys to drop: a count, a fraction (0.875) or a per-layer list{'' if r is None else f' (default {r})'}",
    )
    parser.add_argument(
        "--n", type=int, default=n, help=f"decoder layers that prune{'' if n is None else f' (default {n})'}"
    )
    parser.add_argument(
        "--k", type=int, default=k, help=k_help or f"top-k confident queries that vote, <= 0: all (default {k})"
    )


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset and what may override it (--kind, --keys, --queries, --r, --n, --k): the decoder
    and tgGBC setting `resolve_setting` reads. Shared by `tggbc bench` and `tggbc export`."""
    from .models.configs import DECODER_KINDS, DECODER_PRESETS

    parser.add_argument(
        "--preset", default=None, help=f"one of: {', '.join(DECODER_PRESETS)} (default streampetr-v2-99-1600x640)"
    )
    parser.add_argument("--kind", choices=DECODER_KINDS, default=None, help="host decoder")
    parser.add_argument("--keys", type=int, default=None, help="image keys per sample (overrides the preset)")
    parser.add_argument("--queries", type=int, default=None, help="learnable queries (default: the host's)")
    add_prune_arguments(
        parser, r=None, n=None, k=None, k_help="top-k voting queries, <= 0: all (default: the preset's)"
    )


def preset_title(name: str, preset) -> str:
    return f"preset {name}: {preset.kind} decoder, {preset.keys} keys, r={preset.r} n={preset.n} k={preset.k}"


def resolve_setting(args: argparse.Namespace):
    """The DecoderPreset the --preset / --kind / --keys / --r / --n / --k options describe, and its name."""
    from .models.configs import DECODER_PRESETS, DecoderPreset

    if args.preset is not None and args.preset not in DECODER_PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; known: {', '.join(DECODER_PRESETS)}")
    base = DECODER_PRESETS[args.preset or "streampetr-v2-99-1600x640"]
    preset = DecoderPreset(
        kind=args.kind or base.kind,
        keys=args.keys or base.keys,
        r=base.r if args.r is None else args.r,
        n=base.n if args.n is None else args.n,
        k=base.k if args.k is None else args.k,
        note=base.note if args.preset else "custom",
    )
    name = args.preset or "custom"
    if any(v is not None for v in (args.kind, args.keys, args.r, args.n, args.k)) and args.preset:
        name += " (modified)"
    return name, preset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prune_arguments(parser, r="0.875")
    parser.add_argument("--keys", type=int, default=24000, help="keys the decoder starts with")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers")


def run(args: argparse.Namespace) -> int:
    from .prune import prune_schedule

    schedule = prune_schedule(args.r, args.n, args.layers, num_keys=args.keys)
    seen = [args.keys]
    for drop in schedule[:-1]:
        seen.append(seen[-1] - drop)
    print(f"{'layer':>5}  {'keys in':>8}  {'dropped after':>13}")
    for layer, (keys, drop) in enumerate(zip(seen, schedule, strict=True), start=1):
        print(f"{layer:>5}  {keys:>8}  {drop:>13}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tggbc",
        description="tgGBC: zero-shot attention key pruning for query-based 3D detectors.",
    )
    parser.add_argument("--version", action="version", version=f"tggbc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if not _available(module):
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = sys.modules[__name__] if module == __name__ else importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 0
    if os.environ.get("TGGBC_TRACEBACK"):  # debugging: let errors through with their traceback
        return int(args._run(args) or 0)
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as e:
        # Bad settings and files are the user's to fix: one clear line, no traceback.
        print(f"tggbc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"tggbc {args.command}: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
