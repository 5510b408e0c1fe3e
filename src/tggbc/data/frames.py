"""Read a generated dataset's frames for training and evaluation, straight from its JSON tables.

No devkit needed. Geometry follows PETR: lidar2img = K (4x4) @ lidar2cam, where lidar2cam chains
lidar -> ego (lidar sweep time) -> global -> ego (camera time) -> camera. Ground-truth boxes are given
in the LIDAR_TOP frame, with velocities computed exactly as the nuScenes devkit does
(NuScenes.box_velocity: centred difference of neighbouring annotations) and rotated into that frame,
so training targets match what the detection eval compares against.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tggbc.data.classes import CATEGORY_TO_CLASS, DETECTION_CLASSES
from tggbc.data.rig import CAMERA_NAMES, LIDAR_NAME
from tggbc.data.splits import SPLIT_NAMES, read_meta, split_scenes
from tggbc.data.transforms import pose_to_matrix, quaternion_to_matrix, yaw_of_matrix

_MAX_VELOCITY_TIME_DIFF_S = 1.5  # as NuScenes.box_velocity


@dataclass
class Frame:
    """One keyframe (sample) of six cameras. N = number of GT boxes. Float arrays are float32, except
    ego2global (float64: global coordinates reach hundreds of metres).

    Attributes:
        sample_token, scene_name, timestamp: identify the sample (timestamp in microseconds).
        camera_names: the six channels, in the order of all per-camera arrays.
        image_paths: six absolute image paths.
        images: [6, H, W, 3] uint8 RGB, or None if not loaded (see `read_images`).
        intrinsics: [6, 3, 3].
        cam2ego: [6, 4, 4] camera-to-ego.
        lidar2ego: [4, 4].
        ego2global: [4, 4] ego pose at the lidar timestamp.
        lidar2cam: [6, 4, 4].
        lidar2img: [6, 4, 4] = K (padded to 4x4) @ lidar2cam.
        gt_boxes: [N, 9] in the lidar frame: centre x, y, z; size w, l, h; yaw; velocity vx, vy.
        gt_labels: [N] int64 index into DETECTION_CLASSES.
        gt_num_lidar_pts, gt_num_radar_pts: [N] int64.
        gt_valid: [N] bool, lidar + radar points > 0 (the eval ignores other GT boxes).
        gt_attribute_names: N nuScenes attribute names ('' for classes without attributes).
        gt_annotation_tokens: N sample_annotation tokens.
        gt_visibility: [N] int64 nuScenes visibility level, 1..4: at most 40%, 40-60%, 60-80% and
            80-100% of the box visible in the images.
    """

    sample_token: str
    scene_name: str
    timestamp: int
    camera_names: tuple[str, ...]
    image_paths: list[str]
    images: np.ndarray | None
    intrinsics: np.ndarray
    cam2ego: np.ndarray
    lidar2ego: np.ndarray
    ego2global: np.ndarray
    lidar2cam: np.ndarray
    lidar2img: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_num_lidar_pts: np.ndarray
    gt_num_radar_pts: np.ndarray
    gt_valid: np.ndarray
    gt_attribute_names: list[str]
    gt_annotation_tokens: list[str]
    gt_visibility: np.ndarray

    def read_images(self) -> np.ndarray:
        """Read the six images from disk: [6, H, W, 3] uint8 RGB (also stored in `images`).

        A missing, truncated or undecodable image, or one of another size than the first, is an
        error naming the file (a truncated JPEG would otherwise decode as grey, with a warning only).
        """
        images = [read_jpeg(path) for path in self.image_paths]
        for path, image in zip(self.image_paths, images, strict=True):
            if image.shape != images[0].shape:
                raise ValueError(f"image {path} is {image.shape[1]}x{image.shape[0]}, the frame's others "
                                 f"{images[0].shape[1]}x{images[0].shape[0]}")  # fmt: skip
        self.images = np.stack(images)
        return self.images


def read_jpeg(path: str) -> np.ndarray:
    """One JPEG as [H, W, 3] uint8 RGB, or an error naming the file if it is missing or damaged."""
    import cv2

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} is missing") from None
    # A JPEG opens with SOI (FF D8) and closes with EOI (FF D9): a cut file lacks the end.
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise ValueError(f"image {path} is damaged: not a complete JPEG ({len(data)} bytes)")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"image {path} is damaged: it does not decode")
    return np.ascontiguousarray(bgr[..., ::-1])


def _load_table(table_dir: Path, name: str) -> list[dict]:
    from tggbc.files import read_json

    return read_json(table_dir / f"{name}.json", what="nuScenes table")


def _velocity(annotation: dict, annotations: dict, sample_time: dict) -> np.ndarray:
    """Global velocity [3] of an annotation, as NuScenes.box_velocity computes it (nan if unknown)."""
    has_prev, has_next = annotation["prev"] != "", annotation["next"] != ""
    if not has_prev and not has_next:
        return np.full(3, np.nan)
    first = annotations[annotation["prev"]] if has_prev else annotation
    last = annotations[annotation["next"]] if has_next else annotation
    time_diff = 1e-6 * (sample_time[last["sample_token"]] - sample_time[first["sample_token"]])
    max_time_diff = _MAX_VELOCITY_TIME_DIFF_S * (2 if has_prev and has_next else 1)
    if time_diff > max_time_diff or time_diff <= 0:
        return np.full(3, np.nan)
    return (np.array(last["translation"]) - np.array(first["translation"])) / time_diff


@dataclass
class _Index:
    """The tables of one dataset, keyed for the lookups a frame needs."""

    scenes: dict[str, dict]  # scene name -> record
    samples: dict[str, dict]
    sample_time: dict[str, int]
    calibrated: dict[str, dict]
    ego_poses: dict[str, dict]
    attributes: dict[str, str]  # token -> name
    instance_category: dict[str, str]  # instance token -> category name
    data_of_sample: dict[str, dict[str, dict]]  # sample token -> channel -> key-frame sample_data
    annotations: dict[str, dict]
    annotations_of_sample: dict[str, list[dict]]

    @classmethod
    def load(cls, table_dir: Path) -> _Index:
        samples = {record["token"]: record for record in _load_table(table_dir, "sample")}
        calibrated = {record["token"]: record for record in _load_table(table_dir, "calibrated_sensor")}
        channel_of_sensor = {record["token"]: record["channel"] for record in _load_table(table_dir, "sensor")}
        categories = {record["token"]: record["name"] for record in _load_table(table_dir, "category")}
        data_of_sample: dict[str, dict[str, dict]] = defaultdict(dict)
        for record in _load_table(table_dir, "sample_data"):
            if record["is_key_frame"]:
                channel = channel_of_sensor[calibrated[record["calibrated_sensor_token"]]["sensor_token"]]
                data_of_sample[record["sample_token"]][channel] = record
        annotations = {record["token"]: record for record in _load_table(table_dir, "sample_annotation")}
        annotations_of_sample: dict[str, list[dict]] = defaultdict(list)
        for record in annotations.values():
            annotations_of_sample[record["sample_token"]].append(record)
        return cls(
            scenes={record["name"]: record for record in _load_table(table_dir, "scene")},
            samples=samples,
            sample_time={token: record["timestamp"] for token, record in samples.items()},
            calibrated=calibrated,
            ego_poses={record["token"]: record for record in _load_table(table_dir, "ego_pose")},
            attributes={record["token"]: record["name"] for record in _load_table(table_dir, "attribute")},
            instance_category={r["token"]: categories[r["category_token"]] for r in _load_table(table_dir, "instance")},
            data_of_sample=data_of_sample,
            annotations=annotations,
            annotations_of_sample=annotations_of_sample,
        )


def list_frames(dataroot: str | Path, split: str) -> list[Frame]:
    """All frames of `split` ('train' or 'val') in scene then time order, without images.

    Args:
        dataroot: a directory written by `generate`.
        split: 'train' or 'val'.
    Returns:
        Frames with `images=None`; call `frame.read_images()` to load them.
    """
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    root = Path(dataroot).resolve()
    index = _Index.load(root / read_meta(root)["version"])
    frames = []
    for scene_name in split_scenes(root)[split]:
        sample_token = index.scenes[scene_name]["first_sample_token"]
        while sample_token:
            sample = index.samples[sample_token]
            frames.append(_build_frame(root, scene_name, sample, index))
            sample_token = sample["next"]
    return frames


def _build_frame(root: Path, scene_name: str, sample: dict, index: _Index) -> Frame:
    data = index.data_of_sample[sample["token"]]
    lidar_data = data[LIDAR_NAME]
    lidar_calibration = index.calibrated[lidar_data["calibrated_sensor_token"]]
    lidar2ego = pose_to_matrix(lidar_calibration["rotation"], lidar_calibration["translation"])
    lidar_pose = index.ego_poses[lidar_data["ego_pose_token"]]
    ego2global = pose_to_matrix(lidar_pose["rotation"], lidar_pose["translation"])
    lidar2global = ego2global @ lidar2ego
    global2lidar = np.linalg.inv(lidar2global)

    intrinsics, cam2ego, lidar2cam, lidar2img, image_paths = [], [], [], [], []
    for channel in CAMERA_NAMES:
        record = data[channel]
        calibration = index.calibrated[record["calibrated_sensor_token"]]
        camera_pose = index.ego_poses[record["ego_pose_token"]]
        cam2ego_matrix = pose_to_matrix(calibration["rotation"], calibration["translation"])
        cam2global = pose_to_matrix(camera_pose["rotation"], camera_pose["translation"]) @ cam2ego_matrix
        lidar2cam_matrix = np.linalg.inv(cam2global) @ lidar2global
        intrinsic = np.array(calibration["camera_intrinsic"])
        padded = np.eye(4)
        padded[:3, :3] = intrinsic
        intrinsics.append(intrinsic)
        cam2ego.append(cam2ego_matrix)
        lidar2cam.append(lidar2cam_matrix)
        lidar2img.append(padded @ lidar2cam_matrix)
        image_paths.append(str(root / record["filename"]))

    boxes, labels, lidar_pts, radar_pts, attribute_names, tokens, visibility = [], [], [], [], [], [], []
    for annotation in index.annotations_of_sample[sample["token"]]:
        detection_class = CATEGORY_TO_CLASS.get(index.instance_category[annotation["instance_token"]])
        if detection_class is None:
            continue
        center = global2lidar[:3, :3] @ np.array(annotation["translation"]) + global2lidar[:3, 3]
        yaw = yaw_of_matrix(global2lidar[:3, :3] @ quaternion_to_matrix(annotation["rotation"]))
        velocity = _velocity(annotation, index.annotations, index.sample_time)
        velocity = np.nan_to_num(global2lidar[:3, :3] @ velocity, nan=0.0)  # a free vector: rotate only
        width, length, height = annotation["size"]
        boxes.append([*center, width, length, height, yaw, velocity[0], velocity[1]])
        labels.append(DETECTION_CLASSES.index(detection_class))
        lidar_pts.append(annotation["num_lidar_pts"])
        radar_pts.append(annotation["num_radar_pts"])
        attribute_tokens = annotation["attribute_tokens"]
        attribute_names.append(index.attributes[attribute_tokens[0]] if attribute_tokens else "")
        tokens.append(annotation["token"])
        visibility.append(int(annotation["visibility_token"]))

    lidar_pts_array = np.array(lidar_pts, dtype=np.int64)
    radar_pts_array = np.array(radar_pts, dtype=np.int64)
    return Frame(
        sample_token=sample["token"],
        scene_name=scene_name,
        timestamp=int(sample["timestamp"]),
        camera_names=CAMERA_NAMES,
        image_paths=image_paths,
        images=None,
        intrinsics=np.stack(intrinsics).astype(np.float32),
        cam2ego=np.stack(cam2ego).astype(np.float32),
        lidar2ego=lidar2ego.astype(np.float32),
        ego2global=ego2global,
        lidar2cam=np.stack(lidar2cam).astype(np.float32),
        lidar2img=np.stack(lidar2img).astype(np.float32),
        gt_boxes=np.array(boxes, dtype=np.float32).reshape(-1, 9),
        gt_labels=np.array(labels, dtype=np.int64),
        gt_num_lidar_pts=lidar_pts_array,
        gt_num_radar_pts=radar_pts_array,
        gt_valid=(lidar_pts_array + radar_pts_array) > 0,
        gt_attribute_names=attribute_names,
        gt_annotation_tokens=tokens,
        gt_visibility=np.array(visibility, dtype=np.int64),
    )


def load_frames(dataroot: str | Path, split: str, load_images: bool = True) -> Iterator[Frame]:
    """Iterate over the frames of `split` in scene then time order, reading images on the fly.

    Args:
        dataroot: a directory written by `generate`.
        split: 'train' or 'val'.
        load_images: read the six images of each frame into `frame.images` ([6, H, W, 3] uint8 RGB).
    """
    for frame in list_frames(dataroot, split):
        if load_images:
            frame.read_images()
        yield frame
