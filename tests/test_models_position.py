"""Key-side modules against step-by-step re-implementations of the published position embeddings."""

import math

import pytest
import torch
import torch.nn.functional as F

from tggbc.models import PETRPositionEmbedding, StreamPETRPositionEmbedding
from tggbc.models.position import lid_depth_bins, padding_mask

B, N, C, H, W, E, D = 2, 3, 8, 3, 5, 16, 64
STRIDE, PAD = 16, (48, 80)
RANGE = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def cameras():
    """Cameras around the car looking outwards (lidar x forward, z up): intrinsics and lidar2img."""
    g = torch.Generator().manual_seed(0)
    axes = torch.tensor([[0.0, -1, 0], [0, 0, -1], [1, 0, 0]])  # lidar -> camera axes (x right, y down, z fwd)
    k = torch.tensor([[50.0, 0, 40], [0, 50, 24], [0, 0, 1]])
    intrinsics, lidar2img = torch.zeros(B, N, 4, 4), torch.zeros(B, N, 4, 4)
    for b in range(B):
        for n in range(N):
            yaw = 2 * math.pi * n / N + 0.1 * b
            rot = torch.tensor([[math.cos(yaw), math.sin(yaw), 0], [-math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
            lidar2cam = torch.eye(4)
            lidar2cam[:3, :3] = axes @ rot
            lidar2cam[:3, 3] = torch.randn(3, generator=g) * 0.5
            if (b, n) == (1, 0):  # pitched steeply: its far frustum points leave the z range
                pitch = torch.tensor([[1.0, 0, 0], [0, 0.5, -(3**0.5) / 2], [0, (3**0.5) / 2, 0.5]])
                lidar2cam[:3, :3] = pitch @ lidar2cam[:3, :3]
            intrinsic = torch.eye(4)
            intrinsic[:3, :3] = k * (1 + 0.1 * n)
            intrinsics[b, n] = intrinsic
            lidar2img[b, n] = intrinsic @ lidar2cam
    return intrinsics, lidar2img


def inv_sigmoid(x, eps=1e-5):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def test_lid_depth_bins_match_the_anchor_formula():
    d = lid_depth_bins()
    expected = torch.tensor([1 + 60.2 * i * (i + 1) / (64 * 65) for i in range(64)])
    torch.testing.assert_close(d, expected)
    assert d[0] == 1.0 and abs(float(d[-1]) - (1 + 60.2 * 63 / 65)) < 1e-4


@pytest.mark.parametrize("size, pad", [((3, 5), (48, 80)), ((7, 11), (100, 170)), ((4, 4), (64, 63))])
def test_padding_mask_matches_nearest_resize(size, pad):
    g = torch.Generator().manual_seed(1)
    img_shape = torch.stack(
        [torch.randint(1, pad[0] + 1, (2, 3), generator=g), torch.randint(1, pad[1] + 1, (2, 3), generator=g)], -1
    )
    pixels = torch.ones(2, 3, *pad)
    for b in range(2):
        for n in range(3):
            pixels[b, n, : img_shape[b, n, 0], : img_shape[b, n, 1]] = 0
    expected = F.interpolate(pixels, size=size).to(torch.bool)
    assert torch.equal(padding_mask(img_shape, pad, size), expected)


def reference_petr(module, feats, lidar2img, img_shape):
    """PETR's head, step by step (meshgrid over W, H, D; a 7-D matmul; its channel permutation)."""
    pad_h, pad_w = PAD
    eps = 1e-5
    memory = module.input_proj(feats.flatten(0, 1)).view(B, N, E, H, W)
    masks = torch.ones(B, N, pad_h, pad_w)
    for b in range(B):
        for n in range(N):
            masks[b, n, : img_shape[b, n, 0], : img_shape[b, n, 1]] = 0
    masks = F.interpolate(masks, size=(H, W)).to(torch.bool)
    coords_h = torch.arange(H).float() * pad_h / H
    coords_w = torch.arange(W).float() * pad_w / W
    index = torch.arange(D).float()
    coords_d = 1 + (RANGE[3] - 1) / (D * (1 + D)) * index * (index + 1)
    coords = torch.stack(torch.meshgrid([coords_w, coords_h, coords_d], indexing="ij")).permute(1, 2, 3, 0)
    coords = torch.cat((coords, torch.ones_like(coords[..., :1])), -1)
    coords[..., :2] = coords[..., :2] * torch.maximum(coords[..., 2:3], torch.ones_like(coords[..., 2:3]) * eps)
    img2lidars = torch.linalg.inv(lidar2img.double()).float()
    coords = coords.view(1, 1, W, H, D, 4, 1).repeat(B, N, 1, 1, 1, 1, 1)
    img2lidars = img2lidars.view(B, N, 1, 1, 1, 4, 4).repeat(1, 1, W, H, D, 1, 1)
    coords3d = torch.matmul(img2lidars, coords).squeeze(-1)[..., :3]
    for a in range(3):
        coords3d[..., a] = (coords3d[..., a] - RANGE[a]) / (RANGE[a + 3] - RANGE[a])
    coords_mask = ((coords3d > 1.0) | (coords3d < 0.0)).flatten(-2).sum(-1) > (D * 0.5)
    coords_mask = masks | coords_mask.permute(0, 1, 3, 2)
    coords3d = coords3d.permute(0, 1, 4, 5, 3, 2).contiguous().view(B * N, -1, H, W)
    pos = module.position_encoder(inv_sigmoid(coords3d)).view(B, N, E, H, W)
    # SinePositionalEncoding3D(num_feats=E/2, normalize=True) of the padding mask.
    not_mask = 1 - masks.to(torch.int)
    embeds = [not_mask.cumsum(d, dtype=torch.float32) for d in (1, 2, 3)]
    embeds[0] = embeds[0] / (embeds[0][:, -1:] + 1e-6) * 2 * math.pi
    embeds[1] = embeds[1] / (embeds[1][:, :, -1:] + 1e-6) * 2 * math.pi
    embeds[2] = embeds[2] / (embeds[2][:, :, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(E // 2, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / (E // 2))
    parts = []
    for emb in embeds:
        p = emb[..., None] / dim_t
        parts.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=4).view(B, N, H, W, -1))
    sine = torch.cat(parts, dim=4).permute(0, 1, 4, 2, 3)
    pos = pos + module.adapt_pos3d(sine.flatten(0, 1)).view(B, N, E, H, W)
    seq = lambda x: x.permute(1, 3, 4, 0, 2).reshape(-1, B, E).transpose(0, 1)  # noqa: E731  [B, N*H*W, E]
    return seq(memory), seq(pos), masks.view(B, -1), coords_mask.reshape(B, -1)


def test_petr_position_embedding_matches_reference():
    module = randomize(PETRPositionEmbedding(in_channels=C, embed_dims=E))
    feats = torch.randn(B, N, C, H, W, generator=torch.Generator().manual_seed(2))
    _, lidar2img = cameras()
    img_shape = torch.tensor([[[48, 80], [48, 80], [48, 80]], [[48, 80], [30, 64], [48, 45]]])
    with torch.no_grad():
        keys = module(feats, lidar2img, PAD, img_shape)
        memory, pos, mask, outside = reference_petr(module, feats, lidar2img, img_shape)
    assert keys.memory.shape == (B, N * H * W, E)
    torch.testing.assert_close(keys.memory, memory)
    torch.testing.assert_close(keys.key_pos, pos, atol=1e-5, rtol=1e-5)
    assert torch.equal(keys.key_padding_mask, mask) and mask.any() and not mask[0].any()
    assert torch.equal(keys.outside_range, outside) and (outside & ~mask).any() and not outside.all()
    # Camera-major: key (n, row, col) sits at n*H*W + row*W + col.
    projected = module.input_proj(feats[1, 2]).detach()
    torch.testing.assert_close(keys.memory[1, 2 * H * W + 1 * W + 3], projected[:, 1, 3])
    no_pad = module(feats, lidar2img, PAD)
    assert no_pad.key_padding_mask is None


def reference_streampetr(module, feats, lidar2img, intrinsics):
    pad_h, pad_w = PAD
    eps = 1e-5
    shifts_x = (torch.arange(0, STRIDE * W, step=STRIDE, dtype=torch.float32) + STRIDE // 2) / pad_w
    shifts_y = (torch.arange(0, H * STRIDE, step=STRIDE, dtype=torch.float32) + STRIDE // 2) / pad_h
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    centers = (
        torch.stack((shift_x.reshape(-1), shift_y.reshape(-1)), dim=1).reshape(H, W, 2)[None].repeat(B * N, 1, 1, 1)
    )
    intrinsic = torch.stack([intrinsics[..., 0, 0], intrinsics[..., 1, 1]], dim=-1).abs() / 1e3
    intrinsic = intrinsic.repeat(1, H * W, 1).view(B, -1, 2)
    length = intrinsic.shape[1]
    centers[..., 0] = centers[..., 0] * pad_w
    centers[..., 1] = centers[..., 1] * pad_h
    index = torch.arange(D).float()
    coords_d = 1 + (RANGE[3] - 1) / (D * (1 + D)) * index * (index + 1)
    coords = torch.cat(
        [centers.view(B, length, 1, 2).repeat(1, 1, D, 1), coords_d.view(1, 1, D, 1).repeat(B, length, 1, 1)], -1
    )
    coords = torch.cat((coords, torch.ones_like(coords[..., :1])), -1)
    coords[..., :2] = coords[..., :2] * torch.maximum(coords[..., 2:3], torch.ones_like(coords[..., 2:3]) * eps)
    img2lidars = lidar2img.inverse().view(B * N, 1, 1, 4, 4).repeat(1, H * W, D, 1, 1).view(B, length, D, 4, 4)
    coords3d = torch.matmul(img2lidars, coords.unsqueeze(-1)).squeeze(-1)[..., :3]
    low, high = torch.tensor(RANGE[:3]), torch.tensor(RANGE[3:])
    coords3d = ((coords3d - low) / (high - low)).reshape(B, -1, D * 3)
    pos = module.position_encoder(inv_sigmoid(coords3d))
    cone = torch.cat([intrinsic, coords3d[..., -3:], coords3d[..., -90:-87]], dim=-1)
    memory = module.memory_embed(feats.permute(0, 1, 3, 4, 2).reshape(B, N * H * W, C))
    mln = module.spatial_alignment
    c = F.relu(F.linear(cone, mln.reduce[0].weight, mln.reduce[0].bias))
    memory = F.linear(c, mln.gamma.weight, mln.gamma.bias) * F.layer_norm(memory, (E,)) + F.linear(
        c, mln.beta.weight, mln.beta.bias
    )
    gate = module.featurized_pe
    pos = pos * torch.sigmoid(gate.expand(F.relu(gate.reduce(memory))))
    return memory, pos


def test_streampetr_position_embedding_matches_reference():
    module = randomize(StreamPETRPositionEmbedding(in_channels=C, embed_dims=E, stride=STRIDE), seed=3)
    feats = torch.randn(B, N, C, H, W, generator=torch.Generator().manual_seed(4))
    intrinsics, lidar2img = cameras()
    with torch.no_grad():
        keys = module(feats, lidar2img, intrinsics, PAD)
        memory, pos = reference_streampetr(module, feats, lidar2img, intrinsics)
    assert keys.key_padding_mask is None and keys.outside_range is None
    torch.testing.assert_close(keys.memory, memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys.key_pos, pos, atol=1e-5, rtol=1e-5)


def test_position_modules_validate_inputs():
    module = PETRPositionEmbedding(in_channels=C, embed_dims=E)
    with pytest.raises(ValueError, match="img_feats"):
        module(torch.zeros(B, C, H, W), torch.zeros(B, N, 4, 4), PAD)
    with pytest.raises(ValueError, match="lidar2img"):
        module(torch.zeros(B, N, C, H, W), torch.zeros(B, 4, 4), PAD)
    with pytest.raises(ValueError, match="depth_num"):
        StreamPETRPositionEmbedding(depth_num=16)
