"""load_frames: shapes, agreement with the tables and the devkit, and boxes landing where they were drawn."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("nuscenes", reason="generation names scenes after the devkit's official splits")

from tggbc.data import DETECTION_CLASSES, VERSION, generate, list_frames, load_frames  # noqa: E402
from tggbc.data.raycast import box_corners  # noqa: E402
from tggbc.data.render import render_frame  # noqa: E402
from tggbc.data.rig import CameraRig  # noqa: E402
from tggbc.data.scene import sample_scene  # noqa: E402
from tggbc.data.writer import SceneJob  # noqa: E402

SIZE = (176, 64)
SETTINGS = dict(num_scenes=2, seed=5, image_size=SIZE, frames_per_scene=3, val_fraction=0.5, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "data", **SETTINGS)


def _scene_and_job(root, frame):
    """Re-create the generator's scene of `frame` (same job => same scene) to get its object indices."""
    splits = json.loads((root / VERSION / "splits.json").read_text())
    split = "train" if frame.scene_name in splits["train"] else "val"
    index = splits[split].index(frame.scene_name)
    job = SceneJob(split, index, frame.scene_name, SETTINGS["seed"], SETTINGS["frames_per_scene"], SIZE, 90)
    return sample_scene(job.rng(), job.num_frames), job


