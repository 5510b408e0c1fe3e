"""`KeyPruner`: tgGBC (or a control) for a decoder loop in one call per layer, and `pruning`,
the reversible way to give a decoder a pruner or an attention mode.

Imports nothing but torch, the core and the baselines.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .baselines import attention_importance_uniform, merge_keys, random_importance
from .prune import gather_keys, key_importance, prune_schedule, select_keys

__all__ = ["KeyPruner", "PrunedKeys", "METHODS", "DENSE", "Setting", "pruning"]

# tgGBC and the controls it is measured against (see `tggbc.baselines`).
METHODS = ("tggbc", "random", "inverse", "attention", "merge")
DENSE = "dense"  # the name of the decoder without pruning in every benchmark


class PrunedKeys(NamedTuple):
    """The keys later layers read. After a merge, key_padding_mask is a float [B, Nk'] log-size
    bias (proportional attention) and indices is None (no key survives as it was)."""

    key: Tensor
    value: Tensor | None
    key_pos: Tensor | None
    key_padding_mask: Tensor | None
    indices: Tensor | None  # [B, Nk'] kept positions among this layer's keys; None if nothing dropped


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")


class KeyPruner:
    """Holds a pruning setting and reduces the keys after each decoder layer.

    Args:
        r: total keys to drop: an int, a fraction in (0, 1) of the keys the decoder starts
            with, or an explicit per-layer list (see `prune_schedule`).
        n: number of layers that prune (ignored for a list).
        k: only the k most confident queries vote; <= 0 means all.
        method: "tggbc" (the method), or a control at the same kept count: "random",
            "inverse" (the most important keys dropped), "attention" (all queries vote with
            weight 1) or "merge" (ToMe-style key merging).
        seed: of the random control's generator (drawn once per pruning layer and sample, so
            a run over the same frames in the same order keeps the same keys).
        enabled: False makes every call a no-op.
        traceable: select and gather in the form that traces into a static graph (export);
            it skips the checks that read data back to the host.
        batch_first: key, value, key_pos and cls_logits are [B, N, ...] if True, else [N, B, ...].
            key_padding_mask is always [B, Nk] and attention maps always [B, Nq, Nk].

    Use:
        pruner.reset(num_keys=key.shape[1], num_layers=len(layers))
        for l, layer in enumerate(layers):
            query, attn = layer(query, key, key_pos, key_padding_mask)   # map, AttentionRows or callable
            cls_logits = cls_branches[l](norm(query))
            key, value, key_pos, key_padding_mask, _ = pruner.step(
                l, cls_logits, attn, key, value, key_pos, key_padding_mask)
    """

    def __init__(
        self,
        r: int | float | Sequence[int] = 0,
        n: int = 1,
        k: int = -1,
        method: str = "tggbc",
        seed: int = 0,
        enabled: bool = True,
        traceable: bool = False,
        batch_first: bool = True,
    ):
        _check_int("k", k)
        _check_int("n", n)
        _check_int("seed", seed)
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        if n < 0 and not isinstance(r, (list, tuple)):
            raise ValueError(f"n must be >= 0 (layers that prune), got n={n}")
        # Validate r and n now (with a placeholder key count) so a bad setting fails at build time.
        if isinstance(r, float):
            prune_schedule(r, n, max(n, 1), num_keys=1 << 30)
        else:
            prune_schedule(r, n, len(r) if isinstance(r, (list, tuple)) else max(n, 1))
        if not isinstance(r, (list, tuple)) and r != 0 and n == 0:
            raise ValueError(f"r={r} keys to drop over n=0 layers: use n >= 1, or r=0 for no pruning")
        self.r, self.n, self.k, self.method, self.seed = r, n, k, method, seed
        if traceable and method in ("random", "merge"):
            raise ValueError(
                f"method={method!r} cannot be traced into a static graph: export tggbc or a ranking control"
            )
        self.enabled, self.traceable, self.batch_first = enabled, traceable, batch_first
        self.schedule: list[int] = []
        self.num_keys: list[int] = []  # keys seen by each layer in the last forward
        self.generator = torch.Generator().manual_seed(seed) if method == "random" else None

    def __repr__(self) -> str:
        return f"KeyPruner(r={self.r!r}, n={self.n}, k={self.k}, method={self.method!r}, enabled={self.enabled})"

    def reset(self, num_keys: int, num_layers: int) -> list[int]:
        """Start a forward pass: resolve the per-layer schedule for this key count.

        Returns:
            the schedule (keys dropped after each layer), also in `self.schedule`.
        """
        if not self.enabled:
            self.schedule = [0] * num_layers
        else:
            self.schedule = prune_schedule(self.r, self.n, num_layers, num_keys=num_keys)
        self.schedule[-1] = 0  # no layer reads keys after the last one: skip the wasted work
        self.num_keys = [num_keys]
        for drop in self.schedule[:-1]:
            self.num_keys.append(self.num_keys[-1] - drop)
        return self.schedule

    def step(
        self,
        layer: int,
        cls_logits: Tensor,
        attn,
        key: Tensor,
        value: Tensor | None = None,
        key_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> PrunedKeys:
        """Reduce the keys after decoder layer `layer` (0-based); inputs come back untouched if it drops none.

        Args:
            layer: index of the layer that just ran.
            cls_logits: its class logits, [B, Nq, C] (or [Nq, B, C] if not batch_first).
            attn: its head-averaged cross-attention: the map [B, Nq, Nk], an AttentionRows
                (fast path: only K rows per head are computed) or a callable giving rows.
            key, value, key_pos: [B, Nk, E] (or [Nk, B, E]); value may be key itself.
            key_padding_mask: [B, Nk] bool, True for padded keys (float after a merge).
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
        for name, t in (("value", value), ("key_pos", key_pos)):
            if t is not None and t is not key and tuple(t.shape[:2]) != tuple(key.shape[:2]):
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)} but key has {tuple(key.shape)}: the key counts differ"
                )
        if self.method == "merge":
            return self._merge(drop, key, value, key_pos, key_padding_mask)
        with torch.no_grad():
            importance = self.importance(cls_logits, attn, num_keys)
            kept = select_keys(importance, drop, key_padding_mask, traceable=self.traceable)  # (B, Nk - drop)
        # 2-D masks are always read as [B, Nk], so one call serves both layouts.
        key, value, key_pos, key_padding_mask = gather_keys(
            kept, key, value, key_pos, key_padding_mask, key_dim=key_dim, check=False if self.traceable else None
        )
        return PrunedKeys(key, value, key_pos, key_padding_mask, kept)

    @torch.no_grad()
    def importance(self, cls_logits: Tensor, attn, num_keys: int) -> Tensor:
        """[B, Nk] scores this pruner's method ranks keys by (the lowest are dropped)."""
        if not self.batch_first:
            cls_logits = cls_logits.transpose(0, 1)
        batch, num_queries = cls_logits.shape[:2]
        if self.method == "random":
            return random_importance(batch, num_keys, self.generator, device=cls_logits.device)
        if self.method == "attention":
            importance = attention_importance_uniform(attn, batch, num_queries, device=cls_logits.device)
        else:
            importance = key_importance(cls_logits, attn, self.k)
        if importance.shape != (batch, num_keys):
            raise ValueError(f"the attention covers {tuple(importance.shape)} (B, Nk) but key has {num_keys} keys")
        return -importance if self.method == "inverse" else importance

    def _merge(self, drop: int, key: Tensor, value, key_pos, key_padding_mask) -> PrunedKeys:
        if not self.batch_first:
            raise ValueError("method='merge' is batch-first only, as the host decoders are")
        size = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                if bool(key_padding_mask.any()):
                    raise ValueError("method='merge' cannot merge padded keys: pass frames without padding")
            else:  # the log-size bias of an earlier merge
                size = key_padding_mask.float().exp()
        key, key_pos, value, size = merge_keys(key, key_pos, value, drop, size)
        return PrunedKeys(key, value, key_pos, size.log(), None)


