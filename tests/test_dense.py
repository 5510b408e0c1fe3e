"""Dense token targets, their loss and query selection, on a one-camera rig checked by hand."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tggbc.data.raycast import box_corners
from tggbc.detector.dense import (
    _GROUND_DEPTH_CAP,
    _REG_MASS,
    GEOMETRY_CHANNELS,
    camera_geometry,
    dense_loss,
    dense_targets,
    ground_ray_depth,
    key_index,
    proposal_peaks,
    select_proposals,
)

# One camera looking along lidar +x: camera x = -lidar y, camera y = -lidar z, camera z = lidar x.
# fx = fy = 100 px, principal point (88, 32) in a 176 x 64 image: an 11 x 4 token grid at stride 16.
WIDTH, HEIGHT, STRIDE, CLASSES = 176, 64, 16, 3
K = np.array([[100.0, 0, 88, 0], [0, 100, 32, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
LIDAR2CAM = np.array([[0.0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
LIDAR2IMG = (K @ LIDAR2CAM)[None].astype(np.float32)  # (1, 4, 4)


def box(x, y, z, w=1.0, length=2.0, h=1.0, yaw=0.0):
    return np.array([[x, y, z, w, length, h, yaw, 0.0, 0.0]], np.float32)


def test_box_corners_by_hand():
    # The corners dense_targets projects (the renderer's own box corners).
    corners = box_corners(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]), math.pi / 2)
    # Length 4 lies along yaw = 90 degrees, i.e. along lidar y; width 2 along -x.
    assert np.allclose(corners.min(0), [0.0, 0.0, 0.0]) and np.allclose(corners.max(0), [2.0, 4.0, 6.0])


def test_targets_of_one_box_by_hand():
    # Centre (20, 0, 0.5): camera (0, -0.5, 20) -> pixel (88, 29.5) -> token row 1, column 5.
    heat, reg, weight = dense_targets(box(20.0, 0.0, 0.5), np.array([2]), LIDAR2IMG, (WIDTH, HEIGHT), STRIDE, CLASSES)
    assert heat.shape == (1, CLASSES, 4, 11) and reg.shape == (1, 4, 4, 11) and weight.shape == (1, 4, 11)
    assert heat[0, 2, 1, 5] == 1.0 and (heat[0, 2] == 1.0).sum() == 1
    assert heat[0, :2].max() == 0.0  # other classes untouched
    # Row 2's centre lies 2.5 - 29.5 / 16 = 0.656 tokens from the centre: Gaussian exp(-0.656^2 / 0.5)
    # = 0.4226 > 0.2, so that token also regresses; the two share the object's weight 1 : 0.4226.
    g = math.exp(-((2.5 - 29.5 / 16) ** 2) / 0.5)
    assert weight[0, 1, 5] == pytest.approx(_REG_MASS / (1 + g), rel=1e-5)
    assert weight[0, 2, 5] == pytest.approx(_REG_MASS * g / (1 + g), rel=1e-5)
    assert (weight > 0).sum() == 2
    assert reg[0, :3, 1, 5] == pytest.approx([88 / 16 - 5.5, 29.5 / 16 - 1.5, math.log(20.0)], abs=1e-6)
    # The bottom face's centre (20, 0, 0) projects to pixel row 32 = 2.0 tokens: 0.5 below row 1's
    # centre and 0.5 above row 2's.
    assert reg[0, 3, 1, 5] == pytest.approx(0.5, abs=1e-6) and reg[0, 3, 2, 5] == pytest.approx(-0.5, abs=1e-6)
    # A small far box: its Gaussian (radius 0.5 tokens) does not reach the neighbours' regression.
    assert weight[0, 1, 4] == 0.0


def test_neighbours_of_a_large_box_regress_its_centre():
    # Centre (8, 0, 0.5): pixel (88, 25.75) -> token row 1, column 5; about 3.6 tokens wide.
    heat, reg, weight = dense_targets(
        box(8.0, 0.0, 0.5, w=4.0, h=4.0), np.array([0]), LIDAR2IMG, (WIDTH, HEIGHT), STRIDE, CLASSES
    )
    assert heat[0, 0, 1, 5] == 1.0
    assert 0.0 < weight[0, 1, 4] < weight[0, 1, 5] and 0.0 < heat[0, 0, 1, 4] < 1.0
    # Bottom face centre (8, 0, -1.5): pixel row 32 + 100 * 1.5 / 8 = 50.75.
    assert reg[0, :, 1, 4] == pytest.approx(
        [88 / 16 - 4.5, 25.75 / 16 - 1.5, math.log(8.0), 50.75 / 16 - 1.5], abs=1e-6
    )


def test_boxes_behind_or_outside_the_camera_leave_no_target():
    boxes = np.concatenate([box(-20.0, 0.0, 0.5), box(5.0, 30.0, 0.5)])  # behind; far to the left
    heat, reg, weight = dense_targets(boxes, np.array([0, 1]), LIDAR2IMG, (WIDTH, HEIGHT), STRIDE, CLASSES)
    assert heat.max() == 0.0 and weight.max() == 0.0 and reg.max() == 0.0


def test_the_nearer_of_two_aligned_objects_owns_the_regression():
    boxes = np.concatenate([box(30.0, 0.0, 0.5), box(10.0, 0.0, 0.5 * 10 / 30)])  # same pixel row
    heat, reg, weight = dense_targets(boxes, np.array([0, 1]), LIDAR2IMG, (WIDTH, HEIGHT), STRIDE, CLASSES)
    row, col = 1, 5
    assert heat[0, 0, row, col] == 1.0 and heat[0, 1, row, col] == 1.0  # both classes peak there
    assert reg[0, 2, row, col] == pytest.approx(math.log(10.0), abs=1e-6)


def test_near_and_far_objects_weigh_the_same_in_the_regression():
    # A wide box 8 m away covers a dozen tokens, a small one 40 m away one or two; a third box 6 m
    # away in front of part of the wide one takes some of its tokens. Each keeps the full weight.
    boxes = np.concatenate([box(8.0, 0.0, 0.5, w=4.0, h=4.0), box(40.0, 12.0, 0.5), box(6.0, -1.0, 0.3, w=1.0, h=1.0)])
    heat, reg, weight = dense_targets(boxes, np.array([0, 1, 2]), LIDAR2IMG, (WIDTH, HEIGHT), STRIDE, CLASSES)
    depth = np.exp(reg[0, 2])
    owners = [np.isclose(depth, d, rtol=1e-5) & (weight[0] > 0) for d in (8.0, 40.0, 6.0)]
    alone = dense_targets(boxes[:1], np.array([0]), LIDAR2IMG, (WIDTH, HEIGHT), STRIDE, CLASSES)[2]
    assert int(owners[1].sum()) <= 2 and int((alone > 0).sum()) > int(owners[0].sum()) >= 8
    assert int(owners[2].sum()) >= 1 and not (owners[0] & owners[2]).any()
    for owned in owners:
        assert float(weight[0][owned].sum()) == pytest.approx(_REG_MASS, rel=1e-5)
    # Within one object the weights keep the Gaussian's shape: the centre token weighs most.
    assert weight[0, 1, 5] == weight[0][owners[0]].max()


def test_dense_loss_by_hand():
    heat = torch.zeros(1, 1, 1, 2, 2)
    heat[0, 0, 0, 0, 0] = 1.0
    logits = torch.full((1, 1, 1, 2, 2), -30.0)
    logits[0, 0, 0, 0, 0] = 0.0  # p = 0.5 at the one peak: -log(0.5) * 0.5^2
    target = torch.zeros(1, 1, 3, 2, 2)
    weight = torch.zeros(1, 1, 2, 2)
    weight[0, 0, 0, 0] = 1.0
    pred = target.clone()
    pred[0, 0, 2, 0, 0] = 0.5  # log-depth off by 0.5, counted twice
    pred[0, 0, 0, 1, 1] = 9.0  # a token without weight does not count
    heat_loss, reg_loss = dense_loss(logits, pred, heat, target, weight)
    assert float(heat_loss) == pytest.approx(math.log(2.0) * 0.25, rel=1e-4)
    assert float(reg_loss) == pytest.approx(1.0, rel=1e-6)


def test_dense_loss_of_a_ground_contact_head_by_hand():
    heat = torch.zeros(1, 1, 1, 1, 2)
    heat[0, 0, 0, 0, 0] = 1.0
    logits = torch.full((1, 1, 1, 1, 2), -30.0)
    logits[0, 0, 0, 0, 0] = 30.0  # a confident hit: no heatmap loss to speak of
    target = torch.tensor([0.1, -0.2, math.log(30.0), 0.4]).view(1, 1, 4, 1, 1).expand(1, 1, 4, 1, 2).clone()
    weight = torch.tensor([[[[2.0, 0.0]]]])
    # (du, dv, fused, direct, geometric log depth, contact row), against target (du, dv, log d, row).
    pred = torch.tensor([0.1, -0.2, math.log(30.0), math.log(30.0), math.log(30.0), 0.4]).view(1, 1, 6, 1, 1)
    pred = pred.expand(1, 1, 6, 1, 2).clone()
    pred[0, 0, 2, 0, 0] += 0.1  # fused off by 0.1, weight 2
    pred[0, 0, 3, 0, 0] -= 0.2  # direct off by 0.2, weight 1
    pred[0, 0, 4, 0, 0] += 0.3  # geometric off by 0.3, weight 1
    pred[0, 0, 5, 0, 0] -= 0.05  # contact row off by 0.05 cells, weight 1
    pred[0, 0, :, 0, 1] += 5.0  # a cell without weight does not count
    _, reg_loss = dense_loss(logits, pred, heat, target, weight)
    assert float(reg_loss) == pytest.approx(2.0 * (2 * 0.1 + 0.2 + 0.3 + 0.05), rel=1e-5)
    # A plain head's three channels ignore the contact row of the same targets.
    _, plain = dense_loss(logits, pred[:, :, :3], heat, target, weight)
    assert float(plain) == pytest.approx(2.0 * 2 * 0.1, rel=1e-5)
    with pytest.raises(ValueError, match="channels"):
        dense_loss(logits, pred[:, :, :5], heat, target, weight)
    with pytest.raises(ValueError, match="contact row"):
        dense_loss(logits, pred, heat, target[:, :, :3], weight)


def test_ground_ray_depth_by_hand():
    # LIDAR2IMG's camera sits at the lidar origin looking along +x, f = 100 px, horizon at row 32:
    # with the road 1.5 m below, an object standing d metres ahead touches it at row 32 + 150 / d.
    lidar2img = torch.from_numpy(LIDAR2IMG)[None]  # (1, 1, 4, 4)
    rows = torch.tensor([32.0 + 150.0 / 10.0, 32.0 + 150.0 / 40.0, 32.0 + 150.0 / 400.0, 30.0, 32.0])
    u = torch.tensor([88.0, 10.0, 150.0, 88.0, 88.0]).view(1, 1, 5)
    v = rows.view(1, 1, 5).requires_grad_(True)
    depth, hits = ground_ray_depth(lidar2img, u, v, ground_z=-1.5)
    # Columns do not matter to a level camera; 400 m is past the cap; at or above the horizon the
    # ray never reaches the road.
    assert depth[0, 0].tolist() == pytest.approx([10.0, 40.0, _GROUND_DEPTH_CAP, _GROUND_DEPTH_CAP, _GROUND_DEPTH_CAP])
    assert hits[0, 0].tolist() == [True, True, True, False, False]
    depth.log().sum().backward()
    # d log d / dv = -1 / (v - 32) where the depth is not clamped; no NaN from the rows that miss.
    assert v.grad[0, 0, :2].tolist() == pytest.approx([-1 / 15.0, -1 / 3.75], rel=1e-5)
    assert v.grad[0, 0, 2:].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="same shape|share one shape"):
        ground_ray_depth(lidar2img, u, v[..., :3], ground_z=-1.5)


@settings(max_examples=30, deadline=None)
@given(x=st.floats(5.0, 60.0), lateral=st.floats(-0.6, 0.6), height=st.floats(0.5, 4.0), yaw=st.floats(-3.0, 3.0))
def test_contact_row_targets_meet_the_road_at_the_true_depth(x, lateral, height, yaw):
    """A box standing on the road 1.5 m below the camera: the pixel (centre column, contact row) of
    its targets, sent back along its ray, meets the road at the box's depth (capped at 200 m)."""
    boxes = box(x, lateral * x, -1.5 + height / 2, h=height, yaw=yaw)
    _, reg, weight = dense_targets(boxes, np.array([0]), LIDAR2IMG, (WIDTH, HEIGHT), STRIDE, CLASSES)
    rows, cols = np.nonzero(weight[0])
    assert len(rows) > 0
    u = torch.from_numpy((cols + 0.5 + reg[0, 0, rows, cols]) * STRIDE).view(1, 1, -1)
    v = torch.from_numpy((rows + 0.5 + reg[0, 3, rows, cols]) * STRIDE).view(1, 1, -1)
    depth, hits = ground_ray_depth(torch.from_numpy(LIDAR2IMG)[None], u, v, ground_z=-1.5)
    assert bool(hits.all())
    assert depth[0, 0].numpy() == pytest.approx(np.full(len(rows), min(x, _GROUND_DEPTH_CAP)), rel=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    x=st.floats(4.0, 50.0),
    lateral=st.floats(-0.6, 0.6),
    z=st.floats(-1.5, 1.0),
    label=st.integers(0, CLASSES - 1),
)
def test_perfect_head_selects_the_true_centre(x, lateral, z, label):
    """Targets used as predictions: the selected token back-projects to the box centre (an independent
    inverse of the projection that made the targets)."""
    boxes = box(x, lateral * x, z * x / 20)
    heat, reg, weight = dense_targets(boxes, np.array([label]), LIDAR2IMG, (WIDTH, HEIGHT), STRIDE, CLASSES)
    if heat.max() < 1.0:  # the centre projects outside the image
        return
    logits = torch.from_numpy(np.where(heat == 1.0, 5.0, -5.0 + heat)).unsqueeze(0)
    index, center, peak = select_proposals(
        logits, torch.from_numpy(reg)[None], torch.from_numpy(LIDAR2IMG)[None], 16, 1
    )
    row, col = np.argwhere(heat[0, label] == 1.0)[0]
    assert index.tolist() == [[row * 11 + col]] and peak.tolist() == [[True]]
    torch.testing.assert_close(center[0, 0], torch.from_numpy(boxes[0, :3]), atol=1e-3 * x, rtol=0)


