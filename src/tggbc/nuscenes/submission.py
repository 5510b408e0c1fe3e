"""Boxes in the official nuScenes detection submission format (global frame).

{"meta": ..., "results": {sample_token: [box, ...], ...}}

`submission_boxes`: the small detector's boxes (its own (w, l, h) and attribute convention).
`global_detection_boxes` / `submission_entries`: the published PETR-family detectors' boxes as
mmdet3d 1.0 (the StreamPETR repository's) writes them, with the devkit's Box and pyquaternion,
and ORIGINAL_SUBMISSION_META, the configs' input_modality.
"""

from __future__ import annotations

import numpy as np

from ..data.classes import DETECTION_CLASSES
from ..data.transforms import matrix_to_quaternion

# The submission header of a camera-only method.
SUBMISSION_META = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}

# Attribute per class by speed (the convention of the PETR-family heads): (moving, still).
_ATTRIBUTES = {
    "car": ("vehicle.moving", "vehicle.parked"),
    "truck": ("vehicle.moving", "vehicle.parked"),
    "bus": ("vehicle.moving", "vehicle.parked"),
    "trailer": ("vehicle.moving", "vehicle.parked"),
    "construction_vehicle": ("vehicle.moving", "vehicle.parked"),
    "pedestrian": ("pedestrian.moving", "pedestrian.standing"),
    "motorcycle": ("cycle.with_rider", "cycle.without_rider"),
    "bicycle": ("cycle.with_rider", "cycle.without_rider"),
}


def attribute_name(label: str, speed: float) -> str:
    """The attribute the PETR-family heads report: moving above 0.2 m/s; '' for cones and barriers."""
    if label not in _ATTRIBUTES:
        return ""
    moving, still = _ATTRIBUTES[label]
    return moving if speed > 0.2 else still


def submission_boxes(
    sample_token: str,
    center: np.ndarray,
    size: np.ndarray,
    yaw: np.ndarray,
    velocity: np.ndarray,
    score: np.ndarray,
    label: np.ndarray,
    lidar2global: np.ndarray,
) -> list[dict]:
    """Boxes of one sample in the lidar frame -> submission boxes in the global frame.

    Args:
        center: [M, 3]; size: [M, 3] (w, l, h); yaw: [M]; velocity: [M, 2]; score: [M];
            label: [M] indices into DETECTION_CLASSES; all in the LIDAR_TOP frame.
        lidar2global: [4, 4] float64 (ego2global @ lidar2ego of the sample's lidar sweep).
    """
    rotation, translation = lidar2global[:3, :3], lidar2global[:3, 3]
    center = np.asarray(center, dtype=np.float64) @ rotation.T + translation
    velocity = np.pad(np.asarray(velocity, dtype=np.float64), ((0, 0), (0, 1))) @ rotation.T
    boxes = []
    for i in range(len(score)):
        c, s = np.cos(float(yaw[i])), np.sin(float(yaw[i]))
        box_rotation = rotation @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        name = DETECTION_CLASSES[int(label[i])]
        boxes.append(
            {
                "sample_token": sample_token,
                "translation": center[i].tolist(),
                "size": np.asarray(size[i], dtype=np.float64).tolist(),
                "rotation": matrix_to_quaternion(box_rotation),
                "velocity": velocity[i, :2].tolist(),
                "detection_name": name,
                "detection_score": float(score[i]),
                "attribute_name": attribute_name(name, float(np.linalg.norm(velocity[i, :2]))),
            }
        )
    return boxes


# ------------------------------------------------------------------ the published detectors

# The configs' input_modality, which mmdet3d's NuScenesDataset writes as the submission's meta.
ORIGINAL_SUBMISSION_META = {
    "use_lidar": False,
    "use_camera": True,
    "use_radar": False,
    "use_map": False,
    "use_external": True,
}
# mmdet3d NuScenesDataset.DefaultAttribute: the attribute of a class unless its speed decides.
_DEFAULT_ATTRIBUTE = {
    "car": "vehicle.parked",
    "pedestrian": "pedestrian.moving",
    "trailer": "vehicle.parked",
    "truck": "vehicle.parked",
    "bus": "vehicle.moving",
    "motorcycle": "cycle.without_rider",
    "construction_vehicle": "vehicle.parked",
    "bicycle": "cycle.without_rider",
    "barrier": "",
    "traffic_cone": "",
}
# Every attribute those rules can write ('' for cones and barriers), indexed in stored results.
ATTRIBUTE_NAMES = (
    "",
    "cycle.with_rider",
    "cycle.without_rider",
    "pedestrian.moving",
    "pedestrian.standing",
    "vehicle.moving",
    "vehicle.parked",
    "vehicle.stopped",
)


