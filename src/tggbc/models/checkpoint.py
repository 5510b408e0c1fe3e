"""Load the decoder and head of published PETR / StreamPETR / FocalPETR checkpoints, and back.

The published checkpoints are mmdet3d state dicts (often wrapped as {"state_dict": ...}); the
head lives under `pts_bbox_head.`. These functions rename its decoder + head parameters onto
`PETRDecoder` / `StreamPETRDecoder` / `FocalPETRDecoder` and its key-side parameters onto
`PETRPositionEmbedding` / `StreamPETRPositionEmbedding`. Everything else (backbone, neck, the 2D
auxiliary head, the head's constant tensors) is returned in `unused`, never dropped silently.

Decoder names (head prefix `pts_bbox_head.` left out; i = layer, j = index in a Sequential):

    original                                                  ours
    transformer.decoder.layers.i.attentions.0.attn.*         layers.i.self_attn.*
    transformer.decoder.layers.i.attentions.1.attn.*         layers.i.cross_attn.*
        (* = in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias)
    transformer.decoder.layers.i.norms.{0,1,2}.*              layers.i.norm{1,2,3}.*
    transformer.decoder.layers.i.ffns.0.layers.0.0.*          layers.i.linear1.*
    transformer.decoder.layers.i.ffns.0.layers.1.*            layers.i.linear2.*
    transformer.decoder.post_norm.*                           final_norm.*
    cls_branches.i.j.*, reg_branches.i.j.*                    (same)
    reference_points.weight                                   (same)
    query_embedding.j.*                                       query_embedding.mlp.j.*
  StreamPETR only:
    pseudo_reference_points.weight, time_embedding.j.*        (same)
    ego_pose_pe.{reduce.0,gamma,beta}.*                       (same)
    ego_pose_memory.{reduce.0,gamma,beta}.*                   (same)

Key-side names:

    PETR: input_proj.*, position_encoder.j.*, adapt_pos3d.j.*                       (same)
    StreamPETR / FocalPETR: position_encoder.j.*, memory_embed.j.*,
        spatial_alignment.{reduce.0,gamma,beta}.*                                     (same)
        featurized_pe.conv_reduce.*                           featurized_pe.reduce.*
        featurized_pe.conv_expand.*                           featurized_pe.expand.*

Older checkpoints name the attentions `self_attn` / `multihead_attn` and the final norm
`decoder.norm`; they are renamed first, as PETRHead._load_from_state_dict does. The head's
constants (code_weights, match_costs, pc_range, position_range, coords_d) go to `unused`: here
they are constructor arguments. PETR's head repeats one branch module for all layers, so its
checkpoints hold identical copies per layer; they load as equal per-layer branches.

Imports nothing but torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "ConvertedStateDict",
    "convert_petr_state_dict",
    "convert_streampetr_state_dict",
    "to_petr_state_dict",
    "to_streampetr_state_dict",
    "load_original_state_dict",
]

HEAD_PREFIX = "pts_bbox_head."


class ConvertedStateDict(NamedTuple):
    """decoder: for the decoder's load_state_dict; position: for the key-side module's;
    unused: every other entry of the original, under its original name."""

    decoder: dict[str, Tensor]
    position: dict[str, Tensor]
    unused: dict[str, Tensor]


# (original, ours) name templates; "#" stands for an integer index, "*" for a parameter suffix.
_ATTN = r"(?:in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
_PARAM = r"(?:weight|bias)"
_DECODER_RULES = [
    ("transformer.decoder.layers.#.attentions.0.attn.*", "layers.#.self_attn.*", _ATTN),
    ("transformer.decoder.layers.#.attentions.1.attn.*", "layers.#.cross_attn.*", _ATTN),
    ("transformer.decoder.layers.#.norms.0.*", "layers.#.norm1.*", _PARAM),
    ("transformer.decoder.layers.#.norms.1.*", "layers.#.norm2.*", _PARAM),
    ("transformer.decoder.layers.#.norms.2.*", "layers.#.norm3.*", _PARAM),
    ("transformer.decoder.layers.#.ffns.0.layers.0.0.*", "layers.#.linear1.*", _PARAM),
    ("transformer.decoder.layers.#.ffns.0.layers.1.*", "layers.#.linear2.*", _PARAM),
    ("transformer.decoder.post_norm.*", "final_norm.*", _PARAM),
    ("cls_branches.#.#.*", "cls_branches.#.#.*", _PARAM),
    ("reg_branches.#.#.*", "reg_branches.#.#.*", _PARAM),
    ("reference_points.*", "reference_points.*", r"weight"),
    ("query_embedding.#.*", "query_embedding.mlp.#.*", _PARAM),
]
_MLN = r"(?:reduce\.0|gamma|beta)\.(?:weight|bias)"
_STREAM_DECODER_RULES = _DECODER_RULES + [
    ("pseudo_reference_points.*", "pseudo_reference_points.*", r"weight"),
    ("time_embedding.#.*", "time_embedding.#.*", _PARAM),
    ("ego_pose_pe.*", "ego_pose_pe.*", _MLN),
    ("ego_pose_memory.*", "ego_pose_memory.*", _MLN),
]
_PETR_POSITION_RULES = [
    ("input_proj.*", "input_proj.*", _PARAM),
    ("position_encoder.#.*", "position_encoder.#.*", _PARAM),
    ("adapt_pos3d.#.*", "adapt_pos3d.#.*", _PARAM),
]
_STREAM_POSITION_RULES = [
    ("position_encoder.#.*", "position_encoder.#.*", _PARAM),
    ("memory_embed.#.*", "memory_embed.#.*", _PARAM),
    ("spatial_alignment.*", "spatial_alignment.*", _MLN),
    ("featurized_pe.conv_reduce.*", "featurized_pe.reduce.*", _PARAM),
    ("featurized_pe.conv_expand.*", "featurized_pe.expand.*", _PARAM),
]
# Names of older PETR checkpoints (PETRHead._load_from_state_dict renames them the same way).
_LEGACY = [
    (".self_attn.", ".attentions.0."),
    (".multihead_attn.", ".attentions.1."),
    (".decoder.norm.", ".decoder.post_norm."),
]


class _Rule:
    """One bidirectional renaming, compiled from a template pair."""

    def __init__(self, original: str, ours: str, suffix: str):
        self.templates = {"original": original, "ours": ours}
        self.patterns = {side: self._compile(t, suffix) for side, t in self.templates.items()}

    @staticmethod
    def _compile(template: str, suffix: str) -> re.Pattern[str]:
        body = re.escape(template).replace("\\#", r"(\d+)").replace(r"\*", f"({suffix})")
        return re.compile(f"^{body}$")

    def rename(self, name: str, source: str, target: str) -> str | None:
        m = self.patterns[source].match(name)
        if m is None:
            return None
        groups = iter(m.groups())
        out = []
        for ch in self.templates[target]:
            out.append(next(groups) if ch in "#*" else ch)
        return "".join(out)


def _compile(rules: list[tuple[str, str, str]]) -> list[_Rule]:
    return [_Rule(*r) for r in rules]


_COMPILED = {
    "petr": (_compile(_DECODER_RULES), _compile(_PETR_POSITION_RULES)),
    "streampetr": (_compile(_STREAM_DECODER_RULES), _compile(_STREAM_POSITION_RULES)),
}


def _rename(name: str, rules: list[_Rule], source: str, target: str) -> str | None:
    for rule in rules:
        new = rule.rename(name, source, target)
        if new is not None:
            return new
    return None


def _unwrap(state_dict: Mapping[str, object]) -> Mapping[str, Tensor]:
    inner = state_dict.get("state_dict") if isinstance(state_dict, Mapping) else None
    return inner if isinstance(inner, Mapping) else state_dict  # type: ignore[return-value]


def _convert(state_dict: Mapping[str, Tensor], kind: str, prefix: str, legacy: bool) -> ConvertedStateDict:
    decoder_rules, position_rules = _COMPILED[kind]
    decoder, position, unused = {}, {}, {}
    for original_name, value in _unwrap(state_dict).items():
        if not original_name.startswith(prefix):
            unused[original_name] = value
            continue
        name = original_name[len(prefix) :]
        if legacy:
            for old, new in _LEGACY:
                name = name.replace(old, new)
        ours = _rename(name, decoder_rules, "original", "ours")
        if ours is not None:
            decoder[ours] = value
            continue
        ours = _rename(name, position_rules, "original", "ours")
        if ours is not None:
            position[ours] = value
            continue
        unused[original_name] = value
    return ConvertedStateDict(decoder, position, unused)


def _to_original(
    decoder: Mapping[str, Tensor], position: Mapping[str, Tensor] | None, kind: str, prefix: str
) -> dict[str, Tensor]:
    decoder_rules, position_rules = _COMPILED[kind]
    out: dict[str, Tensor] = {}
    for part, rules, what in ((decoder, decoder_rules, "decoder"), (position or {}, position_rules, "position")):
        for name, value in part.items():
            original = _rename(name, rules, "ours", "original")
            if original is None:
                raise KeyError(f"{what} parameter {name!r} has no counterpart in the original {kind} checkpoint")
            out[prefix + original] = value
    return out


def convert_petr_state_dict(
    state_dict: Mapping[str, Tensor], prefix: str = HEAD_PREFIX, legacy: bool = True
) -> ConvertedStateDict:
    """Rename a PETR checkpoint for `PETRDecoder` and `PETRPositionEmbedding`.

    Args:
        state_dict: the checkpoint's state dict, or the checkpoint itself ({"state_dict": ...}).
        prefix: where the head sits in it ("" for a bare head state dict).
        legacy: also accept the older attention / norm names.
    Returns:
        ConvertedStateDict(decoder, position, unused); the tensors are the originals, not copies.
    """
    return _convert(state_dict, "petr", prefix, legacy)


def convert_streampetr_state_dict(
    state_dict: Mapping[str, Tensor], prefix: str = HEAD_PREFIX, legacy: bool = True
) -> ConvertedStateDict:
    """Rename a StreamPETR (or FocalPETR) checkpoint for `StreamPETRDecoder` (`FocalPETRDecoder`)
    and `StreamPETRPositionEmbedding`. FocalPETR checkpoints simply lack the temporal entries.

    Args / Returns: as `convert_petr_state_dict`.
    """
    return _convert(state_dict, "streampetr", prefix, legacy)


def to_petr_state_dict(
    decoder: Mapping[str, Tensor], position: Mapping[str, Tensor] | None = None, prefix: str = HEAD_PREFIX
) -> dict[str, Tensor]:
    """The inverse of `convert_petr_state_dict`: our state dicts under the original names.

    Raises KeyError for a name the original head does not have.
    """
    return _to_original(decoder, position, "petr", prefix)


def to_streampetr_state_dict(
    decoder: Mapping[str, Tensor], position: Mapping[str, Tensor] | None = None, prefix: str = HEAD_PREFIX
) -> dict[str, Tensor]:
    """The inverse of `convert_streampetr_state_dict`."""
    return _to_original(decoder, position, "streampetr", prefix)


def load_original_state_dict(
    decoder: nn.Module,
    state_dict: Mapping[str, Tensor],
    position: nn.Module | None = None,
    strict: bool = True,
    prefix: str = HEAD_PREFIX,
) -> ConvertedStateDict:
    """Convert an original checkpoint for `decoder` (and `position`) and load it.

    The converter is picked from the decoder's type: PETRDecoder -> PETR names, StreamPETRDecoder
    and FocalPETRDecoder -> StreamPETR names.

    Returns:
        the ConvertedStateDict, so callers can inspect `unused`.
    """
    from .focalpetr import FocalPETRDecoder
    from .petr import PETRDecoder
    from .streampetr import StreamPETRDecoder

    if isinstance(decoder, (StreamPETRDecoder, FocalPETRDecoder)):
        converted = convert_streampetr_state_dict(state_dict, prefix)
    elif isinstance(decoder, PETRDecoder):
        converted = convert_petr_state_dict(state_dict, prefix)
    else:
        raise TypeError(f"no checkpoint mapping for {type(decoder).__name__}")
    with torch.no_grad():
        decoder.load_state_dict(converted.decoder, strict=strict)
        if position is not None:
            position.load_state_dict(converted.position, strict=strict)
    return converted
