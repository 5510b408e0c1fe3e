"""The controls: key merging (hand-checked cases and proportional attention) and random scores."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tggbc import KeyPruner, MultiheadAttention
from tggbc.baselines import merge_keys, random_importance


def test_merge_pairs_the_most_similar_keys_and_averages_by_size():
    # A = keys 0, 2; B = keys 1, 3. Key 2 is a copy of key 3 (cosine 1): it merges first.
    key = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [1.0, 1.0]]])
    merged, _, value, size = merge_keys(key, None, key, 1)
    assert value is merged  # value is key: merged once
    # Kept A keys first (key 0), then B keys (1, and 3 absorbing 2 with sizes 1 + 1).
    assert torch.allclose(merged[0], torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]))
    assert torch.equal(size[0], torch.tensor([1.0, 1.0, 2.0]))
    # With sizes, the average weighs them: 3 copies of (3, 3) and 1 of (1, 1) -> (2.5, 2.5).
    merged, _, _, size = merge_keys(key, None, None, 1, size=torch.tensor([[1.0, 1.0, 3.0, 1.0]]))
    assert torch.allclose(merged[0, 2], torch.tensor([2.5, 2.5])) and size[0, 2] == 4


@settings(deadline=None, max_examples=25)
@given(st.integers(1, 30), st.integers(0, 3))
def test_merge_keeps_the_count_and_the_total_size(r, seed):
    g = torch.Generator().manual_seed(seed)
    key, key_pos = torch.randn(2, 31, 8, generator=g), torch.randn(2, 31, 8, generator=g)
    merged, pos, _, size = merge_keys(key, key_pos, None, r)
    assert merged.shape == (2, 31 - r, 8) and pos.shape == merged.shape
    assert torch.allclose(size.sum(1), torch.full((2,), 31.0))
    # Sizes weigh every original key once: the size-weighted sum is preserved.
    assert torch.allclose((merged * size[..., None]).sum(1), key.sum(1), atol=1e-4)


def test_proportional_attention_over_merged_duplicates_equals_the_original():
    """ToMe's invariant: n identical keys merged into one with bias log(n) attract exactly the
    attention the n copies did, so the output does not change."""
    torch.manual_seed(0)
    attn = MultiheadAttention(16, 2, batch_first=True).eval()
    query = torch.randn(1, 5, 16)
    distinct = torch.randn(1, 6, 16)
    # Keys 0/1, 2/3, 4/5 are copies across the two sets of the bipartite split (even / odd).
    key = distinct[:, [0, 0, 1, 1, 2, 2, 3, 4, 5]]
    pruner = KeyPruner(r=3, method="merge")
    pruner.reset(9, 2)
    out = pruner.step(0, torch.randn(1, 5, 3), torch.rand(1, 5, 9), key, key, None, None)
    assert out.key.shape == (1, 6, 16) and sorted(out.key_padding_mask.exp().round().tolist()[0]) == [1, 1, 1, 2, 2, 2]
    merged_out, _ = attn(query, out.key, out.key, key_padding_mask=out.key_padding_mask)
    original_out, _ = attn(query, key, key)
    torch.testing.assert_close(merged_out, original_out, rtol=1e-5, atol=1e-5)
    # Without the bias the merged keys would draw too little attention.
    unbiased, _ = attn(query, out.key, out.key)
    assert not torch.allclose(unbiased, original_out, atol=1e-3)


def test_merge_refuses_padding_and_tracing():
    pruner = KeyPruner(r=2, method="merge")
    pruner.reset(6, 2)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, -1] = True
    with pytest.raises(ValueError, match="cannot merge padded keys"):
        pruner.step(0, torch.randn(1, 3, 2), torch.rand(1, 3, 6), torch.randn(1, 6, 4), None, None, mask)
    with pytest.raises(ValueError, match="cannot be traced"):
        KeyPruner(r=2, method="merge", traceable=True)
    with pytest.raises(ValueError, match="r=6 of Nk=6"):
        merge_keys(torch.randn(1, 6, 4), None, None, 6)


def test_random_importance_is_seeded_and_device_independent():
    a = random_importance(2, 50, torch.Generator().manual_seed(3))
    b = random_importance(2, 50, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 50) and ((a >= 0) & (a < 1)).all()
