"""Train/val splits of a generated dataset, and how they line up with the nuScenes devkit.

The devkit's detection eval (`DetectionEval(nusc, config, result_path, eval_set="val", ...)`) calls
`load_gt(nusc, "val")`, which keeps the samples whose scene *name* is in the devkit's hard-coded
official val list (`nuscenes.utils.splits.create_splits_scenes()["val"]`) and asserts that
`nusc.version` ends with "trainval". So a generated dataset:
- is written under the version directory VERSION = "v1.0-trainval" (inside its own dataroot, so it can
  never be confused with a real nuScenes install), and
- names its val scenes after the first official val scene names and its train scenes after the first
  official train scene names (e.g. val: scene-0003, scene-0012, ...; train: scene-0001, scene-0002, ...).
Then `eval_set="val"` / `"train"` work unchanged with any devkit version, and our scenes from the other
split are excluded exactly as the eval expects. The cost is a cap of 150 val and 700 train scenes
(at 8-40 keyframes per scene that is 1200-6000 val frames), checked at generation time.

The split is also written explicitly to <dataroot>/<version>/splits.json ({"train": [...], "val": [...]});
`split_scenes` reads it, so training code needs neither the devkit nor its lists.
"""

from __future__ import annotations

from pathlib import Path

VERSION = "v1.0-trainval"
SPLITS_FILENAME = "splits.json"
META_FILENAME = "synth_meta.json"
SPLIT_NAMES = ("train", "val")


def official_scene_names(split: str) -> list[str]:
    """The devkit's official scene names of `split` ('train' or 'val'), in its order.

    Imports nuscenes-devkit (heavy; only called while generating).
    """
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    try:
        from nuscenes.utils.splits import create_splits_scenes
    except ImportError as error:  # pragma: no cover - the devkit is an optional dependency
        raise ImportError(
            "generating a synthetic nuScenes dataset needs nuscenes-devkit (pip install 'tggbc[eval]'): scenes are"
            " named after the official split so the devkit's detection eval selects them"
        ) from error
    return list(create_splits_scenes()[split])


def scene_names_for(split: str, count: int) -> list[str]:
    """Names for the first `count` generated scenes of `split`; raises if the official split is smaller."""
    names = official_scene_names(split)
    if count > len(names):
        raise ValueError(
            f"at most {len(names)} {split} scenes can be generated (scene names must come from the devkit's"
            f" official {split} split so nuScenes eval selects them); asked for {count}. Use more frames per scene."
        )
    return names[:count]


def read_meta(dataroot: str | Path) -> dict:
    """The generator's metadata (<dataroot>/synth_meta.json): seed, image size, version, class names, ..."""
    from tggbc.files import read_json

    path = Path(dataroot) / META_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {dataroot} is not a dataset written by `tggbc data synth`")
    meta = read_json(path, what="dataset metadata")
    missing = [k for k in ("version", "image_size", "seed") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"dataset metadata {path} is damaged: it lacks {missing}")
    return meta


def split_scenes(dataroot: str | Path) -> dict[str, list[str]]:
    """Scene names of each split of a generated dataset: {"train": [...], "val": [...]}."""
    from tggbc.files import read_json

    version = read_meta(dataroot)["version"]
    path = Path(dataroot) / version / SPLITS_FILENAME
    splits = read_json(path, what="split list")
    if not isinstance(splits, dict) or any(not isinstance(splits.get(name), list) for name in SPLIT_NAMES):
        raise ValueError(f"split list {path} is damaged: it needs lists {list(SPLIT_NAMES)}")
    return {name: list(splits[name]) for name in SPLIT_NAMES}
