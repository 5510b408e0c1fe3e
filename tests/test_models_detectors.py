"""Complete published detectors: official state dicts load strictly, frames run, bad checkpoints are refused.

The checkpoints here are built from `original_tables` (names and shapes read from the original
code, independent of tggbc's modules), with the settings the original heads store.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from original_tables import CONFIGS, detector, focal_head
from tggbc.models import checkpoint as ckpt
from tggbc.models.configs import PUBLISHED_CONFIGS, published_config
from tggbc.models.detectors import SceneStream, build_detector
from tggbc.models.heads import FocalHead, topk_gather
from tggbc.pruner import KeyPruner

PC_RANGE = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]
POSITION_RANGE = [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0]


def lid_bins(depth_start=1.0, depth_num=64, far=61.2):
    """The heads' coords_d with LID=True, as their __init__ computes it (float32 position_range)."""
    index = torch.arange(depth_num).float()
    bin_size = (torch.tensor(far) - depth_start) / (depth_num * (1 + depth_num))
    return depth_start + bin_size * index * (index + 1)


def original_state_dict(name, seed=0):
    """Random weights under the original names, with the constants the original head stores."""
    g = torch.Generator().manual_seed(seed)
    table = detector(*CONFIGS[name])
    sd = {}
    for k, shape in table.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7, dtype=torch.int64)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.05
    sd["pts_bbox_head.pc_range"] = torch.tensor(PC_RANGE)
    sd["pts_bbox_head.position_range"] = torch.tensor(POSITION_RANGE)
    sd["pts_bbox_head.coords_d"] = lid_bins()
    sd["pts_bbox_head.code_weights"] = torch.tensor([2.0, 2.0] + [1.0] * 8)
    sd["pts_bbox_head.match_costs"] = torch.tensor([2.0, 2.0] + [1.0] * 8)
    # The published heads repeat one branch object for all six layers: six names, one tensor.
    for i in range(1, 6):
        for branch in ("cls_branches", "reg_branches"):
            for k in [k for k in sd if k.startswith(f"pts_bbox_head.{branch}.0.")]:
                sd[k.replace(f"{branch}.0.", f"{branch}.{i}.")] = sd[k]
    return sd


def save(path, state_dict, wrap=True):
    obj = {"meta": {"mmcv_version": "1.6.0", "CLASSES": ["car"], "epoch": 24}, "state_dict": state_dict}
    torch.save(obj if wrap else state_dict, path)
    return path


@pytest.mark.parametrize(
    "name",
    [
        "stream_petr_r50_flash_704_bs2_seq_24e",
        "stream_petr_r50_flash_704_bs2_seq_428q_nui_24e",
        "petrv1_r50_flash_704_24e",
        "focal_petrv1_r50_flash_704_24e",
        pytest.param("stream_petr_vov_flash_800_bs2_seq_24e", marks=pytest.mark.slow),
        pytest.param("streampetr_vov_1600x640_bs2x2_24e_gbc_r21000_n1_k175", marks=pytest.mark.slow),
    ],
)
def test_official_state_dict_loads_strictly(name, tmp_path):
    sd = original_state_dict(name)
    model = build_detector(name)
    converted = ckpt.load_checkpoint(model, save(tmp_path / "ckpt.pth", sd))
    assert converted.missing == [] and converted.unused == []
    assert sorted(converted.ignored) == ["pts_bbox_head.code_weights", "pts_bbox_head.match_costs"]
    assert sorted(converted.constants) == [f"pts_bbox_head.{c}" for c in ("coords_d", "pc_range", "position_range")]
    ours = model.state_dict()
    # Spot checks that each part landed where the original uses it.
    pairs = {
        "pts_bbox_head.transformer.decoder.layers.1.attentions.1.attn.in_proj_weight": (
            "pts_bbox_head.decoder.layers.1.cross_attn.in_proj_weight"
        ),
        "pts_bbox_head.transformer.decoder.layers.0.ffns.0.layers.1.weight": (
            "pts_bbox_head.decoder.layers.0.linear2.weight"
        ),
        "pts_bbox_head.featurized_pe.conv_expand.weight": "pts_bbox_head.position.featurized_pe.expand.weight",
        "pts_bbox_head.query_embedding.2.bias": "pts_bbox_head.decoder.query_embedding.mlp.2.bias",
        "pts_bbox_head.cls_branches.4.6.weight": "pts_bbox_head.decoder.cls_branches.4.6.weight",
        "img_neck.fpn_convs.0.conv.weight": "img_neck.fpn_convs.0.conv.weight",
    }
    for original, mine in pairs.items():
        assert torch.equal(ours[mine], sd[original]), original
    backbone = "img_backbone.layer3.5.bn2.running_var" if "r50" in name else "img_backbone.stage4.OSA4_9.ese.fc.bias"
    assert torch.equal(ours[backbone], sd[backbone])
    config = published_config(name)
    assert model.decoder.num_queries == config.num_query and (model.img_roi_head is not None) == config.roi_head


