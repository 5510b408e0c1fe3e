"""The devkit's detection eval runs on a generated dataset with eval_set="val" and scores GT perfectly."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("nuscenes", reason="the nuScenes detection eval is part of nuscenes-devkit")

from tggbc.data import DETECTION_CLASSES, VERSION, generate, list_frames, split_scenes  # noqa: E402

SETTINGS = dict(num_scenes=2, seed=7, image_size=(176, 64), frames_per_scene=3, val_fraction=0.5, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "data", **SETTINGS)


@pytest.fixture(scope="module")
def nusc(dataset):
    from nuscenes import NuScenes

    return NuScenes(version=VERSION, dataroot=str(dataset), verbose=False)


def test_load_gt_selects_exactly_the_val_scenes(dataset, nusc):
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.data_classes import DetectionBox

    gt = load_gt(nusc, "val", DetectionBox)
    val_frames = list_frames(dataset, "val")
    assert set(gt.sample_tokens) == {frame.sample_token for frame in val_frames}
    assert all(np.all(np.isfinite(box.velocity)) for box in gt.all)
    gt = filter_eval_boxes(nusc, add_center_dist(nusc, gt), config_factory("detection_cvpr_2019").class_range)
    # What survives the eval's distance and point filters is what load_frames marks valid (within range).
    kept = sum(len(gt[token]) for token in gt.sample_tokens)
    assert kept > 0 and kept <= sum(int(frame.gt_valid.sum()) for frame in val_frames)
    assert load_gt(nusc, "train", DetectionBox).sample_tokens == [f.sample_token for f in list_frames(dataset, "train")]
    assert split_scenes(dataset)["val"] == [nusc.get("scene", s["scene_token"])["name"] for s in nusc.sample][3:4]


def test_detection_eval_scores_ground_truth_as_perfect(dataset, nusc, tmp_path):
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    results = {}
    for frame in list_frames(dataset, "val"):
        lidar2global = frame.ego2global @ frame.lidar2ego.astype(np.float64)
        heading_offset = np.arctan2(lidar2global[1, 0], lidar2global[0, 0])
        boxes = []
        for i in np.flatnonzero(frame.gt_valid):  # boxes without points are not GT for the eval
            box = frame.gt_boxes[i].astype(np.float64)
            yaw = box[6] + heading_offset
            boxes.append(
                {
                    "sample_token": frame.sample_token,
                    "translation": (lidar2global[:3, :3] @ box[:3] + lidar2global[:3, 3]).tolist(),
                    "size": box[3:6].tolist(),
                    "rotation": [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))],
                    "velocity": (lidar2global[:2, :2] @ box[7:9]).tolist(),
                    "detection_name": DETECTION_CLASSES[frame.gt_labels[i]],
                    "detection_score": 1.0,
                    "attribute_name": frame.gt_attribute_names[i],
                }
            )
        results[frame.sample_token] = boxes
    meta = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}
    result_path = tmp_path / "results.json"
    result_path.write_text(json.dumps({"meta": meta, "results": results}))

    evaluation = DetectionEval(
        nusc,
        config_factory("detection_cvpr_2019"),
        str(result_path),
        eval_set="val",
        output_dir=str(tmp_path / "eval"),
        verbose=False,
    )
    metrics, _ = evaluation.evaluate()
    summary = metrics.serialize()
    present = {
        name
        for token in evaluation.gt_boxes.sample_tokens
        for name in (box.detection_name for box in evaluation.gt_boxes[token])
    }
    assert {"car", "pedestrian"} <= present
    for name in present:
        assert summary["label_aps"][name][0.5] == pytest.approx(1.0)
        for error in ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err"):
            value = summary["label_tp_errors"][name][error]
            # The devkit defines orientation/velocity/attribute errors of cones and barriers as NaN.
            if np.isnan(value) and name in ("barrier", "traffic_cone") and error not in ("trans_err", "scale_err"):
                continue
            assert value == pytest.approx(0.0, abs=1e-3), (name, error, value)
