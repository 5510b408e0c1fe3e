"""The tgGBC algorithm: score image keys by confident queries, drop the least important.

Pure tensor code; imports nothing but torch. Shape letters: B batch, Nq queries, Nk keys,
C classes, E channels, K selected queries.

After decoder layer l the importance of key j is

    S_j = sum over the K most confident queries i of  A_ij * sigmoid(max_c C_ic)

with A that layer's head-averaged cross-attention weights and C its class logits. The r_l keys
with the lowest S are removed from key, value, key_pos and key_padding_mask for later layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "query_confidence",
    "top_queries",
    "importance_from_rows",
    "attention_importance",
    "key_importance",
    "parse_r",
    "prune_schedule",
    "select_keys",
    "gather_keys",
    "training_r",
]


def _check_float(name: str, x: Tensor, ndim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def _check_mask(mask: Tensor | None, batch: int, num_keys: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = padded key), got dtype {mask.dtype}")
    if tuple(mask.shape) != (batch, num_keys):
        raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(batch, num_keys)}, got {tuple(mask.shape)}")


@torch.no_grad()
def query_confidence(cls_logits: Tensor) -> Tensor:
    """How sure each query is of its best class.

    Args:
        cls_logits: [B, Nq, C] class logits of one decoder layer.
    Returns:
        [B, Nq] sigmoid of the largest logit per query.
    """
    _check_float("cls_logits", cls_logits, 3)
    return cls_logits.amax(dim=-1).sigmoid()


@torch.no_grad()
def top_queries(confidence: Tensor, k: int) -> Tensor | None:
    """Indices of the k most confident queries per sample, or None meaning "all queries".

    Args:
        confidence: [B, Nq] from `query_confidence`.
        k: how many queries vote; k <= 0 or k >= Nq means all of them.
    Returns:
        [B, k] long indices (order unspecified), or None when every query is used.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r}")
    if k <= 0 or k >= confidence.shape[1]:
        return None
    return confidence.topk(k, dim=1, sorted=False).indices


@torch.no_grad()
def importance_from_rows(rows: Tensor, weights: Tensor) -> Tensor:
    """Weighted column sum of attention rows: S_j = sum_i rows_ij * weights_i.

    Args:
        rows: [B, K, Nk] head-averaged attention rows of the voting queries.
        weights: [B, K] their confidences.
    Returns:
        [B, Nk] key importance.
    """
    _check_float("attention rows", rows, 3)
    if tuple(weights.shape) != tuple(rows.shape[:2]):
        raise ValueError(
            f"confidence weights have shape {tuple(weights.shape)} but the attention rows "
            f"have shape {tuple(rows.shape)}: expected weights of shape {tuple(rows.shape[:2])}"
        )
    # (B, 1, K) @ (B, K, Nk) -> (B, Nk): one batched GEMV, no [B, K, Nk] temporary.
    return torch.bmm(weights.unsqueeze(1).to(rows.dtype), rows).squeeze(1)


@torch.no_grad()
def attention_importance(attn, query_index: Tensor | None, weights: Tensor) -> Tensor:
    """S_j = sum_i weights_i * A_ij over the queries in `query_index`, from any form of attention.

    Args:
        attn: the head-averaged cross-attention of one layer, in one of three forms: the full
            post-softmax map [B, Nq, Nk]; an object with `importance(query_index, weights)` that
            computes S straight from the heads (`tggbc.attention.AttentionRows`, the fast path);
            or a callable `rows(query_index) -> [B, K, Nk]`.
        query_index: [B, K] long voting queries, or None for all Nq.
        weights: [B, K] (or [B, Nq]) their votes.
    Returns:
        [B, Nk] importance.
    """
    if isinstance(attn, Tensor):
        _check_float("attn", attn, 3)
        rows = attn
        if query_index is not None:
            rows = attn.gather(1, query_index.unsqueeze(-1).expand(-1, -1, attn.shape[-1]))  # (B, K, Nk)
        return importance_from_rows(rows, weights)
    if callable(getattr(attn, "importance", None)):
        return attn.importance(query_index, weights)
    if callable(attn):
        return importance_from_rows(attn(query_index), weights)
    raise TypeError(
        f"attn must be a [B, Nq, Nk] tensor, an AttentionRows or a callable returning rows, got {type(attn).__name__}"
    )


