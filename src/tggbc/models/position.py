"""The key side of the PETR-family heads: image features + camera geometry -> decoder keys.

Each module turns neck features [B, N_cam, C, H, W] into what the decoders take: memory and
key_pos [B, N_cam*H*W, E] flattened camera-major (camera, row, column) and, for PETR, a key
padding mask. Together with a backbone and a neck they make a full detector.

PETR (ECCV 2022): every feature pixel (u, v) gives a frustum of 64 points (u*d, v*d, d, 1) at
linear-increasing depths d_i = 1 + 60.2 * i (i+1) / (64*65); the inverse lidar2img maps them to
the lidar frame, they are normalised by the position range [-61.2, -61.2, -10, 61.2, 61.2, 10],
inverse-sigmoid-ed and encoded by 1x1 convs 192 -> 1024 -> 256. PETR adds a 3D sine encoding of
(camera, row, column) through 1x1 convs 384 -> 1024 -> 256 ("multiview" in its configs).

StreamPETR / FocalPETR: the same frustum from pixel centres, encoded by Linear 192 -> 1024 -> 256;
the features go through an MLP and a motion-aware layer norm conditioned on the camera cone
(spatial alignment), and the position embedding is gated by the features.

Imports nothing but torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .layers import MotionLayerNorm, QueryPositionEmbedding, inverse_sigmoid, sine_embed_1d, sine_embed_3d

__all__ = [
    "DecoderKeys",
    "PETRPositionEmbedding",
    "StreamPETRPositionEmbedding",
    "FeatureGate",
    "QueryPositionEmbedding",
    "POSITION_RANGE",
    "lid_depth_bins",
    "frustum_points",
    "padding_mask",
    "sine_embed_cameras",
    "sine_embed_1d",
    "sine_embed_3d",
]

POSITION_RANGE = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)


class DecoderKeys(NamedTuple):
    """memory, key_pos: [B, Nk, E]; key_padding_mask: [B, Nk] bool (True = padded pixel) or None;
    outside_range: [B, Nk] bool, padded or with more than half its frustum outside the position
    range (PETR computes it but feeds only the padding mask to its decoder), or None."""

    memory: Tensor
    key_pos: Tensor
    key_padding_mask: Tensor | None
    outside_range: Tensor | None


def lid_depth_bins(
    depth_num: int = 64, depth_start: float = 1.0, depth_max: float = 61.2, device: torch.device | str | None = None
) -> Tensor:
    """Linear-increasing depth bins: d_i = start + (max - start) * i (i+1) / (D (D+1)), i = 0..D-1.

    Returns:
        [D] float32 depths in metres (1.0 ... 60.27 for the defaults).
    """
    # Float32 arithmetic in the published order (its position_range is a float32 tensor), so the
    # bins equal the `coords_d` the published checkpoints store bit for bit.
    index = torch.arange(depth_num, dtype=torch.float32, device=device)
    bin_size = (torch.tensor(depth_max, dtype=torch.float32, device=device) - depth_start) / (
        depth_num * (1 + depth_num)
    )
    return depth_start + bin_size * index * (index + 1)


def frustum_points(u: Tensor, v: Tensor, depths: Tensor, eps: float = 1e-5) -> Tensor:
    """Homogeneous image-space frustum points (u*d, v*d, d, 1), ready for the inverse lidar2img.

    Args:
        u, v: [P] pixel coordinates of P feature pixels (in input-image pixels).
        depths: [D] depth bins.
    Returns:
        [P, D, 4].
    """
    d = depths.clamp(min=eps)[None, :].expand(u.shape[0], -1)  # (P, D)
    return torch.stack([u[:, None] * d, v[:, None] * d, depths[None, :].expand_as(d), torch.ones_like(d)], dim=-1)


def _to_lidar(img2lidar: Tensor, points: Tensor, position_range: Tensor) -> Tensor:
    """[B, N, 4, 4] x [P, D, 4] -> [B, N, P, D, 3] lidar points normalised by the position range."""
    xyz = torch.einsum("bnij,pdj->bnpdi", img2lidar, points)[..., :3]
    low, high = position_range[:3], position_range[3:]
    return (xyz - low) / (high - low)


def padding_mask(img_shape: Tensor, pad_shape: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Which feature pixels fall in the padding, as PETR gets it (nearest resize of a pixel mask).

    Args:
        img_shape: [B, N, 2] valid (height, width) of each camera image before padding.
        pad_shape: (pad_h, pad_w) of the padded input.
        size: (H, W) of the feature map.
    Returns:
        [B, N, H, W] bool, True in the padding.
    """
    (pad_h, pad_w), (h, w) = pad_shape, size
    device = img_shape.device
    # Nearest-neighbour source pixel of each feature pixel (what F.interpolate(mode="nearest") picks).
    rows = (torch.arange(h, device=device, dtype=torch.float32) * (pad_h / h)).floor().long().clamp(max=pad_h - 1)
    cols = (torch.arange(w, device=device, dtype=torch.float32) * (pad_w / w)).floor().long().clamp(max=pad_w - 1)
    valid_h, valid_w = img_shape[..., 0, None], img_shape[..., 1, None]  # (B, N, 1)
    return (rows >= valid_h)[..., :, None] | (cols >= valid_w)[..., None, :]


