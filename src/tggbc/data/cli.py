"""`tggbc data ...` subcommands. Importing this module is cheap: the generator is imported in `run`."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `data` subcommands (currently `synth`) to `parser`."""
    from tggbc.cli import float_between, int_at_least, nonnegative_int, positive_int

    commands = parser.add_subparsers(dest="data_command", metavar="COMMAND")
    commands.required = True
    synth = commands.add_parser(
        "synth",
        help="generate a synthetic six-camera dataset in the nuScenes table schema",
        description="Generate synthetic driving scenes (six cameras, LIDAR_TOP, 10 detection classes) as a nuScenes"
        " v1.0-trainval dataroot that nuscenes-devkit loads and evaluates (eval_set='val').",
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="dataroot to create (must not exist unless --force)")
    synth.add_argument(
        "--scenes", type=positive_int, default=10, metavar="N", help="total number of scenes (default 10)"
    )
    synth.add_argument("--seed", type=nonnegative_int, default=0, metavar="S", help="random seed, >= 0 (default 0)")
    synth.add_argument(
        "--frames", type=int_at_least(2), default=8, metavar="F", help="keyframes per scene at 2 Hz (default 8)"
    )
    synth.add_argument("--width", type=positive_int, default=704, metavar="W", help="image width (default 704)")
    synth.add_argument("--height", type=positive_int, default=256, metavar="H", help="image height (default 256)")
    synth.add_argument(
        "--val-fraction", type=float_between(0, 1), default=0.2, help="fraction of scenes in val (default 0.2)"
    )
    synth.add_argument("--force", action="store_true", help="replace DIR if it exists")
    synth.add_argument("--workers", type=positive_int, default=1, help="parallel worker processes (default 1)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the parsed `data` subcommand. Returns a process exit code."""
    if args.data_command != "synth":
        print(f"unknown data command: {args.data_command}", file=sys.stderr)
        return 2
    from tggbc.data.generator import generate

    out = generate(
        args.out,
        num_scenes=args.scenes,
        seed=args.seed,
        image_size=(args.width, args.height),
        frames_per_scene=args.frames,
        val_fraction=args.val_fraction,
        force=args.force,
        progress=not args.quiet,
        workers=args.workers,
    )
    print(f"wrote {out}")
    return 0
