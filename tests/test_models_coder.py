"""NMS-free box decoding (the StreamPETR repository's NMSFreeCoder + get_bboxes) and the rigid ego-pose inverse."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tggbc.models.coder import NMSFreeCoder, denormalize_bbox
from tggbc.models.state import rigid_inverse


def code(cx, cy, cz, w, l, h, yaw, vx=0.0, vy=0.0):  # noqa: E741
    return [cx, cy, cz, math.log(w), math.log(l), math.log(h), math.sin(yaw), math.cos(yaw), vx, vy]


def logit(p):
    return math.log(p / (1 - p))


def test_hand_checked_decoding():
    # Three queries, two classes; pairs by score: (q1, c0) .9, (q0, c1) .8, (q2, c0) .7, (q1, c1) .6, ...
    scores = torch.tensor([[logit(0.1), logit(0.8)], [logit(0.9), logit(0.6)], [logit(0.7), logit(0.2)]])
    boxes = torch.tensor(
        [
            code(1.0, 2.0, 0.5, 2.0, 4.0, 1.5, 0.3, 1.0, -1.0),
            code(-3.0, 0.0, 1.0, 1.0, 1.0, 2.0, -2.0),
            code(61.2, -61.2, 10.0, 0.5, 0.5, 0.5, math.pi / 2),  # on the range's edge: kept
        ]
    )
    coder = NMSFreeCoder(num_classes=2, max_num=4)
    (det,) = coder.get_bboxes(scores[None], boxes[None])
    torch.testing.assert_close(det.scores, torch.tensor([0.9, 0.8, 0.7, 0.6]))
    assert det.labels.tolist() == [0, 1, 0, 1] and det.labels.dtype == torch.int64
    expected = torch.tensor(
        [
            [-3.0, 0.0, 1.0 - 1.0, 1.0, 1.0, 2.0, -2.0, 0.0, 0.0],  # z moves down by h / 2
            [1.0, 2.0, 0.5 - 0.75, 2.0, 4.0, 1.5, 0.3, 1.0, -1.0],
            [61.2, -61.2, 10.0 - 0.25, 0.5, 0.5, 0.5, math.pi / 2, 0.0, 0.0],
            [-3.0, 0.0, 0.0, 1.0, 1.0, 2.0, -2.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(det.boxes, expected, atol=1e-5, rtol=1e-5)
    # decode_single keeps z at the gravity centre.
    torch.testing.assert_close(coder.decode_single(scores, boxes).boxes[1, 2], torch.tensor(0.5))
    # A centre just outside post_center_range drops the box; a threshold of 0 means none (as the original).
    boxes[2, 2] = 10.01
    (det,) = NMSFreeCoder(num_classes=2, max_num=4, score_threshold=0.0).get_bboxes(scores[None], boxes[None])
    assert det.scores.numel() == 3 and 0.7 not in [round(float(s), 4) for s in det.scores]
    (det,) = NMSFreeCoder(num_classes=2, max_num=4, score_threshold=0.75).get_bboxes(scores[None], boxes[None])
    assert det.labels.tolist() == [0, 1]


def slow_decode(cls_scores, bbox_preds, max_num, low, high):
    """Every (query, class) pair scored, sorted, cut at max_num, filtered: plain Python loops."""
    pairs = []
    nq, nc = cls_scores.shape
    for q in range(nq):
        for c in range(nc):
            pairs.append((float(torch.sigmoid(cls_scores[q, c])), q, c))
    pairs.sort(key=lambda p: -p[0])
    out = []
    for score, q, c in pairs[:max_num]:
        b = bbox_preds[q].tolist()
        box = b[0:3] + [math.exp(b[3]), math.exp(b[4]), math.exp(b[5]), math.atan2(b[6], b[7]), b[8], b[9]]
        if all(low[i] <= box[i] <= high[i] for i in range(3)):
            box[2] -= box[5] / 2
            out.append((score, c, box))
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), nq=st.integers(2, 30), max_num=st.integers(1, 40))
def test_decoding_equals_a_slow_sort(seed, nq, max_num):
    g = torch.Generator().manual_seed(seed)
    nc = 3
    max_num = min(max_num, nq * nc)
    cls_scores = torch.randn(nq, nc, generator=g) * 3
    bbox_preds = torch.randn(nq, 10, generator=g)
    bbox_preds[:, :3] *= 50  # some centres fall outside the range
    coder = NMSFreeCoder(num_classes=nc, max_num=max_num, post_center_range=(-40, -40, -40, 40, 40, 40))
    (det,) = coder.get_bboxes(cls_scores[None], bbox_preds[None])
    expected = slow_decode(cls_scores, bbox_preds, max_num, (-40, -40, -40), (40, 40, 40))
    assert det.labels.tolist() == [c for _, c, _ in expected]
    torch.testing.assert_close(det.scores, torch.tensor([s for s, _, _ in expected]))
    torch.testing.assert_close(
        det.boxes, torch.tensor([b for _, _, b in expected]).reshape(-1, 9), atol=1e-4, rtol=1e-5
    )


def test_denormalize_without_velocity_and_bad_inputs():
    out = denormalize_bbox(torch.tensor([code(1, 2, 3, 2, 3, 4, 0.5)[:8]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 2, 3, 2, 3, 4, 0.5]]))
    coder = NMSFreeCoder(num_classes=10, max_num=300)
    with pytest.raises(ValueError, match="max_num=300 exceeds the 200"):
        coder.get_bboxes(torch.zeros(1, 20, 10), torch.zeros(1, 20, 10))
    with pytest.raises(ValueError, match="cls_scores must be"):
        coder.decode_single(torch.zeros(20, 9), torch.zeros(20, 10))
    with pytest.raises(ValueError, match="max_num"):
        NMSFreeCoder(max_num=0)


def test_rigid_inverse_hand_checked():
    # Yaw 90 degrees, at (1000, 2000, 3): the inverse rotates back and moves by -R^T t.
    pose = torch.tensor(
        [[0.0, -1.0, 0.0, 1000.0], [1.0, 0.0, 0.0, 2000.0], [0.0, 0.0, 1.0, 3.0], [0, 0, 0, 1]], dtype=torch.float64
    )
    expected = torch.tensor([[0.0, 1.0, 0.0, -2000.0], [-1.0, 0.0, 0.0, 1000.0], [0.0, 0.0, 1.0, -3.0], [0, 0, 0, 1]])
    inverse = rigid_inverse(pose[None])
    assert inverse.dtype == torch.float32
    assert torch.equal(inverse[0], expected)
    with pytest.raises(ValueError, match="not a rigid transform"):
        rigid_inverse(torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0]))[None])
    with pytest.raises(ValueError, match=r"\[\.\.\., 4, 4\]"):
        rigid_inverse(torch.eye(3))


def test_rigid_inverse_beats_float32_lu_far_from_the_origin():
    g = torch.Generator().manual_seed(0)
    yaw = torch.rand(8, generator=g, dtype=torch.float64) * 6.28
    pose = torch.eye(4, dtype=torch.float64).repeat(8, 1, 1)
    pose[:, 0, 0], pose[:, 0, 1], pose[:, 1, 0], pose[:, 1, 1] = yaw.cos(), -yaw.sin(), yaw.sin(), yaw.cos()
    pose[:, :3, 3] = torch.randn(8, 3, generator=g, dtype=torch.float64) * 50 + 1500.0
    exact = torch.linalg.inv(pose)
    rigid = rigid_inverse(pose).double()
    lu32 = torch.linalg.inv(pose.float()).double()
    # Rounding the exact inverse to float32 is the best possible: the rigid inverse achieves it.
    assert (rigid - exact).abs().max() <= (exact.float().double() - exact).abs().max() + 1e-12
    assert (lu32 - exact).abs().max() > (rigid - exact).abs().max()
