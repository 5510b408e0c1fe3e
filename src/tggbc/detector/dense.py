"""Dense per-token supervision and query selection: how the small detector gets off the DETR plateau.

A set-prediction decoder with learnable anchors needs many epochs before its queries find objects;
a CPU has time for a few. So the detector also predicts, for every image token (one stride-16 cell
of one camera), a class heatmap and where the object centre behind it is (sub-cell offset and
depth), supervised densely like a CenterNet head. The decoder's reference points are then the
centres of the top-Nq tokens, back-projected to 3D, and its queries start from those tokens'
features (two-stage query selection, as Deformable DETR and DINO do). The decoder itself is the
unchanged PETR decoder; tgGBC works on it exactly as on the hosts.

Shape letters: B batch, N cameras, C classes, h, w token grid, M boxes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.raycast import box_corners
from ..data.transforms import in_image, project_points

# Regression channels of the dense head: (du, dv) offset of the projected centre from the token
# centre, in tokens, and log of the centre's depth along the camera axis, in metres.
REG_CHANNELS = 3
# Targets carry one channel more: the row of the box's ground contact point (the centre of its
# bottom face), as an offset from the token centre in tokens, for a ground-contact head (below).
TARGET_CHANNELS = 4
# A ground-contact head (DetectorConfig.ground_contact) regresses that row too and a gate; its
# regression then has CONTACT_CHANNELS more channels after the fused (du, dv, log depth): its direct
# log depth, the log depth where the ray through the contact pixel meets the road, and the row.
CONTACT_CHANNELS = 3
_DEPTH_WEIGHT = 2.0  # log-depth errors matter more than sub-token offsets for the 3D centre
_MIN_SIGMA, _MAX_SIGMA = 0.5, 2.0  # Gaussian radius in tokens
_REG_THRESHOLD = 0.2  # tokens whose Gaussian value exceeds this regress the object's centre
# Regression weight of each object in each camera, spread over its tokens in proportion to their
# Gaussian values. Without it an object's weight was the sum of its Gaussian, about 1.6 pi sigma^2
# over the tokens above _REG_THRESHOLD, which grows with its image size: 16-fold from sigma = 0.5 (far,
# small) to 2 tokens (near, large), so the far objects, whose depth is hardest, barely trained it.
_REG_MASS = 6.0


# What the head is told about each token's camera ray (the calibration PETR gives its keys too):
# the log depth at which the ray meets the ground plane (tokens above the horizon get the cap),
# whether it meets it at all, and the camera's log focal ratio (below). On a flat road the first is
# the depth of whatever stands at that pixel up to a class-dependent factor: a cue a small CNN
# cannot read off the pixels, because convolutions do not know where in the image they are.
GEOMETRY_CHANNELS = 3
_GROUND_DEPTH_CAP = 200.0  # metres
# Depth is regressed as a 70-degree camera at the same image width would see it (five of the six
# nuScenes cameras): the same car looks half as large in the 110-degree back camera, and a head that
# shares weights across cameras cannot tell which one it is looking through.
_REFERENCE_FOV_DEG = 70.0


def ground_ray_depth(lidar2img: Tensor, u: Tensor, v: Tensor, ground_z: float) -> tuple[Tensor, Tensor]:
    """Where the ray through each pixel meets the road.

    Args:
        lidar2img: [B, N, 4, 4] = K @ lidar2cam. u, v: [B, N, ...] pixels (the same shape).
        ground_z: the road's height in the lidar frame, metres.
    Returns:
        depth [B, N, ...] along the camera's axis at which the ray meets the plane z = ground_z,
        clamped to [1 m, _GROUND_DEPTH_CAP], and hits [B, N, ...] bool (False: the ray runs level or
        upwards; depth is the cap there). Differentiable in u and v, in their dtype.
    """
    if u.shape != v.shape or u.shape[:2] != lidar2img.shape[:2]:
        raise ValueError(
            f"u {tuple(u.shape)} and v {tuple(v.shape)} must share one shape starting with lidar2img's"
            f" [B, N] = {list(lidar2img.shape[:2])}"
        )
    inverse = torch.linalg.inv(lidar2img[..., :3, :3].double())  # (B, N, 3, 3) = (K R)^-1
    origin_z = -(inverse @ lidar2img[..., :3, 3:].double())[..., 2, 0]  # (B, N) camera centre height
    extra = (1,) * (u.dim() - 2)
    # The ray through pixel (u, v), scaled to unit camera depth, changes height by
    # row . (u, v, 1) per metre of depth, row = (K R)^-1's third row (lidar z).
    a, b, c = (inverse[..., 2, i].view(*u.shape[:2], *extra).to(u.dtype) for i in range(3))
    ray_z = a * u + b * v + c
    height = (ground_z - origin_z).view(*u.shape[:2], *extra).to(u.dtype)  # negative: the road is below
    hits = (ray_z < 0) & (height < 0)
    safe = torch.where(hits, ray_z, -torch.ones_like(ray_z))  # no inf in the branch torch.where drops
    depth = (height / safe).clamp(1.0, _GROUND_DEPTH_CAP)
    return torch.where(hits, depth, torch.full_like(depth, _GROUND_DEPTH_CAP)), hits


def cell_centres(h: int, w: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Rows and columns [h, w] of each cell's centre, in cells."""
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=dtype, device=device) + 0.5,
        torch.arange(w, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    return rows, cols


def camera_geometry(
    lidar2img: Tensor, image_size: tuple[int, int], stride: int, ground_z: float
) -> tuple[Tensor, Tensor]:
    """Per-token camera-ray features and per-camera focal ratios.

    Args:
        lidar2img: [B, N, 4, 4] = K @ lidar2cam with K = [[f, 0, cu], [0, f, cv], [0, 0, 1]].
        image_size: (W, H) pixels. stride: pixels per token. ground_z: the road's height in the
            lidar frame, metres.
    Returns:
        geometry [B, N, GEOMETRY_CHANNELS, h, w] float32 (log ground depth relative to 20 m, 1 where
        the ray meets the ground, log focal ratio), log_focal_ratio [B, N] float32: log(f / f_ref),
        f_ref the focal of a 70-degree camera at this image width.
    """
    width, height = image_size
    h, w = height // stride, width // stride
    matrix = lidar2img[..., :3, :3].double()  # (B, N, 3, 3) = K R
    # K R R^T K^T = K K^T: its (1, 1) entry is f^2 + cv^2 and its (1, 2) entry is cv.
    gram = matrix @ matrix.transpose(-1, -2)
    focal = (gram[..., 1, 1] - gram[..., 1, 2] ** 2).clamp_min(1e-6).sqrt()  # (B, N)
    reference = width / (2.0 * math.tan(math.radians(_REFERENCE_FOV_DEG) / 2.0))
    log_focal = (focal / reference).log()
    rows, cols = cell_centres(h, w, lidar2img.device, torch.float64)
    grid = lidar2img.shape[:2] + (h, w)
    ground_depth, hits = ground_ray_depth(
        lidar2img, (cols * stride).expand(grid), (rows * stride).expand(grid), ground_z
    )
    features = torch.stack(
        [(ground_depth / 20.0).log(), hits.double(), log_focal[..., None, None].expand_as(ground_depth)], 2
    )  # (B, N, 3, h, w)
    return features.float(), log_focal.float()


def dense_targets(
    boxes: np.ndarray,
    labels: np.ndarray,
    lidar2img: np.ndarray,
    image_size: tuple[int, int],
    stride: int,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token targets of one frame.

    Every box whose centre projects into a camera puts a Gaussian (radius from its projected
    size) on that camera's class heatmap, peak exactly 1 at the token holding the centre. Tokens
    near a centre regress it: offset, log depth and the row of its ground contact point. Where two
    objects compete for a token the higher Gaussian wins, the nearer object on ties (it occludes
    the other). Each object's tokens then share one fixed regression weight, _REG_MASS, in
    proportion to their Gaussian values, so a far object a token wide counts as much as a near one
    that covers twenty.

    Args:
        boxes: [M, >=7] lidar frame (x, y, z, w, l, h, yaw, ...). labels: [M] class indices.
        lidar2img: [N, 4, 4]. image_size: (W, H) pixels. stride: pixels per token.
    Returns:
        heatmap [N, C, h, w] float32, reg [N, TARGET_CHANNELS, h, w] float32 (du, dv, log depth,
        contact row offset), reg_weight [N, h, w] float32.
    """
    width, height = image_size
    h, w = height // stride, width // stride
    n = lidar2img.shape[0]
    heat = np.zeros((n, num_classes, h, w), np.float32)
    reg = np.zeros((n, TARGET_CHANNELS, h, w), np.float32)
    claim = np.zeros((n, h, w), np.float32)  # Gaussian value of the object that owns each token
    owner = np.full((n, h, w), -1, np.int64)  # that object's index, -1: no object
    if len(boxes) == 0:
        return heat, reg, claim
    boxes = boxes.astype(np.float64)
    corners = np.stack([box_corners(box[:3], box[3:6], box[6]) for box in boxes])  # (M, 8, 3)
    bottom = boxes[:, :3].copy()
    bottom[:, 2] -= boxes[:, 5] / 2  # boxes stand on the road: their bottom face touches it
    points = np.concatenate([boxes[:, None, :3], corners, bottom[:, None]], 1)  # (M, 10, 3): centre, corners, contact
    uv, depth = project_points(points, lidar2img)  # (N, M, 10, 2), (N, M, 10)
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)  # (h, w) token centres, in tokens
    for cam in range(n):
        u, v, d = uv[cam, :, 0, 0], uv[cam, :, 0, 1], depth[cam, :, 0]
        inside = in_image(uv[cam, :, 0], d, image_size)
        # Far objects first so that nearer ones overwrite them where the Gaussians tie.
        for m in sorted(np.flatnonzero(inside), key=lambda i: -d[i]):
            front = depth[cam, m, 1:9] > 0.1
            corners = uv[cam, m, 1:9][front] if front.any() else uv[cam, m, :1]
            extent = (corners.max(0) - corners.min(0)) / stride  # (2,) tokens
            sigma = float(np.clip(extent.min() / 4.0, _MIN_SIGMA, _MAX_SIGMA))
            cu, cv = u[m] / stride, v[m] / stride
            g = np.exp(-((cols - cu) ** 2 + (rows - cv) ** 2) / (2 * sigma**2))  # (h, w)
            peak_r, peak_c = min(int(cv), h - 1), min(int(cu), w - 1)
            g[peak_r, peak_c] = 1.0
            np.maximum(heat[cam, labels[m]], g, out=heat[cam, labels[m]])
            wins = (g > _REG_THRESHOLD) & (g >= claim[cam])
            reg[cam, 0][wins] = (cu - cols)[wins]
            reg[cam, 1][wins] = (cv - rows)[wins]
            reg[cam, 2][wins] = np.log(d[m])
            reg[cam, 3][wins] = (uv[cam, m, 9, 1] / stride - rows)[wins]
            claim[cam][wins] = g[wins]
            owner[cam][wins] = m
    # Each (camera, object) pair's Gaussian values, over the tokens it kept, scaled to sum to _REG_MASS.
    owned = owner >= 0
    pair = (np.arange(n)[:, None, None] * len(boxes) + owner)[owned]
    total = np.bincount(pair, weights=claim[owned], minlength=n * len(boxes))
    weight = np.zeros_like(claim)
    weight[owned] = claim[owned] * (_REG_MASS / total[pair])
    return heat, reg, weight


def dense_loss(
    cls_logits: Tensor, reg_pred: Tensor, heatmap: Tensor, reg_target: Tensor, reg_weight: Tensor
) -> tuple[Tensor, Tensor]:
    """CenterNet's penalty-reduced focal loss on the heatmap and a Gaussian-weighted L1 on the
    regression, both normalised by the number of objects.

    Args:
        cls_logits, heatmap: [B, N, C, h, w]. reg_pred: [B, N, R, h, w], R = REG_CHANNELS, or
            REG_CHANNELS + CONTACT_CHANNELS from a ground-contact head (`PETRDetector.dense`).
        reg_target: [B, N, T, h, w], T = TARGET_CHANNELS (or REG_CHANNELS for a plain head).
        reg_weight: [B, N, h, w].
    Returns:
        (heatmap loss, regression loss) scalars. The fused log depth weighs _DEPTH_WEIGHT; a
        ground-contact head's direct and geometric log depths and its contact row weigh 1 each,
        so each estimate stays good on its own and the gate can learn which to trust.
    """
    contact = reg_pred.shape[2] == REG_CHANNELS + CONTACT_CHANNELS
    if reg_pred.shape[2] not in (REG_CHANNELS, REG_CHANNELS + CONTACT_CHANNELS):
        raise ValueError(
            f"reg_pred must have {REG_CHANNELS} or {REG_CHANNELS + CONTACT_CHANNELS} channels: {tuple(reg_pred.shape)}"
        )
    if reg_target.shape[2] < (TARGET_CHANNELS if contact else REG_CHANNELS):
        raise ValueError(f"reg_target {tuple(reg_target.shape)} lacks the contact row a ground-contact head needs")
    logits = cls_logits.float()
    positive = heatmap.eq(1.0)
    p = logits.sigmoid()
    pos_loss = -F.logsigmoid(logits) * (1 - p).pow(2) * positive
    neg_loss = -F.logsigmoid(-logits) * p.pow(2) * (1 - heatmap).pow(4) * ~positive
    num_pos = positive.sum().clamp_min(1)
    # Which target channel each predicted channel answers, and its weight.
    source, weight = [0, 1, 2], [1.0, 1.0, _DEPTH_WEIGHT]
    if contact:
        source, weight = source + [2, 2, 3], weight + [1.0, 1.0, 1.0]
    target = reg_target[:, :, source]
    channel_weight = reg_pred.new_tensor(weight).float().view(1, 1, -1, 1, 1)
    reg_l1 = ((reg_pred.float() - target).abs() * channel_weight * reg_weight.unsqueeze(2)).sum()
    return (pos_loss.sum() + neg_loss.sum()) / num_pos, reg_l1 / num_pos


def peak_mask(score: Tensor) -> Tensor:
    """CenterNet's 3x3 peak test: score [..., h, w] -> bool [..., h, w], True where no neighbour
    (the 8 around, clipped at the border) scores higher."""
    flat = score.reshape(-1, 1, *score.shape[-2:])
    return (F.max_pool2d(flat, 3, 1, 1) == flat).view(score.shape)


def proposal_peaks(cls_logits: Tensor, class_peak_threshold: float | None = None) -> Tensor:
    """Which cells propose an object: cls_logits [..., C, h, w] -> bool [..., h, w].

    A cell is a peak of its best class score (`peak_mask`). With `class_peak_threshold` t, it is
    also one where some class's probability is a 3x3 local maximum of that class alone and at least
    t: a pedestrian beside a car, or a far car behind a nearer truck, then keeps a proposal of its
    own, where the best-class test leaves it to its neighbour's, at its neighbour's depth. Low
    thresholds also let through weak secondary maxima next to objects already proposed, which an
    NMS-free decoder then reports twice (measured: `tggbc eval --class-peak-threshold`, README).
    """
    logits = cls_logits.float()
    peak = peak_mask(logits.amax(-3))
    if class_peak_threshold is not None:
        if not 0.0 < class_peak_threshold < 1.0:
            raise ValueError(f"class_peak_threshold must lie in (0, 1), got {class_peak_threshold}")
        # The sigmoid is monotonic: logits have the same local maxima as probabilities.
        floor = math.log(class_peak_threshold / (1.0 - class_peak_threshold))
        peak |= (peak_mask(logits) & (logits >= floor)).any(-3)
    return peak


def cell_values(grid: Tensor, cell: Tensor) -> Tensor:
    """The channels of a per-camera grid at camera-major cell indices.

    Args:
        grid: [B, N, K, h, w]. cell: [B, Q] long, index into (camera, row, column).
    Returns:
        [B, Q, K].
    """
    channels = grid.shape[2]
    flat = grid.permute(0, 1, 3, 4, 2).flatten(1, 3)  # (B, N*h*w, K), camera-major like the cells
    return flat.gather(1, cell[..., None].expand(-1, -1, channels))


def select_proposals(
    cls_logits: Tensor,
    reg_pred: Tensor,
    lidar2img: Tensor,
    stride: int,
    count: int,
    class_peak_threshold: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The `count` most confident tokens and the 3D centres they predict.

    Args:
        cls_logits: [B, N, C, h, w]. reg_pred: [B, N, 3, h, w]. lidar2img: [B, N, 4, 4].
        stride: pixels per token. count: how many proposals (the decoder's query count).
        class_peak_threshold: see `proposal_peaks`.
    Returns:
        token index [B, count] into the camera-major keys (camera, row, column), centre
        [B, count, 3] in the lidar frame, metres, and is_peak [B, count] bool (the token passes
        `proposal_peaks`; peaks come first, each group by its best class score). No gradient.
    """
    _, n, _, h, w = cls_logits.shape
    if count > n * h * w:
        raise ValueError(f"cannot select {count} proposals from {n * h * w} tokens ({n} cameras x {h}x{w})")
    with torch.no_grad():
        score = cls_logits.float().amax(2)  # (B, N, h, w)
        # Local maxima first (CenterNet's 3x3 peak test): one proposal per object, ahead of its
        # neighbours, which would be near-duplicates the decoder's one-to-one matching must then
        # tell apart (measured: that is what held the decoder's scores back). The caller decides
        # what to do with the non-peak slots at the end.
        peak = proposal_peaks(cls_logits, class_peak_threshold)
        score = (score + peak * 100.0).flatten(1)  # (B, N*h*w), camera-major like the keys
        index = score.topk(count, dim=1).indices  # (B, count)
        is_peak = peak.flatten(1).gather(1, index)  # (B, count)
        reg = cell_values(reg_pred.float(), index)
        cam, row, col = index // (h * w), (index // w) % h, index % w
        u = (col + 0.5 + reg[..., 0]) * stride
        v = (row + 0.5 + reg[..., 1]) * stride
        depth = reg[..., 2].clamp(-2.0, 6.0).exp()  # 0.14 m .. 400 m: keeps a wild early guess finite
        point = torch.stack([u * depth, v * depth, depth, torch.ones_like(depth)], -1)  # (B, count, 4)
        img2lidar = torch.linalg.inv(lidar2img.double()).float()  # (B, N, 4, 4)
        matrix = img2lidar.gather(1, cam[..., None, None].expand(-1, -1, 4, 4))  # (B, count, 4, 4)
        center = (matrix @ point[..., None]).squeeze(-1)[..., :3]
    return index, center, is_peak


def key_index(cell: Tensor, grid: tuple[int, int], factor: int) -> Tensor:
    """Camera-major cell indices of a head grid -> the indices of the keys that hold those cells.

    Args:
        cell: [B, Q] long, index into (camera, row, column) of a head grid of `grid` = (h', w') cells.
        grid: (h', w'). factor: head cells per key along each axis (1, or 2 for a stride-8 head
            under stride-16 keys).
    Returns:
        [B, Q] long index into the keys' (camera, row, column) grid of (h' // factor, w' // factor).
    """
    if factor == 1:
        return cell
    rows, cols = grid
    h, w = rows // factor, cols // factor
    cam, row, col = cell // (rows * cols), (cell // cols) % rows, cell % cols
    return cam * (h * w) + (row // factor).clamp(max=h - 1) * w + (col // factor).clamp(max=w - 1)