@torch.no_grad()
def key_importance(cls_logits: Tensor, attn, k: int = -1) -> Tensor:
    """tgGBC key importance of one decoder layer.

    Args:
        cls_logits: [B, Nq, C] class logits of decoder layer l.
        attn: layer l's head-averaged cross-attention (see `attention_importance` for its forms).
        k: only the k most confident queries vote; k <= 0 means all queries.
    Returns:
        [B, Nk] importance S_j = sum_i attn_ij * sigmoid(max_c cls_logits_ic), i over the voters.
    """
    _check_float("cls_logits", cls_logits, 3)
    shape = attn.shape if isinstance(attn, Tensor) or hasattr(attn, "shape") else None
    if shape is not None and tuple(shape[:2]) != tuple(cls_logits.shape[:2]):
        raise ValueError(
            f"attn has shape {tuple(shape)} (B, Nq, Nk) but cls_logits has shape "
            f"{tuple(cls_logits.shape)} (B, Nq, C): B and Nq must agree"
        )
    confidence = query_confidence(cls_logits)  # (B, Nq)
    index = top_queries(confidence, k)  # (B, K) or None
    weights = confidence if index is None else confidence.gather(1, index)
    return attention_importance(attn, index, weights)


def parse_r(text: str) -> int | float | list[int]:
    """A budget written as text: '21000' -> 21000 keys, '0.875' -> a fraction of the keys,
    '4000,4000,0,0,0,0' -> keys per layer. Raises ValueError naming the text otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"parse_r reads text, got {type(text).__name__}")
    try:
        if "," in text:
            return [int(x) for x in text.split(",")]
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ValueError(
            f"r must be an int (keys), a fraction like 0.875, or a comma list of ints, got {text!r}"
        ) from None


def _resolve_total(r: int | float, num_keys: int | None) -> int:
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise TypeError(f"r must be an int (keys), a float in (0, 1) (fraction of keys) or a list, got {r!r}")
    if isinstance(r, float):
        if not math.isfinite(r) or not 0.0 <= r < 1.0:
            raise ValueError(f"a fractional r must lie in [0, 1), got r={r}")
        if num_keys is None:
            raise ValueError(f"r={r} is a fraction of the keys: pass num_keys to resolve it")
        return int(round(r * num_keys))
    if r < 0:
        raise ValueError(f"r must be >= 0, got r={r}")
    return r


def prune_schedule(
    r: int | float | Sequence[int],
    n: int = 1,
    num_layers: int = 6,
    num_keys: int | None = None,
) -> list[int]:
    """Keys to drop after each decoder layer.

    Reference rounding rule (kept exactly so results match the published code): the total r is
    spread over the first n layers as p = r // n rounded down to an even number, the first n-1
    layers drop p each and layer n drops the rest. Examples (num_layers=6): r=12000, n=3 ->
    [4000, 4000, 4000, 0, 0, 0]; r=1001, n=2 -> [500, 501, 0, 0, 0, 0].

    Args:
        r: total keys to drop (int), a fraction of the starting keys (float in (0, 1), needs
            num_keys), or an explicit per-layer list of num_layers ints (n is then ignored).
        n: number of layers that prune.
        num_layers: decoder depth.
        num_keys: keys the decoder starts with; when given, the schedule is checked to leave
            at least one key.
    Returns:
        num_layers ints; entry l is how many keys are dropped after layer l (0-based).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if num_keys is not None and (isinstance(num_keys, bool) or not isinstance(num_keys, int) or num_keys < 1):
        raise ValueError(f"num_keys must be a positive int, got {num_keys!r}")
    if isinstance(r, (list, tuple)):
        if len(r) != num_layers:
            raise ValueError(f"an explicit schedule needs one entry per layer ({num_layers}), got {len(r)}: {list(r)}")
        for x in r:
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ValueError(f"explicit schedule entries must be ints >= 0, got {list(r)}")
        schedule = list(r)
    else:
        total = _resolve_total(r, num_keys)
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {n!r}")
        if n > num_layers:
            raise ValueError(f"n={n} pruning layers is more than num_layers={num_layers}")
        if n < 0 or (n == 0 and total > 0):
            # The reference silently prunes nothing here; a budget nobody spends is a mistake.
            raise ValueError(f"n={n} layers cannot drop r={r} keys: use n >= 1 (or r=0 for no pruning)")
        schedule = [0] * num_layers
        if total > 0:
            per_layer = total // n
            if per_layer % 2 == 1:  # the reference keeps per-layer counts even
                per_layer -= 1
            schedule[: n - 1] = [per_layer] * (n - 1)
            schedule[n - 1] = total - (n - 1) * per_layer
    if num_keys is not None and sum(schedule) >= num_keys:
        raise ValueError(
            f"schedule {schedule} drops {sum(schedule)} keys but the decoder starts with only "
            f"{num_keys}: at least one key must remain (use r < {num_keys} or a fraction < 1)"
        )
    return schedule


