"""ONNX export of a host decoder with tgGBC inside the graph, and its check against PyTorch.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript), chosen because
- it is torch's maintained exporter (the TorchScript one is deprecated and frozen);
- it traces Python ints as ints: the decoders resolve their schedule with plain Python on
  `memory.shape` (`prune_schedule(num_keys=...)`), which runs unchanged here, whereas the
  TorchScript tracer hands that code 0-d tensors and fails;
- it keeps the module structure in node metadata, which names tgGBC's own operators
  (`KeySelection`) for the backend benchmarks.
Every shape in the graph is static, the kept-key count of each layer included; one graph serves
one (batch, keys, r, n, k) setting.

onnx, onnxscript and onnxruntime are imported inside the functions that need them, so
`import tggbc.export` stays light and a missing extra fails with the command that installs it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..files import write_atomic
from ..models import example_inputs
from ..models.decoder import PETRFamilyDecoder
from ..pruner import KeyPruner, pruning
from .static import ExportedDecoder, example_queries

__all__ = [
    "DEFAULT_OPSET",
    "DTYPES",
    "EXPORT_EXTRA",
    "OPTIMIZE_LEVELS",
    "Comparison",
    "ExportResult",
    "check_opset",
    "compare_onnx",
    "export_module",
    "export_onnx",
    "graph_feeds",
    "onnxruntime_session",
    "prune_node_names",
    "require",
    "to_numpy",
    "torch_outputs",
]

# ONNX Runtime and OpenVINO both run opset 20 in full; newer opsets add nothing these graphs use.
DEFAULT_OPSET = 20
MIN_OPSET = 18  # the oldest torch.onnx.export(dynamo=True) writes
EXPORT_EXTRA = "pip install 'tggbc[export]'"
OPTIMIZE_LEVELS = ("light", "full", "none")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_KEY_SELECTION = "tggbc.export.static.KeySelection"


def require(module: str, purpose: str = "ONNX export", fix: str = EXPORT_EXTRA):
    """Import an optional dependency or raise ImportError naming the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the optional package {module!r}, which is not installed: {fix}") from e


@dataclass
class ExportResult:
    """What `export_onnx` wrote."""

    path: str
    kind: str  # decoder class name
    input_names: list[str]
    output_names: list[str]
    opset: int
    dtype: str
    num_keys: int
    batch: int
    schedule: list[int]  # keys dropped after each layer
    keys_per_layer: list[int]
    seconds: float
    size_mb: float


@dataclass
class Comparison:
    """Exported graph vs the eager PyTorch decoder on the same inputs."""

    max_abs_diff: float  # over every floating-point output
    per_output: dict[str, float] = field(default_factory=dict)
    kept_equal: bool | None = None  # kept_keys output equal to the eager kept set (None: no such output)
    kept_overlap: float | None = None  # share of the eager kept keys that the graph keeps too


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        return names[dtype]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return dtype


