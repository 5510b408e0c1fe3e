"""The nuScenes detection metric, fast enough to resample scenes for confidence intervals.

Boxes are loaded and filtered by nuscenes-devkit itself (`load_gt`, `add_center_dist`,
`filter_eval_boxes`, the `detection_cvpr_2019` config). The matching, AP and TP errors of the
devkit's `accumulate`, `calc_ap` and `calc_tp` are re-implemented on arrays: a prediction's
match depends only on the boxes of its own sample, so each sample is matched once and any
multiset of samples (a bootstrap resample of scenes) is scored by repeating its rows. On the
whole split the result equals `DetectionEval` (tests/test_nuscenes_scoring.py).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TP_METRICS = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
_RECALL_POINTS = 101


def _devkit():
    try:
        from nuscenes.eval.common.config import config_factory
    except ImportError as e:
        raise ImportError("scoring needs nuscenes-devkit: pip install 'tggbc[eval]'") from e
    return config_factory("detection_cvpr_2019")


@dataclass
class _Boxes:
    """Boxes of one class, rows ordered as the devkit iterates them."""

    sample: np.ndarray  # [M] sample index
    xy: np.ndarray  # [M, 2] global centre
    size: np.ndarray  # [M, 3]
    yaw: np.ndarray  # [M]
    velocity: np.ndarray  # [M, 2]
    attribute: np.ndarray  # [M] str
    score: np.ndarray | None = None  # [M] predictions only

    @classmethod
    def from_eval_boxes(cls, boxes, sample_index: dict[str, int], name: str, predictions: bool) -> _Boxes:
        from nuscenes.eval.common.utils import quaternion_yaw
        from pyquaternion import Quaternion

        rows = [(sample_index[b.sample_token], b) for b in boxes.all if b.detection_name == name]
        return cls(
            sample=np.array([s for s, _ in rows], dtype=np.int64),
            xy=np.array([b.translation[:2] for _, b in rows], dtype=np.float64).reshape(-1, 2),
            size=np.array([b.size for _, b in rows], dtype=np.float64).reshape(-1, 3),
            yaw=np.array([quaternion_yaw(Quaternion(b.rotation)) for _, b in rows], dtype=np.float64),
            velocity=np.array([b.velocity for _, b in rows], dtype=np.float64).reshape(-1, 2),
            attribute=np.array([b.attribute_name for _, b in rows], dtype=object),
            score=np.array([b.detection_score for _, b in rows], dtype=np.float64) if predictions else None,
        )


@dataclass
class GroundTruth:
    """The scored ground truth of one split: what `DetectionEval` keeps after its filters.

    sample_tokens: S samples; scene: [S] scene index of each (for resampling scenes);
    boxes: per class, `_Boxes`; count: per class, [S] boxes of that class per sample.
    """

    sample_tokens: list[str]
    scene: np.ndarray
    boxes: dict[str, _Boxes]
    count: dict[str, np.ndarray]
    config: object = field(repr=False)
    nusc: object = field(repr=False)

    @property
    def num_scenes(self) -> int:
        return int(self.scene.max()) + 1 if len(self.scene) else 0

    @classmethod
    def load(cls, dataroot: str | Path, split: str = "val", version: str | None = None) -> GroundTruth:
        """Load and filter the ground truth of `split` with nuscenes-devkit."""
        config = _devkit()
        from nuscenes import NuScenes
        from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt
        from nuscenes.eval.detection.data_classes import DetectionBox

        if version is None:
            from ..data.splits import read_meta

            version = read_meta(dataroot)["version"]
        nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=False)
        with contextlib.redirect_stderr(io.StringIO()):  # the devkit's unlabelled bar, even when not verbose
            gt = load_gt(nusc, split, DetectionBox, verbose=False)
        gt = filter_eval_boxes(nusc, add_center_dist(nusc, gt), config.class_range, verbose=False)
        tokens = list(gt.sample_tokens)
        index = {t: i for i, t in enumerate(tokens)}
        scenes: dict[str, int] = {}
        scene = np.array(
            [scenes.setdefault(nusc.get("sample", t)["scene_token"], len(scenes)) for t in tokens], dtype=np.int64
        )
        boxes = {name: _Boxes.from_eval_boxes(gt, index, name, predictions=False) for name in config.class_names}
        count = {name: np.bincount(b.sample, minlength=len(tokens)) for name, b in boxes.items()}
        return cls(tokens, scene, boxes, count, config, nusc)


@dataclass
class Matches:
    """Every prediction of one submission matched against the ground truth, per class.

    For class c: score [P], sample [P] (rows in the devkit's processing order: score descending),
    tp [T, P] bool at each distance threshold, errors [5, P] at the TP threshold (NaN unmatched).
    """

    score: dict[str, np.ndarray]
    sample: dict[str, np.ndarray]
    tp: dict[str, np.ndarray]
    errors: dict[str, np.ndarray]


def _angle_diff(x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    diff = (x - y + period / 2) % period - period / 2
    return np.where(diff > np.pi, diff - 2 * np.pi, diff)


def match(gt: GroundTruth, results: dict[str, list[dict]]) -> Matches:
    """Match a submission's boxes ({sample_token: [box, ...]}) to the ground truth.

    The devkit's rules: predictions are filtered by class range (at most 500 per sample); each
    goes, in descending score order (ties: later box first), to the nearest untaken ground-truth
    box of its class in its sample if the centre distance is below the threshold.
    """
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes
    from nuscenes.eval.detection.data_classes import DetectionBox

    cfg = gt.config
    extra = set(results) - set(gt.sample_tokens)
    missing = set(gt.sample_tokens) - set(results)
    if extra or missing:
        raise ValueError(
            f"the submission's samples differ from the split's: {len(missing)} missing (e.g. {sorted(missing)[:2]}), "
            f"{len(extra)} extra (e.g. {sorted(extra)[:2]})"
        )
    for token, boxes in results.items():
        if len(boxes) > cfg.max_boxes_per_sample:
            raise ValueError(f"sample {token} has {len(boxes)} boxes; the metric allows {cfg.max_boxes_per_sample}")
    pred = EvalBoxes.deserialize(results, DetectionBox)
    pred = filter_eval_boxes(gt.nusc, add_center_dist(gt.nusc, pred), cfg.class_range, verbose=False)
    index = {t: i for i, t in enumerate(gt.sample_tokens)}
    thresholds = list(cfg.dist_ths)
    tp_index = thresholds.index(cfg.dist_th_tp)
    out = Matches({}, {}, {}, {})
    for name in cfg.class_names:
        p = _Boxes.from_eval_boxes(pred, index, name, predictions=True)
        g = gt.boxes[name]
        # The devkit sorts (score, position) ascending and walks it backwards.
        order = np.lexsort((-np.arange(len(p.score)), -p.score))
        p = _Boxes(*(getattr(p, f)[order] for f in ("sample", "xy", "size", "yaw", "velocity", "attribute", "score")))
        tp = np.zeros((len(thresholds), len(order)), dtype=bool)
        errors = np.full((len(TP_METRICS), len(order)), np.nan)
        gt_rows = {s: np.flatnonzero(g.sample == s) for s in np.unique(g.sample)}
        for s in np.unique(p.sample):
            rows = np.flatnonzero(p.sample == s)  # this sample's predictions, in processing order
            targets = gt_rows.get(s)
            if targets is None:
                continue
            dist = np.linalg.norm(p.xy[rows, None, :] - g.xy[None, targets, :], axis=-1)  # (P_s, G_s)
            for t, threshold in enumerate(thresholds):
                taken = np.zeros(len(targets), dtype=bool)
                for i, row in enumerate(rows):
                    d = np.where(taken, np.inf, dist[i])
                    j = int(np.argmin(d))
                    if d[j] < threshold:
                        taken[j] = True
                        tp[t, row] = True
                        if t == tp_index:
                            k = targets[j]
                            errors[:, row] = _errors(name, p, row, g, k, d[j])
        out.score[name], out.sample[name], out.tp[name], out.errors[name] = p.score, p.sample, tp, errors
    return out


def _errors(name: str, p: _Boxes, row: int, g: _Boxes, k: int, distance: float) -> list[float]:
    """trans, scale, orient, vel and attr errors of prediction `row` matched to ground truth `k`."""
    lo = np.minimum(p.size[row], g.size[k])
    inter = np.prod(lo)
    scale_iou = inter / (np.prod(p.size[row]) + np.prod(g.size[k]) - inter)
    period = np.pi if name == "barrier" else 2 * np.pi
    orient = abs(float(_angle_diff(g.yaw[k], p.yaw[row], period)))
    velocity = float(np.linalg.norm(p.velocity[row] - g.velocity[k]))
    attr = np.nan if g.attribute[k] == "" else 1.0 - float(g.attribute[k] == p.attribute[row])
    return [distance, 1.0 - scale_iou, orient, velocity, attr]


def _cummean(x: np.ndarray) -> np.ndarray:
    """The devkit's NaN-aware cumulative mean (all NaN -> ones)."""
    nan = np.isnan(x)
    if nan.all():
        return np.ones(len(x))
    sums = np.nancumsum(x)
    counts = np.cumsum(~nan)
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts != 0)


