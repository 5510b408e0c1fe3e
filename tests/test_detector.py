"""The small detector end to end on a tiny generated dataset: train, save, load, evaluate."""

import json

import pytest
import torch

pytest.importorskip("nuscenes", reason="detector evaluation needs nuscenes-devkit (tggbc[eval])")
pytest.importorskip("safetensors", reason="detector weights need safetensors (tggbc[eval])")

from tggbc.detector.evaluate import Setting, evaluate, format_results  # noqa: E402
from tggbc.detector.loss import LossConfig, decode_boxes, detection_loss, encode_boxes, hungarian_match  # noqa: E402
from tggbc.detector.model import DetectorConfig, PETRDetector  # noqa: E402
from tggbc.detector.train import train  # noqa: E402
from tggbc.detector.weights import load_detector, save_detector  # noqa: E402

TINY = dict(
    image_width=176,
    image_height=64,
    num_queries=24,
    embed_dims=32,
    num_heads=4,
    ffn_dims=64,
    num_layers=2,
    backbone_channels=(8, 16, 16, 32),
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tggbc.data import generate

    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, num_scenes=2, seed=3, image_size=(176, 64), frames_per_scene=2, val_fraction=0.5, progress=False)
    return root


def test_box_code_round_trip():
    center, size = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[1.9, 4.5, 1.6]])
    yaw, velocity = torch.tensor([2.5]), torch.tensor([[3.0, -1.0]])
    c, s, y, v = decode_boxes(encode_boxes(center, size, yaw, velocity))
    torch.testing.assert_close((c, s, y, v), (center, size, yaw, velocity))


def test_hungarian_match_prefers_the_right_query():
    # Query 1 sits on the target and predicts its class; query 0 is far and predicts another class.
    target = encode_boxes(torch.tensor([[10.0, 0.0, 0.0]]), torch.ones(1, 3), torch.zeros(1), torch.zeros(1, 2))
    boxes = torch.cat([target + 20.0, target])
    logits = torch.tensor([[3.0, -3.0], [-3.0, 3.0]])
    q, t = hungarian_match(logits, boxes, torch.tensor([1]), target, LossConfig())
    assert q.tolist() == [1] and t.tolist() == [0]


def test_loss_is_lower_for_the_right_prediction():
    target = encode_boxes(torch.tensor([[5.0, 5.0, 0.0]]), torch.ones(1, 3), torch.zeros(1), torch.zeros(1, 2))
    good_cls = torch.tensor([[[[-5.0, 5.0], [-5.0, -5.0]]]])
    bad_cls = torch.tensor([[[[5.0, -5.0], [-5.0, -5.0]]]])
    boxes = torch.cat([target, target + 3.0]).view(1, 1, 2, 10)
    good, _ = detection_loss(good_cls, boxes, [torch.tensor([1])], [target])
    bad, _ = detection_loss(bad_cls, boxes + 1.0, [torch.tensor([1])], [target])
    assert float(good) < float(bad)


def test_dense_phase_then_joint_training_log(dataset, tmp_path):
    tiny = {k: v for k, v in TINY.items() if k not in ("image_width", "image_height")}
    with pytest.raises(ValueError, match="dense_iterations must lie in"):
        train(dataset, tmp_path / "bad", iterations=2, dense_iterations=2, config=tiny, progress=False)
    train(dataset, tmp_path / "run", iterations=3, dense_iterations=2, batch=1, warmup=1, config=tiny, progress=False)
    rows = [line.split(",") for line in (tmp_path / "run" / "loss.csv").read_text().splitlines()[1:]]
    header = (tmp_path / "run" / "loss.csv").read_text().splitlines()[0].split(",")
    cls, lr = header.index("cls"), header.index("lr")
    # The dense phase leaves the decoder alone (learning rate 0, no set loss); then both train.
    assert [r[cls] for r in rows[:2]] == ["nan", "nan"] and [float(r[lr]) for r in rows[:2]] == [0.0, 0.0]
    assert rows[2][cls] != "nan" and float(rows[2][lr]) > 0.0


def test_decoder_loss_does_not_reach_the_backbone():
    """The backbone and dense head learn from the dense loss only (see PETRDetector.inputs)."""
    torch.manual_seed(0)
    model = PETRDetector(DetectorConfig(**TINY))
    lidar2img = torch.eye(4).expand(1, 6, 4, 4).clone()
    lidar2img[..., 0, 0] = lidar2img[..., 1, 1] = 80.0
    inputs = model.inputs(torch.randint(0, 255, (1, 6, 3, 64, 176), dtype=torch.uint8), lidar2img)
    out = model.decode(inputs)
    (out.cls_scores.sum() + out.bbox_preds.sum()).backward()
    assert all(p.grad is None for p in [*model.backbone.parameters(), *model.head.parameters()])
    assert model.decoder.layers[0].cross_attn.in_proj_weight.grad is not None
    assert model.position.input_proj.weight.grad is not None
    inputs.heatmap.sum().backward()
    assert model.backbone.stages[0][0].weight.grad is not None


