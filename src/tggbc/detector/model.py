"""A small complete PETR detector: CNN backbone, PETR 3D position embedding, PETR decoder.

Small enough to train on a CPU in about an hour on the synthetic scenes, yet with the real
decoder of the hosts (6 layers, 256 channels, 8 heads, FFN 2048), so tgGBC sees the attention
of a trained model. Shape letters: B batch, N cameras, H, W image size, Nk keys, Nq queries.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.petr import PETRDecoder
from ..models.position import PETRPositionEmbedding
from ..pruner import KeyPruner
from .dense import (
    GEOMETRY_CHANNELS,
    REG_CHANNELS,
    camera_geometry,
    cell_centres,
    cell_values,
    ground_ray_depth,
    key_index,
    select_proposals,
)
from .loss import decode_boxes

MAX_BOXES_PER_SAMPLE = 500  # nuScenes detection config: max_boxes_per_sample


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
    backbone_channels: tuple[int, ...] = (32, 64, 128, 224)  # stem + three stages, stride 16
    backbone_blocks: tuple[int, ...] = (1, 1, 2)  # basic blocks per stage after the stem
    head_channels: int = 64  # hidden width of the dense token head
    # The dense head on a grid twice as fine as the keys' (stride 8 under stride-16 keys), from the
    # backbone's second-last stage plus the upsampled last one: far objects are a few pixels wide.
    fine_head: bool = False
    # With the fine head: a deeper trunk on its grid that also reads the backbone's stride-4 stage
    # (space-to-depth, so each stride-8 cell sees its 2x2 stride-4 pixels), added to the head's class
    # and regression outputs through 1x1 convs that start at zero. Beyond 30 m the head's depth was
    # the detector's bottleneck: the decoder keeps its proposals' range (measured: README).
    detail_head: bool = False
    # With the detail trunk: it also regresses the image row of each object's ground contact point
    # (the centre of the box's bottom face) and a gate. The ray through that pixel meets the flat
    # road at the object's depth, so a row found to a pixel fixes the depth to f h / (v - v0)^2 per
    # pixel (10% at 45 m on the 352x128 rig), where reading depth off a far object's appearance was
    # 28% off and biased near (measured: README). Depth = direct^(1 - g) * geometric^g, g learned.
    ground_contact: bool = False
    ground_z: float = -1.84  # the road's height in the lidar frame (nuScenes' LIDAR_TOP is 1.84 m up)
    # Boxes reported per frame; the devkit's detection config refuses more than 500 per sample.
    max_detections: int = 300
    # Each peak query's content also carries the dense head's class logits at the cell it was
    # selected from (through a linear map that starts at zero): the decoder's keys sit at stride 16,
    # where a far object shares its token with its surroundings, while the head classifies at its own grid.
    proposal_class: bool = False
    # Detection score per class: sigmoid(decoder logit)^(1 - w) * sigmoid(dense head logit at the
    # query's proposal cell)^w. 0 is the decoder alone; 0.5 is the geometric mean of the two stages'
    # scores, as CenterNet2 scores its detections. tgGBC is unaffected: it ranks queries by the
    # decoder's own logits inside the decoder, and the dense head does not depend on the pruning.
    dense_score_weight: float = 0.0
    # None: a cell proposes an object where its best class score is a 3x3 local maximum. A
    # probability t: also where one class alone peaks with probability at least t (`proposal_peaks`).
    class_peak_threshold: float | None = None
    dropout: float = 0.0  # no dropout: synthetic data is plentiful, and CPU dropout masks cost more than the layers

    def __post_init__(self):
        if not 0.0 <= self.dense_score_weight <= 1.0:
            raise ValueError(f"dense_score_weight must lie in [0, 1], got {self.dense_score_weight}")
        if self.detail_head and not self.fine_head:
            raise ValueError("detail_head=True needs fine_head=True (the detail trunk runs on the stride-8 grid)")
        if self.ground_contact and not self.detail_head:
            raise ValueError("ground_contact=True needs detail_head=True (the detail trunk regresses the contact row)")
        if self.detail_head and len(self.backbone_channels) < 3:
            raise ValueError(f"detail_head=True needs a stride-4 stage: backbone_channels {self.backbone_channels}")
        if not 1 <= self.max_detections <= MAX_BOXES_PER_SAMPLE:
            raise ValueError(
                f"max_detections must lie in [1, {MAX_BOXES_PER_SAMPLE}] (the devkit's cap), got {self.max_detections}"
            )
        t = self.class_peak_threshold
        if t is not None and not 0.0 < t < 1.0:
            raise ValueError(f"class_peak_threshold must be None or lie in (0, 1), got {t}")

    @property
    def stride(self) -> int:
        return 2 ** len(self.backbone_channels)

    @property
    def head_stride(self) -> int:
        """Pixels per cell of the dense head's grid."""
        return self.stride // 2 if self.fine_head else self.stride

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
        if "backbone_blocks" in d:
            d["backbone_blocks"] = tuple(d["backbone_blocks"])
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
    """Images [B*N, 3, H, W] -> features [B*N, C_last, H / 2^S, W / 2^S]: a conv stem, then stages
    of basic blocks, the first of each strided. Small on purpose: it must train on two CPU cores."""

    def __init__(self, channels: tuple[int, ...], blocks: tuple[int, ...]):
        super().__init__()
        if len(blocks) != len(channels) - 1 or min(blocks, default=1) < 1:
            raise ValueError(
                f"need one block count >= 1 per stage after the stem: channels {channels}, blocks {blocks}"
            )
        stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(True))
        stages, cin = [stem], channels[0]
        for cout, count in zip(channels[1:], blocks, strict=True):
            stages.append(
                nn.Sequential(BasicBlock(cin, cout, 2), *(BasicBlock(cout, cout, 1) for _ in range(count - 1)))
            )
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.out_channels = cin

    def forward(self, x: Tensor) -> list[Tensor]:
        """Every stage's output, finest first: [B*N, C_s, H / 2^(s+1), W / 2^(s+1)] for stage s."""
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


