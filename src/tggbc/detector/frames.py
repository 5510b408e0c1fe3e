"""Training frames with their backbone features computed once and cached on disk.

The backbone is frozen in training, so its features are a pure function of the image: they are
computed once per (dataroot, split, backbone weights) and stored as one float16 .npy file under
`<dataroot>/.cache/`. A training run then costs the position embedding and the decoder only.
The cache is written atomically and named by a hash of the backbone tensors and the frames, so
a changed backbone or dataset never reads a stale one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..files import write_atomic
from .boxes import XY_LIMIT, encode_boxes
from .model import Detector


def frame_targets(frame) -> tuple[Tensor, Tensor]:
    """The boxes a frame is trained on: labels [M] long and box code [M, 10].

    Kept: boxes the metric scores (with lidar or radar points) whose centre the decoder can
    represent (|x|, |y| < 51.2 m).
    """
    boxes = torch.from_numpy(frame.gt_boxes)
    keep = torch.from_numpy(frame.gt_valid) & (boxes[:, :2].abs() < XY_LIMIT).all(1)
    boxes = boxes[keep]
    return torch.from_numpy(frame.gt_labels)[keep], encode_boxes(
        boxes[:, 0:3], boxes[:, 3:6], boxes[:, 6], boxes[:, 7:9]
    )


def backbone_hash(model: Detector) -> str:
    """A short hash of the backbone's tensors (names, shapes, float32 values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def images_of(frame) -> Tensor:
    """[6, 3, H, W] uint8 read from disk (the frame keeps no copy)."""
    images = torch.from_numpy(frame.read_images()).permute(0, 3, 1, 2)
    frame.images = None
    return images


@torch.no_grad()
def compute_features(model: Detector, frames: Sequence, out: np.ndarray, batch: int = 8, progress: bool = True) -> None:
    """Fill out [F, N, C, h, w] (float16) with the backbone features of `frames`."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(frames), desc="backbone features", unit="frame", leave=False)
    model.eval()
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        images = torch.stack([images_of(f) for f in chunk]).to(model.mean.device)
        out[start : start + len(chunk)] = model.features(images).half().cpu().numpy()
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()


def cached_features(model: Detector, dataroot: str | Path, split: str, frames: Sequence, progress: bool = True):
    """The backbone features of `frames` (all of `split` in `dataroot`), memory-mapped [F, N, C, h, w].

    Computed on first use and kept in `<dataroot>/.cache/`; read without unpickling.
    """
    h = hashlib.sha256(backbone_hash(model).encode())
    for f in frames:
        h.update(f.sample_token.encode())
    path = Path(dataroot) / ".cache" / f"features-{split}-{h.hexdigest()[:16]}.npy"
    cfg = model.config
    rows, cols = cfg.feature_shape
    shape = (len(frames), 6, model.backbone.out_channels, rows, cols)
    if not path.is_file():

        def write(tmp: str) -> None:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
            compute_features(model, frames, array, progress=progress)
            array.flush()
            del array

        write_atomic(path, write)
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.shape != shape or array.dtype != np.float16:
        raise ValueError(f"{path} holds {array.dtype} {array.shape}, expected float16 {shape}: delete it to rebuild")
    return array
