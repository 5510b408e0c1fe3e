"""Stand-ins for the classes the original PETR-family repositories build their heads from.

mmcv 1.x and mmdet3d cannot be installed here, so these are written from reading the original code
(mmcv 1.7 `cnn/bricks/transformer.py`; megvii-research/PETR `models/utils/petr_transformer.py` and
`dense_heads/petr_head.py`; exiawsh/StreamPETR `models/utils/petr_transformer.py`, `attention.py`,
`misc.py`, `positional_encoding.py`, `dense_heads/streampetr_head.py`, `petr_head_dn.py`,
`detectors/petr3d.py`). Class names, attribute names, forward signatures, tensor layouts
(sequence-first in the decoder) and operation order are the originals'; so are their quirks
(PETRMultiheadFlashAttention forces batch_first=True and drops both masks; FlashMHA receives the
attention dropout as its `bias` argument; the heads repeat one branch module for every layer).

Deviations, all outside what `tggbc.patch` touches:
- no registry or ConfigDict: `build_from_cfg` maps the config type names used below to classes;
  the mutable default dicts of the originals are copied instead of mutated.
- FlashAttention computes softmax attention in plain torch; the original calls flash-attn's fp16
  CUDA kernel (and asserts CUDA + fp16).
- the heads' forwards keep only the decoding part: the key side (image features -> memory,
  pos_embed; position embedding, memory_embed, spatial alignment) is their input.
- the sine encodings take num_pos_feats from embed_dims so tiny models work (the originals
  hard-code 128 / 256, i.e. embed_dims = 256); num_pred follows num_layers (the originals fix 6).
- Petr3D and FocalHead are attribute containers (where the heads sit), not detectors.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

import torch
from torch import nn
from torch.nn.functional import linear

# ---- mmcv bricks --------------------------------------------------------------------------------


class BaseModule(nn.Module):
    def __init__(self, init_cfg=None):
        super().__init__()
        self._is_init = False
        self.init_cfg = copy.deepcopy(init_cfg)


def deprecated_api_warning(name_dict, cls_name=None):
    """mmcv.utils.deprecated_api_warning: rename deprecated keyword arguments."""

    def decorator(old_func):
        @functools.wraps(old_func)
        def new_func(*args, **kwargs):
            for src, dst in name_dict.items():
                if src in kwargs:
                    kwargs[dst] = kwargs.pop(src)
            return old_func(*args, **kwargs)

        return new_func

    return decorator


def build_dropout(cfg):
    """mmcv's Dropout(drop_prob) is an nn.Dropout."""
    return nn.Dropout(cfg["drop_prob"])


def build_norm_layer(cfg, num_features):
    assert cfg["type"] == "LN"
    return "ln", nn.LayerNorm(num_features)


def build_from_cfg(cfg, registry):
    cfg = dict(cfg)
    return registry[cfg.pop("type")](**cfg)


class MultiheadAttention(BaseModule):
    """mmcv.cnn.bricks.transformer.MultiheadAttention."""

    def __init__(
        self,
        embed_dims,
        num_heads,
        attn_drop=0.0,
        proj_drop=0.0,
        dropout_layer=None,
        init_cfg=None,
        batch_first=False,
        **kwargs,
    ):
        super().__init__(init_cfg)
        dropout_layer = dict(type="Dropout", drop_prob=0.0) if dropout_layer is None else dict(dropout_layer)
        if "dropout" in kwargs:
            attn_drop = kwargs["dropout"]
            dropout_layer["drop_prob"] = kwargs.pop("dropout")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.attn = self._inner(embed_dims, num_heads, attn_drop, kwargs)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dropout_layer = build_dropout(dropout_layer) if dropout_layer else nn.Identity()

    def _inner(self, embed_dims, num_heads, attn_drop, kwargs):
        return nn.MultiheadAttention(embed_dims, num_heads, attn_drop, **kwargs)

    @deprecated_api_warning({"residual": "identity"}, cls_name="MultiheadAttention")
    def forward(
        self,
        query,
        key=None,
        value=None,
        identity=None,
        query_pos=None,
        key_pos=None,
        attn_mask=None,
        key_padding_mask=None,
        **kwargs,
    ):
        if key is None:
            key = query
        if value is None:
            value = key
        if identity is None:
            identity = query
        if key_pos is None:
            if query_pos is not None:
                if query_pos.shape == key.shape:
                    key_pos = query_pos
                else:
                    warnings.warn(f"position encoding of key ismissing in {self.__class__.__name__}.", stacklevel=2)
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        if self.batch_first:
            query = query.transpose(0, 1)
            key = key.transpose(0, 1)
            value = value.transpose(0, 1)
        out = self.attn(query=query, key=key, value=value, attn_mask=attn_mask, key_padding_mask=key_padding_mask)[0]
        if self.batch_first:
            out = out.transpose(0, 1)
        return identity + self.dropout_layer(self.proj_drop(out))