def _class_metrics(score, tp, errors, npos, min_recall, min_precision, tp_index):
    """(APs at each threshold [T], TP errors [5]) of one class, as calc_ap and calc_tp."""
    recall_points = np.linspace(0, 1, _RECALL_POINTS)
    first = round(100 * min_recall) + 1
    aps, tp_errors = [], np.ones(len(TP_METRICS))
    for t in range(tp.shape[0]):
        hits = tp[t]
        if npos == 0 or not hits.any():
            aps.append(0.0)
            continue
        ctp = np.cumsum(hits).astype(float)
        cfp = np.cumsum(~hits).astype(float)
        precision = np.interp(recall_points, ctp / npos, ctp / (ctp + cfp), right=0)
        confidence = np.interp(recall_points, ctp / npos, score, right=0)
        clipped = precision[first:] - min_precision
        clipped[clipped < 0] = 0
        aps.append(float(np.mean(clipped)) / (1.0 - min_precision))
        if t == tp_index:
            nonzero = np.flatnonzero(confidence)
            last = nonzero[-1] if len(nonzero) else 0
            matched_conf = score[hits]
            for m in range(len(TP_METRICS)):
                curve = np.interp(confidence[::-1], matched_conf[::-1], _cummean(errors[m, hits])[::-1])[::-1]
                tp_errors[m] = 1.0 if last < first else float(np.mean(curve[first : last + 1]))
    return aps, tp_errors


