"""`tggbc bench`: decoder latency of dense vs tgGBC (reference and fast), side by side.

One decoder with one set of weights is built; the methods only switch its `pruner` and
`attention` attributes, and their timed runs are interleaved (dense, reference, fast, dense, ...)
so that drift in machine load hits all of them alike. Reported per method: median / min / max
of the timed runs after warm-up, the ratio of medians against dense, time spent inside tgGBC's
own work (importance + selection + gathers), peak memory of one forward, keys seen by each
layer, and FLOPs counted from the operators one forward runs (the ratio of FLOPs is the ceiling
on the speedup).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from .files import write_json_atomic
from .measure import (
    MethodResult,
    count_flops,
    cpu_peak_mb,
    environment,
    format_table,
    progress_bar,
    return_freed_memory,
    summarize,
)
from .models.configs import DECODER_PRESETS, DecoderPreset
from .pruner import KeyPruner, pruning

METHODS = ("dense", "reference", "fast")


class TimedKeyPruner(KeyPruner):
    """KeyPruner that adds the wall time of each step to `elapsed` (seconds)."""

    def __init__(self, *args, sync: Callable[[], None] = lambda: None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sync, self.elapsed = sync, 0.0

    def step(self, *args, **kwargs):
        if self.schedule and self.schedule[args[0] if args else kwargs["layer"]] == 0:
            return super().step(*args, **kwargs)  # nothing to time: returns inputs untouched
        self.sync()
        start = time.perf_counter()
        out = super().step(*args, **kwargs)
        self.sync()
        self.elapsed += time.perf_counter() - start
        return out


def memory_child() -> None:
    """Entry point of the memory-measuring subprocess: setting JSON on stdin, MB per method out.

    A separate process because measuring CPU peaks needs glibc to hand freed memory straight back
    to the OS (`return_freed_memory`), which would slow the timed runs if done there.
    """
    cfg = json.load(sys.stdin)
    return_freed_memory()
    torch.set_num_threads(cfg.pop("threads"))
    methods = cfg.pop("methods")
    _, _, forwards = _build(DecoderPreset(**cfg.pop("preset")), **cfg)
    peaks = {}
    for m in methods:
        forwards[m]()  # first call allocates lazily-built state
        peaks[m] = cpu_peak_mb(forwards[m])
    json.dump(peaks, sys.stdout)


def peak_memory_mb(preset: DecoderPreset, methods: tuple[str, ...], **build: object) -> dict[str, float]:
    """Peak extra memory of one forward per method: CUDA allocator peak, or peak RSS on CPU."""
    device = torch.device(build["device"])
    if device.type == "cuda":
        _, _, forwards = _build(preset, **build)
        peaks = {}
        for m in methods:
            forwards[m]()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            forwards[m]()
            torch.cuda.synchronize(device)
            peaks[m] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return peaks
    if not os.path.exists("/proc/self/clear_refs"):
        return {m: float("nan") for m in methods}  # not Linux: no way to read a peak
    payload = json.dumps(
        {"preset": asdict(preset), "methods": list(methods), "threads": torch.get_num_threads(), **build}
    )
    code = "from tggbc.bench import memory_child; memory_child()"
    proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


# ------------------------------------------------------------------ benchmark


def _build(
    preset: DecoderPreset,
    *,
    queries: int | None,
    batch: int,
    device: str,
    dtype: str,
    seed: int,
    timed: bool = False,
):
    """One decoder, the pruner of each method, and a forward() per method that switches them in."""
    from .models import build_decoder, example_inputs

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    torch.manual_seed(seed)
    kwargs = {} if queries is None else {"num_queries": queries}
    # No parameter needs a gradient here (and FlopCounterMode's module hooks trip over ones that do).
    decoder = build_decoder(preset.kind, **kwargs).to(dev, torch_dtype).eval().requires_grad_(False)
    # Check the setting before anything slow runs (r >= keys and the like).
    KeyPruner(r=preset.r, n=preset.n, k=preset.k).reset(preset.keys, len(decoder.layers))
    inputs = example_inputs(decoder, num_keys=preset.keys, batch=batch, device=dev, dtype=torch_dtype, seed=seed)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    pruner_cls = TimedKeyPruner if timed else KeyPruner
    extra = {"sync": sync} if timed else {}
    pruners = {m: pruner_cls(r=preset.r, n=preset.n, k=preset.k, **extra) for m in ("reference", "fast")}
    pruners["dense"] = None

    def forward(method: str):
        attention = "reference" if method == "reference" else "fast"
        with torch.inference_mode(), pruning(decoder, pruners[method], attention=attention):
            return decoder(**inputs)

    forwards = {m: (lambda m=m: forward(m)) for m in METHODS}
    return decoder, pruners, forwards


def run_benchmark(
    preset: DecoderPreset,
    *,
    queries: int | None = None,
    batch: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    warmup: int = 2,
    runs: int = 10,
    methods: tuple[str, ...] = METHODS,
    seed: int = 0,
    progress: bool = True,
) -> list[MethodResult]:
    """Time `methods` on one decoder; see the module docstring for what is measured."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown or no method(s) {list(methods)}; known: {list(METHODS)}")
    if warmup < 0 or runs < 1 or batch < 1:
        raise ValueError(f"need warmup >= 0, runs >= 1, batch >= 1; got {warmup}, {runs}, {batch}")
    build = dict(queries=queries, batch=batch, device=device, dtype=dtype, seed=seed)
    _, pruners, forwards = _build(preset, **build, timed=True)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    keys_per_layer = {m: list(forwards[m]().keys_per_layer) for m in methods}
    flops = {m: count_flops(forwards[m]) for m in methods}
    peak = peak_memory_mb(preset, methods, **build)

    times: dict[str, list[float]] = {m: [] for m in methods}
    prune_times: dict[str, list[float]] = {m: [] for m in methods}
    bar = progress_bar((warmup + runs) * len(methods), f"bench {preset.kind} {preset.keys} keys", progress)
    for i in range(warmup + runs):
        # Rotate the order each round so no method always runs right after another.
        order = methods[i % len(methods) :] + methods[: i % len(methods)]
        for m in order:
            pruner = pruners[m]
            if pruner is not None:
                pruner.elapsed = 0.0
            sync()
            start = time.perf_counter()
            forwards[m]()
            sync()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[m].append(elapsed * 1e3)
                prune_times[m].append(pruner.elapsed * 1e3 if pruner is not None else 0.0)
            bar.update(1)
    bar.close()

    prune_ms = {m: statistics.median(prune_times[m]) for m in methods}
    return summarize(methods, times, prune_ms, peak, flops, keys_per_layer)