def test_every_published_config_has_a_table():
    # The 60- and 90-epoch configs share their 24-epoch ones' architectures (only num_epochs differs).
    longer = {"stream_petr_r50_flash_704_bs2_seq_428q_nui_60e", "stream_petr_r50_flash_704_bs2_seq_90e"}
    assert set(PUBLISHED_CONFIGS) == set(CONFIGS) | longer
    for name in longer:
        shorter = name.replace("_60e", "_24e").replace("_90e", "_24e")
        a, b = published_config(name), published_config(shorter)
        assert {**vars(a), "name": "", "source": ""} == {**vars(b), "name": "", "source": ""}, name


def test_bare_head_and_dataparallel_prefix_map_everything():
    sd = original_state_dict("stream_petr_r50_flash_704_bs2_seq_24e")
    head = {k[len("pts_bbox_head.") :]: v for k, v in sd.items() if k.startswith("pts_bbox_head.")}
    # The bare head dict (names from transformer.): the decoder-only converter maps all of it now.
    converted = ckpt.convert_streampetr_state_dict(head)
    assert len(converted.decoder) + len(converted.position) == len(head) - 5
    assert sorted(converted.unused) == ["code_weights", "coords_d", "match_costs", "pc_range", "position_range"]
    # The bare transformer (head.transformer.state_dict(): 6 layers x 18 + post_norm = 110 tensors).
    transformer = {k[len("transformer.") :]: v for k, v in head.items() if k.startswith("transformer.")}
    assert len(transformer) == 110 and len(ckpt.convert_streampetr_state_dict(transformer).decoder) == 110
    model = build_detector("stream_petr_r50_flash_704_bs2_seq_24e")
    partial = ckpt.convert_checkpoint(transformer, model)
    assert len(partial.state_dict) == 110 and partial.unused == []
    assert "pts_bbox_head.decoder.layers.5.cross_attn.out_proj.bias" in partial.state_dict
    full = ckpt.convert_checkpoint(head, model)
    assert full.unused == [] and all(not k.startswith("pts_bbox_head.") for k in full.missing)
    module = ckpt.convert_checkpoint({"module." + k: v for k, v in sd.items()}, model)
    assert module.missing == module.unused == []
    with pytest.raises(ValueError, match="no tensor of the checkpoint maps"):
        ckpt.convert_checkpoint({"backbone.conv1.weight": torch.zeros(1)}, model)


def test_checkpoint_of_another_model_is_refused_naming_the_tensor():
    vov = build_detector("stream_petr_vov_flash_800_bs2_seq_24e")
    r50 = original_state_dict("stream_petr_r50_flash_704_bs2_seq_24e")
    with pytest.raises(ValueError, match=r"not of stream_petr_vov.*'img_backbone.conv1.weight'.*lateral_convs.0"):
        ckpt.convert_checkpoint(r50, vov)
    petr = build_detector("petrv1_r50_flash_704_24e")
    with pytest.raises(ValueError, match=r"reference_points.weight' has shape \(644, 3\).*\(900, 3\)"):
        ckpt.convert_checkpoint(r50, petr)
    # Names that fit with shapes that fit, but parts missing: refused unless partial loading is allowed.
    focal = build_detector("focal_petrv1_r50_flash_704_24e")
    converted = ckpt.convert_checkpoint(original_state_dict("petrv1_r50_flash_704_24e"), focal)
    with pytest.raises(ValueError, match=r"first misfit is model tensor 'img_roi_head\.cls\.weight'"):
        ckpt.check_fit(converted, focal.config.name)
    ckpt.check_fit(converted, focal.config.name, allow_partial=True)
    assert len(converted.missing) == 16 and converted.unused == []
    assert all(k.startswith("img_roi_head.") for k in converted.missing)


