"""Whole published detectors as ONNX: static box decoding against the coder, the export module
against the detector, `tggbc export --model` checked over consecutive frames in ONNX Runtime (and a
check that fails on other weights), and `tggbc bench --backend onnxruntime --model`."""

from __future__ import annotations

import pytest
import torch

from nuscenes_data import random_weights
from tggbc.cli import main
from tggbc.models.detectors import SceneStream, build_detector
from tggbc.models.state import TemporalState

TINY = dict(num_query=24, num_propagated=8, memory_len=16, topk_proposals=8, ffn_dims=64, num_layers=2, max_num=50)
MODEL = "stream_petr_r50_flash_704_bs2_seq_428q_nui_24e"


def test_decode_static_equals_the_coder():
    from tggbc.export.detector import decode_static
    from tggbc.models.coder import NMSFreeCoder

    g = torch.Generator().manual_seed(0)
    cls_scores = torch.randn(2, 40, 10, generator=g) * 3
    bbox_preds = torch.randn(2, 40, 10, generator=g)
    bbox_preds[..., :3] *= 50  # some centres beyond the post-centre range (61.2 m, 10 m in z)
    coder = NMSFreeCoder(max_num=60)
    boxes, scores, labels, query, valid = decode_static(coder, cls_scores, bbox_preds)
    assert boxes.shape == (2, 60, 9) and 0 < int(valid.sum()) < 120
    for b, det in enumerate(coder.get_bboxes(cls_scores, bbox_preds)):
        torch.testing.assert_close(boxes[b][valid[b]], det.boxes, rtol=0, atol=0)
        torch.testing.assert_close(scores[b][valid[b]], det.scores, rtol=0, atol=0)
        assert torch.equal(labels[b][valid[b]], det.labels)
        assert torch.equal(query[b] * 10 + labels[b], cls_scores[b].sigmoid().flatten().topk(60).indices)


def test_export_module_equals_the_detector_over_frames():
    """The traced module's eager run (static tgGBC, given inverses, explicit memory) against the
    detector's own scene loop, three frames, memory carried on each side."""
    from tggbc.export.detector import ExportedDetector, consecutive_frames
    from tggbc.pruner import KeyPruner, pruning

    torch.manual_seed(0)
    detector = build_detector(MODEL, pruner=None, image_size=(64, 160), **TINY).requires_grad_(False)
    exported = ExportedDetector(detector, r=0.75, n=1, k=6)
    assert exported.keys_per_layer == [240, 60]
    stream, state = SceneStream(detector), None
    for frame in consecutive_frames(detector, 3):
        with torch.no_grad(), pruning(detector.decoder, KeyPruner(r=0.75, n=1, k=6)):
            want = stream(**frame, scene_token="one")
            got = dict(zip(exported.output_names, exported(*exported.flatten_inputs(frame, state)), strict=True))
        torch.testing.assert_close(got["cls_scores"], want.cls_scores[-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["bbox_preds"], want.bbox_preds[-1], rtol=1e-5, atol=1e-5)
        valid = got["valid"][0]
        torch.testing.assert_close(got["boxes"][0][valid], want.detections[0].boxes, rtol=1e-5, atol=1e-5)
        state = TemporalState(**{f: got[f"next_state_{f}"] for f in ("embedding", "reference_points", "timestamp",
                                                                     "ego_pose", "velocity")})  # fmt: skip
        torch.testing.assert_close(state.reference_points, want.state.reference_points, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(state.embedding, want.state.embedding, rtol=1e-5, atol=1e-5)


def test_export_model_refusals(tmp_path, capsys):
    from tggbc.export.detector import ExportedDetector

    out = str(tmp_path / "m.onnx")
    assert main(["export", "--model", MODEL, "--padded", "--out", out]) == 2
    assert "--padded is for decoder graphs" in capsys.readouterr().err
    assert main(["export", "--model", MODEL, "--r", "300", "--image-size", "64x160", "--out", out]) == 2
    assert "drops 300 keys but the decoder starts with only 240" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
    detector = build_detector(MODEL, pruner=None, image_size=(64, 160), aux_2d_only=False, **TINY)
    with pytest.raises(ValueError, match="aux_2d_only=True"):
        ExportedDetector(detector)


@pytest.mark.slow
def test_export_whole_streampetr_checked_over_frames(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the check runs the graph in ONNX Runtime")
    import onnx

    from tggbc.export.detector import compare_detector_onnx, consecutive_frames
    from tggbc.models.checkpoint import load_converted

    out = tmp_path / "streampetr.onnx"
    args = ["export", "--model", MODEL, "--weights", str(random_weights(MODEL)), "--image-size", "64x160"]
    assert main([*args, "--out", str(out), "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "tgGBC r=0.875 n=1 k=175" in text and "keys per layer 240,30,30,30,30,30" in text
    assert "onnxruntime vs PyTorch over 3 consecutive frames" in text
    graph = onnx.load(str(out), load_external_data=False)
    inputs = [i.name for i in graph.graph.input]
    assert inputs[:4] == ["img", "lidar2img", "img2lidar", "intrinsics"] and "state_embedding" in inputs
    assert "next_state_embedding" in [o.name for o in graph.graph.output]

    detector = build_detector(MODEL, pruner=None, image_size=(64, 160))
    load_converted(detector, random_weights(MODEL))
    frames = consecutive_frames(detector, 2)
    same = compare_detector_onnx(out, detector, frames, threads=1)
    assert same.passed() and same.frames == 2 and same.max_scaled_diff < 1e-4
    with torch.no_grad():  # other weights: the same check must fail
        detector.decoder.reg_branches[-1][-1].bias += 0.01
    assert not compare_detector_onnx(out, detector, frames, threads=1).passed()


@pytest.mark.slow
def test_bench_onnxruntime_whole_model():
    pytest.importorskip("onnxruntime", reason="the benchmark runs ONNX Runtime")
    from tggbc.export.bench import run_model_backend_benchmark

    (result,), info = run_model_backend_benchmark(
        "petrv1_r50_flash_704_24e", image_size=(64, 160), methods=("tggbc",), warmup=0, runs=1, threads=1,
        progress=False,
    )  # fmt: skip
    assert info["keys"] == 240 and result.keys_per_layer == [240] + [30] * 5
    parts = result.parts_ms
    assert set(parts) == {"backbone", "neck", "key_side", "decoder", "other"}
    assert parts["backbone"] > 0 and parts["decoder"] > 0 and 0 < result.decoder_share < 1
    assert sum(parts.values()) == pytest.approx(result.median_ms)
