"""Ray-cast rendering of the six camera images of one scene frame.

Per camera, every pixel's ray is intersected with the ground plane (z = 0) and, exactly, with every box
whose projected corners touch the image (slab test); the nearest hit wins (a depth buffer over the ray
parameter t, which equals camera depth). Work is vectorised over pixels with numpy and restricted to
each box's projected bounding rectangle, so cost scales with the image area objects cover.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from tggbc.data.raycast import box_corners, intersect_box
from tggbc.data.rig import CameraRig
from tggbc.data.scene import Scene
from tggbc.data.shading import box_colour, ground_colour, lit_colour, sky_colour
from tggbc.data.transforms import rotate_2d

_NEAR_M = 0.05  # near clipping plane (m) for the projected bounds of boxes
_GROUND_MAX_M = 400.0  # ground beyond this distance is drawn as sky (the horizon)
_BOX_FOG_M = 300.0
_GROUND_FOG_M = 140.0  # distance at which the ground is ~63% haze


@dataclass
class FrameRender:
    """Rendered frame.

    Attributes:
        images: [6, H, W, 3] uint8 RGB.
        instance_ids: [6, H, W] int32 index of the scene object seen at each pixel, -1 for ground/sky.
        visible_pixels: [N] pixels (summed over cameras) where each object is the nearest surface.
        unoccluded_pixels: [N] pixels whose rays hit each object at all, ignoring other objects.
    """

    images: np.ndarray
    instance_ids: np.ndarray
    visible_pixels: np.ndarray
    unoccluded_pixels: np.ndarray


def objects_in_ego(scene: Scene, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """Box centres [N, 3] and yaws [N] of all scene objects in the ego frame at `frame`."""
    ego_position, ego_yaw = scene.ego_pose(frame)
    centers = scene.centers(frame)
    xy = rotate_2d(centers[:, :2] - ego_position[None, :2], -ego_yaw)
    return np.concatenate([xy, centers[:, 2:3]], axis=1), scene.yaws - ego_yaw


# The 12 edges of a box as index pairs into the corner order of raycast.box_corners.
_BOX_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6], [3, 7]])


def _pixel_rectangle(corners_ego: np.ndarray, ego2img: np.ndarray, width: int, height: int):
    """Bounding pixel rectangle (v0, v1, u0, u1) of a box given by its corners [8, 3], or None if off-image.

    A box crossing the camera's near plane is clipped first: the visible part's outline is spanned by the
    corners in front of the plane plus the points where edges cross it, which keeps rectangles tight
    for boxes right beside the car.
    """
    projected = np.concatenate([corners_ego, np.ones((8, 1))], axis=1) @ ego2img.T  # (8, 4): u*z, v*z, z, 1
    depth = projected[:, 2]
    in_front = depth >= _NEAR_M
    if not in_front.any():
        return None
    points = projected[in_front, :3]
    if not in_front.all():
        start, end = projected[_BOX_EDGES[:, 0], :3], projected[_BOX_EDGES[:, 1], :3]
        crossing = in_front[_BOX_EDGES[:, 0]] != in_front[_BOX_EDGES[:, 1]]
        fraction = (_NEAR_M - start[crossing, 2]) / (end[crossing, 2] - start[crossing, 2])
        # Projection is linear in homogeneous image coordinates, so interpolating (u*z, v*z, z) is exact.
        points = np.concatenate([points, start[crossing] + fraction[:, None] * (end[crossing] - start[crossing])])
    u = points[:, 0] / points[:, 2]
    v = points[:, 1] / points[:, 2]
    u0, u1 = max(0, int(np.floor(u.min())) - 1), min(width, int(np.ceil(u.max())) + 2)
    v0, v1 = max(0, int(np.floor(v.min())) - 1), min(height, int(np.ceil(v.max())) + 2)
    if u0 >= u1 or v0 >= v1:
        return None
    return v0, v1, u0, u1


@dataclass(frozen=True)
class _BackgroundGeometry:
    """Where one camera's pixel rays meet the ground or the sky. It depends only on the rig (the ground
    is the ego's z = 0 plane), so it is computed once per rig and reused for every frame."""

    depth: np.ndarray  # [H*W] float32 ray parameter t of the ground hit, inf for sky pixels
    ground_index: np.ndarray  # [m] flat pixel indices that see the ground
    ground_xy: np.ndarray  # [m, 2] float64 ground points in the ego frame
    ground_fog: np.ndarray  # [m] float32 haze weight
    sky_index: np.ndarray  # [k] flat pixel indices that see the sky
    sky_blend: np.ndarray  # [k] float32 horizon (0) to zenith (1) blend


