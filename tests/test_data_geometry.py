"""Building blocks of the synthetic data: transforms, the rig, ray casting, scene sampling, the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tggbc.data.classes import CATEGORY_TO_CLASS, DETECTION_CLASSES
from tggbc.data.raycast import box_corners, intersect_box
from tggbc.data.rig import CAMERA_NAMES, CameraRig
from tggbc.data.scene import sample_scene
from tggbc.data.transforms import matrix_to_quaternion, quaternion_to_matrix, yaw_of_matrix, yaw_to_quaternion


def test_quaternion_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=4)
        q = q / np.linalg.norm(q) * np.sign(q[0])
        np.testing.assert_allclose(matrix_to_quaternion(quaternion_to_matrix(q)), q, atol=1e-9)
    for yaw in (-3.0, -0.5, 0.0, 1.2, 3.1):
        assert yaw_of_matrix(quaternion_to_matrix(yaw_to_quaternion(yaw))) == pytest.approx(yaw)


def test_rig_geometry():
    rig = CameraRig.default((704, 256))
    assert rig.camera_names == CAMERA_NAMES and rig.intrinsics.shape == (6, 3, 3)
    # Optical axes point at the nuScenes yaws, level with the ground.
    axes = rig.cam2ego[:, :3, 2]
    yaws = np.degrees(np.arctan2(axes[:, 1], axes[:, 0]))
    np.testing.assert_allclose(yaws, [0, -55, -110, 180, 110, 55], atol=1e-9)
    np.testing.assert_allclose(axes[:, 2], 0, atol=1e-12)
    # Every horizontal direction is seen by at least one camera, most seams by two.
    azimuth = np.linspace(-np.pi, np.pi, 720)
    directions = np.stack([np.cos(azimuth), np.sin(azimuth), np.zeros(720)], axis=1)
    uv, depth = rig.project_ego_points(rig.camera_origins.mean(0) + 30.0 * directions)
    seen = (depth > 0) & (uv[..., 0] >= 0) & (uv[..., 0] <= 703)
    assert seen.any(axis=0).all() and (seen.sum(axis=0) >= 2).mean() > 0.15
    # A pixel's ray projects back onto that pixel.
    point = rig.camera_origins[2] + 7.0 * rig.ray_directions[2, 100, 300].astype(np.float64)
    uv, _ = rig.project_ego_points(point[None])
    np.testing.assert_allclose(uv[2, 0], [300, 100], atol=1e-3)


def test_slab_intersection_matches_marching():
    rng = np.random.default_rng(1)
    origin = np.array([0.3, -0.2, 1.5])
    center, half, yaw = np.array([4.0, 1.0, 0.9]), np.array([2.0, 0.9, 0.9]), 0.7
    # Aim at points around the box so that about half of the rays hit it.
    targets = center + rng.uniform(-1.6, 1.6, size=(400, 3)) * half
    directions = (targets - origin).astype(np.float32)
    hits = intersect_box(origin, np.ascontiguousarray(directions.T), center, half, yaw)
    # Reference: march each ray in small steps of t and test containment in the box frame.
    steps = np.linspace(0.0, 4.0, 8001)[:, None, None]
    offset = origin[None, None, :] + steps * directions[None, :, :].astype(np.float64) - center  # (S, n, 3)
    c, s = np.cos(yaw), np.sin(yaw)
    x, y = c * offset[..., 0] + s * offset[..., 1], -s * offset[..., 0] + c * offset[..., 1]
    local = np.stack([x, y, offset[..., 2]], axis=-1)
    inside = np.all(np.abs(local) <= half, axis=-1)
    first = np.where(inside.any(0), steps[inside.argmax(0), 0, 0], np.inf)
    agree = (np.isinf(first) & ~hits.hit) | (np.abs(first - np.where(hits.hit, hits.t, -1.0)) < 1e-3)
    assert 100 < hits.hit.sum() < 350 and agree.mean() > 0.99  # a ray grazing an edge may differ by a step
    face_axis, face_sign, local_point = hits.entry_surface(hits.hit)
    on_face = np.abs(np.abs(local_point[np.arange(len(face_axis)), face_axis]) - half[face_axis]) < 1e-4
    assert on_face.all() and set(np.unique(face_sign)) <= {-1, 1}


def test_box_corners_follow_nuscenes_size_order():
    corners = box_corners(np.zeros(3), np.array([2.0, 4.0, 1.5]), 0.0)  # w, l, h
    np.testing.assert_allclose(corners.max(0), [2.0, 1.0, 0.75])  # length along x


def test_scenes_have_no_overlapping_boxes_and_all_classes():
    shapely = pytest.importorskip("shapely", minversion="2.0", reason="independent polygon overlap check")
    seen = set()
    for seed in range(8):
        scene = sample_scene(np.random.default_rng(seed), 4)
        seen |= {CATEGORY_TO_CLASS[c] for c in scene.categories if c}
        # Objects move consistently: constant velocity between frames 0.5 s apart.
        step = scene.centers(1) - scene.centers(0)
        np.testing.assert_allclose(step[:, :2], 0.5 * scene.velocities_xy)
        if seed >= 3:
            continue  # overlap checks on a few scenes are enough
        for frame in range(scene.num_frames):
            centres = scene.centers(frame)
            boxes = [box_corners(centres[i], scene.sizes_wlh[i], scene.yaws[i])[:4, :2] for i in range(len(centres))]
            ego_position, ego_yaw = scene.ego_pose(frame)
            ego_centre = ego_position + 1.4 * np.array([np.cos(ego_yaw), np.sin(ego_yaw), 0.0])
            boxes.append(box_corners(ego_centre, np.array([1.9, 4.8, 1.6]), ego_yaw)[:4, :2])
            polygons = shapely.polygons(np.stack(boxes))
            first, second = shapely.STRtree(polygons).query(polygons, predicate="intersects")
            pairs = first < second
            areas = shapely.area(shapely.intersection(polygons[first[pairs]], polygons[second[pairs]]))
            assert np.all(areas < 1e-6), areas.max()
    assert seen == set(DETECTION_CLASSES)


def test_cli_import_is_light():
    code = (
        "import sys, tggbc.data.cli; "
        "print(sorted(m for m in ('cv2', 'nuscenes', 'tggbc.data.generator', 'tggbc.data.render') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_synth_writes_and_refuses_to_overwrite(tmp_path, capsys):
    pytest.importorskip("nuscenes", reason="generation names scenes after the devkit's official splits")
    from tggbc.cli import main

    out = tmp_path / "synth"
    argv = ["data", "synth", "--out", str(out), "--scenes", "1", "--frames", "2", "--width", "64", "--height", "32"]
    argv += ["--val-fraction", "0", "--quiet"]
    assert main(argv) == 0
    scene_table = (out / "v1.0-trainval" / "scene.json").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert (out / "v1.0-trainval" / "scene.json").read_bytes() == scene_table
    assert main([*argv, "--force"]) == 0
