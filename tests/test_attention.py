"""The fused fast path against torch.nn.MultiheadAttention, the independent slow path."""

import pytest
import torch
from torch import nn

from tggbc import MultiheadAttention, key_importance, query_confidence
from tggbc.attention import multi_head_attention

E, H = 32, 4


def make_pair(batch_first, seed=0):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    with torch.no_grad():  # non-zero biases so the test sees them
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    fast = MultiheadAttention.from_torch(ref).eval()
    return ref, fast


def inputs(batch_first, batch=2, nq=7, nk=50, padded=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, nq, E, generator=g)
    k = torch.randn(batch, nk, E, generator=g)
    v = torch.randn(batch, nk, E, generator=g)
    mask = None
    if padded:
        mask = torch.rand(batch, nk, generator=g) < 0.3
        mask[:, 0] = False
    if not batch_first:
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    return q, k, v, mask


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_rows_equal_torch_weights(batch_first, padded):
    ref, fast = make_pair(batch_first)
    q, k, v, mask = inputs(batch_first, padded=padded)
    out_ref, w_ref = ref(q, k, v, key_padding_mask=mask, need_weights=True, average_attn_weights=True)
    out, rows = fast(q, k, v, key_padding_mask=mask, return_rows=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows(), w_ref, rtol=0, atol=1e-5)
    index = torch.tensor([[6, 0, 3], [2, 2, 5]])
    expected = torch.stack([w_ref[b, index[b]] for b in range(2)])
    torch.testing.assert_close(rows(index), expected, rtol=0, atol=1e-5)
    if padded:
        assert bool((rows()[mask.unsqueeze(1).expand(-1, 7, -1)] == 0).all())


@pytest.mark.parametrize("padded", [False, True])
def test_importance_from_heads_equals_reference_importance(padded):
    """AttentionRows.importance == key_importance on nn.MultiheadAttention's explicit weights."""
    ref, fast = make_pair(True)
    q, k, v, mask = inputs(True, nq=9, padded=padded)
    _, w_ref = ref(q, k, v, key_padding_mask=mask)
    _, rows = fast(q, k, v, key_padding_mask=mask, return_rows=True)
    cls_logits = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(4))
    confidence = query_confidence(cls_logits)
    index = confidence.topk(4, dim=1).indices
    got = rows.importance(index, confidence.gather(1, index))
    torch.testing.assert_close(got, key_importance(cls_logits, w_ref, k=4), rtol=0, atol=1e-6)
    torch.testing.assert_close(rows.importance(None, confidence), key_importance(cls_logits, w_ref), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="weights must be"):
        rows.importance(index, confidence)


@pytest.mark.parametrize("batch_first", [True, False])
def test_need_weights_path_matches_torch(batch_first):
    ref, fast = make_pair(batch_first)
    q, k, v, mask = inputs(batch_first, padded=True)
    out_ref, w_ref = ref(q, k, v, key_padding_mask=mask)
    out, w = fast(q, k, v, key_padding_mask=mask, need_weights=True)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(w, w_ref)


def test_attn_mask_matches_torch():
    ref, fast = make_pair(True)
    q, k, v, _ = inputs(True, nq=5, nk=5)
    attn_mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(3)) < 0.3
    attn_mask.fill_diagonal_(False)
    out_ref, _ = ref(q, k, v, attn_mask=attn_mask)
    out, _ = fast(q, k, v, attn_mask=attn_mask)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)


def test_state_dicts_load_both_ways():
    ref, fast = make_pair(False)
    assert set(ref.state_dict()) == set(fast.state_dict())
    other = nn.MultiheadAttention(E, H)
    other.load_state_dict(fast.state_dict(), strict=True)
    for name, t in ref.state_dict().items():
        assert torch.equal(other.state_dict()[name], t)


def test_value_is_key_and_bfloat16_runs():
    _, fast = make_pair(True)
    q, k, _, _ = inputs(True)
    out, rows = fast.to(torch.bfloat16)(q.bfloat16(), k.bfloat16(), k.bfloat16(), return_rows=True)
    assert out.dtype == torch.bfloat16 and rows().dtype == torch.float32
    torch.testing.assert_close(rows().sum(-1), torch.ones(2, 7), rtol=0, atol=1e-5)


def test_bad_input():
    _, fast = make_pair(True)
    q, k, v, _ = inputs(True)
    with pytest.raises(ValueError, match="exclusive"):
        fast(q, k, v, need_weights=True, return_rows=True)
    with pytest.raises(ValueError, match="channels"):
        fast(q[..., :8], k, v)
    with pytest.raises(ValueError, match=r"\(B, Nk\)"):
        fast(q, k, v, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(30, 4)
    _, rows = fast(q, k, v, return_rows=True)
    with pytest.raises(ValueError, match="query_index"):
        rows(torch.tensor([0, 1]))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_function_on_foreign_parameters_without_biases(batch_first, need_weights):
    """multi_head_attention on another module's parameters (here nn.MultiheadAttention(bias=False),
    the layout of a FlashMHA built with bias=False) equals that module."""
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(E, H, bias=False, batch_first=batch_first).eval()
    q, k, v, mask = inputs(batch_first, padded=True)
    expected, expected_weights = ref(q, k, v, key_padding_mask=mask)
    out, weights = multi_head_attention(
        q,
        k,
        v,
        H,
        ref.in_proj_weight,
        ref.in_proj_bias,
        ref.out_proj.weight,
        ref.out_proj.bias,
        key_padding_mask=mask,
        need_weights=need_weights,
        batch_first=batch_first,
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
    else:
        assert weights is None
