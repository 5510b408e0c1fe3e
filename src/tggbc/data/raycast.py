"""Exact ray vs upright oriented box intersection (slab method), vectorised over rays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BoxHits:
    """Result of casting n rays at one box. Arrays have one entry per ray.

    Attributes:
        hit: [n] bool, the ray enters the box in front of its origin.
        t: [n] ray parameter of the entry point (inf where no hit).
    The entered surface is computed on demand by `entry_surface`, only for the rays that need shading.
    """

    hit: np.ndarray
    t: np.ndarray
    _local_origin: np.ndarray  # [3]
    _local_dir: tuple[np.ndarray, np.ndarray, np.ndarray]  # 3 x [n]
    _t_enter_axes: tuple[np.ndarray, np.ndarray, np.ndarray]  # 3 x [n] slab entry t per axis

    def entry_surface(self, select: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Entered face and entry point of the selected (hitting) rays.

        Args:
            select: [n] bool mask or [m] indices of rays that hit.
        Returns:
            face_axis: [m] int, local axis of the entered face: 0 = front/back (x), 1 = sides (y), 2 = top/bottom.
            face_sign: [m] +1 or -1, which face on that axis (+x is the front, +z the top).
            local_point: [m, 3] entry point in the box frame (x along the heading, z up, origin at the centre).
        """
        t_axes = np.stack([axis[select] for axis in self._t_enter_axes], axis=1)
        directions = np.stack([axis[select] for axis in self._local_dir], axis=1)
        face_axis = t_axes.argmax(axis=1)
        entered = np.take_along_axis(directions, face_axis[:, None], axis=1)[:, 0]
        face_sign = np.where(entered > 0, -1, 1).astype(np.int8)  # the face normal opposes the ray
        local_point = self._local_origin[None, :] + self.t[select][:, None] * directions
        return face_axis, face_sign, local_point


def intersect_box(
    origin: np.ndarray, directions: np.ndarray, center: np.ndarray, half_extent: np.ndarray, yaw: float
) -> BoxHits:
    """Cast rays from one origin at an upright box rotated by `yaw` about z (slab method).

    Args:
        origin: [3] common ray origin.
        directions: [3, n] ray directions, component-major so each component is contiguous (they need not
            be unit length; t is in units of each direction).
        center: [3] box centre, same frame as the rays.
        half_extent: [3] half length (x), half width (y), half height (z) of the box.
        yaw: box heading in that frame.
    Returns:
        BoxHits for the n rays.
    """
    dtype = directions.dtype
    c, s = np.cos(yaw), np.sin(yaw)
    offset = np.asarray(origin, dtype=np.float64) - np.asarray(center, dtype=np.float64)
    # Rotate the rays into the box frame (transpose of the box rotation).
    local_origin = np.array([c * offset[0] + s * offset[1], -s * offset[0] + c * offset[1], offset[2]], dtype=dtype)
    dx, dy = directions[0], directions[1]
    local_x = (c * dx + s * dy).astype(dtype, copy=False)
    local_y = (c * dy - s * dx).astype(dtype, copy=False)
    local_dir = (local_x, local_y, directions[2])
    t_enter_axes, t_exit = [], None
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(3):
            inverse = 1.0 / local_dir[axis]
            t_low = (-half_extent[axis] - local_origin[axis]) * inverse
            t_high = (half_extent[axis] - local_origin[axis]) * inverse
            t_enter_axes.append(np.minimum(t_low, t_high))
            exit_axis = np.maximum(t_low, t_high)
            t_exit = exit_axis if t_exit is None else np.minimum(t_exit, exit_axis)
    t_enter = np.maximum(np.maximum(t_enter_axes[0], t_enter_axes[1]), t_enter_axes[2])
    # A ray starting inside the box (t_enter <= 0) does not count: cameras and the lidar sit outside all boxes.
    hit = (t_enter <= t_exit) & (t_enter > 0)
    t = np.where(hit, t_enter, np.inf).astype(dtype, copy=False)
    return BoxHits(hit, t, local_origin, local_dir, tuple(t_enter_axes))


def box_corners(center: np.ndarray, size_wlh: np.ndarray, yaw: float) -> np.ndarray:
    """Eight corners [8, 3] of an upright box with nuScenes size (w, l, h)."""
    width, length, height = size_wlh
    x = np.array([1, 1, 1, 1, -1, -1, -1, -1]) * length / 2
    y = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * width / 2
    z = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * height / 2
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([c * x - s * y, s * x + c * y, z], axis=1) + np.asarray(center)[None, :]
