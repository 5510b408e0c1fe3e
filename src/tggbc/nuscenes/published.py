"""`tggbc eval --model NAME`: a published detector on nuScenes, dense against tgGBC, scored by the devkit.

    tggbc eval --model stream_petr_r50_flash_704_bs2_seq_24e --weights streampetr_r50.safetensors \\
        --dataroot data/nuscenes --version v1.0-trainval --out out/streampetr_r50
    torchrun --nproc-per-node 4 -m tggbc eval --model ... (the same options)

Every sample of the split goes through the original test pipeline (`tggbc.nuscenes.reader`);
the image features and decoder keys are computed once per sample and every setting's decoder
(dense, tgGBC at the model's published r, n, k or the given ones, controls) runs on them with its
own StreamPETR memory, reset at each scene start. Boxes go to the global frame as mmdet3d writes
them (`tggbc.nuscenes.submission.global_detection_boxes`), one submission per setting, and
nuscenes-devkit's DetectionEval scores each.

Output directory (--out):
    run.json                      what this run is (model, weights digest, data, settings)
    records.json                  the split's samples in test order (read by every process)
    scenes/<scene>.npz            each finished scene's boxes and timings (arrays, no pickle)
    <setting>/results_nusc.json   the submission; <setting>/metrics_summary.json DetectionEval's summary
    results.json                  the table below as JSON
A run that stops (Ctrl-C, a lost machine) is resumed by the same command: finished scenes are
read back, not run again. Scenes are the unit of work, so a resumed or sharded run gives the same
boxes as one uninterrupted process.

Latency (medians over frames, batch 1, data loading excluded): end-to-end = backbone, neck and
keys (computed once per frame, shared by the settings) + that setting's decoder + box decoding;
decoder = the decoder call alone.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import statistics
import tempfile
import time
import zipfile
from contextlib import redirect_stderr
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..pruner import DENSE, METHODS, Setting, pruning
from .distributed import Shard, agree, assign_scenes, barrier

__all__ = [
    "DENSE",
    "DEFAULT_METHODS",
    "SceneRunner",
    "SettingScore",
    "add_model_arguments",
    "evaluate_model",
    "format_scores",
    "model_settings",
    "run_model",
]

DEFAULT_METHODS = (DENSE, "tggbc")
RUN_FILE, RECORDS_FILE, RESULTS_FILE = "run.json", "records.json", "results.json"
SCENES_DIR, SUBMISSION_FILE, SUMMARY_FILE = "scenes", "results_nusc.json", "metrics_summary.json"
RUN_FORMAT = "tggbc-nuscenes-eval/1"
BOX_FIELDS = ("translation", "size", "rotation", "velocity", "score", "label", "attribute")
TP_NAMES = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE", "attr_err": "mAAE"}


# ------------------------------------------------------------------ settings


def model_settings(config, methods=DEFAULT_METHODS, r=None, n: int | None = None, k: int | None = None):
    """The settings of one run: "dense" and/or pruning methods, all at one (r, n, k).

    Args:
        config: the PublishedConfig (its r, n, k are the defaults: the published tgGBC setting).
        methods: names from ("dense", *tggbc.pruner.METHODS).
        r, n, k: override the config's setting (n and k alone keep the config's r).
    """
    known = (DENSE, *METHODS)
    unknown = [m for m in methods if m not in known]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct names from {', '.join(known)}, got {list(methods)}")
    r = config.r if r is None else r
    n = config.n if n is None else n
    k = config.k if k is None else k
    return [Setting(m) if m == DENSE else Setting(m, m, r=r, n=n, k=k) for m in methods]


# ------------------------------------------------------------------ running the detector


@dataclass
class FrameResult:
    """One setting's output for one frame: Detections (on the CPU), keys seen per decoder layer,
    decoder time and end-to-end time (ms)."""

    detections: object
    keys_per_layer: list[int]
    decoder_ms: float
    total_ms: float


class SceneRunner:
    """A published detector with several decoder settings over the same frames.

    The image features and keys of a frame are computed once (they do not depend on the decoder
    setting), then each setting's decoder runs with its own pruner and, for StreamPETR, its own
    memory. `start_scene()` clears the memories and rebuilds the pruners, so a scene's result does
    not depend on the scenes before it (the random control draws afresh from its seed).

    Args:
        detector: a PETRFamilyDetector (eval mode, on its device).
        settings: Settings (names unique).
        seed: of the random control.
    """

    def __init__(self, detector, settings: list[Setting], seed: int = 0):
        names = [s.name for s in settings]
        if len(set(names)) != len(names):
            raise ValueError(f"setting names must be unique, got {names}")
        self.detector, self.settings, self.seed = detector, list(settings), seed
        self.device = next(detector.parameters()).device
        self.start_scene()

    def start_scene(self) -> None:
        self.states = {s.name: None for s in self.settings}
        self.pruners = {s.name: s.pruner(self.seed) for s in self.settings}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict[str, FrameResult]:
        """Run every setting on one frame.

        Args:
            batch: a `frame_loader` batch: img [1, 6, 3, H, W], lidar2img and intrinsics
                [1, 6, 4, 4], ego_pose and ego_pose_inv [1, 4, 4], timestamp [1] (float64).
        Returns:
            {setting name: FrameResult}.
        """
        detector, head = self.detector, self.detector.pts_bbox_head
        inputs = {k: batch[k].to(self.device) for k in ("img", "lidar2img", "intrinsics")}
        self._sync()
        start = time.perf_counter()
        img_feats = detector.extract_img_feat(inputs["img"])
        pad_shape = tuple(inputs["img"].shape[-2:])
        topk = None
        if not detector.aux_2d_only and detector.img_roi_head is not None:  # as PETRFamilyDetector.forward
            topk = detector.img_roi_head(img_feats, pad_shape).topk_indexes
        memory, key_pos = head.keys(img_feats, inputs["lidar2img"], inputs["intrinsics"], pad_shape, topk)
        self._sync()
        shared_ms = (time.perf_counter() - start) * 1e3
        temporal = {}
        if detector.temporal:
            temporal = {k: batch[k].to(self.device) for k in ("ego_pose", "ego_pose_inv", "timestamp")}
        results = {}
        for s in self.settings:
            self._sync()
            start = time.perf_counter()
            with pruning(detector.decoder, self.pruners[s.name]):
                if detector.temporal:
                    state = self.states[s.name]
                    prev = torch.full((1,), 0.0 if state is None else 1.0, device=self.device)
                    out = head.decoder(memory, key_pos, state=state, prev_exists=prev, **temporal)
                    self.states[s.name] = out.state
                else:
                    out = head.decoder(memory, key_pos)
                self._sync()
                decoder_ms = (time.perf_counter() - start) * 1e3
                (det,) = head.get_bboxes(out)
                det = type(det)(*(t.cpu() for t in det))
            total_ms = shared_ms + (time.perf_counter() - start) * 1e3
            results[s.name] = FrameResult(det, list(out.keys_per_layer), decoder_ms, total_ms)
        return results


# ------------------------------------------------------------------ scenes on disk


def _scene_path(out: Path, scene_name: str) -> Path:
    return out / SCENES_DIR / f"{scene_name}.npz"


def _save_scene(path: Path, samples: list[str], settings: list[Setting], collected: dict) -> None:
    """One finished scene: per setting the global boxes of all its frames, frame times and keys."""
    from ..files import write_atomic

    arrays = {"samples": np.array(samples), "settings": np.array([s.name for s in settings])}
    for s in settings:
        c = collected[s.name]
        for f in BOX_FIELDS:
            arrays[f"{s.name}.{f}"] = np.concatenate(c[f]) if c[f] else np.zeros((0,))
        arrays[f"{s.name}.sample"] = np.concatenate(c["sample"]).astype(np.int64)
        arrays[f"{s.name}.decoder_ms"] = np.array(c["decoder_ms"], dtype=np.float64)
        arrays[f"{s.name}.total_ms"] = np.array(c["total_ms"], dtype=np.float64)
        arrays[f"{s.name}.keys_per_layer"] = np.array(c["keys_per_layer"], dtype=np.int64)
    write_atomic(path, lambda tmp: np.savez(tmp, **arrays))


def _load_scene(path: Path, samples: list[str], settings: list[Setting]) -> dict:
    """A scene file back as {setting: {field: array}}; a damaged or foreign file is an error naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"scene file {path} is damaged ({e}): delete it to run that scene again") from None
    names = [s.name for s in settings]
    if list(arrays.get("samples", [])) != samples or list(arrays.get("settings", [])) != names:
        raise ValueError(f"scene file {path} holds other samples or settings than this run: delete it, or --force")
    out = {}
    for name in names:
        try:
            out[name] = {f: arrays[f"{name}.{f}"] for f in (*BOX_FIELDS, "sample", "decoder_ms", "total_ms")}
            out[name]["keys_per_layer"] = arrays[f"{name}.keys_per_layer"]
        except KeyError as e:
            raise ValueError(f"scene file {path} is damaged: it lacks {e}") from None
    return out


