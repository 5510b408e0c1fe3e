"""`tggbc eval`: nuScenes detection metrics of the detector, dense and with tgGBC, side by side.

For every frame of the validation split the backbone and position embedding run once; the
decoder then runs once per setting (dense and each tgGBC setting) on the same keys, timed on
its own. Predictions are written in the official nuScenes detection submission format and
scored by nuscenes-devkit's own `DetectionEval` with the standard `detection_cvpr_2019` config.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data.classes import DETECTION_CLASSES
from ..data.splits import SPLIT_NAMES
from ..files import write_json_atomic
from ..pruner import KeyPruner
from .model import MAX_BOXES_PER_SAMPLE, Detections, PETRDetector

# Default tgGBC attributes per class, by speed (the convention of the PETR-family heads).
_MOVING = {
    "car": ("vehicle.moving", "vehicle.parked"),
    "truck": ("vehicle.moving", "vehicle.parked"),
    "bus": ("vehicle.moving", "vehicle.parked"),
    "trailer": ("vehicle.moving", "vehicle.parked"),
    "construction_vehicle": ("vehicle.moving", "vehicle.parked"),
    "pedestrian": ("pedestrian.moving", "pedestrian.standing"),
    "motorcycle": ("cycle.with_rider", "cycle.without_rider"),
    "bicycle": ("cycle.with_rider", "cycle.without_rider"),
}


# The submission header of a camera-only method.
SUBMISSION_META = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}


@dataclass
class Setting:
    """One decoder configuration to evaluate; r None = dense."""

    name: str
    r: int | float | list[int] | None = None
    n: int = 1
    k: int = -1

    def pruner(self) -> KeyPruner | None:
        return None if self.r is None else KeyPruner(r=self.r, n=self.n, k=self.k)


@dataclass
class SettingResult:
    name: str
    r: int | float | list[int] | None
    n: int
    k: int
    mAP: float
    NDS: float
    mATE: float
    mASE: float
    mAOE: float
    mAVE: float
    mAAE: float
    decoder_ms: float  # median over frames, batch 1
    keys_per_layer: list[int]
    class_ap: dict[str, float] = field(default_factory=dict)
    # mAP at each of the devkit's centre-distance thresholds (metres, as strings): how much of the
    # loss is localisation (the 0.5 and 1 m thresholds) and how much is finding objects at all (4 m).
    threshold_ap: dict[str, float] = field(default_factory=dict)


def default_k(num_queries: int) -> int:
    """k scaled to the query count as StreamPETR's 175 of 900."""
    return max(1, round(175 * num_queries / 900))


def attribute_name(label: str, speed: float) -> str:
    if label not in _MOVING:
        return ""
    moving, still = _MOVING[label]
    return moving if speed > 0.2 else still


def to_submission_boxes(det: Detections, frame) -> list[dict]:
    """Detections in the lidar frame -> nuScenes submission boxes in the global frame."""
    from pyquaternion import Quaternion

    lidar2global = frame.ego2global @ frame.lidar2ego.astype(np.float64)
    rotation, translation = lidar2global[:3, :3], lidar2global[:3, 3]
    center = det.center.double().numpy() @ rotation.T + translation
    velocity = np.pad(det.velocity.double().numpy(), ((0, 0), (0, 1))) @ rotation.T
    boxes = []
    for i in range(len(det.score)):
        yaw = float(det.yaw[i])
        box_rotation = rotation @ np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
        quaternion = Quaternion(matrix=box_rotation, rtol=1e-5, atol=1e-6)
        label = DETECTION_CLASSES[int(det.label[i])]
        boxes.append(
            {
                "sample_token": frame.sample_token,
                "translation": center[i].tolist(),
                "size": det.size[i].double().tolist(),
                "rotation": list(quaternion.elements),
                "velocity": velocity[i, :2].tolist(),
                "detection_name": label,
                "detection_score": float(det.score[i]),
                "attribute_name": attribute_name(label, float(np.linalg.norm(velocity[i, :2]))),
            }
        )
    return boxes


