"""FocalPETR's decoder and head (Wang et al., 2023): StreamPETR's decoder without temporal memory.

Imports nothing but torch and the core.
"""

from __future__ import annotations

from .petr import PETRDecoder

__all__ = ["FocalPETRDecoder"]


class FocalPETRDecoder(PETRDecoder):
    """FocalPETR's decoder plus its per-layer heads: StreamPETR's decoder without temporal memory.

    900 learnable queries, zero initial target, box code (cx, cy, cz, log w, log l, log h, sin,
    cos, vx, vy). Same arguments and forward as `PETRDecoder`.
    """

    center_index = (0, 1, 2)
