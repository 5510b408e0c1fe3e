"""`tggbc bench --backend onnxruntime|openvino`: exported dense vs tgGBC graphs, side by side.

One decoder with one set of weights is exported twice (method "dense": r = 0; method "tggbc":
the preset's r, n, k with tgGBC inside the graph) and both graphs run in the chosen runtime on
the same inputs. As in the PyTorch benchmark (`tggbc.bench`) the timed runs are interleaved and
rotated so that drift in machine load hits both alike, and each method reports median / min / max
after warm-up, the ratio of medians against dense, peak memory of one run (a separate process),
keys per layer and FLOPs. FLOPs are counted on the eager decoder with the same setting (the
graphs run the same products). tgGBC's own time (importance, selection, gathers) comes from one
profiled run: the share of node time spent in the nodes the exporter tagged as `KeySelection`,
times the median.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from ..measure import MethodResult, count_flops, cpu_peak_mb, progress_bar, return_freed_memory, summarize
from ..models import build_decoder, example_inputs
from ..models.configs import DecoderPreset
from ..pruner import KeyPruner, pruning
from .onnx import DTYPES, EXPORT_EXTRA, export_onnx, graph_feeds, onnxruntime_session, prune_node_names, require

__all__ = ["BACKENDS", "GRAPH_METHODS", "run_backend_benchmark"]

BACKENDS = ("onnxruntime", "openvino")
GRAPH_METHODS = ("dense", "tggbc")
OPENVINO_FIX = "pip install openvino (or 'tggbc[openvino]')"


def _require_backend(backend: str):
    if backend == "onnxruntime":
        return require("onnxruntime", purpose="--backend onnxruntime")
    if backend == "openvino":
        return require("openvino", purpose="--backend openvino", fix=OPENVINO_FIX)
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def openvino_config(threads: int, dtype: str, profile: bool = False) -> dict:
    """Compile options: latency mode, the thread count, and the inference precision always stated.

    Unstated, OpenVINO's CPU plugin runs float32 graphs in bf16 on CPUs with AVX-512 BF16 or AMX
    (class scores then differ by ~5e-2), so float32 asks for f32 explicitly.
    """
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    if dtype != "float32":
        import openvino as ov

        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        needed = {"float16": "FP16", "bfloat16": "BF16"}[dtype]
        if needed not in capabilities:
            raise ValueError(
                f"OpenVINO's CPU plugin has no {dtype} compute on this CPU (it offers {', '.join(capabilities)}); "
                "use --dtype float32, or --backend onnxruntime --dtype float16"
            )
        config["INFERENCE_PRECISION_HINT"] = {"float16": "f16", "bfloat16": "bf16"}[dtype]
    if profile:
        config["PERF_COUNT"] = True
    return config


def _load(backend: str, path: str, threads: int, dtype: str, profile_prefix: str | None = None):
    """A callable that runs the graph at `path` on a feed dict, and the backend's handle."""
    if backend == "onnxruntime":
        session = onnxruntime_session(path, threads, profile_prefix=profile_prefix)
        return (lambda feeds: session.run(None, feeds)), session
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(path), "CPU", openvino_config(threads, dtype, profile_prefix is not None)
    )
    request = compiled.create_infer_request()
    return (lambda feeds: request.infer(feeds)), request


def _profiled_node_times(backend: str, path: str, feeds: dict, threads: int, dtype: str, workdir: str):
    """(node name as the runtime reports it, time) of every node in one profiled run after a warm-up
    run. Times are in the runtime's unit (microseconds or seconds): callers take shares."""
    if backend == "onnxruntime":
        run, session = _load(backend, path, threads, dtype, profile_prefix=os.path.join(workdir, "profile"))
        run(feeds)
        run(feeds)
        with open(session.end_profiling()) as f:
            events = json.load(f)
        runs = [e for e in events if e.get("name") == "model_run"]
        start = runs[-1]["ts"] if runs else 0
        return [
            (e["name"][: -len("_kernel_time")], e["dur"])
            for e in events
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start
        ]
    run, request = _load(backend, path, threads, dtype, profile_prefix="openvino")
    run(feeds)
    run(feeds)
    return [(info.node_name, info.real_time.total_seconds()) for info in request.profiling_info]


