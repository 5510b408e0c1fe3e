"""Exact semantics of the pruning core on hand-checked cases, plus properties and bad inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tggbc import gather_keys, key_importance, prune_schedule, query_confidence, select_keys, training_r


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- key_importance


def test_key_importance_hand_computed_all_queries():
    # 2 queries, 2 classes, 3 keys.
    cls_logits = torch.tensor([[[0.0, 2.0], [-1.0, -3.0]]])
    attn = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]])
    c0, c1 = sig(2.0), sig(-1.0)
    expected = [0.5 * c0 + 0.1 * c1, 0.25 * c0 + 0.1 * c1, 0.25 * c0 + 0.8 * c1]
    got = key_importance(cls_logits, attn, k=-1)
    assert got.shape == (1, 3)
    torch.testing.assert_close(got[0], torch.tensor(expected), rtol=0, atol=1e-6)


def test_key_importance_top_k_keeps_only_confident_queries():
    cls_logits = torch.tensor([[[0.0, 2.0], [-1.0, -3.0], [5.0, 0.0]]])
    attn = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    # Most confident: query 2 (5.0), then query 0 (2.0); query 1 (-1.0) has no vote.
    got = key_importance(cls_logits, attn, k=2)
    expected = torch.tensor([[1.0 * sig(2.0) + 0.5 * sig(5.0), 0.5 * sig(5.0)]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # k >= Nq is the same as all queries.
    torch.testing.assert_close(key_importance(cls_logits, attn, k=3), key_importance(cls_logits, attn, k=0))


def test_key_importance_has_no_gradient():
    cls_logits = torch.randn(1, 4, 3, requires_grad=True)
    attn = torch.rand(1, 4, 5, requires_grad=True)
    assert not key_importance(cls_logits, attn, k=2).requires_grad


def test_query_confidence_is_sigmoid_of_max():
    logits = torch.tensor([[[-2.0, 1.0, 0.5]]])
    torch.testing.assert_close(query_confidence(logits), torch.tensor([[sig(1.0)]]))


@pytest.mark.parametrize(
    "cls_shape, attn_shape",
    [((1, 4, 3), (1, 5, 6)), ((2, 4, 3), (1, 4, 6)), ((4, 3), (1, 4, 6)), ((1, 4, 3), (4, 6))],
)
def test_key_importance_shape_mismatch(cls_shape, attn_shape):
    with pytest.raises(ValueError, match=r"shape"):
        key_importance(torch.randn(cls_shape), torch.rand(attn_shape))


def test_key_importance_rejects_integer_tensors():
    with pytest.raises(TypeError, match="floating"):
        key_importance(torch.ones(1, 2, 3, dtype=torch.long), torch.rand(1, 2, 4))
    with pytest.raises(TypeError, match="floating"):
        key_importance(torch.randn(1, 2, 3), torch.ones(1, 2, 4, dtype=torch.int32))


# ---------------------------------------------------------------- prune_schedule


@pytest.mark.parametrize(
    "r, n, expected",
    [
        (21000, 1, [21000, 0, 0, 0, 0, 0]),
        (12000, 3, [4000, 4000, 4000, 0, 0, 0]),
        (1001, 2, [500, 501, 0, 0, 0, 0]),
        (3003, 3, [1000, 1000, 1003, 0, 0, 0]),
        (0, 3, [0, 0, 0, 0, 0, 0]),
        (7, 6, [0, 0, 0, 0, 0, 7]),  # p = 1 is odd -> 0 for layers 1..5, the rest on layer 6
    ],
)
def test_prune_schedule_reference_examples(r, n, expected):
    assert prune_schedule(r, n, 6) == expected


def test_prune_schedule_fraction_and_list():
    assert prune_schedule(0.875, 1, 6, num_keys=24000) == [21000, 0, 0, 0, 0, 0]
    assert prune_schedule(0.5, 2, 6, num_keys=1000) == [250, 250, 0, 0, 0, 0]
    assert prune_schedule([5, 0, 3], n=99, num_layers=3) == [5, 0, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=100, n=7, num_layers=6), "n=7"),
        (dict(r=-1, n=1, num_layers=6), "r=-1"),
        (dict(r=0.5, n=1, num_layers=6), "num_keys"),
        (dict(r=1.5, n=1, num_layers=6, num_keys=10), r"\[0, 1\)"),
        (dict(r=float("nan"), n=1, num_layers=6, num_keys=10), r"\[0, 1\)"),
        (dict(r=24000, n=1, num_layers=6, num_keys=24000), "24000"),
        (dict(r=[1, 2], n=1, num_layers=6), "one entry per layer"),
        (dict(r=[1, -2, 0], n=1, num_layers=3), ">= 0"),
        (dict(r=10, n=1, num_layers=0), "num_layers"),
    ],
)
def test_prune_schedule_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_schedule(**kwargs)


def test_prune_schedule_rejects_wrong_types():
    with pytest.raises(TypeError):
        prune_schedule("12000", 1, 6)
    with pytest.raises(TypeError):
        prune_schedule(True, 1, 6)


@given(r=st.integers(0, 50000), n=st.integers(1, 6))
def test_prune_schedule_sums_to_r(r, n):
    schedule = prune_schedule(r, n, 6)
    assert len(schedule) == 6 and all(x >= 0 for x in schedule)
    assert sum(schedule) == r
    assert all(x == 0 for x in schedule[n:])
    assert all(x % 2 == 0 for x in schedule[: n - 1])


def test_prune_schedule_refuses_a_budget_no_layer_spends():
    assert prune_schedule(0, 0, 6) == [0] * 6  # nothing to drop, nowhere: fine
    for r, n in ((10, 0), (0.5, 0), (10, -1), (0, -1)):
        with pytest.raises(ValueError, match=f"n={n}"):
            prune_schedule(r, n, 6, num_keys=100)


# ---------------------------------------------------------------- select_keys


def test_select_keys_drops_least_important():
    importance = torch.tensor([[0.3, 0.1, 0.9, 0.2, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = select_keys(importance, 2)
    assert kept.tolist() == [[0, 2, 4], [0, 1, 2]]  # ascending key order


def test_select_keys_r_zero_keeps_everything():
    assert select_keys(torch.rand(2, 4), 0).tolist() == [[0, 1, 2, 3]] * 2


def test_select_keys_ties_drop_earlier_first():
    assert select_keys(torch.zeros(1, 4), 2).tolist() == [[2, 3]]


def test_select_keys_padding_dropped_before_valid_keys():
    importance = torch.tensor([[0.0, 0.5, 0.9, 0.1]])
    mask = torch.tensor([[False, True, True, False]])  # padded keys carry (bogus) high scores
    assert select_keys(importance, 2, mask).tolist() == [[0, 3]]
    assert select_keys(importance, 3, mask).tolist() == [[3]]


@pytest.mark.parametrize("r, match", [(5, "r=5 of Nk=5"), (9, "r=9"), (-1, "r=-1")])
def test_select_keys_bad_r(r, match):
    with pytest.raises(ValueError, match=match):
        select_keys(torch.rand(1, 5), r)


def test_select_keys_rejects_non_finite():
    importance = torch.tensor([[0.1, float("nan"), 0.3]])
    with pytest.raises(ValueError, match="NaN or inf"):
        select_keys(importance, 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        select_keys(torch.tensor([[0.1, float("inf"), 0.3]]), 1)


def test_select_keys_keeps_valid_keys_while_any_exist():
    mask = torch.tensor([[False, False, True, True], [True, True, True, False]])
    importance = torch.tensor([[0.1, 0.2, 0.9, 0.9], [0.9, 0.9, 0.9, 0.0]])
    assert select_keys(importance, 3, mask).tolist() == [[1], [3]]


def test_select_keys_mask_checks():
    with pytest.raises(ValueError, match=r"\(B, Nk\)"):
        select_keys(torch.rand(2, 4), 1, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        select_keys(torch.rand(2, 4), 1, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="floating"):
        select_keys(torch.ones(2, 4, dtype=torch.long), 1)


def reference_kept_set(importance, r):
    """The published method: sort ascending, drop the first r."""
    return [set(torch.sort(row).indices[r:].tolist()) for row in importance]


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    num_keys=st.integers(2, 64),
    data=st.data(),
)
def test_select_keys_properties(batch, num_keys, data):
    r = data.draw(st.integers(0, num_keys - 1))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    importance = torch.rand(batch, num_keys, generator=g)  # continuous: no ties
    kept = select_keys(importance, r)
    assert kept.shape == (batch, num_keys - r)
    assert [set(row.tolist()) for row in kept] == reference_kept_set(importance, r)
    assert bool((kept[:, 1:] > kept[:, :-1]).all())  # sorted and unique
    # One sample alone gives the same answer as inside the batch.
    for b in range(batch):
        assert torch.equal(select_keys(importance[b : b + 1], r)[0], kept[b])
    # Every kept key is at least as important as every dropped key.
    for b in range(batch):
        dropped = torch.ones(num_keys, dtype=torch.bool)
        dropped[kept[b]] = False
        if r:
            assert importance[b, kept[b]].min() >= importance[b, dropped].max()


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), num_keys=st.integers(2, 40), data=st.data())
def test_select_keys_mask_property(batch, num_keys, data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, num_keys, generator=g) < 0.4
    mask[:, 0] = False  # at least one valid key per sample
    valid = (~mask).sum(1)
    r = data.draw(st.integers(0, int(valid.min()) - 1))
    importance = torch.rand(batch, num_keys, generator=g)
    kept = select_keys(importance, r, mask)
    for b in range(batch):
        kept_mask = mask[b, kept[b]]
        num_dropped_valid = int(valid[b]) - int((~kept_mask).sum())
        # A padded key survives only if no valid key was dropped.
        assert not (bool(kept_mask.any()) and num_dropped_valid > 0)
        assert torch.equal(select_keys(importance[b : b + 1], r, mask[b : b + 1])[0], kept[b])


# ---------------------------------------------------------------- gather_keys


def test_gather_keys_batch_first_sequence_first_and_masks():
    key = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    idx = torch.tensor([[1, 3], [0, 2]])
    k, m, none = gather_keys(idx, key, mask, None)
    assert none is None
    assert torch.equal(k[0], key[0, [1, 3]]) and torch.equal(k[1], key[1, [0, 2]])
    assert m.tolist() == [[False, True], [False, True]]
    (k_seq,) = gather_keys(idx, key.transpose(0, 1), key_dim=0)
    assert k_seq.shape == (2, 2, 3)
    assert torch.equal(k_seq.transpose(0, 1), k)


def test_gather_keys_same_tensor_gathered_once():
    key = torch.randn(1, 5, 2)
    a, b = gather_keys(torch.tensor([[0, 4]]), key, key)
    assert a is b


def test_gather_keys_bad_input():
    with pytest.raises(TypeError, match="long"):
        gather_keys(torch.tensor([[0.0, 1.0]]), torch.randn(1, 3, 2))
    with pytest.raises(ValueError, match="batch 1"):
        gather_keys(torch.tensor([[0, 1]]), torch.randn(2, 3, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        gather_keys(torch.tensor([[0, 1]]), [1, 2, 3])


# ---------------------------------------------------------------- training_r


def test_training_r_curve():
    # warmup 10, heating 20, r_max 1000
    assert [training_r(i, 10, 20, 1000) for i in (1, 10)] == [0, 0]
    assert training_r(11, 10, 20, 1000) == 50
    assert training_r(20, 10, 20, 1000) == 500
    assert training_r(30, 10, 20, 1000) == 1000
    assert training_r(31, 10, 20, 1000) == 1000
    assert training_r(5, 0, 0, 7) == 7


def test_training_r_bad_input():
    with pytest.raises(ValueError, match="from 1"):
        training_r(0, 1, 1, 10)
    with pytest.raises(ValueError, match="r_max"):
        training_r(1, 1, 1, -10)
