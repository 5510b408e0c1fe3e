"""`tggbc train`: train the small PETR detector on generated scenes.

Checkpoints (model, optimiser, schedule position, random state) are written atomically every
`--ckpt-every` iterations and at the end; `--resume` continues from the last one. A loss log
(CSV) sits beside them. `--minutes` bounds the wall time: training stops cleanly, checkpoint
written, when it runs out.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..files import write_atomic
from .augment import jitter_colors
from .dense import dense_loss, dense_targets
from .ema import WeightAverage
from .loss import LossConfig, detection_loss, encode_boxes
from .model import DetectorConfig, PETRDetector

# Boxes the decoder can represent: its centres are decoded into this range.
_XY_LIMIT = 51.2


class FrameSet:
    """All frames of a split of one or more datasets, held in memory: images [F, 6, 3, H, W] uint8
    plus targets. Several datasets (generated with different seeds) give more distinct scenes than
    one: the devkit's split lists cap a dataset at 700 train scenes.
    """

    def __init__(
        self,
        dataroots: str | Path | Sequence[str | Path],
        split: str,
        stride: int,
        num_classes: int,
        progress: bool = True,
    ):
        from ..data.frames import list_frames

        roots = _dataroot_list(dataroots)
        width, height = _common_image_size(roots)
        frames = []
        for root in roots:
            listed = list_frames(root, split)
            if not listed:
                raise ValueError(f"{root} has no {split} frames")
            frames.extend(listed)
        tokens = [f.sample_token for f in frames]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"the dataroots {[str(r) for r in roots]} share frames: each frame must appear once")
        iterator = frames
        if progress:
            from tqdm import tqdm

            iterator = tqdm(frames, desc=f"loading {split} images", unit="frame", leave=False)
        # Filled in place: stacking a list of per-frame tensors would need twice the memory
        # (11,200 frames of 352x128 are 9 GB).
        self.images = torch.empty((len(frames), 6, 3, height, width), dtype=torch.uint8)  # (F, 6, 3, H, W)
        for i, frame in enumerate(iterator):
            self.images[i] = torch.from_numpy(frame.read_images()).permute(0, 3, 1, 2)
            frame.images = None  # keep one copy only
        self.frames = frames
        self.lidar2img = torch.stack([torch.from_numpy(f.lidar2img) for f in frames])  # (F, 6, 4, 4)
        self.labels, self.targets, dense = [], [], []
        for f in frames:
            boxes = torch.from_numpy(f.gt_boxes)
            keep = torch.from_numpy(f.gt_valid) & (boxes[:, :2].abs() < _XY_LIMIT).all(1)
            boxes = boxes[keep]
            self.labels.append(torch.from_numpy(f.gt_labels)[keep])
            self.targets.append(encode_boxes(boxes[:, 0:3], boxes[:, 3:6], boxes[:, 6], boxes[:, 7:9]))
            targets = dense_targets(
                boxes.numpy(), self.labels[-1].numpy(), f.lidar2img, self.image_size, stride, num_classes
            )
            dense.append([torch.from_numpy(t) for t in targets])
        # Dense per-token targets: heatmap [F, N, C, h, w] (half precision: values in [0, 1]),
        # regression [F, N, 3, h, w], regression weight [F, N, h, w].
        self.heatmap = torch.stack([d[0] for d in dense]).half()
        self.regression = torch.stack([d[1] for d in dense])
        self.reg_weight = torch.stack([d[2] for d in dense])

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.images.shape[-1], self.images.shape[-2]


def _dataroot_list(data: str | Path | Sequence[str | Path]) -> list[str | Path]:
    """One dataroot or several, as a list."""
    return [data] if isinstance(data, str | Path) else list(data)


def _common_image_size(roots: Sequence[str | Path]) -> tuple[int, int]:
    """The (W, H) all `roots` were generated at; raises if there are none or they differ."""
    from ..data.splits import read_meta

    if not roots:
        raise ValueError("need at least one dataroot")
    sizes = {str(root): tuple(read_meta(root)["image_size"]) for root in roots}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the dataroots have different image sizes (W, H): {sizes}")
    return next(iter(sizes.values()))


def warm_start(model: PETRDetector, path: str | Path) -> list[str]:
    """Copy into `model` every tensor of a checkpoint.pt or weights file that it has under the same
    name and shape (as float32); the rest keep their initialisation. Returns the names of those.

    Refuses a file sharing no tensor with the model, or one whose shared tensors have other shapes
    (another architecture, not an older version of this one).
    """
    from .weights import read_tensors, shape_mismatches

    path = Path(path)
    if path.suffix == ".safetensors":
        tensors = read_tensors(path)[1]
    else:
        tensors = torch.load(path, map_location="cpu", weights_only=False)["model"]
    expected = model.state_dict()
    wrong = shape_mismatches(tensors, expected)
    shared = [k for k in tensors if k in expected]
    if wrong or not shared:
        raise ValueError(f"{path} does not fit this detector: {wrong[:3] or 'no tensor in common'}")
    model.load_state_dict({k: tensors[k].to(expected[k].dtype) for k in shared}, strict=False)
    return sorted(set(expected) - set(shared))


def learning_rate(iteration: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 1% of base."""
    if iteration < warmup:
        return base * (iteration + 1) / warmup
    progress = min((iteration - warmup) / max(total - warmup, 1), 1.0)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    iterations: int = 6000,
    batch: int = 2,
    lr: float = 3e-4,
    dense_lr: float = 1e-3,
    dense_iterations: int = 0,
    weight_decay: float = 0.01,
    warmup: int = 300,
    minutes: float | None = None,
    ckpt_every: int = 250,
    resume: bool = False,
    seed: int = 0,
    num_queries: int = 300,
    config: dict | None = None,
    init: str | Path | None = None,
    augment: bool = True,
    backbone_grad: float = 0.0,
    quality_focal: bool = False,
    ema: float = 0.0,
    progress: bool = True,
) -> Path:
    """Train; returns the checkpoint path. See the module docstring.

    `data` is one dataroot or several (their train frames are pooled; see `FrameSet`). The image
    size comes from the data; `config` may set other DetectorConfig fields. `init`
    starts a new run from another run's tensors (see `warm_start`); ignored when resuming.
    `augment` jitters the images' colours (see `augment.py`). `backbone_grad` is the share of
    the decoder's gradient that reaches the backbone (see `PETRDetector.inputs`).
    `quality_focal` makes a matched query's class target its box's localisation quality (see
    `LossConfig.quality_focal`). `ema` > 0 also keeps a moving average of the weights with that
    decay (see `ema.py`); the checkpoint holds both, and `tggbc train --weights` writes the average
    unless `--weights-from last`.
    """
    # PETRDetector.inputs checks this too, but only after minutes of loading frames.
    if not 0.0 <= backbone_grad <= 1.0:
        raise ValueError(f"backbone_grad must lie in [0, 1], got {backbone_grad}")
    if not 0 <= dense_iterations < iterations:
        raise ValueError(f"dense_iterations must lie in [0, iterations={iterations}), got {dense_iterations}")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must lie in [0, 1) (0: no average), got {ema}")
    out = Path(out)
    checkpoint_path = out / "checkpoint.pt"
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} is not empty: pass --resume to continue, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    roots = _dataroot_list(data)
    width, height = _common_image_size(roots)
    config = DetectorConfig(
        **{"num_queries": num_queries, **(config or {}), "image_width": width, "image_height": height}
    )
    trainset = FrameSet(roots, "train", config.head_stride, config.num_classes, progress=progress)

    torch.manual_seed(seed)
    model = PETRDetector(config)
    # Two groups: the backbone and dense head (a CNN from scratch: a higher rate), and the rest
    # (position encoder, query projection, decoder), which starts after `dense_iterations`.
    dense_params = [*model.backbone.parameters(), *model.head.parameters()]
    dense_ids = {id(p) for p in dense_params}
    rest = [p for p in model.parameters() if id(p) not in dense_ids]
    optimizer = torch.optim.AdamW(
        [{"params": dense_params, "name": "dense"}, {"params": rest, "name": "decoder"}],
        lr=lr,
        weight_decay=weight_decay,
    )
    start, generator = 0, torch.Generator().manual_seed(seed)
    resuming = resume and checkpoint_path.exists()
    if init is not None and not resuming:
        fresh = warm_start(model, init)
        print(f"started from {init}; {len(fresh)} tensors new: {', '.join(fresh) or 'none'}")
    # What the loss and the gradients depend on besides the config: a resumed run must keep them,
    # or it silently trains another objective from the iteration it resumes at (or, for `ema`,
    # silently mixes two averages in one).
    options = {"quality_focal": quality_focal, "backbone_grad": backbone_grad, "augment": augment, "ema": ema}
    if resuming:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if DetectorConfig.from_dict(state["config"]) != config:
            raise ValueError(f"{checkpoint_path} was trained with another config: {state['config']}")
        stored = state.get("options", {})  # checkpoints before this check stored none
        changed = {k: (v, options[k]) for k, v in stored.items() if k in options and v != options[k]}
        if changed:
            said = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
            raise ValueError(f"{checkpoint_path} was trained with {said}: resume with the same options")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["iteration"]
        generator.set_state(state["generator"])
        print(f"resumed from {checkpoint_path} at iteration {start}")
    average = WeightAverage(model, ema) if ema > 0 else None
    if average is not None and resuming and "ema" in state:
        average.load_state_dict(state["ema"])
    loss_cfg = LossConfig(quality_focal=quality_focal)
    log_path = out / "loss.csv"
    if not log_path.exists():
        log_path.write_text("iteration,seconds,loss,cls,box,heatmap,depth,lr\n")

    def save(iteration: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": iteration,
            "generator": generator.get_state(),
            "config": config.to_dict(),
            "options": options,
            **({"ema": average.state_dict()} if average is not None else {}),
        }
        write_atomic(checkpoint_path, lambda tmp: torch.save(state, tmp))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=iterations, initial=start, desc="train", unit="it")
    began = time.time()
    model.train()
    iteration = start
    with open(log_path, "a") as log:
        while iteration < iterations:
            if minutes is not None and time.time() - began > minutes * 60:
                print(f"time budget of {minutes} min reached at iteration {iteration}")
                break
            index = torch.randint(len(trainset), (batch,), generator=generator)
            images, lidar2img = trainset.images[index], trainset.lidar2img[index]
            labels = [trainset.labels[i] for i in index.tolist()]
            targets = [trainset.targets[i] for i in index.tolist()]
            dense_target = (trainset.heatmap[index].float(), trainset.regression[index], trainset.reg_weight[index])
            if augment:
                images = jitter_colors(images.float() / 255.0, generator)
            dense_group, decoder_group = optimizer.param_groups
            dense_group["lr"] = learning_rate(iteration, iterations, dense_lr, warmup)
            joint = iteration >= dense_iterations
            decoder_group["lr"] = (
                learning_rate(iteration - dense_iterations, iterations - dense_iterations, lr, warmup) if joint else 0.0
            )
            if joint:
                inputs = model.inputs(images, lidar2img, backbone_grad)
                heatmap, regression = inputs.heatmap, inputs.regression
                output = model.decode(inputs)
                loss, parts = detection_loss(output.cls_scores, output.bbox_preds, labels, targets, loss_cfg)
            else:  # the dense head alone: 2.5x cheaper per iteration
                _, heatmap, regression = model.dense(images, lidar2img)
                loss, parts = heatmap.new_zeros(()), {"cls": float("nan"), "box": float("nan")}
            heat_loss, reg_loss = dense_loss(heatmap, regression, *dense_target)
            loss = loss + heat_loss + reg_loss
            heat_value, reg_value = float(heat_loss.detach()), float(reg_loss.detach())
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at iteration {iteration}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
            optimizer.step()
            if average is not None:
                average.update(model)
            iteration += 1
            log.write(
                f"{iteration},{time.time() - began:.1f},{loss_value:.4f},{parts['cls']:.4f},{parts['box']:.4f},"
                f"{heat_value:.4f},{reg_value:.4f},{decoder_group['lr']:.3e}\n"
            )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_value:.3f}",
                    cls=f"{parts['cls']:.3f}",
                    box=f"{parts['box']:.3f}",
                    heat=f"{heat_value:.3f}",
                )
            if iteration % ckpt_every == 0:
                log.flush()
                save(iteration)
    if bar is not None:
        bar.close()
    save(iteration)
    return checkpoint_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="DIR",
        help="dataroot(s) written by `tggbc data synth` (with different seeds); their train frames are pooled",
    )
    parser.add_argument("--out", required=True, help="directory for checkpoint.pt and loss.csv")
    parser.add_argument("--iterations", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of the decoder")
    parser.add_argument("--dense-lr", type=float, default=1e-3, help="peak learning rate of backbone and dense head")
    parser.add_argument(
        "--dense-iterations",
        type=int,
        default=0,
        help="train only backbone and dense head for this many iterations first",
    )
    parser.add_argument("--warmup", type=int, default=300, help="warm-up iterations")
    parser.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this wall time")
    parser.add_argument("--ckpt-every", type=int, default=250)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument(
        "--fine-head", action="store_true", help="dense head on a stride-8 grid (the keys stay at stride 16)"
    )
    parser.add_argument(
        "--detail-head",
        action="store_true",
        help="with --fine-head: a deeper head trunk that also reads the stride-4 stage (DetectorConfig.detail_head)",
    )
    parser.add_argument(
        "--ground-contact",
        action="store_true",
        help="with --detail-head: also regress each object's ground contact row and fuse the depth where its"
        " ray meets the road with the direct one (DetectorConfig.ground_contact)",
    )
    parser.add_argument(
        "--proposal-class",
        action="store_true",
        help="peak queries also carry the dense head's class logits at their cell (DetectorConfig.proposal_class)",
    )
    parser.add_argument(
        "--dense-score-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="detection score sigmoid(decoder)^(1-W) * sigmoid(dense head)^W, stored with the model (0: decoder only)",
    )
    parser.add_argument(
        "--class-peak-threshold",
        type=float,
        default=None,
        metavar="T",
        help="cells where one class alone peaks with probability >= T also propose queries, stored with the model",
    )
    parser.add_argument("--no-augment", action="store_true", help="no colour jitter (runs 1-4 trained without)")
    parser.add_argument(
        "--backbone-grad",
        type=float,
        default=0.0,
        metavar="S",
        help="share of the decoder's gradient that reaches the backbone, 0 (detached, default) to 1",
    )
    parser.add_argument(
        "--quality-focal",
        action="store_true",
        help="a matched query's class target is its box's localisation quality, not 1 (LossConfig.quality_focal)",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="also keep a moving average of the weights with this decay (e.g. 0.999) in the checkpoint",
    )
    parser.add_argument(
        "--weights-from",
        choices=("average", "last"),
        default="average",
        help="what --weights writes when the run keeps an --ema average: the average (default) or the last weights",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument(
        "--init", default=None, help="start from the matching tensors of another run's checkpoint.pt or weights file"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--weights", default=None, help="also write the final model here (safetensors, float16)")
    parser.add_argument("--force", action="store_true", help="replace an existing --weights file")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.weights and os.path.exists(args.weights) and not args.force:
        raise FileExistsError(f"{args.weights} exists: pass --force to replace it")
    path = train(
        args.data,
        args.out,
        iterations=args.iterations,
        batch=args.batch,
        lr=args.lr,
        dense_lr=args.dense_lr,
        dense_iterations=args.dense_iterations,
        warmup=args.warmup,
        minutes=args.minutes,
        ckpt_every=args.ckpt_every,
        resume=args.resume,
        seed=args.seed,
        num_queries=args.queries,
        config={
            "fine_head": args.fine_head,
            "detail_head": args.detail_head,
            "ground_contact": args.ground_contact,
            "proposal_class": args.proposal_class,
            "dense_score_weight": args.dense_score_weight,
            "class_peak_threshold": args.class_peak_threshold,
        },
        init=args.init,
        augment=not args.no_augment,
        backbone_grad=args.backbone_grad,
        quality_focal=args.quality_focal,
        ema=args.ema,
        progress=not args.quiet,
    )
    print(f"checkpoint: {path}")
    if args.weights:
        from .weights import save_detector

        state = torch.load(path, map_location="cpu", weights_only=False)
        model = PETRDetector(DetectorConfig.from_dict(state["config"]))
        # At the end of a cosine schedule the last weights can beat their lagging average: the
        # choice is the user's, made on held-out scenes (README, run 16).
        average = "ema" in state and args.weights_from == "average"
        model.load_state_dict(state["ema"]["state"] if average else state["model"])
        extra = {"iteration": state["iteration"], **({"ema": state["ema"]["decay"]} if average else {})}
        save_detector(model, args.weights, extra=extra)
        print(f"weights: {args.weights}")
    return 0
