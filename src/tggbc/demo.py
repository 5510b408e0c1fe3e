"""`tggbc demo`: the main job. What tgGBC buys, on a trained detector and at the published shapes.

1. Generates the synthetic validation scenes the shipped detector is scored on (once; cached).
2. Evaluates the shipped detector dense and with tgGBC at several pruning levels, with the
   nuScenes devkit's own detection metrics, and times its decoder.
3. Benchmarks the decoder at a published shape (StreamPETR-V2-99, 1600x640, 24,000 keys).
4. Saves a plot of accuracy against decoder latency and a picture of the keys tgGBC keeps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

SHIPPED_WEIGHTS = Path(__file__).parent / "weights" / "petr_synth.safetensors"
# The validation scenes of the shipped model's data (same seed). `tggbc eval` in the README scores
# all 40; the demo scores the first 20 of them to stay within its ten-minute budget on two cores.
VAL_SCENES, VAL_FRAMES, DATA_SEED = 40, 8, 0
DEMO_VAL_SCENES = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default=str(SHIPPED_WEIGHTS), help="detector weights (default: the shipped)")
    parser.add_argument("--data", default="out/demo/val-data", help="validation dataroot (generated if missing)")
    parser.add_argument("--out", default="out/demo", help="directory for tables, JSON and pictures")
    parser.add_argument("--fractions", default="0.75,0.875,0.95", help="pruned fractions to evaluate")
    parser.add_argument(
        "--val-scenes", type=int, default=DEMO_VAL_SCENES, help=f"validation scenes to generate (of {VAL_SCENES})"
    )
    parser.add_argument("--bench-runs", type=int, default=3, help="timed rounds at the published shape (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def ensure_val_data(root: Path, image_size: tuple[int, int], num_scenes: int, progress: bool) -> Path:
    """The shipped model's validation scenes at `root`, generated on first use."""
    from .data.splits import read_meta

    if root.exists():
        meta = read_meta(root)  # raises if root is something else
        if tuple(meta["image_size"]) != tuple(image_size):
            raise ValueError(f"{root} holds {meta['image_size']} images, the model wants {list(image_size)}")
        return root
    from .data.generator import generate

    if not 1 <= num_scenes <= VAL_SCENES:
        raise ValueError(f"--val-scenes must be in [1, {VAL_SCENES}], got {num_scenes}")
    print(f"generating {num_scenes} validation scenes x {VAL_FRAMES} frames into {root} (once)")
    generate(
        root,
        num_scenes=num_scenes,
        seed=DATA_SEED,
        image_size=image_size,
        frames_per_scene=VAL_FRAMES,
        val_fraction=1.0,
        progress=progress,
        workers=2,
    )
    return root


def run(args: argparse.Namespace) -> int:
    from .bench import PRESETS, environment, format_table, run_benchmark
    from .detector.evaluate import evaluate as evaluate_settings
    from .detector.evaluate import format_results, standard_settings
    from .detector.plots import plot_accuracy_vs_latency, plot_kept_keys
    from .detector.weights import load_detector
    from .files import write_json_atomic
    from .pruner import KeyPruner

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    out = Path(args.out)
    weights = Path(args.weights)
    if not weights.is_file():
        raise FileNotFoundError(f"no detector weights at {weights}; train one with `tggbc train ... --weights FILE`")
    model = load_detector(weights)
    cfg = model.config
    print(
        f"detector: {weights.name}, {cfg.image_width}x{cfg.image_height} images, {cfg.num_keys} keys, "
        f"{cfg.num_queries} queries, {torch.get_num_threads()} threads"
    )
    data = ensure_val_data(Path(args.data), (cfg.image_width, cfg.image_height), args.val_scenes, not args.quiet)

    fractions = tuple(float(f) for f in args.fractions.split(",") if f.strip())
    settings = standard_settings(cfg.num_queries, fractions)
    results = evaluate_settings(model, data, settings, out / "eval", progress=not args.quiet)
    print("\nAccuracy (nuScenes detection metrics, synthetic val) and decoder latency, dense vs tgGBC:")
    print(format_results(results))
    curve = plot_accuracy_vs_latency(results, out / "accuracy_vs_latency.png")

    # Which keys survive: one frame, 87.5% dropped gradually over three layers so every layer shows.
    from .data.frames import list_frames

    frame = list_frames(data, "val")[0]
    images = frame.read_images()
    model.decoder.pruner = KeyPruner(r=0.875, n=3, k=settings[-1].k)
    with torch.inference_mode():
        output = model(
            torch.from_numpy(images).permute(0, 3, 1, 2).unsqueeze(0),
            torch.from_numpy(frame.lidar2img).unsqueeze(0),
            track_keys=True,
        )
    model.decoder.pruner = None
    feature_shape = (cfg.image_height // cfg.stride, cfg.image_width // cfg.stride)
    keys_png = plot_kept_keys(
        images,
        [k[0] for k in output.kept],
        feature_shape,
        out / "kept_keys.png",
        title=f"Keys each decoder layer sees (tgGBC r=0.875 over 3 layers, k={settings[-1].k}); "
        f"keys per layer {output.keys_per_layer}",
    )

    bench = None
    if args.bench_runs > 0:
        name = "streampetr-v2-99-1600x640"
        print(f"\nDecoder latency at the published {name} shape (random weights; speed does not depend on them):")
        bench = run_benchmark(PRESETS[name], runs=args.bench_runs, warmup=1, progress=not args.quiet)
        env = environment("torch", "cpu", "float32", 1, args.bench_runs, 1)
        print(format_table(name, PRESETS[name], bench, env))

    from dataclasses import asdict

    write_json_atomic(
        str(out / "demo.json"),
        {
            "weights": str(weights),
            "data": str(data),
            "accuracy": [asdict(r) for r in results],
            "bench": [asdict(r) for r in bench] if bench else None,
            "seconds": round(time.time() - started, 1),
        },
    )
    print(f"\nwrote {curve}, {keys_png} and {out / 'demo.json'} in {time.time() - started:.0f} s")
    return 0
