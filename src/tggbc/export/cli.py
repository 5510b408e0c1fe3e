"""`tggbc export`: a host decoder (or a trained detector's decoder) with tgGBC inside, to ONNX.

    tggbc export --preset streampetr-v2-99-1600x640 --out streampetr.onnx
    tggbc export --kind petr --keys 16896 --r 12000 --n 3 --k 175 --out petr.onnx --padded
    tggbc export --weights detector.safetensors --out detector.onnx --r 0.75
    tggbc export --model stream_petr_r50_flash_704_bs2_seq_24e --weights streampetr_r50.safetensors \
        --out streampetr_r50.onnx                        # the whole detector (tggbc.export.detector)

After writing the file it is checked with onnx.checker and, unless --no-compare, run in ONNX
Runtime on random inputs next to the eager PyTorch decoder; the largest output difference is
printed (float32 graphs must stay within 1e-4). Preset decoders have random weights: they are
for latency and deployment trials; --weights exports trained ones.

Imports only argparse and torch at load time.
"""

from __future__ import annotations

import argparse
import os
import sys

FP32_TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import (
        add_setting_arguments,
        add_threads_argument,
        existing_file,
        image_size_argument,
        nonnegative_int,
        positive_int,
    )

    parser.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    add_setting_arguments(parser)
    parser.add_argument(
        "--weights",
        type=existing_file,
        default=None,
        metavar="FILE",
        help="a small-detector weights file from `tggbc train`: export its trained decoder (keys from its config)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="export a whole published detector (config name or alias); --weights is then its `tggbc convert` file",
    )
    parser.add_argument(
        "--image-size", type=image_size_argument, default=None, metavar="HxW", help="with --model: input size"
    )
    parser.add_argument(
        "--frames", type=positive_int, default=3, help="with --model: consecutive frames checked (default 3)"
    )
    parser.add_argument("--dense", action="store_true", help="export without tgGBC (r = 0)")
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size the graph is built for")
    parser.add_argument("--padded", action="store_true", help="add a key_padding_mask input")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--opset", type=positive_int, default=None, help="ONNX opset, 18 or newer (default 20)")
    parser.add_argument("--all-layers", action="store_true", help="output every layer's predictions")
    parser.add_argument("--kept-keys", action="store_true", help="also output the kept key indices")
    parser.add_argument(
        "--optimize",
        choices=["light", "full", "none"],
        default="light",
        help="graph clean-up: constant folding and dead nodes (light), plus onnxscript's rewrites (full), or none",
    )
    parser.add_argument("--no-compare", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    add_threads_argument(parser)
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random weights (presets) and check inputs")
    parser.add_argument("--verbose", action="store_true", help="show the exporter's messages")


def load_detector_decoder(path: str):
    """The decoder of a trained small detector and its keys per frame.

    Reads a weights file written by `tggbc train` (`tggbc.detector.weights.load_detector`).

    Returns:
        (PETRDecoder, keys per frame, the detector's query count).
    """
    from ..models.decoder import PETRFamilyDecoder

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights {path}: no such file (pass a weights file written by `tggbc train`)")
    try:
        from ..detector.weights import load_detector
    except ImportError as e:
        raise ImportError(f"--weights needs the small detector (tggbc.detector), which failed to import: {e}") from e
    try:
        model = load_detector(path)
    except ImportError as e:
        raise ImportError(f"--weights needs {e.name or 'an optional package'}: pip install 'tggbc[eval]'") from e
    decoder = getattr(model, "decoder", None)
    if not isinstance(decoder, PETRFamilyDecoder):
        raise TypeError(f"{path} loaded as {type(model).__name__}, which has no PETR-family decoder to export")
    return decoder, model.config.num_keys, decoder.num_queries


def run(args: argparse.Namespace) -> int:
    import torch

    from ..cli import apply_threads, resolve_setting
    from ..files import prepare_output_file
    from ..models import build_decoder
    from .onnx import DEFAULT_OPSET, compare_onnx, export_onnx

    apply_threads(args)
    if not args.out.endswith(".onnx"):
        raise ValueError(f"--out {args.out}: give a file name ending in .onnx")
    if args.model is not None:
        return run_model(args)
    if args.image_size is not None:
        raise ValueError("--image-size is for --model (a whole detector)")
    prepare_output_file(args.out, args.force, what="--out")
    if args.weights is not None:
        if args.preset is not None or args.kind is not None:
            raise ValueError("--weights exports the detector's own decoder: drop --preset / --kind")
        if args.keys is not None or args.queries is not None:
            raise ValueError("--weights fixes keys and queries (the detector's image size and queries)")
        decoder, num_keys, num_queries = load_detector_decoder(args.weights)
        # Defaults: the StreamPETR preset's fraction and n, k scaled to the queries as 175 of 900.
        r = 0.875 if args.r is None else args.r
        n = 1 if args.n is None else args.n
        k = max(1, round(175 * num_queries / 900)) if args.k is None else args.k
        what = f"{type(decoder).__name__} from {args.weights}"
        queries = True  # the detector selects its queries per frame: they are graph inputs
    else:
        name, preset = resolve_setting(args)  # unknown preset -> ValueError naming the known ones
        torch.manual_seed(args.seed)
        kwargs = {} if args.queries is None else {"num_queries": args.queries}
        decoder = build_decoder(preset.kind, **kwargs).eval().requires_grad_(False)
        num_keys, r, n, k = preset.keys, preset.r, preset.n, preset.k
        what = f"{preset.kind} decoder ({name}, random weights)"
        queries = False
    if args.dense:
        r = 0
    result = export_onnx(
        decoder,
        args.out,
        num_keys=num_keys,
        r=r,
        n=n,
        k=k,
        batch=args.batch,
        padded=args.padded,
        queries=queries,
        dtype=args.dtype,
        opset=args.opset or DEFAULT_OPSET,
        all_layers=args.all_layers,
        kept_keys=args.kept_keys,
        optimize=args.optimize,
        verbose=args.verbose,
    )
    setting = "dense" if not any(result.schedule) else f"tgGBC r={r} n={n} k={k}"
    print(
        f"wrote {result.path}: {what}, {num_keys} keys, batch {result.batch}, {setting}\n"
        f"  keys per layer {','.join(map(str, result.keys_per_layer))}; opset {result.opset}, {result.dtype}, "
        f"{result.size_mb:.1f} MB, {result.seconds:.1f} s; onnx.checker: ok\n"
        f"  inputs:  {', '.join(result.input_names)}\n"
        f"  outputs: {', '.join(result.output_names)}"
    )
    if args.no_compare:
        return 0
    cmp = compare_onnx(result.path, decoder, r=r, n=n, k=k, seed=args.seed, threads=args.threads)
    details = ", ".join(f"{key} {value:.2e}" for key, value in cmp.per_output.items())
    print(f"onnxruntime vs PyTorch (float32 eager, same inputs): max abs diff {cmp.max_abs_diff:.2e} ({details})")
    if cmp.kept_equal is not None:
        same = "yes" if cmp.kept_equal else f"NO ({cmp.kept_overlap:.1%} of PyTorch's kept keys kept)"
        print(f"  kept keys equal to PyTorch's: {same}")
    if result.dtype == "float32" and (cmp.max_abs_diff > FP32_TOLERANCE or cmp.kept_equal is False):
        print(f"tggbc export: error: the graph differs from PyTorch by more than {FP32_TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


def run_model(args: argparse.Namespace) -> int:
    """`tggbc export --model NAME`: the whole detector as one graph, checked over consecutive frames."""
    import torch

    from ..files import prepare_output_file
    from ..models.checkpoint import load_converted
    from ..models.detectors import build_detector
    from .detector import compare_detector_onnx, consecutive_frames, export_detector_onnx
    from .onnx import DEFAULT_OPSET

    for option, value, default in (
        ("--preset", args.preset, None), ("--kind", args.kind, None), ("--keys", args.keys, None),
        ("--queries", args.queries, None), ("--padded", args.padded, False), ("--dtype", args.dtype, "float32"),
        ("--all-layers", args.all_layers, False), ("--kept-keys", args.kept_keys, False),
    ):  # fmt: skip
        if value != default:
            raise ValueError(f"{option} is for decoder graphs; --model exports the whole float32 detector")
    prepare_output_file(args.out, args.force, what="--out")
    torch.manual_seed(args.seed)
    sizes = {} if args.image_size is None else {"image_size": tuple(args.image_size)}
    detector = build_detector(args.model, pruner=None, **sizes)
    if args.weights is not None:
        load_converted(detector, args.weights)
        what = f"weights {args.weights}"
    else:
        what = "random weights (pass --weights for a trained detector)"
    config = detector.config
    r = 0 if args.dense else (config.r if args.r is None else args.r)
    n = config.n if args.n is None else args.n
    k = config.k if args.k is None else args.k
    result = export_detector_onnx(
        detector, args.out, r=r, n=n, k=k, batch=args.batch, opset=args.opset or DEFAULT_OPSET,
        optimize=args.optimize, verbose=args.verbose,
    )  # fmt: skip
    h, w = result.image_size
    print(
        f"wrote {result.path}: {config.name} ({what}), {w}x{h}, batch {args.batch}, {result.setting}\n"
        f"  keys per layer {','.join(map(str, result.keys_per_layer))}; opset {result.opset}, float32, "
        f"{result.size_mb:.1f} MB, {result.seconds:.1f} s; onnx.checker: ok\n"
        f"  inputs:  {', '.join(result.input_names)}\n"
        f"  outputs: {', '.join(result.output_names)}"
    )
    if args.no_compare:
        return 0
    frames = consecutive_frames(detector, args.frames, batch=args.batch, seed=args.seed)
    cmp = compare_detector_onnx(result.path, detector, frames, r=r, n=n, k=k, threads=args.threads)
    details = ", ".join(f"{key} {value:.1e}" for key, value in cmp.max_abs_diff.items())
    print(
        f"onnxruntime vs PyTorch over {cmp.frames} consecutive frames (float32, same inputs and memory): "
        f"largest difference {cmp.max_scaled_diff:.1e} (relative beyond magnitude 1)\n  {details}"
    )
    if cmp.tied:
        print(f"  {cmp.tied} box(es) or memory entries swapped across the top-k cut-off at scores tied within 1e-4")
    if not cmp.passed(FP32_TOLERANCE):
        what = f"{cmp.untied} boxes or memory entries differ" if cmp.untied else "outputs differ"
        print(f"tggbc export: error: the graph differs from PyTorch ({what}; tolerance {FP32_TOLERANCE:g})",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0
