"""Files tggbc writes: atomically, never over the user's without --force, checked before long work.

Every output is written to a temporary file beside its target and renamed over it only once
complete. Temporary names carry the writer's process id (`.tmp-<pid>-...`), so the leftovers of a
killed run are recognised and removed the next time anything is written to that directory.

Imports nothing but the standard library.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove `.tmp-<pid>-*` files and folders in `directory` whose writer no longer runs."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        pid = entry.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # somebody else's problem: never fail a run over a leftover
    return removed


def temp_prefix() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-"


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(temp_path)`, then rename the temp file to `path`; on failure nothing is left.

    The temp file sits in the target's directory (so the rename is atomic) and gets 0o644,
    since mkstemp makes it private and results and weights are meant to be shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(), suffix=path.suffix)
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


def read_json(path: str | os.PathLike, what: str = "file"):
    """Parsed JSON of `path`; a missing, unreadable or damaged file is an error naming it."""
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is damaged: not valid JSON ({e})") from None


def _check_writable(directory: Path, what: str, path: Path) -> None:
    """Prove that files can be made in `directory` (or, if it does not exist yet, that it can be
    created), or raise naming `what`. Leaves nothing behind but a killed run's removed leftovers."""
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {path}: {existing} is a file, not a directory")
    if existing != directory:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"{what} {path}: cannot create it, {existing} is not writable")
        return
    try:  # the directory exists: make and remove a file, which also catches read-only file systems
        fd, probe = tempfile.mkstemp(dir=directory, prefix=temp_prefix())
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"{what} {path}: cannot write there ({e.strerror or e})") from None
    clean_stale_temporaries(directory)


def prepare_output_file(path: str | os.PathLike, force: bool, what: str) -> Path:
    """Check, before any long work, that the output file `path` may and can be written.

    Refuses an existing file unless `force`, and anything that is not a regular file. Creates
    nothing: the file and its directories are made when it is written. `what` names the option
    in errors (e.g. "--json").
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if path.is_dir():
            raise IsADirectoryError(f"{what} {path} is a directory; give a file name")
        if not force:
            raise FileExistsError(f"{what} {path} exists: pass --force to replace it, or choose another name")
    _check_writable(path.parent, what, path)
    return path


def prepare_output_dir(path: str | os.PathLike, force: bool, what: str) -> Path:
    """Check, before any long work, that results may and can be written into directory `path`.

    Refuses a non-empty directory unless `force` (then files in it may be replaced), and a path
    that is a file. `what` names the option in errors (e.g. "--out").
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file; give a directory")
    if path.is_dir() and not force and any(p for p in path.iterdir() if not p.name.startswith(TEMP_PREFIX)):
        raise FileExistsError(f"{what} {path} is not empty: pass --force to replace its results, or choose another")
    _check_writable(path, what, path)
    return path
