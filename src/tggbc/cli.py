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
    "schedule": ("tggbc.cli", "print the per-layer pruning schedule for an r, n and key count"),
    "bench": ("tggbc.bench", "decoder latency: dense vs tgGBC (reference and fast) at published shapes"),
    "data": ("tggbc.data.cli", "generate synthetic six-camera driving scenes in nuScenes format"),
    "train": ("tggbc.detector.train", "train the small PETR-style detector on generated scenes"),
    "eval": ("tggbc.detector.evaluate", "nuScenes mAP/NDS of a detector, dense and with tgGBC"),
    "bound": (
        "tggbc.detector.bound",
        "mAP ceiling when depth is read from pixels to a given precision, vs a submission",
    ),
    "probe": ("tggbc.detector.probe", "the dense head's proposals by distance: found, pixel and depth error"),
    "export": ("tggbc.export.cli", "export a tgGBC-pruned decoder to ONNX"),
    "demo": ("tggbc.demo", "the main job: accuracy and speed of tgGBC, with plots"),
}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is not there either
        return False


def parse_r(text: str) -> int | float | list[int]:
    """'21000' -> 21000 keys, '0.875' -> fraction of the keys, '4000,4000,0,0,0,0' -> per layer."""
    try:
        if "," in text:
            return [int(x) for x in text.split(",")]
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"r must be an int (keys), a fraction like 0.875, or a comma list of ints, got {text!r}"
        ) from None


def add_prune_arguments(parser: argparse.ArgumentParser, r_default: str | None = None) -> None:
    """The tgGBC setting shared by every command that runs a decoder."""
    parser.add_argument(
        "--r", type=parse_r, default=r_default, help="keys to drop: count, fraction (0.875) or per-layer list"
    )
    parser.add_argument("--n", type=int, default=1, help="number of decoder layers that prune (default 1)")
    parser.add_argument("--k", type=int, default=-1, help="top-k confident queries that vote (<= 0: all)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prune_arguments(parser, r_default="0.875")
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
