"""Published detectors on nuScenes: boxes in the submission format by hand and through the devkit's
metric, the settings runner against the detector's own scene loop, and `tggbc eval --model` end to
end on generated scenes (submission, scores, resume after an interruption, refusals)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("nuscenes", reason="the devkit lists samples and scores submissions")

from nuscenes_data import synth_dataset  # noqa: E402
from tggbc.data import list_frames  # noqa: E402
from tggbc.models.detectors import SceneStream, build_detector  # noqa: E402
from tggbc.nuscenes.distributed import assign_scenes  # noqa: E402
from tggbc.nuscenes.published import SceneRunner, model_settings  # noqa: E402
from tggbc.nuscenes.reader import ImageNormalization, NuScenesFrames, frame_loader, open_nuscenes, sample_records  # noqa: E402
from tggbc.nuscenes.submission import (  # noqa: E402
    ATTRIBUTE_NAMES,
    ORIGINAL_SUBMISSION_META,
    global_detection_boxes,
    original_attribute,
    submission_entries,
)
from tggbc.pruner import (  # noqa: E402
    KeyPruner,
    Setting,  # noqa: E402
    pruning,
)

Q90 = [math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]  # 90 degrees about +z


@pytest.mark.parametrize(
    "name, speed, attribute",
    [
        ("car", 0.3, "vehicle.moving"),
        ("car", 0.1, "vehicle.parked"),
        ("bus", 0.1, "vehicle.stopped"),
        ("bus", 1.0, "vehicle.moving"),
        ("pedestrian", 0.1, "pedestrian.standing"),
        ("pedestrian", 1.0, "pedestrian.moving"),
        ("bicycle", 1.0, "cycle.with_rider"),
        ("motorcycle", 0.0, "cycle.without_rider"),
        ("trailer", 0.2, "vehicle.parked"),  # 0.2 m/s is not above 0.2
        ("barrier", 5.0, ""),
        ("traffic_cone", 0.0, ""),
    ],
)
def test_attribute_rules(name, speed, attribute):
    assert original_attribute(name, (0.6 * speed, 0.8 * speed)) == attribute


def test_global_boxes_by_hand():
    # A car 2 m ahead of the lidar (bottom at z=-1, 4 m long along x, 2 m wide, 1.5 m high, yaw 0,
    # moving 1 m/s along x); the lidar is turned 90 degrees in the ego frame and sits at (1, 0, 2);
    # the ego at (100, 200, 0) unrotated.
    boxes = np.array([[2.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.0, 1.0, 0.0]], dtype=np.float32)
    out = global_detection_boxes(boxes, [0.9], [0], Q90, [1.0, 0.0, 2.0], [1.0, 0, 0, 0], [100.0, 200.0, 0.0])
    np.testing.assert_allclose(out["translation"], [[101.0, 202.0, 1.75]], atol=1e-6)  # gravity centre
    np.testing.assert_allclose(out["size"], [[2.0, 4.0, 1.5]])  # (w, l, h): the lidar box's dims swapped
    np.testing.assert_allclose(out["rotation"], [Q90], atol=1e-7)
    np.testing.assert_allclose(out["velocity"], [[0.0, 1.0]], atol=1e-7)
    assert out["score"].tolist() == [float(np.float32(0.9))] and out["label"].tolist() == [0]
    assert ATTRIBUTE_NAMES[out["attribute"][0]] == "vehicle.moving"
    (entry,) = submission_entries("tok", out)
    assert entry["detection_name"] == "car" and entry["attribute_name"] == "vehicle.moving"
    assert entry["sample_token"] == "tok" and entry["size"] == [2.0, 4.0, 1.5]


def test_global_boxes_drop_beyond_the_class_range():
    # 45 m from the ego: inside the car range (50 m), outside the pedestrian range (40 m).
    far = np.array([[45.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]] * 2, dtype=np.float32)
    out = global_detection_boxes(far, [0.5, 0.4], [0, 8], [1.0, 0, 0, 0], [0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0])
    assert out["label"].tolist() == [0]
    empty = global_detection_boxes(np.zeros((0, 9)), [], [], [1.0, 0, 0, 0], [0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0])
    assert empty["translation"].shape == (0, 3) and empty["rotation"].shape == (0, 4)


def test_ground_truth_as_detections_scores_perfectly(tmp_path):
    """The ground truth written as a detector's boxes (x, y, bottom z, l, w, h, yaw, v) goes through
    the submission path and DetectionEval finds it exactly: sizes, yaw and centre conventions agree."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    nusc = open_nuscenes(synth_dataset(), "v1.0-trainval")
    records = {r.token: r for r in sample_records(nusc, "val")}
    results = {}
    for f in list_frames(synth_dataset(), "val"):
        g, labels = f.gt_boxes[f.gt_valid], f.gt_labels[f.gt_valid]  # the metric ignores boxes without points
        boxes = np.stack(
            [g[:, 0], g[:, 1], g[:, 2] - g[:, 5] / 2, g[:, 4], g[:, 3], g[:, 5], g[:, 6], g[:, 7], g[:, 8]], 1
        )
        r = records[f.sample_token]
        out = global_detection_boxes(
            boxes, np.linspace(0.9, 0.5, len(g)), labels, r.lidar2ego_rotation, r.lidar2ego_translation,
            r.ego2global_rotation, r.ego2global_translation,
        )  # fmt: skip
        results[f.sample_token] = submission_entries(f.sample_token, out)
    path = tmp_path / "results_nusc.json"
    path.write_text(json.dumps({"meta": ORIGINAL_SUBMISSION_META, "results": results}))
    config = config_factory("detection_cvpr_2019")
    metrics, _ = DetectionEval(nusc, config, str(path), "val", str(tmp_path / "eval"), verbose=False).evaluate()
    summary = metrics.serialize()
    present = [c for c, ap in summary["mean_dist_aps"].items() if ap > 0]
    assert present and all(summary["mean_dist_aps"][c] == pytest.approx(1.0) for c in present)
    for err in ("trans_err", "scale_err", "orient_err"):
        assert all(summary["label_tp_errors"][c][err] < 1e-3 for c in present if c not in ("traffic_cone",)), err