@functools.lru_cache(maxsize=4)
def _background_geometry(rig: CameraRig) -> tuple[_BackgroundGeometry, ...]:
    geometries = []
    for camera in range(rig.num_cameras):
        directions = rig.ray_directions[camera].reshape(-1, 3).astype(np.float64)
        origin = rig.camera_origins[camera]
        dz = directions[:, 2]
        with np.errstate(divide="ignore"):
            t_ground = np.where(dz < -1e-9, -origin[2] / dz, np.inf)
        norms = np.linalg.norm(directions, axis=1)
        distance = t_ground * norms
        ground = distance < _GROUND_MAX_M
        ground_index = np.flatnonzero(ground)
        sky_index = np.flatnonzero(~ground)
        elevation = directions[sky_index, 2] / norms[sky_index]
        geometries.append(
            _BackgroundGeometry(
                depth=np.where(ground, t_ground, np.inf).astype(np.float32),
                ground_index=ground_index,
                ground_xy=origin[None, :2] + t_ground[ground_index, None] * directions[ground_index, :2],
                ground_fog=(1.0 - np.exp(-distance[ground_index] / _GROUND_FOG_M)).astype(np.float32),
                sky_index=sky_index,
                sky_blend=(np.clip(elevation * 2.5, 0.0, 1.0) ** 0.7).astype(np.float32),
            )
        )
    return tuple(geometries)


def _render_background(rig: CameraRig, camera: int, scene: Scene, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground and sky for one camera: colour [H*W, 3] float32 and depth-buffer t [H*W] float32."""
    geometry = _background_geometry(rig)[camera]
    lighting, road = scene.lighting, scene.road
    colour = np.empty((len(geometry.depth), 3), dtype=np.float32)
    colour[geometry.sky_index] = sky_colour(geometry.sky_blend, lighting)
    # Ego ground points -> road coordinates (the road frame is where the markings are defined).
    ego_position, ego_yaw = scene.ego_pose(frame)
    ego_in_road = rotate_2d(ego_position[:2] - road.origin_xy, -road.yaw)
    road_sd = rotate_2d(geometry.ground_xy, ego_yaw - road.yaw) + ego_in_road[None, :]
    colour[geometry.ground_index] = ground_colour(road_sd, geometry.ground_fog, road, lighting)
    return colour, geometry.depth.copy()


def render_frame(rig: CameraRig, scene: Scene, frame: int) -> FrameRender:
    """Render the six camera images of `scene` at keyframe `frame`.

    Args:
        rig: camera calibration (ego frame).
        scene: the sampled scene (global frame).
        frame: keyframe index in [0, scene.num_frames).
    Returns:
        FrameRender with images, per-pixel object ids and per-object pixel counts.
    """
    width, height = rig.image_width, rig.image_height
    num_objects = len(scene.categories)
    centers, yaws = objects_in_ego(scene, frame)
    halves = scene.sizes_wlh[:, [1, 0, 2]] / 2.0  # (w, l, h) -> half (x=length, y=width, z=height)
    global_yaws = scene.yaws
    corners = [box_corners(centers[i], scene.sizes_wlh[i], yaws[i]) for i in range(num_objects)]
    ego2img = rig.ego2img()

    images = np.empty((rig.num_cameras, height, width, 3), dtype=np.uint8)
    instance_ids = np.full((rig.num_cameras, height * width), -1, dtype=np.int32)
    unoccluded = np.zeros(num_objects, dtype=np.int64)
    haze = scene.lighting.haze.astype(np.float32)[None, :]
    for camera in range(rig.num_cameras):
        colour, depth = _render_background(rig, camera, scene, frame)  # flat (H*W, 3), (H*W,)
        ids = instance_ids[camera]
        origin = rig.camera_origins[camera]
        directions = rig.ray_components[camera]  # (3, H, W)
        # Near boxes first, so far boxes behind them mostly fail the depth test before any shading.
        order = np.argsort(np.linalg.norm(centers - origin[None, :], axis=1))
        for index in order:
            rectangle = _pixel_rectangle(corners[index], ego2img[camera], width, height)
            if rectangle is None:
                continue
            v0, v1, u0, u1 = rectangle
            rays = directions[:, v0:v1, u0:u1].reshape(3, -1)
            hits = intersect_box(origin, rays, centers[index], halves[index], yaws[index])
            unoccluded[index] += int(np.count_nonzero(hits.hit))
            depth_patch = depth.reshape(height, width)[v0:v1, u0:u1].ravel()
            nearest = np.flatnonzero(hits.hit & (hits.t < depth_patch))
            if len(nearest) == 0:
                continue
            # Patch-local ray index -> flat pixel index of the full image.
            winners = (v0 + nearest // (u1 - u0)) * width + u0 + nearest % (u1 - u0)
            depth[winners] = hits.t[nearest]
            ids[winners] = index

            axis, sign, local_point = hits.entry_surface(nearest)
            texture = box_colour(scene.looks[index], local_point, axis, sign, halves[index])
            shaded = lit_colour(texture, axis, sign, float(global_yaws[index]), scene.lighting)
            distance = hits.t[nearest] * np.linalg.norm(rays[:, nearest], axis=0)
            fog = (1.0 - np.exp(-distance / _BOX_FOG_M))[:, None]
            colour[winners] = shaded * (1 - fog) + haze * fog
        # Saturating float -> uint8 with rounding (colours are non-negative, so the abs is a no-op).
        images[camera] = cv2.convertScaleAbs(colour.reshape(height, width, 3), alpha=255.0)

    instance_ids = instance_ids.reshape(rig.num_cameras, height, width)
    valid = instance_ids >= 0
    visible = np.bincount(instance_ids[valid], minlength=num_objects).astype(np.int64)
    return FrameRender(images, instance_ids, visible, unoccluded)
