"""Training augmentation: mirrored frames agree with the calibration, and the targets computed
from scratch for the mirrored world equal the mirrored targets."""

import numpy as np
import pytest
import torch

from tggbc.data.rig import CameraRig
from tggbc.data.transforms import project_points
from tggbc.detector.augment import (
    augment_batch,
    jitter_colors,
    mirror_box_code,
    mirror_dense_targets,
    mirror_lidar2img,
)
from tggbc.detector.dense import dense_targets
from tggbc.detector.loss import encode_boxes

WIDTH, HEIGHT, STRIDE, CLASSES = 352, 128, 8, 4


def rig_lidar2img() -> np.ndarray:
    rig = CameraRig.default((WIDTH, HEIGHT))
    return rig.ego2img() @ rig.lidar2ego  # (6, 4, 4)


def mirrored_boxes(boxes: np.ndarray) -> np.ndarray:
    """(x, y, z, w, l, h, yaw, vx, vy) of the world reflected in y, written out by hand."""
    out = boxes.copy()
    out[:, 1], out[:, 6], out[:, 8] = -boxes[:, 1], -boxes[:, 6], -boxes[:, 8]
    return out


def random_boxes(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-40, 40, (count, 2))
    z = rng.uniform(-1.5, 0.0, (count, 1))
    size = rng.uniform(0.5, 5.0, (count, 3))
    yaw = rng.uniform(-np.pi, np.pi, (count, 1))
    velocity = rng.normal(0, 3, (count, 2))
    return np.concatenate([xy, z, size, yaw, velocity], 1)


def test_mirrored_camera_sees_the_mirrored_point_at_the_flipped_pixel():
    lidar2img = rig_lidar2img()
    mirrored = mirror_lidar2img(torch.from_numpy(lidar2img), WIDTH).numpy()
    points = np.random.default_rng(0).uniform(-30, 30, (50, 3))
    uv, depth = project_points(points, lidar2img)
    uv_m, depth_m = project_points(points * [1, -1, 1], mirrored)
    assert np.allclose(uv_m[..., 0], WIDTH - uv[..., 0]) and np.allclose(uv_m[..., 1], uv[..., 1])
    assert np.allclose(depth_m, depth)


def test_mirrored_code_is_the_code_of_the_mirrored_boxes():
    boxes = torch.from_numpy(random_boxes(20, 1))
    flipped = torch.from_numpy(mirrored_boxes(boxes.numpy()))

    def code(b):
        return encode_boxes(b[:, 0:3], b[:, 3:6], b[:, 6], b[:, 7:9])

    assert torch.allclose(mirror_box_code(code(boxes)), code(flipped), atol=1e-12)
    with pytest.raises(ValueError, match=r"\[M, 10\]"):
        mirror_box_code(torch.zeros(3, 9))


def test_targets_of_the_mirrored_world_are_the_mirrored_targets():
    # An independent path: dense_targets run from scratch on the mirrored boxes and calibration.
    lidar2img = rig_lidar2img()
    boxes = random_boxes(60, 2)
    labels = np.random.default_rng(3).integers(0, CLASSES, 60)
    original = dense_targets(boxes, labels, lidar2img, (WIDTH, HEIGHT), STRIDE, CLASSES)
    mirrored_calib = mirror_lidar2img(torch.from_numpy(lidar2img), WIDTH).numpy()
    expected = dense_targets(mirrored_boxes(boxes), labels, mirrored_calib, (WIDTH, HEIGHT), STRIDE, CLASSES)
    assert original[2].max() > 0  # boxes landed in the images
    got = mirror_dense_targets(*(torch.from_numpy(t) for t in original))
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, torch.from_numpy(e), atol=1e-4)


def test_jitter_keeps_range_and_strength_zero_is_identity():
    images = torch.rand(2, 6, 3, 8, 16)
    g = torch.Generator().manual_seed(0)
    out = jitter_colors(images, g, strength=0.4)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, images)
    assert torch.allclose(jitter_colors(images, g, strength=0.0), images)
    with pytest.raises(ValueError, match=r"\[B, N, 3, H, W\]"):
        jitter_colors(images[0], g)
    with pytest.raises(ValueError, match="strength"):
        jitter_colors(images, g, strength=1.5)


def test_augment_batch_mirrors_whole_frames_consistently():
    b, n, c, h, w = 8, 6, CLASSES, HEIGHT // STRIDE, WIDTH // STRIDE
    images = torch.randint(0, 100, (b, n, 3, HEIGHT, WIDTH), dtype=torch.uint8)
    marker = torch.randint(0, HEIGHT * WIDTH, (b, n))  # one bright pixel per image
    images.view(b, n, 3, -1).scatter_(3, marker[:, :, None, None].expand(-1, -1, 3, 1), 200)
    lidar2img = torch.from_numpy(rig_lidar2img()).float().expand(b, -1, -1, -1).clone()
    targets = [torch.randn(i + 1, 10) for i in range(b)]
    heatmap, regression, weight = torch.rand(b, n, c, h, w), torch.randn(b, n, 3, h, w), torch.rand(b, n, h, w)
    out = augment_batch(images, lidar2img, targets, heatmap, regression, weight, torch.Generator().manual_seed(0))
    images_out, lidar2img_out, targets_out, heat_out, reg_out, weight_out = out
    flipped = [not torch.equal(lidar2img_out[i], lidar2img[i]) for i in range(b)]
    assert any(flipped) and not all(flipped)  # seed 0 mirrors some frames, not all
    for i in range(b):
        mirror = flipped[i]
        assert torch.equal(targets_out[i], mirror_box_code(targets[i]) if mirror else targets[i])
        assert torch.equal(heat_out[i], heatmap[i].flip(-1) if mirror else heatmap[i])
        assert torch.equal(weight_out[i], weight[i].flip(-1) if mirror else weight[i])
        assert torch.equal(reg_out[i, :, 0], -regression[i, :, 0].flip(-1) if mirror else regression[i, :, 0])
        # Colour jitter is monotone per camera and channel: the bright pixel stays where it was.
        row, col = marker[i] // WIDTH, marker[i] % WIDTH
        col = WIDTH - 1 - col if mirror else col
        assert torch.equal(images_out[i, :, 0].flatten(1).argmax(1), row * WIDTH + col)
    with pytest.raises(ValueError, match="batch sizes differ"):
        augment_batch(images, lidar2img[:3], targets, heatmap, regression, weight, torch.Generator())
