"""Synthetic nuScenes generation: schema, devkit loading, determinism, atomic and refused writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("nuscenes", reason="generation names scenes after the devkit's official splits")

from tggbc.data import CAMERA_NAMES, VERSION, generate, split_scenes  # noqa: E402
from tggbc.data import generator as generator_module  # noqa: E402
from tggbc.data.tables import TABLE_NAMES  # noqa: E402

SMALL = dict(num_scenes=2, seed=3, image_size=(176, 64), frames_per_scene=3, val_fraction=0.5, progress=False)
TINY = dict(num_scenes=1, seed=0, image_size=(64, 32), frames_per_scene=2, val_fraction=0.0, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "data", **SMALL)


def _file_bytes(root, pattern: str) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.glob(pattern)) if path.is_file()}


def test_devkit_loads_every_table(dataset):
    from nuscenes import NuScenes
    from nuscenes.eval.detection.utils import category_to_detection_name, detection_name_to_rel_attributes
    from nuscenes.utils.data_classes import LidarPointCloud

    assert sorted(p.stem for p in (dataset / VERSION).glob("*.json")) == sorted([*TABLE_NAMES, "splits"])
    nusc = NuScenes(version=VERSION, dataroot=str(dataset), verbose=False)
    assert len(nusc.scene) == 2 and len(nusc.sample) == 6
    assert len(nusc.sample_data) == 6 * 7 and len(nusc.ego_pose) == 6 * 7
    for sample in nusc.sample:
        assert set(sample["data"]) == {*CAMERA_NAMES, "LIDAR_TOP"}
        camera = nusc.get("sample_data", sample["data"]["CAM_FRONT"])
        assert (camera["width"], camera["height"]) == (176, 64)
        points = LidarPointCloud.from_file(nusc.get_sample_data_path(sample["data"]["LIDAR_TOP"]))
        assert points.points.shape[0] == 4
    for instance in nusc.instance:
        assert instance["nbr_annotations"] == 3  # every object is annotated in every frame of its scene
    seen_classes = set()
    for annotation in nusc.sample_annotation:
        name = category_to_detection_name(annotation["category_name"])
        assert name is not None
        seen_classes.add(name)
        attributes = [nusc.get("attribute", token)["name"] for token in annotation["attribute_tokens"]]
        assert len(attributes) == (1 if detection_name_to_rel_attributes(name) else 0)
        assert set(attributes) <= set(detection_name_to_rel_attributes(name))
        assert annotation["num_lidar_pts"] >= 0 and annotation["num_radar_pts"] >= 0
    assert {"car", "pedestrian"} <= seen_classes
    # Not degenerate: plenty of boxes have lidar points, and some are hidden (0 points) as in nuScenes.
    points = np.array([a["num_lidar_pts"] for a in nusc.sample_annotation])
    assert (points > 0).mean() > 0.2 and (points == 0).any()


def test_splits_use_official_scene_names(dataset):
    from nuscenes.utils.splits import create_splits_scenes

    splits = split_scenes(dataset)
    official = create_splits_scenes()
    assert len(splits["train"]) == 1 and len(splits["val"]) == 1
    assert set(splits["train"]) <= set(official["train"]) and set(splits["val"]) <= set(official["val"])
    meta = json.loads((dataset / "synth_meta.json").read_text())
    assert meta["version"] == VERSION and meta["image_size"] == [176, 64]


def test_same_seed_gives_identical_bytes(dataset, tmp_path):
    again = generate(tmp_path / "again", **SMALL)
    assert _file_bytes(again, f"{VERSION}/*.json") == _file_bytes(dataset, f"{VERSION}/*.json")
    assert _file_bytes(again, "samples/*/*") == _file_bytes(dataset, "samples/*/*")
    assert (again / "synth_meta.json").read_bytes() == (dataset / "synth_meta.json").read_bytes()


def test_other_seed_differs(dataset, tmp_path):
    other = generate(tmp_path / "other", **{**SMALL, "seed": 4})
    name = f"{VERSION}/sample_annotation.json"
    assert _file_bytes(other, name) != _file_bytes(dataset, name)


def test_worker_processes_give_identical_tables(dataset, tmp_path):
    parallel = generate(tmp_path / "parallel", **SMALL, workers=2)
    assert _file_bytes(parallel, f"{VERSION}/*.json") == _file_bytes(dataset, f"{VERSION}/*.json")


def test_val_scene_does_not_depend_on_train_count(dataset, tmp_path):
    more = generate(tmp_path / "more", **{**SMALL, "num_scenes": 3, "val_fraction": 0.34})
    assert len(split_scenes(more)["train"]) == 2 and split_scenes(more)["val"] == split_scenes(dataset)["val"]

    def val_annotations(root):
        samples = json.loads((root / VERSION / "sample.json").read_text())
        scenes = {s["token"]: s["name"] for s in json.loads((root / VERSION / "scene.json").read_text())}
        val_samples = {s["token"] for s in samples if scenes[s["scene_token"]] in split_scenes(root)["val"]}
        records = json.loads((root / VERSION / "sample_annotation.json").read_text())
        return [r for r in records if r["sample_token"] in val_samples]

    assert val_annotations(more) == val_annotations(dataset)


def test_existing_output_is_refused(dataset):
    with pytest.raises(FileExistsError, match=str(dataset)):
        generate(dataset, **SMALL)


def test_force_replaces_existing_output(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    generate(out, force=True, **TINY)
    assert not (out / "stale.txt").exists() and (out / VERSION / "sample.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging or trash directories left


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def explode(job, root):
        raise RuntimeError("boom")

    monkeypatch.setattr(generator_module, "write_scene", explode)
    with pytest.raises(RuntimeError, match="boom"):
        generate(tmp_path / "data", **TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"frames_per_scene": 1}, "frames_per_scene"),
        ({"seed": -1}, "seed"),
        ({"num_scenes": 0}, "num_scenes"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"image_size": (8, 8)}, "image size"),
    ],
)
def test_invalid_arguments_are_rejected(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "data", **{**TINY, **overrides})
    assert not (tmp_path / "data").exists()
