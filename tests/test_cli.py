"""The command line: help, the schedule command, argument errors."""

import argparse
import subprocess
import sys

import pytest

from tggbc.cli import main, r_argument
from tggbc.prune import parse_r


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "schedule", "bench", "export", "data", "train", "eval"):
        assert command in out


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "tggbc.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "tgGBC" in proc.stdout


def test_schedule_command(capsys):
    assert main(["schedule", "--r", "0.875", "--keys", "24000"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows[0] == ["1", "24000", "21000"]
    assert rows[1] == ["2", "3000", "0"]
    assert len(rows) == 6


def test_schedule_command_reports_bad_settings(capsys):
    assert main(["schedule", "--r", "24000", "--keys", "24000"]) == 2
    err = capsys.readouterr().err
    assert "24000" in err and "at least one key" in err


@pytest.mark.parametrize("text, value", [("21000", 21000), ("0.875", 0.875), ("5,0,3", [5, 0, 3])])
def test_parse_r(text, value):
    assert parse_r(text) == value


def test_parse_r_rejects_garbage():
    with pytest.raises(ValueError, match="'abc'"):
        parse_r("abc")
    with pytest.raises(argparse.ArgumentTypeError, match="'1,x'"):
        r_argument("1,x")
