"""The published settings by name: which host decoder, how many keys, and tgGBC's r, n, k.

Keys per frame = 6 cameras x (H / 16) x (W / 16). r, n, k are the tgGBC paper's settings
(../ANCHORS: PETR r=12000 spread over 3 layers; StreamPETR-V2-99 r=21000 n=1 k=175; 3DPPE
r=3000); FocalPETR, for which the paper names none, drops 87.5% after layer 1 with k=175.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DecoderPreset", "DECODER_PRESETS", "DECODER_KINDS"]

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