def export_onnx(
    decoder: PETRFamilyDecoder,
    path: str | os.PathLike,
    *,
    num_keys: int,
    r: int | float | list[int] = 0,
    n: int = 1,
    k: int = -1,
    batch: int = 1,
    padded: bool = False,
    queries: bool = False,
    dtype: str | torch.dtype = "float32",
    opset: int = DEFAULT_OPSET,
    all_layers: bool = False,
    kept_keys: bool = False,
    optimize: str = "light",
    verbose: bool = False,
) -> ExportResult:
    """Export a host decoder with a fixed tgGBC setting to one ONNX file, checked by onnx.checker.

    The decoder is copied (eval mode, `dtype`), never modified. Top-k query selection, importance,
    key selection and the gathers are ONNX operators in the graph (see `tggbc.export.static`).

    Args:
        decoder: any PETRFamilyDecoder (PETR, FocalPETR, StreamPETR, or a detector's decoder).
        path: the .onnx file to write (weights inside it, no external data file).
        num_keys: Nk image keys per sample the graph is built for.
        r, n, k: the tgGBC setting (`prune_schedule`); r=0 exports the dense decoder.
        batch: B the graph is built for.
        padded: add a key_padding_mask [B, Nk] bool input.
        queries: add query [B, Nq, E] and reference_points [B, Nq, 3] inputs (the small
            detector's decoder: its queries are selected per frame from its keys).
        dtype: "float32" or "float16" weights and activations (importance is computed in
            float32 either way; StreamPETR's times stay float64, its geometry float32).
        opset: ONNX opset.
        all_layers, kept_keys: extra outputs, see `ExportedDecoder`.
        optimize: "light" (fold constants, merge common subexpressions, drop dead nodes), "full"
            (onnxscript's optimizer: the same plus its pattern rewrites, twice the export time
            for no measurable runtime gain in ONNX Runtime here) or "none".
        verbose: show the exporter's progress messages.
    Returns:
        ExportResult.
    """
    dtype = _dtype_name(dtype)
    if optimize not in OPTIMIZE_LEVELS:
        raise ValueError(f"optimize must be one of {list(OPTIMIZE_LEVELS)}, got {optimize!r}")
    if dtype == "bfloat16":
        raise ValueError(
            "bfloat16 graphs are not supported: ONNX TopK (top-k queries, key selection) has no bfloat16 "
            "type and ONNX Runtime's CPU provider has no bfloat16 kernels; use --dtype float16"
        )
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not isinstance(decoder, PETRFamilyDecoder):
        raise TypeError(
            f"can only export a PETRFamilyDecoder (PETR, FocalPETR, StreamPETR), got {type(decoder).__name__}"
        )
    # Fail on a bad setting (r >= keys, ...) before the slow imports and the copy.
    layout = dict(padded=padded, queries=queries, all_layers=all_layers, kept_keys=kept_keys)
    exported = ExportedDecoder(decoder, r, n, k, num_keys=num_keys, **layout)
    check_opset(opset)

    torch_dtype = DTYPES[dtype]
    copied = copy.deepcopy(decoder).eval().requires_grad_(False).to(torch_dtype)
    exported = ExportedDecoder(copied, r, n, k, num_keys=num_keys, **layout)
    inputs = example_inputs(copied, num_keys=num_keys, batch=batch, dtype=torch_dtype, padded_fraction=0.0)
    if queries:
        inputs.update(example_queries(copied, batch, torch_dtype))
    args = exported.flatten_inputs(inputs)

    meta = {
        "tggbc.kind": type(decoder).__name__,
        "tggbc.setting": f"r={r} n={n} k={k}",
        "tggbc.num_keys": str(num_keys),
        "tggbc.schedule": ",".join(map(str, exported.schedule)),
        "tggbc.keys_per_layer": ",".join(map(str, exported.keys_per_layer)),
        "tggbc.dtype": dtype,
    }
    path, seconds = export_module(
        exported,
        args,
        path,
        input_names=exported.input_names,
        output_names=exported.output_names,
        opset=opset,
        optimize=optimize,
        verbose=verbose,
        metadata=meta,
    )
    return ExportResult(
        path=path,
        kind=type(decoder).__name__,
        input_names=list(exported.input_names),
        output_names=list(exported.output_names),
        opset=opset,
        dtype=dtype,
        num_keys=num_keys,
        batch=batch,
        schedule=list(exported.schedule),
        keys_per_layer=list(exported.keys_per_layer),
        seconds=seconds,
        size_mb=os.path.getsize(path) / 2**20,
    )


def check_opset(opset: int) -> None:
    """Raise ValueError unless torch's exporter can write `opset` with the installed onnx."""
    onnx = require("onnx")
    require("onnxscript", purpose="torch's ONNX exporter (dynamo=True)")
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"opset must be an int in [{MIN_OPSET}, {newest}] (torch's exporter writes opset {MIN_OPSET} or newer; "
            f"this onnx knows up to {newest}), got {opset!r}"
        )


def export_module(
    module: torch.nn.Module,
    args: tuple,
    path: str | os.PathLike,
    *,
    input_names: list[str],
    output_names: list[str],
    opset: int = DEFAULT_OPSET,
    optimize: str = "light",
    verbose: bool = False,
    metadata: dict[str, str] | None = None,
) -> tuple[str, float]:
    """Trace `module(*args)` with torch's exporter (dynamo=True) into one checked ONNX file.

    Every shape is static (those of `args`). The graph is cleaned up (`optimize`, see `export_onnx`),
    checked by onnx.checker, tagged with `metadata` and written atomically (weights inside the file).

    Returns:
        (the path written, seconds taken).
    """
    if optimize not in OPTIMIZE_LEVELS:
        raise ValueError(f"optimize must be one of {list(OPTIMIZE_LEVELS)}, got {optimize!r}")
    check_opset(opset)
    onnx = require("onnx")
    start = time.perf_counter()
    with _quiet(verbose), torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            optimize=optimize == "full",
            verbose=verbose,
            external_data=False,
        )
        if optimize == "light":
            _light_optimize(program.model)
    model = program.model_proto
    _slices_to_gathers(model)
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise ValueError(f"asked for opset {opset}, but the exporter wrote opset {written}: pass --opset {written}")
    path = os.fspath(write_atomic(path, lambda tmp: onnx.save(model, tmp)))  # never a half-written graph
    return path, time.perf_counter() - start


