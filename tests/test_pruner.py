"""KeyPruner in a small decoder loop: fast rows vs explicit weights, layouts, masks, no-ops, the
controls, and `pruning`."""

import pytest
import torch
from torch import nn

from tggbc import KeyPruner, MultiheadAttention, key_importance, pruning, select_keys

E, H, C = 16, 2, 3


class TinyDecoder(nn.Module):
    """Cross-attention-only decoder: enough to drive KeyPruner the way the hosts do."""

    def __init__(self, num_layers=3):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.ModuleList(MultiheadAttention(E, H, batch_first=True) for _ in range(num_layers))
        self.cls = nn.ModuleList(nn.Linear(E, C) for _ in range(num_layers))

    def forward(self, query, memory, key_pos, mask, pruner, mode):
        pruner.reset(memory.shape[1], len(self.attn))
        self.kept, origin = [], torch.arange(memory.shape[1]).expand(memory.shape[0], -1)
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
            memory, _, key_pos, mask, kept = pruner.step(layer, cls(query), weights, memory, memory, key_pos, mask)
            if kept is not None:
                origin = origin.gather(1, kept)
                self.kept.append(origin)
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
    kept_f = dec.kept
    out_r, seen_r = dec(q, m, p, mask, ref, "reference")
    assert seen_f == seen_r == [60, 40, 30]  # the last layer's 5 are never dropped: no later layer
    assert len(kept_f) == len(dec.kept) == 2
    for a, b in zip(kept_f, dec.kept, strict=True):
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
    assert torch.equal(dec.kept[0], expected)


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
    with pytest.raises(ValueError, match=r"attn has shape \(1, 5, 20\)"):
        pruner.step(0, torch.randn(1, 4, C), torch.rand(1, 5, 20), torch.randn(1, 20, E))
    with pytest.raises(TypeError, match="callable"):
        pruner.step(0, torch.randn(1, 4, C), "weights", torch.randn(1, 20, E))
    with pytest.raises(ValueError, match="key_pos has shape .* key counts differ"):
        pruner.step(0, torch.randn(1, 4, C), torch.rand(1, 4, 20), torch.randn(1, 20, E), None, torch.randn(1, 19, E))
    with pytest.raises(ValueError, match="n=0"):
        KeyPruner(r=10, n=0)
    with pytest.raises(ValueError, match="method must be one of"):
        KeyPruner(r=10, method="best")


def step_once(method, r=8, k=-1, mask=None, seed=0, nk=20, nq=6):
    g = torch.Generator().manual_seed(seed)
    cls_logits, attn = torch.randn(2, nq, C, generator=g), torch.rand(2, nq, nk, generator=g).softmax(-1)
    key = torch.randn(2, nk, E, generator=g)
    pruner = KeyPruner(r=r, k=k, method=method)
    pruner.reset(nk, 2)
    return pruner.step(0, cls_logits, attn, key, key, key.clone(), mask), cls_logits, attn, key


def test_controls_keep_as_many_keys_and_rank_as_they_say():
    tg, cls_logits, attn, _ = step_once("tggbc", k=3)
    inverse, *_ = step_once("inverse", k=3)
    importance = key_importance(cls_logits, attn, 3)
    assert torch.equal(tg.indices, importance.argsort(1)[:, 8:].sort(1).values)  # the 12 most important
    assert torch.equal(inverse.indices, importance.argsort(1)[:, :12].sort(1).values)  # the 12 least
    uniform, *_ = step_once("attention")
    assert torch.equal(uniform.indices, attn.sum(1).argsort(1)[:, 8:].sort(1).values)  # votes of weight 1
    for method in ("random", "merge"):
        out, *_ = step_once(method)
        assert out.key.shape == (2, 12, E) and out.key_pos.shape == (2, 12, E)


def test_random_is_seeded_uniform_and_drops_padded_keys_first():
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[:, 15:] = True
    a, *_ = step_once("random", r=8, mask=mask)
    b, *_ = step_once("random", r=8, mask=mask)
    assert torch.equal(a.indices, b.indices)  # same seed, same keys
    assert (a.indices < 15).all() and not a.key_padding_mask.any()  # 5 padded + 3 valid dropped
    counts = torch.zeros(20)
    pruner = KeyPruner(r=10, method="random", seed=1)
    for _ in range(400):  # fresh draws per forward, uniform over keys
        pruner.reset(20, 2)
        kept = pruner.step(0, torch.randn(1, 3, C), torch.rand(1, 3, 20), torch.randn(1, 20, E)).indices
        counts[kept[0]] += 1
    assert (counts / 400 - 0.5).abs().max() < 0.1


def test_pruning_context_restores_on_error():
    dec = nn.Module()
    dec.pruner, dec.attention = "before", "fast"
    with pytest.raises(RuntimeError, match="boom"):
        with pruning(dec, KeyPruner(r=1), attention="reference"):
            assert isinstance(dec.pruner, KeyPruner) and dec.attention == "reference"
            raise RuntimeError("boom")
    assert dec.pruner == "before" and dec.attention == "fast"
    with pruning(dec, attention="reference"):  # the pruner left as it is
        assert dec.pruner == "before"
    with pytest.raises(TypeError, match="no `pruner` attribute"):
        with pruning(nn.Linear(2, 2), None):
            pass
