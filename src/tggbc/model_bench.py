"""`tggbc bench --model NAME`: whole-detector latency, dense vs tgGBC, and the decoder's share of it.

One published detector (random weights: latency does not depend on them) runs one random frame
per call (`example_frame`); the methods only switch the decoder's pruner and attention mode, and
their timed runs are interleaved so drift in machine load hits all alike. Forward hooks time the
parts of each run: backbone, neck, key side (3D position embedding), decoder (with tgGBC inside)
and the rest (box decoding, FocalHead if it runs). Reported per method: median / min / max of the
whole forward, the median of each part, the decoder's share of the whole, and the speedup of
the whole and of the decoder against dense.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from .measure import progress_bar
from .pruner import KeyPruner, pruning

__all__ = ["ModelResult", "run_model_benchmark", "format_model_table", "MODEL_METHODS", "PARTS"]

MODEL_METHODS = ("dense", "tggbc", "reference")
PARTS = ("backbone", "neck", "key_side", "decoder")


@dataclass
class ModelResult:
    method: str  # dense, tggbc (fast attention) or reference (tgGBC on the unfused published path)
    median_ms: float
    min_ms: float
    max_ms: float
    speedup: float  # dense median / this median (whole model)
    parts_ms: dict[str, float]  # median of each part: backbone, neck, key_side, decoder, other
    decoder_share: float  # decoder median / whole median
    decoder_speedup: float  # dense decoder median / this decoder median
    keys_per_layer: list[int]
    times_ms: list[float] = field(default_factory=list)


class _PartTimer:
    """Forward pre/post hooks that add each part's wall time (ms) of the current run to `elapsed`."""

    def __init__(self, modules: dict[str, torch.nn.Module], sync):
        self.elapsed: dict[str, float] = {}
        self.sync, self._start, self.handles = sync, {}, []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(lambda *_, n=name: self._begin(n)))
            self.handles.append(module.register_forward_hook(lambda *_, n=name: self._end(n)))

    def _begin(self, name: str) -> None:
        self.sync()
        self._start[name] = time.perf_counter()

    def _end(self, name: str) -> None:
        self.sync()
        self.elapsed[name] = self.elapsed.get(name, 0.0) + (time.perf_counter() - self._start.pop(name)) * 1e3

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run_model_benchmark(
    name: str,
    *,
    image_size: tuple[int, int] | None = None,
    batch: int = 1,
    device: str = "cpu",
    warmup: int = 1,
    runs: int = 5,
    methods: tuple[str, ...] = ("dense", "tggbc"),
    r: int | float | list[int] | None = None,
    n: int | None = None,
    k: int | None = None,
    seed: int = 0,
    progress: bool = True,
    **sizes,
) -> tuple[list[ModelResult], dict]:
    """Time the whole detector of config `name` per method.

    Args:
        name: published config name or alias.
        image_size: (H, W) multiples of 32; None = the config's (704x256, 800x320, 1600x640).
        methods: among "dense", "tggbc" (fast attention) and "reference" (tgGBC through explicit
            attention weights, as the published code runs it).
        r, n, k: tgGBC's setting; None = the config's default.
        sizes: build_detector overrides (small models for tests).
    Returns:
        (one ModelResult per method, the setting: config name, image size, keys, r, n, k).
    """
    from .models.detectors import build_detector, example_frame

    unknown = [m for m in methods if m not in MODEL_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown or no method(s) {list(methods)}; known: {list(MODEL_METHODS)}")
    if warmup < 0 or runs < 1 or batch < 1:
        raise ValueError(f"need warmup >= 0, runs >= 1, batch >= 1; got {warmup}, {runs}, {batch}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    torch.manual_seed(seed)
    detector = build_detector(name, pruner=None, **sizes).to(dev).eval().requires_grad_(False)
    config = detector.config
    h, w = image_size or config.image_size
    if h % 32 or w % 32 or h < 32 or w < 32:
        raise ValueError(f"image size must be positive multiples of 32, got {h}x{w}")
    num_keys = 6 * (h // config.stride) * (w // config.stride)
    setting = dict(r=config.r if r is None else r, n=config.n if n is None else n, k=config.k if k is None else k)
    # Check the setting against this key count before anything slow runs (r >= keys and the like).
    KeyPruner(**setting).reset(num_keys, len(detector.decoder.layers))
    pruners = {"dense": None, "tggbc": KeyPruner(**setting), "reference": KeyPruner(**setting)}
    frame = example_frame(detector, batch=batch, image_size=(h, w), seed=seed, device=dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    head = detector.pts_bbox_head
    timer = _PartTimer(
        {"backbone": detector.img_backbone, "neck": detector.img_neck, "key_side": head.position,
         "decoder": head.decoder},
        sync,
    )  # fmt: skip

    def forward(method: str):
        attention = "reference" if method == "reference" else "fast"
        with torch.inference_mode(), pruning(detector.decoder, pruners[method], attention=attention):
            return detector(**frame)

    times = {m: [] for m in methods}
    parts = {m: {p: [] for p in (*PARTS, "other")} for m in methods}
    keys = {}
    bar = progress_bar((warmup + runs) * len(methods), f"bench {config.name} {h}x{w}", progress)
    try:
        for i in range(warmup + runs):
            order = methods[i % len(methods) :] + methods[: i % len(methods)]
            for m in order:
                timer.elapsed = {}
                sync()
                start = time.perf_counter()
                out = forward(m)
                sync()
                total = (time.perf_counter() - start) * 1e3
                keys[m] = list(out.keys_per_layer)
                if i >= warmup:
                    times[m].append(total)
                    for p in PARTS:
                        parts[m][p].append(timer.elapsed.get(p, 0.0))
                    parts[m]["other"].append(total - sum(timer.elapsed.get(p, 0.0) for p in PARTS))
                bar.update(1)
    finally:
        bar.close()
        timer.remove()

    dense = statistics.median(times["dense"]) if "dense" in times else float("nan")
    dense_decoder = statistics.median(parts["dense"]["decoder"]) if "dense" in times else float("nan")
    results = []
    for m in methods:
        med = statistics.median(times[m])
        part_ms = {p: statistics.median(v) for p, v in parts[m].items()}
        results.append(
            ModelResult(
                method=m,
                median_ms=med,
                min_ms=min(times[m]),
                max_ms=max(times[m]),
                speedup=dense / med,
                parts_ms=part_ms,
                decoder_share=part_ms["decoder"] / med,
                decoder_speedup=dense_decoder / part_ms["decoder"] if part_ms["decoder"] > 0 else float("nan"),
                keys_per_layer=keys[m],
                times_ms=times[m],
            )
        )
    info = dict(model=config.name, image_size=[h, w], keys=num_keys, batch=batch, **setting)
    return results, info


def format_model_table(info: dict, results: list[ModelResult], env: dict) -> str:
    """A plain-text table of the results, with the setting and machine above it."""
    h, w = info["image_size"]
    lines = [
        f"model {info['model']}: {w}x{h}, {info['keys']} keys, batch {info['batch']}, "
        f"tgGBC r={info['r']} n={info['n']} k={info['k']}",
        ", ".join(f"{k}={v}" for k, v in env.items()),
        f"{'method':<10} {'total ms':>9} {'speedup':>8} {'backbone':>9} {'neck':>7} {'keys':>7} {'decoder':>8} "
        f"{'dec share':>9} {'dec speedup':>11}  keys per layer",
    ]
    for r in results:
        p = r.parts_ms
        lines.append(
            f"{r.method:<10} {r.median_ms:>9.1f} {r.speedup:>7.2f}x {p['backbone']:>9.1f} {p['neck']:>7.1f} "
            f"{p['key_side']:>7.1f} {p['decoder']:>8.1f} {r.decoder_share:>8.1%} {r.decoder_speedup:>10.2f}x  "
            f"{r.keys_per_layer}"
        )
    return "\n".join(lines)


def results_payload(info: dict, results: list[ModelResult], env: dict) -> dict:
    return {"model": info, "env": env, "results": [asdict(r) for r in results]}