def nuscenes_metrics(
    dataroot: str | Path, submission: Path, nusc=None, split: str = "val", max_range: float | None = None
) -> tuple[dict, object]:
    """Score a submission file with the devkit's DetectionEval (detection_cvpr_2019) on `split`.

    `max_range` caps every class's evaluation range (metres from the ego vehicle; the standard
    config uses 30 to 50 m by class): ground truth and predictions beyond it are dropped, as the
    devkit drops them beyond the standard ranges. None keeps the standard config.
    """
    try:
        from nuscenes import NuScenes
        from nuscenes.eval.common.config import config_factory
        from nuscenes.eval.detection.evaluate import DetectionEval
    except ImportError as e:
        raise ImportError("tggbc eval needs nuscenes-devkit: pip install 'tggbc[eval]'") from e
    from ..data.splits import read_meta

    if nusc is None:
        nusc = NuScenes(version=read_meta(dataroot)["version"], dataroot=str(dataroot), verbose=False)
    config = config_factory("detection_cvpr_2019")
    if max_range is not None:
        if not max_range > 0:
            raise ValueError(f"max_range must be > 0 metres, got {max_range}")
        config.class_range = {name: min(r, max_range) for name, r in config.class_range.items()}
    evaluator = DetectionEval(
        nusc,
        config,
        str(submission),
        eval_set=split,
        output_dir=str(Path(submission).parent),
        verbose=False,
    )
    metrics, _ = evaluator.evaluate()
    return metrics.serialize(), nusc


def split_frames(dataroot: str | Path, split: str, max_frames: int | None = None) -> list:
    """The frames of `split` (the first `max_frames` of them), images not yet read; raises on an
    unknown split name or an empty split."""
    from ..data.frames import list_frames

    frames = list_frames(dataroot, split)  # raises on a split name other than 'train' / 'val'
    if not frames:
        raise ValueError(f"{dataroot} has no {split} frames")
    return frames if max_frames is None else frames[:max_frames]


def frame_batch(frame) -> tuple[Tensor, Tensor]:
    """One frame as a batch of one: images [1, 6, 3, H, W] uint8 read from disk (the frame keeps no
    copy) and lidar2img [1, 6, 4, 4]."""
    images = torch.from_numpy(frame.read_images()).permute(0, 3, 1, 2).unsqueeze(0)
    frame.images = None
    return images, torch.from_numpy(frame.lidar2img).unsqueeze(0)


def evaluate(
    model: PETRDetector,
    dataroot: str | Path,
    settings: list[Setting],
    out_dir: str | Path,
    *,
    max_frames: int | None = None,
    split: str = "val",
    progress: bool = True,
) -> list[SettingResult]:
    """Run every setting over the frames of `split` (default the validation frames) and score it;
    see the module docstring. `split="train"` measures how far the model fits its training frames."""
    frames = split_frames(dataroot, split, max_frames)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    submissions = {s.name: {} for s in settings}
    times = {s.name: [] for s in settings}
    keys_seen = {}
    pruners = {s.name: s.pruner() for s in settings}
    iterator = frames
    if progress:
        from tqdm import tqdm

        iterator = tqdm(frames, desc=f"eval {len(settings)} settings", unit="frame")
    model.eval()
    for frame in iterator:
        images, lidar2img = frame_batch(frame)
        with torch.inference_mode():
            inputs = model.inputs(images, lidar2img)
            for s in settings:
                model.decoder.pruner = pruners[s.name]
                start = time.perf_counter()
                out = model.decode(inputs)
                times[s.name].append((time.perf_counter() - start) * 1e3)
                keys_seen[s.name] = out.keys_per_layer
                (det,) = model.detections(out.cls_scores[-1], out.bbox_preds[-1], inputs.proposal_logits)
                submissions[s.name][frame.sample_token] = to_submission_boxes(det, frame)
    model.decoder.pruner = None

    results, nusc = [], None
    for s in settings:
        path = out_dir / f"results_{s.name}.json"
        write_json_atomic(path, {"meta": SUBMISSION_META, "results": submissions[s.name]})
        if max_frames is not None:
            # The devkit scores whole splits only: on a subset, only latency and keys are meaningful.
            summary = None
        else:
            summary, nusc = nuscenes_metrics(dataroot, path, nusc, split)
        tp = summary["tp_errors"] if summary else {}
        results.append(
            SettingResult(
                name=s.name,
                r=s.r,
                n=s.n,
                k=s.k,
                mAP=summary["mean_ap"] if summary else float("nan"),
                NDS=summary["nd_score"] if summary else float("nan"),
                mATE=tp.get("trans_err", float("nan")),
                mASE=tp.get("scale_err", float("nan")),
                mAOE=tp.get("orient_err", float("nan")),
                mAVE=tp.get("vel_err", float("nan")),
                mAAE=tp.get("attr_err", float("nan")),
                decoder_ms=statistics.median(times[s.name]),
                keys_per_layer=keys_seen[s.name],
                class_ap=summary["mean_dist_aps"] if summary else {},
                threshold_ap=threshold_aps(summary["label_aps"]) if summary else {},
            )
        )
    return results


def threshold_aps(label_aps: dict[str, dict]) -> dict[str, float]:
    """The devkit's per-class APs {class: {threshold: AP}} -> {threshold: mean over classes}."""
    per_threshold: dict[float, list[float]] = {}
    for aps in label_aps.values():
        for threshold, ap in aps.items():
            per_threshold.setdefault(float(threshold), []).append(ap)
    return {f"{t:g}": float(np.mean(aps)) for t, aps in sorted(per_threshold.items())}