class MultiheadAttentionWrapper(nn.MultiheadAttention):
    """StreamPETR's nn.MultiheadAttention with an fp16 training path (fp32 in eval)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fp16_enabled = True

    def forward_fp32(self, *args, **kwargs):
        return super().forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.forward_fp32(*args, **kwargs)


class PETRMultiheadAttention(MultiheadAttention):
    """PETRMultiheadAttention of both repositories: mmcv's wrapper, .contiguous() after the
    transposes, and (StreamPETR) an fp16 option that swaps in MultiheadAttentionWrapper."""

    def __init__(self, embed_dims, num_heads, attn_drop=0.0, proj_drop=0.0, dropout_layer=None, init_cfg=None,
                 batch_first=False, fp16=False, **kwargs):  # fmt: skip
        self._fp16 = fp16
        super().__init__(embed_dims, num_heads, attn_drop, proj_drop, dropout_layer, init_cfg, batch_first, **kwargs)
        self.fp16_enabled = True

    def _inner(self, embed_dims, num_heads, attn_drop, kwargs):
        cls = MultiheadAttentionWrapper if self._fp16 else nn.MultiheadAttention
        return cls(embed_dims, num_heads, attn_drop, **kwargs)


class FlashAttention(nn.Module):
    """StreamPETR's FlashAttention: q [B, T, H, D], kv [B, S, 2, H, D] -> ([B, T, H, D], None).
    Plain-torch softmax attention here; the original calls flash-attn (fp16, CUDA only)."""

    def __init__(self, softmax_scale=None, attention_dropout=0.0, device=None, dtype=None):
        super().__init__()
        self.softmax_scale = softmax_scale
        self.dropout_p = attention_dropout
        self.fp16_enabled = True

    def forward(self, q, kv, causal=False, key_padding_mask=None):
        k, v = kv.unbind(dim=2)  # (B, S, H, D) each
        scale = self.softmax_scale or q.shape[-1] ** -0.5
        logits = torch.einsum("bthd,bshd->bhts", q, k) * scale
        if key_padding_mask is not None:  # flash-attn's key_padding_mask: True = keep (unpad_input)
            logits = logits.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        return torch.einsum("bhts,bshd->bthd", logits.softmax(dim=-1), v), None


class FlashMHA(nn.Module):
    """StreamPETR's FlashMHA: batch-first, packed in-projection, nn.MultiheadAttention's names."""

    def __init__(self, embed_dim, num_heads, bias=True, batch_first=True, attention_dropout=0.0, causal=False,
                 device=None, dtype=None, **kwargs):  # fmt: skip
        assert batch_first
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.causal = causal
        self.bias = bias
        self.num_heads = num_heads
        assert self.embed_dim % num_heads == 0
        self.head_dim = self.embed_dim // num_heads
        assert self.head_dim % 8 == 0 and self.head_dim <= 128
        self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim)))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.inner_attn = FlashAttention(attention_dropout=attention_dropout, **factory_kwargs)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, q, k, v, key_padding_mask=None):
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q, k, v = linear(q, w_q, b_q), linear(k, w_k, b_k), linear(v, w_v, b_v)
        q, k, v = (x.unflatten(-1, (self.num_heads, -1)) for x in (q, k, v))  # b s (h d) -> b s h d
        kv = torch.stack([k, v], dim=2)
        context, attn_weights = self.inner_attn(q, kv, key_padding_mask=key_padding_mask, causal=self.causal)
        return self.out_proj(context.flatten(-2)), attn_weights


class PETRMultiheadFlashAttention(BaseModule):
    """StreamPETR's PETRMultiheadFlashAttention (batch_first forced True: it transposes the
    decoder's sequence-first tensors for FlashMHA; both masks are dropped)."""

    def __init__(self, embed_dims, num_heads, attn_drop=0.0, proj_drop=0.0, dropout_layer=None, init_cfg=None,
                 batch_first=True, **kwargs):  # fmt: skip
        super().__init__(init_cfg)
        dropout_layer = dict(type="Dropout", drop_prob=0.0) if dropout_layer is None else dict(dropout_layer)
        if "dropout" in kwargs:
            attn_drop = kwargs["dropout"]
            dropout_layer["drop_prob"] = kwargs.pop("dropout")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.batch_first = True
        # The original passes attn_drop positionally into FlashMHA's `bias`.
        self.attn = FlashMHA(embed_dims, num_heads, attn_drop, dtype=torch.float16, device="cuda", **kwargs)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dropout_layer = build_dropout(dropout_layer) if dropout_layer else nn.Identity()

    @deprecated_api_warning({"residual": "identity"}, cls_name="MultiheadAttention")
    def forward(
        self,
        query,
        key=None,
        value=None,
        identity=None,
        query_pos=None,
        key_pos=None,
        attn_mask=None,
        key_padding_mask=None,
        **kwargs,
    ):
        if key is None:
            key = query
        if value is None:
            value = key
        if identity is None:
            identity = query
        if key_pos is None:
            if query_pos is not None:
                if query_pos.shape == key.shape:
                    key_pos = query_pos
                else:
                    warnings.warn(f"position encoding of key ismissing in {self.__class__.__name__}.", stacklevel=2)
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        if self.batch_first:
            query = query.transpose(0, 1)
            key = key.transpose(0, 1)
            value = value.transpose(0, 1)
        out = self.attn(q=query, k=key, v=value, key_padding_mask=None)[0]
        if self.batch_first:
            out = out.transpose(0, 1)
        return identity + self.dropout_layer(self.proj_drop(out))


class FFN(BaseModule):
    """mmcv FFN: layers = Sequential(Sequential(Linear, act, Dropout), Linear, Dropout)."""

    def __init__(self, embed_dims=256, feedforward_channels=1024, num_fcs=2, act_cfg=None, ffn_drop=0.0,
                 dropout_layer=None, add_identity=True, init_cfg=None, **kwargs):  # fmt: skip
        super().__init__(init_cfg)
        self.embed_dims = embed_dims
        self.feedforward_channels = feedforward_channels
        self.num_fcs = num_fcs
        self.act_cfg = act_cfg
        self.activate = nn.ReLU(inplace=True)
        layers = []
        in_channels = embed_dims
        for _ in range(num_fcs - 1):
            layers.append(
                nn.Sequential(nn.Linear(in_channels, feedforward_channels), self.activate, nn.Dropout(ffn_drop))
            )
            in_channels = feedforward_channels
        layers.append(nn.Linear(feedforward_channels, embed_dims))
        layers.append(nn.Dropout(ffn_drop))
        self.layers = nn.Sequential(*layers)
        self.dropout_layer = build_dropout(dropout_layer) if dropout_layer else nn.Identity()
        self.add_identity = add_identity

    def forward(self, x, identity=None):
        out = self.layers(x)
        if not self.add_identity:
            return self.dropout_layer(out)
        if identity is None:
            identity = x
        return identity + self.dropout_layer(out)