def _prune_share(backend: str, path: str, feeds: dict, threads: int, dtype: str, workdir: str) -> float:
    """Share of node time spent in tgGBC's own nodes, from one profiled run after a warm-up run."""
    import onnx

    names = prune_node_names(onnx.load(path, load_external_data=False))
    if not names:
        return 0.0

    def is_prune(node_name: str) -> bool:
        # Runtimes keep the ONNX node names; ONNX Runtime names a fused node "<first node>/<fusion>/".
        return node_name in names or node_name.split("/", 1)[0] in names

    times = _profiled_node_times(backend, path, feeds, threads, dtype, workdir)
    total = sum(t for _, t in times)
    prune = sum(t for node, t in times if is_prune(node))
    return prune / total if total else float("nan")


def memory_child() -> None:
    """Entry point of the memory-measuring subprocess: JSON setting on stdin, peak MB per graph out.

    Loads each graph, then reads the resident-set high-water mark of its first run above what
    was resident before it (activations and workspace, not weights). glibc is told to hand freed
    memory straight back (a small fixed mmap threshold), as in the PyTorch benchmark.
    """
    import numpy as np

    cfg = json.load(sys.stdin)
    return_freed_memory()
    with np.load(cfg["inputs"]) as data:
        feeds = {name: data[name] for name in data.files}
    peaks = {}
    for method, path in cfg["graphs"].items():
        run, _ = _load(cfg["backend"], path, cfg["threads"], cfg["dtype"])
        peaks[method] = cpu_peak_mb(lambda run=run: run(feeds))
        del run
    json.dump(peaks, sys.stdout)


