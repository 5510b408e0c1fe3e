"""The set-prediction loss: focal loss with hard and soft (quality) targets, localisation quality."""

import math

import pytest
import torch

pytest.importorskip("scipy", reason="Hungarian matching needs scipy")

from tggbc.detector.loss import (  # noqa: E402
    LossConfig,
    detection_loss,
    encode_boxes,
    localisation_quality,
    sigmoid_focal_loss,
)


def _slow_focal(logits, target, alpha, gamma):
    """The textbook focal loss, one element at a time, {0, 1} targets."""
    total = 0.0
    for x, t in zip(logits.flatten().tolist(), target.flatten().tolist(), strict=True):
        p = 1.0 / (1.0 + math.exp(-x))
        if t == 1.0:
            total += -alpha * (1 - p) ** gamma * math.log(p)
        else:
            total += -(1 - alpha) * p**gamma * math.log(1 - p)
    return total


def test_hard_targets_give_the_textbook_focal_loss():
    torch.manual_seed(0)
    logits = torch.randn(7, 5, dtype=torch.float64) * 3
    target = (torch.rand(7, 5) < 0.3).double()
    got = float(sigmoid_focal_loss(logits, target, 0.25, 2.0))
    assert got == pytest.approx(_slow_focal(logits, target, 0.25, 2.0), rel=1e-9)


def test_soft_targets_by_hand():
    # p = 0.5 against a target of 0.8: alpha * |0.8 - 0.5|^2 * BCE, and BCE(0.5, t) = log 2 for any t.
    got = sigmoid_focal_loss(torch.zeros(1, 1), torch.full((1, 1), 0.8), 0.25, 2.0)
    assert float(got) == pytest.approx(0.25 * 0.09 * math.log(2), rel=1e-6)
    # A score equal to its soft target costs nothing: the factor |t - p|^gamma is 0.
    assert float(sigmoid_focal_loss(torch.zeros(1, 1), torch.full((1, 1), 0.5), 0.25, 2.0)) == 0.0


def test_localisation_quality_by_hand():
    pred = torch.tensor([[10.0, 5.0], [13.0, 9.0], [10.0, 6.0]])
    gt = torch.tensor([[10.0, 5.0], [10.0, 5.0], [10.0, 5.0]])  # distances 0, 5 (3-4-5) and 1 m
    q = localisation_quality(pred, gt)
    five = (math.exp(-100) + math.exp(-25) + math.exp(-6.25) + math.exp(-25 / 16)) / 4
    one = (math.exp(-4) + math.exp(-1) + math.exp(-1 / 4) + math.exp(-1 / 16)) / 4
    torch.testing.assert_close(q, torch.tensor([1.0, five, one]))
    # It falls with distance and carries no gradient to the boxes.
    d = torch.linspace(0, 10, 50)
    q = localisation_quality(torch.stack([d, torch.zeros_like(d)], 1).requires_grad_(), torch.zeros(50, 2))
    assert (q.diff() < 0).all() and not q.requires_grad


def _one_query(offset: float, probability: float, quality_focal: bool) -> float:
    """Class loss of one query matched to one car (class 0 of 2), its box `offset` metres off in x."""
    target = encode_boxes(torch.tensor([[20.0, 0.0, 0.0]]), torch.ones(1, 3), torch.zeros(1), torch.zeros(1, 2))
    boxes = target.clone()
    boxes[0, 0] += offset
    logit = math.log(probability / (1 - probability))
    logits = torch.tensor([[[[logit, -8.0]]]])
    _, parts = detection_loss(
        logits, boxes.view(1, 1, 1, 10), [torch.tensor([0])], [target], LossConfig(quality_focal=quality_focal)
    )
    return parts["cls"]


def test_quality_focal_asks_the_score_to_match_the_boxs_quality():
    quality = float(localisation_quality(torch.tensor([[22.0, 0.0]]), torch.tensor([[20.0, 0.0]])))
    assert 0.2 < quality < 0.4  # 2 m off
    # With hard targets a confident score is always better; with quality targets a box 2 m off
    # should score its quality, and an overconfident score costs more.
    assert _one_query(2.0, 0.99, False) < _one_query(2.0, quality, False)
    assert _one_query(2.0, quality, True) < _one_query(2.0, 0.99, True)
    # A box on its target has quality 1: both losses agree.
    assert _one_query(0.0, 0.7, True) == pytest.approx(_one_query(0.0, 0.7, False), rel=1e-6)
