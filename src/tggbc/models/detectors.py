"""Complete PETR-family detectors of the published configs, in pure PyTorch (the Petr3D of the StreamPETR code).

    detector = build_detector("stream_petr_r50_flash_704_bs2_seq_24e")     # tgGBC at its default setting
    load_converted(detector, "streampetr_r50.safetensors")                  # from `tggbc convert`
    stream = SceneStream(detector)
    for frame in frames:                                                    # one scene after another
        out = stream(frame.img, frame.lidar2img, frame.intrinsics, ego_pose=frame.ego_pose,
                     timestamp=frame.timestamp, scene_token=frame.scene_token)
        out.detections[0].boxes                                            # [N, 9], z at the bottom

Modules and their names in the state dict: `img_backbone` (ResNet or VoVNet, original names),
`img_neck` (CPFPN, original names), `img_roi_head` (FocalHead, original names; only in the
configs that trained one), `pts_bbox_head` (StreamPETRHead or FocalPETRHead: `.position.*` and
`.decoder.*`, renamed from the original by `tggbc.models.checkpoint`).

The input is what the original test pipeline hands Petr3D: six normalised, padded images per
sample and their lidar2img / intrinsics; for StreamPETR also the ego (lidar-to-global) pose and the
timestamp. The ego pose is inverted rigidly in float64 here, so callers do not pass its inverse.

Imports nothing but torch and the core.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..pruner import KeyPruner
from .coder import Detections
from .configs import PublishedConfig, published_config
from .decoder import DecoderOutput
from .heads import FocalHead, FocalHeadOutput, FocalPETRHead, StreamPETRHead
from .necks import CPFPN
from .resnet import ResNet
from .state import TemporalState
from .vovnet import VoVNet

__all__ = [
    "PETRFamilyDetector",
    "DetectorOutput",
    "SceneStream",
    "build_detector",
    "default_pruner",
    "example_frame",
]


class DetectorOutput(NamedTuple):
    """What a detector returns for one frame.

    detections: B Detections (the original's get_bboxes: boxes [N, 9] with z at the bottom).
    cls_scores, bbox_preds: [L, B, Nq, C] and [L, B, Nq, 10] every decoder layer's outputs
        (the original head's all_cls_scores / all_bbox_preds; centres in metres).
    state: StreamPETR's memory after this frame (None for the other heads).
    keys_per_layer: the image keys each decoder layer's cross-attention saw.
    roi: the FocalHead's outputs when it ran (aux_2d_only=False), else None.
    """

    detections: list[Detections]
    cls_scores: Tensor
    bbox_preds: Tensor
    state: TemporalState | None
    keys_per_layer: list[int]
    roi: FocalHeadOutput | None = None


def default_pruner(config: PublishedConfig) -> KeyPruner:
    """tgGBC at the config's default (r, n, k)."""
    return KeyPruner(r=config.r, n=config.n, k=config.k)


class PETRFamilyDetector(nn.Module):
    """Backbone, neck, optional 2D head and the 3D head of one published config.

    Args:
        config: a PublishedConfig (see `build_detector` to build one by name).
        pruner: the decoder's KeyPruner, or None for the dense model.
        attention: "fast" or "reference" (tgGBC's attention modes, see `PETRFamilyDecoder`).
        aux_2d_only: as Petr3D: True (the configs' default) skips the FocalHead at inference;
            False runs it and lets its topk_indexes pick the image tokens of the 3D head.
        Sizes can be shrunk for tests through `build_detector`'s keyword arguments.
    """

    def __init__(
        self,
        config: PublishedConfig,
        *,
        pruner: KeyPruner | None = None,
        attention: str = "fast",
        aux_2d_only: bool = True,
        num_heads: int = 8,
        ffn_dims: int = 2048,
        neck_channels: int = 256,
    ):
        super().__init__()
        self.config, self.aux_2d_only = config, aux_2d_only
        if config.backbone == "ResNet-50":
            self.img_backbone = ResNet(50, out_indices=(2, 3), style="pytorch", norm_eval=True)
        elif config.backbone.startswith("V-"):
            self.img_backbone = VoVNet(config.backbone, out_features=("stage4", "stage5"), norm_eval=True)
        else:
            raise ValueError(f"unknown backbone {config.backbone!r} in config {config.name}")
        if tuple(self.img_backbone.out_channels) != tuple(config.neck_in_channels):
            raise ValueError(
                f"{config.name}: backbone outputs {self.img_backbone.out_channels} channels but the neck "
                f"expects {config.neck_in_channels}"
            )
        self.img_neck = CPFPN(list(config.neck_in_channels), neck_channels, num_outs=len(config.neck_in_channels))
        self.img_roi_head = (
            FocalHead(config.num_classes, neck_channels, neck_channels, stride=config.stride)
            if config.roi_head
            else None
        )
        common = dict(
            in_channels=neck_channels,
            embed_dims=config.embed_dims,
            num_layers=config.num_layers,
            num_heads=num_heads,
            ffn_dims=ffn_dims,
            num_classes=config.num_classes,
            num_query=config.num_query,
            depth_num=config.depth_num,
            depth_start=config.depth_start,
            position_range=config.position_range,
            stride=config.stride,
            pc_range=config.pc_range,
            max_num=config.max_num,
            post_center_range=config.post_center_range,
            pruner=pruner,
            attention=attention,
        )
        if config.head == "StreamPETRHead":
            self.pts_bbox_head: StreamPETRHead | FocalPETRHead = StreamPETRHead(
                num_propagated=config.num_propagated,
                memory_len=config.memory_len,
                topk_proposals=config.topk_proposals,
                **common,
            )
        elif config.head == "PETRHeadDN":
            self.pts_bbox_head = FocalPETRHead(**common)
        else:
            raise ValueError(f"unknown head {config.head!r} in config {config.name}")

    @property
    def decoder(self):
        """The 3D head's decoder (what `tggbc.pruning(...)` switches pruners and attention modes on)."""
        return self.pts_bbox_head.decoder

    @property
    def temporal(self) -> bool:
        return isinstance(self.pts_bbox_head, StreamPETRHead)

    def extract_img_feat(self, img: Tensor) -> Tensor:
        """[B, N, 3, H, W] normalised padded images -> [B, N, C, H/16, W/16] neck level 0."""
        if img.dim() != 5 or img.shape[2] != 3:
            raise ValueError(f"img must be [B, N_cam, 3, H, W] normalised images, got {tuple(img.shape)}")
        b, n, _, h, w = img.shape
        if h % 32 or w % 32:
            raise ValueError(f"img height and width must be multiples of 32 (the configs pad so), got {h}x{w}")
        feats = self.img_neck(self.img_backbone(img.flatten(0, 1)))
        level = feats[0]  # the configs' position_level = 0: stride 16
        return level.view(b, n, *level.shape[1:])

    def forward(
        self,
        img: Tensor,
        lidar2img: Tensor,
        intrinsics: Tensor,
        *,
        state: TemporalState | None = None,
        ego_pose: Tensor | None = None,
        ego_pose_inv: Tensor | None = None,
        timestamp: Tensor | None = None,
        prev_exists: Tensor | None = None,
        track_keys: bool = False,
    ) -> DetectorOutput:
        """Detect the boxes of one frame.

        Args:
            img: [B, N, 3, H, W] normalised images, padded to multiples of 32 (pad_shape = (H, W)).
            lidar2img: [B, N, 4, 4] lidar-to-image projections (input-image pixels).
            intrinsics: [B, N, 4, 4] camera matrices (fx, fy are read).
            state: StreamPETR: the previous frame's `out.state`, or None to start a scene.
            ego_pose: StreamPETR: [B, 4, 4] lidar-to-global pose (None: identity).
            ego_pose_inv: its inverse if known; None computes the rigid float64 inverse.
            timestamp: StreamPETR: [B] seconds (float64).
            prev_exists: StreamPETR: [B] 1 if the previous frame is of the same scene; None = 1
                when a state is given, else 0.
            track_keys: record the original index of every key each decoder layer saw.
        Returns:
            DetectorOutput.
        """
        if lidar2img.shape[:2] != img.shape[:2] or intrinsics.shape[:2] != img.shape[:2]:
            raise ValueError(
                f"lidar2img {tuple(lidar2img.shape)} and intrinsics {tuple(intrinsics.shape)} must be "
                f"[B, N_cam, 4, 4] for img {tuple(img.shape)}"
            )
        if not self.temporal and any(v is not None for v in (state, ego_pose, ego_pose_inv, timestamp, prev_exists)):
            raise ValueError(f"{self.config.name} has no temporal memory: state, ego_pose, timestamp are StreamPETR's")
        pad_shape = tuple(img.shape[-2:])
        img_feats = self.extract_img_feat(img)
        roi = None
        if not self.aux_2d_only and self.img_roi_head is not None:
            roi = self.img_roi_head(img_feats, pad_shape)
        topk = roi.topk_indexes if roi is not None else None
        head = self.pts_bbox_head
        if isinstance(head, StreamPETRHead):
            out: DecoderOutput = head(
                img_feats,
                lidar2img,
                intrinsics,
                pad_shape,
                topk_indexes=topk,
                state=state,
                ego_pose=ego_pose,
                ego_pose_inv=ego_pose_inv,
                timestamp=timestamp,
                prev_exists=prev_exists,
                track_keys=track_keys,
            )
        else:
            out = head(img_feats, lidar2img, intrinsics, pad_shape, topk_indexes=topk, track_keys=track_keys)
        return DetectorOutput(
            detections=head.get_bboxes(out),
            cls_scores=out.cls_scores,
            bbox_preds=out.bbox_preds,
            state=out.state,
            keys_per_layer=out.keys_per_layer,
            roi=roi,
        )

    def normalize(self, images: Tensor) -> Tensor:
        """[..., 3, H, W] float images in 0..255, RGB order -> the config's normalised input (BGR for VoVNet)."""
        if images.shape[-3] != 3:
            raise ValueError(f"images must be [..., 3, H, W] RGB, got {tuple(images.shape)}")
        x = images.float()
        if not self.config.to_rgb:  # the mean/std are in BGR order: flip the channels first
            x = x.flip(-3)
        mean = torch.tensor(self.config.img_mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.config.img_std, device=x.device).view(3, 1, 1)
        return (x - mean) / std


def build_detector(
    name: str | PublishedConfig,
    *,
    pruner: KeyPruner | None | str = "default",
    attention: str = "fast",
    aux_2d_only: bool = True,
    **sizes,
) -> PETRFamilyDetector:
    """A published detector by config name, in eval mode, with random weights (load a checkpoint next).

    Args:
        name: a config name of `PUBLISHED_CONFIGS` (e.g. "stream_petr_r50_flash_704_bs2_seq_24e"),
            a short alias ("streampetr-r50-704x256"), or a PublishedConfig.
        pruner: "default" (tgGBC at the config's r, n, k), None (dense) or a KeyPruner.
        attention: "fast" or "reference".
        aux_2d_only: see `PETRFamilyDetector`.
        sizes: overrides of the config's fields (num_query, num_layers, image_size, ...) and
            num_heads / ffn_dims / neck_channels, for small test models; a checkpoint of the
            published model will not load into a model built smaller.
    """
    import dataclasses

    config = name if isinstance(name, PublishedConfig) else published_config(name)
    module_sizes = {k: sizes.pop(k) for k in ("num_heads", "ffn_dims", "neck_channels") if k in sizes}
    if sizes:
        fields = {f.name for f in dataclasses.fields(PublishedConfig)}
        unknown = sorted(set(sizes) - fields)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} for build_detector")
        config = dataclasses.replace(config, **sizes)
    if isinstance(pruner, str):
        if pruner != "default":
            raise ValueError(f"pruner must be 'default', None or a KeyPruner, got {pruner!r}")
        pruner = default_pruner(config)
    model = PETRFamilyDetector(config, pruner=pruner, attention=attention, aux_2d_only=aux_2d_only, **module_sizes)
    return model.eval()


class SceneStream:
    """Runs a StreamPETR detector frame after frame, resetting its memory at a scene change.

    The original test loop (Petr3D.simple_test_pts) keeps the memory inside the head and clears it
    when the scene token changes; this wrapper does the same around the explicit state.

        stream = SceneStream(detector)
        out = stream(img, lidar2img, intrinsics, ego_pose=pose, timestamp=t, scene_token="scene-0103")

    For a batch, pass one scene token per sample. `reset()` forgets everything.
    """

    def __init__(self, detector: PETRFamilyDetector):
        self.detector = detector
        self.state: TemporalState | None = None
        self.scene_tokens: list[str] | None = None

    def reset(self) -> None:
        self.state, self.scene_tokens = None, None

    @torch.no_grad()
    def __call__(
        self,
        img: Tensor,
        lidar2img: Tensor,
        intrinsics: Tensor,
        *,
        ego_pose: Tensor | None = None,
        timestamp: Tensor | None = None,
        scene_token: str | list[str] | None = None,
        ego_pose_inv: Tensor | None = None,
    ) -> DetectorOutput:
        """One frame; arguments as `PETRFamilyDetector.forward`, plus the scene token(s) of the frame."""
        if not self.detector.temporal:
            return self.detector(img, lidar2img, intrinsics)
        batch = img.shape[0]
        tokens = [scene_token] * batch if scene_token is None or isinstance(scene_token, str) else list(scene_token)
        if len(tokens) != batch:
            raise ValueError(f"scene_token: {len(tokens)} tokens for a batch of {batch}")
        if self.state is None or self.scene_tokens is None or self.state.batch_size != batch:
            self.state, same = None, [False] * batch
        else:
            # A scene continues while its token stays the same (None == None: the caller gives none).
            same = [t == p for t, p in zip(tokens, self.scene_tokens, strict=True)]
        prev_exists = torch.tensor([1.0 if s else 0.0 for s in same], device=img.device)
        state = None if not any(same) else self.state
        out = self.detector(
            img,
            lidar2img,
            intrinsics,
            state=state,
            ego_pose=ego_pose,
            ego_pose_inv=ego_pose_inv,
            timestamp=timestamp,
            prev_exists=prev_exists,
        )
        self.state, self.scene_tokens = out.state, tokens
        return out


def example_frame(
    detector: PETRFamilyDetector,
    batch: int = 1,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """Keyword arguments of one plausible random frame for `detector(**frame)` (benchmarks, smoke tests).

    Six cameras 60 degrees apart looking outwards from 1.5 m, with a nuScenes-like field of view;
    images ~ N(0, 1) (already normalised); for StreamPETR an ego pose ~1.6 km from the origin and a
    nuScenes-sized timestamp.

    Args:
        image_size: (H, W), multiples of 32; None = the config's.
    """
    import math

    h, w = image_size or detector.config.image_size
    g = torch.Generator().manual_seed(seed)
    focal = 0.8 * w  # ~64 degrees horizontal field of view, like nuScenes' front cameras
    k = torch.tensor([[focal, 0, w / 2, 0], [0, focal, h / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    axes = torch.tensor([[0.0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])  # lidar -> camera axes
    lidar2img = torch.zeros(batch, 6, 4, 4)
    for n in range(6):
        yaw = 2 * math.pi * n / 6
        lidar2cam = torch.eye(4)
        lidar2cam[:2, :2] = torch.tensor([[math.cos(yaw), math.sin(yaw)], [-math.sin(yaw), math.cos(yaw)]])
        lidar2cam[2, 3] = -1.5
        lidar2img[:, n] = k @ axes @ lidar2cam
    frame = {
        "img": torch.randn(batch, 6, 3, h, w, generator=g).to(device),
        "lidar2img": lidar2img.to(device),
        "intrinsics": k.expand(batch, 6, 4, 4).clone().to(device),
    }
    if detector.temporal:
        pose = torch.eye(4, dtype=torch.float64).repeat(batch, 1, 1)
        pose[:, :3, 3] = torch.tensor([600.0, 1600.0, 0.0], dtype=torch.float64)
        frame["ego_pose"] = pose.to(device)
        frame["timestamp"] = torch.full((batch,), 1.5e9, dtype=torch.float64, device=device)
    return frame