def test_stored_settings_are_compared(tmp_path):
    name = "petrv1_r50_flash_704_24e"
    sd = original_state_dict(name)
    bad = dict(sd, **{"pts_bbox_head.position_range": torch.tensor([-51.2, -51.2, -5.0, 51.2, 51.2, 3.0])})
    with pytest.raises(ValueError, match="'pts_bbox_head.position_range' = \\[-51.2"):
        ckpt.convert_checkpoint(bad, build_detector(name))
    bad = dict(sd, **{"pts_bbox_head.coords_d": lid_bins(depth_start=2.0)})
    with pytest.raises(ValueError, match="coords_d"):
        ckpt.convert_checkpoint(bad, build_detector(name))
    # A model built with another depth start refuses the right checkpoint (its bins differ).
    with pytest.raises(ValueError, match="coords_d"):
        ckpt.convert_checkpoint(sd, build_detector(name, depth_start=0.5))
    with pytest.raises(ValueError, match="pc_range"):
        ckpt.convert_checkpoint(sd, build_detector(name, pc_range=(-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)))


class Payload:
    """Unpickling this would run code (here a harmless print; a real attack would do worse)."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_and_damaged_files_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"meta": Payload(), "state_dict": {"img_neck.fpn_convs.0.conv.bias": torch.zeros(256)}}, path)
    with pytest.raises(ValueError, match=r"refused.*builtins\.print.*never unpickles code"):
        ckpt.read_checkpoint(path)
    torch.save({"meta": Payload()}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"refused.*print.*never unpickles code"):
        ckpt.read_checkpoint(tmp_path / "legacy.pth")
    assert "must never run" not in capsys.readouterr().out
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth is not a readable PyTorch checkpoint"):
        ckpt.read_checkpoint(text)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ckpt.read_checkpoint(tmp_path / "missing.pth")
    torch.save({"meta": {}, "optimizer": {}}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="no tensors"):
        ckpt.read_checkpoint(tmp_path / "empty.pth")


def test_numpy_data_in_the_meta_is_accepted(tmp_path):
    np = pytest.importorskip("numpy", reason="mmcv checkpoints may hold numpy scalars in their meta")
    path = tmp_path / "np.pth"
    torch.save(
        {"meta": {"best": np.float64(0.5), "arr": np.arange(3)}, "state_dict": {"a.weight": torch.ones(2)}}, path
    )
    assert torch.equal(ckpt.read_checkpoint(path)["a.weight"], torch.ones(2))


# ---- running frames: small models of the published structure ----

SMALL = dict(num_layers=2, embed_dims=32, num_heads=4, ffn_dims=64, neck_channels=32, max_num=40)
STREAM_SMALL = dict(SMALL, num_query=20, num_propagated=8, memory_len=24, topk_proposals=8)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif "reference_points" in name:
                t.copy_(torch.rand(t.shape, generator=g))
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def rig(batch=1, cams=6, size=(64, 96)):
    """Six cameras around the car looking outwards: intrinsics and lidar2img for images of `size`."""
    h, w = size
    k = torch.tensor([[60.0, 0, w / 2, 0], [0, 60.0, h / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    axes = torch.tensor([[0.0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    lidar2img = torch.zeros(batch, cams, 4, 4)
    for n in range(cams):
        yaw = 2 * math.pi * n / cams
        rot = torch.eye(4)
        rot[:2, :2] = torch.tensor([[math.cos(yaw), math.sin(yaw)], [-math.sin(yaw), math.cos(yaw)]])
        lidar2img[:, n] = k @ axes @ rot
    return lidar2img, k.expand(batch, cams, 4, 4).clone()


def images(batch=1, seed=0, size=(64, 96)):
    return torch.randn(batch, 6, 3, *size, generator=torch.Generator().manual_seed(seed))


def pose(frame):
    p = torch.eye(4, dtype=torch.float64)
    yaw = 0.1 * frame
    p[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    p[:3, 3] = torch.tensor([600.0 + 5 * frame, 1600.0 + 2 * frame, 1.0])
    return p[None]


def test_streampetr_three_frames_carry_memory_and_reset_at_a_new_scene():
    model = randomize(build_detector("stream_petr_r50_flash_704_bs2_seq_24e", pruner=None, **STREAM_SMALL), seed=1)
    lidar2img, intrinsics = rig()
    stream = SceneStream(model)
    outs = []
    for frame, token in enumerate(["scene-a", "scene-a", "scene-b"]):
        t = torch.tensor([1.5e9 + 0.5 * frame], dtype=torch.float64)
        outs.append(
            stream(images(seed=frame), lidar2img, intrinsics, ego_pose=pose(frame), timestamp=t, scene_token=token)
        )
        state = outs[-1].state
        assert state.embedding.shape == (1, 24, 32) and state.timestamp.dtype == torch.float64
        assert outs[-1].cls_scores.shape == (2, 1, 28, 10) and outs[-1].keys_per_layer == [144, 144]
        det = outs[-1].detections[0]
        assert det.boxes.shape[1] == 9 and len(det.boxes) == len(det.scores) <= 40
    with torch.no_grad():
        fresh = [
            model(images(seed=f), lidar2img, intrinsics, ego_pose=pose(f), timestamp=torch.tensor([1.5e9 + 0.5 * f]))
            for f in (1, 2)
        ]
    # Frame 1 continues scene-a: its memory holds frame 0's queries, so it differs from a fresh start.
    assert not torch.allclose(outs[1].cls_scores, fresh[0].cls_scores, atol=1e-3)
    # Frame 2 starts scene-b: the memory is reset, exactly as a fresh start.
    torch.testing.assert_close(outs[2].cls_scores, fresh[1].cls_scores, rtol=0, atol=0)
    torch.testing.assert_close(outs[2].bbox_preds, fresh[1].bbox_preds, rtol=0, atol=0)
    # The memory is kept in the global frame: frame 0's pushed centres are its ego centres moved by its pose.
    centres = outs[0].bbox_preds[-1, 0, :, :3]
    score = outs[0].cls_scores[-1, 0].sigmoid().amax(-1)
    top = centres[score.topk(8).indices]
    expected = (pose(0)[0].float() @ torch.cat([top, torch.ones(8, 1)], 1).T).T[:, :3]
    torch.testing.assert_close(outs[0].state.reference_points[0, :8], expected, atol=1e-3, rtol=1e-5)


def test_detector_equals_its_parts_run_by_hand():
    model = randomize(build_detector("focal_petrv1_r50_flash_704_24e", pruner=None, **SMALL, num_query=30), seed=2)
    lidar2img, intrinsics = rig(batch=2)
    img = images(batch=2, seed=3)
    with torch.no_grad():
        out = model(img, lidar2img, intrinsics)
        level0 = model.img_neck(model.img_backbone(img.flatten(0, 1)))[0]
        feats = level0.view(2, 6, *level0.shape[1:])
        keys = model.pts_bbox_head.position(feats, lidar2img, intrinsics, (64, 96))
        dec = model.pts_bbox_head.decoder(keys.memory, keys.key_pos)
    torch.testing.assert_close(out.cls_scores, dec.cls_scores)
    boxes = model.pts_bbox_head.coder.get_bboxes(dec.cls_scores[-1], dec.bbox_preds[-1])
    for a, b in zip(out.detections, boxes, strict=True):
        torch.testing.assert_close(a.boxes, b.boxes)
    assert out.state is None and out.roi is None
    with pytest.raises(ValueError, match="no temporal memory"):
        model(img, lidar2img, intrinsics, ego_pose=torch.eye(4).expand(2, 4, 4))
    with pytest.raises(ValueError, match="multiples of 32"):
        model(img[..., :60, :], lidar2img, intrinsics)


def focal_head_reference(sd, feats, pad_shape, stride=16):
    """FocalHead.forward at inference (infer_ratio 1), step by step from the original names."""
    b, n, c, h, w = feats.shape
    x = feats.flatten(0, 1)

    def tower(name):
        y = F.conv2d(x, sd[f"{name}.0.weight"], sd[f"{name}.0.bias"], padding=1)
        return F.relu(F.group_norm(y, 32, sd[f"{name}.1.weight"], sd[f"{name}.1.bias"]))

    cls_feat, reg_feat = tower("shared_cls"), tower("shared_reg")
    cls = F.conv2d(cls_feat, sd["cls.weight"], sd["cls.bias"]).permute(0, 2, 3, 1).reshape(b * n, -1, 10)
    ctr = F.conv2d(cls_feat, sd["centerness.weight"], sd["centerness.bias"]).permute(0, 2, 3, 1).reshape(b * n, -1, 1)
    ltrb = F.conv2d(reg_feat, sd["ltrb.weight"], sd["ltrb.bias"]).permute(0, 2, 3, 1).sigmoid()
    off = F.conv2d(reg_feat, sd["center2d.weight"], sd["center2d.bias"]).permute(0, 2, 3, 1)
    xs = (torch.arange(0, stride * w, stride).float() + stride // 2) / pad_shape[1]
    ys = (torch.arange(0, stride * h, stride).float() + stride // 2) / pad_shape[0]
    loc = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # (H, W, 2) as (x, y)
    inv = torch.log(loc.clamp(min=1e-5) / (1 - loc).clamp(min=1e-5))
    centers = (inv + off).sigmoid().reshape(b * n, -1, 2)
    x1y1 = (loc - ltrb[..., :2]).clamp(0, 1)
    x2y2 = (loc + ltrb[..., 2:]).clamp(0, 1)
    boxes = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], -1).reshape(b * n, -1, 4)
    weight = cls.topk(1, dim=2).values[..., 0].reshape(b, -1, 1).sigmoid() * ctr.reshape(b, -1, 1).sigmoid()
    return cls, boxes, centers, ctr, weight.topk(n * h * w, dim=1).indices


def test_focal_head_equals_the_reference_and_picks_the_tokens():
    head = randomize(FocalHead(10, 64, 64), seed=4)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == focal_head(64)
    feats = torch.randn(2, 3, 64, 4, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = head(feats, (64, 96))
        ref = focal_head_reference(head.state_dict(), feats, (64, 96))
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # With aux_2d_only=False the 3D head reads the tokens in the FocalHead's order.
    model = randomize(build_detector("focal_petrv1_r50_flash_704_24e", pruner=None, **SMALL, num_query=30), seed=6)
    model.aux_2d_only = False
    lidar2img, intrinsics = rig()
    img = images(seed=7)
    with torch.no_grad():
        out = model(img, lidar2img, intrinsics)
        feats = model.extract_img_feat(img)
        keys = model.pts_bbox_head.position(feats, lidar2img, intrinsics, (64, 96))
        order = out.roi.topk_indexes
        dec = model.pts_bbox_head.decoder(topk_gather(keys.memory, order), topk_gather(keys.key_pos, order))
    assert sorted(order[0, :, 0].tolist()) == list(range(144))
    torch.testing.assert_close(out.cls_scores, dec.cls_scores)


def test_tggbc_is_built_in_with_the_published_defaults():
    big = build_detector("streampetr_vov_1600x640_bs2x2_24e_gbc_r21000_n1_k175")
    pruner = big.decoder.pruner
    assert (pruner.r, pruner.n, pruner.k) == (21000, 1, 175) and big.decoder.attention == "fast"
    assert published_config("streampetr-v2-99-1600x640").num_keys == 24000
    assert build_detector("petrv1_r50_flash_704_24e", pruner=None).decoder.pruner is None
    assert published_config("stream_petr_r50_flash_704_bs2_seq_428q_nui_24e").num_query == 300
    # Fast and reference attention prune the same keys and give the same boxes.
    model = randomize(
        build_detector("stream_petr_r50_flash_704_bs2_seq_24e", pruner=KeyPruner(r=0.5, n=1, k=6), **STREAM_SMALL), 8
    )
    lidar2img, intrinsics = rig()
    img = images(seed=9)
    with torch.no_grad():
        fast = model(img, lidar2img, intrinsics, ego_pose=pose(0), track_keys=True)
        model.decoder.attention = "reference"
        ref = model(img, lidar2img, intrinsics, ego_pose=pose(0), track_keys=True)
    assert fast.keys_per_layer == [144, 72]
    torch.testing.assert_close(fast.cls_scores, ref.cls_scores, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown model 'streampetr'"):
        build_detector("streampetr")
    with pytest.raises(ValueError, match="unknown setting"):
        build_detector("petrv1_r50_flash_704_24e", num_querys=3)


def test_converted_file_round_trip(tmp_path):
    pytest.importorskip("safetensors", reason="converted weights are safetensors files")
    name = "focal_petrv1_r50_flash_704_24e"
    model = build_detector(name)
    converted = ckpt.convert_checkpoint(original_state_dict(name), model)
    ckpt.save_converted(tmp_path / "w.safetensors", converted, name)
    other = build_detector(name)
    ckpt.load_converted(other, tmp_path / "w.safetensors")
    for k, v in converted.state_dict.items():
        assert torch.equal(other.state_dict()[k], v), k
    with pytest.raises(ValueError, match="holds 'focal_petrv1_r50_flash_704_24e', not 'petrv1_r50_flash_704_24e'"):
        ckpt.load_converted(build_detector("petrv1_r50_flash_704_24e"), tmp_path / "w.safetensors")