@torch.no_grad()
def select_keys(
    importance: Tensor,
    r: int,
    key_padding_mask: Tensor | None = None,
    *,
    traceable: bool = False,
    check: bool | None = None,
) -> Tensor:
    """Indices of the keys to keep after dropping the r least important ones per sample.

    Padded keys (key_padding_mask True) count as least important of all, so a padded key is
    never kept while a valid key is dropped. Ties go by position: of two equal keys the earlier
    is dropped first (the order of a stable ascending sort).

    Two implementations of that one rule: a stable argsort (eager), and with `traceable=True` a
    TopK over the reversed keys, which traces into a static ONNX graph (ONNX has no stable sort;
    its TopK keeps the lower index of a tie, which on reversed keys is the later key: the same
    set). Run eagerly, torch.topk promises no tie rule, so keep the default there.

    Args:
        importance: [B, Nk] from `key_importance`.
        r: number of keys to drop, 0 <= r < Nk.
        key_padding_mask: optional [B, Nk] bool, True for padded keys.
        traceable: the TopK form, for export.
        check: refuse NaN/inf importance (reading the result back to the host). None = only on
            the CPU, where that costs no device synchronisation; off when traceable.
    Returns:
        [B, Nk - r] long indices of the kept keys, in ascending key order (the reference returns
        them in ascending importance order; order does not change attention results, and key
        order keeps the gathers cache-friendly).
    """
    _check_float("importance", importance, 2)
    batch, num_keys = importance.shape
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {r!r}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got r={r}")
    if r >= num_keys:
        raise ValueError(f"cannot drop r={r} of Nk={num_keys} keys: at least one key must remain")
    _check_mask(key_padding_mask, batch, num_keys)
    if check is None:
        check = importance.device.type == "cpu" and not traceable
    if check and not bool(torch.isfinite(importance).all()):
        raise ValueError(
            f"importance of shape {tuple(importance.shape)} contains NaN or inf; "
            "check the attention weights and class logits that produced it"
        )
    if key_padding_mask is not None:
        # Padded keys sort first, so they go before any valid key; since r < Nk, every sample
        # keeps at least one valid key whenever it has one.
        importance = importance.masked_fill(key_padding_mask, float("-inf"))
    if traceable:
        reversed_index = importance.flip(1).topk(num_keys - r, dim=1, largest=True, sorted=False).indices
        kept = (num_keys - 1) - reversed_index  # (B, Nk - r), back to key positions
    else:
        kept = importance.argsort(dim=1, stable=True)[:, r:]  # ascending importance: drop the first r
    return kept.sort(dim=1).values


