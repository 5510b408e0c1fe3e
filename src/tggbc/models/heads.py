"""The heads of the StreamPETR repository's detectors, complete at inference.

- `StreamPETRHead` (the configs' `pts_bbox_head` of type StreamPETRHead): the key side
  (memory embedding, spatial alignment, feature-gated 3D position embedding) and the temporal
  decoder with its memory bank, then NMS-free box decoding.
- `FocalPETRHead` (type PETRHeadDN, used by `petrv1_*` and `focal_petrv1_*`): the same key side
  and StreamPETR's decoder without temporal memory (900 queries).
- `FocalHead` (`img_roi_head`): the 2D auxiliary head. At inference the published detector
  skips it (Petr3D's aux_2d_only=True), but its weights are in every checkpoint that trained it,
  and with aux_2d_only=False its `topk_indexes` choose (and order) the image tokens the 3D head
  reads.

Parameter names under each head: `position.*` (see `StreamPETRPositionEmbedding`) and
`decoder.*` (see `StreamPETRDecoder`); `tggbc.models.checkpoint` maps the original names onto
them. The FocalHead keeps the original names.

Imports nothing but torch and the core.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..pruner import KeyPruner
from .coder import POST_CENTER_RANGE, Detections, NMSFreeCoder
from .decoder import DecoderOutput
from .focalpetr import FocalPETRDecoder
from .layers import inverse_sigmoid
from .position import POSITION_RANGE, StreamPETRPositionEmbedding
from .state import POINT_CLOUD_RANGE, TemporalState
from .streampetr import StreamPETRDecoder

__all__ = ["FocalHead", "FocalHeadOutput", "StreamPETRHead", "FocalPETRHead", "feature_locations", "topk_gather"]


def feature_locations(height: int, width: int, stride: int, pad_shape: tuple[int, int], device=None) -> Tensor:
    """Pixel centres of a stride-`stride` feature map, normalised by the padded image size.

    The original's `locations`: x = (stride * j + stride // 2) / pad_w, y likewise with pad_h.

    Returns:
        [H, W, 2] (x, y) in [0, 1].
    """
    pad_h, pad_w = pad_shape
    xs = (torch.arange(0, stride * width, stride, dtype=torch.float32, device=device) + stride // 2) / pad_w
    ys = (torch.arange(0, stride * height, stride, dtype=torch.float32, device=device) + stride // 2) / pad_h
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((x, y), dim=-1)


def topk_gather(x: Tensor, index: Tensor | None) -> Tensor:
    """x [B, N, ...] rows picked by index [B, K] or [B, K, 1] along dim 1 -> [B, K, ...]; None: x."""
    if index is None:
        return x
    index = index.reshape(index.shape[0], index.shape[1], *([1] * (x.dim() - 2)))
    return x.gather(1, index.expand(-1, -1, *x.shape[2:]))


class FocalHeadOutput(NamedTuple):
    """FocalHead predictions per camera image (BN = B * N cameras, P = H * W feature pixels).

    cls_logits: [BN, P, C]; bbox_preds: [BN, P, 4] normalised (cx, cy, w, h) 2D boxes;
    centers2d: [BN, P, 2] normalised projected 3D centres; centerness: [BN, P, 1] logits;
    topk_indexes: [B, K, 1] the K = int(N * P * infer_ratio) tokens (camera-major) with the highest
    sigmoid(max class logit) * sigmoid(centerness), best first.
    """

    cls_logits: Tensor
    bbox_preds: Tensor
    centers2d: Tensor
    centerness: Tensor
    topk_indexes: Tensor


class FocalHead(nn.Module):
    """The 2D auxiliary head of FocalPETR / StreamPETR (img_roi_head), inference part.

    Args:
        num_classes: C.
        in_channels: neck channels.
        embed_dims: width of its two 3x3 conv + GroupNorm(32) + ReLU towers.
        stride: feature stride (pixel centres for the 2D boxes).
        infer_ratio: fraction of the tokens `topk_indexes` keeps (1.0 in the configs: all of
            them, reordered by score).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 256,
        embed_dims: int = 256,
        stride: int = 16,
        infer_ratio: float = 1.0,
    ):
        super().__init__()
        if not 0.0 < infer_ratio <= 1.0:
            raise ValueError(f"infer_ratio must lie in (0, 1], got {infer_ratio}")
        if embed_dims % 32:
            raise ValueError(f"embed_dims must be a multiple of 32 (GroupNorm(32)), got {embed_dims}")
        self.num_classes, self.stride, self.infer_ratio = num_classes, stride, infer_ratio
        self.cls = nn.Conv2d(embed_dims, num_classes, kernel_size=1)
        self.shared_reg = nn.Sequential(
            nn.Conv2d(in_channels, embed_dims, kernel_size=3, padding=1), nn.GroupNorm(32, embed_dims), nn.ReLU()
        )
        self.shared_cls = nn.Sequential(
            nn.Conv2d(in_channels, embed_dims, kernel_size=3, padding=1), nn.GroupNorm(32, embed_dims), nn.ReLU()
        )
        self.centerness = nn.Conv2d(embed_dims, 1, kernel_size=1)
        self.ltrb = nn.Conv2d(embed_dims, 4, kernel_size=1)
        self.center2d = nn.Conv2d(embed_dims, 2, kernel_size=1)
        prior = -torch.log(torch.tensor((1 - 0.01) / 0.01)).item()
        nn.init.constant_(self.cls.bias, prior)
        nn.init.constant_(self.centerness.bias, prior)

    def forward(self, img_feats: Tensor, pad_shape: tuple[int, int]) -> FocalHeadOutput:
        """2D predictions and the token ranking of one frame.

        Args:
            img_feats: [B, N, C, H, W] neck features.
            pad_shape: (pad_h, pad_w) of the padded input images.
        """
        if img_feats.dim() != 5:
            raise ValueError(f"img_feats must be [B, N_cam, C, H, W], got {tuple(img_feats.shape)}")
        b, n, _, h, w = img_feats.shape
        x = img_feats.flatten(0, 1)
        cls_feat = self.shared_cls(x)
        cls_logits = self.cls(cls_feat).permute(0, 2, 3, 1).reshape(b * n, h * w, self.num_classes)
        centerness = self.centerness(cls_feat).permute(0, 2, 3, 1).reshape(b * n, h * w, 1)
        reg_feat = self.shared_reg(x)
        ltrb = self.ltrb(reg_feat).permute(0, 2, 3, 1).sigmoid()  # (BN, H, W, 4)
        offset = self.center2d(reg_feat).permute(0, 2, 3, 1)  # (BN, H, W, 2)
        location = feature_locations(h, w, self.stride, pad_shape, device=x.device)  # (H, W, 2)
        centers2d = (inverse_sigmoid(location) + offset).sigmoid()
        # Boxes around each pixel centre, clipped to the image, as (cx, cy, w, h).
        x1 = (location[..., 0] - ltrb[..., 0]).clamp(0, 1)
        y1 = (location[..., 1] - ltrb[..., 1]).clamp(0, 1)
        x2 = (location[..., 0] + ltrb[..., 2]).clamp(0, 1)
        y2 = (location[..., 1] + ltrb[..., 3]).clamp(0, 1)
        boxes = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)
        score = cls_logits.amax(dim=2).reshape(b, -1, 1)  # (B, N*P, 1) max class logit
        weight = score.detach().sigmoid() * centerness.detach().reshape(b, -1, 1).sigmoid()
        k = int(n * h * w * self.infer_ratio)
        topk_indexes = weight.topk(k, dim=1).indices  # (B, K, 1)
        return FocalHeadOutput(
            cls_logits, boxes.reshape(b * n, h * w, 4), centers2d.reshape(b * n, h * w, 2), centerness, topk_indexes
        )


