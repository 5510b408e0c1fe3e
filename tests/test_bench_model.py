"""`tggbc bench --model`: whole-detector latency on tiny settings; consistent parts, early refusals."""

import json

import pytest

from tggbc.cli import main
from tggbc.model_bench import PARTS, run_model_benchmark

SMALL = dict(num_layers=2, embed_dims=32, num_heads=4, ffn_dims=64, neck_channels=32, num_query=20, max_num=40)


def test_parts_add_up_and_tggbc_prunes():
    results, info = run_model_benchmark(
        "stream_petr_r50_flash_704_bs2_seq_24e",
        image_size=(64, 96),
        runs=2,
        warmup=0,
        methods=("dense", "tggbc", "reference"),
        progress=False,
        num_propagated=8,
        memory_len=24,
        topk_proposals=8,
        **SMALL,
    )
    assert info["keys"] == 144 and (info["r"], info["n"], info["k"]) == (0.875, 1, 175)
    dense, fast, reference = results
    assert [r.method for r in results] == ["dense", "tggbc", "reference"]
    assert dense.keys_per_layer == [144, 144] and fast.keys_per_layer == reference.keys_per_layer == [144, 18]
    assert dense.speedup == 1.0 and dense.decoder_speedup == 1.0
    for r in results:
        assert len(r.times_ms) == 2 and r.median_ms == pytest.approx(sum(r.times_ms) / 2)
        assert set(r.parts_ms) == {*PARTS, "other"} and all(r.parts_ms[p] > 0 for p in PARTS)
        # The parts are timed inside the whole forward: medians of per-run sums that equal each run's total.
        assert sum(r.parts_ms.values()) == pytest.approx(r.median_ms, rel=0.25)
        assert 0 < r.decoder_share < 1 and r.decoder_share == pytest.approx(r.parts_ms["decoder"] / r.median_ms)


def test_bench_model_command_writes_json(tmp_path, capsys):
    out = tmp_path / "model.json"
    args = ["bench", "--model", "petr-r50-704x256", "--image-size", "64x96", "--runs", "1", "--warmup", "0"]
    assert main([*args, "--no-progress", "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "petrv1_r50_flash_704_24e" in table and "dec share" in table
    payload = json.loads(out.read_text())
    assert payload["model"]["image_size"] == [64, 96] and payload["model"]["keys"] == 144
    assert [r["method"] for r in payload["results"]] == ["dense", "tggbc"]
    assert payload["results"][1]["keys_per_layer"] == [144] + [18] * 5
    # The JSON is not replaced without --force, before any timing.
    assert main([*args, "--no-progress", "--json", str(out)]) == 2
    assert "exists: pass --force" in capsys.readouterr().err


def test_bench_model_refuses_bad_settings_early(capsys):
    base = ["bench", "--image-size", "64x96", "--runs", "1", "--no-progress"]
    # The published r=21000 cannot be dropped from 144 keys.
    assert main([*base, "--model", "streampetr_vov_1600x640_bs2x2_24e_gbc_r21000_n1_k175"]) == 2
    assert "21000" in capsys.readouterr().err
    assert main([*base, "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main([*base, "--model", "petr-r50-704x256", "--preset", "tiny"]) == 2
    assert "drop --preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model", "petr-r50-704x256", "--image-size", "100x96"])
    assert "multiples of 32" in capsys.readouterr().err
