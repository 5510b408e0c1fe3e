"""Controls for tgGBC: other ways to reduce the keys to the same count.

Each keeps exactly as many keys as tgGBC after each layer (same `r`, `n` schedule), so an
accuracy difference is the selection's alone:

- `random_importance`: a seeded uniform draw; the kept keys are a uniform random subset of the
  valid keys (padded keys are still dropped first).
- inverse: tgGBC's importance negated, so the *most* important keys are dropped (a floor).
- `attention_importance_uniform`: every query votes with weight 1: attention only, without the
  classification guidance.
- `merge_keys`: token merging in the style of ToMe (Bolya et al., ICLR 2023): bipartite soft
  matching on key similarity merges pairs into size-weighted averages, and later attention adds
  log(size) to a merged key's logit (proportional attention), so a merged key draws the
  attention of all the keys it stands for.

Pure tensor code; imports nothing but torch and the core.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .prune import attention_importance

__all__ = ["random_importance", "attention_importance_uniform", "merge_keys"]


@torch.no_grad()
def random_importance(batch: int, num_keys: int, generator: torch.Generator | None, device=None) -> Tensor:
    """[B, Nk] i.i.d. uniform scores: `select_keys` on them keeps a uniform random subset.

    Drawn on the CPU from `generator` (so a seed gives the same keys on any device), then moved.
    """
    return torch.rand(batch, num_keys, generator=generator).to(device)


@torch.no_grad()
def attention_importance_uniform(attn, batch: int, num_queries: int, device=None) -> Tensor:
    """S_j = sum over all queries i of A_ij: every query votes with weight 1. [B, Nk]."""
    weights = torch.ones(batch, num_queries, device=device)
    return attention_importance(attn, None, weights)


def _bipartite_merge(x: list[Tensor], metric: Tensor, size: Tensor, r: int) -> tuple[list[Tensor], Tensor]:
    """One round of ToMe's bipartite soft matching: r keys of set A merge into their most similar
    key of set B (alternate keys). x: tensors [B, N, ...] averaged with the sizes; metric [B, N, D]
    normalised; size [B, N]. Returns the merged tensors [B, N - r, ...] and sizes [B, N - r]."""
    a_metric, b_metric = metric[:, ::2], metric[:, 1::2]
    scores = a_metric @ b_metric.transpose(1, 2)  # (B, Na, Nb) cosine similarity
    best, best_b = scores.max(dim=-1)  # (B, Na): each A key's most similar B key
    order = best.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:]  # the r most redundant A keys merge
    dst = best_b.gather(1, merged_a)  # (B, r)

    def merge(t: Tensor) -> Tensor:
        a, b = t[:, ::2], t[:, 1::2]
        shape = t.shape[2:]

        def take(src: Tensor, index: Tensor) -> Tensor:
            return src.gather(1, index.view(*index.shape, *(1,) * len(shape)).expand(-1, -1, *shape))

        b = b.scatter_add(1, dst.view(*dst.shape, *(1,) * len(shape)).expand(-1, -1, *shape), take(a, merged_a))
        return torch.cat([take(a, kept_a), b], dim=1)

    weighted = [merge(t * size.view(*size.shape, *(1,) * (t.dim() - 2)).to(t.dtype)) for t in x]
    size = merge(size)
    return [t / size.view(*size.shape, *(1,) * (t.dim() - 2)).to(t.dtype) for t in weighted], size


@torch.no_grad()
def merge_keys(
    key: Tensor,
    key_pos: Tensor | None,
    value: Tensor | None,
    r: int,
    size: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """Merge r keys away, ToMe-style, batch-first.

    Similarity is the cosine of what the cross-attention projects into its keys (key + key_pos).
    One round merges at most half the keys (set A into set B), so larger r takes several rounds,
    each merging min(remaining, N // 2).

    Args:
        key: [B, Nk, E] (the memory); key_pos: [B, Nk, E] or None; value: [B, Nk, E], None, or
            `key` itself (then merged once).
        r: keys to remove, 0 <= r < Nk.
        size: [B, Nk] how many original keys each key stands for; None = all ones.
    Returns:
        (key, key_pos, value, size) with Nk - r keys. Pass log(size) to the attention as an
        additive key mask for proportional attention.
    """
    batch, num_keys = key.shape[:2]
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < num_keys:
        raise ValueError(f"cannot merge r={r!r} of Nk={num_keys} keys: need an int with 0 <= r < Nk")
    if size is None:
        size = torch.ones(batch, num_keys, device=key.device)
    value_is_key = value is key
    tensors = [t for t in (key, key_pos, None if value_is_key else value) if t is not None]
    remaining = r
    while remaining > 0:
        step = min(remaining, tensors[0].shape[1] // 2)
        similarity_input = tensors[0] if key_pos is None else tensors[0] + tensors[1]
        metric = torch.nn.functional.normalize(similarity_input.float(), dim=-1)
        tensors, size = _bipartite_merge(tensors, metric, size, step)
        remaining -= step
    it = iter(tensors)
    key = next(it)
    key_pos = next(it) if key_pos is not None else None
    value = key if value_is_key else (next(it) if value is not None else None)
    return key, key_pos, value, size
