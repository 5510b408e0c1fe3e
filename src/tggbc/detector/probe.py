"""`tggbc probe`: how well the dense head proposes objects, by distance.

The decoder starts from the dense head's proposals: 3x3 heatmap peaks, back-projected with the
offset and depth the head regresses there (see `dense.py`). When `tggbc bound` shows far objects
matched less often, this says why: no proposal near them, or a proposal in the wrong place. For
every ground-truth box whose centre a camera images (the camera `tggbc bound` picks), it takes the
highest-scoring peak within one head cell of the projected centre, counts the object found when
that peak's best class score reaches a threshold, and measures the centre the peak predicts: its
pixel error in the image and its depth error relative to the true depth. It then follows the
decoder query selected from that peak to the decoder's last layer and measures its box's depth the
same way: whether the decoder corrects a proposal's depth or keeps it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..data.transforms import project_points
from ..files import write_json_atomic
from .bound import DISTANCE_BANDS, transformed_xy, viewing_camera
from .dense import cell_values, proposal_peaks
from .evaluate import frame_batch, split_frames
from .loss import decode_boxes
from .model import PETRDetector

FOUND_SCORE = 0.3  # a peak at least this confident counts as a proposal (the decoder sees the top 300)


def peak_errors(
    score: np.ndarray,
    peak: np.ndarray,
    regression: np.ndarray,
    camera: np.ndarray,
    uv: np.ndarray,
    depth: np.ndarray,
    stride: int,
    threshold: float = FOUND_SCORE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The dense head's best proposal near each object, and how far off it is.

    Args:
        score: [N, h, w] best class probability per cell. peak: [N, h, w] bool (3x3 local maxima).
        regression: [N, >=3, h, w] the head's (du, dv) offset in cells from the cell centre and log depth.
        camera: [M] int, the camera imaging each object's centre. uv: [M, 2] that centre in pixels.
        depth: [M] metres along that camera's axis. stride: pixels per cell.
    Returns:
        found [M] bool, pixel_error [M] (distance in pixels between the predicted and true centre),
        depth_error [M] (predicted / true depth - 1), NaN where not found, and cell [M]: the peak's
        camera-major index into (camera, row, column), -1 where not found.
    """
    _, h, w = score.shape
    m = len(camera)
    found = np.zeros(m, bool)
    cell = np.full(m, -1, np.int64)
    pixel_error, depth_error = np.full(m, np.nan), np.full(m, np.nan)
    for i in range(m):
        cu, cv = uv[i] / stride
        row, col = min(int(cv), h - 1), min(int(cu), w - 1)
        r0, c0 = max(row - 1, 0), max(col - 1, 0)
        window = np.where(peak[camera[i], r0 : row + 2, c0 : col + 2], score[camera[i], r0 : row + 2, c0 : col + 2], -1)
        best = np.unravel_index(int(window.argmax()), window.shape)
        if window[best] < threshold:
            continue
        r, c = r0 + best[0], c0 + best[1]
        du, dv, log_depth = regression[camera[i], :3, r, c]
        found[i] = True
        cell[i] = (camera[i] * h + r) * w + c
        pixel_error[i] = float(np.hypot(c + 0.5 + du - cu, r + 0.5 + dv - cv)) * stride
        depth_error[i] = float(np.exp(log_depth)) / depth[i] - 1.0
    return found, pixel_error, depth_error, cell


