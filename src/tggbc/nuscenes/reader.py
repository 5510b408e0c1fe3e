"""The original test-time inputs of the PETR-family configs, read from a nuScenes dataroot.

What the StreamPETR repository's test pipeline hands Petr3D for one sample, computed the same way:

- samples: the split's scenes (the devkit's scene lists), six cameras per sample in the order of
  the repository's info files (CAM_FRONT, CAM_FRONT_RIGHT, CAM_FRONT_LEFT, CAM_BACK,
  CAM_BACK_LEFT, CAM_BACK_RIGHT);
- geometry (CustomNuScenesDataset.get_data_info on the info generator's fields): camera-to-lidar
  chained sensor -> ego (camera time) -> global -> ego (lidar time) -> lidar in float64, then
  the 4x4 matrices built and inverted rigidly in float32; ego_pose = lidar-to-global in float32;
  timestamps in seconds (float64);
- images (LoadMultiViewImageFromFiles, ResizeCropFlipRotImage with training=False,
  NormalizeMultiviewImage, PadMultiViewImage): BGR decode, resize by max(fH / H, fW / W) with
  PIL's bicubic filter, a bottom crop to the config's final size (centred horizontally), the
  config's mean / std (BGR -> RGB first when to_rgb), zero padding to a multiple of 32; the
  camera matrices take the same resize and crop (intrinsics <- ida @ intrinsics,
  lidar2img = intrinsics @ extrinsics), then everything goes to float32 as PETRFormatBundle3D does.

The configs fix the source size to nuScenes' 1600x900; here it is each dataset's own image size
(1600x900 on real nuScenes), so generated scenes of any size go through the same rules.

Test order: scenes by their first timestamp, each scene's samples in time order. The original
sorts all samples by timestamp; the two orders agree whenever no two scenes overlap in time
(`overlapping_scenes` counts the ones that do).

nuscenes-devkit, OpenCV and Pillow are imported inside the functions that use them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CAMERA_ORDER",
    "NUSCENES_IMAGE_SIZE",
    "SIZE_DIVISOR",
    "camera_geometry",
    "check_dataroot",
    "eval_set_name",
    "frame_loader",
    "FrameGeometry",
    "image_size_of",
    "image_transform",
    "ImageNormalization",
    "ImageTransform",
    "normalize_image",
    "NuScenesFrames",
    "open_nuscenes",
    "overlapping_scenes",
    "read_image_bgr",
    "rigid_inverse_f32",
    "sample_records",
    "SampleRecord",
    "split_scene_names",
    "transform_image",
]

# The order of info['cams'] in the repository's info files (tools/data_converter/nuscenes_converter.py).
CAMERA_ORDER: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)
NUSCENES_IMAGE_SIZE = (900, 1600)  # (H, W): ida_aug_conf's "H" and "W"
SIZE_DIVISOR = 32  # PadMultiViewImage(size_divisor=32)
SPLITS = ("val", "train", "mini_val", "mini_train")


# ------------------------------------------------------------------ images


@dataclass(frozen=True)
class ImageTransform:
    """The test-time resize and crop of ResizeCropFlipRotImage (training=False), then the padding.

    source_size: (H, W) of the camera images. final_size: (fH, fW), the config's final_dim.
    resize: max(fH / H, fW / W). resized: (W', H') = (int(W * resize), int(H * resize)), PIL order.
    crop: (x0, y0, x1, y1) of the resized image (PIL's crop box), fH x fW, at the bottom.
    """

    source_size: tuple[int, int]
    final_size: tuple[int, int]
    resize: float
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]

    @property
    def padded_size(self) -> tuple[int, int]:
        """(H, W) of the network input: final_size rounded up to multiples of 32."""
        fh, fw = self.final_size
        return (-(-fh // SIZE_DIVISOR) * SIZE_DIVISOR, -(-fw // SIZE_DIVISOR) * SIZE_DIVISOR)

    def ida(self) -> np.ndarray:
        """[3, 3] float32 image-space transform of the resize and crop (source pixel -> input pixel).

        The original builds it as a float32 torch tensor, so the scale is float32(resize).
        """
        ida = np.eye(3, dtype=np.float32)
        ida[0, 0] = ida[1, 1] = np.float32(self.resize)
        ida[0, 2], ida[1, 2] = -np.float32(self.crop[0]), -np.float32(self.crop[1])
        return ida


def image_transform(final_size: tuple[int, int], source_size: tuple[int, int] = NUSCENES_IMAGE_SIZE) -> ImageTransform:
    """The resize and crop the configs apply at test time (no flip, no rotation, bot_pct_lim = 0).

    Args:
        final_size: (fH, fW) the config's final_dim, e.g. (256, 704).
        source_size: (H, W) of the camera images (nuScenes: (900, 1600)).
    Returns:
        ImageTransform. E.g. 1600x900 -> 704x256: resize 0.44 to 704x396, crop rows 140..396.
    """
    (h, w), (fh, fw) = source_size, final_size
    for name, value in (("source_size", source_size), ("final_size", final_size)):
        if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            raise ValueError(f"{name} must be (H, W) positive ints, got {value!r}")
    resize = max(fh / h, fw / w)
    new_w, new_h = int(w * resize), int(h * resize)
    crop_h = new_h - fh  # int((1 - mean(bot_pct_lim)) * newH) - fH with the configs' bot_pct_lim = (0, 0)
    crop_w = int(max(0, new_w - fw) / 2)
    return ImageTransform((h, w), (fh, fw), resize, (new_w, new_h), (crop_w, crop_h, crop_w + fw, crop_h + fh))


@dataclass(frozen=True)
class ImageNormalization:
    """NormalizeMultiviewImage's img_norm_cfg: mean and std per channel in the output order;
    to_rgb: flip the decoded BGR image to RGB first (False keeps BGR, as the VoVNet configs do)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    to_rgb: bool

    @classmethod
    def of(cls, config) -> ImageNormalization:
        """The normalisation of a PublishedConfig."""
        return cls(tuple(config.img_mean), tuple(config.img_std), bool(config.to_rgb))


def read_image_bgr(path: str | os.PathLike) -> np.ndarray:
    """One camera image as [H, W, 3] uint8 BGR, as mmcv.imread (OpenCV, flag 'unchanged') gives it.

    A missing, cut (JPEG without its end marker), undecodable or not three-channel file is an
    error naming it.
    """
    import cv2

    path = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"camera image {path} is missing") from None
    if data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise ValueError(f"camera image {path} is damaged: not a complete JPEG ({len(data)} bytes)")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"camera image {path} is damaged: it does not decode")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"camera image {path} has shape {image.shape}, expected H x W x 3 (colour)")
    return image


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file from its header (no decoding)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            w, h = image.size
    except FileNotFoundError:
        raise FileNotFoundError(f"camera image {path} is missing") from None
    except OSError as e:
        raise ValueError(f"camera image {path} is damaged: {e}") from None
    return h, w


