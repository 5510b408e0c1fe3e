"""Synthetic six-camera driving scenes in the nuScenes table schema.

    from tggbc.data import generate, load_frames
    root = generate("/tmp/synth", num_scenes=10, seed=0, image_size=(704, 256))
    for frame in load_frames(root, "train"):
        frame.images, frame.lidar2img, frame.gt_boxes, frame.gt_labels

The dataroot also loads with `nuscenes.NuScenes(version="v1.0-trainval", dataroot=root)` and scores
with nuScenes detection eval using eval_set="val" (see tggbc.data.splits for how).

Names are resolved lazily so that `import tggbc.data` (and `tggbc.data.cli`) stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CameraRig": "tggbc.data.rig",
    "CAMERA_NAMES": "tggbc.data.rig",
    "DETECTION_CLASSES": "tggbc.data.classes",
    "VERSION": "tggbc.data.splits",
    "split_scenes": "tggbc.data.splits",
    "generate": "tggbc.data.generator",
    "Frame": "tggbc.data.frames",
    "list_frames": "tggbc.data.frames",
    "load_frames": "tggbc.data.frames",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tggbc.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