def _project(lidar2img: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[6, 4, 4] x [N, 3] -> uv [6, N, 2], depth [6, N]."""
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    projected = np.einsum("cij,nj->cni", lidar2img.astype(np.float64), homogeneous)
    depth = projected[..., 2]
    return projected[..., :2] / np.maximum(depth, 1e-6)[..., None], depth


def test_frame_shapes_and_splits(dataset):
    train, val = list_frames(dataset, "train"), list_frames(dataset, "val")
    assert len(train) == 3 and len(val) == 3
    assert {f.sample_token for f in train}.isdisjoint(f.sample_token for f in val)
    frame = next(load_frames(dataset, "val"))
    width, height = SIZE
    assert frame.images.shape == (6, height, width, 3) and frame.images.dtype == np.uint8
    assert frame.intrinsics.shape == (6, 3, 3) and frame.cam2ego.shape == (6, 4, 4)
    assert frame.lidar2img.shape == (6, 4, 4) and frame.lidar2cam.shape == (6, 4, 4)
    assert frame.ego2global.shape == (4, 4) and frame.lidar2ego.shape == (4, 4)
    n = len(frame.gt_labels)
    assert n > 0 and frame.gt_boxes.shape == (n, 9) and frame.gt_boxes.dtype == np.float32
    assert frame.gt_valid.shape == (n,) and len(frame.gt_attribute_names) == n
    assert frame.gt_labels.min() >= 0 and frame.gt_labels.max() < len(DETECTION_CLASSES)
    assert np.all(frame.gt_boxes[:, 3:6] > 0) and np.all(np.isfinite(frame.gt_boxes))
    padded = np.tile(np.eye(4, dtype=np.float32), (6, 1, 1))
    padded[:, :3, :3] = frame.intrinsics
    np.testing.assert_allclose(frame.lidar2img, padded @ frame.lidar2cam, rtol=1e-5, atol=1e-3)


def test_frames_agree_with_tables(dataset):
    records = {r["token"]: r for r in json.loads((dataset / VERSION / "sample_annotation.json").read_text())}
    for frame in list_frames(dataset, "train"):
        tokens = {t for t, r in records.items() if r["sample_token"] == frame.sample_token}
        assert set(frame.gt_annotation_tokens) == tokens
        lidar2global = frame.ego2global @ frame.lidar2ego.astype(np.float64)
        for box, token, valid in zip(frame.gt_boxes, frame.gt_annotation_tokens, frame.gt_valid, strict=True):
            record = records[token]
            center = lidar2global[:3, :3] @ box[:3].astype(np.float64) + lidar2global[:3, 3]
            np.testing.assert_allclose(center, record["translation"], atol=1e-3)
            np.testing.assert_allclose(box[3:6], record["size"], atol=1e-4)
            assert valid == (record["num_lidar_pts"] + record["num_radar_pts"] > 0)
        visibility = [int(records[token]["visibility_token"]) for token in frame.gt_annotation_tokens]
        assert frame.gt_visibility.tolist() == visibility and set(visibility) <= {1, 2, 3, 4}


def test_velocities_match_devkit(dataset):
    from nuscenes import NuScenes

    nusc = NuScenes(version=VERSION, dataroot=str(dataset), verbose=False)
    for frame in list_frames(dataset, "val"):
        rotation = (frame.ego2global @ frame.lidar2ego.astype(np.float64))[:2, :2]
        for box, token in zip(frame.gt_boxes, frame.gt_annotation_tokens, strict=True):
            np.testing.assert_allclose(rotation @ box[7:9], nusc.box_velocity(token)[:2], atol=1e-3)


def test_lidar2img_matches_devkit_projection(dataset):
    from nuscenes import NuScenes
    from nuscenes.utils.geometry_utils import view_points

    nusc = NuScenes(version=VERSION, dataroot=str(dataset), verbose=False)
    frame = list_frames(dataset, "val")[1]
    sample = nusc.get("sample", frame.sample_token)
    uv, depth = _project(frame.lidar2img, frame.gt_boxes[:, :3])
    compared = 0
    for camera, name in enumerate(frame.camera_names):
        _, boxes, intrinsic = nusc.get_sample_data(sample["data"][name])
        by_token = {box.token: box for box in boxes}  # boxes at least partly inside this image
        for i, token in enumerate(frame.gt_annotation_tokens):
            if token in by_token and depth[camera, i] > 0.5:
                expected = view_points(by_token[token].center[:, None], intrinsic, normalize=True)[:2, 0]
                np.testing.assert_allclose(uv[camera, i], expected, atol=1e-2)
                compared += 1
    assert compared >= 10


def test_boxes_project_where_they_were_drawn(dataset):
    """Every drawn pixel of an object lies inside the projection of its GT box (from the tables), and the
    projected centre of an unoccluded object shows that object, in a colour that differs from the
    background there."""
    rig = CameraRig.default(SIZE)
    checked_centres, distinct, checked_extents = 0, 0, 0
    for frame in load_frames(dataset, "val"):
        scene, job = _scene_and_job(dataset, frame)
        frame_index = (frame.timestamp - job.timestamp(0)) // 500_000
        drawn = render_frame(rig, scene, frame_index)
        empty = dataclasses.replace(
            scene,
            categories=[],
            attributes=[],
            sizes_wlh=np.zeros((0, 3)),
            start_xy=np.zeros((0, 2)),
            velocities_xy=np.zeros((0, 2)),
            yaws=np.zeros(0),
            looks=[],
        )
        background = render_frame(rig, empty, frame_index).images.astype(np.int32)
        # The JPEGs on disk are the rendered images (up to compression).
        assert np.abs(frame.images.astype(np.int32) - drawn.images.astype(np.int32)).mean() < 6.0

        object_of_token = {job.token("sample_annotation", int(i), frame_index): int(i) for i in range(len(scene.looks))}
        for box, token in zip(frame.gt_boxes, frame.gt_annotation_tokens, strict=True):
            index = object_of_token[token]
            corners = box_corners(box[:3], box[3:6], float(box[6]))
            corner_uv, corner_depth = _project(frame.lidar2img, corners)
            centre_uv, centre_depth = _project(frame.lidar2img, box[None, :3])
            for camera in range(6):
                rows, cols = np.nonzero(drawn.instance_ids[camera] == index)
                if len(rows) and np.all(corner_depth[camera] > 0.1):
                    u, v = corner_uv[camera, :, 0], corner_uv[camera, :, 1]
                    assert cols.min() >= u.min() - 1 and cols.max() <= u.max() + 1
                    assert rows.min() >= v.min() - 1 and rows.max() <= v.max() + 1
                    checked_extents += 1
                u, v = np.round(centre_uv[camera, 0]).astype(int)
                inside = 1 <= u < SIZE[0] - 1 and 1 <= v < SIZE[1] - 1 and centre_depth[camera, 0] > 0.5
                unoccluded = drawn.visible_pixels[index] == drawn.unoccluded_pixels[index] >= 9
                if inside and unoccluded:
                    assert np.all(drawn.instance_ids[camera, v - 1 : v + 2, u - 1 : u + 2] == index)
                    checked_centres += 1
                    difference = np.abs(frame.images[camera, v, u].astype(np.int32) - background[camera, v, u]).sum()
                    distinct += difference > 30
    assert checked_extents >= 20 and checked_centres >= 5
    assert distinct >= 0.8 * checked_centres
