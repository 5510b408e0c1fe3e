"""Shared test data for the nuScenes tests: one small generated dataset per test process, and random
weights of a published detector saved in `tggbc convert`'s format."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

SYNTH_SIZE = (176, 96)  # (W, H) of the generated camera images
_cache: dict[str, Path] = {}
_root = None


def _scratch() -> Path:
    global _root
    if _root is None:
        _root = tempfile.TemporaryDirectory(prefix="tggbc-nuscenes-tests-")
    return Path(_root.name)


def synth_dataset() -> Path:
    """Three scenes of three keyframes each, all in val, with 176x96 camera images."""
    if "synth" not in _cache:
        from tggbc.data import generate

        _cache["synth"] = generate(
            _scratch() / "synth", num_scenes=3, seed=11, image_size=SYNTH_SIZE, frames_per_scene=3,
            val_fraction=1.0, progress=False,
        )  # fmt: skip
    return _cache["synth"]


def random_weights(name: str, seed: int = 0) -> Path:
    """A published detector with random weights (build_detector's initialisation, seeded), written as
    `tggbc convert` writes converted checkpoints."""
    key = f"weights-{name}-{seed}"
    if key not in _cache:
        from tggbc.models.checkpoint import ConvertedCheckpoint, save_converted
        from tggbc.models.detectors import build_detector

        torch.manual_seed(seed)
        detector = build_detector(name, pruner=None)
        path = _scratch() / f"{key}.safetensors"
        save_converted(path, ConvertedCheckpoint(detector.state_dict(), [], [], {}, []), detector.config.name)
        _cache[key] = path
    return _cache[key]
