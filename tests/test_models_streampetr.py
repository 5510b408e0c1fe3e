"""StreamPETR's explicit temporal state: memory update, fixed shapes across frames, scene resets."""

import pytest
import torch

from tggbc import KeyPruner
from tggbc.models import StreamPETRDecoder, TemporalState
from tggbc.models.streampetr import transform_points

SMALL = dict(num_layers=2, embed_dims=32, num_heads=4, ffn_dims=64)


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(
                torch.rand(p.shape, generator=g)
                if "reference_points" in name
                else torch.randn(p.shape, generator=g) * 0.3
            )
    return module.eval()


def frame(batch, num_keys, dims, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_keys, dims, generator=g), torch.randn(batch, num_keys, dims, generator=g)


def test_memory_update_pushes_top256_by_score():
    # Published sizes for queries and memory (644 + 256 queries, 1024 entries, top 256); small E.
    decoder = randomize(StreamPETRDecoder(**SMALL))
    assert (decoder.num_queries, decoder.num_propagated, decoder.memory_len, decoder.topk_proposals) == (
        644,
        256,
        1024,
        256,
    )
    state = TemporalState.random(2, 1024, 32, seed=1)
    memory, key_pos = frame(2, 30, 32, seed=2)
    with torch.no_grad():
        out = decoder(memory, key_pos, state=state, timestamp=torch.tensor([0.5, 0.5], dtype=torch.float64))
    new = out.state
    score = out.cls_scores[-1].sigmoid().amax(dim=-1)  # (B, 900)
    index = score.topk(256, dim=1).indices  # best first
    take = lambda x: x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
    assert out.cls_scores.shape[2] == 900
    torch.testing.assert_close(new.embedding[:, :256], take(out.hidden_states[-1]))
    torch.testing.assert_close(new.reference_points[:, :256], take(out.bbox_preds[-1][..., :3]))
    torch.testing.assert_close(new.velocity[:, :256], take(out.bbox_preds[-1][..., 8:10]))
    assert torch.equal(new.ego_pose[:, :256], torch.eye(4).expand(2, 256, 4, 4))
    assert torch.equal(new.timestamp[:, :256], torch.full((2, 256, 1), -0.5, dtype=torch.float64))
    for b in range(2):  # every pushed query scores at least as high as every other one
        pushed = torch.zeros(900, dtype=torch.bool)
        pushed[index[b]] = True
        assert score[b, pushed].min() >= score[b, ~pushed].max()
    # The older entries move back by 256 (identity pose: unchanged); the last 256 fall out.
    torch.testing.assert_close(new.embedding[:, 256:], state.embedding[:, :768])
    torch.testing.assert_close(new.reference_points[:, 256:], state.reference_points[:, :768])
    torch.testing.assert_close(new.timestamp[:, 256:], state.timestamp[:, :768])
    torch.testing.assert_close(new.velocity[:, 256:], state.velocity[:, :768])


def test_state_shapes_stay_fixed_across_frames():
    decoder = randomize(StreamPETRDecoder(**SMALL, num_queries=20, num_propagated=6, memory_len=16, topk_proposals=5))
    decoder.pruner = KeyPruner(r=[10, 0], k=4)
    state = None
    for t in range(4):
        memory, key_pos = frame(2, 40, 32, seed=10 + t)
        pose = torch.eye(4).repeat(2, 1, 1)
        pose[:, 0, 3] = 2.0 * t  # driving forward
        with torch.no_grad():
            out = decoder(memory, key_pos, state=state, ego_pose=pose, timestamp=torch.full((2,), 0.5 * t))
        state = out.state
        assert out.keys_per_layer == [40, 30] and out.cls_scores.shape == (2, 2, 26, 10)
        assert state.embedding.shape == (2, 16, 32) and state.reference_points.shape == (2, 16, 3)
        assert state.timestamp.shape == (2, 16, 1) and state.timestamp.dtype == torch.float64
        assert state.ego_pose.shape == (2, 16, 4, 4) and state.velocity.shape == (2, 16, 2)
        # Entries written at frame t carry minus that frame's time.
        assert torch.equal(state.timestamp[:, :5], torch.full((2, 5, 1), -0.5 * t, dtype=torch.float64))


