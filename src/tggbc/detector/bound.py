"""`tggbc bound`: the best mAP any camera detector could reach at this image size, if depth is read
from pixels to a given precision, and how far a real submission's depth is from it.

Beyond ~20 m a monocular detector's boxes are off mostly along the camera ray: the error is in
depth, not direction. Depth from one image is read off lengths: an object of metric length L at
depth d spans f L / d pixels (f the focal length in pixels), so reading that span to within sigma
pixels leaves a depth error of d^2 sigma / (f L). The idealised detector built here from that fact

- sees every object whose centre falls inside some camera's image, and knows its class, size,
  heading, velocity and attribute exactly;
- reads three lengths to within sigma pixels: the object's height, its horizontal extent across
  the ray, and the camera's height above the object's foot (the foot's row below the horizon).
  Independent readings combine by inverse variance to

      sigma_d = d^2 sigma / (f sqrt(H^2 + E^2 + h_cam^2));

- places each box at the ground truth moved along its camera's ray by a Gaussian depth error of
  that size, and scores the best-placed boxes highest, as a detector that knew its own
  uncertainty would.

Its submission is scored by the devkit like any other. Finding, classifying and sizing objects come
for free, so the figures are upper bounds for a detector whose depth cues are good to sigma pixels.
Doubling the image size doubles f: the bound at twice this resolution and sigma pixels equals the
bound here at sigma / 2.

A submission (e.g. `tggbc eval`'s results_dense.json) is measured the same way: matched to the
ground truth as the devkit matches at 2 m (greedy by score, same class, nearest centre), then the
median |radial error| per distance band, radial meaning along the line from the ego vehicle. It is
also scored a second time with every box that lies within 2 m of a ground-truth box given that
box's class (`true_classes`): the mAP the same boxes would reach if they were classified right.
And it is scored with every class's range capped at 20, 30 and 40 m (`RANGE_CAPS`): how much of
what it lacks lies far away.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..data.classes import DETECTION_CLASSES
from ..data.transforms import in_image, project_points
from ..files import write_json_atomic
from .model import Detections

DISTANCE_BANDS = (0.0, 10.0, 20.0, 30.0, 40.0, 50.0)  # metres from the ego vehicle
MATCH_DISTANCE = 2.0  # metres: the devkit's threshold for the TP errors (mATE, ...)
# A submission is also scored with every class's range capped at these distances (metres): the
# standard config reaches 50 m for vehicles, 40 m for pedestrians and cones, 30 m for barriers.
RANGE_CAPS = (20.0, 30.0, 40.0)
# nuScenes visibility level 2 and up: more than 40% of the box is visible in the images. The
# metric also counts boxes hidden behind others (any lidar or radar point makes a box count), which
# no camera detector can find; the idealised detector is also scored seeing only these.
VISIBLE_LEVEL = 2


def depth_sigma(depth: np.ndarray, focal: np.ndarray, lengths: np.ndarray, sigma_px: float) -> np.ndarray:
    """Depth error left by reading metric lengths in the image to within sigma_px pixels.

    Args:
        depth: [M] metres along the optical axis. focal: [M] pixels.
        lengths: [M, K] metric lengths seen at that depth (> 0), read independently.
        sigma_px: pixel error of each reading (>= 0).
    Returns:
        [M] metres: d^2 sigma / (f sqrt(sum L^2)).
    """
    if sigma_px < 0:
        raise ValueError(f"sigma_px must be >= 0, got {sigma_px}")
    lengths = np.asarray(lengths, dtype=np.float64)
    if lengths.ndim != 2 or lengths.shape[0] != np.shape(depth)[0]:
        raise ValueError(f"lengths must be [M={np.shape(depth)[0]}, K], got {list(lengths.shape)}")
    return (
        np.asarray(depth, np.float64) ** 2
        * sigma_px
        / (np.asarray(focal, np.float64) * np.linalg.norm(lengths, axis=1))
    )


def viewing_camera(
    centers: np.ndarray, lidar2img: np.ndarray, image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The camera that images each centre nearest its middle column.

    Args:
        centers: [M, 3] lidar frame. lidar2img: [N, 4, 4]. image_size: (W, H) pixels.
    Returns:
        camera [M] int (-1: no camera images the centre), depth [M] metres along that camera's axis.
    """
    uv, depth = project_points(centers, lidar2img)  # (N, M, 2), (N, M)
    # The dense head's rule for which camera sees a centre (dense_targets), so the idealised
    # detector sees exactly the objects the model is trained to find.
    inside = in_image(uv, depth, image_size)
    off_centre = np.where(inside, np.abs(uv[..., 0] - image_size[0] / 2), np.inf)
    camera = off_centre.argmin(0)
    seen = inside.any(0)
    return np.where(seen, camera, -1), np.where(seen, depth[camera, np.arange(len(centers))], np.nan)