def cell_depth_errors(regression: np.ndarray, channel: int, cell: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """One log-depth channel of the head's regression at each object's peak cell.

    Args:
        regression: [N, R, h, w]. channel: which log depth (for a ground-contact head 3 is the
            direct one and 4 the road's below the contact row; see `dense.py`). cell: [M] each
            object's peak (`peak_errors`), -1 where none. depth: [M] true depth, metres.
    Returns:
        [M] predicted / true depth - 1, NaN where the object has no peak.
    """
    at = cell_values(torch.from_numpy(regression[None, :, channel : channel + 1]), torch.from_numpy(cell.clip(0))[None])
    error = np.exp(at[0, :, 0].numpy()).astype(np.float64) / depth - 1.0
    return np.where(cell >= 0, error, np.nan)


# A ground-contact head's two depth estimates, reported beside the fused one: (summary key, channel).
CONTACT_COLUMNS = (("direct_depth_error", 3), ("ground_depth_error", 4))


def decoder_depth_errors(
    cell: np.ndarray,
    selected: np.ndarray,
    center: np.ndarray,
    camera: np.ndarray,
    depth: np.ndarray,
    lidar2img: np.ndarray,
) -> np.ndarray:
    """How far off in depth the decoder's box is for the query each object's peak became.

    Args:
        cell: [M] each object's peak (`peak_errors`), -1 where none. selected: [Q] the cell each
            decoder query was selected from. center: [Q, 3] each query's final box centre, lidar
            frame. camera: [M] the camera imaging each object. depth: [M] its true depth along that
            camera's axis, metres. lidar2img: [N, 4, 4].
    Returns:
        [M] the box centre's depth along the same camera's axis / true depth - 1; NaN where the
        object has no peak or its peak is not among the selected queries.
    """
    error = np.full(len(cell), np.nan)
    box_depth = project_points(center, lidar2img)[1]  # (N, Q)
    query_of = {int(c): q for q, c in enumerate(selected)}
    for i, c in enumerate(cell):
        q = query_of.get(int(c)) if c >= 0 else None
        if q is not None:
            error[i] = box_depth[camera[i], q] / depth[i] - 1.0
    return error


def summarise(
    distance: np.ndarray,
    found: np.ndarray,
    pixel_error: np.ndarray,
    depth_error: np.ndarray,
    decoder_depth_error: np.ndarray | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> dict:
    """Per distance band (`bound.DISTANCE_BANDS`): objects, share found, median pixel error, median
    |relative depth error| and median signed relative depth error (its bias) of the found ones, and
    with `decoder_depth_error` the median |relative depth error| of their decoder boxes (over those
    whose peak became a query). Each `extra` column ([M] relative depth errors, NaN where not
    measured) is summarised the same way, under its own name."""
    extra = dict(extra or {})
    if decoder_depth_error is not None:
        extra = {"decoder_depth_error": decoder_depth_error, **extra}
    out = {"bands": [], "objects": [], "found": [], "pixel_error": [], "depth_error": [], "depth_bias": []}
    for name in extra:
        out[name] = []
    for lo, hi in zip(DISTANCE_BANDS[:-1], DISTANCE_BANDS[1:], strict=True):
        band = (distance >= lo) & (distance < hi)
        hit = band & found
        out["bands"].append([lo, hi])
        out["objects"].append(int(band.sum()))
        out["found"].append(float(hit.sum() / band.sum()) if band.any() else float("nan"))
        for key, values in (
            ("pixel_error", pixel_error),
            ("depth_error", np.abs(depth_error)),
            ("depth_bias", depth_error),
        ):
            out[key].append(float(np.median(values[hit])) if hit.any() else float("nan"))
        for name, values in extra.items():
            measured = hit & np.isfinite(values)
            out[name].append(float(np.median(np.abs(values[measured]))) if measured.any() else float("nan"))
    return out


def probe(model: PETRDetector, dataroot, split: str = "val", max_frames: int | None = None, progress=True) -> dict:
    """`peak_errors` and `decoder_depth_errors` over the frames of a split, summarised by distance
    from the ego vehicle; for a ground-contact head also its direct and road depths at each peak
    (`CONTACT_COLUMNS`)."""
    frames = split_frames(dataroot, split, max_frames)
    config = model.config
    image_size = (config.image_width, config.image_height)
    names = ("distance", "found", "pixel_error", "depth_error", "decoder_depth_error")
    parts = CONTACT_COLUMNS if config.ground_contact else ()
    names += tuple(name for name, _ in parts)
    columns = {name: [] for name in names}
    iterator = frames
    if progress:
        from tqdm import tqdm

        iterator = tqdm(frames, desc="probe", unit="frame")
    model.eval()
    for frame in iterator:
        images, lidar2img = frame_batch(frame)
        with torch.inference_mode():
            inputs = model.inputs(images, lidar2img)
            heatmap, regression = inputs.heatmap, inputs.regression
            score = heatmap[0].float().sigmoid().amax(1)  # (N, h', w')
            peak = proposal_peaks(heatmap[0], config.class_peak_threshold)
            box_center = decode_boxes(model.decode(inputs).bbox_preds[-1, 0].float())[0]
        centers = frame.gt_boxes[np.flatnonzero(frame.gt_valid), :3].astype(np.float64)
        camera, depth = viewing_camera(centers, frame.lidar2img, image_size)
        seen = camera >= 0
        centers, camera, depth = centers[seen], camera[seen], depth[seen]
        uv = project_points(centers, frame.lidar2img)[0][camera, np.arange(len(centers))]  # (M, 2)
        grid = regression[0].float().numpy()
        found, pixel_error, depth_error, cell = peak_errors(
            score.numpy(), peak.numpy(), grid, camera, uv, depth, config.head_stride
        )
        decoder_error = decoder_depth_errors(
            cell, inputs.proposal_cells[0].numpy(), box_center.double().numpy(), camera, depth, frame.lidar2img
        )
        distance = np.linalg.norm(transformed_xy(frame.lidar2ego, centers), axis=1)
        measured = [distance, found, pixel_error, depth_error, decoder_error]
        measured += [cell_depth_errors(grid, channel, cell, depth) for _, channel in parts]
        for name, values in zip(names, measured, strict=True):
            columns[name].append(values)
    merged = {name: np.concatenate(values) for name, values in columns.items()}
    extra = {name: merged[name] for name, _ in parts}
    return summarise(*(merged[name] for name in names[:5]), extra=extra)


# Optional columns of a summary and their headings, in print order.
_OPTIONAL_COLUMNS = (
    ("direct_depth_error", "direct |depth err|"),
    ("ground_depth_error", "road |depth err|"),
    ("decoder_depth_error", "decoder |depth err|"),
)


def format_summary(summary: dict) -> str:
    optional = [(key, title) for key, title in _OPTIONAL_COLUMNS if key in summary]
    lines = [
        f"{'distance band, m':<18}{'objects':>8}{'found':>7}{'px err':>8}{'|depth err|':>12}{'depth bias':>11}"
        + "".join(f"{title:>21}" for _, title in optional)
    ]
    for i, (lo, hi) in enumerate(summary["bands"]):
        lines.append(
            f"{f'{lo:g}-{hi:g}':<18}{summary['objects'][i]:>8}{summary['found'][i]:>7.2f}"
            f"{summary['pixel_error'][i]:>8.2f}{summary['depth_error'][i]:>12.3f}{summary['depth_bias'][i]:>+11.3f}"
            + "".join(f"{summary[key][i]:>21.3f}" for key, _ in optional)
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataroot written by `tggbc data synth`")
    parser.add_argument("--weights", required=True, help="detector weights (.safetensors)")
    parser.add_argument("--split", default="val", choices=("train", "val"))
    parser.add_argument("--max-frames", type=int, default=None, help="only the first this many frames")
    parser.add_argument("--out", default=None, help="also write the figures here as JSON")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from .weights import load_detector

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_frames is not None and args.max_frames < 1:
        raise SystemExit(f"--max-frames must be at least 1, got {args.max_frames}")
    if args.out and Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{args.out} exists: pass --force to replace it")
    model = load_detector(args.weights)
    summary = probe(model, args.data, args.split, args.max_frames, progress=not args.quiet)
    print(
        f"dense head proposals (peak score >= {FOUND_SCORE} within one cell of the object's centre), and the"
        " decoder's box for the query each became:"
    )
    print(format_summary(summary))
    if args.out:
        meta = {"data": str(args.data), "weights": str(args.weights), "split": args.split, "frames": args.max_frames}
        write_json_atomic(Path(args.out), {**meta, **summary})
        print(f"wrote {args.out}")
    return 0