def test_backbone_grad_scales_the_decoders_gradient_into_the_backbone():
    """backbone_grad = s passes s times the decoder's gradient to the backbone, values unchanged."""
    lidar2img = torch.eye(4).expand(1, 6, 4, 4).clone()
    lidar2img[..., 0, 0] = lidar2img[..., 1, 1] = 80.0
    images = torch.randint(0, 255, (1, 6, 3, 64, 176), dtype=torch.uint8)
    grads, outputs = {}, {}
    for scale in (1.0, 0.25):
        torch.manual_seed(0)
        model = PETRDetector(DetectorConfig(**TINY)).eval()  # eval: BatchNorm uses fixed statistics
        out = model.decode(model.inputs(images, lidar2img, backbone_grad=scale))
        (out.cls_scores.sum() + out.bbox_preds.sum()).backward()
        grads[scale] = model.backbone.stages[-1][0].conv1.weight.grad
        outputs[scale] = out.bbox_preds.detach()
        assert all(p.grad is None for p in model.head.parameters())  # the keys do not pass the head
    assert torch.equal(outputs[1.0], outputs[0.25])
    assert grads[1.0].abs().sum() > 0
    torch.testing.assert_close(grads[0.25], 0.25 * grads[1.0], rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="backbone_grad must lie in"):
        model.inputs(images, lidar2img, backbone_grad=1.5)


def test_train_resume_save_load_evaluate(dataset, tmp_path):
    run = tmp_path / "run"
    tiny = {k: v for k, v in TINY.items() if k not in ("image_width", "image_height")}
    ckpt = train(dataset, run, iterations=2, batch=1, warmup=1, ckpt_every=1, config=tiny, progress=False)
    assert torch.load(ckpt, weights_only=False)["iteration"] == 2
    with pytest.raises(FileExistsError, match="--resume"):
        train(dataset, run, iterations=3, batch=1, config=tiny, progress=False)
    train(dataset, run, iterations=3, batch=1, warmup=1, resume=True, config=tiny, progress=False)
    state = torch.load(ckpt, weights_only=False)
    assert state["iteration"] == 3
    lines = (run / "loss.csv").read_text().splitlines()
    assert lines[0].startswith("iteration") and len(lines) == 4
    # The options the loss depends on are stored, and a resume that changes them is refused by name.
    assert state["options"] == {"quality_focal": False, "backbone_grad": 0.0, "augment": True, "ema": 0.0}
    assert "ema" not in state  # no average unless asked for
    changes = (({"quality_focal": True}, "quality_focal=False"), ({"backbone_grad": 0.5}, "backbone_grad=0.0"))
    for change, named in changes:
        with pytest.raises(ValueError, match=f"{named} \\(now"):
            train(dataset, run, iterations=4, batch=1, resume=True, config=tiny, progress=False, **change)
    assert torch.load(ckpt, weights_only=False)["iteration"] == 3

    model = PETRDetector(DetectorConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    weights = tmp_path / "model.safetensors"
    save_detector(model, weights)
    loaded = load_detector(weights)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t.half().float() if t.is_floating_point() else t)

    settings = [Setting("dense"), Setting("tggbc", r=0.5, n=1, k=4)]
    results = evaluate(loaded, dataset, settings, tmp_path / "eval", progress=False)
    assert [r.name for r in results] == ["dense", "tggbc"]
    num_keys = loaded.config.num_keys
    assert results[0].keys_per_layer == [num_keys, num_keys]
    assert results[1].keys_per_layer == [num_keys, num_keys // 2]
    for r in results:
        assert 0.0 <= r.mAP <= 1.0 and 0.0 <= r.NDS <= 1.0
        # The devkit's mAP is the mean over classes and the four distance thresholds.
        assert list(r.threshold_ap) == ["0.5", "1", "2", "4"]
        assert abs(sum(r.threshold_ap.values()) / 4 - r.mAP) < 1e-9
    assert "tggbc" in format_results(results)
    # The submission loads with the devkit's own loader and covers every val sample.
    from nuscenes.eval.common.loaders import load_prediction
    from nuscenes.eval.detection.data_classes import DetectionBox

    from tggbc.data import list_frames

    boxes, meta = load_prediction(str(tmp_path / "eval" / "results_tggbc.json"), 500, DetectionBox)
    assert meta["use_camera"] is True
    assert set(boxes.sample_tokens) == {f.sample_token for f in list_frames(dataset, "val")}
    # The train split is scored the same way, over exactly its own samples.
    (train_result,) = evaluate(loaded, dataset, settings[:1], tmp_path / "fit", split="train", progress=False)
    assert 0.0 <= train_result.mAP <= 1.0
    boxes, _ = load_prediction(str(tmp_path / "fit" / "results_dense.json"), 500, DetectionBox)
    train_tokens = {f.sample_token for f in list_frames(dataset, "train")}
    assert set(boxes.sample_tokens) == train_tokens and not train_tokens & {
        f.sample_token for f in list_frames(dataset, "val")
    }
    with pytest.raises(ValueError, match="'test'"):
        evaluate(loaded, dataset, settings, tmp_path / "x", split="test", progress=False)


def test_weights_refused_when_damaged_or_mismatched(tmp_path):
    model = PETRDetector(DetectorConfig(**TINY))
    path = tmp_path / "w.safetensors"
    save_detector(model, path)
    # Mismatched: the header describes another config than the tensors hold.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    other = dict(TINY, num_queries=30)
    save_file(
        tensors,
        str(tmp_path / "mismatch.safetensors"),
        metadata={"format": "tggbc-petr-detector/1", "config": json.dumps(DetectorConfig(**other).to_dict())},
    )
    with pytest.raises(ValueError, match="wrong shape"):
        load_detector(tmp_path / "mismatch.safetensors")
    # Damaged: truncated file.
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged|not a readable"):
        load_detector(tmp_path / "cut.safetensors")
    # Not ours at all.
    save_file({"x": torch.zeros(2)}, str(tmp_path / "alien.safetensors"))
    with pytest.raises(ValueError, match="not a tggbc detector"):
        load_detector(tmp_path / "alien.safetensors")
    with pytest.raises(FileNotFoundError):
        load_detector(tmp_path / "missing.safetensors")
    # NaN weights.
    tensors["decoder.final_norm.weight"][0] = float("nan")
    meta = {"format": "tggbc-petr-detector/1", "config": json.dumps(DetectorConfig(**TINY).to_dict())}
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="NaN"):
        load_detector(tmp_path / "nan.safetensors")