def oracle_detections(
    frame, image_size: tuple[int, int], sigma_px: float, rng: np.random.Generator, min_visibility: int = 1
) -> tuple[Detections, np.ndarray]:
    """The idealised detector's boxes for one frame (see the module docstring); with
    `min_visibility` it sees only boxes of at least that nuScenes visibility level (1..4).

    Returns:
        Detections of the seen, eval-valid GT boxes (lidar frame), and their indices into frame.gt_*.
    """
    boxes = frame.gt_boxes.astype(np.float64)
    index = np.flatnonzero(frame.gt_valid)
    camera, depth = viewing_camera(boxes[index, :3], frame.lidar2img, image_size)
    # Draw for every valid box, seen or not, so that one seed gives the same draws at every sigma.
    noise = rng.standard_normal(len(index))
    seen = (camera >= 0) & (frame.gt_visibility[index] >= min_visibility)
    index, camera, depth, noise = index[seen], camera[seen], depth[seen], noise[seen]
    b = boxes[index]
    cam2lidar = np.linalg.inv(frame.lidar2cam.astype(np.float64))[camera]  # (M, 4, 4)
    origin = cam2lidar[:, :3, 3]
    ray = b[:, :3] - origin
    heading = b[:, 6] - np.arctan2(ray[:, 1], ray[:, 0])
    extent = b[:, 3] * np.abs(np.cos(heading)) + b[:, 4] * np.abs(np.sin(heading))  # across the ray
    camera_height = frame.cam2ego[camera, 2, 3].astype(np.float64)  # the road is the ego frame's z = 0
    focal = frame.intrinsics[camera, 0, 0].astype(np.float64)
    sigma = depth_sigma(depth, focal, np.stack([b[:, 5], extent, camera_height], 1), sigma_px)
    scale = np.clip((depth + noise * sigma) / depth, 0.05, None)
    center = origin + ray * scale[:, None]
    det = Detections(
        center=torch.from_numpy(center),
        size=torch.from_numpy(b[:, 3:6]),
        yaw=torch.from_numpy(b[:, 6]),
        velocity=torch.from_numpy(np.nan_to_num(b[:, 7:9])),
        score=torch.from_numpy(1.0 / (1.0 + sigma)),
        label=torch.from_numpy(frame.gt_labels[index].astype(np.int64)),
    )
    return det, index


def oracle_submission(
    frames, image_size: tuple[int, int], sigma_px: float, seed: int = 0, min_visibility: int = 1
) -> dict:
    """{sample_token: [submission boxes]} of the idealised detector over `frames` (`oracle_detections`)."""
    from .evaluate import to_submission_boxes

    rng = np.random.default_rng(seed)
    results = {}
    for frame in frames:
        det, index = oracle_detections(frame, image_size, sigma_px, rng, min_visibility)
        boxes = to_submission_boxes(det, frame)
        for box, i in zip(boxes, index, strict=True):
            box["attribute_name"] = frame.gt_attribute_names[i]  # known exactly, like the rest
        results[frame.sample_token] = boxes
    return results


def match_radial_errors(
    pred_xy: np.ndarray,
    pred_labels: np.ndarray,
    pred_scores: np.ndarray,
    gt_xy: np.ndarray,
    gt_labels: np.ndarray,
    threshold: float = MATCH_DISTANCE,
) -> np.ndarray:
    """The devkit's matching in one sample, then each matched GT's radial error.

    Predictions in descending score each take the nearest unmatched GT box of their class whose
    centre lies closer than `threshold` (ties: the first). Coordinates are ego-frame xy, so
    radial is along the GT centre's direction from the ego vehicle.

    Args:
        pred_xy: [P, 2]; pred_labels, pred_scores: [P]. gt_xy: [G, 2]; gt_labels: [G].
    Returns:
        [G] signed radial error in metres (positive: placed too far), NaN where unmatched.
    """
    errors = np.full(len(gt_xy), np.nan)
    taken = np.zeros(len(gt_xy), dtype=bool)
    for p in np.argsort(-np.asarray(pred_scores), kind="stable"):
        dist = np.linalg.norm(gt_xy - pred_xy[p], axis=1)
        dist[taken | (gt_labels != pred_labels[p])] = np.inf
        if len(dist) == 0 or dist.min() >= threshold:
            continue
        g = int(dist.argmin())
        taken[g] = True
        direction = gt_xy[g] / max(np.linalg.norm(gt_xy[g]), 1e-9)
        errors[g] = float((pred_xy[p] - gt_xy[g]) @ direction)
    return errors


