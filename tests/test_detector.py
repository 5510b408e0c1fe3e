"""The synthetic-scene detector: box code, matching, denoising, the model, training and weights."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("scipy", reason="Hungarian matching needs scipy")
pytest.importorskip("safetensors", reason="detector weights are safetensors files")

from tggbc.detector.boxes import decode_boxes, encode_boxes  # noqa: E402
from tggbc.detector.config import DetectorConfig, TrainConfig  # noqa: E402
from tggbc.detector.denoise import denoising_queries  # noqa: E402
from tggbc.detector.loss import detection_loss, hungarian_match, sigmoid_focal_loss  # noqa: E402
from tggbc.detector.model import Detector  # noqa: E402
from tggbc.detector.weights import load_detector, save_detector  # noqa: E402

# 6 cameras x 2 x 4 = 48 keys; everything small enough to train in seconds.
TINY = DetectorConfig(
    image_width=64, image_height=32, backbone_channels=(8, 8, 16, 16), backbone_blocks=(1, 1, 1), num_queries=12,
    embed_dims=32, num_heads=4, ffn_dims=64, num_layers=3,
)  # fmt: skip
PC_RANGE = torch.tensor([-51.2, -51.2, -5.0, 51.2, 51.2, 3.0])


def boxes(*centers):
    c = torch.tensor(centers, dtype=torch.float32)
    return encode_boxes(
        c, torch.tensor([[1.8, 4.5, 1.6]]).expand(len(c), 3), torch.zeros(len(c)), torch.zeros(len(c), 2)
    )


def test_box_code_round_trip():
    center, size, yaw, velocity = torch.randn(5, 3), torch.rand(5, 3) + 0.5, torch.rand(5) * 6 - 3, torch.randn(5, 2)
    c, s, y, v = decode_boxes(encode_boxes(center, size, yaw, velocity))
    torch.testing.assert_close(c, center)
    torch.testing.assert_close(s, size)
    torch.testing.assert_close(torch.cos(y - yaw), torch.ones(5))
    torch.testing.assert_close(v, velocity)


def _slow_focal(logits, target, alpha, gamma):
    total = 0.0
    for x, t in zip(logits.flatten().tolist(), target.flatten().tolist(), strict=True):
        p = 1.0 / (1.0 + math.exp(-x))
        total += -alpha * (1 - p) ** gamma * math.log(p) if t == 1.0 else -(1 - alpha) * p**gamma * math.log(1 - p)
    return total


def test_focal_loss_is_the_textbook_one():
    torch.manual_seed(0)
    logits, target = torch.randn(7, 5, dtype=torch.float64) * 3, (torch.rand(7, 5) < 0.3).double()
    assert float(sigmoid_focal_loss(logits, target, 0.25, 2.0).sum()) == pytest.approx(
        _slow_focal(logits, target, 0.25, 2.0)
    )


def test_hungarian_match_prefers_the_right_query():
    from tggbc.detector.loss import LossConfig

    target = boxes([10.0, 0.0, 0.0], [-20.0, 5.0, 0.0])
    pred = boxes([-19.0, 5.0, 0.0], [30.0, 30.0, 0.0], [10.5, 0.0, 0.0])
    logits = torch.full((3, 10), -3.0)
    q, t = hungarian_match(logits, pred, torch.tensor([0, 0]), target, LossConfig())
    assert dict(zip(t.tolist(), q.tolist(), strict=True)) == {0: 2, 1: 0}


def test_loss_is_lower_for_the_right_prediction():
    target = boxes([10.0, 0.0, 0.0])
    labels = [torch.tensor([3])]
    right_logits = torch.full((1, 1, 4, 10), -5.0)
    right_logits[0, 0, 1, 3] = 5.0
    right = torch.stack(
        [boxes([40.0, 40.0, 0.0])[0], target[0], boxes([-40.0, 0.0, 0.0])[0], boxes([0.0, 40.0, 0.0])[0]]
    )
    wrong = right.roll(1, 0)
    good, _ = detection_loss(right_logits, right[None, None], labels, [target])
    bad, _ = detection_loss(right_logits, wrong[None, None], labels, [target])
    assert float(good) < float(bad)


def test_denoising_queries_groups_targets_and_mask():
    labels = [torch.tensor([1, 4]), torch.tensor([7])]
    gt = [boxes([10.0, 0.0, 0.0], [0.0, 20.0, 0.0]), boxes([-5.0, -5.0, 0.0])]
    cfg = TrainConfig(dn_queries=6, dn_groups=5)
    dn = denoising_queries(labels, gt, torch.zeros(8), 3, PC_RANGE, cfg, torch.Generator().manual_seed(0))
    # 6 // 2 (most boxes in a frame) = 3 groups of 2 slots; the second frame pads its second slot.
    assert dn.query.shape == (2, 6, 8) and dn.reference_points.shape == (2, 6, 3)
    assert dn.valid.tolist() == [[True] * 6, [True, False] * 3]
    assert set(dn.labels[0].tolist()) <= {1, 4, -1} and set(dn.labels[1, 1::2].tolist()) == {-1}
    assert torch.equal(dn.boxes[0, 2:4], gt[0]) and ((dn.reference_points >= 0) & (dn.reference_points <= 1)).all()
    # Noise within the half size: a reference point stays inside its box's extent (1 unit of noise).
    centers = dn.reference_points[0] * (PC_RANGE[3:] - PC_RANGE[:3]) + PC_RANGE[:3]
    assert ((centers[0::2] - gt[0][0, [0, 1, 4]]).abs() <= torch.tensor([2.25, 2.25, 0.8]) + 1e-4).all()
    mask = dn.self_attn_mask
    assert mask.shape == (9, 9)
    assert mask[6:, :6].all() and not mask[6:, 6:].any()  # learned queries never see denoising ones
    assert not mask[0:2, 0:2].any() and mask[0:2, 2:6].all()  # a group sees only itself
    assert not mask[:6, 6:].any()  # and the learned queries
    none = denoising_queries(
        [torch.tensor([], dtype=torch.long)], [torch.zeros(0, 10)], torch.zeros(8), 3, PC_RANGE, cfg
    )
    assert none is None


def test_queries_do_not_depend_on_the_frame_and_a_shared_rig_is_computed_once():
    torch.manual_seed(0)
    model = Detector(TINY).eval()
    with torch.no_grad():
        model.query.weight.normal_()
        images = torch.randint(0, 255, (2, 6, 3, 32, 64), dtype=torch.uint8)
        lidar2img = torch.eye(4).repeat(2, 6, 1, 1)
        lidar2img[..., 0, 0], lidar2img[..., 1, 1], lidar2img[..., 0, 2], lidar2img[..., 1, 2] = 40, 40, 32, 16
        features = model.features(images)
        shared = model.keys(features, lidar2img)
        apart = [model.keys(features[i : i + 1], lidar2img[i : i + 1]) for i in range(2)]
        for i in range(2):
            torch.testing.assert_close(shared.key_pos[i], apart[i].key_pos[0])
            torch.testing.assert_close(shared.memory[i], apart[i].memory[0])
        out = model(images, lidar2img)
    assert out.cls_scores.shape == (3, 2, 12, 10) and out.bbox_preds.shape == (3, 2, 12, 10)
    assert out.keys_per_layer == [48, 48, 48]
    # Every frame's queries start from the same learned content at the same anchors.
    with pytest.raises(ValueError, match="64x32"):
        model.features(torch.zeros(1, 6, 3, 64, 64, dtype=torch.uint8))


def test_weights_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = Detector(TINY)
    path = tmp_path / "d.safetensors"
    save_detector(model, path, dtype=torch.float32)
    loaded = load_detector(path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_detector(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    bigger = json.dumps({**TINY.to_dict(), "num_queries": 13})
    save_file(tensors, tmp_path / "other.safetensors", metadata={"format": "tggbc-detector/2", "config": bigger})
    with pytest.raises(ValueError, match="wrong shape"):
        load_detector(tmp_path / "other.safetensors")
    save_file(tensors, tmp_path / "alien.safetensors", metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a tggbc detector file"):
        load_detector(tmp_path / "alien.safetensors")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tggbc.data import generate

    root = tmp_path_factory.mktemp("synth") / "data"
    return generate(
        root, num_scenes=3, seed=5, image_size=(64, 32), frames_per_scene=2, val_fraction=0.34, progress=False
    )


def test_train_resume_and_evaluate(dataset, tmp_path):
    from tggbc.detector.evaluate import evaluate, settings_for
    from tggbc.detector.train import train

    torch.manual_seed(0)
    init = tmp_path / "init.safetensors"
    save_detector(Detector(TINY), init, dtype=torch.float32)
    cfg = TrainConfig(iterations=4, batch=2, warmup=1, checkpoint_every=2)
    run = tmp_path / "run"
    weights = train([dataset], run, cfg, init=init, config=TINY, minutes=None, progress=False)
    log = (run / "loss.csv").read_text().splitlines()
    assert log[0].startswith("iteration,") and len(log) == 5
    assert all(math.isfinite(float(v)) for line in log[1:] for v in line.split(","))
    # The backbone is frozen: its tensors are the init file's (stored as float16).
    trained, start = load_detector(weights), load_detector(init)
    for name, t in trained.backbone.state_dict().items():
        assert torch.equal(t, start.backbone.state_dict()[name].half().float()), name
    assert not torch.equal(trained.query.weight, start.query.weight)
    with pytest.raises(FileExistsError, match="not empty"):
        train([dataset], run, cfg, init=init, config=TINY, progress=False)
    more = TrainConfig(iterations=6, batch=2, warmup=1, checkpoint_every=2)
    with pytest.raises(ValueError, match="iterations=4"):
        train([dataset], run, more, init=init, config=TINY, resume=True, progress=False)
    train([dataset], run, cfg, init=init, config=TINY, resume=True, progress=False)  # done: nothing more to do
    assert len((run / "loss.csv").read_text().splitlines()) == 5
    # Stopped early (--stop-at) and resumed, a run ends with the uninterrupted run's weights.
    split = tmp_path / "split"
    torch.manual_seed(0)
    train([dataset], split, cfg, init=init, config=TINY, stop_at=2, progress=False)
    assert len((split / "loss.csv").read_text().splitlines()) == 3
    train([dataset], split, cfg, init=init, config=TINY, resume=True, progress=False)
    again = load_detector(split / "detector.safetensors")
    for name, t in trained.state_dict().items():
        assert torch.equal(t, again.state_dict()[name]), name
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train([dataset], tmp_path / "fresh", cfg, init=init, config=TINY, resume=True, progress=False)

    settings = settings_for(["tggbc", "random"], [0.5], k=4)
    results, layers = evaluate(trained, dataset, settings, resamples=5, progress=False)
    assert [r.name for r in results] == ["dense", "tggbc-0.5", "random-0.5"]
    assert [r.name for r in layers] == ["layer-1", "layer-2", "layer-3"]
    assert layers[-1].mAP == results[0].mAP and layers[-1].mAP_diff.value == 0.0  # the last layer is dense
    assert results[1].keys_per_layer == [48, 24, 24] and results[1].mAP_diff is not None
    for r in results:
        assert 0.0 <= r.mAP <= 1.0 and 0.0 <= r.NDS <= 1.0
        if r.mAP_diff is not None:
            assert r.mAP_diff.low <= r.mAP_diff.high
    # Only a control carries its paired comparison with tgGBC at the same budget.
    assert results[0].mAP_vs_tggbc is None and results[1].mAP_vs_tggbc is None
    vs = results[2].mAP_vs_tggbc
    assert vs.value == pytest.approx(results[2].mAP - results[1].mAP, abs=1e-12) and vs.low <= vs.high


def test_feature_cache_is_reused_and_matches_the_backbone(dataset):
    from tggbc.data.frames import list_frames
    from tggbc.detector.frames import cached_features, images_of

    torch.manual_seed(1)
    model = Detector(TINY).eval()
    frames = list_frames(dataset, "train")
    first = cached_features(model, dataset, "train", frames, progress=False)
    with torch.no_grad():
        direct = model.features(images_of(frames[1]).unsqueeze(0))[0].half().numpy()
    assert np.array_equal(first[1], direct)
    again = cached_features(model, dataset, "train", frames, progress=False)
    assert again.filename == first.filename  # reused, not recomputed
    with torch.no_grad():
        model.backbone.stages[0][0].weight.add_(1.0)
    other = cached_features(model, dataset, "train", frames, progress=False)
    assert other.filename != first.filename  # another backbone, another cache