def test_detector_rejects_wrong_image_size():
    model = PETRDetector(DetectorConfig(**TINY))
    with pytest.raises(ValueError, match="176x64"):
        model(torch.zeros(1, 6, 3, 64, 100, dtype=torch.uint8), torch.eye(4).expand(1, 6, 4, 4))


def test_depth_is_regressed_for_a_reference_camera():
    """A head that cannot tell cameras apart predicts the same normalised depth for the same pixels;
    each camera's depth is then that, scaled by its focal length (the same object looks smaller
    through a wider lens)."""
    torch.manual_seed(0)
    model = PETRDetector(DetectorConfig(**TINY)).eval()
    lidar2img = torch.eye(4).expand(1, 6, 4, 4).clone()
    focal = torch.tensor([80.0, 80.0, 40.0, 160.0, 80.0, 80.0])
    lidar2img[0, :, 0, 0] = lidar2img[0, :, 1, 1] = focal
    images = torch.randint(0, 255, (1, 1, 3, 64, 176), dtype=torch.uint8).expand(1, 6, 3, 64, 176)
    with torch.no_grad():
        _, heatmap, regression = model.dense(images, lidar2img)
    assert (heatmap == heatmap[:, :1]).all()  # the geometry convs start at zero
    shift = regression[0, :, 2] - regression[0, :1, 2]  # (6, h, w) log depth relative to camera 0
    torch.testing.assert_close(shift, (focal / 80.0).log()[:, None, None].expand_as(shift))
    with pytest.raises(ValueError, match=r"lidar2img must be \[B, N, 4, 4\]"):
        model.dense(images, lidar2img[:, :5])


def test_warm_start_keeps_matching_tensors_and_refuses_another_architecture(tmp_path):
    from tggbc.detector.train import warm_start

    torch.manual_seed(0)
    source = PETRDetector(DetectorConfig(**TINY))
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.reg_geometry")}
    torch.save({"model": state}, tmp_path / "checkpoint.pt")
    target = PETRDetector(DetectorConfig(**TINY))
    fresh = warm_start(target, tmp_path / "checkpoint.pt")
    assert fresh == ["head.reg_geometry.bias", "head.reg_geometry.weight"]
    for name, t in state.items():
        assert torch.equal(target.state_dict()[name], t), name
    weights = tmp_path / "w.safetensors"
    save_detector(source, weights)
    assert warm_start(PETRDetector(DetectorConfig(**TINY)), weights) == []
    wider = PETRDetector(DetectorConfig(**dict(TINY, embed_dims=64)))
    with pytest.raises(ValueError, match="does not fit this detector.*file"):
        warm_start(wider, tmp_path / "checkpoint.pt")