ATTENTION = {
    "MultiheadAttention": MultiheadAttention,
    "PETRMultiheadAttention": PETRMultiheadAttention,
    "PETRMultiheadFlashAttention": PETRMultiheadFlashAttention,
}
DEFAULT_FFN = dict(type="FFN", embed_dims=256, feedforward_channels=1024, num_fcs=2, ffn_drop=0.0)


def _build_layer_parts(layer, attn_cfgs, ffn_cfgs, operation_order, norm_cfg, kwargs):
    """BaseTransformerLayer.__init__'s body (shared by PETRTemporalDecoderLayer, which copies it)."""
    ffn_cfgs = dict(ffn_cfgs)
    for ori_name, new_name in (
        ("feedforward_channels", "feedforward_channels"),
        ("ffn_dropout", "ffn_drop"),
        ("ffn_num_fcs", "num_fcs"),
    ):
        if ori_name in kwargs:
            ffn_cfgs[new_name] = kwargs[ori_name]
    num_attn = operation_order.count("self_attn") + operation_order.count("cross_attn")
    if isinstance(attn_cfgs, dict):
        attn_cfgs = [copy.deepcopy(attn_cfgs) for _ in range(num_attn)]
    attn_cfgs = [dict(c) for c in attn_cfgs]
    layer.num_attn = num_attn
    layer.operation_order = operation_order
    layer.norm_cfg = norm_cfg
    layer.pre_norm = operation_order[0] == "norm"
    layer.attentions = nn.ModuleList()
    index = 0
    for operation_name in operation_order:
        if operation_name in ["self_attn", "cross_attn"]:
            if "batch_first" in attn_cfgs[index]:
                assert layer.batch_first == attn_cfgs[index]["batch_first"]
            else:
                attn_cfgs[index]["batch_first"] = layer.batch_first
            attention = build_from_cfg(attn_cfgs[index], ATTENTION)
            attention.operation_name = operation_name
            layer.attentions.append(attention)
            index += 1
    layer.embed_dims = layer.attentions[0].embed_dims
    layer.ffns = nn.ModuleList()
    for _ in range(operation_order.count("ffn")):
        cfg = dict(ffn_cfgs)
        cfg["embed_dims"] = layer.embed_dims
        cfg.pop("type")
        layer.ffns.append(FFN(**cfg))
    layer.norms = nn.ModuleList()
    for _ in range(operation_order.count("norm")):
        layer.norms.append(build_norm_layer(norm_cfg, layer.embed_dims)[1])


def _attn_masks_list(attn_masks, num_attn):
    if attn_masks is None:
        return [None for _ in range(num_attn)]
    if isinstance(attn_masks, torch.Tensor):
        return [copy.deepcopy(attn_masks) for _ in range(num_attn)]
    assert len(attn_masks) == num_attn
    return attn_masks


class BaseTransformerLayer(BaseModule):
    """mmcv BaseTransformerLayer."""

    def __init__(self, attn_cfgs=None, ffn_cfgs=DEFAULT_FFN, operation_order=None, norm_cfg=None, init_cfg=None,
                 batch_first=False, **kwargs):  # fmt: skip
        super().__init__(init_cfg)
        self.batch_first = batch_first
        _build_layer_parts(self, attn_cfgs, ffn_cfgs, operation_order, norm_cfg or dict(type="LN"), kwargs)

    def forward(self, query, key=None, value=None, query_pos=None, key_pos=None, attn_masks=None,
                query_key_padding_mask=None, key_padding_mask=None, **kwargs):  # fmt: skip
        norm_index = 0
        attn_index = 0
        ffn_index = 0
        identity = query
        attn_masks = _attn_masks_list(attn_masks, self.num_attn)
        for layer in self.operation_order:
            if layer == "self_attn":
                temp_key = temp_value = query
                query = self.attentions[attn_index](
                    query,
                    temp_key,
                    temp_value,
                    identity if self.pre_norm else None,
                    query_pos=query_pos,
                    key_pos=query_pos,
                    attn_mask=attn_masks[attn_index],
                    key_padding_mask=query_key_padding_mask,
                    **kwargs,
                )
                attn_index += 1
                identity = query
            elif layer == "norm":
                query = self.norms[norm_index](query)
                norm_index += 1
            elif layer == "cross_attn":
                query = self.attentions[attn_index](
                    query,
                    key,
                    value,
                    identity if self.pre_norm else None,
                    query_pos=query_pos,
                    key_pos=key_pos,
                    attn_mask=attn_masks[attn_index],
                    key_padding_mask=key_padding_mask,
                    **kwargs,
                )
                attn_index += 1
                identity = query
            elif layer == "ffn":
                query = self.ffns[ffn_index](query, identity if self.pre_norm else None)
                ffn_index += 1
        return query


class PETRTransformerDecoderLayer(BaseTransformerLayer):
    """PETR's decoder layer: BaseTransformerLayer with gradient checkpointing in training."""

    def __init__(self, attn_cfgs, feedforward_channels, ffn_dropout=0.0, operation_order=None, act_cfg=None,
                 norm_cfg=None, ffn_num_fcs=2, with_cp=True, **kwargs):  # fmt: skip
        super().__init__(
            attn_cfgs=attn_cfgs,
            feedforward_channels=feedforward_channels,
            ffn_dropout=ffn_dropout,
            operation_order=operation_order,
            act_cfg=act_cfg,
            norm_cfg=norm_cfg,
            ffn_num_fcs=ffn_num_fcs,
            **kwargs,
        )
        assert len(operation_order) == 6
        self.use_checkpoint = with_cp

    def _forward(self, query, key=None, value=None, query_pos=None, key_pos=None, attn_masks=None,
                 query_key_padding_mask=None, key_padding_mask=None):  # fmt: skip
        return super().forward(
            query,
            key=key,
            value=value,
            query_pos=query_pos,
            key_pos=key_pos,
            attn_masks=attn_masks,
            query_key_padding_mask=query_key_padding_mask,
            key_padding_mask=key_padding_mask,
        )

    def forward(self, query, key=None, value=None, query_pos=None, key_pos=None, attn_masks=None,
                query_key_padding_mask=None, key_padding_mask=None, **kwargs):  # fmt: skip
        if self.use_checkpoint and self.training:
            return torch.utils.checkpoint.checkpoint(
                self._forward, query, key, value, query_pos, key_pos, attn_masks, query_key_padding_mask,
                key_padding_mask, use_reentrant=True,
            )  # fmt: skip
        return self._forward(
            query,
            key=key,
            value=value,
            query_pos=query_pos,
            key_pos=key_pos,
            attn_masks=attn_masks,
            query_key_padding_mask=query_key_padding_mask,
            key_padding_mask=key_padding_mask,
        )