def metrics(gt: GroundTruth, matches: Matches, weights: np.ndarray | None = None) -> dict:
    """mAP, NDS, TP errors, per-class and per-threshold APs of matched predictions.

    Args:
        weights: [S] how often each sample counts (a bootstrap resample); None = once each.
    Returns:
        {"mAP", "NDS", "tp_errors": {metric: value}, "class_ap": {class: AP},
         "threshold_ap": {threshold: mAP at it}}.
    """
    cfg = gt.config
    tp_index = list(cfg.dist_ths).index(cfg.dist_th_tp)
    class_ap, class_tp, per_threshold = {}, {}, []
    for name in cfg.class_names:
        score, sample, tp, errors = matches.score[name], matches.sample[name], matches.tp[name], matches.errors[name]
        if weights is None:
            npos = int(gt.count[name].sum())
        else:
            npos = int((gt.count[name] * weights).sum())
            repeat = weights[sample]  # rows of a sample drawn twice appear twice, side by side
            score, tp, errors = (
                np.repeat(score, repeat),
                np.repeat(tp, repeat, axis=1),
                np.repeat(errors, repeat, axis=1),
            )
        aps, tp_errors = _class_metrics(score, tp, errors, npos, cfg.min_recall, cfg.min_precision, tp_index)
        if name == "traffic_cone":
            tp_errors[[2, 3, 4]] = np.nan
        elif name == "barrier":
            tp_errors[[3, 4]] = np.nan
        class_ap[name] = float(np.mean(aps))
        class_tp[name] = tp_errors
        per_threshold.append(aps)
    mean_ap = float(np.mean(list(class_ap.values())))
    tp_errors = {m: float(np.nanmean([class_tp[c][i] for c in cfg.class_names])) for i, m in enumerate(TP_METRICS)}
    tp_scores = [max(0.0, 1.0 - e) for e in tp_errors.values()]
    nds = (cfg.mean_ap_weight * mean_ap + sum(tp_scores)) / (cfg.mean_ap_weight + len(tp_scores))
    threshold_ap = {f"{t:g}": float(v) for t, v in zip(cfg.dist_ths, np.mean(per_threshold, axis=0), strict=True)}
    return {
        "mAP": mean_ap,
        "NDS": float(nds),
        "tp_errors": tp_errors,
        "class_ap": class_ap,
        "threshold_ap": threshold_ap,
    }


def scene_resamples(gt: GroundTruth, count: int, seed: int = 0) -> np.ndarray:
    """[count, S] sample weights of `count` bootstrap resamples of whole scenes (with replacement)."""
    rng = np.random.default_rng(seed)
    scenes = gt.num_scenes
    drawn = rng.integers(0, scenes, size=(count, scenes))
    per_scene = np.stack([np.bincount(d, minlength=scenes) for d in drawn])  # (count, scenes)
    return per_scene[:, gt.scene]
