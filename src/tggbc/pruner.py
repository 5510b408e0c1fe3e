"""`KeyPruner`: tgGBC for a decoder loop in one call per layer.

Imports nothing but torch and the core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .prune import gather_keys, importance_from_rows, prune_schedule, query_confidence, select_keys, top_queries

__all__ = ["KeyPruner", "PrunedKeys"]

# Either the full head-averaged map [B, Nq, Nk] (reference path), or a callable that returns the
# rows of given queries [B, K] -> [B, K, Nk] (None -> all rows), such as attention.AttentionRows.
Attention = Tensor | Callable[[Tensor | None], Tensor]


class PrunedKeys(NamedTuple):
    key: Tensor
    value: Tensor | None
    key_pos: Tensor | None
    key_padding_mask: Tensor | None
    indices: Tensor | None  # [B, Nk'] kept positions among this layer's keys; None if nothing dropped


class KeyPruner:
    """Holds a tgGBC setting and prunes keys after each decoder layer.

    Args:
        r: total keys to drop: an int, a fraction in (0, 1) of the keys the decoder starts
            with, or an explicit per-layer list (see `prune_schedule`).
        n: number of layers that prune (ignored for a list).
        k: only the k most confident queries vote; <= 0 means all.
        enabled: False makes every call a no-op (handy to flip tgGBC in a built model).
        batch_first: key, value, key_pos and cls_logits are [B, N, ...] if True, else [N, B, ...].
            key_padding_mask is always [B, Nk] and attention maps always [B, Nq, Nk].

    Use:
        pruner.reset(num_keys=key.shape[1], num_layers=len(layers))
        for l, layer in enumerate(layers):
            query, rows = layer(query, key, key_pos, key_padding_mask)   # rows: map or callable
            cls_logits = cls_branches[l](norm(query))
            key, value, key_pos, key_padding_mask, _ = pruner.step(
                l, cls_logits, rows, key, value, key_pos, key_padding_mask)
    """

    def __init__(
        self,
        r: int | float | Sequence[int] = 0,
        n: int = 1,
        k: int = -1,
        enabled: bool = True,
        batch_first: bool = True,
    ):
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {k!r}")
        # Validate r and n now (with a placeholder key count) so a bad setting fails at build time.
        if not isinstance(r, float):
            prune_schedule(r, n, len(r) if isinstance(r, (list, tuple)) else max(n, 1))
        else:
            prune_schedule(r, n, max(n, 1), num_keys=1 << 30)
        self.r, self.n, self.k, self.enabled, self.batch_first = r, n, k, enabled, batch_first
        self.schedule: list[int] = []
        self.num_keys: list[int] = []  # keys seen by each layer in the last forward
        self.kept: list[Tensor] = []  # original key indices kept after each pruning layer (if tracking)
        self.track = False
        self._origin: Tensor | None = None

    def __repr__(self) -> str:
        return f"KeyPruner(r={self.r!r}, n={self.n}, k={self.k}, enabled={self.enabled})"

    def reset(self, num_keys: int, num_layers: int, track: bool = False) -> list[int]:
        """Start a forward pass: resolve the per-layer schedule for this key count.

        Args:
            num_keys: keys the first layer sees.
            num_layers: decoder depth.
            track: record, after each pruning layer, the original indices of the kept keys in
                `self.kept` (for plots; costs a gather per pruning layer).
        Returns:
            the schedule, also in `self.schedule`.
        """
        if not self.enabled:
            self.schedule = [0] * num_layers
        else:
            self.schedule = prune_schedule(self.r, self.n, num_layers, num_keys=num_keys)
        self.schedule[-1] = 0  # no layer reads keys after the last one: skip the wasted work
        self.num_keys = [num_keys]
        for drop in self.schedule[:-1]:
            self.num_keys.append(self.num_keys[-1] - drop)
        self.track, self.kept, self._origin = track, [], None
        return self.schedule

    def step(
        self,
        layer: int,
        cls_logits: Tensor,
        attn: Attention,
        key: Tensor,
        value: Tensor | None = None,
        key_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> PrunedKeys:
        """Prune after decoder layer `layer` (0-based); inputs come back untouched if it drops none.

        Args:
            layer: index of the layer that just ran.
            cls_logits: its class logits, [B, Nq, C] (or [Nq, B, C] if not batch_first).
            attn: its head-averaged cross-attention weights [B, Nq, Nk], or a callable giving
                the rows of chosen queries (fast path: only K rows are ever computed).
            key, value, key_pos: [B, Nk, E] (or [Nk, B, E]); value may be key itself.
            key_padding_mask: [B, Nk] bool, True for padded keys.
        Returns:
            PrunedKeys with Nk - r_l keys in every key-shaped field.
        """
        if not self.schedule:
            raise RuntimeError("call KeyPruner.reset(num_keys, num_layers) before the decoder loop")
        if not 0 <= layer < len(self.schedule):
            raise ValueError(f"layer={layer} is outside the {len(self.schedule)}-layer schedule")
        drop = self.schedule[layer]
        if drop == 0:
            return PrunedKeys(key, value, key_pos, key_padding_mask, None)
        key_dim = 1 if self.batch_first else 0
        num_keys = key.shape[key_dim]
        if num_keys != self.num_keys[layer]:
            raise ValueError(
                f"layer {layer} was scheduled to see {self.num_keys[layer]} keys but key has shape "
                f"{tuple(key.shape)}; call reset() at the start of each forward"
            )
        with torch.no_grad():
            if not self.batch_first:
                cls_logits = cls_logits.transpose(0, 1)
            confidence = query_confidence(cls_logits)  # (B, Nq)
            index = top_queries(confidence, self.k)  # (B, K) or None
            weights = confidence if index is None else confidence.gather(1, index)
            if isinstance(attn, Tensor):
                expected = (confidence.shape[0], confidence.shape[1], num_keys)
                if tuple(attn.shape) != expected:
                    raise ValueError(f"attn must be (B, Nq, Nk) = {expected}, got {tuple(attn.shape)}")
                rows = attn if index is None else attn.gather(1, index.unsqueeze(-1).expand(-1, -1, num_keys))
                importance = importance_from_rows(rows, weights)  # (B, Nk)
            elif hasattr(attn, "importance"):  # AttentionRows: straight from the heads
                importance = attn.importance(index, weights)
            elif callable(attn):
                rows = attn(index)
                expected = (confidence.shape[0], weights.shape[1], num_keys)
                if tuple(rows.shape) != expected:
                    raise ValueError(f"attention rows must be {expected}, got {tuple(rows.shape)}")
                importance = importance_from_rows(rows, weights)
            else:
                raise TypeError(f"attn must be a tensor or a callable returning rows, got {type(attn).__name__}")
            if importance.shape[-1] != num_keys:
                raise ValueError(f"attention covers {importance.shape[-1]} keys but key has {num_keys}")
            kept = select_keys(importance, drop, key_padding_mask)  # (B, Nk - drop)
            if self.track:
                origin = self._origin
                self._origin = kept if origin is None else origin.gather(1, kept)
                self.kept.append(self._origin)
        # 2-D masks are always read as [B, Nk], so one call serves both layouts.
        key, value, key_pos, key_padding_mask = gather_keys(
            kept, key, value, key_pos, key_padding_mask, key_dim=key_dim
        )
        return PrunedKeys(key, value, key_pos, key_padding_mask, kept)
