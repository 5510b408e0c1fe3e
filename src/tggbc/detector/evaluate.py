"""`tggbc eval`: the detector's nuScenes metrics with tgGBC and its controls, side by side.

For every validation frame the backbone and the position embedding run once; the decoder then
runs once per setting (dense, and each method at each pruned fraction) on the same keys, its
time measured on its own. Every setting's boxes are scored with the nuScenes detection metric
(`tggbc.nuscenes.scoring`), and each setting's difference from the dense decoder gets a
confidence interval from resampling whole scenes (the same resamples for every setting, so the
differences are paired).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..pruner import DENSE, METHODS, Setting, pruning
from .config import DecodeConfig
from .model import Detector

# The pruned fractions of the accuracy curve.
FRACTIONS = (0.5, 0.75, 0.875, 0.95, 0.99)
SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "detector.safetensors"


def settings_for(methods: list[str], fractions: list[float], k: int, n: int = 1) -> list[Setting]:
    """The dense decoder, then every method at every fraction (after the first n layers)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    out = [Setting(DENSE)]
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(f"a pruned fraction must lie in (0, 1), got {f}")
        out += [Setting(f"{m}-{f:g}", m, r=float(f), n=n, k=k, fraction=float(f)) for m in methods]
    return out


@dataclass
class Interval:
    """A difference from the dense decoder: point estimate and a 95% bootstrap interval."""

    value: float
    low: float
    high: float


@dataclass
class SettingResult:
    name: str
    method: str | None
    fraction: float
    r: int | float | list[int]
    n: int
    k: int
    mAP: float
    NDS: float
    tp_errors: dict[str, float]
    decoder_ms: float  # median over frames, batch 1
    keys_per_layer: list[int]
    mAP_diff: Interval | None = None  # this minus dense, with its interval
    NDS_diff: Interval | None = None
    # A control's mAP minus tgGBC's at the same budget (paired resamples): is tgGBC's selection better?
    mAP_vs_tggbc: Interval | None = None
    class_ap: dict[str, float] = field(default_factory=dict)
    threshold_ap: dict[str, float] = field(default_factory=dict)


def frame_inputs(frame) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """images [1, 6, 3, H, W] uint8 (read now; the frame keeps no copy), lidar2img [1, 6, 4, 4] and
    lidar2global [4, 4] float64 of one frame."""
    images = torch.from_numpy(frame.read_images()).permute(0, 3, 1, 2).unsqueeze(0)
    frame.images = None
    lidar2global = frame.ego2global @ frame.lidar2ego.astype(np.float64)
    return images, torch.from_numpy(frame.lidar2img).unsqueeze(0), lidar2global


