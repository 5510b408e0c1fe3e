"""Export PETR-family decoders with tgGBC inside the graph to ONNX, and time them in ONNX Runtime / OpenVINO.

    from tggbc.export import export_onnx, compare_onnx
    decoder = build_decoder("streampetr")
    export_onnx(decoder, "streampetr.onnx", num_keys=24000, r=21000, n=1, k=175)
    compare_onnx("streampetr.onnx", decoder, r=21000, n=1, k=175).max_abs_diff

    tggbc export --preset streampetr-v2-99-1600x640 --out streampetr.onnx
    tggbc bench --preset streampetr-v2-99-1600x640 --backend onnxruntime

Importing this package loads torch and tggbc only; onnx, onnxscript, onnxruntime and openvino
are imported by the functions that use them (install them with `pip install 'tggbc[export]'`).
"""

from .cli import add_arguments, run
from .onnx import (
    DEFAULT_OPSET,
    Comparison,
    ExportResult,
    compare_onnx,
    export_onnx,
    graph_feeds,
    onnxruntime_session,
    prune_node_names,
    torch_outputs,
)
from .static import STATE_FIELDS, ExportedDecoder, KeySelection, StaticKeyPruner

__all__ = [
    "DEFAULT_OPSET",
    "STATE_FIELDS",
    "Comparison",
    "ExportResult",
    "ExportedDecoder",
    "KeySelection",
    "StaticKeyPruner",
    "add_arguments",
    "compare_onnx",
    "export_onnx",
    "graph_feeds",
    "onnxruntime_session",
    "prune_node_names",
    "run",
    "torch_outputs",
]