def _digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _records_to_json(records) -> list[dict]:
    out = []
    for r in records:
        d = asdict(r)
        for key in ("cam_intrinsic", "sensor2lidar_rotation", "sensor2lidar_translation"):
            d[key] = d[key].tolist()
        out.append(d)
    return out


def _records_from_json(rows: list[dict]):
    from .reader import SampleRecord

    tuples = ("image_paths", "image_timestamps", "lidar2ego_rotation", "lidar2ego_translation",
              "ego2global_rotation", "ego2global_translation")  # fmt: skip
    arrays = ("cam_intrinsic", "sensor2lidar_rotation", "sensor2lidar_translation")
    return [
        SampleRecord(
            **{
                k: tuple(v) if k in tuples else np.array(v, dtype=np.float64) if k in arrays else v
                for k, v in row.items()
            }
        )  # fmt: skip
        for row in rows
    ]


def _prepare_out(out: Path, identity: dict, force: bool) -> bool:
    """Check and claim the output directory before any long work. Returns True when resuming."""
    from ..files import prepare_output_dir, read_json, write_json_atomic

    run_file = out / RUN_FILE
    resume = False
    if run_file.is_file():
        previous = read_json(run_file, what="run record")
        if not isinstance(previous, dict):
            raise ValueError(f"run record {run_file} is damaged: delete it, or pass --force")
        if previous == identity and not force:
            resume = True
        elif not force:
            diff = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise FileExistsError(
                f"--out {out} holds another run (it differs in {', '.join(diff)}): pass --force to start over there, "
                "or choose another --out"
            )
        else:  # start over: drop the earlier run's results (only the files this command writes)
            shutil.rmtree(out / SCENES_DIR, ignore_errors=True)
            for setting in previous.get("settings") or []:
                name = setting.get("name") if isinstance(setting, dict) else None
                if isinstance(name, str) and name and "/" not in name and (out / name).is_dir():
                    for file in (SUBMISSION_FILE, SUMMARY_FILE):
                        (out / name / file).unlink(missing_ok=True)
            (out / RESULTS_FILE).unlink(missing_ok=True)
    else:
        prepare_output_dir(out, force, what="--out")
    write_json_atomic(run_file, identity)
    return resume


