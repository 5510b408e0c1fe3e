"""The nuScenes reader: the original test pipeline's transforms on hand-checked cases, its geometry
against the independent table reader (`tggbc.data.frames`), order, workers and bad input."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("nuscenes", reason="the reader lists samples with nuscenes-devkit")
cv2 = pytest.importorskip("cv2", reason="images are decoded with OpenCV, as mmcv does")

from nuscenes_data import SYNTH_SIZE, synth_dataset  # noqa: E402
from tggbc.data import list_frames  # noqa: E402
from tggbc.models.configs import BGR_NORM, RGB_NORM, published_config  # noqa: E402
from tggbc.nuscenes.reader import (  # noqa: E402
    CAMERA_ORDER,
    ImageNormalization,
    NuScenesFrames,
    camera_geometry,
    eval_set_name,
    frame_loader,
    image_transform,
    normalize_image,
    open_nuscenes,
    overlapping_scenes,
    rigid_inverse_f32,
    sample_records,
    transform_image,
)

RGB = ImageNormalization(tuple(RGB_NORM["mean"]), tuple(RGB_NORM["std"]), True)
BGR = ImageNormalization(tuple(BGR_NORM["mean"]), tuple(BGR_NORM["std"]), False)


@pytest.mark.parametrize(
    "final, resize, resized, crop",
    [
        # 704 / 1600 = 0.44 beats 256 / 900; 900 * 0.44 = 396 rows, the bottom 256 kept
        ((256, 704), 0.44, (704, 396), (0, 140, 704, 396)),
        ((320, 800), 0.5, (800, 450), (0, 130, 800, 450)),
        ((640, 1600), 1.0, (1600, 900), (0, 260, 1600, 900)),
    ],
)
def test_transform_of_the_published_sizes(final, resize, resized, crop):
    t = image_transform(final, (900, 1600))
    assert t.resize == pytest.approx(resize) and t.resized == resized and t.crop == crop
    assert t.padded_size == final
    ida = t.ida()
    assert ida.dtype == np.float32
    np.testing.assert_array_equal(ida, np.array([[resize, 0, 0], [0, resize, -crop[1]], [0, 0, 1]], dtype=np.float32))


def test_configs_normalisation_and_size():
    assert ImageNormalization.of(published_config("stream_petr_r50_flash_704_bs2_seq_24e")) == RGB
    assert ImageNormalization.of(published_config("stream_petr_vov_flash_800_bs2_seq_24e")) == BGR


def test_marked_pixel_lands_where_ida_says():
    image = np.zeros((900, 1600, 3), dtype=np.uint8)
    image[698:703, 998:1003] = 255  # a 5x5 white block centred on column 1000, row 700
    t = image_transform((256, 704))
    out = transform_image(image, t, RGB)
    assert out.shape == (3, 256, 704) and out.dtype == np.float32
    level = out[0] - out[0].min()  # undo the mean: black is the minimum
    rows, cols = np.mgrid[: level.shape[0], : level.shape[1]]
    centroid = np.array([(cols * level).sum(), (rows * level).sum()]) / level.sum()
    expected = (t.ida() @ np.array([1000.0, 700.0, 1.0]))[:2]  # (440, 308 - 140)
    np.testing.assert_allclose(expected, [440.0, 168.0], atol=1e-4)
    np.testing.assert_allclose(centroid, expected, atol=0.75)


def test_normalisation_by_hand_and_against_opencv():
    bgr = np.array([[[10, 20, 30]]], dtype=np.uint8)
    np.testing.assert_allclose(
        normalize_image(bgr, RGB)[0, 0],
        [(30 - 123.675) / 58.395, (20 - 116.28) / 57.12, (10 - 103.53) / 57.375],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        normalize_image(bgr, BGR)[0, 0],
        [(10 - 103.530) / 57.375, (20 - 116.280) / 57.120, (30 - 123.675) / 58.395],
        rtol=1e-6,
    )
    # mmcv.imnormalize's own OpenCV calls, bit for bit, on every intensity and random triples.
    rng = np.random.default_rng(0)
    values = np.concatenate([np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1), rng.integers(0, 256, (4000, 3))])
    image = values.astype(np.uint8).reshape(1, -1, 3)
    for norm in (RGB, BGR):
        reference = image.astype(np.float32).copy()
        if norm.to_rgb:
            cv2.cvtColor(reference, cv2.COLOR_BGR2RGB, reference)
        cv2.subtract(reference, np.float64(np.array(norm.mean, np.float32).reshape(1, -1)), reference)
        cv2.multiply(reference, 1 / np.float64(np.array(norm.std, np.float32).reshape(1, -1)), reference)
        np.testing.assert_array_equal(normalize_image(image, norm), reference)


def test_padding_to_multiples_of_32_is_zero():
    image = np.full((90, 200, 3), 200, dtype=np.uint8)
    t = image_transform((50, 100), (90, 200))  # resize 50/90 -> 111x50, centred columns 5..105
    assert t.resized == (111, 50) and t.crop == (5, 0, 105, 50) and t.padded_size == (64, 128)
    out = transform_image(image, t, RGB)
    assert out.shape == (3, 64, 128)
    assert np.all(out[:, 50:, :] == 0) and np.all(out[:, :, 100:] == 0)
    level = (200 - np.array(RGB.mean)) / np.array(RGB.std)
    np.testing.assert_allclose(out[:, :50, :100], np.broadcast_to(level[:, None, None], (3, 50, 100)), rtol=1e-6)


def test_rigid_inverse_f32():
    angle = 0.3
    pose = np.eye(4)
    pose[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    pose[:3, 3] = [600.0, 1600.0, 1.0]
    inverse = rigid_inverse_f32(pose.astype(np.float32))
    assert inverse.dtype == np.float32
    np.testing.assert_allclose(inverse.astype(np.float64) @ pose, np.eye(4), atol=2e-4)


# ------------------------------------------------------------------ on generated scenes


@pytest.fixture(scope="module")
def nusc():
    return open_nuscenes(synth_dataset(), "v1.0-trainval")


@pytest.fixture(scope="module")
def records(nusc):
    return sample_records(nusc, "val")


def test_records_order_and_cameras(records):
    frames = list_frames(synth_dataset(), "val")  # scene then time order, from the tables directly
    assert [r.token for r in records] == [f.sample_token for f in frames]
    assert [r.scene_name for r in records] == [f.scene_name for f in frames]
    stamps = [r.timestamp for r in records]
    assert stamps == sorted(stamps) and overlapping_scenes(records) == 0
    for r in records:
        channels = [path.split("/")[-2] for path in r.image_paths]
        assert tuple(channels) == CAMERA_ORDER


def test_geometry_against_the_table_reader(records):
    """lidar2img, extrinsics, ego pose and times against tggbc.data.frames (float64, a different chain)."""
    frames = {f.sample_token: f for f in list_frames(synth_dataset(), "val")}
    w, h = SYNTH_SIZE
    same_size = image_transform((h, w), (h, w))  # resize 1, no crop: the raw cameras
    index = [frames[records[0].token].camera_names.index(c) for c in CAMERA_ORDER]
    for r in records:
        f = frames[r.token]
        g = camera_geometry(r, same_size)
        assert g.lidar2img.dtype == np.float32 and g.lidar2img.shape == (6, 4, 4)
        np.testing.assert_allclose(g.lidar2img, f.lidar2img[index], rtol=1e-5, atol=2e-3)
        np.testing.assert_allclose(g.extrinsics, f.lidar2cam[index], atol=1e-4)
        np.testing.assert_allclose(g.intrinsics[:, :3, :3], f.intrinsics[index], rtol=1e-6)
        lidar2global = f.ego2global @ f.lidar2ego.astype(np.float64)
        np.testing.assert_allclose(g.ego_pose, lidar2global, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(g.ego_pose_inv.astype(np.float64) @ lidar2global, np.eye(4), atol=1e-4)
        assert g.timestamp.dtype == np.float64 and g.timestamp == f.timestamp / 1e6
        np.testing.assert_array_equal(g.img_timestamp, [t / 1e6 for t in r.image_timestamps])


def test_known_point_projects_through_the_resize_and_crop(records):
    """A ground-truth box centre seen by a camera lands at ida @ (its raw projection)."""
    frame = list_frames(synth_dataset(), "val")[0]
    w, h = SYNTH_SIZE
    t = image_transform((64, 160), (h, w))
    g = camera_geometry(records[0], t)
    point = np.append(frame.gt_boxes[0, :3].astype(np.float64), 1.0)
    raw = camera_geometry(records[0], image_transform((h, w), (h, w))).lidar2img.astype(np.float64) @ point
    moved = g.lidar2img.astype(np.float64) @ point  # (6, 4)
    for cam in range(6):
        if raw[cam, 2] <= 0.1:
            continue
        expected = t.ida().astype(np.float64) @ np.array([*(raw[cam, :2] / raw[cam, 2]), 1.0])
        np.testing.assert_allclose(moved[cam, :2] / moved[cam, 2], expected[:2], atol=1e-3)
        np.testing.assert_allclose(moved[cam, 2], raw[cam, 2], rtol=1e-6)


def test_dataset_items_and_workers(records):
    config = published_config("stream_petr_r50_flash_704_bs2_seq_24e")
    dataset = NuScenesFrames(records, (64, 160), ImageNormalization.of(config))
    assert dataset.transform.source_size == (SYNTH_SIZE[1], SYNTH_SIZE[0])
    item = dataset[1]
    assert item["img"].shape == (6, 3, 64, 160) and item["img"].dtype == torch.float32
    assert item["lidar2img"].shape == (6, 4, 4) and item["timestamp"].dtype == torch.float64
    # The first camera image, by hand: decode, transform, normalise.
    image = cv2.imread(records[1].image_paths[0], cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(item["img"][0].numpy(), transform_image(image, dataset.transform, RGB))
    order = [2, 0, 1]
    inline = list(frame_loader(dataset, order, workers=0))
    threaded = list(frame_loader(dataset, order, workers=2))
    assert [int(b["index"]) for b in threaded] == order
    for a, b in zip(inline, threaded, strict=True):
        assert a.keys() == b.keys() and a["img"].shape == (1, 6, 3, 64, 160)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_bad_input_is_named(records, tmp_path):
    with pytest.raises(FileNotFoundError, match="v1.0-mini"):
        open_nuscenes(synth_dataset(), "v1.0-mini")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        open_nuscenes(tmp_path / "nothing", "v1.0-trainval")
    with pytest.raises(ValueError, match="--split must be one of"):
        eval_set_name("v1.0-trainval", "test")
    with pytest.raises(ValueError, match="mini_val belongs to v1.0-mini"):
        eval_set_name("v1.0-trainval", "mini_val")
    assert eval_set_name("v1.0-mini", "val") == "mini_val"
    # A missing image and an image of another size, each named.
    root = tmp_path / "copy"
    shutil.copytree(synth_dataset(), root)
    paths = tuple(p.replace(str(synth_dataset()), str(root)) for p in records[0].image_paths)
    moved = [dataclasses.replace(records[0], image_paths=paths)]
    dataset = NuScenesFrames(moved, (64, 160), RGB)
    missing = moved[0].image_paths[3]
    (root / missing.split(str(root) + "/")[1]).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        dataset[0]
    small = moved[0].image_paths[3]
    cv2.imwrite(small, np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(ValueError, match=f"{small} is 20x10"):
        dataset[0]
    cut = moved[0].image_paths[4]
    data = open(cut, "rb").read()
    open(cut, "wb").write(data[: len(data) // 2])
    (root / small.split(str(root) + "/")[1]).unlink()
    shutil.copy(moved[0].image_paths[0], small)
    with pytest.raises(ValueError, match=f"{cut} is damaged"):
        dataset[0]


def test_overlapping_scenes_by_hand(records):
    def at(scene, time):
        return dataclasses.replace(records[0], scene_token=scene, timestamp=time)

    assert overlapping_scenes([at("a", 0), at("a", 10), at("b", 11), at("b", 20)]) == 0
    assert overlapping_scenes([at("a", 0), at("a", 10), at("b", 5), at("b", 20), at("c", 30)]) == 2
