"""Facts about processes on this machine, read from /proc (Linux)."""

from __future__ import annotations

import os


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state, ppid, pgrp, ..."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def state(pid: int) -> str | None:
    """The process's one-letter state (R, S, Z, ...), or None when there is no such process."""
    fields = _stat(pid)
    return fields[0] if fields else None


def start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot: with the pid, it names one
    process (a pid is reused; a pid and its start time are not)."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def group(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    out = []
    for pid in pids():
        fields = _stat(pid)
        if fields and fields[2] == str(pgid) and fields[0] != "Z":
            out.append(pid)
    return out


def cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def running(pid: int, *words: bytes) -> bool:
    """The process exists, is no zombie, and its command line holds every one of `words`."""
    line = cmdline(pid)
    if line is None or not all(w in line for w in words):
        return False
    return state(pid) not in (None, "Z")


def environ(pid: int) -> dict[bytes, bytes] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)


def pids() -> list[int]:
    return [int(d.name) for d in os.scandir("/proc") if d.name.isdigit()]


def tagged(key: bytes, value: bytes) -> list[int]:
    """Live processes whose environment has `key=value` (UGRO tags each job's processes)."""
    out = []
    for pid in pids():
        env = environ(pid)
        if env is not None and env.get(key) == value and state(pid) not in (None, "Z"):
            out.append(pid)
    return out