@contextmanager
def pruning(decoder, pruner: KeyPruner | None = ..., attention: str | None = None) -> Iterator:
    """Give `decoder` a pruner and/or an attention mode for the duration of a `with` block.

        with pruning(detector.decoder, KeyPruner(r=0.875, k=39)):
            out = detector(images, lidar2img)
        with pruning(decoder, None, attention="reference"):   # unpruned, unfused attention
            ...

    Args:
        decoder: any module with `pruner` and `attention` attributes (the host decoders).
        pruner: the pruner to use (None: no pruning); left as it is when not given.
        attention: "fast" or "reference"; left as it is when None.
    The previous pruner and mode come back when the block ends, also on an error.
    """
    for name in ("pruner", "attention"):
        if not hasattr(decoder, name):
            raise TypeError(f"{type(decoder).__name__} has no `{name}` attribute: expected a tggbc host decoder")
    saved = decoder.pruner, decoder.attention
    try:
        if pruner is not ...:
            decoder.pruner = pruner
        if attention is not None:
            decoder.attention = attention
        yield decoder
    finally:
        decoder.pruner, decoder.attention = saved


@dataclass(frozen=True)
class Setting:
    """One named decoder setting of a benchmark: method None is the dense decoder, else a
    KeyPruner method at (r, n, k). `fraction` is the share of keys dropped, for tables and plots."""

    name: str
    method: str | None = None
    r: int | float | list[int] = 0
    n: int = 1
    k: int = -1
    fraction: float = 0.0

    def pruner(self, seed: int = 0) -> KeyPruner | None:
        return None if self.method is None else KeyPruner(r=self.r, n=self.n, k=self.k, method=self.method, seed=seed)

    def describe(self) -> str:
        return DENSE if self.method is None else f"{self.method} r={self.r} n={self.n} k={self.k}"

    def check(self, num_keys: int, num_layers: int) -> None:
        """Raise now the ValueError this setting would raise at its first frame (r >= keys, a budget
        no layer spends, ...), so a long run fails before any image is read."""
        if self.method is not None:
            self.pruner().reset(num_keys, num_layers)
