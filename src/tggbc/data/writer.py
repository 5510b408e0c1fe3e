"""Generate one scene: sample it, render and write its sensor files, and build its table records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tggbc.data.lidar import simulate_lidar
from tggbc.data.render import objects_in_ego, render_frame
from tggbc.data.rig import LIDAR_NAME, CameraRig
from tggbc.data.scene import sample_scene
from tggbc.data.tables import (
    attribute_token,
    calibrated_sensor_token,
    category_token,
    make_token,
    rounded,
    visibility_token,
)
from tggbc.data.transforms import yaw_to_quaternion

_SPLIT_IDS = {"train": 0, "val": 1}
# Scenes of a split are 100 s apart on a split-specific clock, so timestamps never collide and a val
# scene's tables do not depend on how many train scenes were generated.
_SPLIT_START_US = {"train": 1_533_000_000_000_000, "val": 1_535_000_000_000_000}
_SCENE_SPACING_US = 100_000_000
_FRAME_INTERVAL_US = 500_000


@dataclass(frozen=True)
class SceneJob:
    """Everything needed to generate scene `index` of `split`, independently of all other scenes."""

    split: str
    index: int
    name: str  # scene name (an official nuScenes scene name of that split)
    seed: int
    num_frames: int
    image_size: tuple[int, int]
    jpeg_quality: int

    @property
    def log_name(self) -> str:
        return f"tggbc-synth-s{self.seed}-{self.split}-{self.index:04d}"

    def token(self, *parts) -> str:
        return make_token("synth", self.seed, self.split, self.index, *parts)

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, _SPLIT_IDS[self.split], self.index]))

    def timestamp(self, frame: int) -> int:
        return _SPLIT_START_US[self.split] + self.index * _SCENE_SPACING_US + frame * _FRAME_INTERVAL_US


def _chain(records: list[dict]) -> None:
    """Fill prev/next tokens of records that follow each other in time."""
    for i, record in enumerate(records):
        record["prev"] = records[i - 1]["token"] if i > 0 else ""
        record["next"] = records[i + 1]["token"] if i + 1 < len(records) else ""


def write_scene(job: SceneJob, root: Path) -> dict[str, list[dict]]:
    """Generate one scene into dataset root `root` (images and lidar files under root/samples).

    Returns:
        Records of the scene for tables log, scene, sample, sample_data, ego_pose, instance and
        sample_annotation (the caller concatenates scenes and adds the static tables).
    """
    cv2.setNumThreads(1)  # parallelism comes from worker processes; keep each one on one core
    rig = CameraRig.default(job.image_size)
    scene = sample_scene(job.rng(), job.num_frames)
    annotated = np.flatnonzero(scene.annotated)
    # Lidar intensity: brighter paint reflects more (a stand-in; nothing downstream relies on it).
    intensities = np.array([255.0 * float(np.mean(look.palette[0])) for look in scene.looks])
    channels = (*rig.camera_names, LIDAR_NAME)
    for channel in channels:
        (root / "samples" / channel).mkdir(parents=True, exist_ok=True)

    log_token, scene_token = job.token("log"), job.token("scene")
    samples, ego_poses = [], []
    sample_data: dict[str, list[dict]] = {channel: [] for channel in channels}
    annotations: dict[int, list[dict]] = {int(i): [] for i in annotated}
    for frame in range(job.num_frames):
        timestamp = job.timestamp(frame)
        sample_token = job.token("sample", frame)
        samples.append({"token": sample_token, "timestamp": timestamp, "scene_token": scene_token})
        ego_position, ego_yaw = scene.ego_pose(frame)

        render = render_frame(rig, scene, frame)
        centers_ego, yaws_ego = objects_in_ego(scene, frame)
        sweep = simulate_lidar(
            rig.lidar2ego[:3, 3], centers_ego, scene.sizes_wlh, yaws_ego, intensities, scene.annotated
        )

        for index, channel in enumerate(channels):
            is_camera = channel != LIDAR_NAME
            extension = "jpg" if is_camera else "pcd.bin"
            filename = f"samples/{channel}/{job.log_name}__{channel}__{timestamp}.{extension}"
            if is_camera:
                ok, encoded = cv2.imencode(
                    ".jpg", render.images[index][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, job.jpeg_quality]
                )
                if not ok:
                    raise RuntimeError(f"JPEG encoding failed for {filename}")
                (root / filename).write_bytes(encoded.tobytes())
            else:
                (root / filename).write_bytes(sweep.points.tobytes())
            # nuScenes has one ego pose per sample_data; all our sensors fire at the same instant.
            ego_pose_token = job.token("ego_pose", channel, frame)
            ego_poses.append(
                {
                    "token": ego_pose_token,
                    "timestamp": timestamp,
                    "rotation": rounded(yaw_to_quaternion(ego_yaw), 9),
                    "translation": rounded(ego_position),
                }
            )
            sample_data[channel].append(
                {
                    "token": job.token("sample_data", channel, frame),
                    "sample_token": sample_token,
                    "ego_pose_token": ego_pose_token,
                    "calibrated_sensor_token": calibrated_sensor_token(channel, rig),
                    "timestamp": timestamp,
                    "fileformat": "jpg" if is_camera else "pcd",
                    "is_key_frame": True,
                    "height": rig.image_height if is_camera else 0,
                    "width": rig.image_width if is_camera else 0,
                    "filename": filename,
                }
            )

        centers = scene.centers(frame)
        for i in annotated:
            visible_fraction = render.visible_pixels[i] / max(1, render.unoccluded_pixels[i])
            attribute = scene.attributes[i]
            annotations[int(i)].append(
                {
                    "token": job.token("sample_annotation", int(i), frame),
                    "sample_token": sample_token,
                    "instance_token": job.token("instance", int(i)),
                    "visibility_token": visibility_token(visible_fraction),
                    "attribute_tokens": [attribute_token(attribute)] if attribute else [],
                    "translation": rounded(centers[i]),
                    "size": rounded(scene.sizes_wlh[i], 4),
                    "rotation": rounded(yaw_to_quaternion(scene.yaws[i]), 9),
                    "num_lidar_pts": int(sweep.lidar_points[i]),
                    "num_radar_pts": int(sweep.radar_points[i]),
                }
            )

    _chain(samples)
    for records in sample_data.values():
        _chain(records)
    instances = []
    for i, records in annotations.items():
        _chain(records)
        instances.append(
            {
                "token": job.token("instance", i),
                "category_token": category_token(scene.categories[i]),
                "nbr_annotations": len(records),
                "first_annotation_token": records[0]["token"],
                "last_annotation_token": records[-1]["token"],
            }
        )
    road = scene.road
    parking = ", kerbside parking" if road.parking_width else ""
    ego_speed = float(np.linalg.norm(scene.ego_velocity_xy))
    description = f"synthetic; {road.lanes_per_direction} lane(s) per direction{parking}; ego speed {ego_speed:.1f} m/s"
    return {
        "log": [
            {
                "token": log_token,
                "logfile": job.log_name,
                "vehicle": "tggbc-synth",
                "date_captured": "2018-08-01",
                "location": "synthetic",
            }
        ],
        "scene": [
            {
                "token": scene_token,
                "log_token": log_token,
                "nbr_samples": len(samples),
                "first_sample_token": samples[0]["token"],
                "last_sample_token": samples[-1]["token"],
                "name": job.name,
                "description": description,
            }
        ],
        "sample": samples,
        "sample_data": [record for channel in channels for record in sample_data[channel]],
        "ego_pose": ego_poses,
        "instance": instances,
        "sample_annotation": [record for records in annotations.values() for record in records],
    }
