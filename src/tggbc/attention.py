"""Multi-head attention that stays fused and still yields the attention rows tgGBC needs.

`MultiheadAttention` has exactly the parameters of `torch.nn.MultiheadAttention` (in_proj_weight,
in_proj_bias, out_proj.weight, out_proj.bias), so state dicts load both ways. Its output always
comes from `scaled_dot_product_attention` (flash / fused kernels where the device has them). With
`return_rows=True` it also hands back an `AttentionRows` that keeps the projected queries and keys
of this call; tgGBC then asks it for the head-averaged weights of only the top-k queries once the
layer's class logits are known: K x Nk per head instead of the Nq x Nk map the published code
materialises. `multi_head_attention` is the same computation as a function of the parameters, for
attention modules that tggbc does not own (`tggbc.patch` runs the user's own modules through it).

Imports nothing but torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiheadAttention", "AttentionRows", "multi_head_attention"]


class AttentionRows:
    """Head-averaged attention weights of chosen queries, computed on demand.

    Holds q [B, H, Nq, hd] and k [B, H, Nk, hd] from one attention call and the additive mask
    [B, 1, 1, Nk] (or None). Nothing is computed until asked; then one head at a time, so the
    largest temporary is [B, K, Nk] rather than the [B, H, Nq, Nk] map.
    """

    def __init__(self, q: Tensor, k: Tensor, mask: Tensor | None):
        self.q, self.k, self.mask = q, k, mask

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, Nq, Nk) of the full map these rows come from."""
        return (self.q.shape[0], self.q.shape[2], self.k.shape[2])

    def _queries(self, query_index: Tensor | None) -> Tensor:
        """Scaled float32 queries of the chosen rows: [B, H, K, hd]."""
        q = self.q
        if query_index is not None:
            batch, heads, _, dim = q.shape
            if query_index.dim() != 2 or query_index.shape[0] != batch:
                raise ValueError(f"query_index must be [B={batch}, K], got {tuple(query_index.shape)}")
            q = q.gather(2, query_index[:, None, :, None].expand(-1, heads, -1, dim))  # (B, H, K, hd)
        # Float32 whatever the compute dtype: these rows rank keys, and bf16/fp16 rounding would
        # make the kept set depend on the precision.
        return q.float() * q.shape[-1] ** -0.5

    def _head_softmax(self, q: Tensor, h: int, out: Tensor | None = None) -> Tensor:
        """Post-softmax weights of head h: [B, K, Nk] float32, written into `out` when given.

        Reusing one buffer for every head matters on CPU: a fresh [B, K, Nk] tensor per head
        costs more in page faults than its GEMM (measured 2x at K=175, Nk=24000).
        """
        k = self.k[:, h].float().transpose(1, 2)  # (B, hd, Nk)
        if out is None:
            out = q.new_empty(q.shape[0], q.shape[2], k.shape[2])
        if self.mask is None:
            torch.bmm(q[:, h], k, out=out)
        else:
            torch.baddbmm(self.mask[:, 0], q[:, h], k, out=out)  # mask added in the GEMM epilogue
        # Softmax in place (public torch.softmax has no out=): subtract the row max, exp, normalise.
        out.sub_(out.amax(dim=-1, keepdim=True)).exp_()
        return out.div_(out.sum(dim=-1, keepdim=True))

    @torch.no_grad()
    def __call__(self, query_index: Tensor | None = None) -> Tensor:
        """Head-averaged post-softmax weights of the queries in `query_index`.

        Args:
            query_index: [B, K] long query indices, or None for all Nq queries.
        Returns:
            [B, K, Nk] (or [B, Nq, Nk]) float32 rows, equal to nn.MultiheadAttention's averaged
            weights for those queries.
        """
        q = self._queries(query_index)
        heads = q.shape[1]
        rows = self._head_softmax(q, 0)
        buffer = torch.empty_like(rows)
        for h in range(1, heads):
            rows += self._head_softmax(q, h, out=buffer)
        return rows.div_(heads)

    @torch.no_grad()
    def importance(self, query_index: Tensor | None, weights: Tensor) -> Tensor:
        """tgGBC importance straight from the heads, without forming the averaged rows.

        S_j = sum_i weights_i * mean_h softmax_h(q_i . k_j): per head one GEMM, one softmax and
        one GEMV, so the cost is K x Nk per head and the temporary is one head's [B, K, Nk].

        Args:
            query_index: [B, K] voting queries, or None for all.
            weights: [B, K] (or [B, Nq]) their confidences.
        Returns:
            [B, Nk] float32 importance.
        """
        q = self._queries(query_index)
        batch, heads, num_rows, _ = q.shape
        if tuple(weights.shape) != (batch, num_rows):
            raise ValueError(f"weights must be (B, K) = {(batch, num_rows)}, got {tuple(weights.shape)}")
        w = (weights.float() / heads).unsqueeze(1)  # (B, 1, K): the head mean folded into the weights
        importance = torch.zeros(batch, 1, self.k.shape[2], device=q.device)
        buffer = q.new_empty(batch, num_rows, self.k.shape[2])
        for h in range(heads):
            importance.baddbmm_(w, self._head_softmax(q, h, out=buffer))  # (B, 1, K) @ (B, K, Nk)
        return importance.squeeze(1)


