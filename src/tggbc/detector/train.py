"""`tggbc train`: train the synthetic-scene detector; its defaults are the shipped recipe.

    tggbc train --data data/train* --out runs/detector

The backbone starts from a pretrained file and stays frozen: its features are computed once and
cached (see `frames.py`). The position embedding and the decoder train with Hungarian matching,
focal and L1 losses on every layer, and denoising queries. A checkpoint (model, optimiser, data
order, recipe) is written atomically every `checkpoint_every` iterations and at the end; `--resume`
continues from it with the recipe it stores. A loss log (CSV) sits beside it, and the weights of
the last iteration are written to OUT/detector.safetensors.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..files import TEMP_PREFIX, prepare_output_dir, write_atomic
from .config import DetectorConfig, TrainConfig
from .denoise import denoising_queries
from .frames import cached_features, frame_targets
from .loss import detection_loss
from .model import Detector
from .weights import read_tensors, save_detector

WEIGHTS_NAME = "detector.safetensors"
# The shipped pretraining: the earlier two-stage detector of docs/history (backbone, position
# embedding and decoder layers trained on these scenes).
PRETRAINED = Path(__file__).resolve().parent.parent / "weights" / "pretrained.safetensors"
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "loss.csv"
# What a run takes from its --init file: everything but the queries (content and anchors), which
# the pretrained two-stage detector did not have.
INIT_PREFIXES = (
    "backbone.",
    "position.",
    "decoder.layers.",
    "decoder.final_norm.",
    "decoder.cls_branches.",
    "decoder.reg_branches.",
    "decoder.query_embedding.",
)


class TrainingFrames:
    """The train frames of one or more dataroots: cached backbone features, geometry and targets."""

    def __init__(self, model: Detector, dataroots: Sequence[str | Path], progress: bool = True):
        from ..data.frames import list_frames

        if not dataroots:
            raise ValueError("need at least one dataroot")
        self.features: list[np.ndarray] = []  # one memory map per dataroot, [F_i, N, C, h, w]
        self.lidar2img, self.labels, self.boxes, self.where = [], [], [], []
        tokens = set()
        for i, root in enumerate(dataroots):
            frames = list_frames(root, "train")
            if not frames:
                raise ValueError(f"{root} has no train frames")
            for f in frames:
                if f.sample_token in tokens:
                    raise ValueError(f"the dataroots share frame {f.sample_token}: give each dataroot once")
                tokens.add(f.sample_token)
            self.features.append(cached_features(model, root, "train", frames, progress=progress))
            for j, f in enumerate(frames):
                labels, boxes = frame_targets(f)
                self.labels.append(labels)
                self.boxes.append(boxes)
                self.lidar2img.append(torch.from_numpy(f.lidar2img))
                self.where.append((i, j))

    def __len__(self) -> int:
        return len(self.where)

    def batch(self, index: Sequence[int]):
        """(features [B, N, C, h, w] float32, lidar2img [B, N, 4, 4], labels, boxes) of frames `index`."""
        feats = torch.stack(
            [torch.from_numpy(np.array(self.features[i][j])) for i, j in (self.where[k] for k in index)]
        )
        return (
            feats.float(),
            torch.stack([self.lidar2img[k] for k in index]),
            [self.labels[k] for k in index],
            [self.boxes[k] for k in index],
        )


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `train`, read without unpickling code; a damaged one is named."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files raise a variety of errors
        raise ValueError(f"{path} is not a readable tggbc checkpoint ({type(e).__name__}: {e})") from None
    needed = {"model", "dn_content", "optimizer", "generator", "iteration", "config", "train"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise ValueError(f"{path} is not a tggbc training checkpoint (needs {sorted(needed)})")
    return state


def learning_rate(iteration: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak."""
    if iteration < cfg.warmup:
        return cfg.lr * (iteration + 1) / cfg.warmup
    progress = min((iteration - cfg.warmup) / max(cfg.iterations - cfg.warmup, 1), 1.0)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def load_init(model: Detector, path: str | Path, prefixes: Sequence[str]) -> list[str]:
    """Copy the tensors of a weights file whose names start with `prefixes` into `model`.

    Every model tensor under those prefixes must be in the file with its shape. Returns the names
    of the model's tensors that keep their initialisation.
    """
    tensors = read_tensors(path, any_format=True)[1]
    expected = model.state_dict()
    wanted = [k for k in expected if k.startswith(tuple(prefixes))]
    missing = [k for k in wanted if k not in tensors]
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}" for k in wanted
             if k in tensors and tensors[k].shape != expected[k].shape]  # fmt: skip
    if missing or wrong:
        raise ValueError(f"{path} does not fit this detector under {list(prefixes)}: {(missing + wrong)[:3]}")
    model.load_state_dict({k: tensors[k].to(expected[k].dtype) for k in wanted}, strict=False)
    return sorted(set(expected) - set(wanted))


