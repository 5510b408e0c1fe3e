"""A simulated 32-beam spinning lidar (HDL-32E-like, as on the nuScenes car) for point counts.

The nuScenes detection eval drops ground-truth boxes with no lidar or radar points
(filter_eval_boxes), so `num_lidar_pts` must be physically sensible: boxes hidden behind others, far
away or small get few or zero returns. We cast one ray per (beam, azimuth step) against the ground and
all boxes (exact slab test, nearest hit wins) and count returns per box. Radar points are approximated
by the returns of the near-horizontal beams at half the azimuth resolution within radar range.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tggbc.data.raycast import box_corners, intersect_box

LIDAR_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)  # HDL-32E beam elevations
LIDAR_AZIMUTH_STEPS = 1080  # returns per beam per revolution (nuScenes: ~1090 at 20 Hz)
LIDAR_MAX_RANGE_M = 70.0
RADAR_MAX_ELEVATION_DEG = 1.5
RADAR_MAX_RANGE_M = 70.0
# Point files keep every 4th azimuth step: near vehicles return thousands of points, and a full cloud
# would cost ~270 KB per frame. Counts (num_lidar_pts) always use the full-resolution sweep.
POINT_FILE_AZIMUTH_STRIDE = 4


@dataclass
class LidarSweep:
    """Returns of one sweep.

    Attributes:
        lidar_points: [N] number of returns on each box.
        radar_points: [N] number of (approximate) radar returns on each box.
        points: [P, 5] float32 returns on annotated boxes, decimated in azimuth by POINT_FILE_AZIMUTH_STRIDE
            (ground and scenery returns are not kept, to keep files small), as nuScenes .pcd.bin rows:
            x, y, z in the lidar frame, intensity in [0, 255], beam (ring) index.
    """

    lidar_points: np.ndarray
    radar_points: np.ndarray
    points: np.ndarray


@lru_cache(maxsize=1)
def _beam_directions() -> np.ndarray:
    """Unit ray directions [3, 32 * A] in the lidar frame, beam-major (ray = beam * A + azimuth step)."""
    elevation = np.radians(LIDAR_ELEVATIONS_DEG)[:, None]
    azimuth = (np.arange(LIDAR_AZIMUTH_STEPS) * (2 * np.pi / LIDAR_AZIMUTH_STEPS))[None, :]
    directions = np.stack(
        [np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation) + 0 * azimuth]
    )
    return directions.reshape(3, -1).astype(np.float32)


def _azimuth_columns(corners_xy: np.ndarray, center_xy: np.ndarray) -> np.ndarray:
    """Azimuth step indices whose rays can reach a box, from its corners relative to the lidar [8, 2]."""
    step = 2 * np.pi / LIDAR_AZIMUTH_STEPS
    center_angle = np.arctan2(center_xy[1], center_xy[0])
    delta = np.arctan2(corners_xy[:, 1], corners_xy[:, 0]) - center_angle
    delta = np.mod(delta + np.pi, 2 * np.pi) - np.pi  # wrap so a box straddling +-180 deg stays contiguous
    first = int(np.floor((center_angle + delta.min()) / step)) - 1
    last = int(np.ceil((center_angle + delta.max()) / step)) + 1
    if last - first >= LIDAR_AZIMUTH_STEPS:
        return np.arange(LIDAR_AZIMUTH_STEPS)
    return np.mod(np.arange(first, last + 1), LIDAR_AZIMUTH_STEPS)


def simulate_lidar(
    lidar_origin: np.ndarray,
    centers: np.ndarray,
    sizes_wlh: np.ndarray,
    yaws: np.ndarray,
    intensities: np.ndarray,
    annotated: np.ndarray,
) -> LidarSweep:
    """One lidar sweep over a frame's boxes.

    Args:
        lidar_origin: [3] lidar position in the frame of the boxes (ego frame, lidar axes = ego axes).
        centers: [N, 3] box centres; sizes_wlh: [N, 3]; yaws: [N] headings (same frame).
        intensities: [N] return intensity of each box in [0, 255].
        annotated: [N] bool, boxes whose returns are kept in `points` (the others only occlude).
    Returns:
        LidarSweep with per-box counts and the returns on boxes in the lidar frame.
    """
    directions = _beam_directions()
    num_rays = directions.shape[1]
    num_objects = len(centers)
    with np.errstate(divide="ignore"):
        t_ground = np.where(directions[2] < 0, -lidar_origin[2] / directions[2], np.inf)
    best_t = np.where(t_ground <= LIDAR_MAX_RANGE_M, t_ground, np.inf).astype(np.float32)
    best_id = np.full(num_rays, -1, dtype=np.int64)
    beams = np.arange(len(LIDAR_ELEVATIONS_DEG))[:, None] * LIDAR_AZIMUTH_STEPS

    for index in range(num_objects):
        relative = centers[index] - lidar_origin
        if np.hypot(relative[0], relative[1]) > LIDAR_MAX_RANGE_M + np.hypot(*sizes_wlh[index][:2]):
            continue
        corners = box_corners(relative, sizes_wlh[index], yaws[index])
        rays = (beams + _azimuth_columns(corners[:, :2], relative[:2])[None, :]).ravel()
        half = sizes_wlh[index][[1, 0, 2]] / 2.0
        hits = intersect_box(lidar_origin, directions[:, rays], centers[index], half, yaws[index])
        closer = hits.hit & (hits.t < best_t[rays]) & (hits.t <= LIDAR_MAX_RANGE_M)
        best_t[rays[closer]] = hits.t[closer]
        best_id[rays[closer]] = index

    returned = np.flatnonzero(best_id >= 0)
    lidar_points = np.bincount(best_id[returned], minlength=num_objects)
    beam_of_ray = np.arange(num_rays) // LIDAR_AZIMUTH_STEPS
    azimuth_of_ray = np.arange(num_rays) % LIDAR_AZIMUTH_STEPS
    radar_like = (
        (np.abs(LIDAR_ELEVATIONS_DEG[beam_of_ray]) <= RADAR_MAX_ELEVATION_DEG)
        & (azimuth_of_ray % 2 == 0)
        & (best_t <= RADAR_MAX_RANGE_M)
        & (best_id >= 0)
    )
    radar_points = np.bincount(best_id[radar_like], minlength=num_objects)

    returned = returned[annotated[best_id[returned]] & (azimuth_of_ray[returned] % POINT_FILE_AZIMUTH_STRIDE == 0)]
    xyz = directions[:, returned].T * best_t[returned, None]  # relative to the lidar, lidar axes = ego axes
    points = np.concatenate(
        [xyz, intensities[best_id[returned], None], beam_of_ray[returned, None].astype(np.float32)], axis=1
    ).astype(np.float32)
    return LidarSweep(lidar_points.astype(np.int64), radar_points.astype(np.int64), points)