class _SparseQueryHead(nn.Module):
    """Key side + decoder + box coder, shared by the two 3D heads."""

    decoder: StreamPETRDecoder | FocalPETRDecoder

    def __init__(
        self,
        in_channels: int,
        embed_dims: int,
        depth_num: int,
        depth_start: float,
        position_range: Sequence[float],
        stride: int,
        num_classes: int,
        max_num: int,
        post_center_range: Sequence[float],
        pc_range: Sequence[float],
    ):
        super().__init__()
        self.position = StreamPETRPositionEmbedding(
            in_channels=in_channels,
            embed_dims=embed_dims,
            depth_num=depth_num,
            depth_start=depth_start,
            position_range=position_range,
            stride=stride,
        )
        self.coder = NMSFreeCoder(num_classes, max_num, post_center_range, pc_range=pc_range)

    def keys(
        self, img_feats: Tensor, lidar2img: Tensor, intrinsics: Tensor, pad_shape: tuple[int, int], topk_indexes
    ) -> tuple[Tensor, Tensor]:
        """memory, key_pos [B, K, E] of the image tokens (all N*H*W camera-major, or the topk_indexes ones)."""
        keys = self.position(img_feats, lidar2img, intrinsics, pad_shape)
        # Every key-side operation works token by token, so gathering after it equals the
        # original's gathering of raw features, centres and cameras before it.
        return topk_gather(keys.memory, topk_indexes), topk_gather(keys.key_pos, topk_indexes)

    def get_bboxes(self, out: DecoderOutput) -> list[Detections]:
        """The last layer's boxes of every sample (NMS-free top-k, range filter, bottom-centre z)."""
        return self.coder.get_bboxes(out.cls_scores[-1], out.bbox_preds[-1])