class DenseHead(nn.Module):
    """Backbone features [B*N, C_in, h, w] and camera geometry [B*N, G, h', w'] -> per-cell class
    logits [B*N, C, h', w'] and regression [B*N, 3, h', w'] (centre offset in cells, log depth as a
    70-degree camera would see it); see `dense.py`.

    With `fine_channels`, the head runs on a grid twice as fine: the features are upsampled and the
    backbone's finer stage [B*N, fine_channels, 2h, 2w] is added through a 1x1 lateral conv (an FPN
    step). The lateral starts at zero, so a head trained at the coarse grid starts from what it knew.

    With `detail_channels` as well, a deeper trunk (`DetailTrunk`) reads the fine-grid features, the
    stride-4 stage [B*N, detail_channels, 4h, 4w] and the geometry, and adds its own class logits
    and regression to the head's; its output convs start at zero, so a trained head starts unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        num_classes: int,
        fine_channels: int | None = None,
        detail_channels: int | None = None,
        ground_contact: bool = False,
    ):
        super().__init__()
        if detail_channels is not None and fine_channels is None:
            raise ValueError("the detail trunk runs on the fine grid: pass fine_channels too")
        if ground_contact and detail_channels is None:
            raise ValueError("the detail trunk regresses the ground contact row: pass detail_channels too")
        self.detail = None
        if detail_channels is not None:
            self.detail = DetailTrunk(
                in_channels + 4 * detail_channels + GEOMETRY_CHANNELS, num_classes, ground_contact=ground_contact
            )
        self.lateral = None
        if fine_channels is not None:
            self.lateral = nn.Conv2d(fine_channels, in_channels, 1)
            nn.init.zeros_(self.lateral.weight)
            nn.init.zeros_(self.lateral.bias)

        def branch(out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(in_channels, hidden, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out, 1)
            )

        self.cls = branch(num_classes)
        self.reg = branch(REG_CHANNELS)
        # The geometry enters each branch's hidden layer through a 1x1 conv (the same as stacking it
        # onto the features), zero at start: a head trained without it starts where it left off.
        self.cls_geometry = nn.Conv2d(GEOMETRY_CHANNELS, hidden, 1)
        self.reg_geometry = nn.Conv2d(GEOMETRY_CHANNELS, hidden, 1)
        for conv in (self.cls_geometry, self.reg_geometry):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls[-1].bias, -2.19)  # CenterNet's prior: p = 0.1 everywhere at start
        nn.init.zeros_(self.reg[-1].weight)
        with torch.no_grad():
            self.reg[-1].bias.copy_(torch.tensor([0.0, 0.0, math.log(20.0)]))  # centre of the cell, 20 m away

    def forward(
        self, feats: Tensor, geometry: Tensor, fine: Tensor | None = None, detail: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if (fine is None) != (self.lateral is None):
            raise ValueError("pass the finer stage's features exactly when the head was built with fine_channels")
        if (detail is None) != (self.detail is None):
            raise ValueError("pass the stride-4 stage's features exactly when the head was built with detail_channels")
        if fine is not None:
            up = F.interpolate(feats, size=fine.shape[-2:], mode="bilinear", align_corners=False)
            feats = up + self.lateral(fine)

        def run(branch: nn.Sequential, extra: nn.Conv2d) -> Tensor:
            conv, relu, out = branch
            return out(relu(conv(feats) + extra(geometry)))

        cls, reg = run(self.cls, self.cls_geometry), run(self.reg, self.reg_geometry)
        if self.detail is not None:
            extra_cls, extra_reg = self.detail(torch.cat([feats, F.pixel_unshuffle(detail, 2), geometry], 1))
            cls, reg = cls + extra_cls, reg + extra_reg[:, :REG_CHANNELS]
            if extra_reg.shape[1] > REG_CHANNELS:  # a ground-contact trunk: its contact row and gate
                reg = torch.cat([reg, extra_reg[:, REG_CHANNELS:]], 1)
        return cls, reg


_GATE_INIT = -4.0  # sigmoid(-4) = 0.018


class DetailTrunk(nn.Module):
    """[B*N, C_in, h, w] -> (class logits [B*N, C, h, w], regression [B*N, 3, h, w]), both exactly
    zero until trained: a 1x1 reduction, two 3x3 convs (a 5x5-cell view), zero-initialised outputs.

    With `ground_contact` the regression has two channels more: the contact row's offset from the
    cell centre, in cells (0 at start: the cell's own ground depth), and the gate's logit (-4 at
    start, so a trained head's depth starts 98% where it was).
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 96, ground_contact: bool = False):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, 1, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, 1, 1),
            nn.ReLU(inplace=True),
        )
        self.cls = nn.Conv2d(hidden, num_classes, 1)
        self.reg = nn.Conv2d(hidden, REG_CHANNELS, 1)
        # A separate conv, not two more rows of `reg`: weights trained without it still load.
        self.contact = nn.Conv2d(hidden, 2, 1) if ground_contact else None
        for conv in (self.cls, self.reg, self.contact):
            if conv is not None:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
        if self.contact is not None:
            with torch.no_grad():
                self.contact.bias[1] = _GATE_INIT

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.trunk(x)
        reg = self.reg(x)
        if self.contact is not None:
            reg = torch.cat([reg, self.contact(x)], 1)
        return self.cls(x), reg


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """x in the forward pass; its gradient multiplied by `scale` in the backward pass."""
    if scale == 0.0:
        return x.detach()
    if scale == 1.0:
        return x
    return x * scale + x.detach() * (1.0 - scale)


