"""ResNet as mmdetection 2.x builds it (`mmdet.models.backbones.ResNet`), for the PETR-family detectors.

Parameter names are mmdet's (which are torchvision's): `conv1`, `bn1`, `layer{1..4}.{j}.conv{1,2,3}`,
`.bn{1,2,3}`, `.downsample.{0,1}`, so a `img_backbone.` slice of a published checkpoint loads
as it is. BatchNorm2d everywhere (the configs' `BN2d`, eps 1e-5), no bias in any convolution.

Two details decide whether published weights reproduce their features:
- style "pytorch" puts a block's stride on its 3x3 conv (conv2), "caffe" on its first 1x1 conv
  (conv1); the published StreamPETR / PETR configs use "pytorch".
- norm_eval=True (the configs' setting) keeps every BatchNorm in eval mode even under
  `.train()`: the running statistics of the pretrained backbone are never updated.

Imports nothing but torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ResNet", "Bottleneck", "RESNET_DEPTHS"]

# depth -> blocks per stage (all Bottleneck; the PETR family ships no BasicBlock ResNet).
RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STYLES = ("pytorch", "caffe")


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block with expansion 4 (mmdet's Bottleneck without plugins or DCN).

    Args:
        inplanes: input channels.
        planes: width of the 1x1/3x3 convs; the output has 4 * planes channels.
        stride: of the block (on conv2 for style "pytorch", on conv1 for "caffe").
        dilation: of the 3x3 conv.
        downsample: the shortcut projection (Sequential(conv 1x1, BN)) or None for identity.
        style: "pytorch" or "caffe".
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        style: str = "pytorch",
    ):
        super().__init__()
        conv1_stride, conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=conv1_stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, kernel_size=3, stride=conv2_stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """[B, inplanes, H, W] -> [B, 4 * planes, H / stride, W / stride]."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-50/101/152 backbone returning the stages in `out_indices` (mmdet 2.x semantics).

    Args:
        depth: 50, 101 or 152.
        in_channels: image channels.
        num_stages: residual stages built (1..4).
        strides, dilations: of the first block of each stage.
        out_indices: stages whose outputs are returned (0-based; the PETR-family configs use (2, 3):
            strides 16 and 32, 1024 and 2048 channels).
        style: "pytorch" (stride on the 3x3 conv) or "caffe" (stride on the first 1x1 conv).
        frozen_stages: stem and stages up to this index get no gradient and stay in eval mode
            (-1: none frozen).
        norm_eval: keep every BatchNorm in eval mode under `.train()`.

    Input [B, 3, H, W]; output: a tuple of [B, 256 * 2**i, H / 2**(i+2), W / 2**(i+2)] for i in
    out_indices (with the default strides).
    """

    def __init__(
        self,
        depth: int = 50,
        in_channels: int = 3,
        num_stages: int = 4,
        strides: Sequence[int] = (1, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1),
        out_indices: Sequence[int] = (0, 1, 2, 3),
        style: str = "pytorch",
        frozen_stages: int = -1,
        norm_eval: bool = True,
    ):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth!r}")
        if style not in STYLES:
            raise ValueError(f"ResNet style must be one of {list(STYLES)}, got {style!r}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f"num_stages must lie in 1..4, got {num_stages}")
        if len(strides) != num_stages or len(dilations) != num_stages:
            raise ValueError(f"strides {list(strides)} and dilations {list(dilations)} need {num_stages} entries each")
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices must name stages in 0..{num_stages - 1}, got {list(out_indices)}")
        self.depth, self.style, self.num_stages = depth, style, num_stages
        self.out_indices = tuple(out_indices)
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval

        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        self.res_layers: list[str] = []
        for i, num_blocks in enumerate(RESNET_DEPTHS[depth][:num_stages]):
            planes = 64 * 2**i
            layer = self._make_layer(inplanes, planes, num_blocks, strides[i], dilations[i], style)
            inplanes = planes * Bottleneck.expansion
            name = f"layer{i + 1}"
            self.add_module(name, layer)
            self.res_layers.append(name)
        self.out_channels = tuple(256 * 2**i for i in self.out_indices)
        self._freeze_stages()

    @staticmethod
    def _make_layer(inplanes: int, planes: int, num_blocks: int, stride: int, dilation: int, style: str):
        downsample = None
        if stride != 1 or inplanes != planes * Bottleneck.expansion:
            # mmdet's ResLayer with avg_down=False: a strided 1x1 conv and a BN on the shortcut.
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        blocks = [Bottleneck(inplanes, planes, stride, dilation, downsample, style)]
        inplanes = planes * Bottleneck.expansion
        blocks += [Bottleneck(inplanes, planes, 1, dilation, None, style) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            for m in (self.conv1, self.bn1):
                m.eval()
                for p in m.parameters():
                    p.requires_grad_(False)
        for i in range(1, self.frozen_stages + 1):
            m = getattr(self, f"layer{i}")
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        """As mmdet: frozen stages and (with norm_eval) every BatchNorm stay in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """[B, 3, H, W] normalised images -> the stages in out_indices."""
        if x.dim() != 4 or x.shape[1] != self.conv1.in_channels:
            raise ValueError(f"ResNet input must be [B, {self.conv1.in_channels}, H, W], got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