def test_fine_head_runs_on_a_grid_twice_as_fine_and_starts_from_a_coarse_head(tmp_path):
    from tggbc.detector.dense import camera_geometry, key_index, select_proposals
    from tggbc.detector.train import warm_start

    torch.manual_seed(0)
    coarse = PETRDetector(DetectorConfig(**TINY))
    save_detector(coarse, tmp_path / "coarse.safetensors", dtype=torch.float32)
    fine = PETRDetector(DetectorConfig(**TINY, fine_head=True))
    assert fine.config.head_stride == 8 and fine.config.num_keys == coarse.config.num_keys
    # Everything but the lateral conv carries over from a coarse-head model.
    assert warm_start(fine, tmp_path / "coarse.safetensors") == ["head.lateral.bias", "head.lateral.weight"]

    lidar2img = torch.eye(4).expand(1, 6, 4, 4).clone()
    lidar2img[..., 0, 0] = lidar2img[..., 1, 1] = 80.0
    lidar2img[..., 0, 2], lidar2img[..., 1, 2] = 88.0, 32.0
    images = torch.randint(0, 255, (1, 6, 3, 64, 176), dtype=torch.uint8)
    fine.eval()
    with torch.no_grad():
        inputs = fine.inputs(images, lidar2img)
        assert inputs.heatmap.shape == (1, 6, 10, 8, 22) and inputs.memory.shape[1] == 6 * 4 * 11
        # With the lateral at zero, the fine head is the coarse head on bilinearly upsampled features.
        x = (images.flatten(0, 1).float() / 255.0 - fine.mean) / fine.std
        feats = fine.backbone(x)[-1]
        up = torch.nn.functional.interpolate(feats, scale_factor=2, mode="bilinear", align_corners=False)
        geometry = camera_geometry(lidar2img, (176, 64), 8, fine.config.ground_z)[0].flatten(0, 1)
        conv, relu, out = fine.head.cls
        heat = out(relu(conv(up) + fine.head.cls_geometry(geometry)))
        torch.testing.assert_close(inputs.heatmap.flatten(0, 1), heat)
        # Each query's key is the stride-16 token that holds its stride-8 cell.
        cell, _, _ = select_proposals(inputs.heatmap, inputs.regression, lidar2img, 8, fine.config.num_queries)
        assert torch.equal(inputs.proposals, key_index(cell, (8, 22), 2))
        rows, cols = (cell // 22) % 8, cell % 22
        assert torch.equal(inputs.proposals % 44, (rows // 2) * 11 + cols // 2)


def test_fine_head_trains_on_stride_8_targets(dataset, tmp_path):
    tiny = {k: v for k, v in TINY.items() if k not in ("image_width", "image_height")}
    config = dict(tiny, fine_head=True, proposal_class=True)
    ckpt = train(dataset, tmp_path / "run", iterations=2, batch=1, warmup=1, config=config, progress=False)
    state = torch.load(ckpt, weights_only=False)
    assert state["config"]["fine_head"] is True and "head.lateral.weight" in state["model"]
    # The lateral conv learned from the dense loss, the proposal-class map from the decoder's (both started at zero).
    assert state["model"]["head.lateral.weight"].abs().sum() > 0
    assert state["config"]["proposal_class"] is True and state["model"]["proposal_class.weight"].abs().sum() > 0


def test_detail_head_starts_as_the_fine_head_it_extends_and_then_learns(tmp_path):
    from tggbc.detector.dense import dense_loss
    from tggbc.detector.train import warm_start

    torch.manual_seed(0)
    fine = PETRDetector(DetectorConfig(**TINY, fine_head=True)).eval()
    save_detector(fine, tmp_path / "fine.safetensors", dtype=torch.float32)
    detail = PETRDetector(DetectorConfig(**TINY, fine_head=True, detail_head=True)).eval()
    new = warm_start(detail, tmp_path / "fine.safetensors")
    assert new and all(name.startswith("head.detail.") for name in new)
    assert "head.detail.reg.weight" in new and "head.detail.cls.weight" in new

    lidar2img = torch.eye(4).expand(1, 6, 4, 4).clone()
    lidar2img[..., 0, 0] = lidar2img[..., 1, 1] = 80.0
    lidar2img[..., 0, 2], lidar2img[..., 1, 2] = 88.0, 32.0
    images = torch.randint(0, 255, (1, 6, 3, 64, 176), dtype=torch.uint8)
    with torch.no_grad():
        _, heat_before, reg_before = fine.dense(images, lidar2img)
        _, heat, reg = detail.dense(images, lidar2img)
    # Its output convs start at zero: exactly the fine head's outputs.
    assert torch.equal(heat, heat_before) and torch.equal(reg, reg_before)

    # One step of the dense loss moves the output convs off zero; the outputs then differ.
    detail.train()
    optimizer = torch.optim.SGD(detail.head.detail.parameters(), lr=0.1)
    _, heat, reg = detail.dense(images, lidar2img)
    target = torch.zeros_like(heat)
    target[..., 3, 5] = 1.0
    heat_loss, reg_loss = dense_loss(heat, reg, target, torch.ones_like(reg), torch.ones_like(reg[:, :, 0]))
    (heat_loss + reg_loss).backward()
    optimizer.step()
    assert detail.head.detail.reg.weight.abs().sum() > 0 and detail.head.detail.cls.weight.abs().sum() > 0
    detail.eval()
    with torch.no_grad():
        _, heat_after, reg_after = detail.dense(images, lidar2img)
    assert not torch.equal(heat_after, heat_before) and not torch.equal(reg_after, reg_before)


def test_detail_head_reads_the_stride_4_pixels_of_its_own_cells():
    from tggbc.detector.model import DenseHead

    torch.manual_seed(0)
    head = DenseHead(in_channels=32, hidden=8, num_classes=3, fine_channels=16, detail_channels=4).eval()
    for conv in (head.detail.cls, head.detail.reg):
        torch.nn.init.normal_(conv.weight)
    feats, fine = torch.randn(1, 32, 4, 8), torch.randn(1, 16, 8, 16)
    geometry, detail = torch.randn(1, 3, 8, 16), torch.randn(1, 4, 16, 32)
    with torch.no_grad():
        cls, reg = head(feats, geometry, fine, detail)
        bumped = detail.clone()
        bumped[..., 9, 20] += 5.0  # a stride-4 pixel of fine cell (4, 10)
        cls2, reg2 = head(feats, geometry, fine, bumped)
    changed = ((cls2 - cls).abs().sum(1) + (reg2 - reg).abs().sum(1))[0] > 0  # (8, 16)
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert changed[4, 10]
    # Two 3x3 convs after the 1x1: nothing beyond two cells of it moves.
    assert (rows - 4).abs().max() <= 2 and (cols - 10).abs().max() <= 2
    with pytest.raises(ValueError, match="stride-4"):
        head(feats, geometry, fine)


def test_detail_head_config_is_checked():
    with pytest.raises(ValueError, match="needs fine_head=True"):
        DetectorConfig(**TINY, detail_head=True)
    with pytest.raises(ValueError, match="stride-4 stage"):
        DetectorConfig(**dict(TINY, backbone_channels=(8, 16)), fine_head=True, detail_head=True)


def test_ground_contact_head_fuses_the_road_depth_below_its_contact_row(dataset, tmp_path):
    import numpy as np

    from tggbc.detector.dense import _GROUND_DEPTH_CAP
    from tggbc.detector.evaluate import frame_batch, split_frames
    from tggbc.detector.train import warm_start

    torch.manual_seed(0)
    detail = PETRDetector(DetectorConfig(**TINY, fine_head=True, detail_head=True)).eval()
    torch.nn.init.normal_(detail.head.detail.reg.weight, std=0.05)  # a trunk that has learned something
    save_detector(detail, tmp_path / "detail.safetensors", dtype=torch.float32)
    contact = PETRDetector(DetectorConfig(**TINY, fine_head=True, detail_head=True, ground_contact=True)).eval()
    assert warm_start(contact, tmp_path / "detail.safetensors") == [
        "head.detail.contact.bias",
        "head.detail.contact.weight",
    ]
    images, lidar2img = frame_batch(split_frames(dataset, "val", 1)[0])
    with torch.no_grad():
        _, heat_before, reg_before = detail.dense(images, lidar2img)
        _, heat, reg = contact.dense(images, lidar2img)
    assert reg.shape[2] == 6 and torch.equal(heat, heat_before)
    # The offsets and the direct depth are the warm-started head's; the gate starts almost shut.
    assert torch.equal(reg[:, :, :2], reg_before[:, :, :2]) and torch.equal(reg[:, :, 3], reg_before[:, :, 2])
    assert (reg[:, :, 2] - reg[:, :, 3]).abs().max() < 0.02 * (reg[:, :, 4] - reg[:, :, 3]).abs().max() + 1e-6

    # Contact rows 0.3 cells below every cell centre, gate wide open: the depth is the road's there.
    with torch.no_grad():
        contact.head.detail.contact.bias.copy_(torch.tensor([0.3, 30.0]))
        _, _, reg = contact.dense(images, lidar2img)
    assert torch.allclose(reg[:, :, 5], torch.full_like(reg[:, :, 5], 0.3))
    assert torch.allclose(reg[:, :, 2], reg[:, :, 4])
    # An independent slow path: back-project pixel (u, v) at depth d with the inverse 4x4 and solve
    # its lidar z for the road's height (z is linear in d: A d + B).
    stride, ground_z = contact.config.head_stride, contact.config.ground_z
    _, n, _, h, w = reg.shape
    img2lidar = np.linalg.inv(lidar2img[0].double().numpy())  # (N, 4, 4)
    rows, cols = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    for cam in range(n):
        u = (cols + reg[0, cam, 0].double().numpy()) * stride
        v = (rows + 0.3) * stride
        a = img2lidar[cam, 2, 0] * u + img2lidar[cam, 2, 1] * v + img2lidar[cam, 2, 2]
        b = img2lidar[cam, 2, 3]
        with np.errstate(divide="ignore"):
            depth = (ground_z - b) / a
        expected = np.where((a < 0) & (depth > 0), np.clip(depth, 1.0, _GROUND_DEPTH_CAP), _GROUND_DEPTH_CAP)
        assert np.allclose(reg[0, cam, 4].exp().double().numpy(), expected, rtol=1e-4)
        assert (expected < _GROUND_DEPTH_CAP).any() and (expected == _GROUND_DEPTH_CAP).any()  # both cases seen


def test_ground_contact_config_is_checked():
    with pytest.raises(ValueError, match="needs detail_head=True"):
        DetectorConfig(**TINY, fine_head=True, ground_contact=True)


def test_train_command_builds_the_ground_contact_head(dataset, tmp_path, monkeypatch):
    from tggbc.cli import main
    from tggbc.detector import train as train_module

    monkeypatch.setattr(train_module, "DetectorConfig", lambda **kw: DetectorConfig(**{**kw, **TINY}))
    argv = ["train", "--data", str(dataset), "--iterations", "2", "--batch", "1", "--warmup", "1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--fine-head", "--detail-head", "--ground-contact"]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["config"]["ground_contact"] is True
    assert state["model"]["head.detail.contact.weight"].abs().sum() > 0  # trained off its zero start
    model = PETRDetector(DetectorConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])  # strict: the stored config builds the contact conv
    assert model.config.ground_contact and model.head.detail.contact is not None


def test_train_command_builds_the_detail_head(dataset, tmp_path, monkeypatch):
    from tggbc.cli import main
    from tggbc.detector import train as train_module

    monkeypatch.setattr(train_module, "DetectorConfig", lambda **kw: DetectorConfig(**{**kw, **TINY}))
    argv = ["train", "--data", str(dataset), "--iterations", "2", "--batch", "1", "--warmup", "1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--fine-head", "--detail-head"]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["config"]["detail_head"] is True
    assert state["model"]["head.detail.reg.weight"].abs().sum() > 0  # trained off its zero start


def test_weight_average_by_hand():
    from tggbc.detector.ema import WeightAverage

    model = torch.nn.BatchNorm1d(2)
    average = WeightAverage(model, decay=0.75)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([5.0, -3.0]))  # from [1, 1]
    model.num_batches_tracked.fill_(7)
    average.update(model)
    # 0.75 * 1 + 0.25 * 5 = 2, 0.75 * 1 + 0.25 * -3 = 0; integer buffers are copied, not averaged.
    assert average.state["weight"].tolist() == [2.0, 0.0]
    assert average.state["num_batches_tracked"].item() == 7
    average.update(model)
    assert average.state["weight"].tolist() == [2.75, -0.75]  # 0.75 * 2 + 0.25 * 5, 0.75 * 0 + 0.25 * -3
    assert model.weight.tolist() == [5.0, -3.0]  # the model itself is untouched
    for decay in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=f"decay must lie in \\(0, 1\\), got {decay}"):
            WeightAverage(model, decay)
    with pytest.raises(ValueError, match="decay 0.75, this one 0.5"):
        WeightAverage(model, 0.5).load_state_dict(average.state_dict())