def normalize_image(image: np.ndarray, norm: ImageNormalization) -> np.ndarray:
    """mmcv.imnormalize on [H, W, 3] BGR: optional BGR -> RGB, then (x - mean) * (1 / std).

    OpenCV's arithmetic there (cv2.subtract, cv2.multiply with the float32 mean and a float64
    1 / std) rounds to float32 once at the end; this does the same (tests compare it with OpenCV
    bit for bit).

    Returns:
        [H, W, 3] float32 in the output channel order.
    """
    x = image.astype(np.float64)
    if norm.to_rgb:
        x = x[..., ::-1]
    mean = np.asarray(norm.mean, dtype=np.float32).astype(np.float64)
    stdinv = 1.0 / np.asarray(norm.std, dtype=np.float32).astype(np.float64)
    return np.ascontiguousarray((x - mean) * stdinv, dtype=np.float32)


def transform_image(image: np.ndarray, transform: ImageTransform, norm: ImageNormalization) -> np.ndarray:
    """One decoded camera image -> the network's input for it.

    Args:
        image: [H, W, 3] uint8 BGR of size transform.source_size.
    Returns:
        [3, pH, pW] float32: resized (PIL bicubic), cropped, normalised, zero-padded at the bottom
        and right to multiples of 32.
    """
    from PIL import Image

    if image.shape[:2] != transform.source_size:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, the transform expects "
                         f"{transform.source_size[1]}x{transform.source_size[0]}")  # fmt: skip
    # PIL sees the BGR array as RGB; every step here works channel by channel, so the order is kept.
    pil = Image.fromarray(np.ascontiguousarray(image))
    pil = pil.resize(transform.resized, Image.Resampling.BICUBIC).crop(transform.crop)
    x = normalize_image(np.asarray(pil), norm)
    ph, pw = transform.padded_size
    out = np.zeros((3, ph, pw), dtype=np.float32)
    fh, fw = transform.final_size
    out[:, :fh, :fw] = x.transpose(2, 0, 1)
    return out