def test_assign_whole_scenes():
    assert assign_scenes([3, 3, 3], 2) == [[0, 2], [1]]
    assert assign_scenes([2, 9, 4, 4], 2) == [[1], [0, 2, 3]]
    assert assign_scenes([5], 3) == [[0], [], []]
    shares = assign_scenes(list(range(1, 40)), 4)
    assert sorted(i for s in shares for i in s) == list(range(39))


def test_model_settings():
    from tggbc.models.configs import published_config

    config = published_config("streampetr-v2-99-1600x640")
    dense, tggbc = model_settings(config)
    assert dense == Setting("dense") and tggbc == Setting("tggbc", "tggbc", r=21000, n=1, k=175)
    (random,) = model_settings(config, ["random"], r=0.5, k=40)
    assert random == Setting("random", "random", r=0.5, n=1, k=40)
    with pytest.raises(ValueError, match="distinct names"):
        model_settings(config, ["dense", "prune"])


# ------------------------------------------------------------------ the runner


TINY = dict(num_query=24, num_propagated=8, memory_len=16, topk_proposals=8, ffn_dims=64, num_layers=2, max_num=50)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stream_petr_r50_flash_704_bs2_seq_24e", "petrv1_r50_flash_704_24e"])
def test_runner_equals_the_detectors_own_scene_loop(name):
    """Shared features and keys, one decoder per setting: the same boxes as the whole detector run
    frame by frame with SceneStream (its memory reset at the scene change) under each pruner."""
    torch.manual_seed(0)
    detector = build_detector(name, pruner=None, image_size=(64, 160), **TINY).requires_grad_(False)
    records = sample_records(open_nuscenes(synth_dataset(), "v1.0-trainval"), "val")[:4]  # a scene and a bit
    dataset = NuScenesFrames(records, (64, 160), ImageNormalization.of(detector.config))
    settings = [Setting("dense"), Setting("tggbc", "tggbc", r=0.75, n=1, k=6)]
    runner = SceneRunner(detector, settings)
    streams = {s.name: SceneStream(detector) for s in settings}
    scene = None
    for batch in frame_loader(dataset, range(len(records)), workers=0):
        record = records[int(batch["index"])]
        if record.scene_token != scene:
            runner.start_scene()
            scene = record.scene_token
        got = runner(batch)
        for s in settings:
            pruner = None if s.method is None else KeyPruner(r=s.r, n=s.n, k=s.k)
            with pruning(detector.decoder, pruner):
                extra = {}
                if detector.temporal:
                    extra = dict(ego_pose=batch["ego_pose"], ego_pose_inv=batch["ego_pose_inv"],
                                 timestamp=batch["timestamp"], scene_token=record.scene_token)  # fmt: skip
                want = streams[s.name](batch["img"], batch["lidar2img"], batch["intrinsics"], **extra)
            for a, b in zip(got[s.name].detections, want.detections[0], strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert got[s.name].keys_per_layer == want.keys_per_layer
    assert runner(batch)["tggbc"].keys_per_layer == [240, 60]