def transformed_xy(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """xy of points [M, 3] after a rigid transform [4, 4]: [M, 2]."""
    transform = np.asarray(transform, dtype=np.float64)
    return (np.asarray(points, dtype=np.float64) @ transform[:3, :3].T + transform[:3, 3])[:, :2]


def true_classes(frames, submission: dict, radius: float = MATCH_DISTANCE) -> tuple[dict, int]:
    """A copy of `submission` in which every box whose centre lies within `radius` metres (xy, global
    frame) of a valid ground-truth box takes the class of the nearest one; other boxes are unchanged.

    The NMS-free decoding submits a query's next-best classes too, so such a box can become a lower-
    scored duplicate of its query's best one: the relabelled mAP is, if anything, an underestimate.

    Args:
        frames: Frames (ground truth). submission: {sample_token: [boxes]} in the global frame.
    Returns:
        (relabelled submission, number of boxes whose class changed).
    """
    by_token = {frame.sample_token: frame for frame in frames}
    out, changed = {}, 0
    for token, boxes in submission.items():
        frame = by_token.get(token)
        valid = np.flatnonzero(frame.gt_valid) if frame is not None else np.zeros(0, np.int64)
        if len(valid) == 0 or not boxes:
            out[token] = [dict(b) for b in boxes]
            continue
        lidar2global = np.asarray(frame.ego2global, np.float64) @ np.asarray(frame.lidar2ego, np.float64)
        gt_xy = transformed_xy(lidar2global, frame.gt_boxes[valid, :3])
        pred_xy = np.array([b["translation"][:2] for b in boxes], np.float64)
        dist = np.linalg.norm(pred_xy[:, None] - gt_xy[None], axis=2)  # (P, G)
        nearest = dist.argmin(1)
        relabelled = []
        for box, g, d in zip(boxes, nearest, dist[np.arange(len(boxes)), nearest], strict=True):
            box = dict(box)
            if d < radius:
                name = DETECTION_CLASSES[int(frame.gt_labels[valid[g]])]
                changed += name != box["detection_name"]
                box["detection_name"] = name
            relabelled.append(box)
        out[token] = relabelled
    return out, changed


def radial_error_by_distance(frames, submission: dict, class_range: dict[str, float]) -> dict:
    """Median |radial error| of a submission's matched boxes per distance band.

    Args:
        frames: val Frames. submission: {sample_token: [boxes]} in the global frame.
        class_range: the eval's per-class maximum distance (GT and predictions beyond it are dropped).
    Returns:
        {"bands": [[lo, hi], ...], "median_m": [...], "matched": [...], "gt": [...],
        "matched_visible": [...], "gt_visible": [...]} (NaN medians where a band has no match; the
        last two count only boxes at least VISIBLE_LEVEL visible).
    """
    distances, errors, visible = [], [], []
    for frame in frames:
        global2ego = np.linalg.inv(frame.ego2global)
        valid = np.flatnonzero(frame.gt_valid)
        gt_xy = transformed_xy(frame.lidar2ego, frame.gt_boxes[valid, :3])
        gt_names = [DETECTION_CLASSES[i] for i in frame.gt_labels[valid]]
        keep = np.array([np.linalg.norm(xy) < class_range[n] for xy, n in zip(gt_xy, gt_names, strict=True)], bool)
        gt_xy, gt_labels = gt_xy[keep], np.array(gt_names, dtype=object)[keep]
        visible.append(frame.gt_visibility[valid][keep] >= VISIBLE_LEVEL)
        boxes = submission.get(frame.sample_token, [])
        if boxes:
            pred_xy = transformed_xy(global2ego, [b["translation"] for b in boxes])
            pred_labels = np.array([b["detection_name"] for b in boxes], dtype=object)
            in_range = np.linalg.norm(pred_xy, axis=1) < np.array([class_range[n] for n in pred_labels])
            pred_scores = np.array([b["detection_score"] for b in boxes], np.float64)
            err = match_radial_errors(pred_xy[in_range], pred_labels[in_range], pred_scores[in_range], gt_xy, gt_labels)
        else:
            err = np.full(len(gt_xy), np.nan)
        distances.append(np.linalg.norm(gt_xy, axis=1))
        errors.append(err)
    distances, errors, visible = np.concatenate(distances), np.concatenate(errors), np.concatenate(visible)
    bands = list(zip(DISTANCE_BANDS[:-1], DISTANCE_BANDS[1:], strict=True))
    keys = ("median_m", "matched", "gt", "matched_visible", "gt_visible")
    out = {"bands": [list(b) for b in bands], **{key: [] for key in keys}}
    for lo, hi in bands:
        in_band = (distances >= lo) & (distances < hi)
        hit = in_band & np.isfinite(errors)
        matched = errors[hit]
        out["median_m"].append(float(np.median(np.abs(matched))) if len(matched) else float("nan"))
        out["matched"].append(int(len(matched)))
        out["gt"].append(int(in_band.sum()))
        out["matched_visible"].append(int((hit & visible).sum()))
        out["gt_visible"].append(int((in_band & visible).sum()))
    return out


def band_shares(counts: list[int], totals: list[int]) -> list[float]:
    """counts / totals per distance band, NaN where a band has no box."""
    return [c / t if t else float("nan") for c, t in zip(counts, totals, strict=True)]


def _format_shares(radial: dict, counts: str, totals: str) -> str:
    """One line: "0-10 m 0.92, 10-20 m 0.78, ..." of radial[counts] / radial[totals]."""
    shares = band_shares(radial[counts], radial[totals])
    return ", ".join(f"{lo:g}-{hi:g} m {share:.2f}" for (lo, hi), share in zip(radial["bands"], shares, strict=True))


def plot_radial_errors(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Per distance band, one line per row of `bound`: the median |radial error| of the matched
    boxes (left) and the share of GT boxes matched within 2 m (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import _save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 5.2))
    # One colour per pixel error: the idealised detector that sees every box dashed, the one that
    # sees only boxes more than 40% visible dash-dotted in the same colour.
    sigmas = sorted({row["sigma_px"] for row in rows if row["sigma_px"] is not None})
    colours = {sigma: f"C{i}" for i, sigma in enumerate(sigmas)}
    for row in rows:
        radial = row["radial"]
        mid = [(lo + hi) / 2 for lo, hi in radial["bands"]]
        matched = band_shares(radial["matched"], radial["gt"])
        style = {
            "submission": dict(color="black", linewidth=2.2),
            "true_classes": dict(color="black", linewidth=1.2, linestyle=":"),
            "visible": dict(color=colours.get(row["sigma_px"]), linewidth=1.0, linestyle="-.", marker="s"),
        }.get(row["kind"], dict(color=colours.get(row["sigma_px"]), linestyle="--", marker="o"))
        style.setdefault("marker", "o")
        label = f"{row['name']} (mAP {row['mAP']:.3f})"
        left.plot(mid, radial["median_m"], label=label, **style)
        right.plot(mid, matched, **style)
    left.set_ylabel("median |radial error| of matched boxes, m")
    right.set_ylabel(f"GT boxes matched within {MATCH_DISTANCE:g} m")
    right.set_ylim(0, 1.02)
    for ax in (left, right):
        ax.set_xlabel("distance from the ego vehicle, m (band centre)")
        ax.grid(alpha=0.3)
    # Below the axes: inside, ten entries hid the lines they name.
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.subplots_adjust(bottom=0.3, wspace=0.25)
    fig.suptitle(title or "Depth read to sigma pixels by an idealised detector, against the model", fontsize=10)
    path = Path(path)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def bound(dataroot, out_dir, pixels=(0.0, 0.25, 0.5, 1.0), submission=None, seed: int = 0, progress=True) -> list[dict]:
    """Score the idealised detector at each pixel error, and `submission` if given; see the module docstring."""
    from nuscenes.eval.common.config import config_factory

    from ..data.frames import list_frames
    from ..data.splits import read_meta
    from .evaluate import SUBMISSION_META, nuscenes_metrics

    pixels = [float(p) for p in pixels]
    if any(p < 0 for p in pixels):
        raise ValueError(f"pixel errors must be >= 0, got {pixels}")
    frames = list_frames(dataroot, "val")
    if not frames:
        raise ValueError(f"{dataroot} has no val frames")
    image_size = tuple(read_meta(dataroot)["image_size"])
    class_range = config_factory("detection_cvpr_2019").class_range
    out_dir = Path(out_dir)
    jobs = [("oracle", f"ideal, {p:g} px", p) for p in pixels]
    jobs += [("visible", f"ideal, {p:g} px, >40% visible", p) for p in pixels]
    if submission is not None:
        with open(submission) as f:
            submitted = json.load(f)["results"]
        stem = Path(submission).stem
        jobs += [("submission", stem, None), ("true_classes", f"{stem}, true classes", None)]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="bound", unit="submission")
    rows, nusc = [], None
    for kind, name, sigma in jobs:
        if kind == "oracle":
            results, file_name = oracle_submission(frames, image_size, sigma, seed), f"results_ideal_{sigma:g}px.json"
        elif kind == "visible":
            results = oracle_submission(frames, image_size, sigma, seed, VISIBLE_LEVEL)
            file_name = f"results_ideal_{sigma:g}px_visible.json"
        elif kind == "submission":
            results, file_name = submitted, "results_submission.json"
        else:  # the same boxes, each near a ground-truth box given its class
            results, changed = true_classes(frames, submitted)
            file_name = "results_submission_true_classes.json"
        # Scored from a file in out_dir: the devkit writes its metric files beside the submission.
        scored = write_json_atomic(out_dir / file_name, {"meta": SUBMISSION_META, "results": results})
        summary, nusc = nuscenes_metrics(dataroot, scored, nusc)
        within = {}
        if kind == "submission":  # how much of the model's loss lies far away
            for cap in RANGE_CAPS:
                within[f"{cap:g}"] = nuscenes_metrics(dataroot, scored, nusc, max_range=cap)[0]["mean_ap"]
        rows.append(
            {
                "kind": kind,
                "name": name,
                "sigma_px": sigma,
                "mAP": summary["mean_ap"],
                "NDS": summary["nd_score"],
                "mATE": summary["tp_errors"]["trans_err"],
                "radial": radial_error_by_distance(frames, results, class_range),
                **({"relabelled": changed} if kind == "true_classes" else {}),
                **({"mAP_within": within} if within else {}),
            }
        )
    return rows


