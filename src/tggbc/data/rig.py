"""The six-camera surround rig plus LIDAR_TOP, in nuScenes sensor conventions.

Frames (as in nuScenes):
- ego: x forward, y left, z up; origin on the ground below the rear axle.
- camera: x right, y down, z forward (optical axis); pinhole intrinsics K [3, 3].
- LIDAR_TOP: here aligned with the ego axes (identity rotation), 1.84 m above the ground, so a yaw in
  the lidar frame equals the yaw in the ego frame. (Real nuScenes rotates it by ~90 deg; detectors only
  consume lidar2img, which absorbs the choice.)

Pixel convention: pixel (row v, column u) is centred on image coordinate (u, v), as in OpenCV, so a
3D point projecting to (u, v) lands in pixel (round(v), round(u)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from tggbc.data.transforms import make_transform, project_points

# Clockwise around the car starting at the front, as in the nuScenes sensor layout.
CAMERA_NAMES: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_RIGHT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_FRONT_LEFT",
)
LIDAR_NAME = "LIDAR_TOP"

# Per camera: yaw in ego (deg, left positive), horizontal field of view (deg), position in ego (m).
# Yaws and mounting points follow the nuScenes car; the back camera is wide like the real one, and
# neighbouring fields of view overlap by 15-20 deg.
_CAMERA_LAYOUT: dict[str, tuple[float, float, tuple[float, float, float]]] = {
    "CAM_FRONT": (0.0, 70.0, (1.70, 0.00, 1.51)),
    "CAM_FRONT_RIGHT": (-55.0, 70.0, (1.55, -0.49, 1.50)),
    "CAM_BACK_RIGHT": (-110.0, 70.0, (1.05, -0.48, 1.59)),
    "CAM_BACK": (180.0, 110.0, (0.05, 0.00, 1.59)),
    "CAM_BACK_LEFT": (110.0, 70.0, (1.05, 0.48, 1.56)),
    "CAM_FRONT_LEFT": (55.0, 70.0, (1.52, 0.49, 1.51)),
}
_LIDAR_POSITION = (0.94, 0.0, 1.84)

# Principal point height as a fraction of the image height. Cropped nuScenes inputs put the horizon
# at ~0.27 H; 0.33 H keeps a little more sky so tall vehicles near the car are not cut off.
_PRINCIPAL_ROW_FRACTION = 0.33

# Columns of the camera axes (x right, y down, z forward) written in ego axes for a camera looking
# along ego +x: right = -y_ego, down = -z_ego, forward = +x_ego.
_CAMERA_AXES_IN_EGO = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True, eq=False)
class CameraRig:
    """Calibration of the six cameras and the lidar. Arrays are float64.

    Attributes:
        image_width, image_height: image size W, H in pixels.
        camera_names: the six channel names, in the order of the arrays below.
        intrinsics: [6, 3, 3] pinhole matrices.
        cam2ego: [6, 4, 4] camera-to-ego transforms.
        lidar2ego: [4, 4] LIDAR_TOP-to-ego transform.
    """

    image_width: int
    image_height: int
    camera_names: tuple[str, ...]
    intrinsics: np.ndarray
    cam2ego: np.ndarray
    lidar2ego: np.ndarray = field(default_factory=lambda: make_transform(np.eye(3), _LIDAR_POSITION))

    @classmethod
    def default(cls, image_size: tuple[int, int] = (704, 256)) -> CameraRig:
        """The nuScenes-like surround rig for images of `image_size` = (W, H)."""
        width, height = int(image_size[0]), int(image_size[1])
        if width < 16 or height < 16:
            raise ValueError(f"image size must be at least 16x16, got {width}x{height}")
        intrinsics, cam2ego = [], []
        for name in CAMERA_NAMES:
            yaw_deg, hfov_deg, position = _CAMERA_LAYOUT[name]
            focal = (width / 2.0) / np.tan(np.radians(hfov_deg) / 2.0)
            # Square pixels; principal point centred horizontally, raised vertically (see above).
            intrinsics.append(
                np.array(
                    [[focal, 0.0, (width - 1) / 2.0], [0.0, focal, _PRINCIPAL_ROW_FRACTION * (height - 1)], [0, 0, 1]]
                )
            )
            rotation = _yaw_matrix(np.radians(yaw_deg)) @ _CAMERA_AXES_IN_EGO
            cam2ego.append(make_transform(rotation, position))
        return cls(width, height, CAMERA_NAMES, np.stack(intrinsics), np.stack(cam2ego))

    @property
    def num_cameras(self) -> int:
        return len(self.camera_names)

    @cached_property
    def ray_directions(self) -> np.ndarray:
        """Unnormalised ego-frame ray direction of every pixel centre, [6, H, W, 3] float32.

        The ray of pixel (v, u) is cam2ego_rotation @ K^-1 (u, v, 1), so its parameter t along the ray
        equals the camera-frame depth of the point it reaches; depth tests compare these t values.
        """
        u, v = np.meshgrid(np.arange(self.image_width), np.arange(self.image_height))
        pixels = np.stack([u, v, np.ones_like(u)], axis=-1).astype(np.float64)  # (H, W, 3)
        directions = []
        for intrinsic, cam2ego in zip(self.intrinsics, self.cam2ego, strict=True):
            rays_cam = pixels @ np.linalg.inv(intrinsic).T
            directions.append(rays_cam @ cam2ego[:3, :3].T)
        return np.stack(directions).astype(np.float32)

    @cached_property
    def ray_components(self) -> np.ndarray:
        """`ray_directions` laid out component-major, [6, 3, H, W] float32, for vectorised ray casting."""
        return np.ascontiguousarray(self.ray_directions.transpose(0, 3, 1, 2))

    @property
    def camera_origins(self) -> np.ndarray:
        """Camera centres in the ego frame, [6, 3]."""
        return self.cam2ego[:, :3, 3]

    def ego2img(self) -> np.ndarray:
        """Ego-to-image projections [6, 4, 4]: K (padded to 4x4) @ inverse(cam2ego)."""
        projections = []
        for intrinsic, cam2ego in zip(self.intrinsics, self.cam2ego, strict=True):
            padded = np.eye(4)
            padded[:3, :3] = intrinsic
            projections.append(padded @ np.linalg.inv(cam2ego))
        return np.stack(projections)

    def project_ego_points(self, points_ego: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project ego-frame points into every camera.

        Args:
            points_ego: [N, 3] points in the ego frame.
        Returns:
            uv: [6, N, 2] image coordinates (u right, v down); meaningless where depth <= 0.
            depth: [6, N] camera-frame depth.
        """
        return project_points(points_ego, self.ego2img())
