"""tggbc's array scoring equals nuscenes-devkit's DetectionEval, and resampling behaves."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("nuscenes", reason="scoring loads and filters boxes with nuscenes-devkit")

from tggbc.data import generate, list_frames  # noqa: E402
from tggbc.nuscenes.scoring import GroundTruth, match, metrics, scene_resamples  # noqa: E402
from tggbc.nuscenes.submission import SUBMISSION_META, submission_boxes  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    return generate(
        root, num_scenes=4, seed=3, image_size=(176, 64), frames_per_scene=3, val_fraction=1.0, progress=False
    )


@pytest.fixture(scope="module")
def gt(dataset):
    return GroundTruth.load(dataset, "val")


def noisy_submission(dataset, seed: int = 0) -> dict:
    """Ground truth moved, resized, turned and partly dropped, plus false positives; scores
    rounded to two decimals so that ties occur (the devkit breaks them by position)."""
    rng = np.random.default_rng(seed)
    results = {}
    for f in list_frames(dataset, "val"):
        b = f.gt_boxes
        keep = rng.random(len(b)) < 0.8
        n_fp = 12
        center = np.concatenate(
            [b[keep, :3] + rng.normal(scale=0.8, size=(keep.sum(), 3)), rng.uniform(-30, 30, (n_fp, 3))]
        )
        size = np.concatenate([b[keep, 3:6] * rng.uniform(0.7, 1.3, (keep.sum(), 3)), rng.uniform(0.5, 4, (n_fp, 3))])
        yaw = np.concatenate([b[keep, 6] + rng.normal(scale=0.4, size=keep.sum()), rng.uniform(-3, 3, n_fp)])
        velocity = np.concatenate(
            [np.nan_to_num(b[keep, 7:9]) + rng.normal(size=(keep.sum(), 2)), rng.normal(size=(n_fp, 2))]
        )
        score = rng.random(len(center)).round(2)
        label = np.concatenate([f.gt_labels[keep], rng.integers(0, 10, n_fp)])
        lidar2global = f.ego2global @ f.lidar2ego.astype(np.float64)
        results[f.sample_token] = submission_boxes(
            f.sample_token, center, size, yaw, velocity, score, label, lidar2global
        )
    return results


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_equal_the_devkit(dataset, gt, tmp_path, seed):
    from nuscenes.eval.detection.evaluate import DetectionEval

    results = noisy_submission(dataset, seed)
    path = tmp_path / "submission.json"
    path.write_text(json.dumps({"meta": SUBMISSION_META, "results": results}))
    devkit, _ = DetectionEval(
        gt.nusc, gt.config, str(path), eval_set="val", output_dir=str(tmp_path), verbose=False
    ).evaluate()
    devkit = devkit.serialize()
    ours = metrics(gt, match(gt, results))
    assert 0.05 < devkit["mean_ap"] < 0.95  # a case where matching, ranking and TP errors all matter
    assert ours["mAP"] == pytest.approx(devkit["mean_ap"], abs=1e-12)
    assert ours["NDS"] == pytest.approx(devkit["nd_score"], abs=1e-12)
    for name, value in devkit["tp_errors"].items():
        assert ours["tp_errors"][name] == pytest.approx(value, abs=1e-12), name
    for name, value in devkit["mean_dist_aps"].items():
        assert ours["class_ap"][name] == pytest.approx(value, abs=1e-12), name


def test_weights_count_samples(dataset, gt):
    matches = match(gt, noisy_submission(dataset))
    plain = metrics(gt, matches)
    ones = np.ones(len(gt.sample_tokens), dtype=np.int64)
    assert metrics(gt, matches, ones) == plain
    # Every scene twice: the same precision-recall curve sampled at twice the points, so the AP
    # moves only by the interpolation between them.
    assert metrics(gt, matches, 2 * ones)["mAP"] == pytest.approx(plain["mAP"], abs=5e-3)
    # One scene alone: only its samples count.
    only = (gt.scene == 0).astype(np.int64)
    assert metrics(gt, matches, only)["mAP"] != pytest.approx(plain["mAP"], abs=1e-3)


def test_scene_resamples_draw_whole_scenes(gt):
    weights = scene_resamples(gt, 50, seed=0)
    assert weights.shape == (50, len(gt.sample_tokens))
    assert (weights.sum(1) == len(gt.sample_tokens)).all()  # equal-length scenes: as many samples as drawn
    for w in weights:  # every sample of a scene has its scene's weight
        for s in range(gt.num_scenes):
            assert len(set(w[gt.scene == s])) == 1
    assert len({tuple(w) for w in weights}) > 1


def test_missing_sample_is_refused(dataset, gt):
    results = noisy_submission(dataset)
    results.pop(next(iter(results)))
    with pytest.raises(ValueError, match="1 missing"):
        match(gt, results)
