"""The decoder loop shared by the PETR-family hosts, with tgGBC pruning between layers.

Every host runs the same loop: N post-norm layers over the same image keys; after layer l the
shared final LayerNorm and the layer's own classification / regression branches give that
layer's prediction. tgGBC needs those class logits inside the loop (they weight the key
importance), which is why a decoder here owns its branches instead of returning hidden states
to a separate head.

Imports nothing but torch and the core.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..pruner import KeyPruner
from .layers import PETRDecoderLayer, QueryPositionEmbedding, cls_branch, inverse_sigmoid, reg_branch
from .state import POINT_CLOUD_RANGE, TemporalState

__all__ = ["DecoderOutput", "PETRFamilyDecoder", "ATTENTION_MODES", "POINT_CLOUD_RANGE"]

ATTENTION_MODES = ("fast", "reference")


class DecoderOutput(NamedTuple):
    """What a host decoder returns.

    cls_scores: [L, B, Nq, C] class logits of every layer.
    bbox_preds: [L, B, Nq, code_size] boxes as the host head hands them to its loss / box coder:
        centre coordinates sigmoid-ed and mapped into pc_range (metres), the other entries raw.
    hidden_states: [L, B, Nq, E] every layer's output after the final LayerNorm.
    reference_points: [B, Nq, 3] normalised reference points all layers refine from.
    keys_per_layer: L ints, the image keys each layer's cross-attention saw.
    kept: with track_keys, L tensors [B, keys_per_layer[l]]: original indices of the keys layer l
        saw (layer 0: all of them); else None.
    state: StreamPETR's temporal state after this frame; None for the other hosts.
    """

    cls_scores: Tensor
    bbox_preds: Tensor
    hidden_states: Tensor
    reference_points: Tensor
    keys_per_layer: list[int]
    kept: list[Tensor] | None
    state: TemporalState | None = None


class PETRFamilyDecoder(nn.Module):
    """Query embedding, N decoder layers, final LayerNorm and per-layer branches.

    Subclasses set `center_index` (where x, y, z sit in the box code) and build the queries.

    Args:
        num_layers: decoder depth L.
        embed_dims: E.
        num_heads: attention heads.
        ffn_dims: FFN hidden width.
        dropout: dropout rate (training only).
        num_classes: C (sigmoid classification, no background class).
        code_size: box code length.
        num_queries: learnable reference points.
        pc_range: (x_min, y_min, z_min, x_max, y_max, z_max) the centres are decoded into.
        pruner: a KeyPruner (or None for the dense decoder); a plain attribute, swap it freely.
        attention: "fast" (fused attention; tgGBC reads only the rows it needs) or "reference"
            (explicit head-averaged weights in every cross-attention, the unfused path of the
            published code). Self-attention is fused in both; a plain attribute.
    """

    center_index: tuple[int, int, int] = (0, 1, 2)

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
        super().__init__()
        for name, value in (
            ("num_layers", num_layers),
            ("embed_dims", embed_dims),
            ("num_heads", num_heads),
            ("ffn_dims", ffn_dims),
            ("num_classes", num_classes),
            ("num_queries", num_queries),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dims % 4:
            raise ValueError(
                f"embed_dims must be a multiple of 4 (E/2 sine channels per axis, sin/cos pairs), got {embed_dims}"
            )
        if code_size < max(self.center_index) + 1:
            raise ValueError(f"code_size={code_size} is too small for centre entries at {self.center_index}")
        if len(pc_range) != 6:
            raise ValueError(f"pc_range must have 6 numbers (min xyz, max xyz), got {list(pc_range)}")
        _check_attention(attention)
        _check_pruner(pruner)
        self.embed_dims, self.num_classes = embed_dims, num_classes
        self.code_size, self.num_queries = code_size, num_queries
        self.reference_points = nn.Embedding(num_queries, 3)
        # E/2 sine channels per axis: 3 * E/2 MLP inputs (384 for E = 256, as in the hosts).
        self.query_embedding = QueryPositionEmbedding(embed_dims, embed_dims // 2)
        self.layers = nn.ModuleList(
            PETRDecoderLayer(embed_dims, num_heads, ffn_dims, dropout) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(embed_dims)
        # One branch per layer. (The published PETR head repeats one module object, so its
        # checkpoints hold six identical copies; they load here as six equal branches.)
        self.cls_branches = nn.ModuleList(cls_branch(embed_dims, num_classes) for _ in range(num_layers))
        self.reg_branches = nn.ModuleList(reg_branch(embed_dims, code_size) for _ in range(num_layers))
        self.register_buffer("pc_range", torch.tensor([float(v) for v in pc_range]), persistent=False)
        self.pruner = pruner
        self.attention = attention
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The hosts' initialisation: xavier layers, uniform reference points, 0.01 class prior."""
        for layer in self.layers:
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
        nn.init.uniform_(self.reference_points.weight, 0.0, 1.0)
        prior = -torch.log(torch.tensor((1 - 0.01) / 0.01)).item()
        for branch in self.cls_branches:
            nn.init.constant_(branch[-1].bias, prior)

    def extra_repr(self) -> str:
        return f"attention={self.attention!r}, pruner={self.pruner!r}"

    def _check_keys(self, memory: Tensor, key_pos: Tensor, key_padding_mask: Tensor | None) -> None:
        if memory.dim() != 3 or memory.shape[-1] != self.embed_dims:
            raise ValueError(f"memory must be [B, Nk, E={self.embed_dims}], got {tuple(memory.shape)}")
        if key_pos.shape != memory.shape:
            raise ValueError(f"key_pos must have memory's shape {tuple(memory.shape)}, got {tuple(key_pos.shape)}")
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != tuple(memory.shape[:2]):
                raise ValueError(
                    f"key_padding_mask must be bool [B, Nk] = {tuple(memory.shape[:2])}, got "
                    f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )

    def decode_boxes(self, reg: Tensor, reference: Tensor) -> Tensor:
        """Host box decoding: centre = sigmoid(reg_centre + inverse_sigmoid(ref)) mapped into pc_range.

        Args:
            reg: [..., Nq, code_size] regression branch output.
            reference: [..., Nq, 3] inverse_sigmoid of the reference points.
        Returns:
            [..., Nq, code_size] with the centre entries replaced, in metres.
        """
        index = list(self.center_index)
        low, high = self.pc_range[:3], self.pc_range[3:]
        center = (reg[..., index] + reference).sigmoid() * (high - low) + low
        boxes = reg.clone()  # the centres go in place: keep the branch output intact for autograd
        boxes[..., index] = center.to(boxes.dtype)
        return boxes

    def run_layers(
        self,
        query: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        key_pos: Tensor,
        key_padding_mask: Tensor | None = None,
        temp_memory: Tensor | None = None,
        temp_pos: Tensor | None = None,
        track_keys: bool = False,
        self_attn_mask: Tensor | None = None,
    ) -> DecoderOutput:
        """The decoder loop with tgGBC between layers (no temporal state: `state` is None).

        Args:
            query, query_pos: [B, Nq, E].
            reference_points: [B, Nq, 3] normalised.
            memory, key_pos: [B, Nk, E] image keys; memory is also the value.
            key_padding_mask: [B, Nk] bool or None.
            temp_memory, temp_pos: [B, M, E] extra self-attention keys (StreamPETR) or None.
            track_keys: also return the original indices of the keys each layer saw.
            self_attn_mask: [Nq, Nq + M] bool, True where a query must not attend (training's
                denoising groups), or None.
        """
        mode = _check_attention(self.attention)
        pruner = _check_pruner(self.pruner)
        batch, num_keys = memory.shape[:2]
        num_layers = len(self.layers)
        schedule = [0] * num_layers
        if pruner is not None:
            schedule = pruner.reset(num_keys, num_layers)
        reference = inverse_sigmoid(reference_points)  # (B, Nq, 3), the same for every layer
        origin = torch.arange(num_keys, device=memory.device).expand(batch, -1) if track_keys else None
        hidden, cls_scores, bbox_preds, keys_per_layer, kept = [], [], [], [], []
        for i, layer in enumerate(self.layers):
            keys_per_layer.append(memory.shape[1])
            if origin is not None:
                kept.append(origin)
            # "reference" is the published code: its nn.MultiheadAttention returns weights from
            # every cross-attention (need_weights defaults to True), so every layer runs unfused.
            # "fast" asks for the cheap rows handle only where a layer prunes.
            if mode == "reference":
                want = "weights"
            else:
                want = "rows" if schedule[i] else None
            query, attn = layer(
                query, query_pos, memory, key_pos, key_padding_mask, temp_memory, temp_pos, want, self_attn_mask
            )
            # The hosts apply nan_to_num to the normed outputs before their branches.
            out = torch.nan_to_num(self.final_norm(query))  # (B, Nq, E)
            cls_logits = self.cls_branches[i](out)  # (B, Nq, C)
            hidden.append(out)
            cls_scores.append(cls_logits)
            bbox_preds.append(self.decode_boxes(self.reg_branches[i](out), reference))
            if schedule[i]:
                pruned = pruner.step(
                    i, cls_logits, attn, key=memory, value=memory, key_pos=key_pos, key_padding_mask=key_padding_mask
                )
                memory, key_pos, key_padding_mask = pruned.key, pruned.key_pos, pruned.key_padding_mask
                if origin is not None:
                    if pruned.indices is None:
                        raise ValueError(f"track_keys: {pruner!r} merges keys, so no key keeps its identity")
                    origin = origin.gather(1, pruned.indices)
        return DecoderOutput(
            cls_scores=torch.stack(cls_scores),
            bbox_preds=torch.stack(bbox_preds),
            hidden_states=torch.stack(hidden),
            reference_points=reference_points,
            keys_per_layer=keys_per_layer,
            kept=kept if track_keys else None,
        )


def _check_attention(attention: object) -> str:
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {list(ATTENTION_MODES)}, got {attention!r}")
    return attention  # type: ignore[return-value]


def _check_pruner(pruner: object) -> KeyPruner | None:
    if pruner is None:
        return None
    if not (callable(getattr(pruner, "reset", None)) and callable(getattr(pruner, "step", None))):
        raise TypeError(f"pruner must be a KeyPruner (or None), got {type(pruner).__name__}")
    if not getattr(pruner, "batch_first", True):
        raise ValueError("the host decoders are batch-first: build the KeyPruner with batch_first=True")
    return pruner  # type: ignore[return-value]