# ------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import (
        add_setting_arguments,
        add_threads_argument,
        device_argument,
        image_size_argument,
        nonnegative_int,
        positive_int,
    )

    add_setting_arguments(parser)
    parser.add_argument("--list", action="store_true", help="list the presets and models and exit")
    parser.add_argument(
        "--model",
        default=None,
        help="time a whole published detector (backbone, neck, head) instead of a decoder: a config name or alias",
    )
    parser.add_argument(
        "--image-size", type=image_size_argument, default=None, metavar="HxW", help="with --model: input size"
    )
    parser.add_argument(
        "--backend",
        choices=["torch", "onnxruntime", "openvino"],
        default="torch",
        help="run the PyTorch decoder, or exported ONNX graphs in ONNX Runtime / OpenVINO",
    )
    parser.add_argument(
        "--methods", default=None, help="comma list (torch: dense,reference,fast; exported graphs: dense,tggbc)"
    )
    parser.add_argument("--device", type=device_argument, default="cpu", help="cpu or cuda (cuda:1, ...)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    add_threads_argument(parser)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed rounds first")
    parser.add_argument("--runs", type=positive_int, default=10, help="timed rounds (each runs every method once)")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--force", action="store_true", help="replace an existing --json file")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.list:
        from .models.configs import PUBLISHED_CONFIGS

        for name, p in DECODER_PRESETS.items():
            print(f"{name:<28} {p.kind:<11} {p.keys:>6} keys  r={p.r} n={p.n} k={p.k}  {p.note}")
        for name, c in PUBLISHED_CONFIGS.items():
            print(
                f"--model {name:<54} {c.image_size[1]}x{c.image_size[0]} {c.num_keys:>6} keys  r={c.r} n={c.n} k={c.k}"
            )
        return 0
    if args.model is not None:
        return _run_model(args)
    from .cli import apply_threads, preset_title, resolve_setting
    from .files import prepare_output_file

    apply_threads(args)
    if args.json:
        prepare_output_file(args.json, args.force, what="--json")  # before minutes of benchmarking

    name, preset = resolve_setting(args)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    common = dict(
        queries=args.queries,
        batch=args.batch,
        dtype=args.dtype,
        warmup=args.warmup,
        runs=args.runs,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if args.backend == "torch":
        results = run_benchmark(preset, device=args.device, methods=methods or METHODS, **common)
    else:
        if args.device != "cpu":
            raise ValueError(f"--backend {args.backend} runs on the CPU here; got --device {args.device}")
        # Exported graphs: only imported when asked for (onnx / onnxruntime / openvino are extras).
        from .export.bench import run_backend_benchmark

        results = run_backend_benchmark(preset, backend=args.backend, methods=methods, **common)
    env = environment(args.backend, args.device, args.dtype, args.batch, args.runs, args.warmup)
    print(format_table(preset_title(name, preset), results, env))
    if args.json:
        payload = {"preset": name, "setting": asdict(preset), "env": env, "results": [asdict(r) for r in results]}
        write_json_atomic(args.json, payload)
        print(f"wrote {args.json}")
    return 0


def _run_model(args: argparse.Namespace) -> int:
    """`tggbc bench --model NAME`: see `tggbc.model_bench`."""
    from .cli import apply_threads
    from .files import prepare_output_file
    from .model_bench import format_model_table, results_payload, run_model_benchmark

    if args.dtype != "float32":
        raise ValueError("--model times the detector in float32: drop --dtype")
    if args.preset is not None or args.kind is not None or args.keys is not None or args.queries is not None:
        raise ValueError("--model fixes the decoder and key count: drop --preset / --kind / --keys / --queries")
    apply_threads(args)
    if args.json:
        prepare_output_file(args.json, args.force, what="--json")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else ("dense", "tggbc")
    if args.backend != "torch":  # the whole detector exported (tggbc.export.detector), timed in that runtime
        if args.device != "cpu":
            raise ValueError(f"--backend {args.backend} runs on the CPU here; got --device {args.device}")
        from .export.bench import run_model_backend_benchmark

        results, info = run_model_backend_benchmark(
            args.model, backend=args.backend, image_size=args.image_size, batch=args.batch, methods=methods,
            r=args.r, n=args.n, k=args.k, warmup=args.warmup, runs=args.runs, seed=args.seed,
            progress=not args.no_progress, threads=args.threads,
        )  # fmt: skip
        env = environment(args.backend, "cpu", "float32", args.batch, args.runs, args.warmup)
        print(format_model_table(info, results, env))
        if args.json:
            write_json_atomic(args.json, results_payload(info, results, env))
            print(f"wrote {args.json}")
        return 0
    results, info = run_model_benchmark(
        args.model,
        image_size=args.image_size,
        batch=args.batch,
        device=args.device,
        warmup=args.warmup,
        runs=args.runs,
        methods=methods,
        r=args.r,
        n=args.n,
        k=args.k,
        seed=args.seed,
        progress=not args.no_progress,
    )
    env = environment("torch", args.device, "float32", args.batch, args.runs, args.warmup)
    print(format_model_table(info, results, env))
    if args.json:
        write_json_atomic(args.json, results_payload(info, results, env))
        print(f"wrote {args.json}")
    return 0
