"""nuScenes v1.0 table records: deterministic tokens, the static tables, and JSON writing.

Record fields follow the nuScenes schema (https://www.nuscenes.org/nuscenes#data-format); tokens are
32 hex characters like the real ones, derived by hashing a description of the record, so the same
seed always yields byte-identical tables.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tggbc.data.classes import ATTRIBUTE_DESCRIPTIONS, CATEGORY_DESCRIPTIONS, VISIBILITY_LEVELS
from tggbc.data.rig import LIDAR_NAME, CameraRig
from tggbc.data.transforms import matrix_to_quaternion

TABLE_NAMES = (
    "attribute",
    "calibrated_sensor",
    "category",
    "ego_pose",
    "instance",
    "log",
    "map",
    "sample",
    "sample_annotation",
    "sample_data",
    "scene",
    "sensor",
    "visibility",
)
MAP_FILENAME = "maps/tggbc_synthetic_semantic_prior.png"


def make_token(*parts) -> str:
    """Deterministic 32-hex token of a record described by `parts`."""
    return hashlib.md5("/".join(str(part) for part in parts).encode()).hexdigest()


def rounded(values, decimals: int = 6) -> list[float]:
    """Floats rounded for compact, stable JSON."""
    return [round(float(v), decimals) for v in np.asarray(values).ravel()]


def category_token(name: str) -> str:
    return make_token("category", name)


def attribute_token(name: str) -> str:
    return make_token("attribute", name)


def sensor_token(channel: str) -> str:
    return make_token("sensor", channel)


def calibrated_sensor_token(channel: str, rig: CameraRig) -> str:
    return make_token("calibrated_sensor", channel, rig.image_width, rig.image_height)


def visibility_token(visible_fraction: float) -> str:
    """nuScenes visibility bin ("1".."4") of the visible fraction of a box over all images."""
    if visible_fraction <= 0.4:
        return "1"
    if visible_fraction <= 0.6:
        return "2"
    if visible_fraction <= 0.8:
        return "3"
    return "4"


def static_tables(rig: CameraRig, log_tokens: list[str]) -> dict[str, list[dict]]:
    """The tables that do not depend on scenes: category, attribute, visibility, sensor, calibrated_sensor, map."""
    sensors, calibrated = [], []
    for index, channel in enumerate(rig.camera_names):
        sensors.append({"token": sensor_token(channel), "channel": channel, "modality": "camera"})
        calibrated.append(
            {
                "token": calibrated_sensor_token(channel, rig),
                "sensor_token": sensor_token(channel),
                "translation": rounded(rig.cam2ego[index][:3, 3]),
                "rotation": rounded(matrix_to_quaternion(rig.cam2ego[index][:3, :3]), 9),
                "camera_intrinsic": [rounded(row) for row in rig.intrinsics[index]],
            }
        )
    sensors.append({"token": sensor_token(LIDAR_NAME), "channel": LIDAR_NAME, "modality": "lidar"})
    calibrated.append(
        {
            "token": calibrated_sensor_token(LIDAR_NAME, rig),
            "sensor_token": sensor_token(LIDAR_NAME),
            "translation": rounded(rig.lidar2ego[:3, 3]),
            "rotation": rounded(matrix_to_quaternion(rig.lidar2ego[:3, :3]), 9),
            "camera_intrinsic": [],
        }
    )
    return {
        "category": [
            {"token": category_token(name), "name": name, "description": description}
            for name, description in CATEGORY_DESCRIPTIONS.items()
        ],
        "attribute": [
            {"token": attribute_token(name), "name": name, "description": description}
            for name, description in ATTRIBUTE_DESCRIPTIONS.items()
        ],
        "visibility": [
            {"token": token, "level": level, "description": description}
            for token, (level, description) in VISIBILITY_LEVELS.items()
        ],
        "sensor": sensors,
        "calibrated_sensor": calibrated,
        # NuScenes() asserts that the map mask file exists (it reads it lazily); we write a tiny one.
        "map": [
            {
                "token": make_token("map", "synthetic"),
                "log_tokens": list(log_tokens),
                "category": "semantic_prior",
                "filename": MAP_FILENAME,
            }
        ],
    }


def write_tables(table_dir: Path, tables: dict[str, list[dict]]) -> None:
    """Write every table in TABLE_NAMES as <table_dir>/<name>.json (one record per line, stable order)."""
    table_dir.mkdir(parents=True, exist_ok=True)
    for name in TABLE_NAMES:
        records = tables[name]
        with open(table_dir / f"{name}.json", "w") as file:
            file.write("[\n")
            file.write(",\n".join(json.dumps(record, separators=(", ", ": ")) for record in records))
            file.write("\n]\n")