def sine_embed_cameras(mask: Tensor, num_feats: int = 128, temperature: float = 10000.0, eps: float = 1e-6) -> Tensor:
    """PETR's 3D sine encoding of (camera, row, column) over the unpadded pixels (normalised to 2*pi).

    Args:
        mask: [B, N, H, W] bool, True for padded pixels.
    Returns:
        [B, N, 3 * num_feats, H, W]: (camera, row, column) blocks, each num_feats/2 sines then
        num_feats/2 cosines.
    """
    not_mask = (~mask).float()
    scale = 2 * math.pi
    embeds = []
    for dim in (1, 2, 3):  # camera, row, column
        c = not_mask.cumsum(dim)
        last = c.narrow(dim, c.shape[dim] - 1, 1)
        c = c / (last + eps) * scale
        dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
        x = c[..., None] / dim_t
        # Reference layout: all sines, then all cosines (its stack runs over a non-last dim with
        # the camera axis present), unlike the interleaved query encoding.
        embeds.append(torch.cat((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1))
    return torch.cat(embeds, dim=-1).permute(0, 1, 4, 2, 3)


def _camera_major(x: Tensor) -> Tensor:
    """[B, N, E, H, W] -> [B, N*H*W, E] ordered (camera, row, column)."""
    b, n, e, h, w = x.shape
    return x.permute(0, 1, 3, 4, 2).reshape(b, n * h * w, e)


def _check_geometry(img_feats: Tensor, lidar2img: Tensor) -> None:
    if img_feats.dim() != 5:
        raise ValueError(f"img_feats must be [B, N_cam, C, H, W], got {tuple(img_feats.shape)}")
    if tuple(lidar2img.shape) != (*img_feats.shape[:2], 4, 4):
        raise ValueError(
            f"lidar2img must be [B, N_cam, 4, 4] = {(*img_feats.shape[:2], 4, 4)}, got {tuple(lidar2img.shape)}"
        )


class PETRPositionEmbedding(nn.Module):
    """PETR's key side: input projection, 3D position embedding and padding mask.

    Args:
        in_channels: neck channels C.
        embed_dims: E.
        depth_num: depth bins D (3D inputs = 3 * D channels).
        depth_start: nearest depth (m).
        position_range: (x_min, y_min, z_min, x_max, y_max, z_max) in the lidar frame; the
            farthest depth is x_max.
    """

    def __init__(
        self,
        in_channels: int = 256,
        embed_dims: int = 256,
        depth_num: int = 64,
        depth_start: float = 1.0,
        position_range: Sequence[float] = POSITION_RANGE,
    ):
        super().__init__()
        self.embed_dims, self.depth_num = embed_dims, depth_num
        self.input_proj = nn.Conv2d(in_channels, embed_dims, kernel_size=1)
        self.position_encoder = nn.Sequential(
            nn.Conv2d(3 * depth_num, 4 * embed_dims, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(4 * embed_dims, embed_dims, kernel_size=1),
        )
        self.adapt_pos3d = nn.Sequential(
            nn.Conv2d(3 * embed_dims // 2, 4 * embed_dims, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(4 * embed_dims, embed_dims, kernel_size=1),
        )
        self.register_buffer("position_range", torch.tensor([float(v) for v in position_range]), persistent=False)
        self.register_buffer(
            "depths", lid_depth_bins(depth_num, depth_start, float(position_range[3])), persistent=False
        )

    def forward(
        self,
        img_feats: Tensor,
        lidar2img: Tensor,
        pad_shape: tuple[int, int],
        img_shape: Tensor | None = None,
    ) -> DecoderKeys:
        """Decoder keys of one frame.

        Args:
            img_feats: [B, N, C, H, W] neck features.
            lidar2img: [B, N, 4, 4] lidar-to-image projection of each camera (input-image pixels).
            pad_shape: (pad_h, pad_w) of the padded input images.
            img_shape: [B, N, 2] valid (h, w) of each image before padding; None = no padding.
        Returns:
            DecoderKeys; key_padding_mask is None when img_shape is None.
        """
        _check_geometry(img_feats, lidar2img)
        key_pos, key_padding_mask, outside = self.embed(lidar2img, img_feats.shape[-2:], pad_shape, img_shape)
        return DecoderKeys(self.project(img_feats), key_pos, key_padding_mask, outside)

    def project(self, img_feats: Tensor) -> Tensor:
        """The memory: input_proj of the features, [B, N, C, H, W] -> [B, N*H*W, E] camera-major."""
        b, n, _, h, w = img_feats.shape
        memory = self.input_proj(img_feats.flatten(0, 1).to(self.input_proj.weight.dtype))
        return _camera_major(memory.view(b, n, self.embed_dims, h, w))

    def embed(
        self,
        lidar2img: Tensor,
        feature_shape: tuple[int, int],
        pad_shape: tuple[int, int],
        img_shape: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """The key side that depends on the cameras only (a fixed rig can compute it once).

        Args:
            lidar2img: [B, N, 4, 4]; feature_shape: (H, W) of the features; pad_shape, img_shape:
            as in `forward`.
        Returns:
            key_pos [B, N*H*W, E], key_padding_mask [B, N*H*W] or None, outside_range [B, N*H*W].
        """
        b, n = lidar2img.shape[:2]
        h, w = feature_shape
        pad_h, pad_w = pad_shape
        device, dtype = lidar2img.device, self.input_proj.weight.dtype
        if img_shape is None:
            mask = torch.zeros(b, n, h, w, dtype=torch.bool, device=device)
        else:
            mask = padding_mask(img_shape.to(device), (pad_h, pad_w), (h, w))

        # Frustum of every feature pixel; PETR samples pixel corners (no half-pixel offset).
        rows = torch.arange(h, device=device, dtype=torch.float32) * pad_h / h
        cols = torch.arange(w, device=device, dtype=torch.float32) * pad_w / w
        v, u = torch.meshgrid(rows, cols, indexing="ij")  # (H, W)
        points = frustum_points(u.flatten(), v.flatten(), self.depths.float())  # (H*W, D, 4)
        # PETR inverts lidar2img in float64 (numpy); do the same for the same keys.
        img2lidar = torch.linalg.inv(lidar2img.double()).float()
        coords = _to_lidar(img2lidar, points, self.position_range.float())  # (B, N, H*W, D, 3)

        outside = ((coords > 1.0) | (coords < 0.0)).flatten(-2).sum(-1) > self.depth_num * 0.5  # (B, N, H*W)
        outside = outside.view(b, n, h, w) | mask
        # Channels depth-major, xyz-minor (d*3 + axis), the order the conv weights expect.
        coords = coords.flatten(-2).transpose(-1, -2).reshape(b * n, 3 * self.depth_num, h, w)
        pos = self.position_encoder(inverse_sigmoid(coords).to(dtype)).view(b, n, self.embed_dims, h, w)
        sine = sine_embed_cameras(mask, self.embed_dims // 2).flatten(0, 1).to(dtype)  # (B*N, 3E/2, H, W)
        pos = pos + self.adapt_pos3d(sine).view(b, n, self.embed_dims, h, w)
        return _camera_major(pos), None if img_shape is None else mask.flatten(1), outside.flatten(1)


class FeatureGate(nn.Module):
    """x * sigmoid(expand(ReLU(reduce(feature)))): StreamPETR's feature-gated position embedding."""

    def __init__(self, embed_dims: int = 256):
        super().__init__()
        self.reduce = nn.Linear(embed_dims, embed_dims)
        self.expand = nn.Linear(embed_dims, embed_dims)

    def forward(self, x: Tensor, feature: Tensor) -> Tensor:
        """x, feature: [..., E] -> [..., E]."""
        return x * self.expand(self.reduce(feature).relu()).sigmoid()


class StreamPETRPositionEmbedding(nn.Module):
    """StreamPETR's (and FocalPETR's) key side: memory embedding, spatial alignment, gated 3D PE.

    Args:
        in_channels: neck channels C.
        embed_dims: E.
        depth_num: depth bins D (>= 30: the camera cone reads bin D - 30).
        depth_start: nearest depth (m).
        position_range: normalisation range in the lidar frame; the farthest depth is x_max.
        stride: feature stride in input pixels (pixel centres sit at stride * j + stride // 2).
    """

    def __init__(
        self,
        in_channels: int = 256,
        embed_dims: int = 256,
        depth_num: int = 64,
        depth_start: float = 1.0,
        position_range: Sequence[float] = POSITION_RANGE,
        stride: int = 16,
    ):
        super().__init__()
        if depth_num < 30:
            raise ValueError(f"depth_num must be >= 30 (the camera cone uses the bin 30 from the end), got {depth_num}")
        self.embed_dims, self.depth_num, self.stride = embed_dims, depth_num, stride
        self.position_encoder = nn.Sequential(
            nn.Linear(3 * depth_num, 4 * embed_dims), nn.ReLU(), nn.Linear(4 * embed_dims, embed_dims)
        )
        self.memory_embed = nn.Sequential(
            nn.Linear(in_channels, embed_dims), nn.ReLU(), nn.Linear(embed_dims, embed_dims)
        )
        # Cone code: (fx, fy) / 1000, normalised xyz of the farthest bin and of bin D - 30.
        self.spatial_alignment = MotionLayerNorm(8, embed_dims)
        self.featurized_pe = FeatureGate(embed_dims)
        self.register_buffer("position_range", torch.tensor([float(v) for v in position_range]), persistent=False)
        self.register_buffer(
            "depths", lid_depth_bins(depth_num, depth_start, float(position_range[3])), persistent=False
        )

    def forward(
        self,
        img_feats: Tensor,
        lidar2img: Tensor,
        intrinsics: Tensor,
        pad_shape: tuple[int, int],
        img2lidar: Tensor | None = None,
    ) -> DecoderKeys:
        """Decoder keys of one frame.

        Args:
            img_feats: [B, N, C, H, W] neck features.
            lidar2img: [B, N, 4, 4] lidar-to-image projection of each camera.
            intrinsics: [B, N, 3 or 4, 3 or 4] camera matrices (only fx, fy are read).
            pad_shape: (pad_h, pad_w) of the padded input images.
            img2lidar: [B, N, 4, 4] its inverse if already computed, else None (the float32
                inverse of lidar2img). An exported graph takes it as an input: ONNX has no
                matrix inverse.
        Returns:
            DecoderKeys with key_padding_mask and outside_range None (StreamPETR uses no mask).
        """
        _check_geometry(img_feats, lidar2img)
        b, n, c, h, w = img_feats.shape
        pad_h, pad_w = pad_shape
        device, dtype = img_feats.device, self.memory_embed[0].weight.dtype
        memory = img_feats.permute(0, 1, 3, 4, 2).reshape(b, n * h * w, c).to(dtype)  # (B, Nk, C)

        # Pixel centres, normalised by the padded size and scaled back as the reference does.
        s = self.stride
        cols = (torch.arange(0, s * w, s, dtype=torch.float32, device=device) + s // 2) / pad_w * pad_w
        rows = (torch.arange(0, s * h, s, dtype=torch.float32, device=device) + s // 2) / pad_h * pad_h
        v, u = torch.meshgrid(rows, cols, indexing="ij")  # (H, W)
        points = frustum_points(u.flatten(), v.flatten(), self.depths.float())  # (H*W, D, 4)
        if img2lidar is None:
            img2lidar = torch.linalg.inv(lidar2img.float())
        elif tuple(img2lidar.shape) != tuple(lidar2img.shape):
            raise ValueError(
                f"img2lidar must have lidar2img's shape {tuple(lidar2img.shape)}, got {tuple(img2lidar.shape)}"
            )
        coords = _to_lidar(img2lidar.float(), points, self.position_range.float())  # (B, N, H*W, D, 3)
        coords = coords.reshape(b, n * h * w, 3 * self.depth_num)  # depth-major, xyz-minor
        pos = self.position_encoder(inverse_sigmoid(coords).to(dtype))  # (B, Nk, E)

        focal = torch.stack([intrinsics[..., 0, 0], intrinsics[..., 1, 1]], dim=-1).abs().float() / 1e3  # (B, N, 2)
        # Reference quirk kept for its trained weights: the focal lengths are tiled camera-minor
        # (token t gets camera t % N) although the tokens are camera-major.
        focal = focal.repeat(1, h * w, 1)  # (B, N*H*W, 2)
        cone = torch.cat([focal, coords[..., -3:], coords[..., -90:-87]], dim=-1)  # (B, Nk, 8)

        memory = self.memory_embed(memory)
        memory = self.spatial_alignment(memory, cone)
        key_pos = self.featurized_pe(pos, memory)
        return DecoderKeys(memory=memory, key_pos=key_pos, key_padding_mask=None, outside_range=None)