# ------------------------------------------------------------------ samples and geometry


@dataclass(frozen=True)
class SampleRecord:
    """What the info generator keeps of one sample, read from the nuScenes tables.

    Rotations are (w, x, y, z) quaternions as in the tables; float arrays float64.
    sensor2lidar_rotation: [6, 3, 3] and sensor2lidar_translation: [6, 3], camera -> lidar
    (points @ R.T + T), in CAMERA_ORDER. cam_intrinsic: [6, 3, 3]. Timestamps in microseconds.
    """

    token: str
    scene_token: str
    scene_name: str
    timestamp: int
    image_paths: tuple[str, ...]
    image_timestamps: tuple[int, ...]
    cam_intrinsic: np.ndarray
    sensor2lidar_rotation: np.ndarray
    sensor2lidar_translation: np.ndarray
    lidar2ego_rotation: tuple[float, ...]
    lidar2ego_translation: tuple[float, ...]
    ego2global_rotation: tuple[float, ...]
    ego2global_translation: tuple[float, ...]


def check_dataroot(dataroot: str | os.PathLike, version: str) -> Path:
    """Fail fast, naming what is missing, unless `dataroot` holds the `version` tables (no loading)."""
    root = Path(dataroot)
    if not root.is_dir():
        raise FileNotFoundError(f"--dataroot {root} is not a directory")
    if not (root / version).is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("v1.0"))
        raise FileNotFoundError(f"--version {version}: {root} has no {version} tables (it has {found or 'none'})")
    return root


def open_nuscenes(dataroot: str | os.PathLike, version: str):
    """nuscenes-devkit's NuScenes for `dataroot` / `version`, with a clear error when it is not there."""
    root = check_dataroot(dataroot, version)
    try:
        from nuscenes import NuScenes
    except ImportError as e:
        raise ImportError("reading nuScenes needs nuscenes-devkit: pip install 'tggbc[eval]'") from e
    try:
        return NuScenes(version=version, dataroot=str(root), verbose=False)
    except (AssertionError, KeyError, FileNotFoundError) as e:
        raise ValueError(f"{root}/{version} is not a readable nuScenes table set ({type(e).__name__}: {e})") from None


def eval_set_name(version: str, split: str) -> str:
    """The devkit's split name for `split` of `version`: v1.0-mini's val is 'mini_val'."""
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if version.endswith("mini") and split in ("val", "train"):
        return f"mini_{split}"
    if not version.endswith("mini") and split.startswith("mini_"):
        raise ValueError(f"--split {split} belongs to v1.0-mini, not {version}")
    return split


def split_scene_names(nusc, split: str) -> list[str]:
    """Names of the scenes of the devkit's split `split` (eval_set_name form) present in `nusc`."""
    from nuscenes.utils.splits import create_splits_scenes

    names = set(create_splits_scenes()[split])
    present = [scene["name"] for scene in nusc.scene if scene["name"] in names]
    if not present:
        raise ValueError(f"{nusc.dataroot}/{nusc.version} has no scene of the devkit's {split!r} split")
    return present


def _sensor2lidar(nusc, sample_data_token: str, l2e_t, l2e_r, e2g_t, e2g_r) -> tuple[np.ndarray, np.ndarray]:
    """Camera -> lidar rotation [3, 3] (for points @ R.T) and translation [3], float64, as the info
    generator's obtain_sensor2top: sensor -> ego -> global at the camera's time, then global ->
    ego -> lidar at the lidar's, in row-vector form."""
    from pyquaternion import Quaternion

    sd = nusc.get("sample_data", sample_data_token)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    s2e_r = Quaternion(cs["rotation"]).rotation_matrix
    e2g_r_s = Quaternion(pose["rotation"]).rotation_matrix
    to_lidar = np.linalg.inv(e2g_r).T @ np.linalg.inv(l2e_r).T  # global (row vectors) -> lidar rotation
    rotation = (s2e_r.T @ e2g_r_s.T) @ to_lidar
    translation = (np.asarray(cs["translation"]) @ e2g_r_s.T + np.asarray(pose["translation"])) @ to_lidar
    translation -= np.asarray(e2g_t) @ to_lidar + np.asarray(l2e_t) @ np.linalg.inv(l2e_r).T
    return rotation.T, translation


