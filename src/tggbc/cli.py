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
    "convert": ("tggbc.convert", "convert an official StreamPETR / PETR / FocalPETR checkpoint for a tggbc detector"),
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


# ----------------------------------------------------------------- argument types
# One parser per kind of value: argparse prefixes their messages with the option's name
# ("argument --threads: must be an integer >= 1, got '0'") and exits with status 2.


def int_at_least(low: int):
    """argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_between(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite number in the interval from low to high (open ends as given)."""
    import math

    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def existing_file(text: str) -> str:
    """argparse type: a path to a readable regular file."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"not a file: {text}")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot read {text}: permission denied")
    return text


def existing_dir(text: str) -> str:
    """argparse type: a path to a directory."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"not a directory: {text}")
    return text


def device_argument(text: str) -> str:
    """argparse type: a torch device this machine has ('cpu', 'cuda', 'cuda:1')."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device here (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: tggbc runs on cpu or cuda")
    return text


def image_size_argument(text: str) -> tuple[int, int]:
    """argparse type of --image-size: HxW (network input height x width, multiples of 32)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be HxW such as 256x704, got {text!r}") from None
    if h < 32 or w < 32 or h % 32 or w % 32:
        raise argparse.ArgumentTypeError(f"height and width must be positive multiples of 32, got {text!r}")
    return h, w


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: all)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op threads from --threads (validated by its type)."""
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)


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
        "--n",
        type=nonnegative_int,
        default=n,
        help=f"decoder layers that prune{'' if n is None else f' (default {n})'}",
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
    parser.add_argument("--keys", type=positive_int, default=None, help="image keys per sample (overrides the preset)")
    parser.add_argument("--queries", type=positive_int, default=None, help="learnable queries (default: the host's)")
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
        kind=base.kind if args.kind is None else args.kind,
        keys=base.keys if args.keys is None else args.keys,
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
    parser.add_argument("--keys", type=positive_int, default=24000, help="keys the decoder starts with")
    parser.add_argument("--layers", type=positive_int, default=6, help="decoder layers")


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
    """Run one command. Exit status: 0 done, 2 bad input (one line on stderr naming it), 3 a
    missing optional package, 130 interrupted (Ctrl-C)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("tggbc: interrupted", file=sys.stderr)
        return 130
    if not hasattr(args, "_run"):
        parser.print_help()
        return 0
    if os.environ.get("TGGBC_TRACEBACK"):  # debugging: let errors through with their traceback
        return int(args._run(args) or 0)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        # Outputs are written atomically: an interrupted command leaves no half-written file.
        print(f"tggbc {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as e:
        # Bad settings and files are the user's to fix: one clear line, no traceback.
        print(f"tggbc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"tggbc {args.command}: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