class PETRTemporalDecoderLayer(BaseModule):
    """StreamPETR's decoder layer: self-attention keys are [queries, temp_memory]."""

    def __init__(self, attn_cfgs=None, ffn_cfgs=DEFAULT_FFN, operation_order=None, norm_cfg=None, init_cfg=None,
                 batch_first=False, with_cp=True, **kwargs):  # fmt: skip
        super().__init__(init_cfg)
        self.batch_first = batch_first
        _build_layer_parts(self, attn_cfgs, ffn_cfgs, operation_order, norm_cfg or dict(type="LN"), kwargs)
        self.use_checkpoint = with_cp

    def _forward(self, query, key=None, value=None, query_pos=None, key_pos=None, temp_memory=None, temp_pos=None,
                 attn_masks=None, query_key_padding_mask=None, key_padding_mask=None, **kwargs):  # fmt: skip
        norm_index = 0
        attn_index = 0
        ffn_index = 0
        identity = query
        attn_masks = _attn_masks_list(attn_masks, self.num_attn)
        for layer in self.operation_order:
            if layer == "self_attn":
                if temp_memory is not None:
                    temp_key = temp_value = torch.cat([query, temp_memory], dim=0)
                    temp_pos = torch.cat([query_pos, temp_pos], dim=0)
                else:
                    temp_key = temp_value = query
                    temp_pos = query_pos
                query = self.attentions[attn_index](
                    query,
                    temp_key,
                    temp_value,
                    identity if self.pre_norm else None,
                    query_pos=query_pos,
                    key_pos=temp_pos,
                    attn_mask=attn_masks[attn_index],
                    key_padding_mask=query_key_padding_mask,
                    **kwargs,
                )
                attn_index += 1
                identity = query
            elif layer == "norm":
                query = self.norms[norm_index](query)
                norm_index += 1
            elif layer == "cross_attn":
                query = self.attentions[attn_index](
                    query,
                    key,
                    value,
                    identity if self.pre_norm else None,
                    query_pos=query_pos,
                    key_pos=key_pos,
                    attn_mask=attn_masks[attn_index],
                    key_padding_mask=key_padding_mask,
                    **kwargs,
                )
                attn_index += 1
                identity = query
            elif layer == "ffn":
                query = self.ffns[ffn_index](query, identity if self.pre_norm else None)
                ffn_index += 1
        return query

    def forward(self, query, key=None, value=None, query_pos=None, key_pos=None, temp_memory=None, temp_pos=None,
                attn_masks=None, query_key_padding_mask=None, key_padding_mask=None, **kwargs):  # fmt: skip
        args = (query, key, value, query_pos, key_pos, temp_memory, temp_pos, attn_masks, query_key_padding_mask,
                key_padding_mask)  # fmt: skip
        if self.use_checkpoint and self.training:
            return torch.utils.checkpoint.checkpoint(self._forward, *args, use_reentrant=True)
        return self._forward(*args)


TRANSFORMER_LAYER = {
    "BaseTransformerLayer": BaseTransformerLayer,
    "PETRTransformerDecoderLayer": PETRTransformerDecoderLayer,
    "PETRTemporalDecoderLayer": PETRTemporalDecoderLayer,
}


class TransformerLayerSequence(BaseModule):
    """mmcv TransformerLayerSequence."""

    def __init__(self, transformerlayers=None, num_layers=None, init_cfg=None):
        super().__init__(init_cfg)
        if isinstance(transformerlayers, dict):
            transformerlayers = [copy.deepcopy(transformerlayers) for _ in range(num_layers)]
        self.num_layers = num_layers
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            self.layers.append(build_from_cfg(transformerlayers[i], TRANSFORMER_LAYER))
        self.embed_dims = self.layers[0].embed_dims
        self.pre_norm = self.layers[0].pre_norm

    def forward(self, query, key, value, query_pos=None, key_pos=None, attn_masks=None, query_key_padding_mask=None,
                key_padding_mask=None, **kwargs):  # fmt: skip
        for layer in self.layers:
            query = layer(
                query,
                key,
                value,
                query_pos=query_pos,
                key_pos=key_pos,
                attn_masks=attn_masks,
                query_key_padding_mask=query_key_padding_mask,
                key_padding_mask=key_padding_mask,
                **kwargs,
            )
        return query


class PETRTransformerDecoder(TransformerLayerSequence):
    """The decoder of both repositories: post_norm on every layer's output."""

    def __init__(self, *args, post_norm_cfg=None, return_intermediate=False, **kwargs):
        super().__init__(*args, **kwargs)
        post_norm_cfg = dict(type="LN") if post_norm_cfg is None else post_norm_cfg
        self.return_intermediate = return_intermediate
        self.post_norm = build_norm_layer(post_norm_cfg, self.embed_dims)[1] if post_norm_cfg else None

    def forward(self, query, *args, **kwargs):
        if not self.return_intermediate:
            x = super().forward(query, *args, **kwargs)
            if self.post_norm:
                x = self.post_norm(x)[None]
            return x
        intermediate = []
        for layer in self.layers:
            query = layer(query, *args, **kwargs)
            if self.return_intermediate:
                if self.post_norm is not None:
                    intermediate.append(self.post_norm(query))
                else:
                    intermediate.append(query)
        return torch.stack(intermediate)