def test_train_with_ema_ships_the_average_and_resumes_it(dataset, tmp_path, monkeypatch):
    from tggbc.cli import main
    from tggbc.detector import train as train_module

    tiny = {k: v for k, v in TINY.items() if k not in ("image_width", "image_height")}
    with pytest.raises(ValueError, match="ema must lie in \\[0, 1\\) \\(0: no average\\), got 1.0"):
        train(dataset, tmp_path / "bad", iterations=2, config=tiny, ema=1.0, progress=False)
    run = tmp_path / "run"
    ckpt = train(dataset, run, iterations=2, batch=1, warmup=1, config=tiny, ema=0.5, progress=False)
    before = torch.load(ckpt, weights_only=False)
    assert before["options"]["ema"] == 0.5 and before["ema"]["decay"] == 0.5
    floats = [n for n, t in before["model"].items() if t.is_floating_point()]
    assert any(not torch.equal(before["ema"]["state"][n], before["model"][n]) for n in floats)  # it lags
    # One more step after resuming: the stored average goes on (restarted, it would start from the weights).
    train(dataset, run, iterations=3, batch=1, warmup=1, config=tiny, ema=0.5, progress=False, resume=True)
    after = torch.load(ckpt, weights_only=False)
    for n in floats:
        expected = 0.5 * before["ema"]["state"][n] + 0.5 * after["model"][n]
        torch.testing.assert_close(after["ema"]["state"][n], expected)
    with pytest.raises(ValueError, match="ema=0.5 \\(now 0.9\\)"):
        train(dataset, run, iterations=4, batch=1, config=tiny, ema=0.9, progress=False, resume=True)

    # The command ships the average, not the last weights.
    def tiny_config(**kw):
        return DetectorConfig(**{**kw, **TINY})

    tiny_config.from_dict = DetectorConfig.from_dict  # the command rebuilds the model from the checkpoint
    monkeypatch.setattr(train_module, "DetectorConfig", tiny_config)
    weights = tmp_path / "w.safetensors"
    argv = ["train", "--data", str(dataset), "--iterations", "2", "--batch", "1", "--warmup", "1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "c"), "--ema", "0.9", "--weights", str(weights)]) == 0
    state = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)
    loaded = load_detector(weights).state_dict()
    for name, t in state["ema"]["state"].items():
        torch.testing.assert_close(loaded[name], t.half().float() if t.is_floating_point() else t)
    # --weights-from last writes the last weights instead; resuming a finished run only writes the file.
    last = tmp_path / "last.safetensors"
    resume = ["--ema", "0.9", "--resume", "--weights-from", "last", "--weights", str(last)]
    assert main([*argv, "--out", str(tmp_path / "c"), *resume]) == 0
    assert torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)["iteration"] == 2
    loaded = load_detector(last).state_dict()
    for name, t in state["model"].items():
        torch.testing.assert_close(loaded[name], t.half().float() if t.is_floating_point() else t)


