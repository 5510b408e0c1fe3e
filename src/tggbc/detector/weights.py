"""Saving and loading detector weights: safetensors, with the architecture in the header.

Loading never unpickles anything and refuses a file whose tensors do not match the architecture
it declares, naming the offending tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import write_atomic
from .config import DetectorConfig
from .model import Detector

FORMAT = "tggbc-detector/2"


def save_detector(model: Detector, path: str | Path, dtype: torch.dtype = torch.float16, extra: dict | None = None):
    """Write the model's state dict (floats cast to `dtype`; float16 halves the file) atomically."""
    from safetensors.torch import save_file

    tensors = {
        name: (t.to(dtype) if t.is_floating_point() else t).contiguous().cpu() for name, t in model.state_dict().items()
    }
    metadata = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    if extra:
        metadata["extra"] = json.dumps(extra)
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: str | Path, any_format: bool = False) -> dict:
    """The header metadata of a weights file; unless `any_format`, it must be a detector file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if not any_format and metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tggbc detector file (format {metadata.get('format')!r}, want {FORMAT!r})")
    return metadata


def read_tensors(path: str | Path, any_format: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header metadata and the tensors of a weights file, or a clear error."""
    from safetensors.torch import load_file

    metadata = read_metadata(path, any_format)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read its tensors ({e}); the file is damaged") from e
    return metadata, tensors


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> Detector:
    """Build the detector a weights file describes and load its tensors (as float32), in eval mode."""
    metadata, tensors = read_tensors(path)
    try:
        config = DetectorConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its header holds no valid detector config ({e})") from e
    model = Detector(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{name}: file {tuple(tensors[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in set(expected) & set(tensors)
        if tensors[name].shape != expected[name].shape
    )
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