class PETRTransformer(BaseModule):
    """megvii-research/PETR's transformer: x [B, N, C, H, W] -> sequence-first keys, camera-major."""

    def __init__(self, encoder=None, decoder=None, init_cfg=None, cross=False):
        super().__init__(init_cfg=init_cfg)
        self.encoder = None
        self.decoder = build_from_cfg(decoder, {"PETRTransformerDecoder": PETRTransformerDecoder})
        self.embed_dims = self.decoder.embed_dims
        self.cross = cross

    def forward(self, x, mask, query_embed, pos_embed, reg_branch=None):
        bs, n, c, h, w = x.shape
        memory = x.permute(1, 3, 4, 0, 2).reshape(-1, bs, c)  # [bs, n, c, h, w] -> [n*h*w, bs, c]
        pos_embed = pos_embed.permute(1, 3, 4, 0, 2).reshape(-1, bs, c)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)  # [num_query, dim] -> [num_query, bs, dim]
        mask = mask.view(bs, -1)  # [bs, n, h, w] -> [bs, n*h*w]
        target = torch.zeros_like(query_embed)
        out_dec = self.decoder(
            query=target,
            key=memory,
            value=memory,
            key_pos=pos_embed,
            query_pos=query_embed,
            key_padding_mask=mask,
            reg_branch=reg_branch,
        )
        out_dec = out_dec.transpose(1, 2)
        memory = memory.reshape(n, h, w, bs, c).permute(3, 0, 4, 1, 2)
        return out_dec, memory


class PETRTemporalTransformer(BaseModule):
    """StreamPETR's transformer (StreamPETR and FocalPETR heads): batch-first in, sequence-first inside."""

    def __init__(self, encoder=None, decoder=None, init_cfg=None, cross=False):
        super().__init__(init_cfg=init_cfg)
        self.encoder = None
        self.decoder = build_from_cfg(decoder, {"PETRTransformerDecoder": PETRTransformerDecoder})
        self.embed_dims = self.decoder.embed_dims
        self.cross = cross

    def forward(self, memory, tgt, query_pos, pos_embed, attn_masks, temp_memory=None, temp_pos=None, mask=None,
                reg_branch=None):  # fmt: skip
        memory = memory.transpose(0, 1).contiguous()
        query_pos = query_pos.transpose(0, 1).contiguous()
        pos_embed = pos_embed.transpose(0, 1).contiguous()
        n, bs, c = memory.shape
        if tgt is None:
            tgt = torch.zeros_like(query_pos)
        else:
            tgt = tgt.transpose(0, 1).contiguous()
        if temp_memory is not None:
            temp_memory = temp_memory.transpose(0, 1).contiguous()
            temp_pos = temp_pos.transpose(0, 1).contiguous()
        out_dec = self.decoder(
            query=tgt,
            key=memory,
            value=memory,
            key_pos=pos_embed,
            query_pos=query_pos,
            temp_memory=temp_memory,
            temp_pos=temp_pos,
            key_padding_mask=mask,
            attn_masks=[attn_masks, None],
            reg_branch=reg_branch,
        )
        out_dec = out_dec.transpose(1, 2).contiguous()
        memory = memory.reshape(-1, bs, c).transpose(0, 1).contiguous()
        return out_dec, memory


# ---- helpers of the heads -----------------------------------------------------------------------


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)


