"""Host decoders of the PETR family, with tgGBC built into their layer loop.

    decoder = build_decoder("streampetr", pruner=KeyPruner(r=21000, n=1, k=175))
    out = decoder(**example_inputs(decoder, num_keys=24000))
    out.cls_scores, out.bbox_preds, out.keys_per_layer

Kinds: "petr" (`PETRDecoder`), "streampetr" (`StreamPETRDecoder`), "focalpetr"
(`FocalPETRDecoder`). The key side of each head (image features + cameras -> memory, key_pos)
is in `tggbc.models.position`; checkpoint renaming in `tggbc.models.checkpoint`.

Complete detectors of the published configs (backbone, neck, heads, box decoding):

    detector = build_detector("stream_petr_r50_flash_704_bs2_seq_24e")   # tgGBC at its defaults
    load_converted(detector, "streampetr_r50.safetensors")                # from `tggbc convert`

Imports nothing but torch and the core.
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import (
    ConvertedCheckpoint,
    ConvertedStateDict,
    convert_checkpoint,
    convert_petr_state_dict,
    convert_streampetr_state_dict,
    load_checkpoint,
    load_converted,
    load_original_state_dict,
    read_checkpoint,
    to_petr_state_dict,
    to_streampetr_state_dict,
)
from .coder import Detections, NMSFreeCoder
from .configs import PUBLISHED_CONFIGS, PublishedConfig, published_config
from .decoder import ATTENTION_MODES, DecoderOutput, PETRFamilyDecoder
from .detectors import DetectorOutput, PETRFamilyDetector, SceneStream, build_detector
from .focalpetr import FocalPETRDecoder
from .heads import FocalHead, FocalPETRHead, StreamPETRHead
from .layers import MotionLayerNorm, PETRDecoderLayer, QueryPositionEmbedding
from .necks import CPFPN
from .petr import PETRDecoder
from .position import DecoderKeys, PETRPositionEmbedding, StreamPETRPositionEmbedding
from .resnet import ResNet
from .state import TemporalState
from .streampetr import StreamPETRDecoder
from .vovnet import VoVNet

__all__ = [
    "ATTENTION_MODES",
    "CPFPN",
    "ConvertedCheckpoint",
    "Detections",
    "DetectorOutput",
    "FocalHead",
    "FocalPETRHead",
    "NMSFreeCoder",
    "PETRFamilyDetector",
    "PUBLISHED_CONFIGS",
    "PublishedConfig",
    "ResNet",
    "SceneStream",
    "StreamPETRHead",
    "VoVNet",
    "build_detector",
    "convert_checkpoint",
    "load_checkpoint",
    "load_converted",
    "published_config",
    "read_checkpoint",
    "DECODERS",
    "ConvertedStateDict",
    "DecoderKeys",
    "DecoderOutput",
    "FocalPETRDecoder",
    "MotionLayerNorm",
    "PETRDecoder",
    "PETRDecoderLayer",
    "PETRFamilyDecoder",
    "PETRPositionEmbedding",
    "QueryPositionEmbedding",
    "StreamPETRDecoder",
    "StreamPETRPositionEmbedding",
    "TemporalState",
    "build_decoder",
    "convert_petr_state_dict",
    "convert_streampetr_state_dict",
    "example_inputs",
    "load_original_state_dict",
    "to_petr_state_dict",
    "to_streampetr_state_dict",
]

DECODERS: dict[str, type[PETRFamilyDecoder]] = {
    "petr": PETRDecoder,
    "streampetr": StreamPETRDecoder,
    "focalpetr": FocalPETRDecoder,
}


def build_decoder(kind: str, **kwargs) -> PETRFamilyDecoder:
    """A host decoder by name.

    Args:
        kind: "petr", "streampetr" or "focalpetr" (case-insensitive).
        kwargs: constructor arguments of that decoder (num_layers, embed_dims, pruner, attention, ...).
    """
    cls = DECODERS.get(kind.lower()) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown decoder kind {kind!r}; known kinds: {sorted(DECODERS)}")
    return cls(**kwargs)


def example_inputs(
    decoder: nn.Module,
    num_keys: int,
    batch: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    padded_fraction: float = 0.0,
) -> dict:
    """Random keyword arguments for `decoder(**inputs)`, for benchmarks and smoke tests.

    Args:
        decoder: a PETRDecoder, StreamPETRDecoder or FocalPETRDecoder.
        num_keys: Nk image keys (6 cameras x H/16 x W/16 in the hosts, e.g. 24000 at 1600x640).
        batch: B.
        device, dtype: of the float inputs (StreamPETR's geometry stays float32, times float64).
        seed: for the random generator.
        padded_fraction: fraction of each sample's keys marked padded (the last ones, as padding
            sits after the valid pixels); 0 gives key_padding_mask None.
    Returns:
        memory, key_pos [B, Nk, E] ~ N(0, 1), key_padding_mask; for StreamPETR also a full
        random `state` (TemporalState.random) and this frame's ego_pose and timestamp.
    """
    if not isinstance(decoder, PETRFamilyDecoder):
        raise TypeError(f"example_inputs needs one of {sorted(DECODERS)} decoders, got {type(decoder).__name__}")
    if isinstance(num_keys, bool) or not isinstance(num_keys, int) or num_keys < 1:
        raise ValueError(f"num_keys must be a positive int, got {num_keys!r}")
    if not 0.0 <= padded_fraction < 1.0:
        raise ValueError(f"padded_fraction must lie in [0, 1), got {padded_fraction}")
    g = torch.Generator().manual_seed(seed)
    e = decoder.embed_dims
    inputs: dict = {
        "memory": torch.randn(batch, num_keys, e, generator=g).to(device, dtype),
        "key_pos": torch.randn(batch, num_keys, e, generator=g).to(device, dtype),
        "key_padding_mask": None,
    }
    padded = int(round(padded_fraction * num_keys))
    if padded > 0:
        if padded >= num_keys:
            raise ValueError(f"padded_fraction={padded_fraction} would pad all {num_keys} keys")
        mask = torch.zeros(batch, num_keys, dtype=torch.bool)
        mask[:, num_keys - padded :] = True
        inputs["key_padding_mask"] = mask.to(device)
    if isinstance(decoder, StreamPETRDecoder):
        inputs["state"] = TemporalState.random(
            batch,
            decoder.memory_len,
            e,
            pc_range=decoder.pc_range.tolist(),
            device=device,
            dtype=dtype,
            seed=seed + 1,
        )
        inputs["ego_pose"] = torch.eye(4, device=device).repeat(batch, 1, 1)
        inputs["timestamp"] = torch.zeros(batch, dtype=torch.float64, device=device)
    return inputs
