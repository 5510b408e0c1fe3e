"""PETR's box code: (cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy), centres in metres."""

from __future__ import annotations

import torch
from torch import Tensor

# Boxes the decoder can represent: its centres are decoded into pc_range, x and y within this.
XY_LIMIT = 51.2


def encode_boxes(center: Tensor, size: Tensor, yaw: Tensor, velocity: Tensor) -> Tensor:
    """Boxes -> PETR box code.

    Args:
        center: [M, 3] box centres (x, y, z) in metres, lidar frame.
        size: [M, 3] (w, l, h) in metres.
        yaw: [M] heading in radians.
        velocity: [M, 2] (vx, vy) in m/s.
    Returns:
        [M, 10] (cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy).
    """
    logs = size.clamp_min(1e-3).log()
    return torch.cat(
        [center[:, :2], logs[:, :2], center[:, 2:3], logs[:, 2:3], yaw.sin()[:, None], yaw.cos()[:, None], velocity],
        dim=1,
    )


def decode_boxes(code: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PETR box code [..., 10] -> (center [..., 3], size wlh [..., 3], yaw [...], velocity [..., 2])."""
    center = torch.stack([code[..., 0], code[..., 1], code[..., 4]], dim=-1)
    size = torch.stack([code[..., 2], code[..., 3], code[..., 5]], dim=-1).clamp(max=6.0).exp()
    yaw = torch.atan2(code[..., 6], code[..., 7])
    return center, size, yaw, code[..., 8:10]
