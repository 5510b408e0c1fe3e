"""`tggbc eval --model` end to end on generated scenes: the submission and scores, a resumed run
equal to an uninterrupted one, two torchrun processes equal to one, and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nuscenes", reason="the devkit lists samples and scores submissions")

import tggbc  # noqa: E402
from nuscenes_data import random_weights, synth_dataset  # noqa: E402
from tggbc.cli import main  # noqa: E402
from tggbc.nuscenes import published  # noqa: E402
from tggbc.nuscenes.submission import ORIGINAL_SUBMISSION_META  # noqa: E402

MODEL = "stream_petr_r50_flash_704_bs2_seq_428q_nui_24e"  # temporal, and the smallest decoder


def eval_args(out, *extra):
    return [
        "eval", "--model", MODEL, "--weights", str(random_weights(MODEL)), "--dataroot", str(synth_dataset()),
        "--image-size", "64x160", "--out", str(out), "--threads", "1", "--workers", "0", "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "one"
    assert main(eval_args(out)) == 0
    return out


def submission(out, setting):
    return (Path(out) / setting / "results_nusc.json").read_bytes()


@pytest.mark.slow
def test_one_process_run(single_run, capsys):
    results = json.loads((single_run / "results.json").read_text())
    rows = {r["name"]: r for r in results["results"]}
    assert list(rows) == ["dense", "tggbc"]
    assert rows["dense"]["keys_per_layer"] == [240] * 6 and rows["tggbc"]["keys_per_layer"] == [240] + [30] * 5
    assert (rows["tggbc"]["r"], rows["tggbc"]["n"], rows["tggbc"]["k"]) == (0.875, 1, 175)
    assert results["run"]["samples"] == 9 and results["run"]["scenes"] == 3
    for row in rows.values():
        assert 0 <= row["mAP"] <= 1 and 0 <= row["NDS"] <= 1 and row["frames"] == 9
        assert set(row["tp_errors"]) == {"trans_err", "scale_err", "orient_err", "vel_err", "attr_err"}
        assert row["e2e_ms"] > row["decoder_ms"] > 0
        summary = json.loads((single_run / row["name"] / "metrics_summary.json").read_text())
        assert summary["mean_ap"] == row["mAP"] and summary["nd_score"] == row["NDS"]
    sub = json.loads(submission(single_run, "tggbc"))
    assert sub["meta"] == ORIGINAL_SUBMISSION_META
    frames = json.loads((single_run / "records.json").read_text())["records"]
    assert list(sub["results"]) == [r["token"] for r in frames]
    boxes = [b for v in sub["results"].values() for b in v]
    assert all(0 < len(v) <= 300 for v in sub["results"].values())
    assert set(boxes[0]) == {"sample_token", "translation", "size", "rotation", "velocity", "detection_name",
                             "detection_score", "attribute_name"}  # fmt: skip


@pytest.mark.slow
def test_interrupted_run_resumes_without_redoing_scenes(single_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "resumed"
    calls = []
    original = published.SceneRunner.__call__

    def interrupted(self, batch):
        calls.append(int(batch["index"]))
        if len(calls) == 5:  # the middle of the second scene
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(published.SceneRunner, "__call__", interrupted)
    assert main(eval_args(out)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(list((out / "scenes").glob("*.npz"))) == 1 and not (out / "results.json").exists()

    calls.clear()
    monkeypatch.setattr(published.SceneRunner, "__call__", lambda self, batch: calls.append(1) or original(self, batch))
    assert main(eval_args(out)) == 0
    assert "1 of 3 scenes already done" in capsys.readouterr().out
    assert len(calls) == 6  # the two unfinished scenes only
    for setting in ("dense", "tggbc"):
        assert submission(out, setting) == submission(single_run, setting)


@pytest.mark.slow
def test_two_torchrun_processes_equal_one(single_run, tmp_path):
    out = tmp_path / "sharded"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(tggbc.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tggbc"]
    proc = subprocess.run(command + eval_args(out), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    for setting in ("dense", "tggbc"):
        assert submission(out, setting) == submission(single_run, setting)
    one = json.loads((single_run / "results.json").read_text())["results"]
    two = json.loads((out / "results.json").read_text())["results"]
    assert [(r["mAP"], r["NDS"]) for r in one] == [(r["mAP"], r["NDS"]) for r in two]


@pytest.mark.slow
def test_another_run_in_the_same_out_is_refused(single_run, tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "run.json").write_text((single_run / "run.json").read_text())
    assert main(eval_args(out, "--methods", "dense")) == 2
    assert "holds another run (it differs in settings)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fractions", "0.5"], "--fractions is the small detector's option"),
        (["--n", "2"], "--n needs --r"),
        (["--r", "300"], "drops 300 keys but the decoder starts with only 240"),
        (["--methods", "dense,prune"], "distinct names"),
        (["--version", "v1.0-mini"], "has no v1.0-mini tables"),
    ],
)
def test_refusals(extra, message, tmp_path, capsys):
    assert main(eval_args(tmp_path / "o", *extra)) == 2
    assert message in capsys.readouterr().err


def test_refusals_before_reading_weights(tmp_path, capsys):
    base = ["eval", "--dataroot", str(synth_dataset()), "--out", str(tmp_path / "o")]
    assert main([*base, "--model", MODEL]) == 2
    assert "--model needs --weights" in capsys.readouterr().err
    assert main([*base, "--model", "petr-r99", "--weights", str(random_weights(MODEL))]) == 2
    assert "unknown model 'petr-r99'" in capsys.readouterr().err
    other = ["--model", "petrv1_r50_flash_704_24e", "--weights", str(random_weights(MODEL))]
    assert main([*base, *other]) == 2
    assert f"holds '{MODEL}', not 'petrv1_r50_flash_704_24e'" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path / "o")]) == 2  # the small detector still needs --data
    assert "required: --data" in capsys.readouterr().err
