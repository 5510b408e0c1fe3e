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
from dataclasses import asdict, dataclass, field

import torch

from .files import write_json_atomic
from .pruner import KeyPruner

METHODS = ("dense", "reference", "fast")


@dataclass(frozen=True)
class Preset:
    kind: str  # host decoder: petr | streampetr | focalpetr
    keys: int
    r: int | float | list[int]
    n: int = 1
    k: int = 175
    note: str = ""


# Published settings (../shared/ANCHORS.md section 2). Where the paper names no n or k for a
# model, we use the StreamPETR ones (n=1, k=175), except PETR's r=12000 which the reference
# spreads over three layers (its schedule example).
PRESETS: dict[str, Preset] = {
    "petr-r50-1408x512": Preset("petr", 16896, 12000, n=3, k=175, note="PETR-R50, 6x88x32 keys"),
    "streampetr-v2-99-1600x640": Preset("streampetr", 24000, 21000, n=1, k=175, note="StreamPETR-V2-99"),
    "3dppe-800x320": Preset("streampetr", 6000, 3000, n=1, k=175, note="3DPPE, StreamPETR-style decoder"),
    "focalpetr-r50-704x256": Preset("focalpetr", 4224, 0.875, n=1, k=175, note="FocalPETR-R50, 87.5% pruned"),
    "tiny": Preset("focalpetr", 384, 0.5, n=1, k=32, note="smoke test"),
}


@dataclass
class MethodResult:
    method: str
    median_ms: float
    min_ms: float
    max_ms: float
    speedup: float  # dense median / this median
    prune_ms: float  # median time inside KeyPruner.step (importance, selection, gathers)
    prune_share: float  # prune_ms / median_ms
    peak_mb: float
    gflops: float
    flop_ratio: float  # dense FLOPs / this FLOPs
    keys_per_layer: list[int]
    times_ms: list[float] = field(default_factory=list)


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


