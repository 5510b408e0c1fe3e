"""The synthetic-scene detector: a PETR whose decoder must read the image.

Six images -> a small ResNet-style backbone (stride 16, frozen in training) -> PETR's 3D
position embedding -> PETR's decoder. The queries are the hosts' kind: learned content at learned
3D anchors, the same for every frame. Nothing about a frame reaches a query except through
cross-attention, and the detection score is the decoder's own class probability, which is what
tgGBC's importance reads. Shape letters: B batch, N cameras, H, W image size, h, w keys per
camera, Nk keys, Nq queries, E channels, C classes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.decoder import DecoderOutput
from ..models.petr import PETRDecoder
from ..models.position import DecoderKeys, PETRPositionEmbedding
from ..pruner import KeyPruner
from .boxes import decode_boxes
from .config import DecodeConfig, DetectorConfig

# ImageNet-style normalisation: the synthetic images are ordinary 8-bit RGB.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


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
    """Images [B*N, 3, H, W] -> features [B*N, C_last, H / 2^S, W / 2^S]: a strided conv stem, then
    stages of basic blocks, the first of each strided. Small on purpose: two CPU cores run it."""

    def __init__(self, channels: tuple[int, ...], blocks: tuple[int, ...]):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(True))
        stages, cin = [stem], channels[0]
        for cout, count in zip(channels[1:], blocks, strict=True):
            stages.append(
                nn.Sequential(BasicBlock(cin, cout, 2), *(BasicBlock(cout, cout, 1) for _ in range(count - 1)))
            )
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.out_channels = cin

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)


class Detections(NamedTuple):
    """The top-scoring boxes of one frame, lidar frame. M = max_detections."""

    center: Tensor  # [M, 3]
    size: Tensor  # [M, 3] w, l, h
    yaw: Tensor  # [M]
    velocity: Tensor  # [M, 2]
    score: Tensor  # [M]
    label: Tensor  # [M] long


class Detector(nn.Module):
    """Six images + camera geometry -> per-layer class logits and boxes.

    Args:
        config: the architecture.
        pruner: tgGBC (or a baseline) for the decoder; None is the unpruned decoder. Give a
            built model another one with `tggbc.pruning(detector.decoder, ...)`.
        dropout: the decoder's dropout rate (training only; 0 in the shipped recipe).
    """

    def __init__(
        self, config: DetectorConfig = DetectorConfig(), pruner: KeyPruner | None = None, dropout: float = 0.0
    ):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config.backbone_channels, config.backbone_blocks)
        self.position = PETRPositionEmbedding(in_channels=self.backbone.out_channels, embed_dims=config.embed_dims)
        # Learned query content, one vector per anchor (the anchors are decoder.reference_points);
        # it starts at the hosts' zero target.
        self.query = nn.Embedding(config.num_queries, config.embed_dims)
        nn.init.zeros_(self.query.weight)
        self.decoder = PETRDecoder(
            num_layers=config.num_layers,
            embed_dims=config.embed_dims,
            num_heads=config.num_heads,
            ffn_dims=config.ffn_dims,
            dropout=dropout,
            num_classes=config.num_classes,
            num_queries=config.num_queries,
            pruner=pruner,
        )
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, images: Tensor) -> Tensor:
        """Backbone features at the keys' stride.

        Args:
            images: [B, N, 3, H, W] uint8, or float in [0, 1].
        Returns:
            [B, N, C_b, h, w].
        """
        cfg = self.config
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [B, N, 3, H, W], got {tuple(images.shape)}")
        b, n, _, h, w = images.shape
        if (w, h) != (cfg.image_width, cfg.image_height):
            raise ValueError(
                f"images are {w}x{h} but the detector was built for {cfg.image_width}x{cfg.image_height}: "
                f"shape {tuple(images.shape)}"
            )
        x = images.flatten(0, 1)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = ((x - self.mean) / self.std).to(self.mean.dtype)
        feats = self.backbone(x)
        return feats.view(b, n, *feats.shape[1:])

    def keys(self, features: Tensor, lidar2img: Tensor) -> DecoderKeys:
        """Decoder keys: projected features and their 3D position embedding, [B, Nk, E] each.

        Args:
            features: [B, N, C_b, h, w] from `features`.
            lidar2img: [B, N, 4, 4].
        """
        cfg = self.config
        if lidar2img.shape != (*features.shape[:2], 4, 4):
            raise ValueError(
                f"lidar2img must be [B, N, 4, 4] = {[*features.shape[:2], 4, 4]}, got {list(lidar2img.shape)}"
            )
        batch = lidar2img.shape[0]
        # One rig for the whole batch (the synthetic scenes have one): the position embedding,
        # a fifth of a training step, depends on the cameras only, so compute it once.
        shared = batch > 1 and bool((lidar2img == lidar2img[:1]).all())
        rig = lidar2img[:1] if shared else lidar2img
        key_pos, _, outside = self.position.embed(rig, features.shape[-2:], (cfg.image_height, cfg.image_width))
        if shared:
            key_pos, outside = key_pos.expand(batch, -1, -1), outside.expand(batch, -1)
        return DecoderKeys(self.position.project(features), key_pos, None, outside)

    def decode(
        self,
        keys: DecoderKeys,
        *,
        extra_query: Tensor | None = None,
        extra_reference_points: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        track_keys: bool = False,
    ) -> DecoderOutput:
        """The decoder over the learned queries, with whatever pruner it holds.

        Args:
            keys: from `keys`.
            extra_query, extra_reference_points: [B, Nd, E] and [B, Nd, 3] queries placed before
                the learned ones (training's denoising queries), or None.
            self_attn_mask: [Nd + Nq, Nd + Nq] bool, True where a query must not attend.
            track_keys: also return which keys each layer saw.
        Returns:
            DecoderOutput over the Nd + Nq queries.
        """
        batch = keys.memory.shape[0]
        query = self.query.weight.unsqueeze(0).expand(batch, -1, -1)  # (B, Nq, E)
        reference_points = self.decoder.reference_points.weight.unsqueeze(0).expand(batch, -1, -1)  # (B, Nq, 3)
        if extra_query is not None:
            query = torch.cat([extra_query.to(query.dtype), query], dim=1)
            reference_points = torch.cat([extra_reference_points.to(reference_points.dtype), reference_points], dim=1)
        return self.decoder(
            keys.memory,
            keys.key_pos,
            keys.key_padding_mask,
            query=query,
            reference_points=reference_points,
            track_keys=track_keys,
            self_attn_mask=self_attn_mask,
        )

    def forward(self, images: Tensor, lidar2img: Tensor, track_keys: bool = False) -> DecoderOutput:
        """Per-layer predictions: cls_scores [L, B, Nq, C], bbox_preds [L, B, Nq, 10] (PETR box code)."""
        if lidar2img.shape != (*images.shape[:2], 4, 4):
            raise ValueError(
                f"lidar2img must be [B, N, 4, 4] = {[*images.shape[:2], 4, 4]}, got {list(lidar2img.shape)}"
            )
        return self.decode(self.keys(self.features(images), lidar2img), track_keys=track_keys)

    @torch.no_grad()
    def detections(
        self, cls_scores: Tensor, bbox_preds: Tensor, decode: DecodeConfig = DecodeConfig()
    ) -> list[Detections]:
        """NMS-free decoding of one layer: the top max_detections (query, class) pairs by sigmoid score.

        Args:
            cls_scores: [B, Nq, C] logits; bbox_preds: [B, Nq, 10] box code.
        Returns:
            one Detections per sample.
        """
        out = []
        num_classes = cls_scores.shape[-1]
        for logits, code in zip(cls_scores.float(), bbox_preds.float(), strict=True):
            scores = F.sigmoid(logits).flatten()
            top = scores.topk(min(decode.max_detections, scores.numel()))
            query, label = top.indices // num_classes, top.indices % num_classes
            center, size, yaw, velocity = decode_boxes(code[query])
            out.append(Detections(center, size, yaw, velocity, top.values, label))
        return out