class StreamPETRHead(_SparseQueryHead):
    """StreamPETR's head (pts_bbox_head) at inference.

    Args:
        in_channels: neck channels. embed_dims, num_layers, num_heads, ffn_dims: decoder sizes.
        num_classes: C. num_query, num_propagated, memory_len, topk_proposals: query and memory
            sizes (644 / 256 / 1024 / 256, or 300 / 128 / 512 / 128 in the 428-query configs).
        depth_num, depth_start, position_range: the 3D position embedding's frustum (LID bins).
        stride: feature stride. pc_range: the range the box centres are decoded into.
        max_num, post_center_range: the NMS-free coder's settings.
        pruner, attention: tgGBC in the decoder (see `PETRFamilyDecoder`).
    """

    def __init__(
        self,
        *,
        in_channels: int = 256,
        embed_dims: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        ffn_dims: int = 2048,
        num_classes: int = 10,
        num_query: int = 644,
        num_propagated: int = 256,
        memory_len: int = 1024,
        topk_proposals: int = 256,
        depth_num: int = 64,
        depth_start: float = 1.0,
        position_range: Sequence[float] = POSITION_RANGE,
        stride: int = 16,
        pc_range: Sequence[float] = POINT_CLOUD_RANGE,
        max_num: int = 300,
        post_center_range: Sequence[float] = POST_CENTER_RANGE,
        pruner: KeyPruner | None = None,
        attention: str = "fast",
    ):
        super().__init__(
            in_channels,
            embed_dims,
            depth_num,
            depth_start,
            position_range,
            stride,
            num_classes,
            max_num,
            post_center_range,
            pc_range,
        )
        self.decoder = StreamPETRDecoder(
            num_layers=num_layers,
            embed_dims=embed_dims,
            num_heads=num_heads,
            ffn_dims=ffn_dims,
            num_classes=num_classes,
            num_queries=num_query,
            num_propagated=num_propagated,
            memory_len=memory_len,
            topk_proposals=topk_proposals,
            pc_range=pc_range,
            pruner=pruner,
            attention=attention,
        )

    def forward(
        self,
        img_feats: Tensor,
        lidar2img: Tensor,
        intrinsics: Tensor,
        pad_shape: tuple[int, int],
        *,
        topk_indexes: Tensor | None = None,
        state: TemporalState | None = None,
        ego_pose: Tensor | None = None,
        ego_pose_inv: Tensor | None = None,
        timestamp: Tensor | None = None,
        prev_exists: Tensor | None = None,
        track_keys: bool = False,
    ) -> DecoderOutput:
        """One frame: keys, temporal decoder, memory update.

        Args:
            img_feats: [B, N, C, H, W] neck level 0. lidar2img, intrinsics: [B, N, 4, 4].
            pad_shape: (pad_h, pad_w) of the padded images.
            topk_indexes: [B, K, 1] tokens chosen by the FocalHead, or None for all.
            state, ego_pose, ego_pose_inv, timestamp, prev_exists: see `StreamPETRDecoder.forward`
                (ego_pose_inv None: the rigid float64 inverse of ego_pose).
        Returns:
            DecoderOutput with every layer's cls_scores [L, B, Nq, C], bbox_preds (centres in
            metres) and the new state.
        """
        memory, key_pos = self.keys(img_feats, lidar2img, intrinsics, pad_shape, topk_indexes)
        return self.decoder(
            memory,
            key_pos,
            state=state,
            ego_pose=ego_pose,
            ego_pose_inv=ego_pose_inv,
            timestamp=timestamp,
            prev_exists=prev_exists,
            track_keys=track_keys,
        )


class FocalPETRHead(_SparseQueryHead):
    """The PETRHeadDN head of the `petrv1_*` / `focal_petrv1_*` configs at inference (no temporal memory).

    Args: as `StreamPETRHead`, without the memory sizes; num_query defaults to 900.
    """

    def __init__(
        self,
        *,
        in_channels: int = 256,
        embed_dims: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        ffn_dims: int = 2048,
        num_classes: int = 10,
        num_query: int = 900,
        depth_num: int = 64,
        depth_start: float = 1.0,
        position_range: Sequence[float] = POSITION_RANGE,
        stride: int = 16,
        pc_range: Sequence[float] = POINT_CLOUD_RANGE,
        max_num: int = 300,
        post_center_range: Sequence[float] = POST_CENTER_RANGE,
        pruner: KeyPruner | None = None,
        attention: str = "fast",
    ):
        super().__init__(
            in_channels,
            embed_dims,
            depth_num,
            depth_start,
            position_range,
            stride,
            num_classes,
            max_num,
            post_center_range,
            pc_range,
        )
        self.decoder = FocalPETRDecoder(
            num_layers=num_layers,
            embed_dims=embed_dims,
            num_heads=num_heads,
            ffn_dims=ffn_dims,
            num_classes=num_classes,
            num_queries=num_query,
            pc_range=pc_range,
            pruner=pruner,
            attention=attention,
        )

    def forward(
        self,
        img_feats: Tensor,
        lidar2img: Tensor,
        intrinsics: Tensor,
        pad_shape: tuple[int, int],
        *,
        topk_indexes: Tensor | None = None,
        track_keys: bool = False,
    ) -> DecoderOutput:
        """One frame: keys and decoder (arguments as `StreamPETRHead.forward`; state stays None)."""
        memory, key_pos = self.keys(img_feats, lidar2img, intrinsics, pad_shape, topk_indexes)
        return self.decoder(memory, key_pos, track_keys=track_keys)
