"""tggbc.patch on stand-ins of the original mmcv classes: equal to tggbc's own host decoders with the
same weights (tgGBC off and on, same kept keys), bit-for-bit restore, idempotent, loud on unknown
models. The stand-ins are in tests/mmcv_standins.py."""

import copy
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mmcv_standins as S
import tggbc.patch
from tggbc.models import (
    FocalPETRDecoder,
    PETRDecoder,
    StreamPETRDecoder,
    convert_petr_state_dict,
    convert_streampetr_state_dict,
)
from tggbc.models.state import rigid_inverse

E, H, FFN, LAYERS, QUERIES = 32, 4, 64, 3, 24
PROPAGATED, MEMORY = 8, 24
B, CAMS, ROWS, COLS = 2, 2, 3, 8  # 48 image keys
NUM_KEYS = CAMS * ROWS * COLS


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (the default init leaves biases at 0 and MLN at identity, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "reference_points" in name:
                p.copy_(torch.rand(p.shape, generator=g))
            elif name != "pc_range":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def petr_head(cross="PETRMultiheadAttention", seed=0, distinct_branches=False):
    """PETRHead; with distinct_branches one branch module per layer (the originals repeat one
    object, which would hide a patch that reads the wrong layer's branch)."""
    decoder = S.decoder_cfg("PETRTransformerDecoderLayer", cross, LAYERS, E, H, FFN)
    head = S.PETRHead(embed_dims=E, num_query=QUERIES, transformer=dict(type="PETRTransformer", decoder=decoder))
    if distinct_branches:
        head.cls_branches = nn.ModuleList(copy.deepcopy(b) for b in head.cls_branches)
        head.reg_branches = nn.ModuleList(copy.deepcopy(b) for b in head.reg_branches)
    return randomize(head, seed)


def focal_head(cross="PETRMultiheadFlashAttention", seed=0):
    decoder = S.decoder_cfg("PETRTemporalDecoderLayer", cross, LAYERS, E, H, FFN)
    transformer = dict(type="PETRTemporalTransformer", decoder=decoder)
    return randomize(S.PETRHeadDN(embed_dims=E, num_query=QUERIES, transformer=transformer), seed)


def stream_head(cross="PETRMultiheadFlashAttention", seed=0):
    decoder = S.decoder_cfg("PETRTemporalDecoderLayer", cross, LAYERS, E, H, FFN)
    head = S.StreamPETRHead(
        embed_dims=E,
        num_query=QUERIES,
        memory_len=MEMORY,
        topk_proposals=PROPAGATED,
        num_propagated=PROPAGATED,
        transformer=dict(type="PETRTemporalTransformer", decoder=decoder),
    )
    return randomize(head, seed)


def twin(head):
    """tggbc's own host decoder loaded from the stand-in's original-named state dict."""
    sizes = dict(num_layers=LAYERS, embed_dims=E, num_heads=H, ffn_dims=FFN, num_queries=QUERIES)
    if isinstance(head, S.StreamPETRHead):
        decoder = StreamPETRDecoder(**sizes, num_propagated=PROPAGATED, memory_len=MEMORY, topk_proposals=PROPAGATED)
        converted = convert_streampetr_state_dict(head.state_dict(), prefix="")
    elif isinstance(head, S.PETRHeadDN):
        decoder, converted = FocalPETRDecoder(**sizes), convert_streampetr_state_dict(head.state_dict(), prefix="")
    else:
        decoder, converted = PETRDecoder(**sizes), convert_petr_state_dict(head.state_dict(), prefix="")
    decoder.load_state_dict(converted.decoder, strict=True)
    return decoder.eval()


def petr_inputs(seed=1):
    """Projected features, padding masks (sample 1: its last 3 columns padded) and pos_embed,
    [B, N, E, H, W] as PETRHead has them; and the same as batch-first keys for tggbc."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, CAMS, E, ROWS, COLS, generator=g)
    pos = torch.randn(B, CAMS, E, ROWS, COLS, generator=g)
    masks = torch.zeros(B, CAMS, ROWS, COLS, dtype=torch.bool)
    masks[1, :, :, -3:] = True
    flat = lambda t: t.permute(0, 1, 3, 4, 2).reshape(B, NUM_KEYS, E)  # camera-major keys  # noqa: E731
    return (x, masks, pos), (flat(x), flat(pos), masks.reshape(B, NUM_KEYS))


def stream_frames(count=3):
    """Memory, pos_embed [B, Nk, E] and the head's `data` for a few frames (scene change in sample 1
    at frame 2), plus the matching tggbc keyword arguments."""
    frames = []
    for f, prev in enumerate([(0.0, 0.0), (1.0, 1.0), (1.0, 0.0)][:count]):
        g = torch.Generator().manual_seed(20 + f)
        memory, pos = torch.randn(B, NUM_KEYS, E, generator=g), torch.randn(B, NUM_KEYS, E, generator=g)
        yaw = torch.rand(B, generator=g) * 6.28
        pose = torch.eye(4).repeat(B, 1, 1)
        pose[:, 0, 0], pose[:, 0, 1], pose[:, 1, 0], pose[:, 1, 1] = yaw.cos(), -yaw.sin(), yaw.sin(), yaw.cos()
        pose[:, :3, 3] = torch.randn(B, 3, generator=g) * 5 + torch.tensor([600.0, 1600.0, 0.0])
        timestamp = torch.tensor([1.5e9 + 0.5 * f, 1.6e9 + 0.5 * f], dtype=torch.float64)
        prev_exists = torch.tensor(prev)
        # The data pipeline's rigid inverse, given to both sides (tggbc computes the same when none is given).
        inverse = rigid_inverse(pose).float()
        data = dict(prev_exists=prev_exists, timestamp=timestamp, ego_pose=pose, ego_pose_inv=inverse)
        ours = dict(
            ego_pose=pose, ego_pose_inv=inverse, timestamp=timestamp, prev_exists=None if f == 0 else prev_exists
        )
        frames.append((memory, pos, data, ours))
    return frames


def run_stream(head, frames):
    head.reset_memory()
    with torch.no_grad():
        return [head(memory, pos, **data) for memory, pos, data, _ in frames]


def run_twin_stream(decoder, frames):
    state, outs = None, []
    with torch.no_grad():
        for memory, pos, _, ours in frames:
            out = decoder(memory, pos, state=state, track_keys=True, **ours)
            outs.append(out)
            state = out.state
    return outs


def assert_same_detections(out, ref):
    torch.testing.assert_close(out["all_cls_scores"], ref.cls_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["all_bbox_preds"], ref.bbox_preds, atol=1e-4, rtol=1e-5)


SETTINGS = [
    dict(r=0),  # tgGBC off: only the fused cross-attention
    dict(r=[20, 12, 0], k=5),  # every pruning layer, few voters
    dict(r=21, n=2, k=-1),  # the reference schedule (10, 11), all queries vote
]


# ---- equality with tggbc's own decoders -----------------------------------------------------------


@pytest.mark.parametrize("cross", ["PETRMultiheadAttention", "MultiheadAttention"])
@pytest.mark.parametrize("attention", ["fast", "reference"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_petr_patch_equals_tggbc_decoder(cross, attention, setting):
    head = petr_head(cross, distinct_branches=cross == "MultiheadAttention")
    decoder = twin(head)
    (x, masks, pos), (memory, key_pos, mask) = petr_inputs()
    tggbc.patch.apply(head, **setting, attention=attention, track_keys=True)
    decoder.pruner = tggbc.KeyPruner(**setting) if setting["r"] else None
    decoder.attention = attention
    with torch.no_grad():
        out = head(x, masks, pos)
        ref = decoder(memory, key_pos, mask, track_keys=True)
    assert_same_detections(out, ref)
    patch = tggbc.patch.patches(head)[0]
    assert patch.keys_per_layer == ref.keys_per_layer
    for ours, theirs in zip(patch.kept, ref.kept, strict=True):
        assert torch.equal(ours, theirs)
    if setting["r"]:  # the padded keys of sample 1 went first
        assert not masks.reshape(B, -1)[1, patch.kept[-1][1]].any()


@pytest.mark.parametrize("cross", ["PETRMultiheadFlashAttention", "PETRMultiheadAttention"])
@pytest.mark.parametrize("attention", ["fast", "reference"])
@pytest.mark.parametrize("setting", SETTINGS[:2])
def test_streampetr_patch_equals_tggbc_decoder_over_frames(cross, attention, setting):
    head = stream_head(cross, seed=3)
    decoder = twin(head)
    decoder.pruner = tggbc.KeyPruner(**setting) if setting["r"] else None
    decoder.attention = attention
    tggbc.patch.apply(head, **setting, attention=attention, track_keys=True)
    frames = stream_frames()
    refs = run_twin_stream(decoder, frames)
    head.reset_memory()
    for (memory, pos, data, _), ref in zip(frames, refs, strict=True):
        with torch.no_grad():
            out = head(memory, pos, **data)
        torch.testing.assert_close(out["all_cls_scores"], ref.cls_scores, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out["all_bbox_preds"], ref.bbox_preds, atol=1e-3, rtol=1e-4)
        patch = tggbc.patch.patches(head)[0]
        for ours, theirs in zip(patch.kept, ref.kept, strict=True):
            assert torch.equal(ours, theirs)
        # The memory bank the head carries to the next frame matches tggbc's explicit state.
        torch.testing.assert_close(head.memory_embedding[:, :MEMORY], ref.state.embedding, atol=1e-4, rtol=1e-4)
    assert patch.keys_per_layer == ([48, 28, 16] if setting["r"] else [48] * 3)


@pytest.mark.parametrize("attention", ["fast", "reference"])
def test_focalpetr_patch_equals_tggbc_decoder(attention):
    head = focal_head(seed=4)
    decoder = twin(head)
    _, (memory, key_pos, _) = petr_inputs(seed=5)
    decoder.pruner, decoder.attention = tggbc.KeyPruner(r=30, n=1, k=6), attention
    tggbc.patch.apply(head, r=30, n=1, k=6, attention=attention, track_keys=True)
    with torch.no_grad():
        out = head(memory, key_pos)
        ref = decoder(memory, key_pos, track_keys=True)
    assert_same_detections(out, ref)
    assert tggbc.patch.patches(head)[0].keys_per_layer == [48, 18, 18]
    assert all(torch.equal(a, b) for a, b in zip(tggbc.patch.patches(head)[0].kept, ref.kept, strict=True))


@settings(max_examples=12, deadline=None)
@given(
    first=st.integers(0, 30),
    second=st.integers(0, 15),
    k=st.sampled_from([-1, 1, 5, 24]),
    attention=st.sampled_from(["fast", "reference"]),
)
def test_kept_keys_equal_tggbc_for_any_schedule(first, second, k, attention):
    head = petr_head(seed=6, distinct_branches=True)
    decoder = twin(head)
    (x, masks, pos), (memory, key_pos, mask) = petr_inputs(seed=7)
    r = [first, second, 0]
    tggbc.patch.apply(head, r=r, k=k, attention=attention, track_keys=True)
    decoder.pruner = tggbc.KeyPruner(r=r, k=k) if any(r) else None
    decoder.attention = attention
    with torch.no_grad():
        out = head(x, masks, pos)
        ref = decoder(memory, key_pos, mask, track_keys=True)
    patch = tggbc.patch.patches(head)[0]
    assert patch.keys_per_layer == [48, 48 - first, 48 - first - second]
    assert all(torch.equal(a, b) for a, b in zip(patch.kept, ref.kept, strict=True))
    assert_same_detections(out, ref)


# ---- restore, idempotence, no copies -----------------------------------------------------------------


def snapshot(model):
    """Every module's attributes, but the memory bank StreamPETRHead's own forward reassigns."""
    return {
        name: {k: v for k, v in m.__dict__.items() if not k.startswith("memory_")} for name, m in model.named_modules()
    }


def assert_same_objects(before, after):
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        assert all(before[name][k] is after[name][k] for k in before[name]), name


@pytest.mark.parametrize("cross", ["PETRMultiheadFlashAttention", "PETRMultiheadAttention"])
def test_remove_restores_streampetr_bit_for_bit(cross):
    head = stream_head(cross, seed=8)
    frames = stream_frames(2)
    before_modules = snapshot(head)
    before = run_stream(head, frames)
    state = {k: (v, v.clone()) for k, v in head.state_dict(keep_vars=True).items()}
    tggbc.patch.apply(head, r=30, n=1, k=4)
    assert {k: v for k, v in head.state_dict(keep_vars=True).items()}.keys() == state.keys()
    assert all(head.state_dict(keep_vars=True)[k] is v for k, (v, _) in state.items())  # no copies, no new tensors
    patched = run_stream(head, frames)
    tggbc.patch.remove(head)
    after = run_stream(head, frames)
    assert_same_objects(before_modules, snapshot(head))
    assert tggbc.patch.patches(head) == []
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b["all_cls_scores"], a["all_cls_scores"])
        assert torch.equal(b["all_bbox_preds"], a["all_bbox_preds"])
    assert not torch.allclose(before[-1]["all_cls_scores"][-1], patched[-1]["all_cls_scores"][-1])
    assert all(torch.equal(v, copy) for v, copy in state.values())  # the weights were never written


def test_remove_restores_petr_and_an_instance_forward_of_the_users_own():
    head = petr_head()
    (x, masks, pos), _ = petr_inputs()
    wrapper = head.transformer.decoder.layers[1].attentions[1]
    own = wrapper.forward  # e.g. another tool's instance-level hook
    wrapper.forward = own
    with torch.no_grad():
        before = head(x, masks, pos)["all_cls_scores"]
        tggbc.patch.apply(head, r=[10, 10, 0], k=3)
        assert not torch.equal(head(x, masks, pos)["all_cls_scores"], before)
        tggbc.patch.remove(head)
        after = head(x, masks, pos)["all_cls_scores"]
    assert torch.equal(before, after)
    assert wrapper.__dict__["forward"] is own
    assert "forward" not in head.transformer.decoder.__dict__


@pytest.mark.parametrize("make", [petr_head, focal_head])
def test_reference_mode_without_pruning_is_the_original_bit_for_bit(make):
    """attention="reference", r=0: the patched loop calls the same layers with the same arguments and,
    for nn.MultiheadAttention, the module's own call: nothing may differ by a bit."""
    head = make("PETRMultiheadAttention")
    (x, masks, pos), (memory, key_pos, _) = petr_inputs()
    inputs = (x, masks, pos) if make is petr_head else (memory, key_pos)
    with torch.no_grad():
        before = head(*inputs)
        tggbc.patch.apply(head, attention="reference")
        patched = head(*inputs)
    assert torch.equal(before["all_cls_scores"], patched["all_cls_scores"])
    assert torch.equal(before["all_bbox_preds"], patched["all_bbox_preds"])


