"""`tggbc demo`: the main job. What tgGBC buys, on a trained detector and at the published shapes.

1. Generates validation scenes of the shipped detector's kind (once; cached): the first scenes of
   the held-out validation seed, which no training run or setting choice has seen.
2. Scores the shipped detector dense, with tgGBC and with its controls (random keys, the most
   important keys dropped, attention only, key merging) at several pruned fractions, with the
   nuScenes detection metric and scene-resampled 95% intervals; plots mAP against the fraction.
3. Shows which keys tgGBC keeps on one frame.
4. Benchmarks the decoder at a published shape (StreamPETR-V2-99, 1600x640, 24,000 keys).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .detector.evaluate import SHIPPED

# The held-out validation scenes of the shipped detector (docs/detector.md): seed 300, 150 scenes of
# five frames. The demo scores the first 32 of them (160 frames) to stay within ten minutes on two
# cores; `tggbc eval` on all 150 gives the figures of the README.
VAL_SEED, VAL_SCENES, VAL_FRAMES = 300, 150, 5
DEMO_SCENES = 32
DEMO_FRACTIONS = (0.5, 0.75, 0.875, 0.95, 0.99)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_threads_argument, existing_file, int_at_least, nonnegative_int

    parser.add_argument(
        "--weights", type=existing_file, default=str(SHIPPED), help="detector weights (default: the shipped)"
    )
    parser.add_argument("--data", default="out/demo/val-data", help="validation dataroot (generated if missing)")
    parser.add_argument("--out", default="out/demo", help="directory for the JSON and pictures")
    parser.add_argument("--force", action="store_true", help="write into an --out that holds other files")
    parser.add_argument(
        "--scenes",
        type=int_at_least(1),
        default=DEMO_SCENES,
        help=f"validation scenes to generate and score, <= {VAL_SCENES} (default %(default)s)",
    )
    parser.add_argument(
        "--bench-runs", type=nonnegative_int, default=3, help="timed rounds at the published shape (0: skip)"
    )
    add_threads_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def ensure_val_data(root: Path, image_size: tuple[int, int], num_scenes: int, progress: bool) -> Path:
    """The first `num_scenes` held-out validation scenes at `root`, generated on first use."""
    from .data.splits import read_meta, split_scenes

    if root.exists():
        meta = read_meta(root)  # raises if root is something else
        if tuple(meta["image_size"]) != tuple(image_size) or meta.get("seed") != VAL_SEED:
            raise ValueError(
                f"{root} holds {meta['image_size']} images of seed {meta.get('seed')}; the demo wants "
                f"{list(image_size)} of seed {VAL_SEED}: delete it or pass another --data"
            )
        have = len(split_scenes(root)["val"])
        if have != num_scenes:
            raise ValueError(
                f"{root} holds {have} validation scenes, not {num_scenes}: delete it or pass --scenes {have}"
            )
        return root
    from .data.generator import generate

    print(f"generating {num_scenes} validation scenes x {VAL_FRAMES} frames into {root} (once)")
    generate(
        root,
        num_scenes=num_scenes,
        seed=VAL_SEED,
        image_size=image_size,
        frames_per_scene=VAL_FRAMES,
        val_fraction=1.0,
        progress=progress,
        workers=2,
    )
    return root


def run(args: argparse.Namespace) -> int:
    from .bench import run_benchmark
    from .cli import apply_threads, preset_title
    from .data.frames import list_frames
    from .detector.evaluate import evaluate, format_controls, format_results, settings_for, to_json
    from .detector.plots import plot_accuracy_curve, plot_kept_keys
    from .detector.weights import load_detector
    from .files import prepare_output_dir, write_json_atomic
    from .measure import environment, format_table
    from .models.configs import DECODER_PRESETS
    from .pruner import METHODS, KeyPruner, pruning

    apply_threads(args)
    if args.scenes > VAL_SCENES:
        raise ValueError(f"--scenes must be at most {VAL_SCENES} (the held-out validation scenes), got {args.scenes}")
    started = time.time()
    out = Path(args.out)
    # A demo may replace what an earlier demo wrote, nothing else.
    earlier_demo = (out / "demo.json").is_file()
    out = prepare_output_dir(out, force=args.force or earlier_demo, what="--out")
    model = load_detector(args.weights)
    cfg = model.config
    print(
        f"detector: {Path(args.weights).name}, {cfg.image_width}x{cfg.image_height} images, {cfg.num_keys} keys, "
        f"{cfg.num_queries} queries, {torch.get_num_threads()} threads"
    )
    data = ensure_val_data(Path(args.data), (cfg.image_width, cfg.image_height), args.scenes, not args.quiet)

    settings = settings_for(list(METHODS), list(DEMO_FRACTIONS), cfg.default_k)
    results, layers = evaluate(model, data, settings, progress=not args.quiet)
    print(f"\nAccuracy on {args.scenes} held-out scenes: keys dropped after layer 1, k={cfg.default_k} voting queries.")
    print("Differences from dense with 95% intervals from 200 scene resamples; an interval holding 0 is a tie.")
    print(format_results(results))
    print("\nEach control's mAP minus tgGBC's at the same budget [paired 95% interval]:")
    print(format_controls(results))
    print("\nThe dense decoder's boxes after each layer: what the layers after the pruning point add.")
    print(format_results(layers, timing=False))
    curve = plot_accuracy_curve(results, out / "accuracy_curve.png")

    # Which keys survive: one frame, 87.5% dropped gradually over three layers so every layer shows.
    frame = list_frames(data, "val")[0]
    images = frame.read_images()
    with torch.inference_mode(), pruning(model.decoder, KeyPruner(r=0.875, n=3, k=cfg.default_k)):
        output = model(
            torch.from_numpy(images).permute(0, 3, 1, 2).unsqueeze(0),
            torch.from_numpy(frame.lidar2img).unsqueeze(0),
            track_keys=True,
        )
    keys_png = plot_kept_keys(
        images,
        [k[0] for k in output.kept],
        cfg.feature_shape,
        out / "kept_keys.png",
        title=f"Keys each decoder layer sees (tgGBC r=0.875 over 3 layers, k={cfg.default_k}); "
        f"keys per layer {output.keys_per_layer}",
    )

    bench = None
    if args.bench_runs > 0:
        name = "streampetr-v2-99-1600x640"
        preset = DECODER_PRESETS[name]
        print(f"\nDecoder latency at the published {name} shape (random weights; speed does not depend on them):")
        bench = run_benchmark(preset, runs=args.bench_runs, warmup=1, progress=not args.quiet)
        env = environment("torch", "cpu", "float32", 1, args.bench_runs, 1)
        print(format_table(preset_title(name, preset), bench, env))

    write_json_atomic(
        out / "demo.json",
        {
            "weights": str(args.weights),
            "data": str(data),
            "accuracy": to_json(results),
            "layers": to_json(layers),
            "bench": [asdict(r) for r in bench] if bench else None,
            "seconds": round(time.time() - started, 1),
        },
    )
    print(f"\nwrote {curve}, {keys_png} and {out / 'demo.json'} in {time.time() - started:.0f} s")
    return 0