# ------------------------------------------------------------------ memory


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def _cpu_peak_mb(fn: Callable[[], object]) -> float:
    """Resident-set high-water mark of one call, above what was resident before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def _memory_child() -> None:
    """Entry point of the memory-measuring subprocess: setting JSON on stdin, MB per method out.

    A separate process because measuring CPU peaks needs glibc to hand freed memory straight back
    to the OS (a fixed, small mmap threshold), which would slow the timed runs if done there.
    """
    import ctypes

    cfg = json.load(sys.stdin)
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB, fixed
    torch.set_num_threads(cfg.pop("threads"))
    methods = cfg.pop("methods")
    _, _, forwards = _build(Preset(**cfg.pop("preset")), **cfg)
    peaks = {}
    for m in methods:
        forwards[m]()  # first call allocates lazily-built state
        peaks[m] = _cpu_peak_mb(forwards[m])
    json.dump(peaks, sys.stdout)


def peak_memory_mb(preset: Preset, methods: tuple[str, ...], **build: object) -> dict[str, float]:
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
    code = "from tggbc.bench import _memory_child; _memory_child()"
    proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of the matmuls and attention one call runs (math SDPA so every product is counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ------------------------------------------------------------------ benchmark


def resolve_setting(args: argparse.Namespace) -> tuple[str, Preset]:
    if args.preset is not None and args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    base = PRESETS[args.preset or "streampetr-v2-99-1600x640"]
    preset = Preset(
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


def _build(
    preset: Preset,
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
        decoder.pruner = pruners[method]
        decoder.attention = "reference" if method == "reference" else "fast"
        with torch.inference_mode():
            return decoder(**inputs)

    forwards = {m: (lambda m=m: forward(m)) for m in METHODS}
    return decoder, pruners, forwards


def run_benchmark(
    preset: Preset,
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
    bar = _progress((warmup + runs) * len(methods), f"bench {preset.kind} {preset.keys} keys", progress)
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


def summarize(
    methods: tuple[str, ...],
    times: dict[str, list[float]],
    prune_ms: dict[str, float],
    peak: dict[str, float],
    flops: dict[str, float],
    keys_per_layer: dict[str, list[int]],
) -> list[MethodResult]:
    """One MethodResult per method from its timed runs (ms); ratios are against "dense"."""
    dense_median = statistics.median(times["dense"]) if "dense" in times else float("nan")
    dense_flops = flops.get("dense", float("nan"))
    results = []
    for m in methods:
        med = statistics.median(times[m])
        results.append(
            MethodResult(
                method=m,
                median_ms=med,
                min_ms=min(times[m]),
                max_ms=max(times[m]),
                speedup=dense_median / med,
                prune_ms=prune_ms[m],
                prune_share=prune_ms[m] / med,
                peak_mb=peak[m],
                gflops=flops[m] / 1e9,
                flop_ratio=dense_flops / flops[m],
                keys_per_layer=keys_per_layer[m],
                times_ms=times[m],
            )
        )
    return results


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, leave=False)


def format_table(name: str, preset: Preset, results: list[MethodResult], env: dict) -> str:
    lines = [
        f"preset {name}: {preset.kind} decoder, {preset.keys} keys, r={preset.r} n={preset.n} k={preset.k}",
        f"{env.get('backend', 'torch')} on {env['device']} {env['dtype']}, {env['threads']} threads, "
        f"batch {env['batch']}, "
        f"{env['runs']} timed runs after {env['warmup']} warm-up, torch {env['torch']}",
        "",
        f"{'method':<10} {'median ms':>10} {'min':>9} {'max':>9} {'x dense':>8} {'prune ms':>9} "
        f"{'share':>6} {'peak MB':>8} {'GFLOPs':>8} {'FLOP x':>7}  keys per layer",
    ]
    for r in results:
        lines.append(
            f"{r.method:<10} {r.median_ms:>10.1f} {r.min_ms:>9.1f} {r.max_ms:>9.1f} {r.speedup:>7.2f}x "
            f"{r.prune_ms:>9.1f} {r.prune_share:>6.1%} {r.peak_mb:>8.0f} {r.gflops:>8.1f} {r.flop_ratio:>6.2f}x  "
            f"{','.join(map(str, r.keys_per_layer))}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ command line


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset and what may override it (--kind, --keys, --queries, --r, --n, --k): the decoder
    and tgGBC setting `resolve_setting` reads. Shared by `tggbc bench` and `tggbc export`."""
    from .cli import parse_r

    parser.add_argument(
        "--preset", default=None, help=f"one of: {', '.join(PRESETS)} (default streampetr-v2-99-1600x640)"
    )
    parser.add_argument("--kind", choices=["petr", "streampetr", "focalpetr"], default=None, help="host decoder")
    parser.add_argument("--keys", type=int, default=None, help="image keys per sample (overrides the preset)")
    parser.add_argument("--queries", type=int, default=None, help="learnable queries (default: the host's)")
    parser.add_argument("--r", type=parse_r, default=None, help="keys to drop: count, fraction or per-layer list")
    parser.add_argument("--n", type=int, default=None, help="layers that prune")
    parser.add_argument("--k", type=int, default=None, help="top-k voting queries (<= 0: all)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting_arguments(parser)
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    parser.add_argument(
        "--backend",
        choices=["torch", "onnxruntime", "openvino"],
        default="torch",
        help="run the PyTorch decoder, or exported ONNX graphs in ONNX Runtime / OpenVINO",
    )
    parser.add_argument(
        "--methods", default=None, help="comma list (torch: dense,reference,fast; exported graphs: dense,tggbc)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:1, ...)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--runs", type=int, default=10, help="timed rounds (each runs every method once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name, p in PRESETS.items():
            print(f"{name:<28} {p.kind:<11} {p.keys:>6} keys  r={p.r} n={p.n} k={p.k}  {p.note}")
        return 0
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.json and os.path.exists(args.json) and not os.path.isfile(args.json):
        raise ValueError(f"--json {args.json} exists and is not a file")
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
    print(format_table(name, preset, results, env))
    if args.json:
        payload = {"preset": name, "setting": asdict(preset), "env": env, "results": [asdict(r) for r in results]}
        write_json_atomic(args.json, payload)
        print(f"wrote {args.json}")
    return 0


def environment(backend: str, device: str, dtype: str, batch: int, runs: int, warmup: int) -> dict:
    """What a result was measured on and how: printed above the table and stored in the JSON."""
    return {
        "backend": backend,
        "device": device,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "runs": runs,
        "warmup": warmup,
        "torch": torch.__version__,
        "cpu": _cpu_name(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
