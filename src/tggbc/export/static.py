"""tgGBC that traces into a static graph: fixed schedule, static shapes, no data-dependent Python.

The selection itself is the core's (`select_keys(traceable=True)`: one TopK that keeps the
same set as the eager stable sort, and `gather_keys`' row gathers); this module wraps it in a
parameter-free `KeySelection` module only so that exported graphs name tgGBC's operators, and
holds `ExportedDecoder`, a host decoder with plain tensor inputs and outputs.

Imports nothing but torch, the core and the host decoders.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.decoder import PETRFamilyDecoder
from ..models.petr import PETRDecoder
from ..models.state import TemporalState, rigid_inverse
from ..models.streampetr import StreamPETRDecoder
from ..prune import prune_schedule
from ..pruner import KeyPruner, PrunedKeys, pruning

__all__ = ["ExportedDecoder", "KeySelection", "StaticKeyPruner", "STATE_FIELDS"]

# TemporalState fields, in the order they appear among the graph inputs (state_*) and outputs (next_state_*).
STATE_FIELDS = ("embedding", "reference_points", "timestamp", "ego_pose", "velocity")


class KeySelection(nn.Module):
    """tgGBC's own work after one layer (importance, selection, gathers) as a module.

    Without parameters; a module only so that exported graphs name these operators: their nodes
    carry `KeySelection` in their metadata, which the backend benchmarks use to time tgGBC's
    share of a run.
    """

    def __init__(self, pruner: KeyPruner):
        super().__init__()
        self.pruner = pruner

    def extra_repr(self) -> str:
        return repr(self.pruner)

    def forward(self, layer: int, *args, **kwargs) -> PrunedKeys:
        return KeyPruner.step(self.pruner, layer, *args, **kwargs)


class StaticKeyPruner(KeyPruner):
    """A traceable KeyPruner (same schedule, same kept keys) whose work runs inside `selection`.

    Register `selection` as a submodule of the module being exported (ExportedDecoder does) so
    the graph names its operators.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, traceable=True, **kwargs)
        if not self.batch_first:
            raise ValueError("StaticKeyPruner is batch-first only, as the host decoders are")
        self.selection = KeySelection(self)

    def step(self, layer: int, *args, **kwargs) -> PrunedKeys:
        if self.schedule and self.schedule[layer] == 0:
            return KeyPruner.step(self, layer, *args, **kwargs)  # nothing dropped: no graph nodes
        return self.selection(layer, *args, **kwargs)