def original_attribute(name: str, velocity_xy) -> str:
    """The attribute mmdet3d's NuScenesDataset._format_bbox writes for class `name` at global
    velocity (vx, vy): above 0.2 m/s vehicles move and cycles have a rider; below it pedestrians
    stand and buses have stopped; otherwise the class's default."""
    speed = float(np.sqrt(float(velocity_xy[0]) ** 2 + float(velocity_xy[1]) ** 2))
    if speed > 0.2:
        if name in ("car", "construction_vehicle", "bus", "truck", "trailer"):
            return "vehicle.moving"
        if name in ("bicycle", "motorcycle"):
            return "cycle.with_rider"
    else:
        if name == "pedestrian":
            return "pedestrian.standing"
        if name == "bus":
            return "vehicle.stopped"
    return _DEFAULT_ATTRIBUTE[name]


def global_detection_boxes(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    lidar2ego_rotation,
    lidar2ego_translation,
    ego2global_rotation,
    ego2global_translation,
    class_range: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """A published detector's boxes of one sample in the global frame, as mmdet3d 1.0 writes them.

    output_to_nusc_box, then lidar_nusc_box_to_global, with the devkit's own Box and pyquaternion:
    gravity centre = bottom z + h / 2 (float32), nuScenes size (w, l, h) = dims[:, [1, 0, 2]], yaw
    about +z, velocity (vx, vy, 0); rotated and moved into the ego frame, dropped if its distance
    from the ego exceeds its class range, then rotated and moved into the global frame.

    Args:
        boxes: [M, 9] float32 `Detections.boxes` (x, y, bottom z, dims, yaw, vx, vy; lidar frame).
        scores: [M] float32; labels: [M] int class indices into DETECTION_CLASSES.
        lidar2ego_*, ego2global_*: the sample's lidar calibration and ego pose as in the tables
            (rotations as (w, x, y, z) quaternions).
        class_range: metres per class (default: the detection_cvpr_2019 config's).
    Returns:
        arrays of the K kept boxes, in input order: translation [K, 3], size [K, 3], rotation
        [K, 4] (w, x, y, z), velocity [K, 2] (all float64), score [K] float64, label [K] int64,
        attribute [K] int64 into ATTRIBUTE_NAMES.
    """
    from nuscenes.utils.data_classes import Box
    from pyquaternion import Quaternion

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 9)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"boxes {boxes.shape}, scores {scores.shape} and labels {labels.shape} must have one row per box"
        )
    if class_range is None:
        from nuscenes.eval.common.config import config_factory

        class_range = config_factory("detection_cvpr_2019").class_range
    centre = boxes[:, :3].copy()
    centre[:, 2] = boxes[:, 2] + boxes[:, 5] * np.float32(0.5)  # LiDARInstance3DBoxes.gravity_center
    wlh = boxes[:, [4, 3, 5]]
    l2e_q, e2g_q = Quaternion(list(lidar2ego_rotation)), Quaternion(list(ego2global_rotation))
    l2e_t, e2g_t = np.array(lidar2ego_translation), np.array(ego2global_translation)
    out = {k: [] for k in ("translation", "size", "rotation", "velocity", "score", "label", "attribute")}
    for i in range(len(boxes)):
        name = DETECTION_CLASSES[int(labels[i])]
        box = Box(
            centre[i],
            wlh[i],
            Quaternion(axis=[0, 0, 1], radians=boxes[i, 6]),
            label=int(labels[i]),
            score=scores[i],
            velocity=(float(boxes[i, 7]), float(boxes[i, 8]), 0.0),
        )
        box.rotate(l2e_q)
        box.translate(l2e_t)
        if np.linalg.norm(box.center[:2], 2) > class_range[name]:
            continue
        box.rotate(e2g_q)
        box.translate(e2g_t)
        out["translation"].append(box.center)
        out["size"].append(box.wlh)
        out["rotation"].append(box.orientation.elements)
        out["velocity"].append(box.velocity[:2])
        out["score"].append(box.score)
        out["label"].append(box.label)
        out["attribute"].append(ATTRIBUTE_NAMES.index(original_attribute(name, box.velocity)))
    shapes = {"translation": 3, "size": 3, "rotation": 4, "velocity": 2}
    return {
        key: np.array(values, dtype=np.int64 if key in ("label", "attribute") else np.float64).reshape(
            -1, *([shapes[key]] if key in shapes else [])
        )
        for key, values in out.items()
    }


def submission_entries(sample_token: str, boxes: dict[str, np.ndarray]) -> list[dict]:
    """`global_detection_boxes` arrays -> the submission's box dicts (as _format_bbox writes them)."""
    entries = []
    for i in range(len(boxes["score"])):
        name = DETECTION_CLASSES[int(boxes["label"][i])]
        entries.append(
            {
                "sample_token": sample_token,
                "translation": boxes["translation"][i].tolist(),
                "size": boxes["size"][i].tolist(),
                "rotation": boxes["rotation"][i].tolist(),
                "velocity": boxes["velocity"][i].tolist(),
                "detection_name": name,
                "detection_score": float(boxes["score"][i]),
                "attribute_name": ATTRIBUTE_NAMES[int(boxes["attribute"][i])],
            }
        )
    return entries
