"""KeyPruner in a small decoder loop: fast rows vs explicit weights, layouts, masks, no-ops."""

import pytest
import torch
from torch import nn

from tggbc import KeyPruner, MultiheadAttention, key_importance, select_keys

E, H, C = 16, 2, 3


class TinyDecoder(nn.Module):
    """Cross-attention-only decoder: enough to drive KeyPruner the way the hosts do."""

    def __init__(self, num_layers=3):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.ModuleList(MultiheadAttention(E, H, batch_first=True) for _ in range(num_layers))
        self.cls = nn.ModuleList(nn.Linear(E, C) for _ in range(num_layers))

    def forward(self, query, memory, key_pos, mask, pruner, mode):
        pruner.reset(memory.shape[1], len(self.attn), track=True)
        seen = []
        for layer, (attn, cls) in enumerate(zip(self.attn, self.cls, strict=True)):
            seen.append(memory.shape[1])
            out, weights = attn(
                query,
                memory + key_pos,
                memory,
                key_padding_mask=mask,
                need_weights=mode == "reference",
                return_rows=mode == "fast",
            )
            query = query + out
            memory, _, key_pos, mask, _ = pruner.step(layer, cls(query), weights, memory, memory, key_pos, mask)
        return query, seen


def data(batch=2, nq=12, nk=60, seed=0, padded=True):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, nq, E, generator=g)
    memory = torch.randn(batch, nk, E, generator=g)
    key_pos = torch.randn(batch, nk, E, generator=g)
    mask = (torch.rand(batch, nk, generator=g) < 0.2) if padded else None
    return query, memory, key_pos, mask


@pytest.mark.parametrize("k", [-1, 4])
def test_fast_and_reference_keep_the_same_keys(k):
    dec = TinyDecoder().eval()
    q, m, p, mask = data()
    fast = KeyPruner(r=[20, 10, 5], k=k)
    ref = KeyPruner(r=[20, 10, 5], k=k)
    out_f, seen_f = dec(q, m, p, mask, fast, "fast")
    out_r, seen_r = dec(q, m, p, mask, ref, "reference")
    assert seen_f == seen_r == [60, 40, 30]  # the last layer's 5 are never dropped: no later layer
    assert len(fast.kept) == len(ref.kept) == 2
    for a, b in zip(fast.kept, ref.kept, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)


def test_first_layer_matches_the_core_functions():
    """The pruner's first pruning step equals key_importance + select_keys on the full map."""
    dec = TinyDecoder(num_layers=2).eval()
    q, m, p, mask = data(padded=False)
    pruner = KeyPruner(r=25, n=1, k=5)
    dec(q, m, p, None, pruner, "fast")
    out, w = dec.attn[0](q, m + p, m, need_weights=True)
    expected = select_keys(key_importance(dec.cls[0](q + out), w, k=5), 25)
    assert torch.equal(pruner.kept[0], expected)


def test_disabled_or_zero_is_a_no_op():
    dec = TinyDecoder().eval()
    q, m, p, mask = data()
    out_dense, seen = dec(q, m, p, mask, KeyPruner(r=0), "fast")
    out_off, seen_off = dec(q, m, p, mask, KeyPruner(r=30, enabled=False), "fast")
    assert seen == seen_off == [60, 60, 60]
    assert torch.equal(out_dense, out_off)
    key = torch.randn(1, 5, E)
    pruner = KeyPruner(r=0)
    pruner.reset(5, 3)
    result = pruner.step(0, torch.randn(1, 4, C), torch.rand(1, 4, 5), key)
    assert result.key is key and result.indices is None


def test_fraction_resolves_per_forward():
    pruner = KeyPruner(r=0.5, n=2)
    assert pruner.reset(num_keys=100, num_layers=6) == [24, 26, 0, 0, 0, 0]
    assert pruner.reset(num_keys=1000, num_layers=6) == [250, 250, 0, 0, 0, 0]


def test_sequence_first_equals_batch_first():
    g = torch.Generator().manual_seed(0)
    cls_logits, attn = torch.randn(2, 6, C, generator=g), torch.rand(2, 6, 20, generator=g).softmax(-1)
    key, key_pos = torch.randn(2, 20, E, generator=g), torch.randn(2, 20, E, generator=g)
    mask = torch.rand(2, 20, generator=g) < 0.3
    bf, sf = KeyPruner(r=8, k=3), KeyPruner(r=8, k=3, batch_first=False)
    bf.reset(20, 2), sf.reset(20, 2)
    a = bf.step(0, cls_logits, attn, key, key, key_pos, mask)
    b = sf.step(0, cls_logits.transpose(0, 1), attn, key.transpose(0, 1), None, key_pos.transpose(0, 1), mask)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.key, b.key.transpose(0, 1)) and torch.equal(a.key_pos, b.key_pos.transpose(0, 1))
    assert torch.equal(a.key_padding_mask, b.key_padding_mask) and b.value is None


def test_bad_use():
    with pytest.raises(ValueError, match="r=-5"):
        KeyPruner(r=-5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        KeyPruner(r=1.5)
    with pytest.raises(ValueError, match="n=7"):
        KeyPruner(r=100, n=7).reset(num_keys=1000, num_layers=6)
    with pytest.raises(TypeError, match="k must be an int"):
        KeyPruner(r=100, k=2.5)
    pruner = KeyPruner(r=10)
    with pytest.raises(RuntimeError, match="reset"):
        pruner.step(0, torch.randn(1, 4, C), torch.rand(1, 4, 20), torch.randn(1, 20, E))
    with pytest.raises(ValueError, match="at least one key"):
        pruner.reset(num_keys=10, num_layers=6)
    pruner.reset(num_keys=20, num_layers=6)
    with pytest.raises(ValueError, match="scheduled to see 20"):
        pruner.step(0, torch.randn(1, 4, C), torch.rand(1, 4, 30), torch.randn(1, 30, E))
    with pytest.raises(ValueError, match=r"attn must be \(B, Nq, Nk\)"):
        pruner.step(0, torch.randn(1, 4, C), torch.rand(1, 5, 20), torch.randn(1, 20, E))
    with pytest.raises(TypeError, match="callable"):
        pruner.step(0, torch.randn(1, 4, C), "weights", torch.randn(1, 20, E))
