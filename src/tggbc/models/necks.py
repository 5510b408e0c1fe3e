"""CPFPN, the StreamPETR repository's trimmed feature pyramid (projects/mmdet3d_plugin/models/necks/cp_fpn.py).

An FPN whose 3x3 output convolution exists only on the first (finest) level: every level gets a
1x1 lateral conv (with bias, no norm, no activation), coarser laterals are added to finer ones
after a nearest-neighbour resize to the finer size, then level 0 goes through `fpn_convs.0` and
the other levels are returned as they are. The detectors read level 0 only (stride 16).

Parameter names are the original's (`lateral_convs.i.conv.*`, `fpn_convs.0.conv.*`, from mmcv's
ConvModule), so the `img_neck.` slice of a published checkpoint loads as it is. The configs use
neither extra levels nor norms; those options of the original are left out.

Imports nothing but torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CPFPN", "ConvModule"]


class ConvModule(nn.Module):
    """mmcv's ConvModule without norm and activation: just `conv` (with bias), under that name."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class CPFPN(nn.Module):
    """Feature pyramid with a 3x3 output conv on level 0 only.

    Args:
        in_channels: channels of each backbone level, finest first ([1024, 2048] for ResNet-50
            stages 3-4, [768, 1024] for VoVNet-99 stages 4-5).
        out_channels: channels of every output level (256).
        num_outs: output levels; must equal len(in_channels) (the configs add no extra level).

    Input: a sequence of [B, in_channels[i], H_i, W_i]; output: a tuple of [B, out_channels, H_i, W_i].
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int | None = None):
        super().__init__()
        in_channels = list(in_channels)
        if not in_channels:
            raise ValueError("CPFPN needs at least one input level")
        if num_outs is not None and num_outs != len(in_channels):
            raise ValueError(
                f"num_outs={num_outs} != {len(in_channels)} input levels: extra pyramid levels are not supported"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList([ConvModule(out_channels, out_channels, 3, padding=1)])

    def forward(self, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Backbone levels (finest first) -> pyramid levels of out_channels each."""
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"CPFPN expects {len(self.in_channels)} input levels, got {len(inputs)}")
        for i, (x, c) in enumerate(zip(inputs, self.in_channels, strict=True)):
            if x.dim() != 4 or x.shape[1] != c:
                raise ValueError(f"CPFPN input level {i} must be [B, {c}, H, W], got {tuple(x.shape)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down, coarsest first
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="nearest"
            )
        return tuple(self.fpn_convs[0](x) if i == 0 else x for i, x in enumerate(laterals))
