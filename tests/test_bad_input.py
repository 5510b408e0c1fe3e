"""Bad input and faults, one test per class: a clear error naming the culprit, nothing on disk
changed, nothing unpickled, Ctrl-C as one line with status 130, no leftovers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tggbc import KeyPruner, gather_keys, prune_schedule
from tggbc.cli import main
from tggbc.files import clean_stale_temporaries, prepare_output_dir, prepare_output_file, write_json_atomic

TINY_BENCH = ["--kind", "focalpetr", "--keys", "64", "--queries", "8", "--k", "4", "--runs", "1", "--warmup", "0"]


def run(argv, capsys):
    """(exit status, stderr) of one command."""
    code = main(argv)
    return code, capsys.readouterr().err


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- code execution


class Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_with_code_is_refused_without_running_it(tmp_path, capsys):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    run_dir.mkdir()
    torch.save({"model": Payload(str(marker))}, run_dir / "checkpoint.pt")
    data = tmp_path / "data"
    data.mkdir()
    code, err = run(["train", "--data", str(data), "--out", str(run_dir), "--resume"], capsys)
    assert code == 2 and "checkpoint.pt" in err and "not a readable tggbc checkpoint" in err
    assert not marker.exists()


# ---------------------------------------------------------------- nothing overwritten


def test_outputs_are_not_overwritten_without_force(tmp_path, capsys):
    existing = tmp_path / "bench.json"
    existing.write_text("mine")
    code, err = run(["bench", *TINY_BENCH, "--no-progress", "--json", str(existing)], capsys)
    assert code == 2 and "--json" in err and "--force" in err and existing.read_text() == "mine"

    onnx_file = tmp_path / "graph.onnx"
    onnx_file.write_text("mine")
    code, err = run(["export", "--preset", "tiny", "--out", str(onnx_file)], capsys)
    assert code == 2 and "--out" in err and "--force" in err and onnx_file.read_text() == "mine"

    results = tmp_path / "eval"
    results.mkdir()
    (results / "results.json").write_text("mine")
    data = tmp_path / "data"
    data.mkdir()
    code, err = run(["eval", "--data", str(data), "--out", str(results)], capsys)
    assert code == 2 and "not empty" in err and (results / "results.json").read_text() == "mine"


def test_force_replaces_and_a_bad_place_is_refused_before_any_work(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    assert prepare_output_file(target, force=True, what="--json") == target
    with pytest.raises(IsADirectoryError, match="--json"):
        prepare_output_file(tmp_path, force=True, what="--json")
    with pytest.raises(NotADirectoryError, match="--out"):
        prepare_output_dir(target, force=True, what="--out")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="cannot write"):
            prepare_output_file(locked / "x.json", force=False, what="--json")


# ---------------------------------------------------------------- silently wrong before


def test_settings_that_would_prune_nothing_or_the_wrong_keys_are_refused():
    with pytest.raises(ValueError, match="n=0"):
        prune_schedule(10, n=0, num_layers=6)
    with pytest.raises(ValueError, match="n=0"):
        KeyPruner(r=10, n=0)
    pruner = KeyPruner(r=4)
    pruner.reset(10, 2)
    key = torch.randn(1, 10, 8)
    with pytest.raises(ValueError, match="value has shape .* key counts differ"):
        pruner.step(0, torch.randn(1, 3, 2), torch.rand(1, 3, 10), key, torch.randn(1, 9, 8))
    with pytest.raises(ValueError, match=r"\[0, 10\).*-1"):
        gather_keys(torch.tensor([[-1, 2]]), key)
    with pytest.raises(TypeError, match="torch.long"):
        gather_keys(torch.tensor([[1, 2]], dtype=torch.int32), key)


def test_a_truncated_jpeg_is_named_not_read_as_grey(tmp_path):
    import cv2
    import numpy as np

    from tggbc.data.frames import read_jpeg

    path = tmp_path / "cam.jpg"
    cv2.imwrite(str(path), np.full((32, 64, 3), 200, np.uint8))
    assert read_jpeg(str(path)).shape == (32, 64, 3)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ValueError, match="cam.jpg is damaged"):
        read_jpeg(str(path))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--data", ".", "--out", "x", "--batch", "0"], "argument --batch: must be an integer >= 1"),
        (["bench", "--keys", "0"], "argument --keys: must be an integer >= 1"),
        (["bench", "--threads", "0"], "argument --threads: must be an integer >= 1"),
        (["bench", "--device", "tpu"], "argument --device"),
        (["export", "--preset", "tiny", "--out", "x.onnx", "--opset", "abc"], "argument --opset"),
        (["data", "synth", "--out", "x", "--val-fraction", "2"], "argument --val-fraction: must be a number in [0, 1]"),
        (["eval", "--data", "/nonexistent", "--out", "x"], "argument --data: no such directory: /nonexistent"),
        (["schedule", "--r", "abc"], "argument --r: r must be an int"),
    ],
)
def test_bad_numbers_and_paths_name_the_option(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_an_opset_the_exporter_cannot_write_is_refused(tmp_path, capsys):
    pytest.importorskip("onnx", reason="export needs onnx")
    pytest.importorskip("onnxscript", reason="export needs onnxscript")
    out = tmp_path / "x.onnx"
    code, err = run(["export", "--preset", "tiny", "--out", str(out), "--opset", "5"], capsys)
    assert code == 2 and "opset must be an int in [18" in err and not out.exists()


def test_resume_without_a_checkpoint_or_with_a_damaged_one(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    code, err = run(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--resume"], capsys)
    assert code == 2 and "no checkpoint" in err and not (tmp_path / "run").exists()
    run_dir = tmp_path / "cut"
    run_dir.mkdir()
    torch.save({"model": {"w": torch.zeros(1000)}}, run_dir / "checkpoint.pt")
    raw = (run_dir / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(raw[: len(raw) // 2])
    code, err = run(["train", "--data", str(data), "--out", str(run_dir), "--resume"], capsys)
    assert code == 2 and "checkpoint.pt is not a readable tggbc checkpoint" in err


# ---------------------------------------------------------------- unclear before


def test_damaged_files_are_named(tmp_path, capsys):
    from tggbc.data import generate
    from tggbc.data.frames import list_frames

    root = generate(tmp_path / "data", num_scenes=1, seed=0, image_size=(64, 32), frames_per_scene=2,
                    val_fraction=1.0, progress=False)  # fmt: skip
    before = snapshot(root)
    for name in ("synth_meta.json", "v1.0-trainval/splits.json", "v1.0-trainval/sample.json"):
        path = root / name
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 2])
        with pytest.raises(ValueError, match=f"{path.name} is damaged"):
            list_frames(root, "val")
        path.write_bytes(good)
    assert snapshot(root) == before
    data = tmp_path / "empty"
    data.mkdir()
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    code, err = run(["eval", "--data", str(data), "--weights", str(weights), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "w.safetensors" in err
    code, err = run(["eval", "--data", str(data), "--fractions", "abc", "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and "--fractions" in err and "'abc'" in err


# ---------------------------------------------------------------- Ctrl-C and leftovers


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    import tggbc.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tggbc.cli, "run", interrupted)  # the `schedule` command's run
    code, err = run(["schedule"], capsys)
    assert code == 130 and err.strip() == "tggbc schedule: interrupted"


def test_leftovers_of_a_killed_writer_are_removed_at_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".tmp-{pid}-results.json"
    stale.write_text("half")
    stale_dir = tmp_path / f".tmp-{pid}-dataroot"
    stale_dir.mkdir()
    mine = tmp_path / f".tmp-{os.getpid()}-in-progress"
    mine.write_text("still being written")
    write_json_atomic(tmp_path / "results.json", {"ok": 1})
    assert not stale.exists() and not stale_dir.exists() and mine.exists()
    assert json.loads((tmp_path / "results.json").read_text()) == {"ok": 1}
    assert clean_stale_temporaries(tmp_path) == []


@pytest.mark.slow
def test_interrupting_data_synth_stops_its_workers_and_leaves_nothing(tmp_path):
    out = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tggbc.cli", "data", "synth", "--out", str(out), "--scenes", "40", "--workers", "2",
         "--width", "176", "--height", "64", "--quiet"],
        stderr=subprocess.PIPE, text=True,
        # A shell's background job inherits SIGINT ignored, and Python then installs no handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    children: set[int] = set()
    deadline = time.time() + 60
    while time.time() < deadline and len(children) < 2:
        time.sleep(0.2)
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            children |= {int(c) for c in (task / "children").read_text().split()}
    assert len(children) >= 2, "the workers did not start"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "tggbc data: interrupted"
    time.sleep(0.5)
    assert not [c for c in children if Path(f"/proc/{c}").exists()], "a worker outlived the command"
    assert not out.exists() and not [p for p in tmp_path.iterdir()]  # no dataroot, no staging folder
