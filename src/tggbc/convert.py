"""`tggbc convert`: an official PETR-family checkpoint -> a safetensors file for a tggbc detector.

    tggbc convert stream_petr_r50_24e.pth --model stream_petr_r50_flash_704_bs2_seq_24e \\
        --out streampetr_r50.safetensors

The checkpoint is read with torch.load(weights_only=True): tensors and plain data only, never
code. Every tensor is mapped onto the detector the config name builds; the stored settings
(pc_range, position_range, depth bins) are compared with the model's; anything missing or unused
is listed, and the conversion is refused unless --allow-partial. The output is written
atomically and never replaces an existing file without --force.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["convert_file"]


def convert_file(checkpoint, model: str, out, *, allow_partial: bool = False, force: bool = False):
    """The API of `tggbc convert`.

    Args:
        checkpoint: path of the official checkpoint (.pth).
        model: a published config name or alias (see `tggbc.models.PUBLISHED_CONFIGS`).
        out: the .safetensors file to write.
        allow_partial: write even if tensors are missing or unused (never with a shape or setting mismatch).
        force: replace an existing `out`.
    Returns:
        the ConvertedCheckpoint (mapped state dict, missing, unused, checked constants, ignored).
    Raises:
        FileNotFoundError, FileExistsError, ValueError with the file, tensor or setting named.
    """
    from .files import prepare_output_file, write_atomic
    from .models.checkpoint import check_fit, convert_checkpoint, read_checkpoint, save_converted
    from .models.detectors import build_detector

    if not os.fspath(out).endswith(".safetensors"):
        raise ValueError(f"--out {out} must be a .safetensors file")
    prepare_output_file(out, force, what="--out")
    detector = build_detector(model, pruner=None)
    converted = convert_checkpoint(read_checkpoint(checkpoint), detector)
    check_fit(converted, detector.config.name, allow_partial)
    write_atomic(out, lambda tmp: save_converted(tmp, converted, detector.config.name))
    return converted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import existing_file

    parser.add_argument("checkpoint", type=existing_file, help="official checkpoint (.pth, mmcv or bare state dict)")
    parser.add_argument("--model", required=True, help="published config name or alias (an unknown name lists them)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    parser.add_argument(
        "--allow-partial", action="store_true", help="write even if some tensors are missing or unused (listed)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    from .models.checkpoint import describe_fit
    from .models.configs import published_config

    name = published_config(args.model).name  # unknown names fail before the checkpoint is read
    converted = convert_file(args.checkpoint, name, args.out, allow_partial=args.allow_partial, force=args.force)
    print(describe_fit(converted, name))
    print(f"wrote {args.out}")
    return 0
