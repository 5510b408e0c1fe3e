"""What every benchmark measures and how: results, peaks, FLOPs, progress and the machine.

Shared by `tggbc.bench` (PyTorch) and `tggbc.export.bench` (exported graphs); imports torch only.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "MethodResult",
    "summarize",
    "cpu_peak_mb",
    "return_freed_memory",
    "count_flops",
    "progress_bar",
    "environment",
    "format_table",
]


@dataclass
class MethodResult:
    method: str
    median_ms: float
    min_ms: float
    max_ms: float
    speedup: float  # dense median / this median
    prune_ms: float  # median time inside tgGBC's own work (importance, selection, gathers)
    prune_share: float  # prune_ms / median_ms
    peak_mb: float
    gflops: float
    flop_ratio: float  # dense FLOPs / this FLOPs
    keys_per_layer: list[int]
    times_ms: list[float] = field(default_factory=list)


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


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def return_freed_memory() -> None:
    """Make glibc hand freed memory straight back to the OS (a fixed 64 KiB mmap threshold), so
    that resident-set peaks measure one call. Slows allocation: only in a measuring subprocess."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD


def cpu_peak_mb(fn: Callable[[], object]) -> float:
    """Resident-set high-water mark of one call, above what was resident before it (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of the matmuls and attention one call runs (math SDPA so every product is counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **_: object) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "run"):
    """A tqdm bar on stderr, or a silent stand-in when disabled or tqdm is missing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)


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
        "cpu": cpu_name(),
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def format_table(title: str, results: list[MethodResult], env: dict) -> str:
    """A benchmark's results as text: the setting, the machine, one row per method."""
    lines = [
        title,
        f"{env.get('backend', 'torch')} on {env['device']} {env['dtype']}, {env['threads']} threads, "
        f"batch {env['batch']}, {env['runs']} timed runs after {env['warmup']} warm-up, torch {env['torch']}",
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