def test_frames_of_several_datasets_are_pooled(dataset, tmp_path):
    from tggbc.data import generate
    from tggbc.data.frames import list_frames
    from tggbc.detector.train import FrameSet

    other = tmp_path / "other"
    generate(other, num_scenes=2, seed=4, image_size=(176, 64), frames_per_scene=2, val_fraction=0.5, progress=False)
    pooled = FrameSet([dataset, other], "train", 16, 10, progress=False)
    first, second = list_frames(dataset, "train"), list_frames(other, "train")
    assert len(pooled) == len(first) + len(second) == 4
    assert [f.sample_token for f in pooled.frames] == [f.sample_token for f in first + second]
    # Every image sits at its frame's index, read straight from disk.
    for i, frame in enumerate(first + second):
        expected = torch.from_numpy(frame.read_images()).permute(0, 3, 1, 2)
        assert torch.equal(pooled.images[i], expected)
        torch.testing.assert_close(pooled.lidar2img[i], torch.from_numpy(frame.lidar2img))

    with pytest.raises(ValueError, match="share frames"):
        FrameSet([dataset, dataset], "train", 16, 10, progress=False)
    with pytest.raises(ValueError, match="at least one dataroot"):
        FrameSet([], "train", 16, 10, progress=False)
    wide = tmp_path / "wide"
    generate(wide, num_scenes=2, seed=5, image_size=(192, 64), frames_per_scene=2, val_fraction=0.5, progress=False)
    with pytest.raises(ValueError, match=r"different image sizes.*\(192, 64\)"):
        FrameSet([dataset, wide], "train", 16, 10, progress=False)


