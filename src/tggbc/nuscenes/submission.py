"""Boxes in the official nuScenes detection submission format (global frame).

{"meta": SUBMISSION_META, "results": {sample_token: [box, ...], ...}}
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