def gather_keys(
    indices: Tensor, *tensors: Tensor | None, key_dim: int = 1, check: bool | None = None
) -> tuple[Tensor | None, ...]:
    """Apply kept-key indices to key-shaped tensors.

    One row gather per tensor (index_select on the flattened batch x key rows): a plain row copy
    in eager PyTorch and in any ONNX runtime, and the same code traces for export.

    Args:
        indices: [B, Nk'] long indices from `select_keys`, each in [0, Nk).
        tensors: each None (passed through), a [B, Nk] mask, or a tensor whose dimension
            `key_dim` indexes keys and which has batch at the other of dims 0/1: [B, Nk, ...]
            with key_dim=1 (batch-first) or [Nk, B, ...] with key_dim=0 (sequence-first).
            2-D tensors are always read as [B, Nk] (nn.MultiheadAttention's mask layout).
        key_dim: 1 for batch-first tensors, 0 for sequence-first.
        check: refuse indices outside [0, Nk) (reads them back to the host). None = only on the CPU.
    Returns:
        A tuple, one entry per input, with Nk replaced by Nk'. The same tensor object passed
        twice (key is value in the PETR hosts) is gathered once.
    """
    if not isinstance(indices, Tensor) or indices.dtype != torch.long or indices.dim() != 2:
        got = f"{indices.dtype} {tuple(indices.shape)}" if isinstance(indices, Tensor) else type(indices).__name__
        raise TypeError(f"indices must be a [B, Nk'] torch.long tensor, got {got}")
    if key_dim not in (0, 1):
        raise ValueError(f"key_dim must be 0 (sequence-first) or 1 (batch-first), got {key_dim}")
    if check is None:
        check = indices.device.type == "cpu"
    batch, kept = indices.shape
    done: dict[int, Tensor] = {}
    out: list[Tensor | None] = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"tensor {i} must be a torch.Tensor or None, got {type(t).__name__}")
        if id(t) in done:
            out.append(done[id(t)])
            continue
        dim = 1 if t.dim() == 2 else key_dim
        if t.dim() < 2 or t.shape[1 - dim] != batch:
            raise ValueError(
                f"tensor {i} has shape {tuple(t.shape)}; expected batch {batch} at dim {1 - dim} and keys at dim {dim}"
            )
        num_keys = t.shape[dim]
        if check and indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < num_keys):
            raise ValueError(
                f"indices must lie in [0, {num_keys}) for tensor {i} of shape {tuple(t.shape)}, got values in "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        rest = t.shape[2:]
        if dim == 1:  # (B, Nk, ...): row b * Nk + j
            flat = (indices + torch.arange(batch, device=indices.device).unsqueeze(1) * num_keys).reshape(-1)
            g = t.reshape(batch * num_keys, *rest).index_select(0, flat).reshape(batch, kept, *rest)
        else:  # (Nk, B, ...): row j * B + b
            flat = (indices.t() * batch + torch.arange(batch, device=indices.device)).reshape(-1)
            g = t.reshape(num_keys * batch, *rest).index_select(0, flat).reshape(kept, batch, *rest)
        done[id(t)] = g
        out.append(g)
    return tuple(out)


def training_r(iteration: int, warmup: int, heating: int, r_max: int) -> int:
    """Total r for fine-tuning with tgGBC (reference curve).

    Iterations count from 1. The first `warmup` use r = 0; during the next `heating` r rises
    linearly, r = int((iteration - warmup) / heating * r_max); afterwards r = r_max. Feed the
    result to `prune_schedule`.
    """
    for name, v in (("iteration", iteration), ("warmup", warmup), ("heating", heating), ("r_max", r_max)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if iteration < 1:
        raise ValueError(f"iteration counts from 1, got {iteration}")
    if iteration <= warmup:
        return 0
    if iteration <= warmup + heating:
        return int((iteration - warmup) / heating * r_max)
    return r_max
