"""tgGBC inside PETR-family models built by the original mmcv 1.x code (PETR, PETRv2, StreamPETR,
FocalPETR), found by structure: mmcv is never imported.

What is recognised (L decoder layers, Nq queries, Nk image keys, B batch, E channels, C classes):

    head                               PETRHead, PETRv2Head, PETRHeadDN (FocalPETR), StreamPETRHead, ...
      .cls_branches[l]                 layer l's classifier: head applies it to nan_to_num(post_norm(out_l))
      .transformer.decoder             PETRTransformerDecoder
          .layers[l]                   PETRTransformerDecoderLayer / PETRTemporalDecoderLayer:
              .operation_order         ('self_attn', 'norm', 'cross_attn', 'norm', 'ffn', 'norm')
              .batch_first             False in every config: query [Nq, B, E], key [Nk, B, E]
              .attentions[i]           the 'cross_attn' entry: a wrapper with identity connection,
                                       query_pos / key_pos and `.attn`, one of
                                         nn.MultiheadAttention  (mmcv MultiheadAttention,
                                                                 PETRMultiheadAttention)
                                         FlashMHA               (PETRMultiheadFlashAttention)
          .post_norm                   the LayerNorm shared by every layer's output
          .return_intermediate         True: the decoder returns [L, Nq, B, E]

What a patch changes, and only while applied: two forwards, set on the instances (the classes, the
parameters, the buffers and the state dict stay as they are).

- The decoder's forward: the same loop over the same layers with the same arguments, plus, after a
  layer that prunes, that layer's class logits (the head's own branch on the decoder's own norm)
  and its cross-attention weights go to a `KeyPruner`, and later layers get the kept keys in key,
  value, key_pos and key_padding_mask. It returns what the original returns.
- Each cross-attention wrapper's forward: the wrapper's own preamble and identity connection
  around `tggbc.attention.multi_head_attention` on the inner module's own parameters (fused SDPA;
  the voters' rows on demand). With attention="reference" it runs unfused with explicit weights
  instead (for nn.MultiheadAttention the module's own call), as the published tgGBC code does.

Imports nothing but torch and the core.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..attention import multi_head_attention
from ..prune import prune_schedule
from ..pruner import KeyPruner

__all__ = ["ATTENTION_MODES", "DecoderPatch", "apply", "remove", "patches"]

ATTENTION_MODES = ("fast", "reference")

# Attribute that marks a patched module; its value is an _Installed record.
_MARK = "_tggbc_patch"


@dataclass(eq=False)
class DecoderPatch:
    """The state of one patched decoder (shared with its cross-attention wrappers).

    Settings (changed by calling `apply` again):
        pruner: the KeyPruner between layers, or None (fused attention only).
        attention: "fast" or "reference".
        track_keys: record in `kept` the original indices of the keys each layer saw.
    Found at apply time:
        head_path: where the head sits in the model passed to `apply` ("" for the model itself).
        kinds: per layer, "torch" (nn.MultiheadAttention inside) or "flash" (FlashMHA inside).
    After each forward:
        keys_per_layer: L ints, the image keys each layer's cross-attention saw.
        kept: with track_keys, L tensors [B, keys_per_layer[l]] of original key indices; else None.
    """

    pruner: KeyPruner | None
    attention: str
    track_keys: bool
    head_path: str
    kinds: list[str]
    keys_per_layer: list[int] = field(default_factory=list)
    kept: list[Tensor] | None = None
    # The head's classifiers and the decoder's layout, found at apply time.
    cls_branches: nn.ModuleList | None = field(default=None, repr=False)
    batch_first: bool = field(default=False, repr=False)
    layer_signature: inspect.Signature | None = field(default=None, repr=False)
    # What the decoder loop asks the next cross-attention to hand back ("rows", "weights" or None),
    # and what it handed back. Set and cleared around each layer call.
    request: str | None = field(default=None, repr=False)
    captured: object = field(default=None, repr=False)


class _Installed(NamedTuple):
    patch: DecoderPatch
    role: str  # "decoder" or "cross_attn"
    # The instance's own forward before the patch, or None (the class's). Not a sentinel object:
    # copy.deepcopy and pickle would turn that into a different object.
    prior_forward: object


class _Plan(NamedTuple):
    """What apply found in one head, checked before anything is changed."""

    head_name: str
    head: nn.Module
    decoder: nn.Module
    cross_attentions: list[nn.Module]
    kinds: list[str]
    batch_first: bool
    layer_signature: inspect.Signature


# ---- finding and checking -------------------------------------------------------------------------


def _describe(model: nn.Module) -> str:
    """A short account of what a model holds, for error messages."""
    children = [f"{n}: {type(m).__name__}" for n, m in model.named_children()][:8]
    near = [
        f"{n or '<model>'}: {type(m).__name__}"
        for n, m in model.named_modules()
        if hasattr(m, "transformer") or hasattr(m, "cls_branches")
    ][:4]
    parts = [f"children [{', '.join(children)}]" if children else "no child modules"]
    if near:
        parts.append(f"modules with `transformer` or `cls_branches`: [{', '.join(near)}]")
    return "; ".join(parts)


def _find_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    heads = []
    for name, module in model.named_modules():
        decoder = getattr(getattr(module, "transformer", None), "decoder", None)
        if isinstance(getattr(module, "cls_branches", None), nn.ModuleList) and isinstance(decoder, nn.Module):
            heads.append((name, module))
    return heads


def _inner_kind(where: str, wrapper: nn.Module) -> str:
    """The kind of attention inside a cross-attention wrapper: "torch" (nn.MultiheadAttention) or
    "flash" (FlashMHA). Raises ValueError, saying what was found, for anything else."""
    missing = [a for a in ("attn", "batch_first", "proj_drop", "dropout_layer") if not hasattr(wrapper, a)]
    if missing:
        raise ValueError(
            f"{where}: cross-attention {type(wrapper).__name__} lacks {missing}: expected an mmcv-style wrapper "
            "(MultiheadAttention, PETRMultiheadAttention, PETRMultiheadFlashAttention) with attn, batch_first, "
            "proj_drop and dropout_layer"
        )
    inner = wrapper.attn
    if isinstance(inner, nn.MultiheadAttention):
        if not inner._qkv_same_embed_dim or inner.bias_k is not None or inner.add_zero_attn:
            raise ValueError(
                f"{where}: {type(wrapper).__name__}.attn is an nn.MultiheadAttention with separate q/k/v "
                "projections, bias_k/bias_v or add_zero_attn: expected the packed in_proj_weight of the hosts"
            )
        return "torch"
    weight = getattr(inner, "in_proj_weight", None)
    if (
        isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.shape[0] == 3 * weight.shape[1]
        and isinstance(getattr(inner, "out_proj", None), nn.Linear)
        and isinstance(getattr(inner, "num_heads", None), int)
        and hasattr(inner, "inner_attn")
    ):
        if getattr(inner, "causal", False):
            raise ValueError(f"{where}: {type(inner).__name__} is causal; a detector's cross-attention is not")
        return "flash"
    found = [n for n in ("in_proj_weight", "in_proj_bias", "out_proj", "num_heads", "inner_attn") if hasattr(inner, n)]
    raise ValueError(
        f"{where}: {type(wrapper).__name__}.attn is {type(inner).__name__} with {found or 'none'} of "
        "(in_proj_weight, in_proj_bias, out_proj, num_heads, inner_attn): expected nn.MultiheadAttention "
        "(mmcv MultiheadAttention, PETRMultiheadAttention) or FlashMHA with a packed [3E, E] in_proj_weight "
        "(PETRMultiheadFlashAttention)"
    )


def _plan(head_name: str, head: nn.Module) -> _Plan:
    """Check one head's decoder against the recognised structure; raise saying what differs."""
    where = head_name or type(head).__name__
    decoder = head.transformer.decoder
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{where}.transformer.decoder is {type(decoder).__name__} with layers={type(layers).__name__}: "
            "expected a non-empty nn.ModuleList of decoder layers (PETRTransformerDecoder)"
        )
    if getattr(decoder, "return_intermediate", None) is not True:
        raise ValueError(
            f"{where}.transformer.decoder has return_intermediate={getattr(decoder, 'return_intermediate', None)!r}: "
            "expected True (every layer's output goes to the head's branches, as in all published configs)"
        )
    if not hasattr(decoder, "post_norm"):
        raise ValueError(
            f"{where}.transformer.decoder ({type(decoder).__name__}) has no post_norm: expected the LayerNorm "
            "(or None) it applies to every layer's output"
        )
    if len(head.cls_branches) < len(layers):
        raise ValueError(
            f"{where} has {len(head.cls_branches)} cls_branches for {len(layers)} decoder layers: "
            "expected one per layer"
        )
    cross_attentions, kinds, layouts, signature = [], [], set(), None
    for i, layer in enumerate(layers):
        at = f"{where}.transformer.decoder.layers[{i}] ({type(layer).__name__})"
        order = getattr(layer, "operation_order", None)
        attentions = getattr(layer, "attentions", None)
        if not isinstance(order, (tuple, list)) or not isinstance(attentions, nn.ModuleList):
            raise ValueError(
                f"{at}: expected an mmcv transformer layer with operation_order and attentions, found "
                f"operation_order={order!r}, attentions={type(attentions).__name__}"
            )
        if list(order).count("cross_attn") != 1:
            raise ValueError(f"{at}: expected exactly one 'cross_attn' in operation_order, found {tuple(order)}")
        index = sum(op in ("self_attn", "cross_attn") for op in order[: list(order).index("cross_attn")])
        if index >= len(attentions):
            raise ValueError(
                f"{at}: operation_order {tuple(order)} names more attentions than the {len(attentions)} held"
            )
        if not isinstance(getattr(layer, "batch_first", None), bool):
            raise ValueError(f"{at}: expected a bool batch_first (the layout of query and key), found none")
        layouts.add(layer.batch_first)
        wrapper = attentions[index]
        kinds.append(_inner_kind(f"{at}.attentions[{index}]", wrapper))
        cross_attentions.append(wrapper)
        params = inspect.signature(layer.forward).parameters
        missing = [p for p in ("query", "key", "value", "key_pos", "key_padding_mask") if p not in params]
        if missing:
            raise ValueError(
                f"{at}: forward{inspect.signature(layer.forward)} lacks {missing}: expected "
                "forward(query, key, value, query_pos, key_pos, ..., key_padding_mask, ...)"
            )
        if signature is None:
            signature = inspect.signature(layer.forward)
        elif inspect.signature(layer.forward) != signature:
            raise ValueError(f"{at}: its forward differs from layer 0's; expected one layer type throughout")
    if len(layouts) != 1:
        raise ValueError(f"{where}: the decoder layers disagree on batch_first; expected one layout")
    for i, wrapper in enumerate(cross_attentions):
        if sum(w is wrapper for w in cross_attentions) > 1:
            raise ValueError(f"{where}: layer {i} shares its cross-attention module with another layer")
    return _Plan(head_name, head, decoder, cross_attentions, kinds, layouts.pop(), signature)