def test_select_proposals_errors_and_shapes():
    logits = torch.randn(2, 6, 10, 2, 3)
    reg = torch.randn(2, 6, 3, 2, 3)
    lidar2img = torch.eye(4).expand(2, 6, 4, 4)
    index, center, peak = select_proposals(logits, reg, lidar2img, 16, 36)
    assert index.shape == (2, 36) and center.shape == (2, 36, 3) and peak.shape == (2, 36)
    assert sorted(index[0].tolist()) == list(range(36))  # every token once
    # Peaks (3x3 local maxima of each camera's best class score) come first, whatever their score.
    num_peaks = int(peak[0].sum())
    assert 6 <= num_peaks < 36 and peak[0, :num_peaks].all() and not peak[0, num_peaks:].any()


def test_peaks_come_before_stronger_neighbours():
    # One camera, one row of five tokens: an object's peak (token 2) with a strong neighbour
    # (token 1, a near-duplicate), and a weak lone peak (token 4).
    logits = torch.tensor([-5.0, 2.0, 3.0, -5.0, -4.0]).view(1, 1, 1, 1, 5)
    index, _, peak = select_proposals(logits, torch.zeros(1, 1, 3, 1, 5), torch.eye(4)[None, None], 16, 5)
    assert index[0].tolist()[:3] == [2, 4, 1]
    assert peak[0].tolist() == [True, True, False, False, False]


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_class_peaks_by_hand():
    # One row of three cells, two classes. Cell 0: class 0 at 0.9. Cell 1: class 0 at 0.5 (its best,
    # below cell 0's) and class 1 at 0.4, the highest class-1 score around. Cell 2: 0.1 for both.
    probs = [[0.9, 0.5, 0.1], [0.05, 0.4, 0.1]]
    logits = torch.tensor([[logit(p) for p in row] for row in probs]).view(2, 1, 3)
    assert proposal_peaks(logits).tolist() == [[True, False, False]]  # best-class peaks only
    assert proposal_peaks(logits, 0.3).tolist() == [[True, True, False]]  # class 1 peaks at 0.4 >= 0.3
    assert proposal_peaks(logits, 0.45).tolist() == [[True, False, False]]  # ... but not >= 0.45
    # The extra peak is proposed right after the best-class one, ahead of the non-peak.
    index, _, peak = select_proposals(
        logits[None, None], torch.zeros(1, 1, 3, 1, 3), torch.eye(4)[None, None], 16, 3, 0.3
    )
    assert index[0].tolist() == [0, 1, 2] and peak[0].tolist() == [True, True, False]
    with pytest.raises(ValueError, match="class_peak_threshold must lie in \\(0, 1\\), got 1.5"):
        proposal_peaks(logits, 1.5)