def test_new_scene_sample_equals_a_fresh_start():
    decoder = randomize(StreamPETRDecoder(**SMALL, num_queries=20, num_propagated=6, memory_len=16, topk_proposals=6))
    state = TemporalState.random(2, 16, 32, seed=4)
    memory, key_pos = frame(2, 30, 32, seed=5)
    with torch.no_grad():
        mixed = decoder(memory, key_pos, state=state, prev_exists=torch.tensor([1.0, 0.0]))
        fresh = decoder(memory[1:], key_pos[1:], state=None)
        cont = decoder(
            memory[:1], key_pos[:1], state=TemporalState(*(getattr(state, f)[:1] for f in state.__dataclass_fields__))
        )
    torch.testing.assert_close(mixed.cls_scores[:, 1], fresh.cls_scores[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed.cls_scores[:, 0], cont.cls_scores[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed.state.embedding[1], fresh.state.embedding[0], atol=1e-5, rtol=1e-5)
    # The propagated queries of a fresh scene start from the fixed pseudo reference points.
    pc = decoder.pc_range
    pseudo = decoder.pseudo_reference_points.weight
    torch.testing.assert_close(fresh.reference_points[0, 20:], pseudo.clamp(0, 1), atol=1e-6, rtol=1e-6)
    assert not decoder.pseudo_reference_points.weight.requires_grad and pc.shape == (6,)


def test_memory_is_carried_in_the_global_frame():
    decoder = randomize(StreamPETRDecoder(**SMALL, num_queries=12, num_propagated=4, memory_len=8, topk_proposals=4))
    pose = torch.eye(4).repeat(1, 1, 1)
    pose[0, :3, 3] = torch.tensor([100.0, -50.0, 1.0])
    memory, key_pos = frame(1, 20, 32, seed=6)
    with torch.no_grad():
        out = decoder(memory, key_pos, ego_pose=pose)
    index = out.cls_scores[-1].sigmoid().amax(-1).topk(4, dim=1).indices
    local = out.bbox_preds[-1][..., :3].gather(1, index.unsqueeze(-1).expand(-1, -1, 3))
    torch.testing.assert_close(out.state.reference_points[:, :4], local + pose[:, :3, 3].unsqueeze(1))
    torch.testing.assert_close(
        transform_points(out.state.reference_points, torch.linalg.inv(pose))[:, :4], local, atol=1e-4, rtol=1e-5
    )


def test_state_helpers_and_validation():
    empty = TemporalState.empty(3, 10, 8)
    assert empty.batch_size == 3 and empty.memory_len == 10 and empty.timestamp.dtype == torch.float64
    random = TemporalState.random(3, 10, 8, dtype=torch.bfloat16, seed=2)
    assert random.embedding.dtype == torch.bfloat16 and random.reference_points.dtype == torch.float32
    assert (random.timestamp > 0).all()  # entries from the past: positive ages at time 0
    assert torch.equal(TemporalState.random(3, 10, 8, seed=2).velocity, random.velocity)
    assert random.detach().to("cpu").embedding.shape == (3, 10, 8)
    decoder = StreamPETRDecoder(**SMALL, num_queries=12, num_propagated=4, memory_len=8, topk_proposals=4)
    memory, key_pos = frame(3, 20, 32, seed=7)
    with pytest.raises(ValueError, match=r"state.embedding must have shape \(3, 8, 32\)"):
        decoder(memory, key_pos, state=TemporalState.empty(3, 10, 32))
    with pytest.raises(ValueError, match="ego_pose"):
        decoder(memory, key_pos, ego_pose=torch.eye(4))
    with pytest.raises(ValueError, match="timestamp"):
        decoder(memory, key_pos, timestamp=torch.zeros(2))
    with pytest.raises(ValueError, match="topk_proposals"):
        StreamPETRDecoder(**SMALL, num_queries=2, num_propagated=1, memory_len=8, topk_proposals=4)
