"""build_decoder / example_inputs for every kind, and a light `import tggbc.models`."""

import subprocess
import sys

import pytest
import torch

from tggbc import KeyPruner
from tggbc.models import (
    DECODERS,
    FocalPETRDecoder,
    PETRDecoder,
    StreamPETRDecoder,
    TemporalState,
    build_decoder,
    example_inputs,
)

TINY = dict(num_layers=2, embed_dims=16, num_heads=2, ffn_dims=32, num_queries=10)
STREAM = dict(num_propagated=4, memory_len=12, topk_proposals=4)


@pytest.mark.parametrize(
    "kind, cls", [("petr", PETRDecoder), ("streampetr", StreamPETRDecoder), ("FocalPETR", FocalPETRDecoder)]
)
def test_build_decoder_kinds(kind, cls):
    extra = STREAM if cls is StreamPETRDecoder else {}
    pruner = KeyPruner(r=5)
    decoder = build_decoder(kind, **TINY, **extra, pruner=pruner, attention="reference")
    assert type(decoder) is cls
    assert decoder.pruner is pruner and decoder.attention == "reference" and len(decoder.layers) == 2


def test_build_decoder_rejects_unknown_kind_and_bad_arguments():
    with pytest.raises(ValueError, match=r"known kinds: \['focalpetr', 'petr', 'streampetr'\]"):
        build_decoder("detr3d")
    with pytest.raises(TypeError):
        build_decoder("petr", num_querys=5)
    with pytest.raises(ValueError, match="num_layers"):
        build_decoder("petr", num_layers=0)
    with pytest.raises(ValueError, match="memory_len"):
        build_decoder("streampetr", **TINY, num_propagated=20, memory_len=12)
    assert sorted(DECODERS) == ["focalpetr", "petr", "streampetr"]


@pytest.mark.parametrize("kind", ["petr", "streampetr", "focalpetr"])
@pytest.mark.parametrize("batch", [1, 2])
def test_example_inputs_run_every_kind(kind, batch):
    decoder = build_decoder(kind, **TINY, **(STREAM if kind == "streampetr" else {})).eval()
    inputs = example_inputs(decoder, num_keys=30, batch=batch, seed=3, padded_fraction=0.2)
    assert inputs["memory"].shape == (batch, 30, 16) and inputs["key_pos"].shape == (batch, 30, 16)
    assert inputs["key_padding_mask"].dtype == torch.bool and int(inputs["key_padding_mask"][0].sum()) == 6
    if kind == "streampetr":
        state = inputs["state"]
        assert isinstance(state, TemporalState) and state.memory_len == 12 and state.batch_size == batch
        assert state.timestamp.dtype == torch.float64
    else:
        assert set(inputs) == {"memory", "key_pos", "key_padding_mask"}
    with torch.inference_mode():
        out = decoder(**inputs)
    queries = 14 if kind == "streampetr" else 10
    assert out.cls_scores.shape == (2, batch, queries, 10) and out.keys_per_layer == [30, 30]
    # Same seed, same inputs.
    again = example_inputs(decoder, num_keys=30, batch=batch, seed=3, padded_fraction=0.2)
    assert torch.equal(again["memory"], inputs["memory"])


def test_example_inputs_validation():
    decoder = build_decoder("petr", **TINY)
    assert example_inputs(decoder, 8)["key_padding_mask"] is None
    with pytest.raises(ValueError, match="num_keys"):
        example_inputs(decoder, 0)
    with pytest.raises(ValueError, match="padded_fraction"):
        example_inputs(decoder, 8, padded_fraction=1.0)
    with pytest.raises(TypeError, match="decoders"):
        example_inputs(torch.nn.Linear(2, 2), 8)


def test_import_is_light():
    # Whatever torch pulls in is fine; tggbc.models itself may add only tggbc and the stdlib.
    code = (
        "import sys, torch; before = set(sys.modules); import tggbc.models; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(m for m in new if m != 'tggbc' and m not in sys.stdlib_module_names))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