def slow_peaks(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """proposal_peaks cell by cell: [C, h, w] probabilities -> [h, w] bool."""
    c, h, w = probs.shape
    best = probs.max(0)
    out = np.zeros((h, w), bool)
    for r in range(h):
        for q in range(w):
            around = (slice(max(r - 1, 0), r + 2), slice(max(q - 1, 0), q + 2))
            out[r, q] = best[r, q] >= best[around].max()
            if threshold is not None:
                out[r, q] |= any(
                    probs[k, r, q] >= threshold and probs[k, r, q] >= probs[k][around].max() for k in range(c)
                )
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 5),
    st.one_of(st.none(), st.floats(0.05, 0.95)),
    st.integers(0, 2**31 - 1),
)
def test_proposal_peaks_against_a_cell_by_cell_loop(classes, h, w, threshold, seed):
    # Probabilities on a coarse grid of values, so that ties (equal neighbours) occur too.
    probs = np.random.default_rng(seed).integers(1, 10, (classes, h, w)) / 10.0
    logits = torch.from_numpy(np.log(probs / (1 - probs)))
    got = proposal_peaks(logits, threshold).numpy()
    np.testing.assert_array_equal(got, slow_peaks(probs, threshold))
    # Class peaks only ever add proposals to the best-class ones.
    assert (got >= proposal_peaks(logits).numpy()).all()


