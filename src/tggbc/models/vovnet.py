"""VoVNet with effective squeeze-excitation (eSE), as the StreamPETR repository's vovnet.py builds it.

One-shot aggregation (OSA) blocks: `layer_per_block` 3x3 conv-BN-ReLU layers in a chain, the
block input and every layer output concatenated, a 1x1 conv-BN-ReLU to `concat_ch`, then eSE
(global average pool, 1x1 conv with bias, hard sigmoid relu6(x + 3) / 6, channel scaling). The
second and later blocks of a stage add their input back (identity). Stages 3-5 start with a 3x3
stride-2 max pool with ceil_mode=True (odd sizes round up: 1600x640 -> 40x100 at stride 16).

Parameter names are the original's, including its slashes ("stem.stem_1/conv.weight",
"stage4.OSA4_2.layers.0.OSA4_2_0/norm.running_mean", "stage5.OSA5_1.ese.fc.bias"), so the
`img_backbone.` slice of a published checkpoint loads as it is. `VoVNetCP` of the configs is the
same network with gradient checkpointing in training; at inference they are identical.

Imports nothing but torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VoVNet", "VOVNET_SPECS", "OSABlock", "EffectiveSE"]

# The original's stage specs (the non-depthwise eSE ones; the PETR family ships V-99-eSE).
VOVNET_SPECS: dict[str, dict] = {
    "V-19-slim-eSE": dict(
        stem=(64, 64, 128),
        stage_conv_ch=(64, 80, 96, 112),
        stage_out_ch=(112, 256, 384, 512),
        layer_per_block=3,
        block_per_stage=(1, 1, 1, 1),
    ),
    "V-19-eSE": dict(
        stem=(64, 64, 128),
        stage_conv_ch=(128, 160, 192, 224),
        stage_out_ch=(256, 512, 768, 1024),
        layer_per_block=3,
        block_per_stage=(1, 1, 1, 1),
    ),
    "V-39-eSE": dict(
        stem=(64, 64, 128),
        stage_conv_ch=(128, 160, 192, 224),
        stage_out_ch=(256, 512, 768, 1024),
        layer_per_block=5,
        block_per_stage=(1, 1, 2, 2),
    ),
    "V-57-eSE": dict(
        stem=(64, 64, 128),
        stage_conv_ch=(128, 160, 192, 224),
        stage_out_ch=(256, 512, 768, 1024),
        layer_per_block=5,
        block_per_stage=(1, 1, 4, 3),
    ),
    "V-99-eSE": dict(
        stem=(64, 64, 128),
        stage_conv_ch=(128, 160, 192, 224),
        stage_out_ch=(256, 512, 768, 1024),
        layer_per_block=5,
        block_per_stage=(1, 3, 9, 3),
    ),
}
STAGE_NAMES = ("stage2", "stage3", "stage4", "stage5")


def conv_bn_relu(
    in_channels: int, out_channels: int, name: str, kernel_size: int = 3, stride: int = 1
) -> list[tuple[str, nn.Module]]:
    """(name/conv, name/norm, name/relu): a bias-free conv, BatchNorm2d, ReLU, under the original's names."""
    return [
        (
            f"{name}/conv",
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        ),
        (f"{name}/norm", nn.BatchNorm2d(out_channels)),
        (f"{name}/relu", nn.ReLU(inplace=True)),
    ]


