"""The shipped detector's pruned ONNX decoder gives the same detections as PyTorch on val frames."""

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs onnxruntime (tggbc[export])")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (tggbc[export])")
pytest.importorskip("nuscenes", reason="generating the val scenes needs nuscenes-devkit (tggbc[eval])")

pytestmark = pytest.mark.slow  # ONNX exports take seconds each

from tggbc import KeyPruner, pruning  # noqa: E402
from tggbc.demo import VAL_FRAMES, VAL_SEED  # noqa: E402
from tggbc.detector.config import DecodeConfig  # noqa: E402
from tggbc.detector.evaluate import SHIPPED  # noqa: E402
from tggbc.detector.weights import load_detector  # noqa: E402

# Developers may point this at other weights; by default the test checks the shipped model.
WEIGHTS = Path(os.environ.get("TGGBC_DETECTOR_WEIGHTS", SHIPPED))


@pytest.fixture(scope="module")
def model():
    assert WEIGHTS.is_file(), f"the shipped detector weights are missing: {WEIGHTS}"
    return load_detector(WEIGHTS)


@pytest.fixture(scope="module")
def frames(model, tmp_path_factory):
    """The first val scene of the shipped model's validation set (same seed, same renderer)."""
    from tggbc.data import generate, list_frames

    cfg = model.config
    root = tmp_path_factory.mktemp("val") / "data"
    generate(
        root,
        num_scenes=1,
        seed=VAL_SEED,
        image_size=(cfg.image_width, cfg.image_height),
        frames_per_scene=VAL_FRAMES,
        val_fraction=1.0,
        progress=False,
    )
    return list_frames(root, "val")[:3]


def top_pairs(cls_scores, count):
    """(query, class) pairs of the top `count` sigmoid scores, and the scores: the NMS-free decoder's pick."""
    scores = cls_scores.float().sigmoid().flatten()
    top = scores.topk(count)
    num_classes = cls_scores.shape[-1]
    return [(int(i) // num_classes, int(i) % num_classes) for i in top.indices], top.values


def test_onnx_detections_equal_pytorch(model, frames, tmp_path):
    import onnx

    from tggbc.export import export_onnx, graph_feeds, onnxruntime_session

    cfg = model.config
    setting = dict(r=0.875, n=1, k=cfg.default_k)
    path = tmp_path / "detector.onnx"
    export_onnx(model.decoder, path, num_keys=cfg.num_keys, queries=True, **setting)
    graph = onnx.load(str(path), load_external_data=False)
    session = onnxruntime_session(path, threads=2)
    output_names = [o.name for o in session.get_outputs()]
    for frame in frames:
        images = torch.from_numpy(frame.read_images()).permute(0, 3, 1, 2).unsqueeze(0)
        lidar2img = torch.from_numpy(frame.lidar2img).unsqueeze(0)
        with torch.inference_mode(), pruning(model.decoder, KeyPruner(**setting)):
            keys = model.keys(model.features(images), lidar2img)
            eager = model.decode(keys)
        inputs = {
            "memory": keys.memory,
            "key_pos": keys.key_pos,
            "query": model.query.weight.detach().unsqueeze(0),  # the learned content and anchors
            "reference_points": model.decoder.reference_points.weight.detach().unsqueeze(0),
        }
        feeds = graph_feeds(graph, model.decoder, inputs)
        outputs = dict(zip(output_names, session.run(None, feeds), strict=True))
        cls_onnx = torch.from_numpy(outputs["cls_scores"]).reshape(eager.cls_scores[-1].shape)
        box_onnx = torch.from_numpy(outputs["bbox_preds"]).reshape(eager.bbox_preds[-1].shape)

        count = DecodeConfig().max_detections
        pairs_eager, scores_eager = top_pairs(eager.cls_scores[-1], count)
        pairs_onnx, scores_onnx = top_pairs(cls_onnx, count)
        torch.testing.assert_close(scores_onnx, scores_eager, rtol=0, atol=1e-5)
        # The same (query, class) pairs, except where scores tie within the tolerance at the cut.
        boundary = float(scores_eager[-1])
        differing = set(pairs_eager) ^ set(pairs_onnx)
        sigmoid = eager.cls_scores[-1][0].float().sigmoid()
        for q, c in differing:
            assert abs(float(sigmoid[q, c]) - boundary) < 1e-5, f"detection {(q, c)} differs away from the cut"
        # Their boxes agree to float32 round-off through six layers: centres are metres (tens of
        # them), so the bound is relative as well as absolute.
        shared = [p for p in pairs_eager if p in set(pairs_onnx)]
        queries = torch.tensor([q for q, _ in shared])
        torch.testing.assert_close(box_onnx[0, queries], eager.bbox_preds[-1][0, queries], rtol=2e-4, atol=1e-4)
        assert len(shared) >= count - 2
