"""Colour jitter for training: in range, per camera, monotone, and off at strength 0."""

import pytest
import torch

from tggbc.detector.augment import jitter_colors


def test_jitter_keeps_range_and_strength_zero_is_identity():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 6, 3, 8, 16, generator=g)
    out = jitter_colors(images, g, strength=0.4)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, images)
    assert torch.allclose(jitter_colors(images, g, strength=0.0), images)


def test_jitter_is_monotone_within_each_camera_and_channel_and_differs_between_cameras():
    # Values in [0.1, 0.4] (mean near 0.25): contrast 1.2 keeps them above 0 and the largest factors
    # (1.2 x 1.2 x 1.05) below 1, so nothing is clamped.
    images = 0.1 + torch.rand(1, 6, 3, 10, 10, generator=torch.Generator().manual_seed(0)) * 0.3
    out = jitter_colors(images, torch.Generator().manual_seed(1))
    flat_in, flat_out = images.flatten(3), out.flatten(3)
    assert torch.equal(flat_in.argsort(-1), flat_out.argsort(-1))  # each image's pixel order survives
    # An affine map per camera and channel: out = a * in + b, fitted from its darkest and brightest pixels.
    low, high = flat_in.argmin(-1, keepdim=True), flat_in.argmax(-1, keepdim=True)
    a = ((flat_out.gather(-1, high) - flat_out.gather(-1, low)) / (flat_in.gather(-1, high) - flat_in.gather(-1, low)))[
        ..., 0
    ]
    b = flat_out.gather(-1, low)[..., 0] - a * flat_in.gather(-1, low)[..., 0]
    assert torch.allclose(flat_out, a[..., None] * flat_in + b[..., None], atol=1e-5)
    assert a[0, :, 0].unique().numel() == 6  # every camera drew its own factors


def test_jitter_rejects_bad_input():
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"\[B, N, 3, H, W\]"):
        jitter_colors(torch.rand(6, 3, 8, 16), g)
    with pytest.raises(ValueError, match="strength"):
        jitter_colors(torch.rand(1, 6, 3, 8, 16), g, strength=1.5)