def test_key_index_maps_fine_cells_to_their_keys_by_hand():
    # Two cameras, a 4 x 6 head grid under a 2 x 3 key grid (stride 8 under stride 16).
    cell = torch.tensor([[0, 7, 1 * 24 + 3 * 6 + 5, 1 * 24 + 2 * 6 + 2]])
    # cell 7 = camera 0, row 1, column 1 -> key (0, 0, 0); (1, 3, 5) -> key 6 + 1*3 + 2; (1, 2, 2) -> 6 + 3 + 1
    assert key_index(cell, (4, 6), 2).tolist() == [[0, 0, 11, 10]]
    assert key_index(cell, (4, 6), 1) is cell
    # An odd grid: the last row of cells belongs to the last row of keys.
    assert key_index(torch.tensor([[4 * 6]]), (5, 6), 2).tolist() == [[1 * 3]]


def _rig_lidar2img(image_size=(352, 128)) -> torch.Tensor:
    from tggbc.data.rig import CameraRig

    rig = CameraRig.default(image_size)
    lidar2img = []
    for intrinsic, cam2ego in zip(rig.intrinsics, rig.cam2ego, strict=True):
        k = np.eye(4)
        k[:3, :3] = intrinsic
        lidar2img.append(k @ np.linalg.inv(cam2ego) @ rig.lidar2ego)
    return torch.from_numpy(np.stack(lidar2img))[None], rig  # (1, 6, 4, 4)


