"""State on disk: whole files replaced atomically, logs appended under a lock.

A reader never sees half a file: JSON goes to a temp file in the same
directory, is fsynced, then renamed over the old one. Appends take an
exclusive flock so concurrent writers never interleave within a line. A write
that fails (disk full, no permission, read-only) raises `WriteError`, one line
naming the path, and leaves the old file as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UgroError


class WriteError(UgroError):
    """The control node could not write a file of its own."""

    def __init__(self, path: Path, exc: OSError):
        super().__init__(f"cannot write {path}: {exc.strerror or exc}")
        self.path, self.errno = path, exc.errno


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError in the block into a `WriteError` naming `path`."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(path, exc) from None


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    with writing(path), replacing(path) as tmp, tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temp path beside `path` to write whole; renamed over `path` only if the block succeeds.

    For writers that want a path of their own (a log formatter, matplotlib, paramiko's
    `HostKeys.save`): whatever they leave half-written is removed, never seen.
    """
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str) -> None:
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(line.rstrip("\n") + "\n")
            f.flush()


def append_json(path: Path, data: Any) -> None:
    append_line(path, json.dumps(data, sort_keys=True, default=str))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a lock file) for a read-modify-write."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        f = path.open("a")
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def json_lines(text: str) -> tuple[list[tuple[int, Any]], list[int]]:
    """The values of a JSON-lines text as (line number, value), and the numbers of the lines
    that are not JSON. Blank lines are skipped.

    The whole text is parsed in one call when every line is a sound object (a history of
    10,000 jobs in a few milliseconds, where a call per line takes ten times as long); only a
    damaged text is read line by line to find the bad lines.
    """
    numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    values = None
    # Joined, lines that are each one object cannot be mistaken for anything else: a torn
    # line (`{"a": 1, "b`) makes the whole text invalid, and the values are counted.
    if all(line[0] == "{" and line[-1] == "}" for _, line in numbered):
        try:
            values = json.loads("[" + ",".join(line for _, line in numbered) + "]")
        except (ValueError, RecursionError):
            values = None
    if isinstance(values, list) and len(values) == len(numbered):
        return [(n, v) for (n, _), v in zip(numbered, values, strict=True)], []
    good, bad = [], []
    for n, line in numbered:
        try:
            good.append((n, json.loads(line)))
        except (ValueError, RecursionError):
            bad.append(n)
    return good, bad
