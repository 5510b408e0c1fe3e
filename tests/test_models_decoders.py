"""PETR / FocalPETR decoders: equality with an independent re-implementation, pruning, modes, masks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tggbc import KeyPruner
from tggbc.models import FocalPETRDecoder, PETRDecoder, StreamPETRDecoder, build_decoder, example_inputs

TINY = dict(num_layers=3, embed_dims=32, num_heads=4, ffn_dims=64, num_queries=24)
PC_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)


def randomize(module: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Every parameter random (the hosts' init leaves some at 0/1, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "reference_points" in name:
                p.copy_(torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def tiny(cls, seed=0, **kwargs):
    return randomize(cls(**{**TINY, **kwargs}), seed).eval()


def keys(batch=2, num_keys=40, dims=32, seed=1, padded=None):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(batch, num_keys, dims, generator=g)
    key_pos = torch.randn(batch, num_keys, dims, generator=g)
    mask = None
    if padded is not None:
        mask = torch.zeros(batch, num_keys, dtype=torch.bool)
        for b, n in enumerate(padded):
            if n:
                mask[b, -n:] = True
    return memory, key_pos, mask


# ---- an independent, sequence-first re-implementation written from the hosts' description ----


def posemb3d(pos, num_feats):
    pos = pos * 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
    out = []
    for axis in (1, 0, 2):  # y, x, z
        p = pos[..., axis, None] / dim_t
        out.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(out, dim=-1)


def inv_sigmoid(x, eps=1e-5):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def torch_mha(ours):
    mha = nn.MultiheadAttention(ours.embed_dim, ours.num_heads)  # sequence-first, like the hosts
    mha.load_state_dict(ours.state_dict())
    return mha.eval()


def reference_layers(decoder, tgt, query_pos, memory, key_pos, mask, temp_memory=None, temp_pos=None):
    """[Nq, B, E] inputs (sequence-first); returns [L, B, Nq, E] post-normed outputs."""
    outs = []
    for layer in decoder.layers:
        sa, ca = torch_mha(layer.self_attn), torch_mha(layer.cross_attn)
        if temp_memory is None:
            k_self, pos_self = tgt, query_pos
        else:
            k_self, pos_self = torch.cat([tgt, temp_memory]), torch.cat([query_pos, temp_pos])
        x = sa(tgt + query_pos, k_self + pos_self, k_self)[0]
        tgt = F.layer_norm(tgt + x, (tgt.shape[-1],), layer.norm1.weight, layer.norm1.bias)
        x = ca(tgt + query_pos, memory + key_pos, memory, key_padding_mask=mask)[0]
        tgt = F.layer_norm(tgt + x, (tgt.shape[-1],), layer.norm2.weight, layer.norm2.bias)
        x = F.linear(
            F.relu(F.linear(tgt, layer.linear1.weight, layer.linear1.bias)), layer.linear2.weight, layer.linear2.bias
        )
        tgt = F.layer_norm(tgt + x, (tgt.shape[-1],), layer.norm3.weight, layer.norm3.bias)
        outs.append(decoder.final_norm(tgt))
    return torch.nan_to_num(torch.stack(outs).transpose(1, 2))


def reference_heads(decoder, outs_dec, reference_points, center_slices):
    """The hosts' head loop: branches, centre refinement from the same points, pc_range mapping."""
    pc = torch.tensor(PC_RANGE)
    classes, coords = [], []
    reference = inv_sigmoid(reference_points.clone())
    for lvl in range(outs_dec.shape[0]):
        classes.append(decoder.cls_branches[lvl](outs_dec[lvl]))
        tmp = decoder.reg_branches[lvl](outs_dec[lvl]).clone()
        for (start, stop), (rs, re_) in center_slices:
            tmp[..., start:stop] = (tmp[..., start:stop] + reference[..., rs:re_]).sigmoid()
        coords.append(tmp)
    cls, boxes = torch.stack(classes), torch.stack(coords)
    slots = (0, 1, 4) if center_slices is PETR_CENTERS else (0, 1, 2)
    for axis, slot in enumerate(slots):
        boxes[..., slot] = boxes[..., slot] * (pc[axis + 3] - pc[axis]) + pc[axis]
    return cls, boxes