def _light_optimize(model) -> None:
    """Constant folding, common subexpressions and dead nodes, in place on an onnx_ir Model."""
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants

    fold_constants(model)
    common.RemoveUnusedNodesPass()(model)
    common.CommonSubexpressionEliminationPass()(model)
    common.RemoveUnusedNodesPass()(model)


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Silence the exporter's progress prints and warnings unless asked for."""
    if verbose:
        yield
        return
    import logging

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _slices_to_gathers(model) -> None:
    """Rewrite constant single-axis Slices that feed a GatherElements as Gathers with constant indices.

    Same values, same output names. OpenVINO (2026.x) drops a Slice placed right before a
    GatherElements when it compiles (its GatherElements then fails shape validation); StreamPETR's
    memory update has that pattern (`bbox_preds[..., :3].gather(...)`). A Gather of the same
    channels is not dropped. ONNX Runtime runs both forms at the same speed.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {t.name: t for t in graph.initializer}

    def constant(name: str):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_ints":
                    return np.array(list(attr.ints), dtype=np.int64)
                if attr.name == "value_int":
                    return np.array(attr.i, dtype=np.int64)
        return None

    targets = []
    for node in graph.node:
        if node.op_type != "GatherElements":
            continue
        source = producer.get(node.input[0])
        while source is not None and source.op_type == "Identity":
            source = producer.get(source.input[0])
        if source is not None and source.op_type == "Slice":
            targets.append(source)
    if not targets:
        return
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = [d.dim_value for d in dims]
    done = set()
    for node in targets:
        if id(node) in done:
            continue
        done.add(id(node))
        parts = [constant(name) if name else None for name in node.input[1:]]
        parts += [None] * (4 - len(parts))
        starts, ends, axes, steps = parts
        shape = shapes.get(node.input[0])
        if starts is None or ends is None or shape is None or starts.size != 1:
            continue
        if (node.input[3:4] and axes is None) or (node.input[4:5] and steps is None):
            continue
        axis = int(axes.reshape(-1)[0]) if axes is not None else 0
        step = int(steps.reshape(-1)[0]) if steps is not None else 1
        size = shape[axis]
        index = np.arange(*slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), step).indices(size))
        name = f"{node.name}_indices"
        graph.initializer.append(numpy_helper.from_array(index.astype(np.int64), name))
        gather = helper.make_node("Gather", [node.input[0], name], list(node.output), name=node.name, axis=axis)
        gather.metadata_props.extend(node.metadata_props)
        node.CopyFrom(gather)


def prune_node_names(model) -> set[str]:
    """Names of the nodes that do tgGBC's own work (importance, selection, gathers) in an exported graph."""
    names = set()
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.class_hierarchy" and _KEY_SELECTION in prop.value:
                names.add(node.name)
                break
    return names


def to_numpy(t: Tensor):
    """A tensor as the numpy array an ONNX runtime takes (float16 stays float16)."""
    return t.detach().cpu().numpy()


def graph_feeds(model, decoder: PETRFamilyDecoder, inputs: dict) -> dict:
    """`example_inputs`-style inputs -> {graph input name: numpy array} in the graph's input types.

    Args:
        model: the exported ModelProto (only its inputs are read).
        decoder: the decoder it was exported from (tells the input layout).
        inputs: memory, key_pos, key_padding_mask and, for StreamPETR, state, ego_pose, timestamp.
    """
    import onnx

    graph_inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    num_keys = graph_inputs["memory"].shape.dim[1].dim_value
    layout = ExportedDecoder(
        decoder, num_keys=num_keys, padded="key_padding_mask" in graph_inputs, queries="query" in graph_inputs
    )
    feeds = {}
    for name, value in zip(layout.input_names, layout.flatten_inputs(inputs), strict=True):
        if name not in graph_inputs:
            raise ValueError(f"the graph has no input {name!r}: was it exported from this decoder?")
        elem = graph_inputs[name].elem_type
        feeds[name] = to_numpy(value).astype(onnx.helper.tensor_dtype_to_np_dtype(elem), copy=False)
    if set(feeds) != set(graph_inputs):
        raise ValueError(f"the graph takes inputs {sorted(graph_inputs)}, this decoder gives {sorted(feeds)}")
    return feeds