# ---- the two forwards ----------------------------------------------------------------------------


def _decoder_forward(decoder: nn.Module, patch: DecoderPatch, query: Tensor, *args, **kwargs) -> Tensor:
    """The decoder's loop (PETRTransformerDecoder.forward with return_intermediate) with tgGBC.

    Args: as the decoder's: query [Nq, B, E] and then what its layers take (key, value [Nk, B, E],
        query_pos, key_pos, temp_memory, temp_pos, attn_masks, key_padding_mask [B, Nk], ...).
    Returns:
        [L, Nq, B, E]: post_norm of every layer's output, as the original.
    """
    try:
        bound = patch.layer_signature.bind(query, *args, **kwargs)
    except TypeError as e:
        raise TypeError(f"tggbc.patch: the decoder was called with arguments its layers do not take ({e})") from None
    arguments = bound.arguments
    key, value = arguments.get("key"), arguments.get("value")
    key_pos, key_padding_mask = arguments.get("key_pos"), arguments.get("key_padding_mask")
    layers, pruner, norm = decoder.layers, patch.pruner, decoder.post_norm
    num_layers, key_dim = len(layers), 1 if patch.batch_first else 0
    schedule = [0] * num_layers
    if pruner is not None:
        if key is None:
            raise ValueError("tggbc.patch: the decoder got no `key` to prune")
        schedule = pruner.reset(key.shape[key_dim], num_layers)
    origin = None
    if patch.track_keys and key is not None:
        batch, num_keys = key.shape[1 - key_dim], key.shape[key_dim]
        origin = torch.arange(num_keys, device=key.device).expand(batch, -1)
    intermediate, keys_per_layer, kept = [], [], []
    for i, layer in enumerate(layers):
        keys_per_layer.append(key.shape[key_dim] if key is not None else 0)
        if origin is not None:
            kept.append(origin)
        # Only a layer that prunes asks its cross-attention for more than the output.
        patch.request = None if not schedule[i] else ("rows" if patch.attention == "fast" else "weights")
        patch.captured = None
        try:
            query = layer(*bound.args, **bound.kwargs)
            attn = patch.captured
        finally:
            patch.request, patch.captured = None, None
        out = norm(query) if norm is not None else query
        intermediate.append(out)
        if schedule[i]:
            if attn is None:
                raise RuntimeError(
                    f"tggbc.patch: layer {i}'s cross-attention did not run through the patch "
                    "(was it replaced after apply? apply again)"
                )
            # The head's own prediction of layer i: its branch on the normed output, after the
            # nan_to_num the heads apply to the decoder's output. (Nq, B, C) in the hosts' layout.
            cls_logits = patch.cls_branches[i](torch.nan_to_num(out))
            pruned = pruner.step(
                i, cls_logits, attn, key=key, value=value, key_pos=key_pos, key_padding_mask=key_padding_mask
            )
            key, value, key_pos, key_padding_mask = pruned.key, pruned.value, pruned.key_pos, pruned.key_padding_mask
            for name, t in (
                ("key", key),
                ("value", value),
                ("key_pos", key_pos),
                ("key_padding_mask", key_padding_mask),
            ):
                if name in arguments:
                    arguments[name] = t
            if origin is not None:
                if pruned.indices is None:
                    raise ValueError(f"track_keys: {pruner!r} merges keys, so no key keeps its identity")
                origin = origin.gather(1, pruned.indices)
        arguments["query"] = query
    patch.keys_per_layer, patch.kept = keys_per_layer, (kept if origin is not None else None)
    return torch.stack(intermediate)


