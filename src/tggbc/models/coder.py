"""NMS-free box decoding of the StreamPETR-repository heads (NMSFreeCoder + the heads' get_bboxes).

From the last decoder layer of one sample ([Nq, C] class logits, [Nq, 10] box code with centres
already in metres):
1. sigmoid the logits and take the `max_num` (300) best (query, class) pairs over the flattened
   [Nq * C] scores, query-major, so label = index % C and query = index // C;
2. denormalise those queries' codes (cx, cy, cz, log w, log l, log h, sin, cos, vx, vy) into
   (cx, cy, cz, w, l, h, yaw = atan2(sin, cos), vx, vy);
3. keep the boxes whose centre lies inside `post_center_range` (both ends inclusive) and, if a
   score threshold is set (non-zero), scoring at least that;
4. (get_bboxes) move z from the box's gravity centre to its bottom: z -= h / 2, which is where
   mmdet3d's LiDARInstance3DBoxes keeps z.
Boxes stay in score order (highest first), as the original returns them.

Imports nothing but torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .state import POINT_CLOUD_RANGE

__all__ = ["Detections", "NMSFreeCoder", "denormalize_bbox", "POST_CENTER_RANGE"]

# The published configs' post_center_range (equal to their position_range).
POST_CENTER_RANGE = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)


class Detections(NamedTuple):
    """One sample's boxes, highest score first.

    boxes: [N, 9] (x, y, z of the bottom centre, w, l, h, yaw, vx, vy) in the lidar frame, the
        tensor of the original's LiDARInstance3DBoxes (7 columns for a code without velocity).
    scores: [N] sigmoid class scores.
    labels: [N] int64 class indices.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor


def denormalize_bbox(code: Tensor) -> Tensor:
    """Box code -> box, as the original's denormalize_bbox.

    Args:
        code: [N, 10] (cx, cy, cz, log w, log l, log h, sin, cos, vx, vy), or [N, 8] without velocity.
    Returns:
        [N, 9] (cx, cy, cz, w, l, h, yaw, vx, vy), or [N, 7].
    """
    yaw = torch.atan2(code[..., 6:7], code[..., 7:8])
    parts = [code[..., 0:3], code[..., 3:6].exp(), yaw]
    if code.shape[-1] > 8:
        parts.append(code[..., 8:10])
    return torch.cat(parts, dim=-1)


class NMSFreeCoder:
    """Top-k decoding without NMS, with the original NMSFreeCoder's settings.

    Args:
        num_classes: C.
        max_num: (query, class) pairs kept before the range filter (300 in the configs).
        post_center_range: (x_min, y_min, z_min, x_max, y_max, z_max) the box centres must lie in.
        score_threshold: minimum score, or None; like the original, 0 means no threshold.
        pc_range: the detection range (kept for reference: the heads already decode centres into it).
    """

    def __init__(
        self,
        num_classes: int = 10,
        max_num: int = 300,
        post_center_range: Sequence[float] = POST_CENTER_RANGE,
        score_threshold: float | None = None,
        pc_range: Sequence[float] = POINT_CLOUD_RANGE,
    ):
        if isinstance(max_num, bool) or not isinstance(max_num, int) or max_num < 1:
            raise ValueError(f"max_num must be a positive int, got {max_num!r}")
        if len(post_center_range) != 6:
            raise ValueError(f"post_center_range must have 6 numbers, got {list(post_center_range)}")
        self.num_classes, self.max_num = num_classes, max_num
        self.post_center_range = tuple(float(v) for v in post_center_range)
        self.score_threshold = score_threshold
        self.pc_range = tuple(float(v) for v in pc_range)

    def __repr__(self) -> str:
        return (
            f"NMSFreeCoder(num_classes={self.num_classes}, max_num={self.max_num}, "
            f"post_center_range={list(self.post_center_range)}, score_threshold={self.score_threshold})"
        )

    def decode_single(self, cls_scores: Tensor, bbox_preds: Tensor) -> Detections:
        """One sample, z still at the gravity centre (the original's decode_single).

        Args:
            cls_scores: [Nq, C] logits of the last layer.
            bbox_preds: [Nq, code_size] its box code, centres in metres.
        Returns:
            Detections with boxes [N, 9] (cx, cy, cz, w, l, h, yaw, vx, vy), N <= max_num.
        """
        if cls_scores.dim() != 2 or cls_scores.shape[1] != self.num_classes:
            raise ValueError(f"cls_scores must be [Nq, C={self.num_classes}], got {tuple(cls_scores.shape)}")
        if bbox_preds.dim() != 2 or bbox_preds.shape[0] != cls_scores.shape[0] or bbox_preds.shape[1] < 8:
            raise ValueError(f"bbox_preds must be [Nq={cls_scores.shape[0]}, >= 8], got {tuple(bbox_preds.shape)}")
        candidates = cls_scores.numel()
        if self.max_num > candidates:
            raise ValueError(
                f"max_num={self.max_num} exceeds the {candidates} (query, class) pairs of "
                f"{cls_scores.shape[0]} queries x {self.num_classes} classes"
            )
        scores, index = cls_scores.sigmoid().reshape(-1).topk(self.max_num)
        labels = index % self.num_classes
        boxes = denormalize_bbox(bbox_preds[torch.div(index, self.num_classes, rounding_mode="floor")])
        bounds = torch.tensor(self.post_center_range, device=boxes.device, dtype=boxes.dtype)
        keep = (boxes[:, :3] >= bounds[:3]).all(1) & (boxes[:, :3] <= bounds[3:]).all(1)
        if self.score_threshold:  # the original tests truthiness: 0 and None both mean no threshold
            keep &= scores >= self.score_threshold
        return Detections(boxes[keep], scores[keep], labels[keep])

    def get_bboxes(self, cls_scores: Tensor, bbox_preds: Tensor) -> list[Detections]:
        """Every sample's boxes with z at the bottom centre (the heads' get_bboxes).

        Args:
            cls_scores: [B, Nq, C] logits of the last layer (or [L, B, Nq, C]: the last layer is used).
            bbox_preds: [B, Nq, code_size] (or [L, B, Nq, code_size]).
        Returns:
            B Detections.
        """
        if cls_scores.dim() == 4:
            cls_scores, bbox_preds = cls_scores[-1], bbox_preds[-1]
        if cls_scores.dim() != 3 or bbox_preds.dim() != 3 or bbox_preds.shape[0] != cls_scores.shape[0]:
            raise ValueError(
                f"cls_scores [B, Nq, C] and bbox_preds [B, Nq, code_size] expected, got "
                f"{tuple(cls_scores.shape)} and {tuple(bbox_preds.shape)}"
            )
        out = []
        for scores, code in zip(cls_scores, bbox_preds, strict=True):
            det = self.decode_single(scores, code)
            boxes = det.boxes.clone()
            boxes[:, 2] = boxes[:, 2] - boxes[:, 5] * 0.5  # gravity centre -> bottom centre
            out.append(det._replace(boxes=boxes))
        return out