def train(
    data: Sequence[str | Path],
    out: str | Path,
    cfg: TrainConfig | None = None,
    *,
    overrides: dict | None = None,
    init: str | Path,
    init_prefixes: Sequence[str] = INIT_PREFIXES,
    config: DetectorConfig = DetectorConfig(),
    resume: bool = False,
    minutes: float | None = None,
    stop_at: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Train; returns the path of the weights written at the end. See the module docstring.

    `cfg` is the recipe (default: `TrainConfig()`); `overrides` sets some of its fields. A resumed
    run keeps the recipe its checkpoint stores: a `cfg` or `overrides` that differ are refused.
    `minutes` and `stop_at` end the run early (after that wall time, or once `stop_at` iterations
    are done) with a checkpoint, leaving the recipe and its learning-rate schedule as they are.
    """
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"--stop-at must be a positive iteration, got {stop_at}")
    out = Path(out)
    checkpoint_path = out / CHECKPOINT_NAME
    overrides = dict(overrides or {})
    state = None
    if resume:
        if not checkpoint_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}; start the run without --resume")
        state = load_checkpoint(checkpoint_path)
        config = DetectorConfig.from_dict(state["config"])
        stored = TrainConfig.from_dict(state["train"])
        asked = {**(cfg.to_dict() if cfg is not None else {}), **overrides}
        changed = [f"{k}={getattr(stored, k)!r} (asked {v!r})" for k, v in asked.items() if getattr(stored, k) != v]
        if changed:
            raise ValueError(f"{checkpoint_path} was trained with {', '.join(changed)}: resume with its own recipe")
        cfg = stored
    else:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out} is a file; give a directory")
        if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(TEMP_PREFIX)):
            raise FileExistsError(f"--out {out} is not empty: pass --resume to continue its run, or choose another")
        cfg = TrainConfig.from_dict({**(cfg or TrainConfig()).to_dict(), **overrides})
    prepare_output_dir(out, force=True, what="--out")  # writable, and a killed run's leftovers removed

    torch.manual_seed(cfg.seed)
    model = Detector(config)
    if state is None:
        fresh = load_init(model, init, init_prefixes)
        print(f"started from {init} ({', '.join(init_prefixes)}); new: {', '.join(fresh)}")
    else:
        model.load_state_dict(state["model"])
    model.backbone.requires_grad_(False).eval()  # frozen: its features are cached
    device = torch.device(device)
    model.to(device)
    frames = TrainingFrames(model, [str(d) for d in data], progress=progress)

    # Denoising queries start from one learned content vector; it is training-only state.
    dn_content = torch.nn.Parameter(torch.zeros(config.embed_dims, device=device))
    params = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    optimizer = torch.optim.AdamW([*params, dn_content], lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if state is not None:
        dn_content.data.copy_(state["dn_content"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start = state["iteration"]
        print(f"resumed from {checkpoint_path} at iteration {start}")

    out.mkdir(parents=True, exist_ok=True)  # only now: bad data or init files leave no empty run behind
    log_path = out / LOG_NAME
    if state is None:
        log_path.write_text("iteration,seconds,lr,loss,cls,box,dn_cls,dn_box\n")
    elif log_path.is_file():  # drop the rows a killed run logged after its last checkpoint
        header, *rows = log_path.read_text().splitlines()
        kept = [row for row in rows if row.split(",", 1)[0].isdigit() and int(row.split(",", 1)[0]) <= start]
        write_atomic(log_path, lambda tmp: Path(tmp).write_text("\n".join([header, *kept]) + "\n"))

    def save(iteration: int) -> None:
        payload = {
            "model": model.state_dict(),
            "dn_content": dn_content.detach().clone(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "iteration": iteration,
            "config": config.to_dict(),
            "train": cfg.to_dict(),
        }
        write_atomic(checkpoint_path, lambda tmp: torch.save(payload, tmp))
        # The weights too, so a run can be scored while it trains.
        save_detector(model, out / WEIGHTS_NAME, extra={"iteration": iteration, "train": cfg.to_dict()})

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=start, desc="train", unit="it")
    began = time.time()
    model.position.train()
    model.decoder.train()
    pc_range = model.decoder.pc_range
    iteration = start
    with open(log_path, "a") as log:
        while iteration < cfg.iterations:
            if stop_at is not None and iteration >= stop_at:
                print(f"stopped at iteration {iteration} (--stop-at)")
                break
            if minutes is not None and time.time() - began > minutes * 60:
                print(f"time budget of {minutes} min reached at iteration {iteration}")
                break
            index = torch.randint(len(frames), (cfg.batch,), generator=generator).tolist()
            features, lidar2img, labels, boxes = frames.batch(index)
            features, lidar2img = features.to(device), lidar2img.to(device)
            labels, boxes = [t.to(device) for t in labels], [t.to(device) for t in boxes]
            dn = denoising_queries(labels, boxes, dn_content, config.num_queries, pc_range, cfg, generator)
            lr = learning_rate(iteration, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            keys = model.keys(features, lidar2img)
            output = model.decode(
                keys,
                extra_query=None if dn is None else dn.query,
                extra_reference_points=None if dn is None else dn.reference_points,
                self_attn_mask=None if dn is None else dn.self_attn_mask,
            )
            loss, parts = detection_loss(output.cls_scores, output.bbox_preds, labels, boxes, dn)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss became {value} at iteration {iteration}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*params, dn_content], cfg.grad_clip)
            optimizer.step()
            iteration += 1
            log.write(
                f"{iteration},{time.time() - began:.1f},{lr:.3e},{value:.4f},{parts['cls']:.4f},{parts['box']:.4f},"
                f"{parts['dn_cls']:.4f},{parts['dn_box']:.4f}\n"
            )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.2f}", cls=f"{parts['cls']:.3f}", box=f"{parts['box']:.3f}")
            if iteration % cfg.checkpoint_every == 0:
                log.flush()
                save(iteration)
    if bar is not None:
        bar.close()
    save(iteration)
    return out / WEIGHTS_NAME


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import (
        add_threads_argument,
        device_argument,
        existing_dir,
        existing_file,
        float_between,
        nonnegative_int,
        positive_int,
    )

    defaults = TrainConfig()
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        type=existing_dir,
        metavar="DIR",
        help="dataroots written by `tggbc data synth`; their train frames are pooled",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory (new, or with --resume its own)")
    parser.add_argument(
        "--iterations", type=positive_int, default=None, help=f"optimiser steps (default {defaults.iterations})"
    )
    parser.add_argument("--batch", type=positive_int, default=None, help=f"frames per step (default {defaults.batch})")
    parser.add_argument(
        "--lr",
        type=float_between(0, 1, low_open=True),
        default=None,
        help=f"peak learning rate (default {defaults.lr})",
    )
    parser.add_argument(
        "--seed", type=nonnegative_int, default=None, help=f"data order and initialisation (default {defaults.seed})"
    )
    parser.add_argument(
        "--init",
        type=existing_file,
        default=str(PRETRAINED),
        metavar="FILE",
        help="pretrained tensors (backbone, position embedding, decoder layers); default: the shipped pretrained file",
    )
    parser.add_argument("--resume", action="store_true", help="continue OUT's run with the recipe it stored")
    parser.add_argument(
        "--minutes",
        type=float_between(0, 1e6, low_open=True),
        default=None,
        help="stop cleanly, checkpoint written, after this wall time",
    )
    parser.add_argument(
        "--stop-at",
        type=positive_int,
        default=None,
        metavar="ITERATION",
        help="stop cleanly, checkpoint written, once this many iterations are done (the schedule unchanged)",
    )
    parser.add_argument("--device", type=device_argument, default="cpu", help="cpu or cuda (default cpu)")
    add_threads_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..cli import apply_threads

    apply_threads(args)
    given = {k: getattr(args, k) for k in ("iterations", "batch", "lr", "seed") if getattr(args, k) is not None}
    weights = train(args.data, args.out, overrides=given, init=args.init, resume=args.resume, minutes=args.minutes,
                    stop_at=args.stop_at, device=args.device, progress=not args.quiet)  # fmt: skip
    print(f"weights: {weights}")
    return 0