def test_apply_twice_does_not_stack():
    (x, masks, pos), _ = petr_inputs()
    once, twice = petr_head(), petr_head()
    tggbc.patch.apply(once, r=[12, 6, 0], k=4)
    tggbc.patch.apply(twice, r=[30, 0, 0], k=-1, attention="reference")
    forwards = [m.__dict__.get("forward") for m in twice.modules()]
    tggbc.patch.apply(twice, r=[12, 6, 0], k=4)
    assert [m.__dict__.get("forward") for m in twice.modules()] == forwards  # the same hooks, not new layers
    assert len(tggbc.patch.patches(twice)) == 1
    with torch.no_grad():
        torch.testing.assert_close(twice(x, masks, pos)["all_cls_scores"], once(x, masks, pos)["all_cls_scores"])
    assert tggbc.patch.patches(twice)[0].keys_per_layer == [48, 36, 30]
    tggbc.patch.remove(twice)
    assert all("forward" not in m.__dict__ and "_tggbc_patch" not in m.__dict__ for m in twice.modules())
    tggbc.patch.remove(twice)  # removing again is a no-op


def test_a_deep_copy_carries_its_own_patch():
    head = petr_head()
    (x, masks, pos), _ = petr_inputs()
    tggbc.patch.apply(head, r=[10, 10, 0], k=3)
    twin_head = copy.deepcopy(head)
    tggbc.patch.remove(head)
    with torch.no_grad():
        patched, original = twin_head(x, masks, pos), head(x, masks, pos)
        tggbc.patch.remove(twin_head)
        restored = twin_head(x, masks, pos)
    assert not torch.allclose(patched["all_cls_scores"], original["all_cls_scores"])
    assert torch.equal(restored["all_cls_scores"], original["all_cls_scores"])


