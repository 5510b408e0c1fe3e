"""PETR's decoder and head (Liu et al., ECCV 2022) as one module, with tgGBC between layers.

900 learnable reference points, a zero initial target, six post-norm layers over the keys of all
cameras (camera-major), a key padding mask for padded pixels. Box code
(cx, cy, log w, log l, cz, log h, sin, cos, vx, vy); the centre entries come out in metres.

Imports nothing but torch and the core.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..pruner import KeyPruner
from .decoder import POINT_CLOUD_RANGE, DecoderOutput, PETRFamilyDecoder

__all__ = ["PETRDecoder"]


class PETRDecoder(PETRFamilyDecoder):
    """PETR's transformer decoder plus its per-layer heads.

    Args: see `PETRFamilyDecoder`; num_queries defaults to PETR's 900.

    Use:
        decoder = PETRDecoder(pruner=KeyPruner(r=12000, n=3))
        out = decoder(memory, key_pos, key_padding_mask)
        out.cls_scores[-1], out.bbox_preds[-1]   # the last layer's detections
    """

    center_index = (0, 1, 4)  # (cx, cy, log w, log l, cz, ...)

    def __init__(
        self,
        *,
        num_layers: int = 6,
        embed_dims: int = 256,
        num_heads: int = 8,
        ffn_dims: int = 2048,
        dropout: float = 0.1,
        num_classes: int = 10,
        code_size: int = 10,
        num_queries: int = 900,
        pc_range: Sequence[float] = POINT_CLOUD_RANGE,
        pruner: KeyPruner | None = None,
        attention: str = "fast",
    ):
        super().__init__(
            num_layers=num_layers,
            embed_dims=embed_dims,
            num_heads=num_heads,
            ffn_dims=ffn_dims,
            dropout=dropout,
            num_classes=num_classes,
            code_size=code_size,
            num_queries=num_queries,
            pc_range=pc_range,
            pruner=pruner,
            attention=attention,
        )

    def forward(
        self,
        memory: Tensor,
        key_pos: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        query: Tensor | None = None,
        reference_points: Tensor | None = None,
        track_keys: bool = False,
        self_attn_mask: Tensor | None = None,
    ) -> DecoderOutput:
        """Decode 3D boxes from image keys.

        Args:
            memory: [B, Nk, E] projected image features of all cameras, camera-major.
            key_pos: [B, Nk, E] their 3D position embedding.
            key_padding_mask: [B, Nk] bool, True for padded pixels, or None.
            query: [B, Nq, E] initial targets, or None for PETR's zeros.
            reference_points: [B, Nq, 3] normalised anchors chosen per sample (two-stage query
                selection), or None for the learned ones. Nq may differ from num_queries.
            track_keys: return in `kept` the original indices of the keys each layer saw.
            self_attn_mask: [Nq, Nq] bool, True where a query must not attend (denoising groups
                in training), or None.
        Returns:
            DecoderOutput (state None).
        """
        self._check_keys(memory, key_pos, key_padding_mask)
        batch = memory.shape[0]
        if reference_points is None:
            reference_points = self.reference_points.weight.unsqueeze(0).expand(batch, -1, -1)  # (B, Nq, 3)
        elif reference_points.dim() != 3 or reference_points.shape[0] != batch or reference_points.shape[2] != 3:
            raise ValueError(f"reference_points must be [B={batch}, Nq, 3], got {tuple(reference_points.shape)}")
        query_pos = self.query_embedding(reference_points)  # (B, Nq, E)
        if query is None:
            query = torch.zeros_like(query_pos)
        elif query.shape != query_pos.shape:
            raise ValueError(f"query must be [B, Nq, E] = {tuple(query_pos.shape)}, got {tuple(query.shape)}")
        return self.run_layers(
            query,
            query_pos,
            reference_points,
            memory,
            key_pos,
            key_padding_mask,
            track_keys=track_keys,
            self_attn_mask=self_attn_mask,
        )