def test_threshold_aps_average_classes_by_hand():
    from tggbc.detector.evaluate import threshold_aps

    label_aps = {"car": {0.5: 0.1, 1.0: 0.3, 2.0: 0.5, 4.0: 0.7}, "barrier": {0.5: 0.3, 1.0: 0.3, 2.0: 0.1, 4.0: 0.0}}
    got = threshold_aps(label_aps)
    assert list(got) == ["0.5", "1", "2", "4"]
    assert [round(v, 9) for v in got.values()] == [0.2, 0.3, 0.3, 0.35]


def test_probe_counts_every_object_a_camera_sees(dataset):
    import numpy as np

    from tggbc.data import list_frames
    from tggbc.data.transforms import in_image, project_points
    from tggbc.detector.probe import probe

    torch.manual_seed(0)
    model = PETRDetector(DetectorConfig(**TINY))
    summary = probe(model, dataset, "val", progress=False)
    expected = 0
    for frame in list_frames(dataset, "val"):
        centers = frame.gt_boxes[frame.gt_valid, :3].astype(np.float64)
        uv, depth = project_points(centers, frame.lidar2img)
        seen = in_image(uv, depth, (TINY["image_width"], TINY["image_height"])).any(0)
        ego = centers @ frame.lidar2ego[:3, :3].T + frame.lidar2ego[:3, 3]
        expected += int((seen & (np.linalg.norm(ego[:, :2], axis=1) < 50.0)).sum())
    assert expected > 0 and sum(summary["objects"]) == expected
    assert all(0.0 <= f <= 1.0 for f, n in zip(summary["found"], summary["objects"], strict=True) if n)
    assert "ground_depth_error" not in summary


def test_probe_reports_both_depths_of_a_ground_contact_head(dataset):
    from tggbc.detector.probe import format_summary, probe

    torch.manual_seed(0)
    model = PETRDetector(DetectorConfig(**TINY, fine_head=True, detail_head=True, ground_contact=True))
    with torch.no_grad():
        model.head.cls[-1].bias.fill_(3.0)  # every cell confident: the peaks count as found
    summary = probe(model, dataset, "val", progress=False)
    for key in ("direct_depth_error", "ground_depth_error"):
        measured = [v for v, f in zip(summary[key], summary["found"], strict=True) if f == f and f > 0]
        assert len(measured) > 0 and all(v >= 0.0 for v in measured)
    assert "road |depth err|" in format_summary(summary)


