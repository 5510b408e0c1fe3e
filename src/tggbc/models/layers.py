"""Building blocks shared by the PETR-family decoders.

Imports nothing but torch and the core. Shape letters: B batch, Nq queries, Nk keys, M temporal
memory entries, C classes, E channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import AttentionRows, MultiheadAttention

__all__ = [
    "PETRDecoderLayer",
    "MotionLayerNorm",
    "QueryPositionEmbedding",
    "cls_branch",
    "reg_branch",
    "inverse_sigmoid",
    "sine_embed_1d",
    "sine_embed_3d",
    "nerf_embed",
    "ATTENTION_OUTPUTS",
]

# What a layer's cross-attention hands back besides its output: nothing, an AttentionRows handle
# (fused SDPA, rows on demand) or the explicit head-averaged weights map (unfused reference path).
ATTENTION_OUTPUTS = (None, "rows", "weights")


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps (mmdet's inverse_sigmoid).

    Args:
        x: any shape, values meant to lie in [0, 1].
    Returns:
        same shape; finite for any input.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _sine(pos: Tensor, num_feats: int, temperature: float) -> Tensor:
    """[...] -> [..., num_feats]: sin on even channels, cos on odd ones, interleaved (DETR layout)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    x = pos[..., None] / dim_t  # (..., F); promotes to float64 if pos is float64 (timestamps)
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_embed_3d(points: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of normalised 3D points (PETR's pos2posemb3d).

    Args:
        points: [..., 3] (x, y, z), normally in [0, 1]; scaled by 2*pi before encoding.
    Returns:
        [..., 3 * num_feats] in the reference order (y, x, z): the query-position MLP was trained
        on that order, so it must not change.
    """
    pos = points * (2 * math.pi)
    x, y, z = (_sine(pos[..., i], num_feats, temperature) for i in range(3))
    return torch.cat((y, x, z), dim=-1)


def sine_embed_1d(values: Tensor, num_feats: int = 256, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of a scalar per entry (StreamPETR's pos2posemb1d, used for time).

    Args:
        values: [..., 1]; scaled by 2*pi before encoding.
    Returns:
        [..., num_feats], same floating dtype as `values` (float64 stays float64).
    """
    return _sine(values[..., 0] * (2 * math.pi), num_feats, temperature)


def nerf_embed(x: Tensor, num_freqs: int = 6) -> Tensor:
    """NeRF frequency encoding (StreamPETR's nerf_positional_encoding, log sampling, no input).

    Args:
        x: [..., D].
    Returns:
        [..., 2 * num_freqs * D]: (sin(x), cos(x), sin(2x), cos(2x), ...), each block of D channels.
    """
    freqs = 2.0 ** torch.linspace(0.0, num_freqs - 1, num_freqs, dtype=x.dtype, device=x.device)
    parts = []
    for f in freqs:
        parts += [torch.sin(x * f), torch.cos(x * f)]
    return torch.cat(parts, dim=-1)


class QueryPositionEmbedding(nn.Module):
    """Query position = MLP(sine encoding of the normalised 3D reference point).

    Args:
        embed_dims: E.
        num_feats: sine channels per axis (3 * num_feats MLP inputs).
    """

    def __init__(self, embed_dims: int = 256, num_feats: int = 128):
        super().__init__()
        self.num_feats = num_feats
        self.mlp = nn.Sequential(nn.Linear(3 * num_feats, embed_dims), nn.ReLU(), nn.Linear(embed_dims, embed_dims))

    def forward(self, reference_points: Tensor) -> Tensor:
        """[..., 3] normalised points -> [..., E] query_pos."""
        embed = sine_embed_3d(reference_points, self.num_feats)
        return self.mlp(embed.to(self.mlp[0].weight.dtype))


class MotionLayerNorm(nn.Module):
    """Motion-aware layer norm (StreamPETR's MLN): LayerNorm whose scale and shift come from a code.

    out = gamma(c) * LN(x) + beta(c), with c = ReLU(Linear(code)). gamma starts at 1 and beta at 0
    (zero weights), so an untrained MLN is a plain LayerNorm without affine parameters.

    Args:
        code_dims: channels of the conditioning code (180 for ego motion, 8 for camera cones).
        embed_dims: E.
    """

    def __init__(self, code_dims: int, embed_dims: int = 256):
        super().__init__()
        self.code_dims = code_dims
        self.reduce = nn.Sequential(nn.Linear(code_dims, embed_dims), nn.ReLU())
        self.gamma = nn.Linear(embed_dims, embed_dims)
        self.beta = nn.Linear(embed_dims, embed_dims)
        self.norm = nn.LayerNorm(embed_dims, elementwise_affine=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gamma.weight)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.weight)
        nn.init.zeros_(self.beta.bias)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        """x [..., N, E], code [..., N or 1, code_dims] (broadcast over N) -> [..., N, E]."""
        c = self.reduce(code.to(self.gamma.weight.dtype))
        return self.gamma(c) * self.norm(x) + self.beta(c)


def cls_branch(embed_dims: int, num_classes: int, num_fcs: int = 2) -> nn.Sequential:
    """num_fcs x [Linear, LayerNorm, ReLU] + Linear -> class logits (indices 0,1,3,4,6 hold weights)."""
    layers: list[nn.Module] = []
    for _ in range(num_fcs):
        layers += [nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(embed_dims, num_classes))
    return nn.Sequential(*layers)


def reg_branch(embed_dims: int, code_size: int, num_fcs: int = 2) -> nn.Sequential:
    """num_fcs x [Linear, ReLU] + Linear -> box code (indices 0,2,4 hold weights)."""
    layers: list[nn.Module] = []
    for _ in range(num_fcs):
        layers += [nn.Linear(embed_dims, embed_dims), nn.ReLU()]
    layers.append(nn.Linear(embed_dims, code_size))
    return nn.Sequential(*layers)


class PETRDecoderLayer(nn.Module):
    """Post-norm PETR decoder layer: self_attn -> norm1 -> cross_attn -> norm2 -> FFN -> norm3.

    Self-attention: q = query + query_pos, k = key_self + key_self_pos, v = key_self, where
    key_self is the queries themselves, or [queries, temp_memory] in StreamPETR (the temporal
    entries bring their own temp_pos). Cross-attention: q = query + query_pos, k = key + key_pos,
    v = key (the image memory). Dropout as in the mmcv layers of the hosts: on attention weights,
    on each residual branch, and inside the FFN.

    Args:
        embed_dims: E.
        num_heads: H.
        ffn_dims: FFN hidden width.
        dropout: one rate for all of the above (training only).
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, ffn_dims: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.self_attn = MultiheadAttention(embed_dims, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = MultiheadAttention(embed_dims, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.norm3 = nn.LayerNorm(embed_dims)
        self.linear1 = nn.Linear(embed_dims, ffn_dims)
        self.linear2 = nn.Linear(ffn_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)  # inside the FFN, after the activation
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        key: Tensor,
        key_pos: Tensor,
        key_padding_mask: Tensor | None = None,
        temp_memory: Tensor | None = None,
        temp_pos: Tensor | None = None,
        attention_output: str | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | AttentionRows | None]:
        """One decoder layer.

        Args:
            query: [B, Nq, E] content of the queries.
            query_pos: [B, Nq, E] their position embedding.
            key: [B, Nk, E] image memory (also the cross-attention value).
            key_pos: [B, Nk, E] its 3D position embedding.
            key_padding_mask: [B, Nk] bool, True for padded keys.
            temp_memory: [B, M, E] extra self-attention keys/values (StreamPETR), or None.
            temp_pos: [B, M, E] their position embedding.
            attention_output: None, "rows" (AttentionRows of the cross-attention, fused path) or
                "weights" (explicit head-averaged [B, Nq, Nk] map, unfused reference path).
            self_attn_mask: [Nq, Nq (+ M)] bool, True where a query must not attend (the
                denoising groups of training), or None.
        Returns:
            ([B, Nq, E] layer output, the requested cross-attention output or None).
        """
        if attention_output not in ATTENTION_OUTPUTS:
            raise ValueError(f"attention_output must be one of {ATTENTION_OUTPUTS}, got {attention_output!r}")
        if temp_memory is None:
            self_value, self_pos = query, query_pos
        else:
            self_value = torch.cat([query, temp_memory], dim=1)  # (B, Nq + M, E)
            self_pos = torch.cat([query_pos, temp_pos], dim=1)
        out, _ = self.self_attn(query + query_pos, self_value + self_pos, self_value, attn_mask=self_attn_mask)
        query = self.norm1(query + self.dropout1(out))

        out, attn = self.cross_attn(
            query + query_pos,
            key + key_pos,
            key,
            key_padding_mask=key_padding_mask,
            need_weights=attention_output == "weights",
            return_rows=attention_output == "rows",
        )
        query = self.norm2(query + self.dropout2(out))

        out = self.linear2(self.dropout(F.relu(self.linear1(query))))
        query = self.norm3(query + self.dropout3(out))
        return query, attn