class DecoderInputs(NamedTuple):
    """What `PETRDetector.inputs` computes from a batch of frames.

    memory, key_pos: [B, Nk, E] keys; key_padding_mask: [B, Nk] or None.
    query: [B, Nq, E] initial targets; reference_points: [B, Nq, 3] normalised anchors.
    heatmap: [B, N, C, h', w'] dense class logits and regression: [B, N, 3, h', w'] on the head's
    grid; proposals: [B, Nq] the key (token) each query was selected from; proposal_cells: [B, Nq]
    the head-grid cell (camera-major) it was selected from; proposal_logits: [B, Nq, C] the dense
    head's class logits at that cell.
    """

    memory: Tensor
    key_pos: Tensor
    key_padding_mask: Tensor | None
    query: Tensor
    reference_points: Tensor
    heatmap: Tensor
    regression: Tensor
    proposals: Tensor
    proposal_cells: Tensor
    proposal_logits: Tensor


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
        self.backbone = Backbone(config.backbone_channels, config.backbone_blocks)
        fine = config.backbone_channels[-2] if config.fine_head else None
        detail = config.backbone_channels[-3] if config.detail_head else None
        self.head = DenseHead(
            self.backbone.out_channels, config.head_channels, config.num_classes, fine, detail, config.ground_contact
        )
        # Query content from the selected tokens' features (their class evidence), not zeros.
        self.query_proj = nn.Sequential(
            nn.Linear(config.embed_dims, config.embed_dims), nn.LayerNorm(config.embed_dims)
        )
        self.proposal_class = None
        if config.proposal_class:
            self.proposal_class = nn.Linear(config.num_classes, config.embed_dims)
            nn.init.zeros_(self.proposal_class.weight)  # a model trained without it starts where it was
            nn.init.zeros_(self.proposal_class.bias)
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

    def dense(self, images: Tensor, lidar2img: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Backbone and dense token head.

        Args:
            images: [B, N, 3, H, W] uint8 or float in [0, 1].
            lidar2img: [B, N, 4, 4].
        Returns:
            features [B, N, C_b, h, w] at the keys' stride, heatmap logits [B, N, C, h', w'] and
            regression [B, N, 3, h', w'] at the head's stride (offsets in cells, log depth in metres
            of each camera's own depth). A ground-contact head's regression has CONTACT_CHANNELS
            more (see `dense.py`); the first three are then the fused estimate.
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
        if lidar2img.shape != (b, n, 4, 4):
            raise ValueError(f"lidar2img must be [B, N, 4, 4] = {[b, n, 4, 4]}, got {list(lidar2img.shape)}")
        stages = self.backbone(x.to(self.mean.dtype))  # finest first; the keys' stride last
        feats = stages[-1]
        fine = stages[-2] if self.config.fine_head else None
        detail = stages[-3] if self.config.detail_head else None
        geometry, log_focal = camera_geometry(lidar2img, (w, h), self.config.head_stride, self.config.ground_z)
        heatmap, regression = self.head(feats, geometry.flatten(0, 1).to(feats.dtype), fine, detail)
        feats, heatmap, regression = (t.view(b, n, *t.shape[1:]) for t in (feats, heatmap, regression))
        # Back from the 70-degree reference camera to each camera's own depth.
        depth = regression[:, :, 2:3] + log_focal.to(regression.dtype)[:, :, None, None, None]
        offset = regression[:, :, :2]
        if not self.config.ground_contact:
            return feats, heatmap, torch.cat([offset, depth], 2)
        contact_row, gate = regression[:, :, 3], regression[:, :, 4]
        rows, cols = cell_centres(*regression.shape[-2:], regression.device)
        stride = self.config.head_stride
        # float32 whatever the autocast dtype: a pixel near the horizon is metres of depth.
        u = (cols + offset[:, :, 0].float()) * stride
        v = (rows + contact_row.float()) * stride
        ground = ground_ray_depth(lidar2img, u, v, self.config.ground_z)[0].log()[:, :, None].to(depth.dtype)
        fused = depth + torch.sigmoid(gate)[:, :, None] * (ground - depth)
        return feats, heatmap, torch.cat([offset, fused, depth, ground, contact_row[:, :, None]], 2)

    def inputs(self, images: Tensor, lidar2img: Tensor, backbone_grad: float = 0.0) -> DecoderInputs:
        """Everything the decoder reads for a batch of frames: keys, and queries chosen from them.

        Args:
            images: [B, N, 3, H, W] uint8 or float in [0, 1].
            lidar2img: [B, N, 4, 4].
            backbone_grad: how much of the decoder's gradient reaches the backbone, in [0, 1]: 0
                (the default) detaches the keys' features, 1 passes the gradient unchanged. The
                forward values do not depend on it.
        Returns:
            DecoderInputs (see there).
        """
        if not 0.0 <= backbone_grad <= 1.0:
            raise ValueError(f"backbone_grad must lie in [0, 1], got {backbone_grad}")
        feats, heatmap, regression = self.dense(images, lidar2img)
        b, (h, w) = images.shape[0], images.shape[-2:]
        # From scratch the backbone learns from the dense loss only: on a CPU budget the decoder's
        # set loss is a noisy signal that slowed the dense head (heatmap loss 1.39 vs 0.94 after 400
        # iterations). Once the head has converged, a scaled share of the decoder's gradient can
        # shape the features for what only the decoder is scored on (class, size, heading).
        keys = self.position(scale_gradient(feats, backbone_grad), lidar2img, (h, w))
        cell, center, is_peak = select_proposals(
            heatmap,
            regression,
            lidar2img,
            self.config.head_stride,
            self.config.num_queries,
            self.config.class_peak_threshold,
        )
        index = key_index(cell, heatmap.shape[-2:], self.config.stride // self.config.head_stride)
        low, high = self.decoder.pc_range[:3], self.decoder.pc_range[3:]
        # Peaks become queries at their predicted centres, with their tokens' features as content;
        # slots left over (no more peaks) fall back to PETR's learned anchors with zero content
        # rather than to near-duplicates of the peaks.
        is_peak = is_peak[..., None]
        anchors = self.decoder.reference_points.weight[: index.shape[1]].expand(b, -1, -1)
        reference_points = torch.where(is_peak, ((center - low) / (high - low)).clamp(0.0, 1.0), anchors)
        selected = keys.memory.gather(1, index[..., None].expand(-1, -1, keys.memory.shape[-1]))
        # No gradient: the dense head learns from its own loss.
        proposal_logits = cell_values(heatmap.detach(), cell).float()  # (B, Nq, C)
        content = self.query_proj(selected)
        if self.proposal_class is not None:
            content = content + self.proposal_class(proposal_logits.to(content.dtype))
        query = torch.where(is_peak, content, 0.0)
        return DecoderInputs(
            memory=keys.memory,
            key_pos=keys.key_pos,
            key_padding_mask=keys.key_padding_mask,
            query=query,
            reference_points=reference_points,
            heatmap=heatmap,
            regression=regression,
            proposals=index,
            proposal_cells=cell,
            proposal_logits=proposal_logits,
        )

    def decode(self, inputs: DecoderInputs, track_keys: bool = False):
        """The decoder (with whatever tgGBC pruner it holds) on `inputs`: a DecoderOutput."""
        return self.decoder(
            inputs.memory,
            inputs.key_pos,
            inputs.key_padding_mask,
            query=inputs.query,
            reference_points=inputs.reference_points,
            track_keys=track_keys,
        )

    def forward(self, images: Tensor, lidar2img: Tensor, track_keys: bool = False):
        """Per-layer predictions: DecoderOutput with cls_scores [L, B, Nq, C], bbox_preds [L, B, Nq, 10]."""
        return self.decode(self.inputs(images, lidar2img), track_keys=track_keys)

    @torch.no_grad()
    def detections(
        self, cls_scores: Tensor, bbox_preds: Tensor, proposal_logits: Tensor | None = None
    ) -> list[Detections]:
        """NMS-free decoding of the last layer: the top max_detections (query, class) pairs, scored
        as `DetectorConfig.dense_score_weight` says.

        Args:
            cls_scores: [B, Nq, C] logits; bbox_preds: [B, Nq, 10] box code; proposal_logits:
                [B, Nq, C] (DecoderInputs.proposal_logits), needed when dense_score_weight > 0.
        """
        weight = self.config.dense_score_weight
        log_scores = F.logsigmoid(cls_scores.float())
        if weight > 0.0:
            if proposal_logits is None or proposal_logits.shape != cls_scores.shape:
                got = None if proposal_logits is None else tuple(proposal_logits.shape)
                raise ValueError(
                    f"dense_score_weight={weight} needs proposal_logits of shape {tuple(cls_scores.shape)}, got {got}"
                )
            # In log space: a product of two probabilities below 1e-38 would underflow to ties at 0.
            log_scores = (1.0 - weight) * log_scores + weight * F.logsigmoid(proposal_logits.float())
        out = []
        num_classes = cls_scores.shape[-1]
        for log_score, code in zip(log_scores, bbox_preds, strict=True):
            scores = log_score.exp().flatten()
            top = scores.topk(min(self.config.max_detections, scores.numel()))
            query, label = top.indices // num_classes, top.indices % num_classes
            center, size, yaw, velocity = decode_boxes(code[query].float())
            out.append(Detections(center, size, yaw, velocity, top.values, label))
        return out
