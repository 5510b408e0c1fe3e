"""The PETR family's training signal: Hungarian matching, focal loss, L1 boxes, on every layer.

Box targets and predictions use the PETR box code (see `boxes.py`). Every decoder layer is
matched and supervised on its own, as the hosts do; denoising queries (see `denoise.py`) are
supervised against their own boxes without matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .denoise import DenoisingQueries


@dataclass(frozen=True)
class LossConfig:
    """Weights of the published PETR configs."""

    cls_weight: float = 2.0
    box_weight: float = 0.25
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # velocity counts less than geometry, as in the hosts' code_weights
    code_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)


def focal_cost(logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Matching cost of giving each query [Nq, C] each target label [M]: [Nq, M]."""
    p = logits.sigmoid()
    pos = -alpha * (1 - p).pow(gamma) * F.logsigmoid(logits)
    neg = -(1 - alpha) * p.pow(gamma) * F.logsigmoid(-logits)
    return (pos - neg)[:, labels]


@torch.no_grad()
def hungarian_match(
    logits: Tensor, boxes: Tensor, labels: Tensor, targets: Tensor, cfg: LossConfig
) -> tuple[Tensor, Tensor]:
    """Optimal one-to-one assignment of queries to the targets of one sample.

    Args:
        logits: [Nq, C]; boxes: [Nq, 10] predictions. labels: [M]; targets: [M, 10].
    Returns:
        (query_index [M'], target_index [M']) long tensors, M' = min(Nq, M).
    """
    from scipy.optimize import linear_sum_assignment

    device = logits.device
    if labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    cost = cfg.cls_weight * focal_cost(logits.float(), labels, cfg.focal_alpha, cfg.focal_gamma)
    cost = cost + cfg.box_weight * torch.cdist(boxes[:, :8].float(), targets[:, :8].float(), p=1)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(
        cols, dtype=torch.long, device=device
    )


def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: float, gamma: float) -> Tensor:
    """Sigmoid focal loss, [..., C] logits against {0, 1} targets of the same shape, not reduced."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return weight * (1 - p_t).pow(gamma) * ce


def detection_loss(
    cls_scores: Tensor,
    bbox_preds: Tensor,
    gt_labels: list[Tensor],
    gt_boxes: list[Tensor],
    dn: DenoisingQueries | None = None,
    cfg: LossConfig = LossConfig(),
) -> tuple[Tensor, dict[str, float]]:
    """Loss summed over decoder layers.

    Args:
        cls_scores: [L, B, Nd + Nq, C] logits; bbox_preds: [L, B, Nd + Nq, 10] box code; the first
            Nd queries are the denoising ones (Nd = 0 without `dn`).
        gt_labels: B tensors [M_b] of class indices. gt_boxes: B tensors [M_b, 10] box code.
        dn: the batch's denoising queries, or None.
    Returns:
        (total loss, {"cls", "box", "dn_cls", "dn_box"} of the last layer, for logging).
    """
    num_layers, batch, _, _ = cls_scores.shape
    num_dn = 0 if dn is None else dn.labels.shape[1]
    num_targets = max(sum(int(t.numel()) for t in gt_labels), 1)
    code_weights = cls_scores.new_tensor(cfg.code_weights)
    total = cls_scores.new_zeros(())
    log: dict[str, float] = {}
    for layer in range(num_layers):
        logits_all, boxes_all = cls_scores[layer], bbox_preds[layer]
        cls_loss, box_loss = cls_scores.new_zeros(()), cls_scores.new_zeros(())
        for b in range(batch):
            logits, boxes = logits_all[b, num_dn:], boxes_all[b, num_dn:]
            q_idx, t_idx = hungarian_match(logits, boxes, gt_labels[b], gt_boxes[b], cfg)
            target = torch.zeros_like(logits)
            target[q_idx, gt_labels[b][t_idx]] = 1.0
            cls_loss = cls_loss + sigmoid_focal_loss(logits, target, cfg.focal_alpha, cfg.focal_gamma).sum()
            if q_idx.numel():
                box_loss = box_loss + ((boxes[q_idx] - gt_boxes[b][t_idx]).abs() * code_weights).sum()
        cls_loss = cfg.cls_weight * cls_loss / num_targets
        box_loss = cfg.box_weight * box_loss / num_targets
        total = total + cls_loss + box_loss
        dn_cls = dn_box = cls_scores.new_zeros(())
        if dn is not None:
            logits, boxes = logits_all[:, :num_dn], boxes_all[:, :num_dn]  # (B, Nd, C), (B, Nd, 10)
            positive = dn.labels >= 0  # (B, Nd)
            num_positive = max(int(positive.sum()), 1)
            target = torch.zeros_like(logits)
            target[positive] = F.one_hot(dn.labels[positive], logits.shape[-1]).to(target.dtype)
            focal = sigmoid_focal_loss(logits, target, cfg.focal_alpha, cfg.focal_gamma).sum(-1)  # (B, Nd)
            dn_cls = cfg.cls_weight * (focal * dn.valid).sum() / num_positive
            diff = (boxes[positive] - dn.boxes[positive]).abs() * code_weights
            dn_box = cfg.box_weight * diff.sum() / num_positive
            total = total + dn_cls + dn_box
        if layer == num_layers - 1:
            log = {
                "cls": float(cls_loss.detach()),
                "box": float(box_loss.detach()),
                "dn_cls": float(dn_cls.detach()),
                "dn_box": float(dn_box.detach()),
            }
    return total, log
