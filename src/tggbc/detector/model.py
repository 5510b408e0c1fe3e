"""A small complete PETR detector: CNN backbone, PETR 3D position embedding, PETR decoder.

Small enough to train on a CPU in about an hour on the synthetic scenes, yet with the real
decoder of the hosts (6 layers, 256 channels, 8 heads, FFN 2048), so tgGBC sees the attention
of a trained model. Shape letters: B batch, N cameras, H, W image size, Nk keys, Nq queries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..models.petr import PETRDecoder
from ..models.position import PETRPositionEmbedding
from ..pruner import KeyPruner
from .loss import decode_boxes


@dataclass(frozen=True)
class DetectorConfig:
    image_width: int = 352
    image_height: int = 128
    num_queries: int = 300
    num_classes: int = 10
    embed_dims: int = 256
    num_heads: int = 8
    ffn_dims: int = 2048
    num_layers: int = 6
    backbone_channels: tuple[int, ...] = (24, 48, 96, 192)  # stem + three one-block stages, stride 16
    max_detections: int = 300
    dropout: float = 0.0  # no dropout: synthetic data is plentiful, and CPU dropout masks cost more than the layers

    @property
    def stride(self) -> int:
        return 2 ** len(self.backbone_channels)

    @property
    def num_keys(self) -> int:
        """Keys per frame: six cameras x (H / stride) x (W / stride)."""
        return 6 * (self.image_height // self.stride) * (self.image_width // self.stride)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectorConfig:
        d = dict(d)
        d["backbone_channels"] = tuple(d["backbone_channels"])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown detector config fields {sorted(unknown)}")
        return cls(**d)


class BasicBlock(nn.Module):
    """ResNet basic block; the first conv strides when the block downsamples."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class Backbone(nn.Module):
    """Images [B*N, 3, H, W] -> features [B*N, C_last, H / 2^S, W / 2^S]: a conv stem, then one
    strided basic block per stage. Small on purpose: the detector must train on two CPU cores."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        stages, cin = [], 3
        for i, cout in enumerate(channels):
            if i == 0:  # stem: one plain conv
                stages.append(
                    nn.Sequential(
                        nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
                    )
                )
            else:
                stages.append(BasicBlock(cin, cout, 2))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.out_channels = cin

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)


class Detections(NamedTuple):
    """Top-scoring boxes of one sample, lidar frame. M = max_detections."""

    center: Tensor  # [M, 3]
    size: Tensor  # [M, 3] w, l, h
    yaw: Tensor  # [M]
    velocity: Tensor  # [M, 2]
    score: Tensor  # [M]
    label: Tensor  # [M] long


# ImageNet-style normalisation constants: the synthetic images are ordinary 8-bit RGB.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class PETRDetector(nn.Module):
    """Six images + camera geometry -> per-layer class logits and boxes (PETRDecoder outputs).

    Args:
        config: DetectorConfig.
        pruner: tgGBC setting for the decoder (None: dense); swap it through `decoder.pruner`.
    """

    def __init__(self, config: DetectorConfig = DetectorConfig(), pruner: KeyPruner | None = None):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config.backbone_channels)
        self.position = PETRPositionEmbedding(in_channels=self.backbone.out_channels, embed_dims=config.embed_dims)
        self.decoder = PETRDecoder(
            num_layers=config.num_layers,
            embed_dims=config.embed_dims,
            num_heads=config.num_heads,
            ffn_dims=config.ffn_dims,
            dropout=config.dropout,
            num_classes=config.num_classes,
            num_queries=config.num_queries,
            pruner=pruner,
        )
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def keys(self, images: Tensor, lidar2img: Tensor):
        """Decoder keys of a batch of frames.

        Args:
            images: [B, N, 3, H, W] uint8 or float in [0, 1].
            lidar2img: [B, N, 4, 4].
        Returns:
            DecoderKeys with memory, key_pos [B, N*h*w, E].
        """
        b, n, _, h, w = images.shape
        if (w, h) != (self.config.image_width, self.config.image_height):
            raise ValueError(
                f"images are {w}x{h} but the detector was built for "
                f"{self.config.image_width}x{self.config.image_height}: shape {tuple(images.shape)}"
            )
        x = images.flatten(0, 1)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (x - self.mean) / self.std
        feats = self.backbone(x.to(self.mean.dtype))
        feats = feats.view(b, n, *feats.shape[1:])
        return self.position(feats, lidar2img, (h, w))

    def forward(self, images: Tensor, lidar2img: Tensor, track_keys: bool = False):
        """Per-layer predictions: DecoderOutput with cls_scores [L, B, Nq, C], bbox_preds [L, B, Nq, 10]."""
        keys = self.keys(images, lidar2img)
        return self.decoder(keys.memory, keys.key_pos, keys.key_padding_mask, track_keys=track_keys)

    @torch.no_grad()
    def detections(self, cls_scores: Tensor, bbox_preds: Tensor) -> list[Detections]:
        """NMS-free decoding of the last layer: the top max_detections (query, class) pairs.

        Args:
            cls_scores: [B, Nq, C] logits; bbox_preds: [B, Nq, 10] box code.
        """
        out = []
        num_classes = cls_scores.shape[-1]
        for logits, code in zip(cls_scores, bbox_preds, strict=True):
            scores = logits.float().sigmoid().flatten()
            top = scores.topk(min(self.config.max_detections, scores.numel()))
            query, label = top.indices // num_classes, top.indices % num_classes
            center, size, yaw, velocity = decode_boxes(code[query].float())
            out.append(Detections(center, size, yaw, velocity, top.values, label))
        return out
