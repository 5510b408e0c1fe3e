"""Names and shapes of the published detectors' state dicts, written from reading the original code.

Sources read: mmdet 2.x ResNet (Bottleneck, ResLayer, build_norm_layer names bn1..bn3), the
StreamPETR repository's vovnet.py / vovnetcp.py, cp_fpn.py (mmcv ConvModule -> `.conv`),
focal_head.py (FocalHead._init_layers), streampetr_head.py and petr_head_dn.py (_init_layers and
the nn.Parameter constants of __init__), petr_transformer.py (PETRTemporalDecoderLayer built by
mmcv's BaseTransformerLayer: attentions / ffns / norms, FFN layers = Sequential(Sequential(Linear,
act, Dropout), Linear, Dropout), post_norm) and misc.py (MLN, SELayer_Linear). Nothing here is
derived from tggbc's modules.
"""

from __future__ import annotations

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn_entries(name, channels):
    return {f"{name}.{s}": (() if s == "num_batches_tracked" else (channels,)) for s in BN}


def resnet50():
    """mmdet ResNet(depth=50): stem conv1/bn1, layer1..4 of 3/4/6/3 Bottlenecks, downsample in block 0."""
    names = {"conv1.weight": (64, 3, 7, 7), **bn_entries("bn1", 64)}
    inplanes = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = 64 * 2**stage
        for j in range(blocks):
            p = f"layer{stage + 1}.{j}"
            names[f"{p}.conv1.weight"] = (planes, inplanes if j == 0 else planes * 4, 1, 1)
            names[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            names[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            for k, c in ((1, planes), (2, planes), (3, planes * 4)):
                names.update(bn_entries(f"{p}.bn{k}", c))
            if j == 0:
                names[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                names.update(bn_entries(f"{p}.downsample.1", planes * 4))
        inplanes = planes * 4
    return names


def vovnet99():
    """StreamPETR's VoVNet(CP) 'V-99-eSE': stem_1..3, stages 2-5 with 1/3/9/3 OSA blocks of 5 layers."""
    names = {}

    def conv_bn(prefix, cout, cin, k):
        names[f"{prefix}/conv.weight"] = (cout, cin, k, k)
        names.update(bn_entries(f"{prefix}/norm", cout))

    conv_bn("stem.stem_1", 64, 3, 3)
    conv_bn("stem.stem_2", 64, 64, 3)
    conv_bn("stem.stem_3", 128, 64, 3)
    conv_ch, out_ch, blocks = (128, 160, 192, 224), (256, 512, 768, 1024), (1, 3, 9, 3)
    in_ch = 128
    for s in range(4):
        for b in range(blocks[s]):
            name = f"OSA{s + 2}_{b + 1}"
            prefix = f"stage{s + 2}.{name}"
            cin = in_ch if b == 0 else out_ch[s]
            for layer in range(5):
                conv_bn(f"{prefix}.layers.{layer}.{name}_{layer}", conv_ch[s], cin if layer == 0 else conv_ch[s], 3)
            conv_bn(f"{prefix}.concat.{name}_concat", out_ch[s], cin + 5 * conv_ch[s], 1)
            names[f"{prefix}.ese.fc.weight"] = (out_ch[s], out_ch[s], 1, 1)
            names[f"{prefix}.ese.fc.bias"] = (out_ch[s],)
        in_ch = out_ch[s]
    return names


def cpfpn(in_channels, out=256):
    names = {}
    for i, c in enumerate(in_channels):
        names[f"lateral_convs.{i}.conv.weight"] = (out, c, 1, 1)
        names[f"lateral_convs.{i}.conv.bias"] = (out,)
    names["fpn_convs.0.conv.weight"] = (out, out, 3, 3)
    names["fpn_convs.0.conv.bias"] = (out,)
    return names


def focal_head(e=256, classes=10):
    names = {"cls.weight": (classes, e, 1, 1), "cls.bias": (classes,)}
    for tower in ("shared_reg", "shared_cls"):
        names[f"{tower}.0.weight"] = (e, e, 3, 3)
        names[f"{tower}.0.bias"] = (e,)
        names[f"{tower}.1.weight"] = (e,)  # GroupNorm(32, e)
        names[f"{tower}.1.bias"] = (e,)
    for conv, out in (("centerness", 1), ("ltrb", 4), ("center2d", 2)):
        names[f"{conv}.weight"] = (out, e, 1, 1)
        names[f"{conv}.bias"] = (out,)
    return names


def linear(names, prefix, out, inp):
    names[f"{prefix}.weight"] = (out, inp)
    names[f"{prefix}.bias"] = (out,)


def mln(names, prefix, code, e=256):
    linear(names, f"{prefix}.reduce.0", e, code)
    linear(names, f"{prefix}.gamma", e, e)
    linear(names, f"{prefix}.beta", e, e)


def sparse_head(temporal, num_query, num_propagated=0, e=256, layers=6, ffn=2048, classes=10, depth=64):
    """StreamPETRHead (temporal) or PETRHeadDN, as their __init__ / _init_layers and the transformer build them."""
    names = {
        "code_weights": (10,),
        "match_costs": (10,),
        "pc_range": (6,),
        "position_range": (6,),
        "coords_d": (depth,),
    }
    for i in range(layers):
        p = f"transformer.decoder.layers.{i}"
        for a in (0, 1):  # mmcv MultiheadAttention and PETRMultiheadFlashAttention: both hold `attn`
            names[f"{p}.attentions.{a}.attn.in_proj_weight"] = (3 * e, e)
            names[f"{p}.attentions.{a}.attn.in_proj_bias"] = (3 * e,)
            linear(names, f"{p}.attentions.{a}.attn.out_proj", e, e)
        linear(names, f"{p}.ffns.0.layers.0.0", ffn, e)
        linear(names, f"{p}.ffns.0.layers.1", e, ffn)
        for n in range(3):
            names[f"{p}.norms.{n}.weight"] = (e,)
            names[f"{p}.norms.{n}.bias"] = (e,)
    names["transformer.decoder.post_norm.weight"] = (e,)
    names["transformer.decoder.post_norm.bias"] = (e,)
    for i in range(6):  # num_pred = 6 entries, one shared module object each
        linear(names, f"cls_branches.{i}.0", e, e)
        names[f"cls_branches.{i}.1.weight"] = (e,)
        names[f"cls_branches.{i}.1.bias"] = (e,)
        linear(names, f"cls_branches.{i}.3", e, e)
        names[f"cls_branches.{i}.4.weight"] = (e,)
        names[f"cls_branches.{i}.4.bias"] = (e,)
        linear(names, f"cls_branches.{i}.6", classes, e)
        linear(names, f"reg_branches.{i}.0", e, e)
        linear(names, f"reg_branches.{i}.2", e, e)
        linear(names, f"reg_branches.{i}.4", 10, e)
    linear(names, "position_encoder.0", 4 * e, 3 * depth)
    linear(names, "position_encoder.2", e, 4 * e)
    linear(names, "memory_embed.0", e, e)
    linear(names, "memory_embed.2", e, e)
    linear(names, "featurized_pe.conv_reduce", e, e)
    linear(names, "featurized_pe.conv_expand", e, e)
    names["reference_points.weight"] = (num_query, 3)
    linear(names, "query_embedding.0", e, 3 * e // 2)
    linear(names, "query_embedding.2", e, e)
    mln(names, "spatial_alignment", 8, e)
    if temporal:
        names["pseudo_reference_points.weight"] = (num_propagated, 3)
        linear(names, "time_embedding.0", e, e)
        names["time_embedding.1.weight"] = (e,)
        names["time_embedding.1.bias"] = (e,)
        mln(names, "ego_pose_pe", 180, e)
        mln(names, "ego_pose_memory", 180, e)
    return names


def detector(backbone, neck_in, temporal, num_query, num_propagated=0, roi_head=True):
    """The whole Petr3D state dict of a published config: {original name: shape}."""
    parts = {
        "img_backbone.": resnet50() if backbone == "ResNet-50" else vovnet99(),
        "img_neck.": cpfpn(neck_in),
        "pts_bbox_head.": sparse_head(temporal, num_query, num_propagated),
    }
    if roi_head:
        parts["img_roi_head."] = focal_head()
    return {prefix + k: v for prefix, table in parts.items() for k, v in table.items()}


# The published configs as read from their files (backbone, neck inputs, head, queries, roi head).
CONFIGS = {
    "stream_petr_r50_flash_704_bs2_seq_24e": ("ResNet-50", [1024, 2048], True, 644, 256, True),
    "stream_petr_r50_flash_704_bs2_seq_428q_nui_24e": ("ResNet-50", [1024, 2048], True, 300, 128, True),
    "stream_petr_vov_flash_800_bs2_seq_24e": ("V-99-eSE", [768, 1024], True, 644, 256, True),
    "streampetr_vov_1600x640_bs2x2_24e_gbc_r21000_n1_k175": ("V-99-eSE", [768, 1024], True, 644, 256, True),
    "petrv1_r50_flash_704_24e": ("ResNet-50", [1024, 2048], False, 900, 0, False),
    "focal_petrv1_r50_flash_704_24e": ("ResNet-50", [1024, 2048], False, 900, 0, True),
}
