"""Checkpoint renaming: module trees built with the published heads' attribute names load strictly."""

import pytest
import torch
from torch import nn

from tggbc.models import (
    FocalPETRDecoder,
    PETRDecoder,
    PETRPositionEmbedding,
    StreamPETRDecoder,
    StreamPETRPositionEmbedding,
    convert_petr_state_dict,
    convert_streampetr_state_dict,
    load_original_state_dict,
    to_petr_state_dict,
    to_streampetr_state_dict,
)

E, LAYERS, QUERIES = 32, 2, 12
TINY = dict(num_layers=LAYERS, embed_dims=E, num_heads=4, ffn_dims=64, num_queries=QUERIES)
DEPTHS = 30


class Holder(nn.Module):
    """A bare attribute container, for building the mmdet3d name tree."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


def original_layer():
    ffn = Holder(layers=nn.Sequential(nn.Sequential(nn.Linear(E, 64), nn.ReLU(), nn.Dropout()), nn.Linear(64, E)))
    return Holder(
        attentions=nn.ModuleList([Holder(attn=nn.MultiheadAttention(E, 4)), Holder(attn=nn.MultiheadAttention(E, 4))]),
        ffns=nn.ModuleList([ffn]),
        norms=nn.ModuleList([nn.LayerNorm(E) for _ in range(3)]),
    )


def original_mln(code_dims):
    return Holder(
        reduce=nn.Sequential(nn.Linear(code_dims, E), nn.ReLU()),
        gamma=nn.Linear(E, E),
        beta=nn.Linear(E, E),
        ln=nn.LayerNorm(E, elementwise_affine=False),
    )


def original_head(kind):
    """The head's parameter tree as the published code builds it (PETR shares one branch object)."""
    cls = nn.Sequential(nn.Linear(E, E), nn.LayerNorm(E), nn.ReLU(), nn.Linear(E, E), nn.LayerNorm(E), nn.ReLU())
    cls.append(nn.Linear(E, 10))
    reg = nn.Sequential(nn.Linear(E, E), nn.ReLU(), nn.Linear(E, E), nn.ReLU(), nn.Linear(E, 10))
    head = Holder(
        transformer=Holder(
            decoder=Holder(layers=nn.ModuleList([original_layer() for _ in range(LAYERS)]), post_norm=nn.LayerNorm(E))
        ),
        cls_branches=nn.ModuleList([cls for _ in range(LAYERS)]),
        reg_branches=nn.ModuleList([reg for _ in range(LAYERS)]),
        reference_points=nn.Embedding(QUERIES, 3),
        query_embedding=nn.Sequential(nn.Linear(3 * E // 2, E), nn.ReLU(), nn.Linear(E, E)),
    )
    head.code_weights = nn.Parameter(torch.ones(10), requires_grad=False)
    if kind == "petr":
        head.input_proj = nn.Conv2d(E, E, 1)
        head.position_encoder = nn.Sequential(nn.Conv2d(3 * DEPTHS, 4 * E, 1), nn.ReLU(), nn.Conv2d(4 * E, E, 1))
        head.adapt_pos3d = nn.Sequential(nn.Conv2d(3 * E // 2, 4 * E, 1), nn.ReLU(), nn.Conv2d(4 * E, E, 1))
        return head
    head.position_encoder = nn.Sequential(nn.Linear(3 * DEPTHS, 4 * E), nn.ReLU(), nn.Linear(4 * E, E))
    head.memory_embed = nn.Sequential(nn.Linear(E, E), nn.ReLU(), nn.Linear(E, E))
    head.spatial_alignment = original_mln(8)
    head.featurized_pe = Holder(
        conv_reduce=nn.Linear(E, E), act1=nn.ReLU(), conv_expand=nn.Linear(E, E), gate=nn.Sigmoid()
    )
    for name in ("match_costs", "pc_range", "position_range", "coords_d"):
        setattr(head, name, nn.Parameter(torch.rand(6), requires_grad=False))
    if kind == "streampetr":
        head.pseudo_reference_points = nn.Embedding(4, 3)
        head.time_embedding = nn.Sequential(nn.Linear(E, E), nn.LayerNorm(E))
        head.ego_pose_pe = original_mln(180)
        head.ego_pose_memory = original_mln(180)
    return head


def original_checkpoint(kind, seed=0):
    torch.manual_seed(seed)
    head = original_head(kind)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    state = {"pts_bbox_head." + k: v for k, v in head.state_dict().items()}
    state["img_backbone.conv1.weight"] = torch.randn(4, 3, 3, 3)
    state["img_neck.lateral_convs.0.conv.weight"] = torch.randn(4, 4, 1, 1)
    return {"meta": {}, "state_dict": state}


def ours(kind):
    if kind == "petr":
        return PETRDecoder(**TINY), PETRPositionEmbedding(E, E, depth_num=DEPTHS)
    position = StreamPETRPositionEmbedding(E, E, depth_num=DEPTHS)
    if kind == "streampetr":
        return StreamPETRDecoder(**TINY, num_propagated=4, memory_len=8, topk_proposals=4), position
    return FocalPETRDecoder(**TINY), position


CONVERT = {
    "petr": convert_petr_state_dict,
    "streampetr": convert_streampetr_state_dict,
    "focalpetr": convert_streampetr_state_dict,
}
TO_ORIGINAL = {
    "petr": to_petr_state_dict,
    "streampetr": to_streampetr_state_dict,
    "focalpetr": to_streampetr_state_dict,
}


@pytest.mark.parametrize("kind", ["petr", "streampetr", "focalpetr"])
def test_original_checkpoint_loads_strictly(kind):
    checkpoint = original_checkpoint(kind)
    decoder, position = ours(kind)
    converted = CONVERT[kind](checkpoint)
    decoder.load_state_dict(converted.decoder, strict=True)
    position.load_state_dict(converted.position, strict=True)
    # Nothing dropped: every original entry went to exactly one place.
    assert len(converted.decoder) + len(converted.position) + len(converted.unused) == len(checkpoint["state_dict"])
    constants = {"code_weights"} | (
        {"match_costs", "pc_range", "position_range", "coords_d"} if kind != "petr" else set()
    )
    expected_unused = {"img_backbone.conv1.weight", "img_neck.lateral_convs.0.conv.weight"}
    assert set(converted.unused) == expected_unused | {"pts_bbox_head." + c for c in constants}
    src = checkpoint["state_dict"]
    assert torch.equal(
        decoder.layers[1].cross_attn.in_proj_weight,
        src["pts_bbox_head.transformer.decoder.layers.1.attentions.1.attn.in_proj_weight"],
    )
    assert torch.equal(
        decoder.layers[0].linear1.weight, src["pts_bbox_head.transformer.decoder.layers.0.ffns.0.layers.0.0.weight"]
    )
    assert torch.equal(decoder.layers[0].norm3.bias, src["pts_bbox_head.transformer.decoder.layers.0.norms.2.bias"])
    assert torch.equal(decoder.final_norm.weight, src["pts_bbox_head.transformer.decoder.post_norm.weight"])
    assert torch.equal(decoder.query_embedding.mlp[2].weight, src["pts_bbox_head.query_embedding.2.weight"])
    assert torch.equal(decoder.cls_branches[1][6].bias, src["pts_bbox_head.cls_branches.1.6.bias"])
    if kind != "petr":
        assert torch.equal(position.featurized_pe.expand.weight, src["pts_bbox_head.featurized_pe.conv_expand.weight"])


@pytest.mark.parametrize("kind", ["petr", "streampetr", "focalpetr"])
def test_round_trip_is_identity(kind):
    decoder, position = ours(kind)
    original = TO_ORIGINAL[kind](decoder.state_dict(), position.state_dict())
    assert all(name.startswith("pts_bbox_head.") for name in original)
    # Our names map onto exactly the published head's names (less its constants).
    published = {k for k in original_checkpoint(kind)["state_dict"] if k.startswith("pts_bbox_head.")}
    assert set(original) == {
        k
        for k in published
        if k.rsplit(".", 1)[-1] not in {"code_weights", "match_costs", "pc_range", "position_range", "coords_d"}
    }
    back = CONVERT[kind](original)
    assert back.unused == {}
    for mine, restored in ((decoder.state_dict(), back.decoder), (position.state_dict(), back.position)):
        assert mine.keys() == restored.keys()
        assert all(torch.equal(mine[k], restored[k]) for k in mine)
    fresh_decoder, fresh_position = ours(kind)
    fresh_decoder.load_state_dict(back.decoder, strict=True)
    fresh_position.load_state_dict(back.position, strict=True)


def test_loaded_checkpoint_runs_the_same_as_the_original_tensors():
    checkpoint = original_checkpoint("petr", seed=3)
    a, _ = ours("petr")
    b, _ = ours("petr")
    load_original_state_dict(a, checkpoint)
    b.load_state_dict(convert_petr_state_dict(checkpoint["state_dict"]).decoder)
    memory, key_pos = torch.randn(1, 20, E), torch.randn(1, 20, E)
    with torch.no_grad():
        assert torch.equal(a.eval()(memory, key_pos).cls_scores, b.eval()(memory, key_pos).cls_scores)


def test_legacy_names_and_bare_head_prefix():
    state = original_checkpoint("petr")["state_dict"]
    legacy = {}
    for k, v in state.items():
        k = k.replace(".attentions.0.", ".self_attn.").replace(".attentions.1.", ".multihead_attn.")
        legacy[k.replace(".decoder.post_norm.", ".decoder.norm.")] = v
    decoder, _ = ours("petr")
    decoder.load_state_dict(convert_petr_state_dict(legacy).decoder, strict=True)
    bare = {k[len("pts_bbox_head.") :]: v for k, v in state.items() if k.startswith("pts_bbox_head.")}
    converted = convert_petr_state_dict(bare, prefix="")
    decoder.load_state_dict(converted.decoder, strict=True)
    assert set(converted.unused) == {"code_weights"}


def test_unknown_names_are_reported():
    converted = convert_petr_state_dict(
        {"pts_bbox_head.something_new.weight": torch.zeros(1), "pts_bbox_head.input_proj.bias": torch.zeros(1)}
    )
    assert converted.decoder == {} and list(converted.unused) == ["pts_bbox_head.something_new.weight"]
    # A state dict of which nothing maps is an error, never an empty conversion.
    with pytest.raises(ValueError, match="no tensor of the 1 .*something_new"):
        convert_petr_state_dict({"pts_bbox_head.something_new.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="no counterpart"):
        to_petr_state_dict({"layers.0.extra.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="no checkpoint mapping"):
        load_original_state_dict(nn.Linear(2, 2), {})


def test_stored_settings_are_compared_on_load():
    checkpoint = original_checkpoint("streampetr", seed=4)  # its pc_range etc. are random numbers
    decoder, position = ours("streampetr")
    with pytest.raises(ValueError, match="'pts_bbox_head.pc_range' = .* differs from StreamPETRDecoder"):
        load_original_state_dict(decoder, checkpoint, position)
    state = dict(checkpoint["state_dict"])
    state["pts_bbox_head.pc_range"] = torch.tensor([-51.2, -51.2, -5.0, 51.2, 51.2, 3.0])
    state["pts_bbox_head.position_range"] = torch.tensor([-61.2, -61.2, -10.0, 61.2, 61.2, 10.0])
    with pytest.raises(ValueError, match="coords_d"):
        load_original_state_dict(decoder, state, position)
    index = torch.arange(DEPTHS).float()
    state["pts_bbox_head.coords_d"] = 1 + (torch.tensor(61.2) - 1) / (DEPTHS * (DEPTHS + 1)) * index * (index + 1)
    load_original_state_dict(decoder, state, position)
