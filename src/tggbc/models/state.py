"""StreamPETR's memory bank between frames, as an explicit value that goes in and out of `forward`.

Imports nothing but torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

# nuScenes detection range of the published configs: boxes are decoded into it.
POINT_CLOUD_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)

__all__ = ["TemporalState", "transform_points", "rigid_inverse", "POINT_CLOUD_RANGE"]


def transform_points(points: Tensor, matrix: Tensor) -> Tensor:
    """Apply a homogeneous transform per sample.

    Args:
        points: [B, M, 3].
        matrix: [B, 4, 4].
    Returns:
        [B, M, 3].
    """
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)  # (B, M, 4)
    return (matrix.unsqueeze(1) @ homogeneous.unsqueeze(-1)).squeeze(-1)[..., :3]


def rigid_inverse(pose: Tensor, atol: float = 1e-3) -> Tensor:
    """Inverse of rigid transforms, [R t; 0 1] -> [R^T -R^T t; 0 1], computed in float64.

    The published data pipeline inverts the ego pose this way (invert_matrix_egopose_numpy), not
    with a general matrix inverse: at nuScenes' ~1 km global coordinates a float32 LU inverse is
    off by millimetres, enough to move logits and flip a box in the top 300.

    Args:
        pose: [..., 4, 4] rigid transforms (any float dtype).
        atol: how far R^T R may be from the identity (and the last row from (0, 0, 0, 1)).
    Returns:
        [..., 4, 4] float32 inverses.
    Raises:
        ValueError if a matrix is not rigid (a scale, shear or projection would make R^T wrong).
    """
    if pose.dim() < 2 or tuple(pose.shape[-2:]) != (4, 4):
        raise ValueError(f"ego_pose must be [..., 4, 4], got {tuple(pose.shape)}")
    p = pose.double()
    rotation, translation = p[..., :3, :3], p[..., :3, 3:]
    eye = torch.eye(3, dtype=torch.float64, device=p.device)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=p.device)
    if not torch.isfinite(p).all():
        raise ValueError("ego_pose has NaN or infinite entries")
    off = max(
        float((rotation.transpose(-1, -2) @ rotation - eye).abs().amax()) if p.numel() else 0.0,
        float((p[..., 3, :] - bottom).abs().amax()) if p.numel() else 0.0,
    )
    if off > atol:
        raise ValueError(
            f"ego_pose is not a rigid transform (R^T R or the last row is off by {off:.3g} > {atol}); "
            "pass ego_pose_inv explicitly for a non-rigid pose"
        )
    inverse = torch.zeros_like(p)
    inverse[..., :3, :3] = rotation.transpose(-1, -2)
    inverse[..., :3, 3:] = -rotation.transpose(-1, -2) @ translation
    inverse[..., 3, 3] = 1.0
    return inverse.float()


@dataclass
class TemporalState:
    """StreamPETR's memory bank between two frames, in the global frame (as the reference leaves it).

    Fields (M = memory_len entries, newest first):
        embedding: [B, M, E] last-layer query features of the frames that wrote the entries.
        reference_points: [B, M, 3] float32 box centres in metres, global frame.
        timestamp: [B, M, 1] float64, minus the time (s) each entry was written: adding the next
            frame's time gives the entry's age. float64 because nuScenes times (~1.5e9 s) lose
            whole minutes in float32.
        ego_pose: [B, M, 4, 4] float32 ego-to-global pose of the frame that wrote each entry.
        velocity: [B, M, 2] float32 predicted (vx, vy).
    """

    embedding: Tensor
    reference_points: Tensor
    timestamp: Tensor
    ego_pose: Tensor
    velocity: Tensor

    @property
    def batch_size(self) -> int:
        return self.embedding.shape[0]

    @property
    def memory_len(self) -> int:
        return self.embedding.shape[1]

    @classmethod
    def empty(
        cls,
        batch: int,
        memory_len: int = 1024,
        embed_dims: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> TemporalState:
        """All-zero memory, what the reference starts a scene with (embedding in `dtype`)."""
        return cls(
            embedding=torch.zeros(batch, memory_len, embed_dims, device=device, dtype=dtype),
            reference_points=torch.zeros(batch, memory_len, 3, device=device),
            timestamp=torch.zeros(batch, memory_len, 1, device=device, dtype=torch.float64),
            ego_pose=torch.zeros(batch, memory_len, 4, 4, device=device),
            velocity=torch.zeros(batch, memory_len, 2, device=device),
        )

    @classmethod
    def random(
        cls,
        batch: int,
        memory_len: int = 1024,
        embed_dims: int = 256,
        pc_range: Sequence[float] = POINT_CLOUD_RANGE,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> TemporalState:
        """A plausible full memory bank for benchmarks: entries 0.1-2.5 s old (next frame at time 0),
        centres inside pc_range, poses near identity, speeds of a few m/s."""
        g = torch.Generator().manual_seed(seed)
        low, high = torch.tensor(pc_range[:3]), torch.tensor(pc_range[3:])
        pose = torch.eye(4).repeat(batch, memory_len, 1, 1)
        pose[..., :3, 3] = torch.randn(batch, memory_len, 3, generator=g) * 2.0  # the ego moved a few metres
        state = cls(
            embedding=torch.randn(batch, memory_len, embed_dims, generator=g),
            reference_points=low + torch.rand(batch, memory_len, 3, generator=g) * (high - low),
            # Written at times -0.1 .. -2.5 s: the stored value is minus that time.
            timestamp=(0.1 + 2.4 * torch.rand(batch, memory_len, 1, generator=g)).double(),
            ego_pose=pose,
            velocity=torch.randn(batch, memory_len, 2, generator=g) * 3.0,
        )
        state = state.to(device)
        state.embedding = state.embedding.to(dtype)
        return state

    def to(self, device: torch.device | str | None) -> TemporalState:
        """The same state on `device` (dtypes unchanged)."""
        return TemporalState(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def detach(self) -> TemporalState:
        return TemporalState(**{f.name: getattr(self, f.name).detach() for f in fields(self)})

    def check(self, batch: int, memory_len: int, embed_dims: int) -> None:
        """Raise ValueError unless every field has the shape a decoder with these sizes expects."""
        expected = {
            "embedding": (batch, memory_len, embed_dims),
            "reference_points": (batch, memory_len, 3),
            "timestamp": (batch, memory_len, 1),
            "ego_pose": (batch, memory_len, 4, 4),
            "velocity": (batch, memory_len, 2),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"state.{name} must have shape {shape}, got {got}")