def format_rows(rows: list[dict]) -> str:
    """One line per row: metrics, then per distance band the median |radial error| (m) of the
    matched boxes and the share of GT boxes matched within 2 m."""
    bands = [f"{lo:g}-{hi:g}" for lo, hi in rows[0]["radial"]["bands"]]
    width = 6 * len(bands)
    name = max(22, *(len(row["name"]) for row in rows))
    lines = [
        f"{'':<{name}} {'mAP':>6} {'NDS':>6} {'mATE':>6}  "
        f"{'median |radial error|, m':^{width}}  {'GT matched within 2 m':^{width}}",
        f"{'distance band, m':<{name + 21}}{''.join(f'{b:>6}' for b in bands)}  {''.join(f'{b:>6}' for b in bands)}",
    ]
    for row in rows:
        radial = row["radial"]
        medians = "".join(f"{m:>6.2f}" for m in radial["median_m"])
        shares = "".join(f"{share:>6.2f}" for share in band_shares(radial["matched"], radial["gt"]))
        lines.append(
            f"{row['name']:<{name}} {row['mAP']:>6.4f} {row['NDS']:>6.4f} {row['mATE']:>6.3f}  {medians}  {shares}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataroot written by `tggbc data synth` (its val split)")
    parser.add_argument(
        "--submission", default=None, help="a submission to compare, e.g. OUT/results_dense.json of `tggbc eval`"
    )
    parser.add_argument(
        "--pixels", default="0,0.25,0.5,1", help="pixel errors of the idealised detector, comma-separated"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the depth errors")
    parser.add_argument("--out", default="out/bound", help="directory for submissions, bound.json and bound.png")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        pixels = [float(p) for p in args.pixels.split(",") if p.strip()]
    except ValueError:
        raise SystemExit(f"--pixels must be comma-separated numbers, got {args.pixels!r}") from None
    if args.submission is not None and not Path(args.submission).is_file():
        raise SystemExit(f"--submission {args.submission} does not exist")
    rows = bound(args.data, args.out, pixels, args.submission, args.seed, progress=not args.quiet)
    print(format_rows(rows))
    shares = _format_shares(rows[0]["radial"], "gt_visible", "gt")
    print(f"share of the scored GT boxes more than 40% visible: {shares}")
    for row in rows:
        if row["kind"] == "submission":
            shares = _format_shares(row["radial"], "matched_visible", "gt_visible")
            print(f"{row['name']}: GT boxes more than 40% visible matched within 2 m: {shares}")
        if "mAP_within" in row:
            caps = ", ".join(f"{cap} m {value:.4f}" for cap, value in row["mAP_within"].items())
            print(f"{row['name']}: mAP with every class range capped at {caps} (standard ranges {row['mAP']:.4f})")
    out = Path(args.out)
    write_json_atomic(out / "bound.json", {"data": str(args.data), "seed": args.seed, "rows": rows})
    plot_radial_errors(rows, out / "bound.png")
    print(f"wrote {out / 'bound.json'} and {out / 'bound.png'}")
    return 0
