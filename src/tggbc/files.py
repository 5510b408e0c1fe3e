"""Atomic file writing: a temp file beside the target, renamed over it only once complete.

Imports nothing but the standard library.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(temp_path)`, then rename the temp file to `path`; on failure nothing is left.

    The temp file sits in the target's directory (so the rename is atomic) and gets 0o644,
    since mkstemp makes it private and results and weights are meant to be shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, payload: dict) -> Path:
    """Write `payload` as indented JSON to `path`, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")

    return write_atomic(path, write)
