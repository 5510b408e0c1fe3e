"""Saving and loading detector weights: safetensors with the config in the header.

Loading never unpickles anything, and refuses a file whose tensors do not match the model with
a message that names the offending tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import write_atomic
from .model import DetectorConfig, PETRDetector

_FORMAT = "tggbc-petr-detector/1"


def save_detector(model: PETRDetector, path: str | Path, dtype: torch.dtype = torch.float16, extra: dict | None = None):
    """Write the model's state dict (cast to `dtype`; float16 keeps the file small) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        name: (t.to(dtype) if t.is_floating_point() else t).contiguous().cpu() for name, t in model.state_dict().items()
    }
    metadata = {"format": _FORMAT, "config": json.dumps(model.config.to_dict())}
    if extra:
        metadata["extra"] = json.dumps(extra)
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: str | Path) -> dict:
    """The header metadata of a weights file (config, extra)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a tggbc detector file (format {metadata.get('format')!r}, want {_FORMAT!r})")
    return metadata


def read_tensors(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header metadata and the tensors of a tggbc detector file, or a clear error."""
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read its tensors ({e}); the file is damaged") from e
    return metadata, tensors


def shape_mismatches(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """'name: file (shape) vs model (shape)' for every tensor both hold with different shapes, sorted."""
    return sorted(
        f"{name}: file {tuple(tensors[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in set(expected) & set(tensors)
        if tensors[name].shape != expected[name].shape
    )


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> PETRDetector:
    """Build the detector a weights file describes and load its tensors (as float32)."""
    metadata, tensors = read_tensors(path)
    config = DetectorConfig.from_dict(json.loads(metadata["config"]))
    model = PETRDetector(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = shape_mismatches(tensors, expected)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape (e.g. {wrong[:3]})")
        raise ValueError(f"{path} does not match the detector it describes: " + "; ".join(parts))
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{path} holds NaN or inf in {len(bad)} tensors (e.g. {bad[:3]})")
    model.load_state_dict({name: t.to(expected[name].dtype) for name, t in tensors.items()})
    return model.to(device).eval()