def _peak_memory_mb(backend: str, graphs: dict[str, str], feeds: dict, threads: int, dtype: str, workdir: str):
    if not os.path.exists("/proc/self/clear_refs"):
        return {m: float("nan") for m in graphs}  # not Linux: no way to read a peak
    import numpy as np

    inputs = os.path.join(workdir, "inputs.npz")
    np.savez(inputs, **feeds)
    payload = json.dumps({"backend": backend, "graphs": graphs, "inputs": inputs, "threads": threads, "dtype": dtype})
    code = "from tggbc.export.bench import memory_child; memory_child()"
    proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def run_backend_benchmark(
    preset: DecoderPreset,
    *,
    backend: str = "onnxruntime",
    methods: tuple[str, ...] | None = None,
    queries: int | None = None,
    batch: int = 1,
    dtype: str = "float32",
    warmup: int = 2,
    runs: int = 10,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
    workdir: str | None = None,
) -> list[MethodResult]:
    """Time exported dense and tgGBC graphs of one decoder in ONNX Runtime or OpenVINO (CPU).

    Args:
        preset: host decoder kind, keys and tgGBC setting (`tggbc.models.configs.DECODER_PRESETS`).
        backend: "onnxruntime" or "openvino".
        methods: subset of ("dense", "tggbc"), in the order to report.
        queries: learnable queries (default: the host's).
        batch: B.
        dtype: "float32"; "float16" exports float16 graphs for ONNX Runtime, and asks OpenVINO for
            float16 inference precision where this CPU has it.
        warmup, runs: untimed and timed rounds (each round runs every method once).
        seed: weights and inputs.
        threads: runtime intra-op threads (default: torch's thread count).
        workdir: where the graphs are written (a temporary directory, removed afterwards).
    Returns:
        one MethodResult per method (field meanings as in `tggbc.bench`).
    """
    methods = tuple(methods) if methods else GRAPH_METHODS
    unknown = [m for m in methods if m not in GRAPH_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} for exported graphs; known: {', '.join(GRAPH_METHODS)}")
    if warmup < 0 or runs < 1 or batch < 1:
        raise ValueError(f"need warmup >= 0, runs >= 1, batch >= 1; got {warmup}, {runs}, {batch}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    _require_backend(backend)
    onnx = require("onnx", purpose=f"--backend {backend}", fix=EXPORT_EXTRA)
    threads = threads or torch.get_num_threads()
    if backend == "openvino":
        openvino_config(threads, dtype)  # no float16 / bfloat16 on this CPU: say so before exporting
        graph_dtype = "float32"  # OpenVINO picks its own inference precision from the hint
    else:
        graph_dtype = dtype

    torch.manual_seed(seed)
    kwargs = {} if queries is None else {"num_queries": queries}
    decoder = build_decoder(preset.kind, **kwargs).eval().requires_grad_(False)
    num_layers = len(decoder.layers)
    KeyPruner(r=preset.r, n=preset.n, k=preset.k).reset(preset.keys, num_layers)  # r >= keys etc. fail here
    settings = {"dense": dict(r=0), "tggbc": dict(r=preset.r, n=preset.n, k=preset.k)}
    inputs = example_inputs(decoder, num_keys=preset.keys, batch=batch, seed=seed)

    bar = progress_bar(
        len(methods) + (warmup + runs) * len(methods), f"bench {backend} {preset.kind} {preset.keys} keys", progress
    )
    with tempfile.TemporaryDirectory(dir=workdir, prefix="tggbc-bench-") as tmp:
        graphs, keys_per_layer = {}, {}
        for m in methods:
            path = os.path.join(tmp, f"{m}.onnx")
            result = export_onnx(decoder, path, num_keys=preset.keys, batch=batch, dtype=graph_dtype, **settings[m])
            graphs[m], keys_per_layer[m] = path, result.keys_per_layer
            bar.update(1)
        feeds = graph_feeds(onnx.load(graphs[methods[0]], load_external_data=False), decoder, inputs)

        def eager(m: str) -> Callable[[], object]:
            pruner = KeyPruner(**settings[m]) if m == "tggbc" else None

            def forward():
                with torch.inference_mode(), pruning(decoder, pruner, attention="fast"):
                    return decoder(**inputs)

            return forward

        flops = {m: count_flops(eager(m)) for m in methods}
        peak = _peak_memory_mb(backend, graphs, feeds, threads, dtype, tmp)
        share = {
            m: (_prune_share(backend, graphs[m], feeds, threads, dtype, tmp) if m == "tggbc" else 0.0) for m in methods
        }
        runners = {m: _load(backend, graphs[m], threads, dtype)[0] for m in methods}

        times: dict[str, list[float]] = {m: [] for m in methods}
        for i in range(warmup + runs):
            order = methods[i % len(methods) :] + methods[: i % len(methods)]
            for m in order:
                start = time.perf_counter()
                runners[m](feeds)
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times[m].append(elapsed * 1e3)
                bar.update(1)
        bar.close()
        del runners

    prune_ms = {m: share[m] * statistics.median(times[m]) for m in methods}
    return summarize(methods, times, prune_ms, peak, flops, keys_per_layer)


# ------------------------------------------------------------------ whole detectors (`--model`)

# Parts of a whole-detector graph, named after the module classes the exporter records on each node.
_PART_CLASSES = {
    "backbone": ("tggbc.models.resnet.ResNet", "tggbc.models.vovnet.VoVNet"),
    "neck": ("tggbc.models.necks.CPFPN",),
    "key_side": ("tggbc.models.position.StreamPETRPositionEmbedding",),
    "decoder": (
        "tggbc.models.streampetr.StreamPETRDecoder",
        "tggbc.models.focalpetr.FocalPETRDecoder",
        "tggbc.export.static.KeySelection",
    ),
}


def _node_parts(path: str) -> dict[str, str]:
    """{node name or output name: part} of a whole-detector graph (nodes of no listed part: "other").

    Output names are included because ONNX Runtime renames the convolutions it moves to its
    blocked layout after their outputs ("<output>_nchwc").
    """
    import onnx

    parts = {}
    for node in onnx.load(path, load_external_data=False).graph.node:
        for prop in node.metadata_props:
            if prop.key != "pkg.torch.onnx.class_hierarchy":
                continue
            for part, classes in _PART_CLASSES.items():
                if any(c in prop.value for c in classes):
                    parts[node.name] = part
                    parts.update(dict.fromkeys(node.output, part))
                    break
    return parts


def _part_shares(backend: str, path: str, feeds: dict, threads: int, workdir: str) -> dict[str, float]:
    """Share of node time per part (backbone, neck, key_side, decoder, other) in one profiled run."""
    parts = _node_parts(path)

    def part_of(node_name: str) -> str:
        # Runtimes keep the ONNX node names; ONNX Runtime names a fused node "<first node>/<fusion>/"
        # and a convolution in its blocked layout "<output>_nchwc".
        name = node_name.split("/", 1)[0]
        return parts.get(name) or parts.get(name.removesuffix("_nchwc")) or "other"

    spent = {p: 0.0 for p in (*_PART_CLASSES, "other")}
    for node, t in _profiled_node_times(backend, path, feeds, threads, "float32", workdir):
        spent[part_of(node)] += t
    total = sum(spent.values())
    return {p: (v / total if total else float("nan")) for p, v in spent.items()}


def run_model_backend_benchmark(
    name: str,
    *,
    backend: str = "onnxruntime",
    image_size: tuple[int, int] | None = None,
    batch: int = 1,
    methods: tuple[str, ...] | None = None,
    r=None,
    n: int | None = None,
    k: int | None = None,
    warmup: int = 1,
    runs: int = 5,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
    workdir: str | None = None,
    **sizes,
):
    """Whole-detector latency of exported dense and tgGBC graphs in ONNX Runtime or OpenVINO (CPU).

    One published detector (random weights: latency does not depend on them) is exported twice
    (`tggbc.export.detector`) and both graphs run on the same frame (a scene's first: empty memory),
    their timed runs interleaved. Parts (backbone, neck, key side, decoder, other) come from one
    profiled run per graph: each part's share of node time, times the median. OpenVINO renames the
    convolutions it fuses with their batch norms, so with it their time counts as "other".

    Returns:
        (one tggbc.model_bench.ModelResult per method, the setting), as `run_model_benchmark`.
    """
    from ..model_bench import ModelResult
    from ..models.detectors import build_detector
    from .detector import ExportedDetector, consecutive_frames, detector_feeds, export_detector_onnx

    methods = tuple(methods) if methods else GRAPH_METHODS
    unknown = [m for m in methods if m not in GRAPH_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} for exported graphs; known: {', '.join(GRAPH_METHODS)}")
    if warmup < 0 or runs < 1 or batch < 1:
        raise ValueError(f"need warmup >= 0, runs >= 1, batch >= 1; got {warmup}, {runs}, {batch}")
    _require_backend(backend)
    threads = threads or torch.get_num_threads()
    torch.manual_seed(seed)
    if image_size is not None:
        sizes["image_size"] = tuple(image_size)
    detector = build_detector(name, pruner=None, **sizes).eval().requires_grad_(False)
    config = detector.config
    setting = dict(r=config.r if r is None else r, n=config.n if n is None else n, k=config.k if k is None else k)
    graph_settings = {"dense": dict(r=0, n=setting["n"], k=setting["k"]), "tggbc": setting}
    ExportedDetector(detector, **setting)  # r >= keys and the like fail before the exports
    (frame,) = consecutive_frames(detector, 1, batch=batch, seed=seed)

    bar = progress_bar(len(methods) + (warmup + runs) * len(methods), f"bench {backend} {config.name}", progress)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="tggbc-bench-") as tmp:
        graphs, keys, feeds = {}, {}, {}
        for m in methods:
            path = os.path.join(tmp, f"{m}.onnx")
            result = export_detector_onnx(detector, path, batch=batch, **graph_settings[m])
            graphs[m], keys[m] = path, result.keys_per_layer
            feeds[m] = detector_feeds(ExportedDetector(detector, **graph_settings[m]), frame, None)
            bar.update(1)
        shares = {m: _part_shares(backend, graphs[m], feeds[m], threads, tmp) for m in methods}
        runners = {m: _load(backend, graphs[m], threads, "float32")[0] for m in methods}
        times: dict[str, list[float]] = {m: [] for m in methods}
        for i in range(warmup + runs):
            order = methods[i % len(methods) :] + methods[: i % len(methods)]
            for m in order:
                start = time.perf_counter()
                runners[m](feeds[m])
                elapsed = (time.perf_counter() - start) * 1e3
                if i >= warmup:
                    times[m].append(elapsed)
                bar.update(1)
        bar.close()
        del runners

    medians = {m: statistics.median(times[m]) for m in methods}
    parts = {m: {p: shares[m][p] * medians[m] for p in shares[m]} for m in methods}
    dense = medians.get("dense", float("nan"))
    dense_decoder = parts["dense"]["decoder"] if "dense" in parts else float("nan")
    results = [
        ModelResult(
            method=m,
            median_ms=medians[m],
            min_ms=min(times[m]),
            max_ms=max(times[m]),
            speedup=dense / medians[m],
            parts_ms=parts[m],
            decoder_share=shares[m]["decoder"],
            decoder_speedup=dense_decoder / parts[m]["decoder"] if parts[m]["decoder"] > 0 else float("nan"),
            keys_per_layer=keys[m],
            times_ms=times[m],
        )
        for m in methods
    ]
    h, w = config.image_size
    info = dict(model=config.name, image_size=[h, w], keys=config.num_keys, batch=batch, backend=backend, **setting)
    return results, info
