"""ONNX export: key selection matches the eager rule, graphs match PyTorch, bench and CLI work, errors are clear."""

import builtins
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from tggbc import select_keys
from tggbc.cli import main
from tggbc.export import ExportedDecoder, compare_onnx, export_onnx
from tggbc.models import build_decoder

ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (pip install 'tggbc[export]')")
onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install 'tggbc[export]')")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (pip install 'tggbc[export]')")

pytestmark = pytest.mark.slow  # ONNX exports take seconds each

TINY = dict(embed_dims=32, num_heads=4, ffn_dims=64, num_layers=3, num_queries=20)
STREAM = dict(memory_len=16, num_propagated=4, topk_proposals=4)
KEYS = 96


def tiny_decoder(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    extra = STREAM if kind == "streampetr" else {}
    return build_decoder(kind, **TINY, **extra).eval()


class Selections(nn.Module):
    """Several static selections in one graph (one export): small and large key counts, few and many kept."""

    def __init__(self, drops: tuple[int, ...]):
        super().__init__()
        self.drops = drops

    def forward(self, small, small_mask, large, large_mask):
        r_small, *r_large = self.drops
        return (
            select_keys(small, r_small, small_mask, traceable=True),
            *(select_keys(large, r, large_mask, traceable=True) for r in r_large),
        )


def test_static_selection_keeps_the_eager_keys_in_onnx(tmp_path):
    """Heavy ties and padding: ONNX TopK on reversed keys keeps exactly what the stable sort keeps.

    The large case keeps 1/8 and 7/8 of 3000 keys, as the presets do, since a runtime may pick a
    different top-k algorithm for a different k / Nk.
    """
    small, large, drops = (2, 40), (1, 3000), (25, 2625, 375)
    path = tmp_path / "select.onnx"
    example = (torch.rand(small), torch.zeros(small, dtype=torch.bool), torch.rand(large), torch.zeros(large).bool())
    names = ["small", "small_mask", "large", "large_mask"]
    torch.onnx.export(Selections(drops).eval(), example, path, dynamo=True, input_names=names, external_data=False)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        imp_small = torch.randint(0, 3 if trial % 2 else 6, small, generator=g).float()
        imp_large = torch.randint(0, 40, large, generator=g).float()
        fraction = 0.4 if trial % 3 else 0.0
        mask_small, mask_large = torch.rand(small, generator=g) < fraction, torch.rand(large, generator=g) < fraction
        feeds = dict(zip(names, (t.numpy() for t in (imp_small, mask_small, imp_large, mask_large)), strict=True))
        got = session.run(None, feeds)
        want = [select_keys(imp_small, drops[0], mask_small)]
        want += [select_keys(imp_large, r, mask_large) for r in drops[1:]]
        for have, expected in zip(got, want, strict=True):
            assert torch.equal(torch.from_numpy(have), expected), trial


def test_static_selection_rejects_bad_r():
    with pytest.raises(ValueError, match="at least one key"):
        select_keys(torch.rand(1, 8), 8, traceable=True)


@pytest.fixture(scope="module", params=[("petr", 2), ("focalpetr", 1), ("streampetr", 1)], ids=lambda p: p[0])
def exported(request, tmp_path_factory):
    kind, batch = request.param
    decoder = tiny_decoder(kind)
    path = tmp_path_factory.mktemp("onnx") / f"{kind}.onnx"
    result = export_onnx(decoder, path, num_keys=KEYS, r=50, n=1, k=8, batch=batch, padded=True, kept_keys=True)
    return kind, decoder, result


def test_exported_graph_passes_checker_and_has_static_shapes(exported):
    kind, decoder, result = exported
    model = onnx.load(result.path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == result.opset >= 18
    assert result.keys_per_layer == [KEYS, KEYS - 50, KEYS - 50]
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), value.name
    ops = {node.op_type for node in model.graph.node}
    assert "TopK" in ops and "Gather" in ops  # selection and gathers are in the graph
    expected_inputs = ["memory", "key_pos", "key_padding_mask"]
    if kind == "streampetr":
        assert [i.name for i in model.graph.input][:4] == [*expected_inputs, "state_embedding"]
        assert "next_state_embedding" in result.output_names
    else:
        assert [i.name for i in model.graph.input] == expected_inputs
    assert result.output_names[-1] == "kept_keys"


@pytest.mark.parametrize("padded_seed", [(False, 1), (True, 2)])
def test_onnxruntime_matches_pytorch(exported, padded_seed):
    from tggbc.models import example_inputs

    kind, decoder, result = exported
    padded, seed = padded_seed
    inputs = example_inputs(decoder, KEYS, batch=result.batch, seed=seed, padded_fraction=0.3 if padded else 0.0)
    cmp = compare_onnx(result.path, decoder, r=50, n=1, k=8, inputs=inputs)
    assert cmp.max_abs_diff <= 1e-4, cmp.per_output
    assert cmp.kept_equal is True and cmp.kept_overlap == 1.0
    assert set(cmp.per_output) == set(result.output_names) - {"kept_keys"}


def test_openvino_runs_the_graph(exported):
    """OpenVINO compiles the same file (StreamPETR's memory update included) and agrees with ONNX Runtime."""
    ov = pytest.importorskip("openvino", reason="optional backend")
    import numpy as np

    from tggbc.export import graph_feeds
    from tggbc.export.bench import openvino_config
    from tggbc.models import example_inputs

    kind, decoder, result = exported
    feeds = graph_feeds(onnx.load(result.path), decoder, example_inputs(decoder, KEYS, batch=result.batch, seed=3))
    want = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"]).run(None, feeds)
    core = ov.Core()
    # The bench's own compile options: float32 must stay float32 on a CPU with native bf16 too.
    config = openvino_config(2, "float32")
    assert config["INFERENCE_PRECISION_HINT"] == "f32"
    got = core.compile_model(core.read_model(result.path), "CPU", config)(feeds)
    for name, expected in zip(result.output_names, want, strict=True):
        if name == "kept_keys":
            assert np.array_equal(np.sort(got[name], axis=1), np.sort(expected, axis=1))
        else:
            assert np.abs(got[name].astype(np.float64) - expected).max() <= 1e-4, name


def test_export_leaves_the_decoder_untouched(exported):
    kind, decoder, _ = exported
    assert decoder.pruner is None and decoder.attention == "fast" and not decoder.training


def test_export_errors(tmp_path):
    decoder = tiny_decoder("petr")
    with pytest.raises(ValueError, match="at least one key must remain"):
        export_onnx(decoder, tmp_path / "x.onnx", num_keys=KEYS, r=KEYS)
    with pytest.raises(ValueError, match="bfloat16"):
        export_onnx(decoder, tmp_path / "x.onnx", num_keys=KEYS, r=10, dtype="bfloat16")
    with pytest.raises(TypeError, match="PETRFamilyDecoder"):
        ExportedDecoder(nn.Linear(2, 2), num_keys=KEYS)
    assert not (tmp_path / "x.onnx").exists()


def test_missing_dependency_names_the_fix(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    monkeypatch.delitem(sys.modules, "onnx")
    with pytest.raises(ImportError, match=r"pip install 'tggbc\[export\]'"):
        export_onnx(tiny_decoder("petr"), tmp_path / "x.onnx", num_keys=KEYS, r=10)


def test_import_does_not_load_onnx():
    optional = ("onnx", "onnxruntime", "onnxscript", "openvino")
    code = f"import sys, tggbc.export; print(any(m.split('.')[0] in {optional} for m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize(
    "argv, message, code",
    [
        (["--preset", "nope"], "unknown preset", 2),
        (["--kind", "petr", "--keys", "64", "--r", "64"], "at least one key", 2),
    ],
)
def test_export_cli_errors(argv, message, code, tmp_path, capsys):
    assert main(["export", *argv, "--out", str(tmp_path / "x.onnx")]) == code
    assert message in capsys.readouterr().err


def test_export_cli_missing_weights_stop_at_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--weights", "/nonexistent/detector.pt", "--out", str(tmp_path / "x.onnx")])
    assert e.value.code == 2 and "argument --weights: no such file: /nonexistent/detector.pt" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.fixture
def tiny_factory(monkeypatch):
    """The commands build full-width six-layer decoders; shrink them so exports take seconds."""
    import tggbc.export.bench
    import tggbc.models

    def build(kind, **kwargs):
        extra = STREAM if kind == "streampetr" else {}
        return build_decoder(kind, **{**TINY, **extra, **kwargs})

    monkeypatch.setattr(tggbc.models, "build_decoder", build)
    monkeypatch.setattr(tggbc.export.bench, "build_decoder", build)


def test_export_cli_exports_a_detector_decoder(tmp_path, capsys):
    """--weights: the small detector's trained decoder, checked against PyTorch by the command itself."""
    pytest.importorskip("safetensors", reason="detector weights are safetensors files")
    from tggbc.detector.config import DetectorConfig
    from tggbc.detector.model import Detector
    from tggbc.detector.weights import save_detector

    config = DetectorConfig(image_width=64, image_height=32, **TINY)  # 6 cameras x 2 x 4 = 48 keys
    torch.manual_seed(0)
    weights = tmp_path / "detector.safetensors"
    save_detector(Detector(config), weights, dtype=torch.float32)
    out = tmp_path / "detector.onnx"
    argv = ["export", "--weights", str(weights), "--r", "0.5", "--kept-keys", "--padded", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "onnx.checker: ok" in text and "keys per layer 48,24,24" in text
    assert "kept keys equal to PyTorch's: yes" in text
    assert float(text.split("max abs diff ")[1].split()[0]) <= 1e-4
    names = ["memory", "key_pos", "key_padding_mask", "query", "reference_points"]
    assert [i.name for i in onnx.load(out).graph.input] == names


def test_bench_onnxruntime_json_is_consistent(tmp_path, capsys, tiny_factory):
    out = tmp_path / "bench.json"
    argv = ["bench", "--backend", "onnxruntime", "--kind", "focalpetr", "--keys", "96", "--queries", "24"]
    argv += ["--r", "0.5", "--k", "8", "--runs", "2", "--warmup", "1", "--no-progress", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "onnxruntime" in table and "tggbc" in table
    payload = json.loads(out.read_text())
    assert set(payload) == {"preset", "setting", "env", "results"}
    assert payload["env"]["backend"] == "onnxruntime"
    assert [r["method"] for r in payload["results"]] == ["dense", "tggbc"]
    for r in payload["results"]:  # the summary figures are those of the timed runs stored beside them
        assert len(r["times_ms"]) == 2 and r["min_ms"] == min(r["times_ms"]) and r["max_ms"] == max(r["times_ms"])
        assert r["median_ms"] == pytest.approx(sum(r["times_ms"]) / 2)
    dense, tggbc = payload["results"]
    assert dense["keys_per_layer"] == [96] * 3 and tggbc["keys_per_layer"] == [96, 48, 48]
    assert tggbc["speedup"] == pytest.approx(dense["median_ms"] / tggbc["median_ms"])
    assert dense["prune_ms"] == 0.0 and 0.0 < tggbc["prune_share"] < 1.0 and tggbc["prune_ms"] > 0
    # Half the keys from layer 2 on: fewer FLOPs, and the ratio is the ratio of the counts.
    assert tggbc["gflops"] < dense["gflops"]
    assert tggbc["flop_ratio"] == pytest.approx(dense["gflops"] / tggbc["gflops"])


def test_bench_backend_errors(capsys):
    assert main(["bench", "--backend", "onnxruntime", "--kind", "focalpetr", "--keys", "64", "--methods", "fast"]) == 2
    assert "dense, tggbc" in capsys.readouterr().err
