"""Generate a synthetic multi-camera dataset in the nuScenes table schema, atomically.

Layout of the output directory (dataroot):
    <dataroot>/v1.0-trainval/{attribute,calibrated_sensor,...,visibility}.json   nuScenes tables
    <dataroot>/v1.0-trainval/splits.json                                        {"train": [...], "val": [...]}
    <dataroot>/samples/CAM_*/*.jpg, samples/LIDAR_TOP/*.pcd.bin                 sensor files
    <dataroot>/maps/tggbc_synthetic_semantic_prior.png                          tiny map mask (devkit needs it)
    <dataroot>/synth_meta.json                                                  generator settings
Everything is written into a temporary directory beside the target and renamed into place at the end,
so an interrupted run never leaves a half-written dataset behind.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import tempfile
from pathlib import Path

import numpy as np

from tggbc.data.classes import DETECTION_CLASSES
from tggbc.data.rig import CameraRig
from tggbc.data.splits import META_FILENAME, SPLITS_FILENAME, VERSION, scene_names_for
from tggbc.data.tables import MAP_FILENAME, TABLE_NAMES, static_tables, write_tables
from tggbc.data.writer import SceneJob, write_scene
from tggbc.files import clean_stale_temporaries, temp_prefix

FORMAT_VERSION = 1


def split_sizes(num_scenes: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) scene counts: round(num_scenes * val_fraction) val scenes, but at least one scene in
    each split when 0 < val_fraction < 1 and there are at least two scenes."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    num_val = int(round(num_scenes * val_fraction))
    if 0.0 < val_fraction < 1.0 and num_scenes >= 2:
        num_val = min(max(num_val, 1), num_scenes - 1)
    return num_scenes - num_val, num_val


def _write_map_mask(root: Path) -> None:
    import cv2

    path = root / MAP_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8), 255, dtype=np.uint8))


def _worker_init() -> None:
    """In each worker: die with the parent (Linux), and leave Ctrl-C to the parent, which stops them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent's terminate() on interrupt still stops them


def _run_jobs(jobs: list[SceneJob], root: Path, workers: int, progress: bool) -> list[dict]:
    """Generate all scenes (in worker processes if workers > 1); results come back in job order."""
    from tqdm import tqdm

    bar = tqdm(total=sum(job.num_frames for job in jobs), unit="frame", desc="synth", disable=not progress)
    results: list[dict] = []
    try:
        if workers <= 1:
            for job in jobs:
                results.append(write_scene(job, root))
                bar.update(job.num_frames)
        else:
            # fork where available (as torch's DataLoader does): workers start instantly and callers need no
            # `if __name__ == "__main__"` guard. Workers only use numpy and OpenCV, never the caller's threads.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(workers, initializer=_worker_init)
            try:
                for job, result in zip(jobs, pool.imap(_write_scene_job, [(job, root) for job in jobs]), strict=True):
                    results.append(result)
                    bar.update(job.num_frames)
                pool.close()
            except BaseException:
                pool.terminate()  # Ctrl-C or an error: no worker outlives the command
                raise
            finally:
                pool.join()
    finally:
        bar.close()
    return results


def _write_scene_job(args: tuple[SceneJob, Path]) -> dict:
    return write_scene(*args)


def generate(
    out_dir: str | Path,
    num_scenes: int,
    seed: int = 0,
    image_size: tuple[int, int] = (704, 256),
    frames_per_scene: int = 8,
    val_fraction: float = 0.2,
    force: bool = False,
    progress: bool = True,
    workers: int = 1,
    jpeg_quality: int = 90,
) -> Path:
    """Generate a synthetic nuScenes-format dataset.

    Args:
        out_dir: dataroot to create. Refused if it exists, unless `force` (then it is replaced).
        num_scenes: total number of scenes; split into train and val by `val_fraction` (see split_sizes).
        seed: non-negative; with the same arguments the tables are byte-identical. Scene i of a split
            depends only on (seed, split, i), so val stays the same when only the train count changes.
        image_size: (W, H) of every camera image.
        frames_per_scene: keyframes per scene, 0.5 s apart (>= 2).
        val_fraction: fraction of scenes in the val split.
        force: replace an existing `out_dir`.
        progress: show a tqdm progress bar over frames.
        workers: processes generating scenes in parallel (1 = in this process).
        jpeg_quality: JPEG quality of the camera images.
    Returns:
        The dataroot path. Load it with `nuscenes.NuScenes(version=VERSION, dataroot=...)` or `load_frames`.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not force:
        raise FileExistsError(f"output directory already exists: {out} (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a dataroot: choose another --out")
    for name, value in (("num_scenes", num_scenes), ("seed", seed), ("frames_per_scene", frames_per_scene),
                        ("workers", workers), ("jpeg_quality", jpeg_quality)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if frames_per_scene < 2:
        raise ValueError(
            f"frames_per_scene must be >= 2 (the eval estimates velocity from neighbours), got {frames_per_scene}"
        )
    rig = CameraRig.default(image_size)  # validates the image size early
    num_train, num_val = split_sizes(num_scenes, val_fraction)
    names = {"train": scene_names_for("train", num_train), "val": scene_names_for("val", num_val)}
    size = (rig.image_width, rig.image_height)
    jobs = [
        SceneJob(split, index, name, int(seed), int(frames_per_scene), size, jpeg_quality)
        for split in ("train", "val")
        for index, name in enumerate(names[split])
    ]

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out.parent)  # what a killed run left behind
    staging = Path(tempfile.mkdtemp(prefix=f"{temp_prefix()}{out.name}-", dir=out.parent))
    try:
        scene_tables = _run_jobs(jobs, staging, workers, progress)
        tables = static_tables(rig, [records["log"][0]["token"] for records in scene_tables])
        for name in TABLE_NAMES:
            tables.setdefault(name, [])
            for records in scene_tables:
                tables[name].extend(records.get(name, []))
        write_tables(staging / VERSION, tables)
        with open(staging / VERSION / SPLITS_FILENAME, "w") as file:
            json.dump(names, file, indent=1)
        meta = {
            "generator": "tggbc.data",
            "format_version": FORMAT_VERSION,
            "version": VERSION,
            "seed": int(seed),
            "image_size": [rig.image_width, rig.image_height],
            "frames_per_scene": int(frames_per_scene),
            "num_scenes": {"train": num_train, "val": num_val},
            "camera_names": list(rig.camera_names),
            "detection_classes": list(DETECTION_CLASSES),
            "lidar_frame": "LIDAR_TOP, axes aligned with the ego frame (identity rotation)",
        }
        with open(staging / META_FILENAME, "w") as file:
            json.dump(meta, file, indent=1)
        _write_map_mask(staging)
        _replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replace_directory(staging: Path, out: Path) -> None:
    """Move `staging` to `out`, replacing an existing `out` with as short a gap as two renames."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f"{temp_prefix()}{out.name}-old-", dir=out.parent))
        out.rename(trash / out.name)
        staging.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out)
