"""The idealised-detector bound: its depth-error formula, camera choice, the devkit-style matching
it measures radial errors with, and the command end to end on a tiny generated dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tggbc.detector.bound import depth_sigma, match_radial_errors, true_classes, viewing_camera


def test_depth_sigma_single_length_matches_reading_the_span_one_sigma_off():
    # A length L at depth d spans p = f L / d pixels; reading p + s gives depth f L / (p + s).
    focal, length, depth, s = 200.0, 1.5, 30.0, 1e-3
    span = focal * length / depth
    moved = focal * length / (span + s)
    expected = (depth - moved) / s  # metres per pixel, finite difference
    got = depth_sigma(np.array([depth]), np.array([focal]), np.array([[length]]), 1.0)
    assert got[0] == pytest.approx(expected, rel=1e-3)


def test_depth_sigma_combines_readings_by_inverse_variance():
    depth, focal = np.array([25.0]), np.array([250.0])
    one = depth_sigma(depth, focal, np.array([[1.5]]), 0.5)[0]
    two = depth_sigma(depth, focal, np.array([[2.0]]), 0.5)[0]
    both = depth_sigma(depth, focal, np.array([[1.5, 2.0]]), 0.5)[0]
    assert both == pytest.approx((one**-2 + two**-2) ** -0.5)
    assert depth_sigma(depth, focal, np.array([[1.5]]), 0.0)[0] == 0.0


def test_depth_sigma_refuses_bad_input():
    with pytest.raises(ValueError, match="sigma_px"):
        depth_sigma(np.ones(2), np.ones(2), np.ones((2, 1)), -0.5)
    with pytest.raises(ValueError, match=r"\[M=2, K\]"):
        depth_sigma(np.ones(2), np.ones(2), np.ones((3, 1)), 0.5)


def _camera(yaw: float, focal=100.0, width=100, height=50) -> np.ndarray:
    """lidar2img of a level camera at the origin looking along azimuth `yaw` (x forward, z up)."""
    c, s = np.cos(yaw), np.sin(yaw)
    # camera axes in the lidar frame: x right, y down, z forward
    rotation = np.array([[s, -c, 0.0], [0.0, 0.0, -1.0], [c, s, 0.0]])
    lidar2cam = np.eye(4)
    lidar2cam[:3, :3] = rotation
    intrinsics = np.eye(4)
    intrinsics[:3, :3] = [[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]]
    return intrinsics @ lidar2cam


def test_viewing_camera_picks_the_camera_that_images_the_centre():
    lidar2img = np.stack([_camera(0.0), _camera(np.pi), _camera(0.3)])
    centers = np.array([[10.0, 0.0, 0.0], [-20.0, 1.0, 0.5], [0.0, 10.0, 0.0], [10.0, 3.0, 0.0]])
    camera, depth = viewing_camera(centers, lidar2img, (100, 50))
    # (10, 3) is imaged by camera 0 (u = 20) and camera 2; camera 2 sees it nearer its middle column.
    assert camera.tolist() == [0, 1, -1, 2]
    assert depth[0] == pytest.approx(10.0) and depth[1] == pytest.approx(20.0) and np.isnan(depth[2])
    assert depth[3] == pytest.approx(10.0 * np.cos(0.3) + 3.0 * np.sin(0.3))


def test_matching_is_greedy_by_score_within_class_and_2_m():
    gt_xy = np.array([[10.0, 0.0], [0.0, 20.0], [-30.0, 0.0]])
    gt_labels = np.array(["car", "pedestrian", "car"], dtype=object)
    pred_xy = np.array([[11.0, 0.5], [10.1, 0.0], [0.0, 19.0], [10.0, 0.2], [-33.0, 0.0]])
    pred_labels = np.array(["car", "car", "pedestrian", "truck", "car"], dtype=object)
    pred_scores = np.array([0.9, 0.5, 0.8, 0.99, 0.7])
    errors = match_radial_errors(pred_xy, pred_labels, pred_scores, gt_xy, gt_labels)
    # The 0.9 car takes the first GT although the 0.5 car is nearer; the truck matches nothing;
    # the car 3 m beyond the third GT is outside 2 m.
    assert errors[0] == pytest.approx(1.0)
    assert errors[1] == pytest.approx(-1.0)
    assert np.isnan(errors[2])
    assert np.isnan(match_radial_errors(np.zeros((0, 2)), pred_labels[:0], pred_scores[:0], gt_xy, gt_labels)).all()


def test_true_classes_takes_the_class_of_the_nearest_ground_truth_within_2_m():
    from types import SimpleNamespace

    # Lidar frame = ego frame shifted 1 m forward; ego frame = global frame shifted 100 m east.
    lidar2ego, ego2global = np.eye(4), np.eye(4)
    lidar2ego[0, 3], ego2global[0, 3] = 1.0, 100.0
    frame = SimpleNamespace(
        sample_token="s",
        lidar2ego=lidar2ego,
        ego2global=ego2global,
        gt_boxes=np.array([[10.0, 0, 0], [10.0, 3.0, 0], [30.0, 0, 0]]),
        gt_labels=np.array([0, 8, 5]),  # car, pedestrian, barrier (DETECTION_CLASSES order)
        gt_valid=np.array([True, True, False]),  # the barrier is not scored, so not used either
    )

    def box(x, y, name):
        return {"translation": [x, y, 0.0], "detection_name": name, "detection_score": 0.5}

    # Global x = lidar x + 101. Nearest to the car (1.2 m) / nearer the pedestrian (1.2 vs 1.8 m) /
    # 2.5 m from either / on the invalid barrier.
    boxes = [box(111.0, 1.2, "truck"), box(111.0, 1.8, "car"), box(113.5, 0.0, "bus"), box(131.0, 0.0, "car")]
    out, changed = true_classes([frame], {"s": boxes})
    assert [b["detection_name"] for b in out["s"]] == ["car", "pedestrian", "bus", "car"]
    assert changed == 2
    assert boxes[0]["detection_name"] == "truck"  # the input is not modified
    assert true_classes([frame], {"s": []}) == ({"s": []}, 0)


pytest.importorskip("nuscenes", reason="the bound is scored by nuscenes-devkit")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tggbc.data import generate

    return generate(
        tmp_path_factory.mktemp("synth") / "data",
        num_scenes=2,
        seed=3,
        image_size=(176, 64),
        frames_per_scene=3,
        val_fraction=0.5,
        progress=False,
    )


def test_oracle_moves_boxes_along_their_camera_ray_only(dataset):
    from tggbc.data import list_frames
    from tggbc.detector.bound import oracle_detections

    for frame in list_frames(dataset, "val"):
        exact, index = oracle_detections(frame, (176, 64), 0.0, np.random.default_rng(0))
        moved, same = oracle_detections(frame, (176, 64), 2.0, np.random.default_rng(0))
        assert np.array_equal(index, same) and len(index) > 0
        truth = frame.gt_boxes[index].astype(np.float64)
        assert np.allclose(exact.center.numpy(), truth[:, :3])
        assert np.array_equal(moved.size.numpy(), truth[:, 3:6]) and np.array_equal(
            moved.label.numpy(), frame.gt_labels[index]
        )
        camera, _ = viewing_camera(truth[:, :3], frame.lidar2img, (176, 64))
        origin = np.linalg.inv(frame.lidar2cam.astype(np.float64))[camera, :3, 3]
        ray, shift = truth[:, :3] - origin, moved.center.numpy() - truth[:, :3]
        assert np.abs(np.cross(ray, shift)).max() < 1e-6 * np.abs(ray).max() * max(np.abs(shift).max(), 1.0)
        assert np.abs(shift).max() > 0.0


def test_oracle_limited_to_visible_boxes_keeps_exactly_those(dataset):
    from tggbc.data import list_frames
    from tggbc.detector.bound import VISIBLE_LEVEL, oracle_detections

    kept = dropped = 0
    for frame in list_frames(dataset, "val"):
        _, every = oracle_detections(frame, (176, 64), 0.5, np.random.default_rng(0))
        det, visible = oracle_detections(frame, (176, 64), 0.5, np.random.default_rng(0), VISIBLE_LEVEL)
        assert np.array_equal(visible, every[frame.gt_visibility[every] >= VISIBLE_LEVEL])
        # The same depth draws: a box seen by both is placed identically.
        full, _ = oracle_detections(frame, (176, 64), 0.5, np.random.default_rng(0))
        assert np.array_equal(det.center.numpy(), full.center.numpy()[np.isin(every, visible)])
        kept, dropped = kept + len(visible), dropped + len(every) - len(visible)
    assert kept > 0 and dropped > 0  # the tiny dataset has boxes of both kinds


def test_bound_command_scores_a_perfect_submission_like_the_zero_pixel_oracle(dataset, tmp_path, capsys):
    from tggbc.cli import main

    first = tmp_path / "first"
    assert main(["bound", "--data", str(dataset), "--pixels", "0,2", "--out", str(first), "--quiet"]) == 0
    rows = json.loads((first / "bound.json").read_text())["rows"]
    assert [row["kind"] for row in rows] == ["oracle", "oracle", "visible", "visible"]
    assert rows[2]["mAP"] <= rows[0]["mAP"]  # seeing fewer boxes can only lose
    assert rows[2]["radial"]["matched"] == rows[2]["radial"]["matched_visible"]  # it reports visible boxes only
    assert rows[0]["mATE"] == pytest.approx(0.0, abs=1e-6) and rows[0]["mAP"] >= rows[1]["mAP"]
    assert rows[1]["mATE"] > 0.0
    assert (first / "bound.png").stat().st_size > 0

    second = tmp_path / "second"
    submission = first / "results_ideal_0px.json"
    assert (
        main(
            [
                "bound",
                "--data",
                str(dataset),
                "--pixels",
                "1",
                "--submission",
                str(submission),
                "--out",
                str(second),
                "--quiet",
            ]
        )
        == 0
    )
    *_, last, relabelled = json.loads((second / "bound.json").read_text())["rows"]
    assert last["kind"] == "submission" and last["mAP"] == pytest.approx(rows[0]["mAP"])
    # Every box of a perfect submission already has its true class.
    assert relabelled["kind"] == "true_classes" and relabelled["relabelled"] == 0
    assert relabelled["mAP"] == pytest.approx(last["mAP"])
    radial = last["radial"]
    assert radial["matched"] == rows[0]["radial"]["matched"] and sum(radial["matched"]) > 0
    assert all(m == pytest.approx(0.0, abs=1e-6) for m in radial["median_m"] if not np.isnan(m))
    # The submission is also scored with capped ranges (classes with no box within a cap score 0 there).
    from tggbc.detector.evaluate import nuscenes_metrics

    assert set(last["mAP_within"]) == {"20", "30", "40"}
    for cap, value in last["mAP_within"].items():
        assert value == pytest.approx(nuscenes_metrics(dataset, submission, max_range=float(cap))[0]["mean_ap"])
    assert "results_ideal_0px" in capsys.readouterr().out


def test_range_cap_drops_what_lies_beyond_it(dataset, tmp_path):
    from nuscenes.eval.common.loaders import add_center_dist, load_prediction
    from nuscenes.eval.detection.data_classes import DetectionBox

    from tggbc.data.frames import list_frames
    from tggbc.data.splits import read_meta
    from tggbc.detector.bound import oracle_submission
    from tggbc.detector.evaluate import SUBMISSION_META, nuscenes_metrics

    frames = list_frames(dataset, "val")
    perfect = tmp_path / "perfect.json"
    image_size = tuple(read_meta(dataset)["image_size"])
    perfect.write_text(json.dumps({"meta": SUBMISSION_META, "results": oracle_submission(frames, image_size, 0.0)}))
    full, nusc = nuscenes_metrics(dataset, perfect)
    # The same boxes, but only those within 20 m of the ego vehicle (the devkit's own distance).
    boxes = add_center_dist(nusc, load_prediction(str(perfect), 500, DetectionBox)[0])
    near = {token: [b.serialize() for b in boxes[token] if b.ego_dist < 20.0] for token in boxes.sample_tokens}
    dropped = sum(len(boxes[t]) - len(near[t]) for t in near)
    assert dropped > 0 and sum(map(len, near.values())) > 0  # the fixture has objects on both sides of 20 m
    near_path = tmp_path / "near.json"
    near_path.write_text(json.dumps({"meta": SUBMISSION_META, "results": near}))
    near_full = nuscenes_metrics(dataset, near_path, nusc)[0]["mean_ap"]
    near_capped = nuscenes_metrics(dataset, near_path, nusc, max_range=20.0)[0]["mean_ap"]
    perfect_capped = nuscenes_metrics(dataset, perfect, nusc, max_range=20.0)[0]["mean_ap"]
    # Under the standard ranges the missing far boxes cost recall; capped at 20 m they are not asked for.
    assert near_full < full["mean_ap"] and near_capped == pytest.approx(perfect_capped) and near_capped > near_full
    with pytest.raises(ValueError, match="max_range must be > 0"):
        nuscenes_metrics(dataset, perfect, nusc, max_range=0.0)


def test_bound_command_refuses_a_missing_submission(dataset, tmp_path):
    from tggbc.cli import main

    with pytest.raises(SystemExit, match="does not exist"):
        main(["bound", "--data", str(dataset), "--submission", str(tmp_path / "nope.json"), "--out", str(tmp_path)])
