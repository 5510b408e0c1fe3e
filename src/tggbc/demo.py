"""`tggbc demo`: the main job.

Until the trained detector and its evaluation exist, the demo shows the most useful thing
available: decoder latency, dense vs tgGBC, at the published StreamPETR-V2-99 1600x640 shape.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=5, help="timed rounds of the benchmark")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def run(args: argparse.Namespace) -> int:
    import torch

    from .bench import PRESETS, format_table, run_benchmark

    print(
        "tggbc demo: the accuracy demo (trained detector + nuScenes metrics) is not built yet;\n"
        "showing decoder latency at the published StreamPETR-V2-99 1600x640 setting instead.\n"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "streampetr-v2-99-1600x640"
    results = run_benchmark(PRESETS[name], runs=args.runs, warmup=1)
    env = {
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "batch": 1,
        "runs": args.runs,
        "warmup": 1,
        "torch": torch.__version__,
    }
    print(format_table(name, PRESETS[name], results, env))
    return 0