def onnxruntime_session(path: str | os.PathLike, threads: int | None = None, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session with full graph optimisation and quiet logs."""
    ort = require("onnxruntime", purpose="running exported graphs")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the fp16 cast insertions and folding notes are expected
    if threads is not None:
        options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def torch_outputs(
    decoder: PETRFamilyDecoder,
    inputs: dict,
    *,
    r: int | float | list[int] = 0,
    n: int = 1,
    k: int = -1,
    padded: bool = False,
    queries: bool = False,
    all_layers: bool = False,
    kept_keys: bool = False,
) -> tuple[list[str], tuple[Tensor, ...]]:
    """The eager decoder's outputs in the graph's output order: the reference to compare against.

    Runs the decoder itself with a plain KeyPruner (eager semantics: stable sort, all checks) and
    fast attention, in eval mode, then restores its pruner, attention mode and training flag.

    Returns:
        (output names, output tensors).
    """
    num_keys = inputs["memory"].shape[1]
    layout = ExportedDecoder(
        decoder, r, n, k, num_keys=num_keys, padded=padded, queries=queries, all_layers=all_layers, kept_keys=kept_keys
    )
    pruner = KeyPruner(r=r, n=n, k=k) if layout.pruner is not None else None
    training = decoder.training
    decoder.eval()
    try:
        with torch.inference_mode(), pruning(decoder, pruner, attention="fast"):
            out = decoder(**inputs, track_keys=kept_keys)
    finally:
        decoder.train(training)
    return layout.output_names, layout.flatten_outputs(out)


def compare_onnx(
    path: str | os.PathLike,
    decoder: PETRFamilyDecoder,
    *,
    r: int | float | list[int] = 0,
    n: int = 1,
    k: int = -1,
    inputs: dict | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> Comparison:
    """Run an exported graph in ONNX Runtime and the eager decoder on the same inputs; compare.

    The eager decoder runs in float32 whatever the graph's dtype, so for a float16 graph the
    difference is the one from float32.

    Args:
        path: a file written by `export_onnx` for this decoder and setting.
        decoder: the decoder that was exported (float32).
        r, n, k: the setting it was exported with.
        inputs: `example_inputs(decoder, ...)`-style float32 inputs; default random ones of the
            graph's shapes (seed `seed`, a quarter of the keys padded if the graph takes a mask).
        threads: ONNX Runtime intra-op threads.
    Returns:
        Comparison.
    """
    import numpy as np

    onnx = require("onnx")
    session = onnxruntime_session(path, threads)
    model = onnx.load(os.fspath(path), load_external_data=False)
    graph_inputs = {i.name: i for i in model.graph.input}
    memory_shape = [d.dim_value for d in graph_inputs["memory"].type.tensor_type.shape.dim]
    batch, num_keys = memory_shape[:2]
    padded = "key_padding_mask" in graph_inputs
    queries = "query" in graph_inputs
    output_names = [o.name for o in model.graph.output]
    all_layers = len(model.graph.output[0].type.tensor_type.shape.dim) == 4
    kept_keys = "kept_keys" in output_names
    if inputs is None:
        inputs = example_inputs(
            decoder, num_keys=num_keys, batch=batch, seed=seed, padded_fraction=0.25 if padded else 0
        )
        if queries:
            inputs.update(example_queries(decoder, batch, seed=seed))
    names, expected = torch_outputs(
        decoder, inputs, r=r, n=n, k=k, padded=padded, queries=queries, all_layers=all_layers, kept_keys=kept_keys
    )
    if names != output_names:
        raise ValueError(f"{path} has outputs {output_names}, but this decoder and setting give {names}")
    feeds = graph_feeds(model, decoder, inputs)
    got = session.run(None, feeds)
    result = Comparison(max_abs_diff=0.0)
    for name, want, have in zip(names, expected, got, strict=True):
        if name == "kept_keys":
            want = to_numpy(want)
            result.kept_equal = bool(np.array_equal(np.sort(want, axis=1), np.sort(have, axis=1)))
            common = sum(np.intersect1d(a, b).size for a, b in zip(want, have, strict=True))
            result.kept_overlap = common / want.size if want.size else 1.0
            continue
        if have.shape != tuple(want.shape):
            raise ValueError(f"output {name}: graph gives shape {have.shape}, PyTorch {tuple(want.shape)}")
        diff = float(np.abs(have.astype(np.float64) - to_numpy(want).astype(np.float64)).max()) if have.size else 0.0
        result.per_output[name] = diff
        result.max_abs_diff = max(result.max_abs_diff, diff)
    return result
