"""Small rigid-transform helpers (numpy, float64) in nuScenes conventions.

Quaternions are (w, x, y, z) as in the nuScenes tables; yaw is a rotation about +z, counter-clockwise
seen from above, zero along +x.
"""

from __future__ import annotations

import numpy as np


def yaw_to_quaternion(yaw: float) -> list[float]:
    """Quaternion (w, x, y, z) of a rotation by `yaw` radians about +z."""
    return [float(np.cos(yaw / 2.0)), 0.0, 0.0, float(np.sin(yaw / 2.0))]


def quaternion_to_matrix(quaternion) -> np.ndarray:
    """Rotation matrix [3, 3] of a unit quaternion (w, x, y, z)."""
    w, x, y, z = (float(v) for v in quaternion)
    norm = np.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quaternion(rotation: np.ndarray) -> list[float]:
    """Unit quaternion (w, x, y, z) with w >= 0 of a rotation matrix [3, 3]."""
    r = np.asarray(rotation, dtype=np.float64)
    trace = r[0, 0] + r[1, 1] + r[2, 2]
    # Pick the numerically largest component first (Shepperd's method) to avoid dividing by ~0.
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
        s = 2.0 * np.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2])
        q = [(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
    elif r[1, 1] > r[2, 2]:
        s = 2.0 * np.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2])
        q = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1])
        q = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    if q[0] < 0:
        q = -q
    return [float(v) for v in q / np.linalg.norm(q)]


def make_transform(rotation: np.ndarray, translation) -> np.ndarray:
    """Homogeneous transform [4, 4] from a rotation [3, 3] and a translation [3]."""
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = translation
    return transform


def pose_to_matrix(rotation_wxyz, translation) -> np.ndarray:
    """Homogeneous transform [4, 4] of a nuScenes record's (rotation, translation)."""
    return make_transform(quaternion_to_matrix(rotation_wxyz), translation)


def yaw_of_matrix(rotation: np.ndarray) -> float:
    """Heading (rotation about z) of a rotation matrix [3, 3] whose z axis is (nearly) vertical."""
    return float(np.arctan2(rotation[1, 0], rotation[0, 0]))


def rotate_2d(xy: np.ndarray, angle: float) -> np.ndarray:
    """Rotate points [..., 2] counter-clockwise by `angle` radians."""
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * xy[..., 0] - s * xy[..., 1], s * xy[..., 0] + c * xy[..., 1]], axis=-1)


def project_points(points: np.ndarray, projection: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project points through every camera.

    Args:
        points: [..., 3] in the frame the projections start from (ego or lidar).
        projection: [N, 4, 4] = K (padded to 4x4) @ that-frame-to-camera.
    Returns:
        uv: [N, ..., 2] image coordinates (u right, v down); meaningless where depth <= 0.
        depth: [N, ...] camera-frame depth.
    """
    points = np.asarray(points, dtype=np.float64)
    homogeneous = np.concatenate([points, np.ones(points.shape[:-1] + (1,))], axis=-1)
    projected = np.einsum("nij,...j->n...i", np.asarray(projection, dtype=np.float64), homogeneous)
    depth = projected[..., 2]
    uv = projected[..., :2] / np.where(np.abs(depth) < 1e-9, 1e-9, depth)[..., None]
    return uv, depth


def in_image(uv: np.ndarray, depth: np.ndarray, image_size: tuple[int, int], min_depth: float = 0.5) -> np.ndarray:
    """Where projected points (see `project_points`) land inside a (W, H) image, at least
    `min_depth` metres in front of the camera: the rule for which camera sees an object's centre."""
    width, height = image_size
    u, v = uv[..., 0], uv[..., 1]
    return (depth > min_depth) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