def _record(nusc, sample: dict, scene_name: str) -> SampleRecord:
    from pyquaternion import Quaternion

    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    cs = nusc.get("calibrated_sensor", lidar["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", lidar["ego_pose_token"])
    l2e_r, e2g_r = Quaternion(cs["rotation"]).rotation_matrix, Quaternion(pose["rotation"]).rotation_matrix
    paths, stamps, intrinsics, rotations, translations = [], [], [], [], []
    for channel in CAMERA_ORDER:
        if channel not in sample["data"]:
            raise ValueError(f"sample {sample['token']} has no {channel} image")
        token = sample["data"][channel]
        sd = nusc.get("sample_data", token)
        camera = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        rotation, translation = _sensor2lidar(nusc, token, cs["translation"], l2e_r, pose["translation"], e2g_r)
        paths.append(nusc.get_sample_data_path(token))
        stamps.append(int(sd["timestamp"]))
        intrinsics.append(np.array(camera["camera_intrinsic"], dtype=np.float64))
        rotations.append(rotation)
        translations.append(translation)
    return SampleRecord(
        token=sample["token"],
        scene_token=sample["scene_token"],
        scene_name=scene_name,
        timestamp=int(sample["timestamp"]),
        image_paths=tuple(paths),
        image_timestamps=tuple(stamps),
        cam_intrinsic=np.stack(intrinsics),
        sensor2lidar_rotation=np.stack(rotations),
        sensor2lidar_translation=np.stack(translations),
        lidar2ego_rotation=tuple(cs["rotation"]),
        lidar2ego_translation=tuple(cs["translation"]),
        ego2global_rotation=tuple(pose["rotation"]),
        ego2global_translation=tuple(pose["translation"]),
    )


def sample_records(nusc, split: str) -> list[SampleRecord]:
    """Every sample of the devkit split `split` (eval_set_name form), in test order.

    Scenes by their first timestamp (ties: table order), each scene's samples along its `next` links.
    """
    names = set(split_scene_names(nusc, split))
    scenes = [scene for scene in nusc.scene if scene["name"] in names]
    first = {s["token"]: nusc.get("sample", s["first_sample_token"])["timestamp"] for s in scenes}
    scenes.sort(key=lambda s: first[s["token"]])  # stable: ties keep the table order
    records = []
    for scene in scenes:
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            records.append(_record(nusc, sample, scene["name"]))
            token = sample["next"]
    return records


def overlapping_scenes(records: list[SampleRecord]) -> int:
    """Scenes whose time span overlaps another's: where the original's global timestamp order would
    interleave scenes (and reset StreamPETR's memory at every switch) while this order keeps them whole."""
    spans: dict[str, list[int]] = {}
    for r in records:
        span = spans.setdefault(r.scene_token, [r.timestamp, r.timestamp])
        span[0], span[1] = min(span[0], r.timestamp), max(span[1], r.timestamp)
    ordered = sorted(spans.values())
    overlapping = set()
    for i, (start, _) in enumerate(ordered):
        for j in range(i):
            if ordered[j][1] >= start:
                overlapping.update((i, j))
    return len(overlapping)


def _pose_matrix_f32(rotation: np.ndarray, translation) -> np.ndarray:
    """convert_egopose_to_matrix_numpy: a [4, 4] float32 matrix from a rotation and a translation."""
    m = np.zeros((4, 4), dtype=np.float32)
    m[:3, :3] = rotation
    m[:3, 3] = translation
    m[3, 3] = 1.0
    return m


def rigid_inverse_f32(pose: np.ndarray) -> np.ndarray:
    """invert_matrix_egopose_numpy: [R t; 0 1] -> [R^T -R^T t; 0 1] in the pose's float32 arithmetic."""
    inverse = np.zeros((4, 4), dtype=np.float32)
    rotation, translation = pose[:3, :3], pose[:3, 3]
    inverse[:3, :3] = rotation.T
    inverse[:3, 3] = -np.dot(rotation.T, translation)
    inverse[3, 3] = 1.0
    return inverse


@dataclass(frozen=True)
class FrameGeometry:
    """The collect_keys of one sample after the test pipeline (N = 6 cameras in CAMERA_ORDER).

    lidar2img, intrinsics, extrinsics (lidar -> camera): [N, 4, 4] float32 for the network input;
    ego_pose (lidar -> global), ego_pose_inv: [4, 4] float32; timestamp: float64 seconds;
    img_timestamp: [N] float64 seconds.
    """

    lidar2img: np.ndarray
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    ego_pose: np.ndarray
    ego_pose_inv: np.ndarray
    timestamp: np.ndarray
    img_timestamp: np.ndarray


def camera_geometry(record: SampleRecord, transform: ImageTransform) -> FrameGeometry:
    """The cameras, poses and times of one sample as the original pipeline computes them."""
    from pyquaternion import Quaternion

    e2g = _pose_matrix_f32(Quaternion(record.ego2global_rotation).rotation_matrix, record.ego2global_translation)
    l2e = _pose_matrix_f32(Quaternion(record.lidar2ego_rotation).rotation_matrix, record.lidar2ego_translation)
    ego_pose = e2g @ l2e  # lidar -> global, float32 as in get_data_info
    ida = transform.ida()
    intrinsics, extrinsics, lidar2img = [], [], []
    for n in range(len(CAMERA_ORDER)):
        cam2lidar = _pose_matrix_f32(record.sensor2lidar_rotation[n], record.sensor2lidar_translation[n])
        lidar2cam = rigid_inverse_f32(cam2lidar)
        viewpad = np.eye(4)
        viewpad[:3, :3] = record.cam_intrinsic[n]
        viewpad[:3, :3] = ida @ viewpad[:3, :3]  # float32 ida times float64 intrinsics -> float64
        intrinsics.append(viewpad)
        extrinsics.append(lidar2cam)
        lidar2img.append(viewpad @ lidar2cam)
    return FrameGeometry(
        lidar2img=np.stack(lidar2img).astype(np.float32),
        intrinsics=np.stack(intrinsics).astype(np.float32),
        extrinsics=np.stack(extrinsics).astype(np.float32),
        ego_pose=ego_pose.astype(np.float32),
        ego_pose_inv=rigid_inverse_f32(ego_pose),
        timestamp=np.array(record.timestamp / 1e6, dtype=np.float64),
        img_timestamp=np.array([t / 1e6 for t in record.image_timestamps], dtype=np.float64),
    )


# ------------------------------------------------------------------ dataset


class NuScenesFrames(torch.utils.data.Dataset):
    """The network inputs of a list of samples, one sample per item (decoded in DataLoader workers).

    Args:
        records: SampleRecords (from `sample_records`).
        final_size: (fH, fW) the config's final_dim (PublishedConfig.image_size).
        norm: the config's ImageNormalization.
        source_size: (H, W) every camera image must have; None reads it from the first image.

    Item i: {"index": i, "img": [6, 3, pH, pW] float32, and the FrameGeometry fields as tensors}.
    """

    def __init__(
        self,
        records: list[SampleRecord],
        final_size: tuple[int, int],
        norm: ImageNormalization,
        source_size: tuple[int, int] | None = None,
    ):
        if not records:
            raise ValueError("no samples to read")
        self.records = list(records)
        if source_size is None:
            source_size = image_size_of(self.records[0].image_paths[0])
        self.transform = image_transform(tuple(final_size), tuple(source_size))
        self.norm = norm

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        images = []
        for path in record.image_paths:
            image = read_image_bgr(path)
            if image.shape[:2] != self.transform.source_size:
                h, w = self.transform.source_size
                raise ValueError(f"camera image {path} is {image.shape[1]}x{image.shape[0]}; the dataset's images "
                                 f"are {w}x{h}")  # fmt: skip
            images.append(transform_image(image, self.transform, self.norm))
        geometry = camera_geometry(record, self.transform)
        item = {"index": index, "img": torch.from_numpy(np.stack(images))}
        for name in FrameGeometry.__dataclass_fields__:
            item[name] = torch.from_numpy(np.asarray(getattr(geometry, name)))
        return item


def _worker_init(_: int) -> None:
    """DataLoader workers: leave Ctrl-C to the main process, and die with it (Linux)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: torch's own watchdog still ends orphaned workers


def frame_loader(dataset: NuScenesFrames, indices: list[int], workers: int = 4) -> torch.utils.data.DataLoader:
    """Batches of one sample each, in the order of `indices`, decoded by `workers` processes
    (0: in this process). Tensors gain a leading batch dimension of 1."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    subset = torch.utils.data.Subset(dataset, list(indices))
    return torch.utils.data.DataLoader(
        subset,
        batch_size=1,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
    )