def _tiny_inputs():
    lidar2img = torch.eye(4).expand(1, 6, 4, 4).clone()
    lidar2img[..., 0, 0] = lidar2img[..., 1, 1] = 80.0
    lidar2img[..., 0, 2], lidar2img[..., 1, 2] = 88.0, 32.0
    images = torch.randint(0, 255, (1, 6, 3, 64, 176), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return images, lidar2img


def test_proposal_logits_are_the_heatmap_at_each_querys_cell():
    from tggbc.detector.dense import select_proposals

    torch.manual_seed(0)
    model = PETRDetector(DetectorConfig(**TINY, fine_head=True)).eval()
    images, lidar2img = _tiny_inputs()
    with torch.no_grad():
        inputs = model.inputs(images, lidar2img)
        cell, _, _ = select_proposals(inputs.heatmap, inputs.regression, lidar2img, 8, model.config.num_queries)
    _, _, _, h, w = inputs.heatmap.shape
    for q, index in enumerate(cell[0].tolist()):  # the slow way: camera, row, column of each cell
        cam, row, col = index // (h * w), (index // w) % h, index % w
        assert torch.equal(inputs.proposal_logits[0, q], inputs.heatmap[0, cam, :, row, col])


def test_proposal_class_starts_at_zero_and_then_shapes_the_queries():
    images, lidar2img = _tiny_inputs()
    torch.manual_seed(0)
    plain = PETRDetector(DetectorConfig(**TINY)).eval()
    informed = PETRDetector(DetectorConfig(**TINY, proposal_class=True)).eval()
    missing, unexpected = informed.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["proposal_class.weight", "proposal_class.bias"] and not unexpected
    with torch.no_grad():
        before = informed.inputs(images, lidar2img)
        torch.testing.assert_close(before.query, plain.inputs(images, lidar2img).query)
        informed.proposal_class.weight.fill_(0.5)
        after = informed.inputs(images, lidar2img)
    peak = after.query.abs().sum(-1) > 0
    assert not torch.allclose(after.query[peak], before.query[peak])


def test_dense_score_weight_is_a_weighted_geometric_mean_of_the_two_stages():
    config = DetectorConfig(**TINY, num_classes=2, max_detections=2, dense_score_weight=0.5)
    model = PETRDetector(config)
    decoder = torch.tensor([[[2.0, -1.0]]])  # [B=1, Nq=1, C=2] logits
    dense = torch.tensor([[[-2.0, 4.0]]])
    (det,) = model.detections(decoder, torch.zeros(1, 1, 10), dense)
    sig = lambda x: 1.0 / (1.0 + torch.exp(-torch.tensor(x)))  # noqa: E731
    expected = sorted([float((sig(2.0) * sig(-2.0)).sqrt()), float((sig(-1.0) * sig(4.0)).sqrt())], reverse=True)
    torch.testing.assert_close(det.score, torch.tensor(expected))
    assert det.label.tolist() == [1, 0]  # the dense head's confidence in class 1 outranks the decoder's in 0
    with pytest.raises(ValueError, match=r"dense_score_weight=0.5 needs proposal_logits of shape \(1, 1, 2\)"):
        model.detections(decoder, torch.zeros(1, 1, 10))
    with pytest.raises(ValueError, match="dense_score_weight must lie in"):
        DetectorConfig(dense_score_weight=1.5)
    alone = PETRDetector(DetectorConfig(**TINY, num_classes=2, max_detections=2))
    (det,) = alone.detections(decoder, torch.zeros(1, 1, 10), dense)  # weight 0: the decoder alone
    torch.testing.assert_close(det.score, torch.tensor([float(sig(2.0)), float(sig(-1.0))]))


def test_eval_command_can_override_the_weights_score_weight(dataset, tmp_path, capsys):
    """`tggbc eval --dense-score-weight` rescores without retraining, `--class-peak-threshold`
    proposes differently; values outside their ranges are refused."""
    from tggbc.cli import main

    torch.manual_seed(0)
    model = PETRDetector(DetectorConfig(**TINY, proposal_class=True, dense_score_weight=0.5))
    weights = tmp_path / "w.safetensors"
    save_detector(model, weights)
    scores = {}
    overrides = (
        ("stored", []),
        ("decoder", ["--dense-score-weight", "0"]),
        ("class_peaks", ["--class-peak-threshold", "0.05"]),
        ("fewer", ["--max-detections", "7"]),
    )
    for name, extra in overrides:
        argv = ["eval", "--data", str(dataset), "--weights", str(weights), "--fractions", "", "--quiet"]
        assert main([*argv, "--out", str(tmp_path / name), *extra]) == 0
        results = json.loads((tmp_path / name / "results_dense.json").read_text())["results"]
        scores[name] = sorted(b["detection_score"] for boxes in results.values() for b in boxes)
    assert len(scores["stored"]) == len(scores["decoder"]) and scores["stored"] != scores["decoder"]
    assert scores["class_peaks"] != scores["stored"]
    # The best 7 of each frame's boxes: every frame reports 7, and they are the stored run's best 7.
    fewer = json.loads((tmp_path / "fewer" / "results_dense.json").read_text())["results"]
    stored = json.loads((tmp_path / "stored" / "results_dense.json").read_text())["results"]
    for token, boxes in fewer.items():
        best = sorted((b["detection_score"] for b in stored[token]), reverse=True)[:7]
        assert sorted((b["detection_score"] for b in boxes), reverse=True) == best
    bad = (
        ("--dense-score-weight", "1.5", "dense_score_weight must lie in [0, 1], got 1.5"),
        ("--class-peak-threshold", "1", "class_peak_threshold must be None or lie in (0, 1), got 1.0"),
        ("--max-detections", "501", "max_detections must lie in [1, 500] (the devkit's cap), got 501"),
        ("--max-detections", "0", "max_detections must lie in [1, 500] (the devkit's cap), got 0"),
    )
    for flag, value, message in bad:
        argv = ["eval", "--data", str(dataset), "--weights", str(weights), flag, value]
        assert main([*argv, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err


def test_train_command_passes_quality_focal_to_the_loss(dataset, tmp_path, monkeypatch):
    from tggbc.cli import main
    from tggbc.detector import train as train_module

    seen = []

    def spy(cls_scores, bbox_preds, labels, targets, cfg):
        seen.append(cfg.quality_focal)
        return detection_loss(cls_scores, bbox_preds, labels, targets, cfg)

    monkeypatch.setattr(train_module, "detection_loss", spy)
    monkeypatch.setattr(train_module, "DetectorConfig", lambda **kw: DetectorConfig(**{**kw, **TINY}))
    argv = ["train", "--data", str(dataset), "--iterations", "1", "--batch", "1", "--warmup", "1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    assert main([*argv, "--out", str(tmp_path / "quality"), "--quality-focal"]) == 0
    assert seen == [False, True]
