"""Load the decoder and head of published PETR / StreamPETR / FocalPETR checkpoints, and back.

The published checkpoints are mmdet3d state dicts (often wrapped as {"state_dict": ...}); the
head lives under `pts_bbox_head.`. These functions rename its decoder + head parameters onto
`PETRDecoder` / `StreamPETRDecoder` / `FocalPETRDecoder` and its key-side parameters onto
`PETRPositionEmbedding` / `StreamPETRPositionEmbedding`. Everything else (backbone, neck, the 2D
auxiliary head, the head's constant tensors) is returned in `unused`, never dropped silently.

Decoder names (head prefix `pts_bbox_head.` left out; i = layer, j = index in a Sequential):

    original                                                  ours
    transformer.decoder.layers.i.attentions.0.attn.*         layers.i.self_attn.*
    transformer.decoder.layers.i.attentions.1.attn.*         layers.i.cross_attn.*
        (* = in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias)
    transformer.decoder.layers.i.norms.{0,1,2}.*              layers.i.norm{1,2,3}.*
    transformer.decoder.layers.i.ffns.0.layers.0.0.*          layers.i.linear1.*
    transformer.decoder.layers.i.ffns.0.layers.1.*            layers.i.linear2.*
    transformer.decoder.post_norm.*                           final_norm.*
    cls_branches.i.j.*, reg_branches.i.j.*                    (same)
    reference_points.weight                                   (same)
    query_embedding.j.*                                       query_embedding.mlp.j.*
  StreamPETR only:
    pseudo_reference_points.weight, time_embedding.j.*        (same)
    ego_pose_pe.{reduce.0,gamma,beta}.*                       (same)
    ego_pose_memory.{reduce.0,gamma,beta}.*                   (same)

Key-side names:

    PETR: input_proj.*, position_encoder.j.*, adapt_pos3d.j.*                       (same)
    StreamPETR / FocalPETR: position_encoder.j.*, memory_embed.j.*,
        spatial_alignment.{reduce.0,gamma,beta}.*                                     (same)
        featurized_pe.conv_reduce.*                           featurized_pe.reduce.*
        featurized_pe.conv_expand.*                           featurized_pe.expand.*

Older checkpoints name the attentions `self_attn` / `multihead_attn` and the final norm
`decoder.norm`; they are renamed first, as PETRHead._load_from_state_dict does. The head's
constants (code_weights, match_costs, pc_range, position_range, coords_d) go to `unused`: here
they are constructor arguments. PETR's head repeats one branch module for all layers, so its
checkpoints hold identical copies per layer; they load as equal per-layer branches.

Imports nothing but torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "ConvertedStateDict",
    "convert_petr_state_dict",
    "convert_streampetr_state_dict",
    "to_petr_state_dict",
    "to_streampetr_state_dict",
    "load_original_state_dict",
    "ConvertedCheckpoint",
    "read_checkpoint",
    "convert_checkpoint",
    "check_fit",
    "describe_fit",
    "load_checkpoint",
    "save_converted",
    "load_converted",
]

HEAD_PREFIX = "pts_bbox_head."


class ConvertedStateDict(NamedTuple):
    """decoder: for the decoder's load_state_dict; position: for the key-side module's;
    unused: every other entry of the original, under its original name."""

    decoder: dict[str, Tensor]
    position: dict[str, Tensor]
    unused: dict[str, Tensor]


# (original, ours) name templates; "#" stands for an integer index, "*" for a parameter suffix.
_ATTN = r"(?:in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
_PARAM = r"(?:weight|bias)"
_DECODER_RULES = [
    ("transformer.decoder.layers.#.attentions.0.attn.*", "layers.#.self_attn.*", _ATTN),
    ("transformer.decoder.layers.#.attentions.1.attn.*", "layers.#.cross_attn.*", _ATTN),
    ("transformer.decoder.layers.#.norms.0.*", "layers.#.norm1.*", _PARAM),
    ("transformer.decoder.layers.#.norms.1.*", "layers.#.norm2.*", _PARAM),
    ("transformer.decoder.layers.#.norms.2.*", "layers.#.norm3.*", _PARAM),
    ("transformer.decoder.layers.#.ffns.0.layers.0.0.*", "layers.#.linear1.*", _PARAM),
    ("transformer.decoder.layers.#.ffns.0.layers.1.*", "layers.#.linear2.*", _PARAM),
    ("transformer.decoder.post_norm.*", "final_norm.*", _PARAM),
    ("cls_branches.#.#.*", "cls_branches.#.#.*", _PARAM),
    ("reg_branches.#.#.*", "reg_branches.#.#.*", _PARAM),
    ("reference_points.*", "reference_points.*", r"weight"),
    ("query_embedding.#.*", "query_embedding.mlp.#.*", _PARAM),
]
_MLN = r"(?:reduce\.0|gamma|beta)\.(?:weight|bias)"
_STREAM_DECODER_RULES = _DECODER_RULES + [
    ("pseudo_reference_points.*", "pseudo_reference_points.*", r"weight"),
    ("time_embedding.#.*", "time_embedding.#.*", _PARAM),
    ("ego_pose_pe.*", "ego_pose_pe.*", _MLN),
    ("ego_pose_memory.*", "ego_pose_memory.*", _MLN),
]
_PETR_POSITION_RULES = [
    ("input_proj.*", "input_proj.*", _PARAM),
    ("position_encoder.#.*", "position_encoder.#.*", _PARAM),
    ("adapt_pos3d.#.*", "adapt_pos3d.#.*", _PARAM),
]
_STREAM_POSITION_RULES = [
    ("position_encoder.#.*", "position_encoder.#.*", _PARAM),
    ("memory_embed.#.*", "memory_embed.#.*", _PARAM),
    ("spatial_alignment.*", "spatial_alignment.*", _MLN),
    ("featurized_pe.conv_reduce.*", "featurized_pe.reduce.*", _PARAM),
    ("featurized_pe.conv_expand.*", "featurized_pe.expand.*", _PARAM),
]
# Names of older PETR checkpoints (PETRHead._load_from_state_dict renames them the same way).
_LEGACY = [
    (".self_attn.", ".attentions.0."),
    (".multihead_attn.", ".attentions.1."),
    (".decoder.norm.", ".decoder.post_norm."),
]


class _Rule:
    """One bidirectional renaming, compiled from a template pair."""

    def __init__(self, original: str, ours: str, suffix: str):
        self.templates = {"original": original, "ours": ours}
        self.patterns = {side: self._compile(t, suffix) for side, t in self.templates.items()}

    @staticmethod
    def _compile(template: str, suffix: str) -> re.Pattern[str]:
        body = re.escape(template).replace("\\#", r"(\d+)").replace(r"\*", f"({suffix})")
        return re.compile(f"^{body}$")

    def rename(self, name: str, source: str, target: str) -> str | None:
        m = self.patterns[source].match(name)
        if m is None:
            return None
        groups = iter(m.groups())
        out = []
        for ch in self.templates[target]:
            out.append(next(groups) if ch in "#*" else ch)
        return "".join(out)


def _compile(rules: list[tuple[str, str, str]]) -> list[_Rule]:
    return [_Rule(*r) for r in rules]


_COMPILED = {
    "petr": (_compile(_DECODER_RULES), _compile(_PETR_POSITION_RULES)),
    "streampetr": (_compile(_STREAM_DECODER_RULES), _compile(_STREAM_POSITION_RULES)),
}


def _rename(name: str, rules: list[_Rule], source: str, target: str) -> str | None:
    for rule in rules:
        new = rule.rename(name, source, target)
        if new is not None:
            return new
    return None


def _unwrap(state_dict: Mapping[str, object]) -> Mapping[str, Tensor]:
    inner = state_dict.get("state_dict") if isinstance(state_dict, Mapping) else None
    return inner if isinstance(inner, Mapping) else state_dict  # type: ignore[return-value]


def _convert(state_dict: Mapping[str, Tensor], kind: str, prefix: str, legacy: bool) -> ConvertedStateDict:
    decoder_rules, position_rules = _COMPILED[kind]
    decoder, position, unused = {}, {}, {}
    state_dict = _unwrap(state_dict)
    if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}  # DataParallel checkpoints
    if prefix and not any(k.startswith(prefix) for k in state_dict):
        layout = _detector_layout(state_dict)
        if layout.startswith(HEAD_PREFIX):  # a bare head (transformer.*) or bare transformer (decoder.*)
            state_dict = {layout[len(HEAD_PREFIX) :] + k: v for k, v in state_dict.items()}
            prefix = ""
    for original_name, value in state_dict.items():
        if not original_name.startswith(prefix):
            unused[original_name] = value
            continue
        name = original_name[len(prefix) :]
        if legacy:
            for old, new in _LEGACY:
                name = name.replace(old, new)
        ours = _rename(name, decoder_rules, "original", "ours")
        if ours is not None:
            decoder[ours] = value
            continue
        ours = _rename(name, position_rules, "original", "ours")
        if ours is not None:
            position[ours] = value
            continue
        unused[original_name] = value
    if state_dict and not decoder and not position:
        first = next(iter(state_dict))
        raise ValueError(
            f"no tensor of the {len(state_dict)} in this state dict maps onto the {kind} decoder or key side "
            f"(first name {first!r}, head prefix {prefix!r}): expected the original head's names "
            f"({prefix}transformer.decoder.layers.0..., {prefix}cls_branches.0...)"
        )
    return ConvertedStateDict(decoder, position, unused)


def _to_original(
    decoder: Mapping[str, Tensor], position: Mapping[str, Tensor] | None, kind: str, prefix: str
) -> dict[str, Tensor]:
    decoder_rules, position_rules = _COMPILED[kind]
    out: dict[str, Tensor] = {}
    for part, rules, what in ((decoder, decoder_rules, "decoder"), (position or {}, position_rules, "position")):
        for name, value in part.items():
            original = _rename(name, rules, "ours", "original")
            if original is None:
                raise KeyError(f"{what} parameter {name!r} has no counterpart in the original {kind} checkpoint")
            out[prefix + original] = value
    return out


def convert_petr_state_dict(
    state_dict: Mapping[str, Tensor], prefix: str = HEAD_PREFIX, legacy: bool = True
) -> ConvertedStateDict:
    """Rename a PETR checkpoint for `PETRDecoder` and `PETRPositionEmbedding`.

    Args:
        state_dict: the checkpoint's state dict, or the checkpoint itself ({"state_dict": ...}).
        prefix: where the head sits in it ("" for a bare head state dict).
        legacy: also accept the older attention / norm names.
    Returns:
        ConvertedStateDict(decoder, position, unused); the tensors are the originals, not copies.
    """
    return _convert(state_dict, "petr", prefix, legacy)


def convert_streampetr_state_dict(
    state_dict: Mapping[str, Tensor], prefix: str = HEAD_PREFIX, legacy: bool = True
) -> ConvertedStateDict:
    """Rename a StreamPETR (or FocalPETR) checkpoint for `StreamPETRDecoder` (`FocalPETRDecoder`)
    and `StreamPETRPositionEmbedding`. FocalPETR checkpoints simply lack the temporal entries.

    Args / Returns: as `convert_petr_state_dict`.
    """
    return _convert(state_dict, "streampetr", prefix, legacy)


def to_petr_state_dict(
    decoder: Mapping[str, Tensor], position: Mapping[str, Tensor] | None = None, prefix: str = HEAD_PREFIX
) -> dict[str, Tensor]:
    """The inverse of `convert_petr_state_dict`: our state dicts under the original names.

    Raises KeyError for a name the original head does not have.
    """
    return _to_original(decoder, position, "petr", prefix)


def to_streampetr_state_dict(
    decoder: Mapping[str, Tensor], position: Mapping[str, Tensor] | None = None, prefix: str = HEAD_PREFIX
) -> dict[str, Tensor]:
    """The inverse of `convert_streampetr_state_dict`."""
    return _to_original(decoder, position, "streampetr", prefix)


def load_original_state_dict(
    decoder: nn.Module,
    state_dict: Mapping[str, Tensor],
    position: nn.Module | None = None,
    strict: bool = True,
    prefix: str = HEAD_PREFIX,
) -> ConvertedStateDict:
    """Convert an original checkpoint for `decoder` (and `position`) and load it.

    The converter is picked from the decoder's type: PETRDecoder -> PETR names, StreamPETRDecoder
    and FocalPETRDecoder -> StreamPETR names.

    Returns:
        the ConvertedStateDict, so callers can inspect `unused`.
    Raises:
        ValueError if the checkpoint's stored pc_range, position_range or depth bins (coords_d)
        differ from the decoder's / key side's.
    """
    from .focalpetr import FocalPETRDecoder
    from .petr import PETRDecoder
    from .streampetr import StreamPETRDecoder

    if isinstance(decoder, (StreamPETRDecoder, FocalPETRDecoder)):
        converted = convert_streampetr_state_dict(state_dict, prefix)
    elif isinstance(decoder, PETRDecoder):
        converted = convert_petr_state_dict(state_dict, prefix)
    else:
        raise TypeError(f"no checkpoint mapping for {type(decoder).__name__}")
    # The head's stored settings must be the modules' (a wrong range would load "strictly" and run wrong).
    stored = {n[len(prefix) :] if n.startswith(prefix) else n: v for n, v in converted.unused.items()}
    expected = {"pc_range": decoder.pc_range}
    if position is not None:
        expected["position_range"] = position.position_range
        if hasattr(position, "depths"):
            expected["coords_d"] = position.depths
    name = type(decoder).__name__
    for key, value in expected.items():
        if key in stored:
            _check_constant(prefix + key, stored[key], value.detach().float().cpu().reshape(-1), name)
    with torch.no_grad():
        decoder.load_state_dict(converted.decoder, strict=strict)
        if position is not None:
            position.load_state_dict(converted.position, strict=strict)
    return converted


# ------------------------------------------------------------------ complete detectors

# Head tensors that are settings, not weights: checked against the model, never loaded.
CHECKED_CONSTANTS = ("pc_range", "position_range", "coords_d")
# Head tensors that only the training losses read.
TRAINING_ONLY = ("code_weights", "match_costs")
DETECTOR_PARTS = ("img_backbone.", "img_neck.", "img_roi_head.", "pts_bbox_head.")
# numpy types an mmcv checkpoint's "meta" may hold: plain data, rebuilt without running user code.
_NUMPY_DATA_GLOBALS = (
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
)


class ConvertedCheckpoint(NamedTuple):
    """An official checkpoint mapped onto a `PETRFamilyDetector`.

    state_dict: our names -> the original tensors (for `model.load_state_dict`).
    missing: our names the checkpoint does not provide.
    unused: original names that map to nothing in this model.
    constants: original name -> value of the checked settings (pc_range, position_range, coords_d).
    ignored: original names of training-only tensors (code_weights, match_costs).
    """

    state_dict: dict[str, Tensor]
    missing: list[str]
    unused: list[str]
    constants: dict[str, Tensor]
    ignored: list[str]


def read_checkpoint(path) -> dict[str, Tensor]:
    """The state dict of an official checkpoint file, loaded without unpickling code.

    Reads with `torch.load(weights_only=True)`: tensors, numbers, strings and containers only
    (plus numpy's array and scalar rebuilders, which mmcv's "meta" may hold). Accepts the mmcv
    wrapper {"meta": ..., "state_dict": ...} (also "model" / "module" wrappers) and a bare state
    dict; strips the "module." prefix of DataParallel checkpoints.

    Raises:
        FileNotFoundError, or ValueError naming the file and what is wrong with it.
    """
    import os
    import pickle

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        obj = _load_with_numpy_data(path, e)
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ValueError(f"checkpoint {path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    return _state_dict_of(obj, path)


def _load_with_numpy_data(path: str, error: Exception):
    """Retry a weights-only load that failed on globals, if every one of them is a numpy data rebuilder;
    otherwise raise ValueError naming the globals (code) or saying the file is no checkpoint."""
    import re
    import warnings

    message = str(error)
    try:
        unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file: read the global from the message
        unsafe = re.findall(r"GLOBAL ([\w.]+)", message)
    if not unsafe:
        first = message.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if message else ""
        raise ValueError(f"checkpoint {path} is not a readable PyTorch checkpoint ({first[:200]})") from None
    if all(g in _NUMPY_DATA_GLOBALS or g.startswith("numpy.dtypes.") for g in unsafe):
        try:
            allowed = []
            for g in unsafe:  # (object, the name the pickle uses): numpy 2 moved numpy.core to numpy._core
                module, attr = g.rsplit(".", 1)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    allowed.append((getattr(__import__(module, fromlist=[attr]), attr), g))
            if "numpy.dtype" in unsafe:  # numpy >= 1.25 rebuilds dtypes through their classes (data only)
                import numpy as np

                dtypes = getattr(np, "dtypes", None)
                allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes else []
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - fall through to the refusal below
            pass
    raise ValueError(
        f"checkpoint {path} was refused: it holds Python objects other than tensors and plain data "
        f"({', '.join(unsafe)}); tggbc reads checkpoints with torch.load(weights_only=True) and never unpickles code"
    ) from None


def _state_dict_of(obj, path: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    for key in ("state_dict", "model", "module"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise ValueError(f"checkpoint {path} has no tensors under 'state_dict' or at its top level (keys: {keys})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _detector_layout(names) -> str:
    """What to put before the names to get the detector's: '' for a full detector state dict,
    'pts_bbox_head.' for a bare head (names start at transformer.), 'pts_bbox_head.transformer.' for
    a bare transformer (names start at decoder.layers.)."""
    names = [n for n in names if isinstance(n, str)]
    if any(n.startswith(DETECTOR_PARTS) for n in names):
        return ""
    if any(n.startswith(("transformer.", "cls_branches.", "reg_branches.", "reference_points.")) for n in names):
        return HEAD_PREFIX
    if any(n.startswith(("decoder.layers.", "decoder.post_norm.", "decoder.norm.")) for n in names):
        return HEAD_PREFIX + "transformer."
    return ""


def convert_checkpoint(state_dict: Mapping[str, Tensor], model: nn.Module) -> ConvertedCheckpoint:
    """Map an official detector checkpoint onto `model` (a PETRFamilyDetector); nothing is loaded.

    Names: img_backbone.*, img_neck.*, img_roi_head.* keep their names; pts_bbox_head.* are renamed
    onto pts_bbox_head.decoder.* / pts_bbox_head.position.* (see the tables at the top). A bare head
    state dict (names starting at transformer.) is read as the pts_bbox_head part.

    Raises:
        ValueError when the checkpoint cannot be this model's: a mapped tensor's shape differs
        (naming the first one), a stored setting (pc_range, position_range, depth bins coords_d)
        differs from the model's, or nothing at all maps.
    """
    from .detectors import PETRFamilyDetector
    from .streampetr import StreamPETRDecoder

    if not isinstance(model, PETRFamilyDetector):
        raise TypeError(f"convert_checkpoint needs a PETRFamilyDetector, got {type(model).__name__}")
    state_dict = _unwrap(state_dict)
    if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}  # DataParallel checkpoints
    kind = "streampetr"  # both heads of the StreamPETR repository use StreamPETR's names
    decoder_rules, position_rules = _COMPILED[kind]
    ours = model.state_dict()
    add = _detector_layout(state_dict)
    mapped: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    unused, ignored, constants = [], [], {}
    expected_constants = {
        "pc_range": torch.tensor(model.config.pc_range, dtype=torch.float32),
        "position_range": torch.tensor(model.config.position_range, dtype=torch.float32),
        "coords_d": model.pts_bbox_head.position.depths.float().cpu(),
    }
    temporal = isinstance(model.decoder, StreamPETRDecoder)
    for original, value in state_dict.items():
        full = add + original
        target = None
        if full.startswith(HEAD_PREFIX):
            name = full[len(HEAD_PREFIX) :]
            for old, new in _LEGACY:
                name = name.replace(old, new)
            if name in CHECKED_CONSTANTS:
                constants[original] = value
                _check_constant(original, value, expected_constants[name], model.config.name)
                continue
            if name in TRAINING_ONLY:
                ignored.append(original)
                continue
            renamed = _rename(name, decoder_rules, "original", "ours")
            if renamed is not None and (temporal or renamed.split(".")[0] not in _TEMPORAL_ONLY):
                target = "pts_bbox_head.decoder." + renamed
            else:
                renamed = _rename(name, position_rules, "original", "ours")
                target = None if renamed is None else "pts_bbox_head.position." + renamed
        elif full.startswith(DETECTOR_PARTS):
            target = full
        if target is None or target not in ours:
            unused.append(original)
            continue
        if tuple(value.shape) != tuple(ours[target].shape):
            first = f"first tensor that does not fit: {unused[0]!r} (no such tensor in the model); " if unused else ""
            raise ValueError(
                f"the checkpoint is not of {model.config.name}: {first}checkpoint tensor {original!r} has shape "
                f"{tuple(value.shape)} where the model's {target} has {tuple(ours[target].shape)}"
            )
        mapped[target] = value
        source[target] = original
    if not mapped:
        first = next(iter(state_dict), None)
        raise ValueError(
            f"no tensor of the checkpoint maps onto {model.config.name} ({len(state_dict)} tensors, first {first!r}); "
            "expected the names of the original detector (img_backbone.*, img_neck.*, pts_bbox_head.*) "
            "or of its bare head (transformer.decoder.*)"
        )
    missing = [k for k in ours if k not in mapped]
    return ConvertedCheckpoint(mapped, missing, unused, constants, ignored)


# Decoder entries only StreamPETR's head has (a PETRHeadDN checkpoint never holds them; a
# StreamPETR checkpoint's land in `unused` when converted for a memoryless model).
_TEMPORAL_ONLY = ("pseudo_reference_points", "time_embedding", "ego_pose_pe", "ego_pose_memory")


def _check_constant(name: str, value: Tensor, expected: Tensor, model_name: str) -> None:
    got = value.detach().float().cpu().reshape(-1)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=0.0, atol=1e-4):
        shown = [round(float(v), 4) for v in got[:8]]
        want = [round(float(v), 4) for v in expected[:8]]
        more = " ..." if got.numel() > 8 or expected.numel() > 8 else ""
        raise ValueError(
            f"checkpoint setting {name!r} = {shown}{more} ({got.numel()} values) differs from {model_name}'s "
            f"{want}{more} ({expected.numel()} values): the checkpoint was trained with another "
            "pc_range / position_range / depth_start / depth_num, and would run silently wrong"
        )


def describe_fit(converted: ConvertedCheckpoint, model_name: str, limit: int = 5) -> str:
    """One paragraph: how many tensors mapped, and the first missing / unused names."""
    lines = [f"{len(converted.state_dict)} tensors mapped onto {model_name}"]
    if converted.constants:
        lines.append(f"settings checked and equal: {', '.join(converted.constants)}")
    if converted.ignored:
        lines.append(f"training-only tensors ignored: {', '.join(converted.ignored)}")
    for what, names in (
        ("missing (the model's, not in the checkpoint)", converted.missing),
        ("unused (the checkpoint's, not in the model)", converted.unused),
    ):
        if names:
            shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
            lines.append(f"{len(names)} {what}: {shown}")
    return "\n".join(lines)


def check_fit(converted: ConvertedCheckpoint, model_name: str, allow_partial: bool = False) -> None:
    """Raise ValueError naming the first misfit unless every tensor maps both ways (or allow_partial)."""
    if allow_partial or not (converted.missing or converted.unused):
        return
    first = converted.unused[0] if converted.unused else converted.missing[0]
    side = "checkpoint tensor" if converted.unused else "model tensor"
    raise ValueError(
        f"the checkpoint does not fit {model_name}: first misfit is {side} {first!r}\n"
        f"{describe_fit(converted, model_name)}\n(allow_partial / --allow-partial converts it anyway)"
    )


def load_checkpoint(model: nn.Module, path, allow_partial: bool = False) -> ConvertedCheckpoint:
    """Read an official checkpoint file (no unpickling), map it onto `model` and load it.

    Raises ValueError (see `convert_checkpoint` and `check_fit`) before anything is loaded.
    """
    converted = convert_checkpoint(read_checkpoint(path), model)
    check_fit(converted, model.config.name, allow_partial)
    with torch.no_grad():
        model.load_state_dict(converted.state_dict, strict=not allow_partial)
    return converted


SAFETENSORS_FORMAT = "tggbc-detector"


def save_converted(path, converted: ConvertedCheckpoint, model_name: str) -> None:
    """Write a converted state dict as safetensors (to `path` directly: wrap in an atomic writer)."""
    from safetensors.torch import save_file

    # Copies: the published heads share one branch object across layers, and safetensors
    # refuses tensors that share memory.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in converted.state_dict.items()}
    save_file(tensors, str(path), metadata={"format": SAFETENSORS_FORMAT, "model": model_name})


def load_converted(model: nn.Module, path, strict: bool = True) -> None:
    """Load a file written by `tggbc convert` into `model`, refusing one converted for another model.

    strict=False accepts a file converted with --allow-partial (its missing tensors keep the model's values).
    """
    import os

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist or is not a file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"weights file {path} is not a readable safetensors file ({e})") from None
    name = model.config.name
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise ValueError(f"weights file {path} was not written by `tggbc convert` (metadata {meta})")
    if meta.get("model") != name:
        raise ValueError(f"weights file {path} holds {meta.get('model')!r}, not {name!r}")
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys or (strict and result.missing_keys):
        raise ValueError(
            f"weights file {path} does not fit {name}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]} (converted with --allow-partial?)"
        )