def _cross_attention_forward(
    wrapper: nn.Module,
    patch: DecoderPatch,
    kind: str,
    query: Tensor,
    key: Tensor | None = None,
    value: Tensor | None = None,
    identity: Tensor | None = None,
    query_pos: Tensor | None = None,
    key_pos: Tensor | None = None,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """The wrapper's forward (mmcv MultiheadAttention's contract) on tggbc's attention.

    Args: as the wrapper's: query [Nq, B, E] (or [B, Nq, E] if its layout is batch-first), key and
        value [Nk, B, E], identity, query_pos, key_pos, attn_mask [Nq, Nk], key_padding_mask [B, Nk].
    Returns:
        identity + dropout(attention output), shaped like query.
    """
    if "residual" in kwargs:  # the originals' @deprecated_api_warning({'residual': 'identity'})
        identity = kwargs.pop("residual")
    if key is None:
        key = query
    if value is None:
        value = key
    if identity is None:
        identity = query
    if key_pos is None and query_pos is not None:
        if query_pos.shape == key.shape:
            key_pos = query_pos
        else:
            warnings.warn(f"position encoding of key is missing in {type(wrapper).__name__}.", stacklevel=2)
    if query_pos is not None:
        query = query + query_pos
    if key_pos is not None:
        key = key + key_pos
    # The wrapper's batch_first means "transpose around the inner module" (mmcv's convention).
    if wrapper.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    inner = wrapper.attn
    if kind == "flash":
        # PETRMultiheadFlashAttention hands FlashMHA neither mask, and FlashMHA is batch-first.
        attn_mask = key_padding_mask = None
        inner_batch_first, dropout = True, getattr(inner.inner_attn, "dropout_p", 0.0)
    else:
        inner_batch_first, dropout = inner.batch_first, inner.dropout
    dropout = dropout if inner.training else 0.0
    request = patch.request
    if patch.attention == "reference":
        if kind == "torch":  # the wrapper's own call: explicit head-averaged weights
            out, captured = inner(
                query=query, key=key, value=value, attn_mask=attn_mask, key_padding_mask=key_padding_mask
            )
        else:
            out, captured = _on_parameters(
                inner, query, key, value, None, None, dropout, inner_batch_first, need_weights=True
            )
    else:
        out, captured = _on_parameters(
            inner,
            query,
            key,
            value,
            attn_mask,
            key_padding_mask,
            dropout,
            inner_batch_first,
            return_rows=request == "rows",
        )
    if request is not None:
        patch.captured = captured
    if wrapper.batch_first:
        out = out.transpose(0, 1)
    return identity + wrapper.dropout_layer(wrapper.proj_drop(out))


def _on_parameters(inner, query, key, value, attn_mask, key_padding_mask, dropout, batch_first, **kwargs):
    """multi_head_attention on the inner module's own parameters, read at call time (so .to(),
    .half() and load_state_dict after apply are followed)."""
    return multi_head_attention(
        query,
        key,
        value,
        inner.num_heads,
        inner.in_proj_weight,
        inner.in_proj_bias,
        inner.out_proj.weight,
        inner.out_proj.bias,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        dropout_p=dropout,
        batch_first=batch_first,
        **kwargs,
    )


# ---- apply / remove ------------------------------------------------------------------------------


def _install(module: nn.Module, role: str, forward, patch: DecoderPatch) -> None:
    # An instance attribute shadows the class's forward for this module only; `remove` deletes it.
    prior = module.__dict__.get("forward")
    module.forward = forward
    setattr(module, _MARK, _Installed(patch, role, prior))


def _uninstall(module: nn.Module) -> None:
    installed = module.__dict__.pop(_MARK)
    if installed.prior_forward is None:
        del module.forward
    else:
        module.forward = installed.prior_forward


def _pruner(r, n, k, attention, method, seed, track_keys, plan: _Plan) -> KeyPruner | None:
    """The KeyPruner of these settings, None when nothing is dropped; raises on a bad setting."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {list(ATTENTION_MODES)}, got {attention!r}")
    if not isinstance(track_keys, bool):
        raise TypeError(f"track_keys must be a bool, got {track_keys!r}")
    if method == "merge" and not plan.batch_first:
        raise ValueError("method='merge' needs batch-first decoder layers; the PETR-family layers are sequence-first")
    pruner = KeyPruner(r=r, n=n, k=k, method=method, seed=seed, batch_first=plan.batch_first)  # validates r, n, k
    # The schedule against this decoder's depth (a fraction needs the key count: checked per forward).
    num_layers = len(plan.decoder.layers)
    prune_schedule(r, n, num_layers, num_keys=None if not isinstance(r, float) else 1 << 30)
    drops = any(r) if isinstance(r, (list, tuple)) else r != 0
    return pruner if drops else None


def apply(
    model: nn.Module,
    r: int | float | Sequence[int] = 0,
    n: int = 1,
    k: int = -1,
    attention: str = "fast",
    *,
    method: str = "tggbc",
    seed: int = 0,
    track_keys: bool = False,
) -> nn.Module:
    """Patch every PETR-family head in `model` (a detector, a head, or a wrapper around one).

    Applying again changes the settings of the existing patch (nothing stacks); `remove` undoes it.

    Args:
        model: e.g. the Petr3D detector of the StreamPETR or PETR repository (or its
            pts_bbox_head), as `tools/test.py` builds it; MMDataParallel around it is fine.
        r, n, k: tgGBC's budget: r keys dropped in all (an int; a fraction in (0, 1) of the keys; or
            one int per layer), spread over the first n layers, k most confident queries voting
            (k <= 0: all). r=0: no pruning, only the fused cross-attention. See `KeyPruner`.
        attention: "fast" (fused SDPA; tgGBC reads only the rows of the k voters) or "reference"
            (explicit head-averaged weights in every cross-attention, the published code's path).
        method: "tggbc" or a control at the same kept count ("random", "inverse", "attention").
        seed: of the random control.
        track_keys: record the kept key indices of each forward (see `patches`).
    Returns:
        model, patched in place.
    Raises:
        TypeError if no PETR-family head is found; ValueError if one is found but its decoder is
        not the recognised structure. Both say what was expected and what was found; the model
        is left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tggbc.patch.apply needs a torch.nn.Module, got {type(model).__name__}")
    heads = _find_heads(model)
    if not heads:
        raise TypeError(
            f"tggbc.patch.apply: no PETR-family head in {type(model).__name__}: expected a module with "
            "cls_branches (nn.ModuleList) and transformer.decoder (StreamPETRHead, PETRHead, PETRHeadDN, or a "
            f"detector holding one as pts_bbox_head); found {_describe(model)}"
        )
    plans = [_plan(name, head) for name, head in heads]  # every check passes before anything changes
    pruners = [_pruner(r, n, k, attention, method, seed, track_keys, p) for p in plans]
    for plan, pruner in zip(plans, pruners, strict=True):
        installed = plan.decoder.__dict__.get(_MARK)
        if installed is not None:  # already patched: new settings, the same forwards
            patch = installed.patch
            patch.pruner, patch.attention, patch.track_keys = pruner, attention, track_keys
            patch.kinds, patch.cls_branches = plan.kinds, plan.head.cls_branches
            patch.batch_first, patch.layer_signature = plan.batch_first, plan.layer_signature
            patch.keys_per_layer, patch.kept = [], None
        else:
            patch = DecoderPatch(
                pruner=pruner,
                attention=attention,
                track_keys=track_keys,
                head_path=plan.head_name,
                kinds=plan.kinds,
                cls_branches=plan.head.cls_branches,
                batch_first=plan.batch_first,
                layer_signature=plan.layer_signature,
            )
            _install(plan.decoder, "decoder", partial(_decoder_forward, plan.decoder, patch), patch)
        for wrapper, kind in zip(plan.cross_attentions, plan.kinds, strict=True):
            if _MARK not in wrapper.__dict__:  # (a wrapper swapped in since the last apply gets patched too)
                _install(wrapper, "cross_attn", partial(_cross_attention_forward, wrapper, patch, kind), patch)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply` on every module of `model` it patched; a model without a patch is returned as is.

    Returns:
        model, with its original forwards back (its parameters were never touched).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tggbc.patch.remove needs a torch.nn.Module, got {type(model).__name__}")
    for module in list(model.modules()):
        if _MARK in module.__dict__:
            _uninstall(module)
    return model


def patches(model: nn.Module) -> list[DecoderPatch]:
    """The patches applied in `model`, one per decoder (settings, keys_per_layer, kept)."""
    installed = [m.__dict__.get(_MARK) for m in model.modules()]
    return [i.patch for i in installed if i is not None and i.role == "decoder"]