def test_camera_geometry_against_a_slow_ray_march():
    lidar2img, rig = _rig_lidar2img()
    ground_z = -float(rig.lidar2ego[2, 3])  # the road, in the lidar frame
    geometry, log_focal = camera_geometry(lidar2img, (352, 128), 16, ground_z)
    assert geometry.shape == (1, 6, GEOMETRY_CHANNELS, 8, 22) and log_focal.shape == (1, 6)
    # The focal ratio against the rig's own intrinsics: 1 for the 70-degree cameras, tan 35 / tan 55 for the back.
    reference = 352 / (2 * math.tan(math.radians(35.0)))
    assert log_focal[0].exp().numpy() == pytest.approx(rig.intrinsics[:, 0, 0] / reference, rel=1e-6)
    assert log_focal[0, 3].exp() == pytest.approx(math.tan(math.radians(35)) / math.tan(math.radians(55)), rel=1e-6)
    # Ground depth: march each token centre's ray in 1 cm steps until it passes below the road.
    inverse = np.linalg.inv(lidar2img[0].numpy())
    depths = np.arange(0.5, 200.0, 0.01)
    for cam, row, col in [(0, 7, 11), (0, 4, 3), (3, 6, 20), (1, 5, 0), (0, 0, 11)]:
        u, v = (col + 0.5) * 16, (row + 0.5) * 16
        points = np.stack([u * depths, v * depths, depths, np.ones_like(depths)], 1) @ inverse[cam].T
        below = np.flatnonzero(points[:, 2] < ground_z)
        hits = float(geometry[0, cam, 1, row, col])
        if len(below) == 0:  # at or above the horizon
            assert hits == 0.0 and float(geometry[0, cam, 0, row, col]) == pytest.approx(math.log(200 / 20))
        else:
            assert hits == 1.0
            ground = 20.0 * math.exp(float(geometry[0, cam, 0, row, col]))
            assert ground == pytest.approx(depths[below[0]], abs=0.011)
    assert (geometry[0, :, 2] == log_focal[0, :, None, None]).all()