def _additive_mask(key_padding_mask: Tensor | None, batch: int, num_keys: int) -> Tensor | None:
    """[B, Nk] bool (True = padded) or float (added to logits) -> [B, 1, 1, Nk] float."""
    if key_padding_mask is None:
        return None
    if tuple(key_padding_mask.shape) != (batch, num_keys):
        raise ValueError(
            f"key_padding_mask must have shape (B, Nk) = {(batch, num_keys)}, got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.dtype == torch.bool:
        mask = torch.zeros(key_padding_mask.shape, dtype=torch.float32, device=key_padding_mask.device)
        mask = mask.masked_fill(key_padding_mask, float("-inf"))
    elif key_padding_mask.is_floating_point():
        mask = key_padding_mask.float()
    else:
        raise TypeError(f"key_padding_mask must be bool or floating point, got {key_padding_mask.dtype}")
    return mask[:, None, None, :]


def _project(x: Tensor, weight: Tensor, bias: Tensor | None, i: int, num_heads: int) -> Tensor:
    """x [B, N, E] -> head-split projection i (0 q, 1 k, 2 v) of a packed in-projection: [B, H, N, hd]."""
    e = weight.shape[1]
    y = F.linear(x, weight[i * e : (i + 1) * e], None if bias is None else bias[i * e : (i + 1) * e])
    return y.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    need_weights: bool = False,
    return_rows: bool = False,
    dropout_p: float = 0.0,
    batch_first: bool = False,
) -> tuple[Tensor, Tensor | AttentionRows | None]:
    """nn.MultiheadAttention's maths on given parameters, fused through SDPA unless weights are asked for.

    Args:
        query: [B, Nq, E] (batch_first) or [Nq, B, E].
        key, value: [B, Nk, E] or [Nk, B, E]; `value is key` is allowed.
        num_heads: H; E must be divisible by H.
        in_proj_weight: [3E, E] packed q, k, v projections (nn.MultiheadAttention's layout).
        in_proj_bias: [3E] or None.
        out_proj_weight: [E, E]; out_proj_bias: [E] or None.
        key_padding_mask: [B, Nk], bool (True = ignore) or float (added to logits).
        attn_mask: optional [Nq, Nk] bool (True = not allowed) or float additive mask.
        need_weights: return explicit head-averaged weights [B, Nq, Nk] computed the way
            nn.MultiheadAttention does (the unfused path the published tgGBC code needs).
        return_rows: return an AttentionRows handle (fused output, rows on demand). The rows
            honour key_padding_mask, not attn_mask (tgGBC scores cross-attention).
        dropout_p: attention dropout; pass 0 outside training.
        batch_first: the layout of query, key, value and the output.
    Returns:
        (output shaped like query, weights | AttentionRows | None).
    """
    if need_weights and return_rows:
        raise ValueError("need_weights and return_rows are exclusive: rows are the cheap form of weights")
    embed_dim = in_proj_weight.shape[1]
    if in_proj_weight.shape[0] != 3 * embed_dim:
        raise ValueError(f"in_proj_weight must be packed [3E, E], got {tuple(in_proj_weight.shape)}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 3 or t.shape[-1] != embed_dim:
            raise ValueError(f"{name} must be 3-D with {embed_dim} channels, got {tuple(t.shape)}")
    if need_weights:
        out, weights = F.multi_head_attention_forward(
            *(x if not batch_first else x.transpose(0, 1) for x in (query, key, value)),
            embed_dim,
            num_heads,
            in_proj_weight,
            in_proj_bias,
            None,
            None,
            False,
            dropout_p,
            out_proj_weight,
            out_proj_bias,
            training=dropout_p > 0,
            key_padding_mask=key_padding_mask,
            need_weights=True,
            attn_mask=attn_mask,
            average_attn_weights=True,
        )
        return (out.transpose(0, 1) if batch_first else out), weights
    if not batch_first:  # SDPA wants batch first: (N, B, E) -> (B, N, E), views only
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    batch, num_queries, num_keys = query.shape[0], query.shape[1], key.shape[1]
    if key.shape[0] != batch or value.shape[:2] != key.shape[:2]:
        raise ValueError(f"query batch {batch}, key {tuple(key.shape)} and value {tuple(value.shape)} do not agree")
    q = _project(query, in_proj_weight, in_proj_bias, 0, num_heads)  # (B, H, Nq, hd)
    k = _project(key, in_proj_weight, in_proj_bias, 1, num_heads)  # (B, H, Nk, hd)
    v = _project(
        value, in_proj_weight, in_proj_bias, 2, num_heads
    )  # (B, H, Nk, hd); its own weights even when value is key
    mask = _additive_mask(key_padding_mask, batch, num_keys)
    sdpa_mask = mask
    if attn_mask is not None:
        if tuple(attn_mask.shape) != (num_queries, num_keys):
            raise ValueError(f"attn_mask must be (Nq, Nk) = {(num_queries, num_keys)}, got {tuple(attn_mask.shape)}")
        extra = (
            attn_mask.float().masked_fill(attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else attn_mask.float()
        )
        sdpa_mask = extra if mask is None else mask + extra
    if sdpa_mask is not None:
        sdpa_mask = sdpa_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p)  # (B, H, Nq, hd)
    out = F.linear(out.transpose(1, 2).flatten(2), out_proj_weight, out_proj_bias)  # (B, Nq, E)
    if not batch_first:
        out = out.transpose(0, 1)
    rows = AttentionRows(q, k, mask) if return_rows else None
    return out, rows


class MultiheadAttention(nn.Module):
    """Drop-in for nn.MultiheadAttention (same parameters, same maths) built on fused SDPA.

    Args:
        embed_dim: E.
        num_heads: H; E must be divisible by H.
        dropout: attention dropout (training only).
        batch_first: inputs are [B, N, E] if True, else [N, B, E] (nn.MultiheadAttention's default).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiheadAttention:
        """A copy of an nn.MultiheadAttention (packed in-projection, no bias_k/v, no add_zero_attn)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or mha.in_proj_bias is None:
            raise ValueError("only nn.MultiheadAttention with packed in_proj, biases, no bias_k/bias_v is supported")
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.batch_first)
        new.load_state_dict(mha.state_dict())
        return new.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        return_rows: bool = False,
    ) -> tuple[Tensor, Tensor | AttentionRows | None]:
        """Attention of query over key/value; see `multi_head_attention` for the arguments.

        Args:
            query: [B, Nq, E] (batch_first) or [Nq, B, E].
            key, value: [B, Nk, E] or [Nk, B, E]; `value is key` is allowed.
            key_padding_mask: [B, Nk], bool (True = ignore) or float (added to logits).
            need_weights: explicit head-averaged weights [B, Nq, Nk] (unfused).
            attn_mask: optional [Nq, Nk] bool (True = not allowed) or float additive mask.
            return_rows: an AttentionRows handle (fused output, rows on demand).
        Returns:
            (output shaped like query, weights | AttentionRows | None).
        """
        return multi_head_attention(
            query,
            key,
            value,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj.weight,
            self.out_proj.bias,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            need_weights=need_weights,
            return_rows=return_rows,
            dropout_p=self.dropout if self.training else 0.0,
            batch_first=self.batch_first,
        )