PETR_CENTERS = [((0, 2), (0, 2)), ((4, 5), (2, 3))]  # PETR: cx, cy at 0:2, cz at 4
STREAM_CENTERS = [((0, 3), (0, 3))]  # StreamPETR / FocalPETR: cx, cy, cz at 0:3


def reference_petr(decoder, memory, key_pos, mask, centers):
    batch = memory.shape[0]
    ref = decoder.reference_points.weight
    query_embeds = decoder.query_embedding.mlp(posemb3d(ref, decoder.embed_dims // 2))
    query_pos = query_embeds.unsqueeze(1).repeat(1, batch, 1)  # (Nq, B, E)
    outs = reference_layers(
        decoder, torch.zeros_like(query_pos), query_pos, memory.transpose(0, 1), key_pos.transpose(0, 1), mask
    )
    return (outs, *reference_heads(decoder, outs, ref.unsqueeze(0).repeat(batch, 1, 1), centers))


@pytest.mark.parametrize("cls, centers", [(PETRDecoder, PETR_CENTERS), (FocalPETRDecoder, STREAM_CENTERS)])
@pytest.mark.parametrize("padded", [None, (0, 7)])
def test_dense_decoder_equals_reference(cls, centers, padded):
    decoder = tiny(cls)
    memory, key_pos, mask = keys(padded=padded)
    with torch.no_grad():
        out = decoder(memory, key_pos, mask)
        hidden, cls_scores, bbox_preds = reference_petr(decoder, memory, key_pos, mask, centers)
    torch.testing.assert_close(out.hidden_states, hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_scores, cls_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.bbox_preds, bbox_preds, atol=1e-4, rtol=1e-5)
    assert out.keys_per_layer == [40, 40, 40] and out.kept is None and out.state is None


@pytest.mark.parametrize("kind", ["petr", "focalpetr", "streampetr"])
def test_pruner_none_or_disabled_is_exactly_dense(kind):
    kwargs = dict(num_propagated=8, memory_len=24, topk_proposals=8) if kind == "streampetr" else {}
    decoder = randomize(build_decoder(kind, **TINY, **kwargs)).eval()
    inputs = example_inputs(decoder, 40, batch=2, padded_fraction=0.1)
    with torch.no_grad():
        dense = decoder(**inputs)
        for pruner in (KeyPruner(r=20, n=2, enabled=False), KeyPruner(r=0)):
            decoder.pruner = pruner
            out = decoder(**inputs)
            assert torch.equal(out.cls_scores, dense.cls_scores)
            assert torch.equal(out.bbox_preds, dense.bbox_preds)
            assert out.keys_per_layer == [40, 40, 40]
            # "reference" runs every cross-attention unfused (explicit weights): same maths,
            # other summation order.
            decoder.attention = "reference"
            out = decoder(**inputs)
            decoder.attention = "fast"
            torch.testing.assert_close(out.cls_scores, dense.cls_scores, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.bbox_preds, dense.bbox_preds, rtol=1e-4, atol=1e-5)
            assert out.keys_per_layer == [40, 40, 40]


@pytest.mark.parametrize("kind", ["petr", "focalpetr", "streampetr"])
def test_pruned_shapes_and_keys_per_layer(kind):
    kwargs = dict(num_propagated=8, memory_len=24, topk_proposals=8) if kind == "streampetr" else {}
    decoder = randomize(build_decoder(kind, **TINY, **kwargs)).eval()
    inputs = example_inputs(decoder, 40, batch=2)
    with torch.no_grad():
        dense = decoder(**inputs)
        decoder.pruner = KeyPruner(r=21, n=2, k=5)  # p = 10: layers drop [10, 11, 0]
        out = decoder(**inputs, track_keys=True)
    assert out.keys_per_layer == [40, 30, 19]
    assert out.cls_scores.shape == dense.cls_scores.shape
    assert out.bbox_preds.shape == dense.bbox_preds.shape
    assert out.hidden_states.shape == dense.hidden_states.shape
    # The first layer sees every key, so its prediction is unchanged; later ones differ.
    torch.testing.assert_close(out.cls_scores[0], dense.cls_scores[0])
    assert not torch.allclose(out.cls_scores[-1], dense.cls_scores[-1])
    assert [tuple(k.shape) for k in out.kept] == [(2, 40), (2, 30), (2, 19)]
    assert torch.equal(out.kept[0], torch.arange(40).expand(2, -1))
    for before, after in zip(out.kept, out.kept[1:], strict=False):  # nested, no duplicates
        for b in range(2):
            assert set(after[b].tolist()) <= set(before[b].tolist())
            assert len(set(after[b].tolist())) == after.shape[1]


@pytest.mark.parametrize("kind", ["petr", "focalpetr", "streampetr"])
@pytest.mark.parametrize("k", [-1, 6])
def test_fast_and_reference_modes_agree(kind, k):
    kwargs = dict(num_propagated=8, memory_len=24, topk_proposals=8) if kind == "streampetr" else {}
    decoder = randomize(build_decoder(kind, **TINY, **kwargs), seed=3).eval()
    inputs = example_inputs(decoder, 48, batch=2, padded_fraction=0.1, seed=4)
    with torch.no_grad():
        outs = {}
        for attention in ("fast", "reference"):
            decoder.pruner, decoder.attention = None, attention
            dense = decoder(**inputs)
            decoder.pruner = KeyPruner(r=[12, 10, 0], k=k)
            outs[attention] = (dense, decoder(**inputs, track_keys=True))
    (dense_fast, fast), (dense_ref, ref) = outs["fast"], outs["reference"]
    torch.testing.assert_close(dense_fast.cls_scores, dense_ref.cls_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_fast.bbox_preds, dense_ref.bbox_preds, atol=1e-4, rtol=1e-5)
    for a, b in zip(fast.kept, ref.kept, strict=True):
        assert torch.equal(a.sort(dim=1).values, b.sort(dim=1).values)
    torch.testing.assert_close(fast.cls_scores, ref.cls_scores, atol=1e-5, rtol=1e-5)


def test_reference_mode_hands_the_pruner_weights_and_fast_mode_rows():
    seen = []

    class Spy(KeyPruner):
        def step(self, layer, cls_logits, attn, *args, **kwargs):
            seen.append((layer, type(attn).__name__, getattr(attn, "shape", None)))
            return super().step(layer, cls_logits, attn, *args, **kwargs)

    decoder = tiny(PETRDecoder, pruner=Spy(r=[5, 0, 0]))
    memory, key_pos, _ = keys()
    with torch.no_grad():
        decoder(memory, key_pos)
        decoder.attention = "reference"
        decoder(memory, key_pos)
    # Only the pruning layer asks for attention: rows in fast mode, the full map in reference mode.
    assert seen == [(0, "AttentionRows", (2, 24, 40)), (0, "Tensor", torch.Size([2, 24, 40]))]


@pytest.mark.parametrize("kind", ["petr", "focalpetr"])
def test_padded_keys_go_first(kind):
    decoder = randomize(build_decoder(kind, **TINY), seed=5).eval()
    memory, key_pos, mask = keys(num_keys=40, padded=(0, 12), seed=6)
    with torch.no_grad():
        dense = decoder(memory, key_pos, mask)
        # Dropping only padded keys changes nothing (sample 1 has 12; sample 0 none, so it does drop).
        decoder.pruner = KeyPruner(r=[8, 0, 0])
        out = decoder(memory, key_pos, mask, track_keys=True)
        torch.testing.assert_close(out.cls_scores[:, 1], dense.cls_scores[:, 1], atol=1e-5, rtol=1e-5)
        assert not mask[1, out.kept[1][1]].all() and mask[1, out.kept[1][1]].sum() == 4
        # Dropping more than the padding: no padded key survives while a valid one is dropped.
        decoder.pruner = KeyPruner(r=[10, 10, 0], k=5)
        out = decoder(memory, key_pos, mask, track_keys=True)
    for kept in out.kept:
        for b in range(2):
            valid_kept = int((~mask[b, kept[b]]).sum())
            padded_kept = int(mask[b, kept[b]].sum())
            assert valid_kept == int((~mask[b]).sum()) or padded_kept == 0
    assert not mask[1, out.kept[2][1]].any()


def test_attention_setting_is_validated():
    with pytest.raises(ValueError, match="attention must be one of"):
        PETRDecoder(**TINY, attention="flash")
    decoder = tiny(PETRDecoder)
    decoder.attention = "unfused"
    memory, key_pos, _ = keys()
    with pytest.raises(ValueError, match="attention must be one of"):
        decoder(memory, key_pos)
    with pytest.raises(ValueError, match="batch_first"):
        PETRDecoder(**TINY, pruner=KeyPruner(r=5, batch_first=False))
    with pytest.raises(TypeError, match="KeyPruner"):
        PETRDecoder(**TINY, pruner="r=5")


def test_bad_inputs_raise():
    decoder = tiny(PETRDecoder)
    memory, key_pos, _ = keys()
    with pytest.raises(ValueError, match="memory must be"):
        decoder(memory[..., :16], key_pos[..., :16])
    with pytest.raises(ValueError, match="key_pos must"):
        decoder(memory, key_pos[:, :10])
    with pytest.raises(ValueError, match="key_padding_mask"):
        decoder(memory, key_pos, torch.zeros(2, 40))
    decoder.pruner = KeyPruner(r=40)
    with pytest.raises(ValueError, match="at least one key"):
        decoder(memory, key_pos)


def test_per_sample_queries():
    """Two-stage use: the learned anchors and zero targets passed explicitly change nothing; other
    anchors change the output; bad shapes are refused."""
    decoder = randomize(PETRDecoder(**TINY, pruner=KeyPruner(r=[10, 10, 0], k=4))).eval()
    memory, key_pos, _ = keys()
    batch, num_queries = memory.shape[0], TINY["num_queries"]
    anchors = decoder.reference_points.weight.detach().expand(batch, -1, -1)
    with torch.no_grad():
        default = decoder(memory, key_pos)
        explicit = decoder(memory, key_pos, query=torch.zeros(batch, num_queries, 32), reference_points=anchors)
        moved = decoder(memory, key_pos, reference_points=anchors.flip(1))
        fewer = decoder(memory, key_pos, query=torch.randn(batch, 3, 32), reference_points=anchors[:, :3])
    torch.testing.assert_close(explicit.cls_scores, default.cls_scores, rtol=0, atol=0)
    torch.testing.assert_close(explicit.bbox_preds, default.bbox_preds, rtol=0, atol=0)
    assert not torch.allclose(moved.bbox_preds, default.bbox_preds)
    assert fewer.cls_scores.shape[2] == 3
    with pytest.raises(ValueError, match="reference_points must be"):
        decoder(memory, key_pos, reference_points=anchors[0])
    with pytest.raises(ValueError, match="query must be"):
        decoder(memory, key_pos, query=torch.zeros(batch, num_queries, 16), reference_points=anchors)


def test_gradients_flow_through_pruned_decoder():
    decoder = randomize(PETRDecoder(**TINY, pruner=KeyPruner(r=[10, 10, 0], k=4)))
    memory, key_pos, _ = keys()
    memory.requires_grad_(True)
    out = decoder(memory, key_pos)
    (out.cls_scores.sum() + out.bbox_preds.sum()).backward()
    assert memory.grad is not None and torch.isfinite(memory.grad).all()
    assert decoder.layers[-1].cross_attn.in_proj_weight.grad is not None


@pytest.mark.parametrize("kind", ["petr", "streampetr", "focalpetr"])
def test_default_sizes_with_few_keys(kind):
    torch.manual_seed(0)
    decoder = build_decoder(kind).eval()
    assert len(decoder.layers) == 6 and decoder.embed_dims == 256
    inputs = example_inputs(decoder, 64)
    with torch.inference_mode():
        dense = decoder(**inputs)
        decoder.pruner = KeyPruner(r=40, n=2, k=175)
        out = decoder(**inputs)
    assert dense.cls_scores.shape == (6, 1, 900, 10) and dense.bbox_preds.shape == (6, 1, 900, 10)
    assert dense.reference_points.shape == (1, 900, 3)
    assert dense.keys_per_layer == [64] * 6 and out.keys_per_layer == [64, 44, 24, 24, 24, 24]
    assert torch.isfinite(out.bbox_preds).all()
    if kind == "streampetr":
        assert out.state.embedding.shape == (1, 1024, 256)
        # 900 queries attend over themselves and the 768 memory entries not turned into queries.
        assert (
            decoder.num_queries + decoder.num_propagated == 900 and decoder.memory_len - decoder.num_propagated == 768
        )
    else:
        assert out.state is None


@pytest.mark.parametrize("kind", ["petr", "streampetr"])
def test_bfloat16_runs(kind):
    kwargs = dict(num_propagated=8, memory_len=24, topk_proposals=8) if kind == "streampetr" else {}
    decoder = build_decoder(kind, **TINY, **kwargs).to(torch.bfloat16).eval()
    inputs = example_inputs(decoder, 40, batch=2, dtype=torch.bfloat16)
    decoder.pruner = KeyPruner(r=[10, 10, 0], k=5)
    with torch.inference_mode():
        out = decoder(**inputs)
    assert out.cls_scores.dtype == torch.bfloat16 and out.keys_per_layer == [40, 30, 20]
    assert torch.isfinite(out.bbox_preds.float()).all()


# ---- StreamPETR: the reference keeps its memory bank in the head; replay three frames ----


def nerf(x, num_freqs=6):
    out = []
    for f in 2.0 ** torch.linspace(0.0, num_freqs - 1, num_freqs):
        out += [torch.sin(x * f), torch.cos(x * f)]
    return torch.cat(out, dim=-1)


def posemb1d(pos, num_feats):
    pos = pos * 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
    p = pos[..., 0, None] / dim_t
    return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)


def mln(module, x, code):
    c = F.relu(F.linear(code, module.reduce[0].weight, module.reduce[0].bias))
    gamma = F.linear(c, module.gamma.weight, module.gamma.bias)
    beta = F.linear(c, module.beta.weight, module.beta.bias)
    return gamma * F.layer_norm(x, (x.shape[-1],)) + beta


def transform(points, matrix):
    points = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    return (matrix.unsqueeze(1) @ points.unsqueeze(-1)).squeeze(-1)[..., :3]


def egopose_inverse(pose):
    """The published data pipeline's invert_matrix_egopose_numpy (R^T, -R^T t) per sample, from a float64 pose.

    The inverse of a pose near (600, 1600) m is sensitive: a float32 LU inverse moves the outputs
    by 1e-2, and even float32 rounding of -R^T t (1 ulp = 1.2e-4 m) moves hidden states by 3e-4.
    """
    inverse = torch.zeros_like(pose, dtype=torch.float64)
    rotation, translation = pose[:, :3, :3].double(), pose[:, :3, 3].double()
    inverse[:, :3, :3] = rotation.transpose(1, 2)
    inverse[:, :3, 3] = -(rotation.transpose(1, 2) @ translation[..., None])[..., 0]
    inverse[:, 3, 3] = 1.0
    return inverse.float()


class ReferenceStreamHead:
    """The reference's memory bank handling around the decoder, sequence-first."""

    def __init__(self, decoder):
        self.d = decoder
        self.embedding = None

    def pre_update(self, prev_exists, timestamp, ego_pose_inv):
        d, x = self.d, prev_exists
        b, m, e = x.shape[0], d.memory_len, d.embed_dims
        if self.embedding is None:
            self.embedding, self.reference = torch.zeros(b, m, e), torch.zeros(b, m, 3)
            self.timestamp, self.egopose = torch.zeros(b, m, 1, dtype=torch.float64), torch.zeros(b, m, 4, 4)
            self.velo = torch.zeros(b, m, 2)
        else:
            self.timestamp = self.timestamp + timestamp[:, None, None]
            self.egopose = ego_pose_inv.unsqueeze(1) @ self.egopose
            self.reference = transform(self.reference, ego_pose_inv)
            self.timestamp = self.timestamp[:, :m] * x.view(b, 1, 1)
            self.reference = self.reference[:, :m] * x.view(b, 1, 1)
            self.embedding = self.embedding[:, :m] * x.view(b, 1, 1)
            self.egopose = self.egopose[:, :m] * x.view(b, 1, 1, 1)
            self.velo = self.velo[:, :m] * x.view(b, 1, 1)
        pc, p = torch.tensor(PC_RANGE), d.num_propagated
        pseudo = d.pseudo_reference_points.weight * (pc[3:] - pc[:3]) + pc[:3]
        self.reference[:, :p] = self.reference[:, :p] + (1 - x).view(b, 1, 1) * pseudo
        self.egopose[:, :p] = self.egopose[:, :p] + (1 - x).view(b, 1, 1, 1) * torch.eye(4)

    def __call__(self, memory, key_pos, ego_pose, timestamp, prev_exists):
        d, b = self.d, memory.shape[0]
        self.pre_update(prev_exists, timestamp, egopose_inverse(ego_pose))
        pc, p, half = torch.tensor(PC_RANGE), d.num_propagated, d.embed_dims // 2
        reference = d.reference_points.weight.unsqueeze(0).repeat(b, 1, 1)
        query_pos = d.query_embedding.mlp(posemb3d(reference, half))
        tgt = torch.zeros_like(query_pos)
        temp_reference = (self.reference - pc[:3]) / (pc[3:] - pc[:3])
        temp_pos = d.query_embedding.mlp(posemb3d(temp_reference, half))
        rec_pose = torch.eye(4).repeat(b, reference.shape[1], 1, 1)
        rec_motion = nerf(torch.cat([torch.zeros_like(reference), rec_pose[..., :3, :].flatten(-2)], dim=-1))
        tgt = mln(d.ego_pose_memory, tgt, rec_motion)
        query_pos = mln(d.ego_pose_pe, query_pos, rec_motion)
        memory_motion = torch.cat([self.velo, self.timestamp, self.egopose[..., :3, :].flatten(-2)], dim=-1).float()
        memory_motion = nerf(memory_motion)
        temp_pos = mln(d.ego_pose_pe, temp_pos, memory_motion)
        temp_memory = mln(d.ego_pose_memory, self.embedding, memory_motion)
        query_pos = query_pos + d.time_embedding(posemb1d(torch.zeros_like(reference[..., :1]), d.embed_dims))
        temp_pos = temp_pos + d.time_embedding(posemb1d(self.timestamp, d.embed_dims).float())
        tgt = torch.cat([tgt, temp_memory[:, :p]], dim=1)
        query_pos = torch.cat([query_pos, temp_pos[:, :p]], dim=1)
        reference = torch.cat([reference, temp_reference[:, :p]], dim=1)
        temp_memory, temp_pos = temp_memory[:, p:], temp_pos[:, p:]
        seq = lambda t: t.transpose(0, 1)  # noqa: E731
        outs = reference_layers(
            d, seq(tgt), seq(query_pos), seq(memory), seq(key_pos), None, seq(temp_memory), seq(temp_pos)
        )
        cls_scores, bbox_preds = reference_heads(d, outs, reference, STREAM_CENTERS)
        # post_update_memory
        score = cls_scores[-1].sigmoid().topk(1, dim=-1).values[..., 0:1]
        index = torch.topk(score, d.topk_proposals, dim=1).indices  # (B, K, 1)
        take = lambda t: torch.gather(t, 1, index.repeat(1, 1, *t.shape[2:]))  # noqa: E731
        rec_pose = torch.eye(4).repeat(b, reference.shape[1], 1, 1)
        pose_index = index[..., None].repeat(1, 1, 4, 4)
        self.embedding = torch.cat([take(outs[-1]), self.embedding], dim=1)
        self.timestamp = torch.cat([take(torch.zeros_like(score, dtype=torch.float64)), self.timestamp], dim=1)
        self.egopose = torch.cat([torch.gather(rec_pose, 1, pose_index), self.egopose], dim=1)
        self.reference = torch.cat([take(bbox_preds[-1][..., :3]), self.reference], dim=1)
        self.velo = torch.cat([take(bbox_preds[-1][..., -2:]), self.velo], dim=1)
        self.reference = transform(self.reference, ego_pose)
        self.timestamp = self.timestamp - timestamp[:, None, None]
        self.egopose = ego_pose.unsqueeze(1) @ self.egopose
        return outs, cls_scores, bbox_preds


def ego_pose(batch, frame):
    g = torch.Generator().manual_seed(100 + frame)
    yaw = torch.rand(batch, generator=g) * 2 * math.pi
    pose = torch.eye(4).repeat(batch, 1, 1)
    pose[:, 0, 0], pose[:, 0, 1], pose[:, 1, 0], pose[:, 1, 1] = yaw.cos(), -yaw.sin(), yaw.sin(), yaw.cos()
    pose[:, :3, 3] = torch.randn(batch, 3, generator=g) * 20 + torch.tensor([600.0, 1600.0, 0.0])
    return pose


def test_streampetr_equals_reference_over_frames():
    decoder = tiny(StreamPETRDecoder, num_propagated=8, memory_len=24, topk_proposals=8, seed=7)
    reference = ReferenceStreamHead(decoder)
    state, batch = None, 2
    with torch.no_grad():
        for frame, prev in enumerate([(0.0, 0.0), (1.0, 1.0), (1.0, 0.0)]):
            memory, key_pos, _ = keys(batch, 40, seed=20 + frame)
            pose = ego_pose(batch, frame)
            timestamp = torch.tensor([1.5e9 + 0.5 * frame, 1.6e9 + 0.5 * frame], dtype=torch.float64)
            prev_exists = torch.tensor(prev)
            # Frame 0: no state (a new scene); later frames pass prev_exists explicitly.
            out = decoder(
                memory,
                key_pos,
                state=state,
                ego_pose=pose,
                timestamp=timestamp,
                prev_exists=None if frame == 0 else prev_exists,
            )
            hidden, cls_scores, bbox_preds = reference(memory, key_pos, pose, timestamp, prev_exists)
            torch.testing.assert_close(out.hidden_states, hidden, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out.cls_scores, cls_scores, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out.bbox_preds, bbox_preds, atol=1e-3, rtol=1e-4)
            state, m = out.state, decoder.memory_len
            torch.testing.assert_close(state.embedding, reference.embedding[:, :m], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(state.reference_points, reference.reference[:, :m], atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(state.velocity, reference.velo[:, :m], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(state.ego_pose, reference.egopose[:, :m], atol=1e-3, rtol=1e-5)
            assert state.timestamp.dtype == torch.float64
            torch.testing.assert_close(state.timestamp, reference.timestamp[:, :m])