class ExportedDecoder(nn.Module):
    """A host decoder with a fixed tgGBC setting, taking and returning plain tensors (for export).

    Graph inputs (B batch, Nk keys, E channels, M memory entries):
        memory, key_pos: [B, Nk, E]; key_padding_mask: [B, Nk] bool (only with padded=True).
        StreamPETR also: state_embedding [B, M, E], state_reference_points [B, M, 3],
        state_timestamp [B, M, 1] float64, state_ego_pose [B, M, 4, 4], state_velocity [B, M, 2]
        (the previous frame's TemporalState), ego_pose and ego_pose_inv [B, 4, 4] (the inverse is
        an input because ONNX has no matrix inverse), timestamp [B] float64, prev_exists [B].
    Graph outputs:
        cls_scores [B, Nq, C], bbox_preds [B, Nq, code_size] of the last layer (with
        all_layers=True: [L, B, Nq, ...] of every layer); StreamPETR also next_state_* (the new
        TemporalState, same shapes as the state inputs); with kept_keys=True and pruning,
        kept_keys [B, Nk_L]: original indices of the keys the last layer saw.

    Args:
        decoder: any PETRFamilyDecoder (PETR, FocalPETR, StreamPETR, or a subclass such as a
            detector's own decoder). It is used as is: put it in eval mode and the dtype you want.
        r, n, k: the tgGBC setting (see `prune_schedule`); r=0 exports the dense decoder.
        num_keys: Nk the graph is built for (fixes the schedule, so every shape is static).
        padded: the graph takes a key_padding_mask input.
        queries: the graph takes query [B, Nq, E] and reference_points [B, Nq, 3] inputs (a
            two-stage detector such as tggbc.detector selects them from its keys); PETR only.
        all_layers: return every layer's predictions, not only the last layer's.
        kept_keys: also return kept_keys (needs a pruning setting).
    """

    def __init__(
        self,
        decoder: PETRFamilyDecoder,
        r: int | float | list[int] = 0,
        n: int = 1,
        k: int = -1,
        *,
        num_keys: int,
        padded: bool = False,
        queries: bool = False,
        all_layers: bool = False,
        kept_keys: bool = False,
    ):
        super().__init__()
        if not isinstance(decoder, PETRFamilyDecoder):
            raise TypeError(
                f"can only export a PETRFamilyDecoder (PETR, FocalPETR, StreamPETR), got {type(decoder).__name__}"
            )
        if isinstance(num_keys, bool) or not isinstance(num_keys, int) or num_keys < 1:
            raise ValueError(f"num_keys must be a positive int, got {num_keys!r}")
        num_layers = len(decoder.layers)
        # Resolve the schedule now: r >= keys and the like fail here, before any tracing.
        schedule = prune_schedule(r, n, num_layers, num_keys=num_keys)
        schedule[-1] = 0  # as KeyPruner.reset: nothing reads the keys after the last layer
        self.decoder = decoder
        self.pruner = StaticKeyPruner(r=r, n=n, k=k) if any(schedule) else None
        # Registered here so the exported graph names tgGBC's operators (see KeySelection).
        self.key_selection = self.pruner.selection if self.pruner is not None else None
        self.schedule = schedule
        self.num_keys, self.padded, self.all_layers = num_keys, padded, all_layers
        if kept_keys and self.pruner is None:
            raise ValueError("kept_keys needs a setting that prunes (r > 0)")
        self.kept_keys = kept_keys
        self.streaming = isinstance(decoder, StreamPETRDecoder)
        if queries and not isinstance(decoder, PETRDecoder):
            raise ValueError(f"queries=True needs a PETRDecoder (per-sample queries), got {type(decoder).__name__}")
        self.queries = queries
        self.keys_per_layer = [num_keys]
        for drop in schedule[:-1]:
            self.keys_per_layer.append(self.keys_per_layer[-1] - drop)

        names = ["memory", "key_pos"] + (["key_padding_mask"] if padded else [])
        names += ["query", "reference_points"] if queries else []
        if self.streaming:
            names += [f"state_{f}" for f in STATE_FIELDS] + ["ego_pose", "ego_pose_inv", "timestamp", "prev_exists"]
        self.input_names = names
        outputs = ["cls_scores", "bbox_preds"]
        if self.streaming:
            outputs += [f"next_state_{f}" for f in STATE_FIELDS]
        if kept_keys:
            outputs.append("kept_keys")
        self.output_names = outputs

    def flatten_inputs(self, inputs: dict) -> tuple[Tensor, ...]:
        """`example_inputs(decoder, ...)`-style keyword arguments -> the graph inputs, in order.

        Fills what the graph needs and the dict may lack: a key_padding_mask of all False,
        ego_pose_inv from ego_pose, prev_exists = 1 (the state continues its scene).
        """
        memory = inputs["memory"]
        batch, num_keys = memory.shape[:2]
        if num_keys != self.num_keys:
            raise ValueError(f"the graph is built for {self.num_keys} keys, got memory of shape {tuple(memory.shape)}")
        out = [memory, inputs["key_pos"]]
        if self.padded:
            mask = inputs.get("key_padding_mask")
            out.append(torch.zeros(batch, num_keys, dtype=torch.bool, device=memory.device) if mask is None else mask)
        if self.queries:
            missing = [name for name in ("query", "reference_points") if inputs.get(name) is None]
            if missing:
                raise ValueError(f"the graph takes per-sample queries: inputs lack {missing}")
            out += [inputs["query"], inputs["reference_points"]]
        if self.streaming:
            state = inputs.get("state")
            if state is None:
                raise ValueError("a StreamPETR graph needs a TemporalState (TemporalState.empty for a new scene)")
            ego_pose = inputs.get("ego_pose")
            if ego_pose is None:
                ego_pose = torch.eye(4, device=memory.device).repeat(batch, 1, 1)
            ego_pose = ego_pose.float()
            ego_pose_inv = inputs.get("ego_pose_inv")
            # ONNX has no matrix inverse: the graph takes it, computed as the data pipeline does.
            ego_pose_inv = rigid_inverse(ego_pose).float() if ego_pose_inv is None else ego_pose_inv.float()
            timestamp = inputs.get("timestamp")
            timestamp = torch.zeros(batch, dtype=torch.float64) if timestamp is None else timestamp
            prev_exists = inputs.get("prev_exists")
            prev_exists = torch.ones(batch) if prev_exists is None else prev_exists
            out += [getattr(state, f) for f in STATE_FIELDS]
            out += [ego_pose, ego_pose_inv, torch.as_tensor(timestamp).double().reshape(batch)]
            out.append(torch.as_tensor(prev_exists).float().reshape(batch))
        return tuple(out)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        named = dict(zip(self.input_names, inputs, strict=True))
        kwargs = {}
        if self.streaming:
            kwargs = dict(
                state=TemporalState(**{f: named[f"state_{f}"] for f in STATE_FIELDS}),
                ego_pose=named["ego_pose"],
                ego_pose_inv=named["ego_pose_inv"],
                timestamp=named["timestamp"],
                prev_exists=named["prev_exists"],
            )
        if self.queries:
            kwargs = dict(query=named["query"], reference_points=named["reference_points"])
        # Fast attention: fused SDPA everywhere, tgGBC reads only the top-k rows where a layer prunes.
        with pruning(self.decoder, self.pruner, attention="fast") as decoder:
            out = decoder(
                named["memory"],
                named["key_pos"],
                named.get("key_padding_mask"),
                track_keys=self.kept_keys,
                **kwargs,
            )
        return self.flatten_outputs(out)

    def flatten_outputs(self, out) -> tuple[Tensor, ...]:
        """A DecoderOutput -> the graph outputs, in `output_names` order."""
        if self.all_layers:
            result = [out.cls_scores, out.bbox_preds]
        else:
            result = [out.cls_scores[-1], out.bbox_preds[-1]]
        if self.streaming:
            result += [getattr(out.state, f) for f in STATE_FIELDS]
        if self.kept_keys:
            result.append(out.kept[-1])
        return tuple(result)


def example_queries(decoder: PETRFamilyDecoder, batch: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Random per-sample queries for a graph exported with queries=True: query [B, Nq, E] ~ N(0, 1)
    and reference_points [B, Nq, 3] uniform in [0, 1) (Nq = decoder.num_queries)."""
    g = torch.Generator().manual_seed(seed + 1)
    shape = (batch, decoder.num_queries)
    return {
        "query": torch.randn(*shape, decoder.embed_dims, generator=g).to(dtype),
        "reference_points": torch.rand(*shape, 3, generator=g),
    }