class EffectiveSE(nn.Module):
    """eSE: x * hsigmoid(fc(avgpool(x))), fc a 1x1 conv with bias; [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc(F.adaptive_avg_pool2d(x, 1))  # (B, C, 1, 1), the original's AdaptiveAvgPool2d(1)
        return x * (F.relu6(scale + 3.0) / 6.0)


class OSABlock(nn.Module):
    """One-shot aggregation block (the original's _OSA_module without depthwise convs).

    Args:
        in_ch: input channels.
        stage_ch: width of each 3x3 layer.
        concat_ch: output channels.
        layer_per_block: number of 3x3 layers.
        name: the original's module name ("OSA4_2"), which prefixes its layers' names.
        identity: add the input to the output (every block of a stage but the first).
    """

    def __init__(self, in_ch: int, stage_ch: int, concat_ch: int, layer_per_block: int, name: str, identity: bool):
        super().__init__()
        self.identity = identity
        self.layers = nn.ModuleList()
        channels = in_ch
        for i in range(layer_per_block):
            self.layers.append(nn.Sequential(OrderedDict(conv_bn_relu(channels, stage_ch, f"{name}_{i}"))))
            channels = stage_ch
        self.concat = nn.Sequential(
            OrderedDict(conv_bn_relu(in_ch + layer_per_block * stage_ch, concat_ch, f"{name}_concat", kernel_size=1))
        )
        self.ese = EffectiveSE(concat_ch)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_ch, H, W] -> [B, concat_ch, H, W]."""
        outputs = [x]
        y = x
        for layer in self.layers:
            y = layer(y)
            outputs.append(y)
        y = self.ese(self.concat(torch.cat(outputs, dim=1)))
        return y + x if self.identity else y


class VoVNet(nn.Module):
    """VoVNet-eSE backbone returning the stages in `out_features`.

    Args:
        spec_name: one of VOVNET_SPECS ("V-99-eSE" in the published configs).
        input_ch: image channels.
        out_features: names among "stem", "stage2".."stage5" whose outputs are returned, in
            network order (the configs use ("stage4", "stage5"): strides 16 and 32, 768 and 1024
            channels).
        frozen_stages: stem (0) and stages 2..frozen_stages+1 get no gradient and stay in eval mode.
        norm_eval: keep every BatchNorm in eval mode under `.train()`.

    Input [B, 3, H, W]; output: a list of feature maps, one per name in out_features.
    """

    def __init__(
        self,
        spec_name: str = "V-99-eSE",
        input_ch: int = 3,
        out_features: Sequence[str] = ("stage4", "stage5"),
        frozen_stages: int = -1,
        norm_eval: bool = True,
    ):
        super().__init__()
        if spec_name not in VOVNET_SPECS:
            raise ValueError(f"unknown VoVNet spec {spec_name!r}; known: {sorted(VOVNET_SPECS)}")
        known = ("stem",) + STAGE_NAMES
        if not out_features or any(f not in known for f in out_features):
            raise ValueError(f"out_features must name some of {list(known)}, got {list(out_features)}")
        spec = VOVNET_SPECS[spec_name]
        self.spec_name, self.out_features = spec_name, tuple(out_features)
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        stem_ch = spec["stem"]
        stem = conv_bn_relu(input_ch, stem_ch[0], "stem_1", stride=2)
        stem += conv_bn_relu(stem_ch[0], stem_ch[1], "stem_2", stride=1)
        stem += conv_bn_relu(stem_ch[1], stem_ch[2], "stem_3", stride=2)
        self.stem = nn.Sequential(OrderedDict(stem))
        in_ch = (stem_ch[2],) + tuple(spec["stage_out_ch"][:-1])
        for i, name in enumerate(STAGE_NAMES):
            self.add_module(
                name,
                self._make_stage(
                    in_ch[i],
                    spec["stage_conv_ch"][i],
                    spec["stage_out_ch"][i],
                    spec["block_per_stage"][i],
                    spec["layer_per_block"],
                    i + 2,
                ),
            )
        channels = {"stem": stem_ch[2], **dict(zip(STAGE_NAMES, spec["stage_out_ch"], strict=True))}
        self.out_channels = tuple(channels[f] for f in self.out_features)
        self._freeze_stages()

    @staticmethod
    def _make_stage(in_ch: int, stage_ch: int, concat_ch: int, blocks: int, layer_per_block: int, stage_num: int):
        stage = nn.Sequential()
        if stage_num != 2:
            stage.add_module("Pooling", nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
        for j in range(blocks):
            name = f"OSA{stage_num}_{j + 1}"
            stage.add_module(
                name, OSABlock(in_ch if j == 0 else concat_ch, stage_ch, concat_ch, layer_per_block, name, j > 0)
            )
        return stage

    def _freeze_stages(self) -> None:
        frozen = (["stem"] if self.frozen_stages >= 0 else []) + [
            f"stage{i + 1}" for i in range(1, self.frozen_stages + 1)
        ]
        for name in frozen:
            m = getattr(self, name)
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> VoVNet:
        """As the original: frozen stages and (with norm_eval) every BatchNorm stay in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """[B, input_ch, H, W] normalised images -> the outputs named in out_features."""
        first = self.stem[0]
        if x.dim() != 4 or x.shape[1] != first.in_channels:
            raise ValueError(f"VoVNet input must be [B, {first.in_channels}, H, W], got {tuple(x.shape)}")
        outputs = []
        x = self.stem(x)
        if "stem" in self.out_features:
            outputs.append(x)
        for name in STAGE_NAMES:
            x = getattr(self, name)(x)
            if name in self.out_features:
                outputs.append(x)
        return outputs