def pos2posemb3d(pos, num_pos_feats=128, temperature=10000):
    scale = 2 * math.pi
    pos = pos * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = pos[..., 0, None] / dim_t
    pos_y = pos[..., 1, None] / dim_t
    pos_z = pos[..., 2, None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
    pos_z = torch.stack((pos_z[..., 0::2].sin(), pos_z[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((pos_y, pos_x, pos_z), dim=-1)


def pos2posemb1d(pos, num_pos_feats=256, temperature=10000):
    scale = 2 * math.pi
    pos = pos * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = pos[..., 0, None] / dim_t
    return torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)


def nerf_positional_encoding(tensor, num_encoding_functions=6):
    frequency_bands = 2.0 ** torch.linspace(
        0.0, num_encoding_functions - 1, num_encoding_functions, dtype=tensor.dtype, device=tensor.device
    )
    encoding = []
    for freq in frequency_bands:
        for func in [torch.sin, torch.cos]:
            encoding.append(func(tensor * freq))
    return torch.cat(encoding, dim=-1)


def memory_refresh(memory, prev_exist):
    view_shape = [1 for _ in range(len(memory.shape))]
    prev_exist = prev_exist.view(-1, *view_shape[1:])
    return memory * prev_exist


def topk_gather(feat, topk_indexes):
    if topk_indexes is not None:
        feat_shape = feat.shape
        topk_shape = topk_indexes.shape
        view_shape = [1 for _ in range(len(feat_shape))]
        view_shape[:2] = topk_shape[:2]
        topk_indexes = topk_indexes.view(*view_shape)
        feat = torch.gather(feat, 1, topk_indexes.repeat(1, 1, *feat_shape[2:]))
    return feat


def transform_reference_points(reference_points, egopose, reverse=False, translation=True):
    reference_points = torch.cat([reference_points, torch.ones_like(reference_points[..., 0:1])], dim=-1)
    matrix = egopose.inverse() if reverse else egopose
    return (matrix.unsqueeze(1) @ reference_points.unsqueeze(-1)).squeeze(-1)[..., :3]


class MLN(nn.Module):
    def __init__(self, c_dim, f_dim=256):
        super().__init__()
        self.c_dim = c_dim
        self.f_dim = f_dim
        self.reduce = nn.Sequential(nn.Linear(c_dim, f_dim), nn.ReLU())
        self.gamma = nn.Linear(f_dim, f_dim)
        self.beta = nn.Linear(f_dim, f_dim)
        self.ln = nn.LayerNorm(f_dim, elementwise_affine=False)
        nn.init.zeros_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.bias)

    def forward(self, x, c):
        x = self.ln(x)
        c = self.reduce(c)
        gamma = self.gamma(c)
        beta = self.beta(c)
        return gamma * x + beta


# ---- heads --------------------------------------------------------------------------------------

PC_RANGE = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]


def decoder_cfg(layer_type, cross_type, num_layers, embed_dims, num_heads, ffn_dims, self_type="MultiheadAttention"):
    """The `transformer.decoder` entry of the published configs, at any size."""
    return dict(
        type="PETRTransformerDecoder",
        return_intermediate=True,
        num_layers=num_layers,
        transformerlayers=dict(
            type=layer_type,
            attn_cfgs=[
                dict(type=self_type, embed_dims=embed_dims, num_heads=num_heads, dropout=0.1),
                dict(type=cross_type, embed_dims=embed_dims, num_heads=num_heads, dropout=0.1),
            ],
            feedforward_channels=ffn_dims,
            ffn_dropout=0.1,
            with_cp=True,
            operation_order=("self_attn", "norm", "cross_attn", "norm", "ffn", "norm"),
        ),
    )


def _branches(embed_dims, num_classes, code_size, num_reg_fcs, num_pred):
    cls_branch = []
    for _ in range(num_reg_fcs):
        cls_branch.append(nn.Linear(embed_dims, embed_dims))
        cls_branch.append(nn.LayerNorm(embed_dims))
        cls_branch.append(nn.ReLU(inplace=True))
    cls_branch.append(nn.Linear(embed_dims, num_classes))
    fc_cls = nn.Sequential(*cls_branch)
    reg_branch = []
    for _ in range(num_reg_fcs):
        reg_branch.append(nn.Linear(embed_dims, embed_dims))
        reg_branch.append(nn.ReLU())
    reg_branch.append(nn.Linear(embed_dims, code_size))
    reg_branch = nn.Sequential(*reg_branch)
    # One module object repeated for every layer, as both repositories build them.
    return nn.ModuleList([fc_cls for _ in range(num_pred)]), nn.ModuleList([reg_branch for _ in range(num_pred)])


class PETRHead(BaseModule):
    """megvii-research/PETR's PETRHead, decoding part: forward(x, masks, pos_embed) with the projected
    features x [B, N, E, H, W], the padding masks [B, N, H, W] (True = padded) and pos_embed
    [B, N, E, H, W] that the original computes from mlvl_feats and img_metas."""

    def __init__(self, num_classes=10, embed_dims=256, num_query=900, num_reg_fcs=2, transformer=None, code_size=10):
        super().__init__()
        self.num_classes = num_classes
        self.cls_out_channels = num_classes
        self.embed_dims = embed_dims
        self.num_query = num_query
        self.code_size = code_size
        self.pc_range = list(PC_RANGE)  # bbox_coder.pc_range, a list in PETRHead
        self.num_pred = transformer["decoder"]["num_layers"]
        self.transformer = build_from_cfg(transformer, {"PETRTransformer": PETRTransformer})
        self.cls_branches, self.reg_branches = _branches(embed_dims, num_classes, code_size, num_reg_fcs, self.num_pred)
        self.reference_points = nn.Embedding(self.num_query, 3)
        self.query_embedding = nn.Sequential(
            nn.Linear(self.embed_dims * 3 // 2, self.embed_dims), nn.ReLU(), nn.Linear(self.embed_dims, self.embed_dims)
        )

    def forward(self, x, masks, pos_embed):
        batch_size = x.size(0)
        reference_points = self.reference_points.weight
        query_embeds = self.query_embedding(pos2posemb3d(reference_points, self.embed_dims // 2))
        reference_points = reference_points.unsqueeze(0).repeat(batch_size, 1, 1)
        outs_dec, _ = self.transformer(x, masks, query_embeds, pos_embed, self.reg_branches)
        outs_dec = torch.nan_to_num(outs_dec)
        outputs_classes = []
        outputs_coords = []
        for lvl in range(outs_dec.shape[0]):
            reference = inverse_sigmoid(reference_points.clone())
            outputs_class = self.cls_branches[lvl](outs_dec[lvl])
            tmp = self.reg_branches[lvl](outs_dec[lvl])
            tmp[..., 0:2] += reference[..., 0:2]
            tmp[..., 0:2] = tmp[..., 0:2].sigmoid()
            tmp[..., 4:5] += reference[..., 2:3]
            tmp[..., 4:5] = tmp[..., 4:5].sigmoid()
            outputs_classes.append(outputs_class)
            outputs_coords.append(tmp)
        all_cls_scores = torch.stack(outputs_classes)
        all_bbox_preds = torch.stack(outputs_coords)
        pc = self.pc_range
        all_bbox_preds[..., 0:1] = all_bbox_preds[..., 0:1] * (pc[3] - pc[0]) + pc[0]
        all_bbox_preds[..., 1:2] = all_bbox_preds[..., 1:2] * (pc[4] - pc[1]) + pc[1]
        all_bbox_preds[..., 4:5] = all_bbox_preds[..., 4:5] * (pc[5] - pc[2]) + pc[2]
        return {"all_cls_scores": all_cls_scores, "all_bbox_preds": all_bbox_preds}


class PETRHeadDN(BaseModule):
    """StreamPETR's PETRHeadDN (the FocalPETR head), decoding part in eval (no denoising groups):
    forward(memory, pos_embed) with memory, pos_embed [B, Nk, E] after memory_embed, spatial
    alignment and featurized_pe."""

    def __init__(self, num_classes=10, embed_dims=256, num_query=900, num_reg_fcs=2, transformer=None, code_size=10):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_query = num_query
        self.code_size = code_size
        self.num_pred = transformer["decoder"]["num_layers"]
        self.transformer = build_from_cfg(transformer, {"PETRTemporalTransformer": PETRTemporalTransformer})
        self.pc_range = nn.Parameter(torch.tensor(PC_RANGE), requires_grad=False)
        self.cls_branches, self.reg_branches = _branches(embed_dims, num_classes, code_size, num_reg_fcs, self.num_pred)
        self.reference_points = nn.Embedding(self.num_query, 3)
        self.query_embedding = nn.Sequential(
            nn.Linear(self.embed_dims * 3 // 2, self.embed_dims), nn.ReLU(), nn.Linear(self.embed_dims, self.embed_dims)
        )

    def prepare_for_dn(self, batch_size, reference_points, img_metas):
        return reference_points.unsqueeze(0).repeat(batch_size, 1, 1), None, None  # eval: no denoising

    def _decode(self, outs_dec, reference_points):
        """The branch loop of forward (inline in the original)."""
        outs_dec = torch.nan_to_num(outs_dec)
        outputs_classes = []
        outputs_coords = []
        for lvl in range(outs_dec.shape[0]):
            reference = inverse_sigmoid(reference_points.clone())
            outputs_class = self.cls_branches[lvl](outs_dec[lvl])
            tmp = self.reg_branches[lvl](outs_dec[lvl])
            tmp[..., 0:3] += reference[..., 0:3]
            tmp[..., 0:3] = tmp[..., 0:3].sigmoid()
            outputs_classes.append(outputs_class)
            outputs_coords.append(tmp)
        all_cls_scores = torch.stack(outputs_classes)
        all_bbox_preds = torch.stack(outputs_coords)
        all_bbox_preds[..., 0:3] = (
            all_bbox_preds[..., 0:3] * (self.pc_range[3:6] - self.pc_range[0:3]) + self.pc_range[0:3]
        )
        return outs_dec, all_cls_scores, all_bbox_preds

    def forward(self, memory, pos_embed, img_metas=None, **data):
        batch = memory.shape[0]
        reference_points = self.reference_points.weight
        reference_points, attn_mask, mask_dict = self.prepare_for_dn(batch, reference_points, img_metas)
        query_pos = self.query_embedding(pos2posemb3d(reference_points, self.embed_dims // 2))
        outs_dec, _ = self.transformer(memory, None, query_pos, pos_embed, attn_mask)
        _, all_cls_scores, all_bbox_preds = self._decode(outs_dec, reference_points)
        return {"all_cls_scores": all_cls_scores, "all_bbox_preds": all_bbox_preds, "dn_mask_dict": None}


class StreamPETRHead(PETRHeadDN):
    """StreamPETR's StreamPETRHead, decoding part in eval: the memory bank, temporal alignment,
    the transformer with temp_memory / temp_pos, the branches and the memory update.
    forward(memory, pos_embed, img_metas=None, **data) with data: prev_exists [B], timestamp [B]
    (float64), ego_pose and ego_pose_inv [B, 4, 4]."""

    def __init__(self, num_classes=10, embed_dims=256, num_query=644, num_reg_fcs=2, memory_len=1024,
                 topk_proposals=256, num_propagated=256, transformer=None, code_size=10):  # fmt: skip
        super().__init__(num_classes, embed_dims, num_query, num_reg_fcs, transformer, code_size)
        self.memory_len = memory_len
        self.topk_proposals = topk_proposals
        self.num_propagated = num_propagated
        self.with_ego_pos = True
        if self.num_propagated > 0:
            self.pseudo_reference_points = nn.Embedding(self.num_propagated, 3)
        self.time_embedding = nn.Sequential(nn.Linear(self.embed_dims, self.embed_dims), nn.LayerNorm(self.embed_dims))
        self.ego_pose_pe = MLN(180, self.embed_dims)
        self.ego_pose_memory = MLN(180, self.embed_dims)
        self.reset_memory()

    def reset_memory(self):
        self.memory_embedding = None
        self.memory_reference_point = None
        self.memory_timestamp = None
        self.memory_egopose = None
        self.memory_velo = None

    def pre_update_memory(self, data):
        x = data["prev_exists"]
        B = x.size(0)
        if self.memory_embedding is None:
            self.memory_embedding = x.new_zeros(B, self.memory_len, self.embed_dims)
            self.memory_reference_point = x.new_zeros(B, self.memory_len, 3)
            self.memory_timestamp = x.new_zeros(B, self.memory_len, 1)
            self.memory_egopose = x.new_zeros(B, self.memory_len, 4, 4)
            self.memory_velo = x.new_zeros(B, self.memory_len, 2)
        else:
            self.memory_timestamp += data["timestamp"].unsqueeze(-1).unsqueeze(-1)
            self.memory_egopose = data["ego_pose_inv"].unsqueeze(1) @ self.memory_egopose
            self.memory_reference_point = transform_reference_points(
                self.memory_reference_point, data["ego_pose_inv"], reverse=False
            )
            self.memory_timestamp = memory_refresh(self.memory_timestamp[:, : self.memory_len], x)
            self.memory_reference_point = memory_refresh(self.memory_reference_point[:, : self.memory_len], x)
            self.memory_embedding = memory_refresh(self.memory_embedding[:, : self.memory_len], x)
            self.memory_egopose = memory_refresh(self.memory_egopose[:, : self.memory_len], x)
            self.memory_velo = memory_refresh(self.memory_velo[:, : self.memory_len], x)
        if self.num_propagated > 0:
            pseudo_reference_points = (
                self.pseudo_reference_points.weight * (self.pc_range[3:6] - self.pc_range[0:3]) + self.pc_range[0:3]
            )
            p = self.num_propagated
            self.memory_reference_point[:, :p] = (
                self.memory_reference_point[:, :p] + (1 - x).view(B, 1, 1) * pseudo_reference_points
            )
            self.memory_egopose[:, :p] = self.memory_egopose[:, :p] + (1 - x).view(B, 1, 1, 1) * torch.eye(4)

    def post_update_memory(self, data, rec_ego_pose, all_cls_scores, all_bbox_preds, outs_dec, mask_dict):
        rec_reference_points = all_bbox_preds[..., :3][-1]
        rec_velo = all_bbox_preds[..., -2:][-1]
        rec_memory = outs_dec[-1]
        rec_score = all_cls_scores[-1].sigmoid().topk(1, dim=-1).values[..., 0:1]
        rec_timestamp = torch.zeros_like(rec_score, dtype=torch.float64)
        _, topk_indexes = torch.topk(rec_score, self.topk_proposals, dim=1)
        rec_timestamp = topk_gather(rec_timestamp, topk_indexes)
        rec_reference_points = topk_gather(rec_reference_points, topk_indexes).detach()
        rec_memory = topk_gather(rec_memory, topk_indexes).detach()
        rec_ego_pose = topk_gather(rec_ego_pose, topk_indexes)
        rec_velo = topk_gather(rec_velo, topk_indexes).detach()
        self.memory_embedding = torch.cat([rec_memory, self.memory_embedding], dim=1)
        self.memory_timestamp = torch.cat([rec_timestamp, self.memory_timestamp], dim=1)
        self.memory_egopose = torch.cat([rec_ego_pose, self.memory_egopose], dim=1)
        self.memory_reference_point = torch.cat([rec_reference_points, self.memory_reference_point], dim=1)
        self.memory_velo = torch.cat([rec_velo, self.memory_velo], dim=1)
        self.memory_reference_point = transform_reference_points(
            self.memory_reference_point, data["ego_pose"], reverse=False
        )
        self.memory_timestamp -= data["timestamp"].unsqueeze(-1).unsqueeze(-1)
        self.memory_egopose = data["ego_pose"].unsqueeze(1) @ self.memory_egopose

    def temporal_alignment(self, query_pos, tgt, reference_points):
        B = query_pos.size(0)
        half = self.embed_dims // 2
        temp_reference_point = (self.memory_reference_point - self.pc_range[:3]) / (
            self.pc_range[3:6] - self.pc_range[0:3]
        )
        temp_pos = self.query_embedding(pos2posemb3d(temp_reference_point, half))
        temp_memory = self.memory_embedding
        rec_ego_pose = (
            torch.eye(4, device=query_pos.device).unsqueeze(0).unsqueeze(0).repeat(B, query_pos.size(1), 1, 1)
        )
        if self.with_ego_pos:
            rec_ego_motion = torch.cat(
                [torch.zeros_like(reference_points[..., :3]), rec_ego_pose[..., :3, :].flatten(-2)], dim=-1
            )
            rec_ego_motion = nerf_positional_encoding(rec_ego_motion)
            tgt = self.ego_pose_memory(tgt, rec_ego_motion)
            query_pos = self.ego_pose_pe(query_pos, rec_ego_motion)
            memory_ego_motion = torch.cat(
                [self.memory_velo, self.memory_timestamp, self.memory_egopose[..., :3, :].flatten(-2)], dim=-1
            ).float()
            memory_ego_motion = nerf_positional_encoding(memory_ego_motion)
            temp_pos = self.ego_pose_pe(temp_pos, memory_ego_motion)
            temp_memory = self.ego_pose_memory(temp_memory, memory_ego_motion)
        query_pos += self.time_embedding(pos2posemb1d(torch.zeros_like(reference_points[..., :1]), self.embed_dims))
        temp_pos += self.time_embedding(pos2posemb1d(self.memory_timestamp, self.embed_dims).float())
        if self.num_propagated > 0:
            p = self.num_propagated
            tgt = torch.cat([tgt, temp_memory[:, :p]], dim=1)
            query_pos = torch.cat([query_pos, temp_pos[:, :p]], dim=1)
            reference_points = torch.cat([reference_points, temp_reference_point[:, :p]], dim=1)
            rec_ego_pose = (
                torch.eye(4, device=query_pos.device).unsqueeze(0).unsqueeze(0).repeat(B, query_pos.shape[1] + p, 1, 1)
            )
            temp_memory = temp_memory[:, p:]
            temp_pos = temp_pos[:, p:]
        return tgt, query_pos, reference_points, temp_memory, temp_pos, rec_ego_pose

    def forward(self, memory, pos_embed, img_metas=None, **data):
        self.pre_update_memory(data)
        B = memory.shape[0]
        reference_points = self.reference_points.weight
        reference_points, attn_mask, mask_dict = self.prepare_for_dn(B, reference_points, img_metas)
        query_pos = self.query_embedding(pos2posemb3d(reference_points, self.embed_dims // 2))
        tgt = torch.zeros_like(query_pos)
        tgt, query_pos, reference_points, temp_memory, temp_pos, rec_ego_pose = self.temporal_alignment(
            query_pos, tgt, reference_points
        )
        outs_dec, _ = self.transformer(memory, tgt, query_pos, pos_embed, attn_mask, temp_memory, temp_pos)
        outs_dec, all_cls_scores, all_bbox_preds = self._decode(outs_dec, reference_points)
        self.post_update_memory(data, rec_ego_pose, all_cls_scores, all_bbox_preds, outs_dec, mask_dict)
        return {"all_cls_scores": all_cls_scores, "all_bbox_preds": all_bbox_preds, "dn_mask_dict": None}


class FocalHead(BaseModule):
    """StreamPETR's 2D auxiliary head (img_roi_head): convolutions, no transformer."""

    def __init__(self, embed_dims=256, num_classes=10):
        super().__init__()
        self.shared_cls = nn.Sequential(nn.Conv2d(embed_dims, embed_dims, 3, padding=1), nn.GroupNorm(8, embed_dims))
        self.cls = nn.Conv2d(embed_dims, num_classes, 1)


class Petr3D(BaseModule):
    """Where the heads sit in the detector (MVXTwoStageDetector): pts_bbox_head, img_roi_head, ..."""

    def __init__(self, pts_bbox_head, img_roi_head=None, embed_dims=256):
        super().__init__()
        self.img_backbone = nn.Conv2d(3, embed_dims, 16, stride=16)
        self.img_neck = nn.Conv2d(embed_dims, embed_dims, 1)
        self.pts_bbox_head = pts_bbox_head
        if img_roi_head is not None:
            self.img_roi_head = img_roi_head

    @property
    def with_img_roi_head(self):
        return hasattr(self, "img_roi_head") and self.img_roi_head is not None

    def forward(self, *args, **kwargs):
        return self.pts_bbox_head(*args, **kwargs)


class MMDataParallel(nn.Module):
    """mmcv's MMDataParallel on one device: the model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