def frame_boxes(model: Detector, cls_scores, bbox_preds, frame, lidar2global, decode: DecodeConfig) -> list[dict]:
    """Submission boxes of one frame from one layer's [1, Nq, C] logits and [1, Nq, 10] boxes."""
    from ..nuscenes.submission import submission_boxes

    (det,) = model.detections(cls_scores, bbox_preds, decode)
    return submission_boxes(
        frame.sample_token,
        *(t.cpu().numpy() for t in (det.center, det.size, det.yaw, det.velocity, det.score, det.label)),
        lidar2global,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_settings(
    model: Detector,
    frames: list,
    settings: list[Setting],
    decode: DecodeConfig = DecodeConfig(),
    every_layer: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> tuple[dict[str, dict], dict[str, list[float]], dict[str, list[int]]]:
    """Each setting's submission results over `frames` ({name: {sample_token: boxes}}).

    With `every_layer`, the dense decoder's boxes of every layer are kept too, as
    "layer-1" ... "layer-L". Also returns per-setting decoder times (ms per frame) and keys per layer.
    """
    results: dict[str, dict] = {s.name: {} for s in settings}
    times: dict[str, list[float]] = {s.name: [] for s in settings}
    keys_seen: dict[str, list[int]] = {}
    pruners = {s.name: s.pruner(seed) for s in settings}
    iterator = frames
    if progress:
        from tqdm import tqdm

        iterator = tqdm(frames, desc=f"eval {len(settings)} settings", unit="frame")
    model.eval()
    for frame in iterator:
        images, lidar2img, lidar2global = frame_inputs(frame)
        device = model.mean.device
        keys = model.keys(model.features(images.to(device)), lidar2img.to(device))
        for s in settings:
            with pruning(model.decoder, pruners[s.name]):
                _synchronize(device)
                start = time.perf_counter()
                out = model.decode(keys)
                _synchronize(device)
                times[s.name].append((time.perf_counter() - start) * 1e3)
            keys_seen[s.name] = out.keys_per_layer
            boxes = frame_boxes(model, out.cls_scores[-1], out.bbox_preds[-1], frame, lidar2global, decode)
            results[s.name][frame.sample_token] = boxes
            if every_layer and s.method is None:
                for layer in range(len(out.cls_scores)):
                    name = f"layer-{layer + 1}"
                    results.setdefault(name, {})[frame.sample_token] = frame_boxes(
                        model, out.cls_scores[layer], out.bbox_preds[layer], frame, lidar2global, decode
                    )
    return results, times, keys_seen


def score_settings(
    gt,
    settings: list[Setting],
    results: dict[str, dict],
    times: dict[str, list[float]],
    keys_seen: dict[str, list[int]],
    resamples: int = 200,
    seed: int = 0,
    progress: bool = True,
) -> list[SettingResult]:
    """Score every setting and the interval of its difference from the dense decoder."""
    from ..nuscenes.scoring import match, metrics, scene_resamples

    weights = scene_resamples(gt, resamples, seed) if resamples > 0 else None
    scored, boot = {}, {}
    iterator = settings
    if progress:
        from tqdm import tqdm

        iterator = tqdm(settings, desc="score", unit="setting", leave=False)
    for s in iterator:
        matches = match(gt, results[s.name])
        scored[s.name] = metrics(gt, matches)
        if weights is not None:
            boot[s.name] = np.array([[m["mAP"], m["NDS"]] for m in (metrics(gt, matches, w) for w in weights)])
    def paired(name: str, reference: str, column: int) -> Interval:
        delta = boot[name][:, column] - boot[reference][:, column]  # the same resamples: paired differences
        low, high = np.percentile(delta, [2.5, 97.5])
        metric = ("mAP", "NDS")[column]
        return Interval(scored[name][metric] - scored[reference][metric], float(low), float(high))

    tggbc_at = {s.fraction: s.name for s in settings if s.method == "tggbc"}
    out = []
    for s in settings:
        m = scored[s.name]
        diffs = [None, None, None]
        if weights is not None and s.name != DENSE:
            diffs[:2] = paired(s.name, DENSE, 0), paired(s.name, DENSE, 1)
            if s.method not in (None, "tggbc") and s.fraction in tggbc_at:
                diffs[2] = paired(s.name, tggbc_at[s.fraction], 0)
        out.append(
            SettingResult(
                name=s.name,
                method=s.method,
                fraction=s.fraction,
                r=s.r,
                n=s.n,
                k=s.k,
                mAP=m["mAP"],
                NDS=m["NDS"],
                tp_errors=m["tp_errors"],
                decoder_ms=statistics.median(times[s.name]),
                keys_per_layer=keys_seen[s.name],
                mAP_diff=diffs[0],
                NDS_diff=diffs[1],
                mAP_vs_tggbc=diffs[2],
                class_ap=m["class_ap"],
                threshold_ap=m["threshold_ap"],
            )
        )
    return out


def format_results(results: list[SettingResult], timing: bool = True) -> str:
    """One row per setting: metrics, difference from dense with its 95% interval, and with
    `timing` the decoder latency, speedup and keys per layer."""

    def diff(d: Interval | None) -> str:
        return "" if d is None else f"{d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"

    dense_ms = next((r.decoder_ms for r in results if r.name == DENSE), float("nan"))
    header = f"{'setting':<16} {'mAP':>6} {'NDS':>6} {'mAP - dense [95% CI]':>30} {'NDS - dense [95% CI]':>30}"
    lines = [header + (f" {'dec ms':>7} {'x':>6}  keys per layer" if timing else "")]
    for r in results:
        row = f"{r.name:<16} {r.mAP:>6.4f} {r.NDS:>6.4f} {diff(r.mAP_diff):>30} {diff(r.NDS_diff):>30}"
        if timing:
            row += f" {r.decoder_ms:>7.1f} {dense_ms / r.decoder_ms:>5.2f}x  {','.join(map(str, r.keys_per_layer))}"
        lines.append(row)
    return "\n".join(lines)


def format_controls(results: list[SettingResult]) -> str:
    """Each control's mAP minus tgGBC's at the same budget, with its paired 95% interval and the
    verdict it supports: an interval holding 0 is a tie."""
    lines = []
    for r in results:
        d = r.mAP_vs_tggbc
        if d is None:
            continue
        verdict = "tie" if d.low <= 0.0 <= d.high else ("tgGBC better" if d.high < 0.0 else "control better")
        lines.append(f"{r.name:<16} {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}]  {verdict}")
    return "\n".join(lines)


def to_json(results: list[SettingResult]) -> list[dict]:
    return [asdict(r) for r in results]


def evaluate(
    model: Detector,
    dataroot: str | Path,
    settings: list[Setting],
    *,
    split: str = "val",
    decode: DecodeConfig = DecodeConfig(),
    resamples: int = 200,
    seed: int = 0,
    every_layer: bool = True,
    progress: bool = True,
) -> tuple[list[SettingResult], list[SettingResult]]:
    """Run and score `settings` on the frames of `split`.

    Returns:
        (one result per setting, and with `every_layer` one per layer of the dense decoder,
        named "layer-1" ...: how much each later layer adds, hence how much pruning after a layer
        can cost at most).
    """
    from ..data.frames import list_frames
    from ..nuscenes.scoring import GroundTruth

    frames = list_frames(dataroot, split)
    if not frames:
        raise ValueError(f"{dataroot} has no {split} frames")
    gt = GroundTruth.load(dataroot, split)
    results, times, keys_seen = run_settings(
        model, frames, settings, decode, every_layer=every_layer, progress=progress, seed=seed
    )
    layers = [Setting(name) for name in results if name.startswith("layer-")]
    for s in layers:  # the dense decoder's run: its latency and keys
        times[s.name], keys_seen[s.name] = times[DENSE], keys_seen[DENSE]
    scored = score_settings(gt, settings + layers, results, times, keys_seen, resamples, seed, progress)
    return scored[: len(settings)], scored[len(settings) :]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import (
        add_prune_arguments,
        add_threads_argument,
        device_argument,
        existing_dir,
        existing_file,
        int_at_least,
        nonnegative_int,
    )

    parser.add_argument(
        "--data", type=existing_dir, default=None, metavar="DIR", help="dataroot written by `tggbc data synth`"
    )
    parser.add_argument(
        "--weights",
        type=existing_file,
        default=None,
        metavar="FILE",
        help="detector weights (default: shipped); with --model, the file `tggbc convert` wrote",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma list of {', '.join(METHODS)} (default: all); each runs at every --fractions "
        "(with --model: dense and these, default dense,tggbc)",
    )
    parser.add_argument(
        "--fractions", default=",".join(f"{f:g}" for f in FRACTIONS), help="pruned fractions (default %(default)s)"
    )
    add_prune_arguments(parser, r=None, n=1, k=None, k_help="voting queries (default: 175/900 of the queries)")
    parser.add_argument("--split", choices=("val", "train"), default="val", help="frames to score (default val)")
    parser.add_argument("--out", default="out/eval", metavar="DIR", help="results.json (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace the results of an earlier run in --out")
    parser.add_argument(
        "--resamples", type=nonnegative_int, default=200, help="scene resamples for the intervals (0: none)"
    )
    parser.add_argument(
        "--max-detections",
        type=int_at_least(1),
        default=None,
        metavar="M",
        help="boxes per frame, <= 500 (default 300)",
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random control and resamples (default 0)")
    parser.add_argument("--device", type=device_argument, default="cpu", help="cpu or cuda (default cpu)")
    add_threads_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    from ..nuscenes.published import add_model_arguments

    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..cli import apply_threads
    from ..files import prepare_output_dir, write_json_atomic
    from .weights import load_detector

    if args.model is not None:  # a published detector on nuScenes: tggbc.nuscenes.published
        from ..nuscenes.published import run_model

        small = {"--data": None, "--fractions": ",".join(f"{f:g}" for f in FRACTIONS), "--max-detections": None,
                 "--resamples": 200}  # fmt: skip
        return run_model(args, small)
    if args.data is None:
        raise ValueError("the following arguments are required: --data (or --model NAME for a published detector)")
    args.weights = str(SHIPPED) if args.weights is None else args.weights
    args.methods = ",".join(METHODS) if args.methods is None else args.methods
    apply_threads(args)
    decode = DecodeConfig() if args.max_detections is None else DecodeConfig(max_detections=args.max_detections)
    methods = parse_methods(args.methods)
    fractions = None if args.r is not None else parse_fractions(args.fractions)
    out = prepare_output_dir(args.out, args.force, what="--out")
    model = load_detector(args.weights, device=args.device)
    k = model.config.default_k if args.k is None else args.k
    if args.r is not None:
        settings = [Setting(DENSE)] + [Setting(m, m, r=args.r, n=args.n, k=k) for m in methods]
    else:
        settings = settings_for(methods, fractions, k, n=args.n)
    for s in settings:  # an impossible setting fails before the long loop
        s.check(model.config.num_keys, model.config.num_layers)
    results, layers = evaluate(model, args.data, settings, split=args.split, decode=decode,
                               resamples=args.resamples, seed=args.seed, progress=not args.quiet)  # fmt: skip
    print(format_results(results))
    controls = format_controls(results)
    if controls:
        print("\nEach control's mAP minus tgGBC's at the same budget [paired 95% interval]:")
        print(controls)
    print("\nThe dense decoder's boxes after each layer (difference from its last layer):")
    print(format_results(layers, timing=False))
    payload = {
        "weights": str(args.weights),
        "data": str(args.data),
        "split": args.split,
        "resamples": args.resamples,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "results": to_json(results),
        "layers": to_json(layers),
    }
    write_json_atomic(out / "results.json", payload)
    print(f"wrote {out / 'results.json'}")
    if len({r.fraction for r in results if r.method is not None}) > 1:  # a curve needs two points
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:  # an optional dependency
            print("matplotlib is not installed: no accuracy_curve.png")
        else:
            from .plots import plot_accuracy_curve

            print(f"wrote {plot_accuracy_curve(results, out / 'accuracy_curve.png')}")
    return 0


def parse_methods(text: str) -> list[str]:
    """'tggbc,random' -> ['tggbc', 'random']; unknown or repeated names are a ValueError naming them."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ValueError(f"--methods must be a comma list of distinct names from {', '.join(METHODS)}, got {text!r}")
    return methods


def parse_fractions(text: str) -> list[float]:
    """'0.5,0.75' -> [0.5, 0.75]; each in (0, 1), or a ValueError naming the text."""
    try:
        fractions = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise ValueError(f"--fractions must be a comma list of numbers in (0, 1), got {text!r}") from None
    if not fractions or not all(0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"--fractions must be a comma list of numbers in (0, 1), got {text!r}")
    return fractions