def format_results(results: list[SettingResult]) -> str:
    dense = next((r for r in results if r.r is None), None)
    lines = [
        f"{'setting':<16} {'mAP':>6} {'NDS':>6} {'mATE':>6} {'mASE':>6} {'mAOE':>6} {'mAVE':>6} {'mAAE':>6} "
        f"{'dec ms':>7} {'x dense':>7}  keys per layer"
    ]
    for r in results:
        speedup = dense.decoder_ms / r.decoder_ms if dense else float("nan")
        lines.append(
            f"{r.name:<16} {r.mAP:>6.4f} {r.NDS:>6.4f} {r.mATE:>6.3f} {r.mASE:>6.3f} {r.mAOE:>6.3f} {r.mAVE:>6.3f} "
            f"{r.mAAE:>6.3f} {r.decoder_ms:>7.1f} {speedup:>6.2f}x  {','.join(map(str, r.keys_per_layer))}"
        )
    if any(r.threshold_ap for r in results):
        lines.append("mAP by centre-distance threshold:")
        for r in results:
            lines.append(f"{r.name:<16} " + "  ".join(f"{t} m: {ap:.4f}" for t, ap in r.threshold_ap.items()))
    return "\n".join(lines)


def standard_settings(num_queries: int, fractions=(0.5, 0.75, 0.875, 0.95), n: int = 1, k: int | None = None):
    """Dense plus one tgGBC setting per pruned fraction (after layer 1 by default)."""
    k = default_k(num_queries) if k is None else k
    return [Setting("dense")] + [Setting(f"tggbc-{f:g}", r=f, n=n, k=k) for f in fractions]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import parse_r

    parser.add_argument("--data", required=True, help="dataroot written by `tggbc data synth` (scored on --split)")
    parser.add_argument("--weights", required=True, help="detector weights (.safetensors)")
    parser.add_argument("--r", type=parse_r, default=None, help="one tgGBC setting instead of the standard sweep")
    parser.add_argument("--n", type=int, default=1, help="layers that prune (default 1)")
    parser.add_argument("--k", type=int, default=None, help="voting queries (default: 175/900 of the queries)")
    parser.add_argument("--fractions", default="0.5,0.75,0.875,0.95", help="pruned fractions of the sweep")
    parser.add_argument("--out", default="out/eval", help="directory for submissions and results.json")
    parser.add_argument(
        "--split", choices=SPLIT_NAMES, default="val", help="frames to score (train: how well the model fits them)"
    )
    parser.add_argument(
        "--dense-score-weight",
        type=float,
        default=None,
        metavar="W",
        help="score detections as sigmoid(decoder)^(1-W) * sigmoid(dense head)^W (default: as the weights say)",
    )
    parser.add_argument(
        "--class-peak-threshold",
        type=float,
        default=None,
        metavar="T",
        help="also propose where one class alone peaks with probability >= T (default: as the weights say)",
    )
    parser.add_argument(
        "--max-detections",
        type=int,
        default=None,
        metavar="M",
        help=f"boxes reported per frame, at most {MAX_BOXES_PER_SAMPLE} (default: as the weights say)",
    )
    parser.add_argument("--max-frames", type=int, default=None, help="only this many frames (no metrics)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from .weights import load_detector

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_detector(args.weights)
    # Decoding settings stored with the weights that the command line may override; the config checks their ranges.
    overrides = {
        name: getattr(args, name)
        for name in ("dense_score_weight", "class_peak_threshold", "max_detections")
        if getattr(args, name) is not None
    }
    model.config = replace(model.config, **overrides)
    k = default_k(model.config.num_queries) if args.k is None else args.k
    if args.r is not None:
        settings = [Setting("dense"), Setting("tggbc", r=args.r, n=args.n, k=k)]
    else:
        fractions = tuple(float(f) for f in args.fractions.split(",") if f.strip())
        settings = standard_settings(model.config.num_queries, fractions, n=args.n, k=k)
    for s in settings:  # fail on an impossible setting before the long loop
        if s.r is not None:
            s.pruner().reset(model.config.num_keys, model.config.num_layers)
    results = evaluate(
        model, args.data, settings, args.out, max_frames=args.max_frames, split=args.split, progress=not args.quiet
    )
    print(format_results(results))
    payload = {
        "weights": str(args.weights),
        "data": str(args.data),
        "split": args.split,
        "threads": torch.get_num_threads(),
        "results": [asdict(r) for r in results],
    }
    write_json_atomic(Path(args.out) / "results.json", payload)
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0
