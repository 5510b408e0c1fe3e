"""StreamPETR's decoder and head (Wang et al., ICCV 2023), with tgGBC between layers.

StreamPETR: 644 learnable queries plus 256 queries propagated from a 1024-entry memory bank of
earlier frames; the self-attention keys are the 900 queries followed by the other 768 memory
entries (1668); motion-aware layer norms condition queries and memory on ego motion and age.
After each frame the 256 last-layer queries with the highest class score are pushed to the
front of the memory bank. Only the image keys of the cross-attention are pruned.

The reference keeps the memory bank inside its head and resets it on a new scene. Here it is an
explicit `TemporalState` that goes in and comes out of `forward`, so frames can be replayed,
batched and benchmarked without hidden module state.

Box code: (cx, cy, cz, log w, log l, log h, sin, cos, vx, vy); centres in metres.

Imports nothing but torch and the core.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..pruner import KeyPruner
from .decoder import POINT_CLOUD_RANGE, DecoderOutput, PETRFamilyDecoder
from .layers import MotionLayerNorm, nerf_embed, sine_embed_1d
from .state import TemporalState, rigid_inverse, transform_points

__all__ = ["StreamPETRDecoder"]


class StreamPETRDecoder(PETRFamilyDecoder):
    """StreamPETR's temporal decoder plus its per-layer heads.

    Args (beyond `PETRFamilyDecoder`'s):
        num_queries: learnable queries (644 in the published configs).
        num_propagated: memory entries turned into queries each frame (256).
        memory_len: memory bank size (1024).
        topk_proposals: queries pushed to the memory after each frame (256).

    Use:
        decoder = StreamPETRDecoder(pruner=KeyPruner(r=21000, n=1, k=175))
        state = None                                   # a new scene
        for frame in frames:
            out = decoder(frame.memory, frame.key_pos, state=state, ego_pose=frame.ego_pose,
                          timestamp=frame.timestamp)
            state = out.state
    """

    center_index = (0, 1, 2)  # (cx, cy, cz, log w, log l, log h, ...)

    def __init__(
        self,
        *,
        num_layers: int = 6,
        embed_dims: int = 256,
        num_heads: int = 8,
        ffn_dims: int = 2048,
        dropout: float = 0.1,
        num_classes: int = 10,
        code_size: int = 10,
        num_queries: int = 644,
        num_propagated: int = 256,
        memory_len: int = 1024,
        topk_proposals: int = 256,
        pc_range: Sequence[float] = POINT_CLOUD_RANGE,
        pruner: KeyPruner | None = None,
        attention: str = "fast",
    ):
        super().__init__(
            num_layers=num_layers,
            embed_dims=embed_dims,
            num_heads=num_heads,
            ffn_dims=ffn_dims,
            dropout=dropout,
            num_classes=num_classes,
            code_size=code_size,
            num_queries=num_queries,
            pc_range=pc_range,
            pruner=pruner,
            attention=attention,
        )
        for name, value in (
            ("num_propagated", num_propagated),
            ("memory_len", memory_len),
            ("topk_proposals", topk_proposals),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if num_propagated > memory_len or topk_proposals > memory_len:
            raise ValueError(
                f"num_propagated={num_propagated} and topk_proposals={topk_proposals} must not exceed "
                f"memory_len={memory_len}"
            )
        if topk_proposals > num_queries + num_propagated:
            raise ValueError(f"topk_proposals={topk_proposals} exceeds the {num_queries + num_propagated} queries")
        if code_size < 5:
            raise ValueError(
                f"StreamPETR reads (cx, cy, cz) and (vx, vy) from the box code: code_size >= 5, got {code_size}"
            )
        self.num_propagated, self.memory_len, self.topk_proposals = num_propagated, memory_len, topk_proposals
        if num_propagated > 0:
            # Fixed (never trained) points that stand in for the propagated queries on a scene's first frame.
            self.pseudo_reference_points = nn.Embedding(num_propagated, 3)
            nn.init.uniform_(self.pseudo_reference_points.weight, 0.0, 1.0)
            self.pseudo_reference_points.weight.requires_grad_(False)
        self.time_embedding = nn.Sequential(nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims))
        # Ego motion code: (velocity or zeros (3) + 3x4 relative pose (12)) x 6 frequencies x sin/cos = 180.
        self.ego_pose_pe = MotionLayerNorm(180, embed_dims)
        self.ego_pose_memory = MotionLayerNorm(180, embed_dims)

    def _frame_inputs(
        self,
        batch: int,
        device: torch.device,
        state: TemporalState | None,
        ego_pose: Tensor | None,
        ego_pose_inv: Tensor | None,
        timestamp: Tensor | None,
        prev_exists: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        eye = torch.eye(4, device=device).expand(batch, 4, 4)
        if ego_pose is not None and tuple(ego_pose.shape) != (batch, 4, 4):
            raise ValueError(f"ego_pose must be [B, 4, 4] = {(batch, 4, 4)}, got {tuple(ego_pose.shape)}")
        if ego_pose_inv is None:
            # Rigid inverse in float64 from the pose as given (float64 poses lose nothing), as the
            # published pipeline computes it; a float32 LU inverse is visibly off at ~1 km.
            ego_pose_inv = eye if ego_pose is None else rigid_inverse(ego_pose).to(device)
        elif tuple(ego_pose_inv.shape) != (batch, 4, 4):
            raise ValueError(f"ego_pose_inv must be [B, 4, 4] = {(batch, 4, 4)}, got {tuple(ego_pose_inv.shape)}")
        ego_pose = eye if ego_pose is None else ego_pose.float()
        ego_pose_inv = ego_pose_inv.float()
        if timestamp is None:
            timestamp = torch.zeros(batch, device=device, dtype=torch.float64)
        timestamp = torch.as_tensor(timestamp, device=device).double().reshape(-1)
        if prev_exists is None:  # a given state continues its scene; no state starts one
            prev_exists = torch.full((batch,), 0.0 if state is None else 1.0, device=device)
        prev_exists = torch.as_tensor(prev_exists, device=device).float().reshape(-1)
        for name, t in (("timestamp", timestamp), ("prev_exists", prev_exists)):
            if t.shape[0] != batch:
                raise ValueError(f"{name} must have one entry per sample (B={batch}), got shape {tuple(t.shape)}")
        return ego_pose, ego_pose_inv, timestamp, prev_exists

    def align_state(
        self,
        state: TemporalState | None,
        batch: int,
        ego_pose_inv: Tensor,
        timestamp: Tensor,
        prev_exists: Tensor,
        dtype: torch.dtype,
        device: torch.device,
    ) -> TemporalState:
        """Bring the memory into the current frame (the reference's pre_update_memory).

        Args:
            state: memory after the previous frame (global frame), or None for an empty one.
            ego_pose_inv: [B, 4, 4] global-to-ego of the current frame.
            timestamp: [B] float64 time of the current frame.
            prev_exists: [B] 1.0 if the previous frame is of the same scene, else 0.0 (clears
                that sample's memory).
        Returns:
            the state in the current ego frame, with ages in `timestamp` and the pseudo
            reference points filled in for samples that start a scene.
        """
        if state is None:
            # The reference's empty memory skips the transforms: zeros stay zeros.
            state = TemporalState.empty(batch, self.memory_len, self.embed_dims, device=device, dtype=dtype)
        else:
            state.check(batch, self.memory_len, self.embed_dims)
            keep = prev_exists.view(batch, 1, 1)
            state = TemporalState(
                embedding=state.embedding * keep.to(state.embedding.dtype),
                reference_points=transform_points(state.reference_points, ego_pose_inv) * keep,
                timestamp=(state.timestamp + timestamp.view(batch, 1, 1)) * keep.double(),
                ego_pose=(ego_pose_inv.unsqueeze(1) @ state.ego_pose) * keep.unsqueeze(-1),
                velocity=state.velocity * keep,
            )
        if self.num_propagated > 0:
            p = self.num_propagated
            new_scene = (1.0 - prev_exists).view(batch, 1, 1)
            low, high = self.pc_range[:3].float(), self.pc_range[3:].float()
            pseudo = self.pseudo_reference_points.weight.float() * (high - low) + low  # (P, 3) metres
            eye = torch.eye(4, device=device)
            state.reference_points = torch.cat(
                [state.reference_points[:, :p] + new_scene * pseudo, state.reference_points[:, p:]], dim=1
            )
            state.ego_pose = torch.cat(
                [state.ego_pose[:, :p] + new_scene.unsqueeze(-1) * eye, state.ego_pose[:, p:]], dim=1
            )
        return state

    def update_state(
        self,
        state: TemporalState,
        hidden: Tensor,
        cls_logits: Tensor,
        bbox_preds: Tensor,
        ego_pose: Tensor,
        timestamp: Tensor,
    ) -> TemporalState:
        """Push the best last-layer queries into the memory (the reference's post_update_memory).

        Args:
            state: the aligned state of this frame (current ego frame).
            hidden: [B, Nq, E] last layer's normed output.
            cls_logits: [B, Nq, C] its class logits.
            bbox_preds: [B, Nq, code_size] its decoded boxes (metres).
            ego_pose: [B, 4, 4] ego-to-global of this frame.
            timestamp: [B] float64 time of this frame.
        Returns:
            memory_len entries, newest (the top-`topk_proposals` queries by max class score, best
            first) at the front, in the global frame.
        """
        batch, k = hidden.shape[0], self.topk_proposals
        score = cls_logits.detach().sigmoid().amax(dim=-1)  # (B, Nq)
        index = score.topk(k, dim=1).indices  # (B, K), best first as in the reference

        def take(x: Tensor) -> Tensor:
            return x.detach().gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        device = hidden.device
        keep = self.memory_len - k  # the reference keeps 1280 and trims on the next frame: same result
        new = TemporalState(
            embedding=torch.cat([take(hidden), state.embedding[:, :keep].to(hidden.dtype)], dim=1),
            reference_points=torch.cat([take(bbox_preds[..., :3]).float(), state.reference_points[:, :keep]], dim=1),
            timestamp=torch.cat(
                [torch.zeros(batch, k, 1, device=device, dtype=torch.float64), state.timestamp[:, :keep]], dim=1
            ),
            ego_pose=torch.cat([torch.eye(4, device=device).expand(batch, k, 4, 4), state.ego_pose[:, :keep]], dim=1),
            velocity=torch.cat([take(bbox_preds[..., -2:]).float(), state.velocity[:, :keep]], dim=1),
        )
        new.reference_points = transform_points(new.reference_points, ego_pose)
        new.timestamp = new.timestamp - timestamp.view(batch, 1, 1)
        new.ego_pose = ego_pose.unsqueeze(1) @ new.ego_pose
        return new

    def forward(
        self,
        memory: Tensor,
        key_pos: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        state: TemporalState | None = None,
        ego_pose: Tensor | None = None,
        timestamp: Tensor | None = None,
        prev_exists: Tensor | None = None,
        ego_pose_inv: Tensor | None = None,
        track_keys: bool = False,
    ) -> DecoderOutput:
        """Decode one frame and update the memory bank.

        Args:
            memory: [B, Nk, E] image keys of all cameras (after StreamPETR's memory_embed and
                spatial alignment), camera-major.
            key_pos: [B, Nk, E] their (feature-gated) 3D position embedding.
            key_padding_mask: [B, Nk] bool or None (the reference passes None).
            state: the previous frame's `out.state`, or None to start a scene.
            ego_pose: [B, 4, 4] ego(lidar)-to-global of this frame; None = identity.
            timestamp: [B] time of this frame in seconds (float64); None = 0.
            prev_exists: [B] 1 if the previous frame is of the same scene; None = 1 when a state is
                given, else 0.
            ego_pose_inv: [B, 4, 4] inverse of ego_pose if already known; None = its rigid inverse
                (rotation transposed, in float64), as the published data pipeline computes it.
            track_keys: return in `kept` the original indices of the image keys each layer saw.
        Returns:
            DecoderOutput over the num_queries + num_propagated queries, with the new `state`.
        """
        self._check_keys(memory, key_pos, key_padding_mask)
        batch, device = memory.shape[0], memory.device
        dtype = self.reference_points.weight.dtype
        ego_pose, ego_pose_inv, timestamp, prev_exists = self._frame_inputs(
            batch, device, state, ego_pose, ego_pose_inv, timestamp, prev_exists
        )
        state = self.align_state(state, batch, ego_pose_inv, timestamp, prev_exists, dtype, device)

        low, high = self.pc_range[:3].float(), self.pc_range[3:].float()
        reference_points = self.reference_points.weight.unsqueeze(0).expand(batch, -1, -1)  # (B, Nq0, 3)
        query_pos = self.query_embedding(self.reference_points.weight).expand(batch, -1, -1)  # (B, Nq0, E)
        query = torch.zeros_like(query_pos)
        temp_reference_points = ((state.reference_points - low) / (high - low)).to(dtype)  # (B, M, 3)
        temp_pos = self.query_embedding(temp_reference_points)  # (B, M, E)
        temp_memory = state.embedding.to(dtype)

        # Learnable queries sit in the current frame: zero velocity, identity pose, age 0. Their
        # code is one constant vector; broadcasting it over the queries gives what the reference
        # computes per query.
        eye = torch.eye(4, device=device)
        query_motion = nerf_embed(torch.cat([torch.zeros(3, device=device), eye[:3].flatten()]))[None, None]
        query = self.ego_pose_memory(query, query_motion)
        query_pos = self.ego_pose_pe(query_pos, query_motion)
        memory_motion = torch.cat(
            [state.velocity, state.timestamp.float(), state.ego_pose[..., :3, :].flatten(-2)], dim=-1
        )  # (B, M, 15)
        memory_motion = nerf_embed(memory_motion)  # (B, M, 180)
        temp_pos = self.ego_pose_pe(temp_pos, memory_motion)
        temp_memory = self.ego_pose_memory(temp_memory, memory_motion)
        zero_age = torch.zeros(1, 1, 1, device=device)
        query_pos = query_pos + self.time_embedding(sine_embed_1d(zero_age, self.embed_dims).to(dtype))
        temp_pos = temp_pos + self.time_embedding(sine_embed_1d(state.timestamp, self.embed_dims).to(dtype))

        # The first num_propagated memory entries become queries; the rest stay extra
        # self-attention keys: 644 + 256 = 900 queries over 900 + 768 = 1668 keys.
        p = self.num_propagated
        query = torch.cat([query, temp_memory[:, :p]], dim=1)
        query_pos = torch.cat([query_pos, temp_pos[:, :p]], dim=1)
        reference_points = torch.cat([reference_points, temp_reference_points[:, :p]], dim=1)
        temp_memory, temp_pos = temp_memory[:, p:], temp_pos[:, p:]

        out = self.run_layers(
            query,
            query_pos,
            reference_points,
            memory,
            key_pos,
            key_padding_mask,
            temp_memory=temp_memory if temp_memory.shape[1] else None,
            temp_pos=temp_pos if temp_pos.shape[1] else None,
            track_keys=track_keys,
        )
        new_state = self.update_state(
            state, out.hidden_states[-1], out.cls_scores[-1], out.bbox_preds[-1], ego_pose, timestamp
        )
        return out._replace(state=new_state)