def test_parameters_are_read_at_call_time():
    """No copies: a dtype change after apply is followed, and the patched float64 model equals the
    original float64 model."""
    head = focal_head(seed=9)
    _, (memory, key_pos, _) = petr_inputs()
    with torch.no_grad():
        tggbc.patch.apply(head)
        head.double()
        patched = head(memory.double(), key_pos.double())["all_cls_scores"]
        tggbc.patch.remove(head)
        original = head(memory.double(), key_pos.double())["all_cls_scores"]
    assert patched.dtype == torch.float64
    torch.testing.assert_close(patched, original, atol=1e-12, rtol=1e-12)


def test_flash_attn_is_never_called():
    """Where flash-attn cannot run (here: the stand-in kernel raises), the patched model still runs."""
    head = stream_head(seed=10)
    frames = stream_frames(1)
    real = S.FlashAttention.forward

    def unavailable(*args, **kwargs):
        raise RuntimeError("flash-attn cannot run here")

    S.FlashAttention.forward = unavailable
    try:
        with pytest.raises(RuntimeError, match="flash-attn cannot run"):
            run_stream(head, frames)
        tggbc.patch.apply(head, r=30, k=4)
        out = run_stream(head, frames)[0]
    finally:
        S.FlashAttention.forward = real
    assert torch.isfinite(out["all_bbox_preds"]).all()


