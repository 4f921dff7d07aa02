"""Job records on the control node: `data/experiments/<job id>/` and the history.

Layout of one job directory:
    config.json     the resolved settings, each node's command line, git state
    metadata.json   status and times, per-node state (written atomically)
    logs/<node>.log the node's output, each line prefixed with node and rank
    metrics.jsonl   rank 0's metrics; checkpoints/, artifacts/
`data/job_history.jsonl` gets one line per finished job.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import store
from .errors import UgroError

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED",
)
ACTIVE = (PENDING, RUNNING)
TERMINAL = (COMPLETED, FAILED, CANCELLED)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def validate_name(name: str | None) -> str:
    if not name:
        raise UgroError("a job name is required (--name NAME)")
    if not NAME_RE.match(name) or name in (".", ".."):
        raise UgroError(
            f"invalid job name {name!r}: use 1-64 letters, digits, '.', '_' or '-'"
        )
    return name


class Jobs:
    """The job records under one data directory."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "experiments"
        self.history = self.data_dir / "job_history.jsonl"

    def dir(self, job_id: str) -> Path:
        return self.root / job_id

    def create(self, name: str, when: datetime | None = None) -> str:
        """A new job directory with a unique id `<name>_<YYYYmmdd_HHMMSS>[_N]`."""
        validate_name(name)
        stamp = (when or datetime.now()).strftime("%Y%m%d_%H%M%S")
        self.root.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            job_id = f"{name}_{stamp}" + (f"_{n}" if n > 1 else "")
            try:
                self.dir(job_id).mkdir()  # atomic: two launches never share an id
            except FileExistsError:
                continue
            for sub in ("logs", "checkpoints", "artifacts"):
                (self.dir(job_id) / sub).mkdir()
            return job_id
        raise UgroError(f"too many jobs named {name} in one second")

    # -- metadata -----------------------------------------------------------
    def metadata(self, job_id: str) -> dict:
        path = self.dir(job_id) / "metadata.json"
        try:
            return store.read_json(path)
        except FileNotFoundError:
            raise UgroError(f"job {job_id}: no metadata.json") from None
        except ValueError as exc:
            raise UgroError(f"job {job_id}: metadata.json is damaged ({exc})") from None

    def write_metadata(self, job_id: str, meta: dict) -> None:
        store.write_json(self.dir(job_id) / "metadata.json", meta)

    def update(self, job_id: str, change: Callable[[dict], Any]) -> dict:
        """Read-modify-write metadata under the job's lock; returns the new metadata."""
        with store.locked(self.dir(job_id) / ".lock"):
            meta = self.metadata(job_id)
            change(meta)
            self.write_metadata(job_id, meta)
            return meta

    def finish(self, job_id: str, status: str, **fields) -> dict:
        """Move a job to a final status once; a job already final keeps its status.

        `inv cancel` and the supervisor may both finish the same job: whoever is
        first decides the status, the other only adds its per-node facts.
        """
        first = []

        def change(meta):
            for key, value in fields.items():
                if key == "nodes":
                    for name, facts in value.items():
                        meta["nodes"].setdefault(name, {}).update(facts)
                elif meta["status"] not in TERMINAL or key not in meta:
                    meta[key] = value
            if meta["status"] not in TERMINAL:
                meta["status"] = status
                meta["ended_at"] = now()
                first.append(True)

        meta = self.update(job_id, change)
        if first:
            store.append_json(self.history, history_line(meta))
        return meta

    def config(self, job_id: str) -> dict:
        try:
            return store.read_json(self.dir(job_id) / "config.json")
        except (FileNotFoundError, ValueError) as exc:
            raise UgroError(f"job {job_id}: config.json unreadable ({exc})") from None

    # -- finding jobs -------------------------------------------------------
    def ids(self) -> list[str]:
        """Every job id, newest first."""
        if not self.root.is_dir():
            return []
        ids = [p.name for p in self.root.iterdir() if (p / "metadata.json").exists()]
        return sorted(ids, key=started_key, reverse=True)

    def find(self, name_or_id: str) -> str:
        """A job id by exact id, or the latest job with that name."""
        validate_name(name_or_id)
        if (self.dir(name_or_id) / "metadata.json").exists():
            return name_or_id
        ids = self.ids()
        matches = [j for j in ids if job_name(j) == name_or_id]
        if matches:
            return matches[0]
        names = sorted({job_name(j) for j in ids})
        close = difflib.get_close_matches(name_or_id, names + ids, n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}" if close else (
            f"; known jobs: {', '.join(names[:10])}" if names else "; no jobs yet")
        raise UgroError(f"no job named {name_or_id!r}{hint}")

    def active(self) -> list[str]:
        out = []
        for job_id in self.ids():
            try:
                if self.metadata(job_id)["status"] in ACTIVE:
                    out.append(job_id)
            except UgroError:
                continue
        return out


def job_name(job_id: str) -> str:
    return re.sub(r"_\d{8}_\d{6}(_\d+)?$", "", job_id)


def started_key(job_id: str) -> str:
    m = re.search(r"_(\d{8}_\d{6})(?:_(\d+))?$", job_id)
    if not m:
        return ""
    return f"{m.group(1)}_{int(m.group(2) or 1):04d}"


def history_line(meta: dict) -> dict:
    return {
        "job_id": meta["job_id"],
        "name": meta["name"],
        "status": meta["status"],
        "started_at": meta.get("started_at"),
        "ended_at": meta.get("ended_at"),
        "nodes": list(meta.get("nodes", {})),
        "world_size": meta.get("world_size"),
        "error": (meta.get("failure") or {}).get("summary") or meta.get("error"),
    }


def git_state(root: Path) -> dict:
    """The project's commit and whether the tree had uncommitted changes."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                              text=True, timeout=10, env={**os.environ, "LC_ALL": "C"})

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