# ------------------------------------------------------------------ scoring


@dataclass
class SettingScore:
    """One setting's official metrics and latency over the whole split."""

    name: str
    method: str | None
    r: int | float | list[int]
    n: int
    k: int
    mAP: float
    NDS: float
    tp_errors: dict[str, float]
    class_ap: dict[str, float]
    e2e_ms: float
    decoder_ms: float
    decoder_speedup: float | None
    keys_per_layer: list[int]
    frames: int
    submission: str = ""
    label_tp_errors: dict = field(default_factory=dict)


def _write_submission(path: Path, samples: list[str], boxes: dict[str, dict]) -> None:
    """The submission JSON, written sample by sample (a full val split holds ~1.8M boxes per setting)."""
    from ..files import write_atomic
    from .submission import ORIGINAL_SUBMISSION_META, submission_entries

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"meta": ' + json.dumps(ORIGINAL_SUBMISSION_META) + ', "results": {')
            for i, token in enumerate(samples):
                f.write(
                    (", " if i else "") + json.dumps(token) + ": " + json.dumps(submission_entries(token, boxes[token]))
                )
            f.write("}}\n")

    write_atomic(path, write)


def _detection_eval(nusc, submission: Path, eval_set: str, workdir: Path) -> dict:
    """nuscenes-devkit's DetectionEval (detection_cvpr_2019) of one submission: its metrics summary."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    from ..files import temp_prefix

    # The devkit's loaders draw progress bars even when not verbose: keep them off the terminal.
    with tempfile.TemporaryDirectory(dir=workdir, prefix=temp_prefix()) as tmp, redirect_stderr(io.StringIO()):
        evaluation = DetectionEval(
            nusc, config_factory("detection_cvpr_2019"), str(submission), eval_set, output_dir=tmp, verbose=False
        )
        metrics, _ = evaluation.evaluate()
    summary = metrics.serialize()
    summary["meta"] = dict(evaluation.meta)
    return json.loads(json.dumps(summary))  # plain dicts (the devkit's are defaultdicts) and floats


def format_scores(scores: list[SettingScore], title: str = "") -> str:
    """One row per setting: mAP, NDS, the TP errors, latency, keys per decoder layer."""
    lines = [title] if title else []
    tp = "".join(f"{v:>7}" for v in TP_NAMES.values())
    head = f"{'setting':<10} {'r n k':<20} {'mAP':>7} {'NDS':>7}{tp} {'e2e ms':>8} {'dec ms':>8} {'dec x':>6}"
    lines.append(head + "  keys per layer")
    for s in scores:
        setting = "" if s.method is None else f"{s.r} {s.n} {s.k}"
        errs = "".join(f"{s.tp_errors[k]:>7.4f}" for k in TP_NAMES)
        speedup = "" if s.decoder_speedup is None else f"{s.decoder_speedup:.2f}x"
        lines.append(
            f"{s.name:<10} {setting:<20} {s.mAP:>7.4f} {s.NDS:>7.4f}{errs} {s.e2e_ms:>8.1f} {s.decoder_ms:>8.1f} "
            f"{speedup:>6}  {','.join(map(str, s.keys_per_layer))}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ the whole run


def _scenes_of(records) -> list[tuple[str, list[int]]]:
    """[(scene name, record indices)] in test order; a scene's samples must be contiguous."""
    scenes: list[tuple[str, list[int]]] = []
    for i, r in enumerate(records):
        if not scenes or scenes[-1][0] != r.scene_name:
            if any(name == r.scene_name for name, _ in scenes):
                raise ValueError(f"scene {r.scene_name} is not contiguous in the test order")
            scenes.append((r.scene_name, []))
        scenes[-1][1].append(i)
    return scenes


def evaluate_model(
    detector,
    dataroot,
    *,
    version: str,
    split: str = "val",
    settings: list[Setting],
    out,
    weights=None,
    workers: int = 4,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    shard: Shard | None = None,
) -> tuple[list[SettingScore], dict] | None:
    """Run and score `settings` of a published detector on a nuScenes split; see the module docstring.

    Args:
        detector: a PETRFamilyDetector with its weights loaded (eval mode, on its device).
        dataroot, version: the nuScenes dataroot and table version (v1.0-trainval, v1.0-mini, or a
            `tggbc data synth` directory, which is v1.0-trainval).
        split: "val" or "train" ("mini_val"/"mini_train" also accepted for v1.0-mini).
        settings: from `model_settings`.
        out: the output directory (resumed when it holds this very run).
        weights: the weights file, recorded (with its SHA-256) so a resume cannot mix weights.
        workers: DataLoader worker processes that decode images (0: this process).
        seed: of the random control.
        force: start over in an `out` that holds results.
        shard: this process's share under torchrun (default: the whole run).
    Returns:
        on the main process (SettingScore per setting, run info); None on the others.
    """
    from .reader import (
        ImageNormalization,
        NuScenesFrames,
        check_dataroot,
        eval_set_name,
        frame_loader,
        overlapping_scenes,
    )

    shard = shard or Shard()
    check_dataroot(dataroot, version)
    out = Path(out)
    config = detector.config
    eval_set = eval_set_name(version, split)
    identity = {
        "format": RUN_FORMAT,
        "model": config.name,
        "image_size": list(config.image_size),
        "weights": None if weights is None else str(Path(weights).resolve()),
        "weights_sha256": None if weights is None else _digest(weights),
        "dataroot": str(Path(dataroot).resolve()),
        "version": version,
        "split": eval_set,
        "settings": [asdict(s) for s in settings],
        "seed": seed,
    }
    device_type = next(detector.parameters()).device.type

    # The main process checks the output directory and lists the samples; the others wait for it.
    resume, nusc, problem = False, None, None
    if shard.is_main:
        try:
            resume = _prepare_out(out, identity, force)
            from ..files import write_json_atomic
            from .reader import open_nuscenes, sample_records

            nusc = open_nuscenes(dataroot, version)
            records = sample_records(nusc, eval_set)
            write_json_atomic(out / RECORDS_FILE, {"split": eval_set, "records": _records_to_json(records)})
        except (ValueError, OSError) as e:
            problem = str(e)
    agree(shard, problem, device_type)
    if not shard.is_main:
        from ..files import read_json

        records = _records_from_json(read_json(out / RECORDS_FILE, what="sample list")["records"])
    scenes = _scenes_of(records)
    samples_of = {name: [records[i].token for i in idx] for name, idx in scenes}
    mine = assign_scenes([len(idx) for _, idx in scenes], shard.world_size)[shard.rank]
    pending = [s for s in mine if not _scene_path(out, scenes[s][0]).is_file()]
    if shard.is_main and resume:
        done = len(scenes) - sum(1 for name, _ in scenes if not _scene_path(out, name).is_file())
        print(f"resuming {out}: {done} of {len(scenes)} scenes already done")
    overlapping = overlapping_scenes(records)
    if shard.is_main and overlapping:
        print(f"note: {overlapping} scenes overlap in time; the original's timestamp order would interleave them "
              "(resetting StreamPETR's memory at each switch), here each scene runs whole")  # fmt: skip
    from nuscenes.eval.common.config import config_factory

    class_range = config_factory("detection_cvpr_2019").class_range

    dataset = NuScenesFrames(records, config.image_size, ImageNormalization.of(config))
    runner = SceneRunner(detector, settings, seed=seed)
    scene_of = {i: s for s in pending for i in scenes[s][1]}
    indices = [i for s in pending for i in scenes[s][1]]
    from tqdm import tqdm

    desc = "eval" if not shard.distributed else f"eval (process {shard.rank} of {shard.world_size})"
    bar = tqdm(total=len(indices), unit="frame", desc=desc, disable=not (progress and shard.is_main))
    collected, current = None, None
    try:
        for batch in frame_loader(dataset, indices, workers):
            index = int(batch["index"])
            scene = scene_of[index]
            if scene != current:
                runner.start_scene()
                current, position = scene, 0
                collected = {s.name: {f: [] for f in (*BOX_FIELDS, "sample", "decoder_ms", "total_ms")}
                             for s in settings}  # fmt: skip
            record = records[index]
            for name, res in runner(batch).items():
                boxes = _global_boxes(res.detections, record, class_range)
                c = collected[name]
                for f in BOX_FIELDS:
                    c[f].append(boxes[f])
                c["sample"].append(np.full(len(boxes["score"]), position, dtype=np.int64))
                c["decoder_ms"].append(res.decoder_ms)
                c["total_ms"].append(res.total_ms)
                c["keys_per_layer"] = res.keys_per_layer
            position += 1
            bar.update(1)
            if position == len(scenes[scene][1]):  # the scene is complete: keep it
                name = scenes[scene][0]
                _save_scene(_scene_path(out, name), samples_of[name], settings, collected)
    finally:
        bar.close()
    barrier(shard)
    if not shard.is_main:
        return None
    info = {**identity, "samples": len(records), "scenes": len(scenes), "overlapping_scenes": overlapping,
            "processes": shard.world_size}  # fmt: skip
    return _score(nusc, out, eval_set, scenes, samples_of, settings, info)


def _global_boxes(det, record, class_range: dict) -> dict[str, np.ndarray]:
    from .submission import global_detection_boxes

    return global_detection_boxes(
        det.boxes.numpy(),
        det.scores.numpy(),
        det.labels.numpy(),
        record.lidar2ego_rotation,
        record.lidar2ego_translation,
        record.ego2global_rotation,
        record.ego2global_translation,
        class_range,
    )


def _score(nusc, out, eval_set, scenes, samples_of, settings, info):
    """Read every scene back, write each setting's submission, score it with DetectionEval."""
    from ..files import write_json_atomic

    stored = {name: _load_scene(_scene_path(out, name), samples_of[name], settings) for name, _ in scenes}
    order = [token for name, _ in scenes for token in samples_of[name]]
    scores = []
    for s in settings:
        boxes, decoder_ms, total_ms, keys = {}, [], [], []
        for name, _ in scenes:
            data = stored[name][s.name]
            for position, token in enumerate(samples_of[name]):
                rows = data["sample"] == position
                boxes[token] = {f: data[f][rows] for f in BOX_FIELDS}
            decoder_ms += data["decoder_ms"].tolist()
            total_ms += data["total_ms"].tolist()
            keys = data["keys_per_layer"].tolist()
        folder = out / s.name
        folder.mkdir(parents=True, exist_ok=True)
        _write_submission(folder / SUBMISSION_FILE, order, boxes)
        summary = _detection_eval(nusc, folder / SUBMISSION_FILE, eval_set, out)
        write_json_atomic(folder / SUMMARY_FILE, summary)
        scores.append(
            SettingScore(
                name=s.name,
                method=s.method,
                r=s.r,
                n=s.n,
                k=s.k,
                mAP=float(summary["mean_ap"]),
                NDS=float(summary["nd_score"]),
                tp_errors={k: float(v) for k, v in summary["tp_errors"].items()},
                class_ap={k: float(v) for k, v in summary["mean_dist_aps"].items()},
                e2e_ms=statistics.median(total_ms),
                decoder_ms=statistics.median(decoder_ms),
                decoder_speedup=None,
                keys_per_layer=keys,
                frames=len(decoder_ms),
                submission=str(folder / SUBMISSION_FILE),
                label_tp_errors=summary["label_tp_errors"],
            )
        )
    dense = next((sc for sc in scores if sc.method is None), None)
    for sc in scores:  # None without a dense setting to compare with
        sc.decoder_speedup = dense.decoder_ms / sc.decoder_ms if dense is not None else None
    write_json_atomic(out / RESULTS_FILE, {"run": info, "results": [asdict(sc) for sc in scores]})
    return scores, info


# ------------------------------------------------------------------ command line (`tggbc eval --model`)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `tggbc eval` takes for a published detector (beside the small detector's)."""
    from ..cli import existing_dir, image_size_argument, nonnegative_int

    group = parser.add_argument_group("published detectors (--model; see docs/nuscenes.md)")
    group.add_argument(
        "--model", default=None, help="a published config name or alias: score it on nuScenes (with --weights)"
    )
    group.add_argument("--dataroot", type=existing_dir, default=None, metavar="DIR", help="the nuScenes dataroot")
    group.add_argument(
        "--version",
        default="v1.0-trainval",
        help="nuScenes table version: v1.0-trainval or v1.0-mini (default %(default)s)",
    )
    group.add_argument(
        "--image-size", type=image_size_argument, default=None, metavar="HxW",
        help="network input size instead of the config's (quick trials; the published numbers use the config's)",
    )  # fmt: skip
    group.add_argument(
        "--workers", type=nonnegative_int, default=4, help="image decoding processes per evaluating process (default 4)"
    )


def run_model(args: argparse.Namespace, small_defaults: dict) -> int:
    """`tggbc eval --model NAME ...`; `small_defaults` are the small detector's option defaults,
    which must be left alone here."""
    from ..cli import apply_threads
    from ..models.checkpoint import load_converted
    from ..models.configs import published_config
    from ..models.detectors import build_detector
    from .distributed import current_shard, finish
    from .reader import check_dataroot, eval_set_name

    for option, default in small_defaults.items():
        if getattr(args, option.lstrip("-").replace("-", "_")) != default:
            raise ValueError(f"{option} is the small detector's option; drop it with --model")
    if args.weights is None:
        raise ValueError("--model needs --weights FILE: the .safetensors file `tggbc convert` wrote for it")
    if args.dataroot is None:
        raise ValueError("--model needs --dataroot DIR (a nuScenes dataroot)")
    if args.r is None and args.n != 1:
        raise ValueError("--n needs --r (without --r the model's published r, n, k are used)")
    config = published_config(args.model)
    check_dataroot(args.dataroot, args.version)
    eval_set_name(args.version, args.split)
    methods = [m.strip() for m in (args.methods or ",".join(DEFAULT_METHODS)).split(",") if m.strip()]
    settings = model_settings(config, methods, r=args.r, n=None if args.r is None else args.n, k=args.k)
    apply_threads(args)
    shard = current_shard(args.device)
    try:
        device = f"cuda:{shard.local_rank}" if shard.distributed and args.device.startswith("cuda") else args.device
        sizes = {} if args.image_size is None else {"image_size": tuple(args.image_size)}
        detector = build_detector(config, pruner=None, **sizes)
        load_converted(detector, args.weights)
        detector = detector.to(device).eval().requires_grad_(False)
        num_keys, layers = detector.config.num_keys, len(detector.decoder.layers)
        for s in settings:  # an impossible setting (r >= keys, ...) fails before any image is read
            s.check(num_keys, layers)
        result = evaluate_model(
            detector,
            args.dataroot,
            version=args.version,
            split=args.split,
            settings=settings,
            out=args.out,
            weights=args.weights,
            workers=args.workers,
            seed=args.seed,
            force=args.force,
            progress=not args.quiet,
            shard=shard,
        )
        if result is not None:
            scores, info = result
            h, w = info["image_size"]
            title = (
                f"{info['model']} ({w}x{h}, {num_keys} keys) on {info['version']} {info['split']}: {info['samples']} "
                f"samples in {info['scenes']} scenes; {shard.world_size} process(es), device {args.device}"
            )
            print(format_scores(scores, title))
            print(f"wrote {Path(args.out) / RESULTS_FILE} and each setting's submission and metrics_summary.json")
    finally:
        finish(shard)
    return 0
