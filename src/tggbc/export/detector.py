"""A whole published detector as one ONNX graph, with tgGBC inside, checked over consecutive frames.

    detector = build_detector("stream_petr_r50_flash_704_bs2_seq_24e"); load_converted(detector, FILE)
    export_detector_onnx(detector, "streampetr.onnx")                 # its published r, n, k
    compare_detector_onnx("streampetr.onnx", detector, consecutive_frames(detector, 3))

    tggbc export --model stream_petr_r50_flash_704_bs2_seq_24e --weights FILE --out streampetr.onnx

In the graph: backbone and neck, the key side with its 3D position embedding, the decoder with
tgGBC's selection between layers, the branches, and NMS-free box decoding in static form (the
`max_num` best (query, class) pairs with a `valid` flag for the centre range instead of dropping
rows). StreamPETR's memory is explicit: the previous frame's state goes in as state_* inputs and
the next one comes out as next_state_* outputs (TemporalState fields, same shapes); a scene starts
with `TemporalState.empty` and prev_exists = 0. Two inverses are inputs because ONNX has no matrix
inverse: img2lidar (= inverse of lidar2img, float32) and ego_pose_inv (the data pipeline's).

Only the published inference path is exported: aux_2d_only=True (the FocalHead does not run).

Imports torch and tggbc at load time; onnx and onnxruntime inside the functions that use them.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..models.coder import denormalize_bbox
from ..models.state import TemporalState, rigid_inverse
from ..prune import prune_schedule
from ..pruner import pruning
from .onnx import DEFAULT_OPSET, export_module, onnxruntime_session, require, to_numpy
from .static import STATE_FIELDS, StaticKeyPruner

__all__ = [
    "DetectorComparison",
    "ExportedDetector",
    "compare_detector_onnx",
    "consecutive_frames",
    "decode_static",
    "detector_feeds",
    "export_detector_onnx",
    "state_from_outputs",
]


def decode_static(coder, cls_scores: Tensor, bbox_preds: Tensor) -> tuple[Tensor, ...]:
    """NMSFreeCoder.get_bboxes with static shapes: nothing is dropped, a `valid` flag says what would be.

    Args:
        coder: the head's NMSFreeCoder (max_num, post_center_range, score_threshold).
        cls_scores: [B, Nq, C] last-layer logits; bbox_preds: [B, Nq, code_size] (centres in metres).
    Returns:
        boxes [B, K, 9] (z at the bottom centre), scores [B, K], labels [B, K] int64, query [B, K]
        int64 (the query each box comes from), valid [B, K] bool; K = max_num, best first.
        `boxes[b][valid[b]]` equals the eager Detections of sample b.
    """
    num_classes = cls_scores.shape[-1]
    scores, index = cls_scores.sigmoid().flatten(1).topk(coder.max_num, dim=1)  # (B, K)
    labels = index % num_classes
    query = torch.div(index, num_classes, rounding_mode="floor")
    code = bbox_preds.gather(1, query.unsqueeze(-1).expand(-1, -1, bbox_preds.shape[-1]))
    boxes = denormalize_bbox(code)  # (B, K, 9)
    bounds = torch.tensor(coder.post_center_range, dtype=boxes.dtype, device=boxes.device)
    valid = (boxes[..., :3] >= bounds[:3]).all(-1) & (boxes[..., :3] <= bounds[3:]).all(-1)
    if coder.score_threshold:  # as the original: 0 and None mean no threshold
        valid = valid & (scores >= coder.score_threshold)
    bottom = boxes[..., 2:3] - boxes[..., 5:6] * 0.5  # gravity centre -> bottom centre, as get_bboxes
    boxes = torch.cat([boxes[..., :2], bottom, boxes[..., 3:]], dim=-1)
    return boxes, scores, labels, query, valid


class ExportedDetector(nn.Module):
    """A PETRFamilyDetector with a fixed tgGBC setting, taking and returning plain tensors (for export).

    Graph inputs (B batch, N = 6 cameras, H x W padded input, M memory entries, E channels):
        img [B, N, 3, H, W] normalised; lidar2img, img2lidar, intrinsics [B, N, 4, 4].
        StreamPETR also: state_embedding [B, M, E], state_reference_points [B, M, 3],
        state_timestamp [B, M, 1] float64, state_ego_pose [B, M, 4, 4], state_velocity [B, M, 2],
        ego_pose, ego_pose_inv [B, 4, 4], timestamp [B] float64, prev_exists [B].
    Graph outputs:
        boxes [B, K, 9], scores [B, K], labels [B, K], query [B, K], valid [B, K] (see `decode_static`);
        cls_scores [B, Nq, C] and bbox_preds [B, Nq, 10] of the last layer; StreamPETR also
        next_state_* (the new TemporalState).

    Args:
        detector: the PETRFamilyDetector (used as is: eval mode, float32).
        r, n, k: the tgGBC setting; r=0 exports the dense detector.
    """

    def __init__(self, detector, r: int | float | list[int] = 0, n: int = 1, k: int = -1):
        super().__init__()
        if not detector.aux_2d_only:
            raise ValueError("only the published inference path exports: build the detector with aux_2d_only=True")
        config = detector.config
        schedule = prune_schedule(r, n, len(detector.decoder.layers), num_keys=config.num_keys)  # r >= keys fails
        schedule[-1] = 0  # as KeyPruner.reset: nothing reads the keys after the last layer
        self.detector = detector
        self.pruner = StaticKeyPruner(r=r, n=n, k=k) if any(schedule) else None
        # Registered here so the graph names tgGBC's own operators (see tggbc.export.static.KeySelection).
        self.key_selection = self.pruner.selection if self.pruner is not None else None
        self.schedule = schedule
        self.keys_per_layer = [config.num_keys]
        for drop in schedule[:-1]:
            self.keys_per_layer.append(self.keys_per_layer[-1] - drop)
        self.temporal = detector.temporal
        names = ["img", "lidar2img", "img2lidar", "intrinsics"]
        if self.temporal:
            names += [f"state_{f}" for f in STATE_FIELDS] + ["ego_pose", "ego_pose_inv", "timestamp", "prev_exists"]
        self.input_names = names
        outputs = ["boxes", "scores", "labels", "query", "valid", "cls_scores", "bbox_preds"]
        if self.temporal:
            outputs += [f"next_state_{f}" for f in STATE_FIELDS]
        self.output_names = outputs

    def flatten_inputs(self, frame: dict, state: TemporalState | None) -> tuple[Tensor, ...]:
        """One frame (`detector(**frame)` keyword arguments) and the memory before it -> the graph inputs.

        state None starts a scene: an empty memory and prev_exists = 0; otherwise prev_exists = 1.
        img2lidar is the float32 inverse of lidar2img (what the eager key side computes);
        ego_pose_inv is taken from the frame, or the rigid inverse of ego_pose.
        """
        img, lidar2img = frame["img"], frame["lidar2img"]
        out = [img, lidar2img, torch.linalg.inv(lidar2img.float()), frame["intrinsics"]]
        if self.temporal:
            batch = img.shape[0]
            head = self.detector.pts_bbox_head.decoder
            prev = torch.ones(batch) if state is not None else torch.zeros(batch)
            if state is None:
                state = TemporalState.empty(batch, head.memory_len, head.embed_dims, device=img.device)
            ego_pose = frame["ego_pose"]
            ego_pose_inv = frame.get("ego_pose_inv")
            ego_pose_inv = rigid_inverse(ego_pose) if ego_pose_inv is None else ego_pose_inv
            out += [getattr(state, f) for f in STATE_FIELDS]
            out += [ego_pose.float(), ego_pose_inv.float(), frame["timestamp"].double().reshape(batch), prev]
        return tuple(out)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        x = dict(zip(self.input_names, inputs, strict=True))
        detector, head = self.detector, self.detector.pts_bbox_head
        img_feats = detector.extract_img_feat(x["img"])
        pad_shape = tuple(x["img"].shape[-2:])
        keys = head.position(img_feats, x["lidar2img"], x["intrinsics"], pad_shape, img2lidar=x["img2lidar"])
        with pruning(head.decoder, self.pruner, attention="fast") as decoder:
            if self.temporal:
                state = TemporalState(**{f: x[f"state_{f}"] for f in STATE_FIELDS})
                out = decoder(
                    keys.memory,
                    keys.key_pos,
                    state=state,
                    ego_pose=x["ego_pose"],
                    ego_pose_inv=x["ego_pose_inv"],
                    timestamp=x["timestamp"],
                    prev_exists=x["prev_exists"],
                )
            else:
                out = decoder(keys.memory, keys.key_pos)
        cls_scores, bbox_preds = out.cls_scores[-1], out.bbox_preds[-1]
        result = [*decode_static(head.coder, cls_scores, bbox_preds), cls_scores, bbox_preds]
        if self.temporal:
            result += [getattr(out.state, f) for f in STATE_FIELDS]
        return tuple(result)


def consecutive_frames(detector, count: int = 3, batch: int = 1, seed: int = 0) -> list[dict]:
    """`count` frames of one plausible drive (`example_frame` images and cameras; for StreamPETR the
    ego moves 5 m and turns 0.05 rad per frame, 0.5 s apart), as `detector(**frame)` arguments."""
    import math

    from ..models.detectors import example_frame

    frames = []
    for i in range(count):
        frame = example_frame(detector, batch=batch, seed=seed + i)
        if detector.temporal:
            yaw = 0.05 * i
            pose = frame["ego_pose"].clone()
            pose[:, 0, 0], pose[:, 0, 1], pose[:, 1, 0], pose[:, 1, 1] = (
                math.cos(yaw), -math.sin(yaw), math.sin(yaw), math.cos(yaw),
            )  # fmt: skip
            pose[:, 0, 3] += 5.0 * i
            frame["ego_pose"] = pose
            frame["timestamp"] = frame["timestamp"] + 0.5 * i
        frames.append(frame)
    return frames


@dataclass
class DetectorExport:
    """What `export_detector_onnx` wrote."""

    path: str
    model: str
    input_names: list[str]
    output_names: list[str]
    image_size: tuple[int, int]
    keys_per_layer: list[int]
    setting: str
    opset: int
    seconds: float
    size_mb: float


def export_detector_onnx(
    detector,
    path: str | os.PathLike,
    *,
    r: int | float | list[int] | None = None,
    n: int | None = None,
    k: int | None = None,
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    optimize: str = "light",
    verbose: bool = False,
) -> DetectorExport:
    """Export a whole published detector (float32, batch `batch`, its config's image size) to one file.

    Args:
        detector: a PETRFamilyDetector with its weights (it is copied, never modified).
        r, n, k: the tgGBC setting; None takes the config's (its published default); r=0 is dense.
    """
    config = detector.config
    r = config.r if r is None else r
    n = config.n if n is None else n
    k = config.k if k is None else k
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    ExportedDetector(detector, r, n, k)  # a bad setting fails here, before the copy and the trace
    copied = copy.deepcopy(detector).eval().requires_grad_(False).float()
    exported = ExportedDetector(copied, r, n, k)
    (frame,) = consecutive_frames(copied, 1, batch=batch)
    args = exported.flatten_inputs(frame, None)
    setting = "dense" if not any(exported.schedule) else f"tgGBC r={r} n={n} k={k}"
    meta = {
        "tggbc.model": config.name,
        "tggbc.setting": setting,
        "tggbc.image_size": "x".join(map(str, config.image_size)),
        "tggbc.keys_per_layer": ",".join(map(str, exported.keys_per_layer)),
    }
    path, seconds = export_module(
        exported,
        args,
        path,
        input_names=exported.input_names,
        output_names=exported.output_names,
        opset=opset,
        optimize=optimize,
        verbose=verbose,
        metadata=meta,
    )
    return DetectorExport(
        path=path,
        model=config.name,
        input_names=list(exported.input_names),
        output_names=list(exported.output_names),
        image_size=tuple(config.image_size),
        keys_per_layer=list(exported.keys_per_layer),
        setting=setting,
        opset=opset,
        seconds=seconds,
        size_mb=os.path.getsize(path) / 2**20,
    )


def detector_feeds(exported: ExportedDetector, frame: dict, state: TemporalState | None) -> dict:
    """{graph input name: numpy array} of one frame; `state` is the memory before it (None starts a scene)."""
    args = exported.flatten_inputs(frame, state)
    return {name: to_numpy(a) for name, a in zip(exported.input_names, args, strict=True)}


def state_from_outputs(outputs: dict) -> TemporalState:
    """The graph's next_state_* outputs ({name: array}) as a TemporalState for the next frame."""
    return TemporalState(**{f: torch.from_numpy(outputs[f"next_state_{f}"]) for f in STATE_FIELDS})


@dataclass
class DetectorComparison:
    """The graph in ONNX Runtime against the eager detector over consecutive frames.

    max_abs_diff[name]: the largest |graph - eager| of each float output over all frames;
    max_scaled_diff: the largest |graph - eager| / max(1, |eager|) over everything compared (the
    memory's global coordinates and times reach 1e3 - 1e9, where float32 is coarser than 1e-4).
    Outputs that come in score order (decoded boxes, the memory's newest entries) are compared per
    source query, so that two queries whose scores tie within float noise may swap places.
    tied: (query, class) pairs or memory queries found on one side only, all within `tie` of the
    cut-off score (allowed); untied: such pairs away from the cut-off (a real difference).
    """

    max_abs_diff: dict[str, float] = field(default_factory=dict)
    max_scaled_diff: float = 0.0
    tied: int = 0
    untied: int = 0
    frames: int = 0

    def passed(self, tolerance: float = 1e-4) -> bool:
        return self.max_scaled_diff <= tolerance and self.untied == 0

    def _add(self, name: str, have, want) -> None:
        import numpy as np

        have, want = np.asarray(have, dtype=np.float64), np.asarray(want, dtype=np.float64)
        if have.shape != want.shape:
            raise ValueError(f"output {name}: the graph gives shape {have.shape}, PyTorch {want.shape}")
        if not want.size:
            return
        diff = np.abs(have - want)
        self.max_abs_diff[name] = max(self.max_abs_diff.get(name, 0.0), float(diff.max()))
        self.max_scaled_diff = max(self.max_scaled_diff, float((diff / np.maximum(1.0, np.abs(want))).max()))

    def _split(self, only: set, score: dict, cutoff: float, tie: float) -> None:
        for key in only:
            if abs(score[key] - cutoff) <= tie:
                self.tied += 1
            else:
                self.untied += 1


def _nearest(points, centres):
    """For each of the points [K, 3], the index of the nearest of centres [Nq, 3] and its distance."""
    import numpy as np

    d = np.linalg.norm(np.asarray(points, np.float64)[:, None, :] - centres[None], axis=-1)  # (K, Nq)
    return d.argmin(1), d.min(1)


def compare_detector_onnx(path, detector, frames: list[dict], *, r=None, n=None, k=None, threads=None, tie=1e-4):
    """Run `frames` (one scene, in order) through the exported graph and the eager detector.

    Each frame both get the same inputs, the memory included: the eager detector's memory after
    the previous frame (empty with prev_exists = 0 on the first, then prev_exists = 1), so every
    frame checks the graph's memory inputs, its update and its next_state outputs on equal terms.
    The eager side is `detector(**frame)` under a plain KeyPruner at the same setting. Compared:
    every query's last-layer cls_scores and bbox_preds; the decoded boxes per (query, class); the
    next memory, its newest entries per source query (found by their centres) and the rest row by row.

    Returns:
        DetectorComparison.
    """
    import numpy as np

    from ..models.state import transform_points
    from ..pruner import KeyPruner

    require("onnxruntime", purpose="checking exported graphs")
    config = detector.config
    r = config.r if r is None else r
    n = config.n if n is None else n
    k = config.k if k is None else k
    exported = ExportedDetector(detector, r, n, k)
    session = onnxruntime_session(path, threads)
    graph_inputs = [i.name for i in session.get_inputs()]
    if graph_inputs != exported.input_names:
        raise ValueError(f"{path} takes inputs {graph_inputs}, but {config.name} gives {exported.input_names}")
    names = [o.name for o in session.get_outputs()]
    pruner = KeyPruner(r=r, n=n, k=k) if exported.pruner is not None else None
    coder = detector.pts_bbox_head.coder
    result = DetectorComparison()
    state = None
    for frame in frames:
        with torch.inference_mode(), pruning(detector.decoder, pruner, attention="fast"):
            extra = {}
            if detector.temporal:
                prev = torch.full((frame["img"].shape[0],), 0.0 if state is None else 1.0)
                extra = dict(state=state, prev_exists=prev)
            eager = detector(**frame, **extra)
        got = dict(zip(names, session.run(None, detector_feeds(exported, frame, state)), strict=True))
        cls_scores, bbox_preds = eager.cls_scores[-1], eager.bbox_preds[-1]
        result._add("cls_scores", got["cls_scores"], to_numpy(cls_scores))
        result._add("bbox_preds", got["bbox_preds"], to_numpy(bbox_preds))

        # Decoded boxes, matched by (sample, query, class).
        want = [to_numpy(t) for t in decode_static(coder, cls_scores, bbox_preds)]
        have = [got[name] for name in ("boxes", "scores", "labels", "query", "valid")]
        for b in range(cls_scores.shape[0]):
            w_rows = {(int(q), int(c)): i for i, (q, c) in enumerate(zip(want[3][b], want[2][b], strict=True))}
            h_rows = {(int(q), int(c)): i for i, (q, c) in enumerate(zip(have[3][b], have[2][b], strict=True))}
            common = sorted(set(w_rows) & set(h_rows))
            wi, hi = [w_rows[x] for x in common], [h_rows[x] for x in common]
            result._add("boxes", have[0][b][hi], want[0][b][wi])
            result._add("scores", have[1][b][hi], want[1][b][wi])
            if not np.array_equal(have[4][b][hi], want[4][b][wi]):
                result.untied += int((have[4][b][hi] != want[4][b][wi]).sum())
            score = {x: float(want[1][b][w_rows[x]]) for x in w_rows}
            score.update({x: float(cls_scores[b, x[0], x[1]].sigmoid()) for x in h_rows if x not in w_rows})
            result._split(set(w_rows) ^ set(h_rows), score, float(want[1][b][-1]), tie)

        if detector.temporal:
            new = eager.state
            k_new = detector.decoder.topk_proposals
            for f in STATE_FIELDS:  # entries carried over from earlier frames: row by row
                result._add(f"next_state_{f}", got[f"next_state_{f}"][:, k_new:], to_numpy(getattr(new, f))[:, k_new:])
            # The newest entries: which query wrote each, from its centre (decoded box -> global).
            centres = transform_points(bbox_preds[..., :3].float(), frame["ego_pose"].float())  # (B, Nq, 3)
            best = cls_scores.sigmoid().amax(-1)  # (B, Nq)
            for b in range(centres.shape[0]):
                c = to_numpy(centres[b]).astype(np.float64)
                w_src, w_dist = _nearest(to_numpy(new.reference_points[b, :k_new]), c)
                h_src, h_dist = _nearest(np.asarray(got["next_state_reference_points"][b, :k_new]), c)
                if w_dist.max() > 1e-2 * max(1.0, float(np.abs(c).max())) or len(set(w_src)) != k_new:
                    raise ValueError("cannot tell which query wrote each new memory entry (centres coincide)")
                w_rows, h_rows = {int(q): i for i, q in enumerate(w_src)}, {int(q): i for i, q in enumerate(h_src)}
                common = sorted(set(w_rows) & set(h_rows))
                for f in STATE_FIELDS:
                    w = to_numpy(getattr(new, f))[b, :k_new][[w_rows[q] for q in common]]
                    h = np.asarray(got[f"next_state_{f}"])[b, :k_new][[h_rows[q] for q in common]]
                    result._add(f"next_state_{f}", h, w)
                scores = to_numpy(best[b]).astype(np.float64)
                cutoff = float(np.sort(scores)[::-1][k_new - 1])
                result._split(set(w_rows) ^ set(h_rows), {q: scores[q] for q in range(len(scores))}, cutoff, tie)
                result.untied += int(h_dist.max() > 1e-2 * max(1.0, float(np.abs(c).max())))
            state = new
        result.frames += 1
    return result
