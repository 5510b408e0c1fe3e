"""`tggbc bench` on a tiny setting: it runs, its JSON is consistent, bad settings fail early."""

import json

import pytest

from tggbc.bench import METHODS, run_benchmark
from tggbc.cli import main
from tggbc.measure import count_flops
from tggbc.models.configs import DecoderPreset

TINY = ["--kind", "focalpetr", "--keys", "96", "--queries", "40", "--r", "0.5", "--k", "8"]


def test_bench_json_is_consistent(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--runs", "2", "--warmup", "1", "--no-progress", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for method in METHODS:
        assert method in table
    payload = json.loads(out.read_text())
    assert set(payload) == {"preset", "setting", "env", "results"}
    assert payload["setting"]["keys"] == 96
    assert [r["method"] for r in payload["results"]] == list(METHODS)
    for r in payload["results"]:  # the summary figures are those of the timed runs stored beside them
        assert len(r["times_ms"]) == 2 and r["min_ms"] == min(r["times_ms"]) and r["max_ms"] == max(r["times_ms"])
        assert r["median_ms"] == pytest.approx(sum(r["times_ms"]) / 2)
    dense, reference, fast = payload["results"]
    assert dense["keys_per_layer"] == [96] * 6
    assert fast["keys_per_layer"] == reference["keys_per_layer"] == [96] + [48] * 5
    assert fast["speedup"] == pytest.approx(dense["median_ms"] / fast["median_ms"])
    assert dense["prune_ms"] == 0.0 and fast["prune_ms"] > 0
    # Fewer keys, fewer FLOPs: the pruned decoders count strictly less work than the dense one.
    assert fast["gflops"] < dense["gflops"]
    assert fast["flop_ratio"] == pytest.approx(dense["gflops"] / fast["gflops"])


def test_count_flops_counts_a_matmul():
    import torch

    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "nope"], "unknown preset"),
        (["--keys", "100", "--r", "100"], "at least one key"),
        (["--methods", "dense,turbo"], "turbo"),
    ],
)
def test_bench_bad_settings(argv, message, capsys):
    assert main(["bench", "--kind", "focalpetr", "--keys", "64", *argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_bench_bad_numbers_stop_at_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--kind", "focalpetr", "--keys", "64", "--runs", "0"])
    assert e.value.code == 2 and "argument --runs: must be an integer >= 1, got '0'" in capsys.readouterr().err


def test_run_benchmark_single_method():
    results = run_benchmark(DecoderPreset("petr", 64, 16, n=2, k=4), queries=20, warmup=0, runs=1, methods=("fast",))
    assert [r.method for r in results] == ["fast"]
    assert results[0].keys_per_layer == [64, 56, 48, 48, 48, 48]
