"""The published settings by name: which host decoder, how many keys, and tgGBC's r, n, k.

Keys per frame = 6 cameras x (H / 16) x (W / 16). r, n, k are the tgGBC paper's settings
(../ANCHORS: PETR r=12000 spread over 3 layers; StreamPETR-V2-99 r=21000 n=1 k=175; 3DPPE
r=3000); FocalPETR, for which the paper names none, drops 87.5% after layer 1 with k=175.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DecoderPreset",
    "DECODER_PRESETS",
    "DECODER_KINDS",
    "PublishedConfig",
    "PUBLISHED_CONFIGS",
    "PUBLISHED_ALIASES",
    "published_config",
]

DECODER_KINDS = ("petr", "streampetr", "focalpetr")


@dataclass(frozen=True)
class DecoderPreset:
    kind: str  # host decoder: one of DECODER_KINDS
    keys: int
    r: int | float | list[int]
    n: int = 1
    k: int = 175
    note: str = ""


DECODER_PRESETS: dict[str, DecoderPreset] = {
    "petr-r50-1408x512": DecoderPreset("petr", 16896, 12000, n=3, k=175, note="PETR-R50, 6x88x32 keys"),
    "streampetr-v2-99-1600x640": DecoderPreset("streampetr", 24000, 21000, n=1, k=175, note="StreamPETR-V2-99"),
    "3dppe-800x320": DecoderPreset("streampetr", 6000, 3000, n=1, k=175, note="3DPPE, StreamPETR-style decoder"),
    "focalpetr-r50-704x256": DecoderPreset("focalpetr", 4224, 0.875, n=1, k=175, note="FocalPETR-R50, 87.5% pruned"),
    "tiny": DecoderPreset("focalpetr", 384, 0.5, n=1, k=32, note="smoke test"),
}


# ------------------------------------------------------------------ published detectors

# The ImageNet normalisation of the configs: RGB order for the torchvision ResNet-50, BGR (caffe)
# order for the VoVNet-99 backbones ("fix img_norm" in the StreamPETR configs).
RGB_NORM = dict(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), to_rgb=True)
BGR_NORM = dict(mean=(103.530, 116.280, 123.675), std=(57.375, 57.120, 58.395), to_rgb=False)


@dataclass(frozen=True)
class PublishedConfig:
    """Everything a published config fixes about the detector at inference.

    head: "StreamPETRHead" (temporal) or "PETRHeadDN" (the petrv1 / focal_petrv1 head: StreamPETR's
        decoder without memory), the configs' `pts_bbox_head.type`.
    backbone: "ResNet-50" (mmdet, style pytorch, stages 3-4) or "V-99-eSE" (VoVNet, stages 4-5).
    neck_in_channels: CPFPN inputs. roi_head: the checkpoint holds a FocalHead (img_roi_head).
    image_size: (H, W) of the network input (the configs' final_dim; padded to a multiple of 32).
    r, n, k: tgGBC's default setting for this model.
    source: the config file it comes from.
    """

    name: str
    head: str
    backbone: str
    neck_in_channels: tuple[int, ...]
    image_size: tuple[int, int]
    roi_head: bool
    r: int | float
    n: int
    k: int
    source: str
    num_query: int = 644
    num_propagated: int = 256
    memory_len: int = 1024
    topk_proposals: int = 256
    num_classes: int = 10
    embed_dims: int = 256
    num_layers: int = 6
    depth_num: int = 64
    depth_start: float = 1.0
    position_range: tuple[float, ...] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    pc_range: tuple[float, ...] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    post_center_range: tuple[float, ...] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    max_num: int = 300
    stride: int = 16
    img_mean: tuple[float, ...] = RGB_NORM["mean"]
    img_std: tuple[float, ...] = RGB_NORM["std"]
    to_rgb: bool = True

    @property
    def temporal(self) -> bool:
        return self.head == "StreamPETRHead"

    @property
    def num_keys(self) -> int:
        """Image keys per frame: 6 cameras x (H / 16) x (W / 16)."""
        h, w = self.image_size
        return 6 * (h // self.stride) * (w // self.stride)


_R50 = dict(backbone="ResNet-50", neck_in_channels=(1024, 2048), image_size=(256, 704))
_V99 = dict(backbone="V-99-eSE", neck_in_channels=(768, 1024), img_mean=BGR_NORM["mean"], img_std=BGR_NORM["std"])
_V99 = {**_V99, "to_rgb": False}
# tgGBC: the paper publishes r=21000 n=1 k=175 for StreamPETR-V2-99 at 1600x640 (24000 keys);
# for the other configs it names no setting, so they drop the same fraction, 87.5%, after layer 1.
_TGGBC = dict(r=0.875, n=1, k=175)
_Q428 = dict(num_query=300, num_propagated=128, memory_len=512, topk_proposals=128)
_STREAM = "exiawsh/StreamPETR projects/configs/"

PUBLISHED_CONFIGS: dict[str, PublishedConfig] = {
    c.name: c
    for c in (
        PublishedConfig(
            "stream_petr_r50_flash_704_bs2_seq_24e",
            "StreamPETRHead",
            roi_head=True,
            source=_STREAM + "StreamPETR/stream_petr_r50_flash_704_bs2_seq_24e.py",
            **_R50,
            **_TGGBC,
        ),
        PublishedConfig(  # the 24e model trained for 90 epochs: the R50 checkpoint the repository publishes
            "stream_petr_r50_flash_704_bs2_seq_90e",
            "StreamPETRHead",
            roi_head=True,
            source=_STREAM + "StreamPETR/stream_petr_r50_flash_704_bs2_seq_90e.py",
            **_R50,
            **_TGGBC,
        ),
        PublishedConfig(
            "stream_petr_r50_flash_704_bs2_seq_428q_nui_24e",
            "StreamPETRHead",
            roi_head=True,
            source=_STREAM + "StreamPETR/stream_petr_r50_flash_704_bs2_seq_428q_nui_24e.py",
            **_R50,
            **_Q428,
            **_TGGBC,
        ),
        PublishedConfig(
            "stream_petr_r50_flash_704_bs2_seq_428q_nui_60e",
            "StreamPETRHead",
            roi_head=True,
            source=_STREAM + "StreamPETR/stream_petr_r50_flash_704_bs2_seq_428q_nui_60e.py",
            **_R50,
            **_Q428,
            **_TGGBC,
        ),
        PublishedConfig(
            "stream_petr_vov_flash_800_bs2_seq_24e",
            "StreamPETRHead",
            image_size=(320, 800),
            roi_head=True,
            source=_STREAM + "StreamPETR/stream_petr_vov_flash_800_bs2_seq_24e.py",
            **_V99,
            **_TGGBC,
        ),
        PublishedConfig(
            "streampetr_vov_1600x640_bs2x2_24e_gbc_r21000_n1_k175",
            "StreamPETRHead",
            image_size=(640, 1600),
            roi_head=True,
            r=21000,
            n=1,
            k=175,
            source="iseri27/tg_gbc examples/streampetr/projects/configs/tgtg/"
            "streampetr_vov_1600x640_bs2x2_24e_gbc_r21000_n1_k175.py",
            **_V99,
        ),
        PublishedConfig(
            "petrv1_r50_flash_704_24e",
            "PETRHeadDN",
            roi_head=False,
            num_query=900,
            num_propagated=0,
            memory_len=0,
            topk_proposals=0,
            source=_STREAM + "PETRv1/petrv1_r50_flash_704_24e.py",
            **_R50,
            **_TGGBC,
        ),
        PublishedConfig(
            "focal_petrv1_r50_flash_704_24e",
            "PETRHeadDN",
            roi_head=True,
            num_query=900,
            num_propagated=0,
            memory_len=0,
            topk_proposals=0,
            source=_STREAM + "PETRv1/focal_petrv1_r50_flash_704_24e.py",
            **_R50,
            **_TGGBC,
        ),
    )
}
# Short names for the command line.
PUBLISHED_ALIASES = {
    "streampetr-r50-704x256": "stream_petr_r50_flash_704_bs2_seq_24e",
    "streampetr-v2-99-800x320": "stream_petr_vov_flash_800_bs2_seq_24e",
    "streampetr-v2-99-1600x640": "streampetr_vov_1600x640_bs2x2_24e_gbc_r21000_n1_k175",
    "petr-r50-704x256": "petrv1_r50_flash_704_24e",
    "focalpetr-r50-704x256": "focal_petrv1_r50_flash_704_24e",
}


def published_config(name: str) -> PublishedConfig:
    """The PublishedConfig of a config name (or a short alias); ValueError naming the known ones."""
    key = PUBLISHED_ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in PUBLISHED_CONFIGS:
        raise ValueError(
            f"unknown model {name!r}; known: {', '.join(PUBLISHED_CONFIGS)} (aliases: {', '.join(PUBLISHED_ALIASES)})"
        )
    return PUBLISHED_CONFIGS[key]
