"""Denoising queries for training (DN-DETR, as StreamPETR trains its decoder).

Besides its learned queries, the decoder gets G groups of queries placed at noised ground-truth
centres; each must recover its own box (no matching), or reject it when the noise moved it too
far. Denoising is what makes a DETR-style decoder learn in a CPU budget: the matching queries
get a stable target from the first iteration on. The groups cannot see each other, and the
learned queries cannot see any of them, so inference (learned queries alone) is unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .config import TrainConfig


class DenoisingQueries(NamedTuple):
    """Nd = G x (most boxes in a frame of the batch) queries, before the Nq learned ones.

    query: [B, Nd, E] content (one learned vector for all); reference_points: [B, Nd, 3] normalised;
    self_attn_mask: [Nd + Nq, Nd + Nq] bool, True where a query must not attend;
    labels: [B, Nd] long class to recover, -1 for a query to reject; boxes: [B, Nd, 10] box code
    targets (of positives); valid: [B, Nd] bool, False for the padding of frames with fewer boxes.
    """

    query: Tensor
    reference_points: Tensor
    self_attn_mask: Tensor
    labels: Tensor
    boxes: Tensor
    valid: Tensor


def denoising_queries(
    gt_labels: list[Tensor],
    gt_boxes: list[Tensor],
    content: Tensor,
    num_queries: int,
    pc_range: Tensor,
    cfg: TrainConfig,
    generator: torch.Generator | None = None,
) -> DenoisingQueries | None:
    """Denoising queries of one batch, or None when it has no boxes or cfg turns them off.

    Args:
        gt_labels: B tensors [M_b] of class indices.
        gt_boxes: B tensors [M_b, 10] of box code (metres).
        content: [E] the learned content every denoising query starts from.
        num_queries: Nq learned queries after them (for the attention mask).
        pc_range: [6] the range the decoder decodes centres into.
        cfg: dn_queries, dn_groups, dn_noise, dn_split.
        generator: for the noise.
    """
    batch = len(gt_labels)
    most = max((int(t.numel()) for t in gt_labels), default=0)
    if most == 0 or cfg.dn_queries == 0 or cfg.dn_groups == 0:
        return None
    groups = min(cfg.dn_groups, max(1, cfg.dn_queries // most))
    total = groups * most
    device = content.device
    labels = torch.full((batch, groups, most), -1, dtype=torch.long, device=device)
    boxes = torch.zeros(batch, groups, most, 10, device=device)
    valid = torch.zeros(batch, groups, most, dtype=torch.bool, device=device)
    centers = torch.zeros(batch, groups, most, 3, device=device)
    for b, (lab, box) in enumerate(zip(gt_labels, gt_boxes, strict=True)):
        m = int(lab.numel())
        if m == 0:
            continue
        center = box[:, [0, 1, 4]]  # (M, 3)
        size = box[:, [2, 3, 5]].exp()  # (M, 3) w, l, h
        # Heading-free half extent: the larger of w and l in x and y, h in z.
        half = torch.stack([size[:, :2].amax(1), size[:, :2].amax(1), size[:, 2]], dim=1) / 2
        noise = torch.rand(groups, m, 3, generator=generator).to(device) * 2 - 1  # (G, M, 3) in [-1, 1]
        centers[b, :, :m] = center + noise * half * cfg.dn_noise
        reject = noise.norm(dim=-1) > cfg.dn_split
        labels[b, :, :m] = torch.where(reject, -1, lab.to(device))
        boxes[b, :, :m] = box
        valid[b, :, :m] = True
    low, high = pc_range[:3], pc_range[3:]
    reference_points = ((centers - low) / (high - low)).clamp(0.0, 1.0)
    # Attention: learned queries see none of the denoising ones; each group sees only itself
    # (and the learned queries).
    size = total + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[total:, :total] = True
    group = torch.arange(total, device=device) // most
    mask[:total, :total] = group[:, None] != group[None, :]
    return DenoisingQueries(
        query=content.expand(batch, total, -1),
        reference_points=reference_points.view(batch, total, 3),
        self_attn_mask=mask,
        labels=labels.view(batch, total),
        boxes=boxes.view(batch, total, 10),
        valid=valid.view(batch, total),
    )