def test_detector_in_a_data_parallel_wrapper():
    head = stream_head(seed=11)
    model = S.MMDataParallel(S.Petr3D(head, S.FocalHead(E), embed_dims=E))
    frames = stream_frames(2)
    decoder = twin(head)
    decoder.pruner = tggbc.KeyPruner(r=20, n=1, k=5)
    assert tggbc.patch.apply(model, r=20, n=1, k=5) is model
    (patch,) = tggbc.patch.patches(model)
    assert patch.head_path == "module.pts_bbox_head" and patch.kinds == ["flash"] * LAYERS
    head.reset_memory()
    for (memory, pos, data, _), ref in zip(frames, run_twin_stream(decoder, frames), strict=True):
        with torch.no_grad():
            out = model(memory, pos, **data)
        torch.testing.assert_close(out["all_cls_scores"], ref.cls_scores, atol=1e-4, rtol=1e-4)


def test_training_mode_with_checkpointing_runs_and_keeps_nothing():
    """with_cp layers recompute in backward; the patch must neither capture again nor hold rows."""
    head = petr_head(seed=12).train()
    (x, masks, pos), _ = petr_inputs()
    tggbc.patch.apply(head, r=[10, 10, 0], k=4)
    out = head(x.requires_grad_(True), masks, pos)
    (out["all_cls_scores"].sum() + out["all_bbox_preds"].sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    patch = tggbc.patch.patches(head)[0]
    assert patch.request is None and patch.captured is None and patch.keys_per_layer == [48, 38, 28]


# ---- what is not recognised raises, and changes nothing --------------------------------------------


class Odd(nn.Module):
    """A cross-attention that is not multi-head attention over keys."""

    def __init__(self):
        super().__init__()
        self.attn, self.batch_first = nn.Linear(E, E), False
        self.proj_drop, self.dropout_layer = nn.Dropout(0.0), nn.Identity()


def test_unknown_models_raise_and_stay_untouched():
    with pytest.raises(TypeError, match=r"no PETR-family head in Linear: expected .* found no child modules"):
        tggbc.patch.apply(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"found children \[0: Conv2d, 1: ReLU\]"):
        tggbc.patch.apply(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        tggbc.patch.apply("model.pth")

    head = petr_head()
    head.transformer.decoder.layers[2].attentions[1] = Odd()
    with pytest.raises(ValueError, match=r"layers\[2\].*attn is Linear .* expected nn.MultiheadAttention"):
        tggbc.patch.apply(S.Petr3D(head, embed_dims=E))
    assert all("_tggbc_patch" not in m.__dict__ and "forward" not in m.__dict__ for m in head.modules())

    head = petr_head()
    head.transformer.decoder.return_intermediate = False
    with pytest.raises(ValueError, match="return_intermediate=False: expected True"):
        tggbc.patch.apply(head)
    head = petr_head()
    head.transformer.decoder.layers[0].operation_order = ("self_attn", "norm", "ffn", "norm")
    with pytest.raises(ValueError, match="expected exactly one 'cross_attn'"):
        tggbc.patch.apply(head)
    head = petr_head()
    head.cls_branches = head.cls_branches[:2]
    with pytest.raises(ValueError, match="2 cls_branches for 3 decoder layers"):
        tggbc.patch.apply(head)


def test_bad_settings_raise_before_patching():
    head = petr_head()
    with pytest.raises(ValueError, match="attention must be one of"):
        tggbc.patch.apply(head, attention="flash")
    with pytest.raises(ValueError, match="merge"):
        tggbc.patch.apply(head, r=5, method="merge")
    with pytest.raises(ValueError, match="one entry per layer"):
        tggbc.patch.apply(head, r=[5, 5])
    assert tggbc.patch.patches(head) == []
    (x, masks, pos), _ = petr_inputs()
    tggbc.patch.apply(head, r=NUM_KEYS)  # only the key count tells: at the first forward
    with pytest.raises(ValueError, match="at least one key"), torch.no_grad():
        head(x, masks, pos)


def test_flash_attn_stub_lets_the_plugin_import():
    added = tggbc.patch.install_flash_attn_stub()
    try:
        assert added == ["flash_attn", "flash_attn.flash_attn_interface", "flash_attn.bert_padding"]
        from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input  # noqa: F401
        from flash_attn.flash_attn_interface import flash_attn_unpadded_kvpacked_func

        with pytest.raises(RuntimeError, match="tggbc.patch.apply"):
            flash_attn_unpadded_kvpacked_func(None)
        assert tggbc.patch.install_flash_attn_stub() == []  # now it imports: nothing more to do
    finally:
        for name in added:
            sys.modules.pop(name, None)
