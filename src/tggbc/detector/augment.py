"""Training-time augmentation: colour jitter.

The small detector overfits its training frames: run 4 scores mAP 0.34 on the 2,400 frames it
trained on and 0.21 on val (`tggbc eval --split train`, README). More frames are the main cure
(run 6 trains on 5,600); varied lighting is a cheap second one that keeps the images in the
generator's distribution (its scenes already vary brightness and haze).

Not done: mirroring frames left-right. It is exact geometry (flip every image, reflect the lidar
frame's y, adjust lidar2img), but the generator's worlds are not mirror-symmetric (traffic keeps to
one side of the road), and the renderer puts pixel centres at integer coordinates while the dense
targets put cell centres at (c + 0.5) * stride, so the flipped targets would sit one pixel off
the flipped image.
"""

from __future__ import annotations

import torch
from torch import Tensor


def jitter_colors(images: Tensor, generator: torch.Generator, strength: float = 0.2) -> Tensor:
    """Random brightness, contrast and per-channel gain for every camera image.

    Args:
        images: [B, N, 3, H, W] float in [0, 1].
        strength: brightness and contrast factors are drawn from [1 - strength, 1 + strength],
            channel gains from [1 - strength / 4, 1 + strength / 4].
    Returns:
        [B, N, 3, H, W] float in [0, 1].
    """
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"images must be [B, N, 3, H, W], got {list(images.shape)}")
    if not 0.0 <= strength < 1.0:
        raise ValueError(f"strength must lie in [0, 1), got {strength}")
    b, n = images.shape[:2]

    def draw(*shape: int, spread: float) -> Tensor:
        u = torch.rand(*shape, generator=generator).to(images.device, images.dtype)
        return 1.0 + spread * (2.0 * u - 1.0)

    brightness = draw(b, n, 1, 1, 1, spread=strength)
    contrast = draw(b, n, 1, 1, 1, spread=strength)
    gain = draw(b, n, 3, 1, 1, spread=strength / 4)
    mean = images.mean(dim=(2, 3, 4), keepdim=True)
    out = ((images - mean) * contrast + mean) * brightness * gain
    return out.clamp(0.0, 1.0)
