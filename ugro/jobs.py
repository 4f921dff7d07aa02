"""Job records on the control node: `data/experiments/<job id>/` and the history.

Layout of one job directory:
    config.json     the resolved settings, each node's command line, git state
    metadata.json   status and times, per-node state (written atomically)
    logs/<node>.log the node's output, each line prefixed with node and rank
    metrics.jsonl   rank 0's metrics; checkpoints/, artifacts/
`data/job_history.jsonl` gets one line per finished job.

Every change of a job's state is one method here (`begin`, `mark_running`,
`request_cancel`, `finish`, ...), each a read-modify-write of `metadata.json`
under the job's lock.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import store
from .errors import UgroError
from .state import Failure, JobStatus, NodeStatus, is_active, is_terminal
from .wording import suggestion

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


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

    # -- reading ------------------------------------------------------------
    def metadata(self, job_id: str) -> dict:
        path = self.dir(job_id) / "metadata.json"
        try:
            return store.read_json(path)
        except FileNotFoundError:
            raise UgroError(f"job {job_id}: no metadata.json") from None
        except ValueError as exc:
            raise UgroError(f"job {job_id}: metadata.json is damaged ({exc})") from None

    def status(self, job_id: str) -> JobStatus | None:
        return JobStatus.parse(self.metadata(job_id).get("status"))

    def config(self, job_id: str) -> dict:
        try:
            return store.read_json(self.dir(job_id) / "config.json")
        except (FileNotFoundError, ValueError) as exc:
            raise UgroError(f"job {job_id}: config.json unreadable ({exc})") from None

    # -- transitions --------------------------------------------------------
    def begin(self, job_id: str, name: str, *, cluster_file: str, world_size: int, master: str,
              nodes: dict[str, dict]) -> dict:
        """The first record of a job: PENDING, each node `starting` with its rank and rank count."""
        meta = {
            "job_id": job_id, "name": name, "status": JobStatus.PENDING,
            "created_at": now(), "started_at": None, "ended_at": None,
            "cluster_file": cluster_file, "world_size": world_size, "master": master,
            "nodes": {node: {**facts, "status": NodeStatus.STARTING, "pgid": None,
                             "exit_code": None} for node, facts in nodes.items()},
        }
        store.write_json(self.dir(job_id) / "metadata.json", meta)
        return meta

    def submitted(self, job_id: str, name: str, *, cluster_file: str, world_size: int,
                  slurm: dict) -> dict:
        """The first record of a job handed to Slurm: QUEUED, no nodes until Slurm picks them."""
        meta = {
            "job_id": job_id, "name": name, "status": JobStatus.QUEUED,
            "created_at": now(), "started_at": None, "ended_at": None,
            "cluster_file": cluster_file, "world_size": world_size, "master": None,
            "nodes": {}, "slurm": slurm,
        }
        store.write_json(self.dir(job_id) / "metadata.json", meta)
        return meta

    def note_slurm(self, job_id: str, facts: dict) -> dict:
        """What Slurm says of the job now (its state, why it is pending)."""
        return self._update(job_id, lambda meta: meta.setdefault("slurm", {}).update(facts))

    def mark_allocated(self, job_id: str, nodes: dict[str, dict]) -> dict:
        """RUNNING from now on the nodes Slurm chose (each with its rank and rank count);
        a job already ended (cancelled while queued) stays as it is."""
        def change(meta):
            if not is_active(meta.get("status")):
                return
            meta["status"] = JobStatus.RUNNING
            meta["started_at"] = now()
            meta["master"] = next(iter(nodes), None)
            meta["nodes"] = {name: {**facts, "status": NodeStatus.RUNNING, "pgid": None,
                                    "exit_code": None} for name, facts in nodes.items()}

        return self._update(job_id, change)

    def mark_running(self, job_id: str, pgids: dict[str, int]) -> dict:
        """RUNNING from now; these nodes' process groups started."""
        def change(meta):
            meta["status"] = JobStatus.RUNNING
            meta["started_at"] = now()
            for name, pgid in pgids.items():
                meta["nodes"][name].update(status=NodeStatus.RUNNING, pgid=pgid)

        return self._update(job_id, change)

    def set_supervisor(self, job_id: str, pid: int) -> dict:
        return self._update(job_id, lambda meta: meta.update(supervisor_pid=pid))

    def request_cancel(self, job_id: str) -> dict:
        """Note that a cancel was asked for (the first time only): the supervisor then records
        the nodes' non-zero exits as the cancel's doing, not as a failure."""
        return self._update(job_id, lambda meta: meta.setdefault("cancel_requested_at", now()))

    def note_nodes(self, job_id: str, facts: dict[str, dict]) -> dict:
        """Add facts about nodes (checkpoints they hold, when their log was fetched)."""
        def change(meta):
            for name, more in facts.items():
                meta["nodes"].setdefault(name, {}).update(more)

        return self._update(job_id, change)

    def finish(self, job_id: str, status: JobStatus, *, failure: Failure | None = None,
               error: str | None = None, nodes: dict[str, dict] | None = None) -> dict:
        """Move a job to a final status once; a job already final keeps its status.

        `inv cancel` and the supervisor may both finish the same job: whoever is
        first decides the status, the other only adds its per-node facts.
        """
        assert status.is_terminal(), status
        first = []

        def change(meta):
            for name, facts in (nodes or {}).items():
                meta["nodes"].setdefault(name, {}).update(facts)
            if is_terminal(meta.get("status")):
                return
            meta["status"] = status
            meta["ended_at"] = now()
            if failure is not None:
                meta["failure"] = failure.as_dict()
            if error is not None:
                meta["error"] = error
            first.append(True)

        meta = self._update(job_id, change)
        if first:
            store.append_json(self.history, history_line(meta))
        return meta

    def _update(self, job_id: str, change: Callable[[dict], Any]) -> dict:
        with store.locked(self.dir(job_id) / ".lock"):
            meta = self.metadata(job_id)
            change(meta)
            store.write_json(self.dir(job_id) / "metadata.json", meta)
            return meta

    # -- finding jobs -------------------------------------------------------
    def ids(self) -> list[str]:
        """Every job id, newest first."""
        if not self.root.is_dir():
            return []
        ids = [p.name for p in self.root.iterdir() if (p / "metadata.json").exists()]
        return sorted(ids, key=started_key, reverse=True)

    def find(self, text: str | None) -> str:
        """A job id from what the user typed: an id, a name (its latest job), or a unique prefix.

        Every task finds jobs this way. An unknown name raises with the closest
        matches; a prefix of several names or ids raises with the candidates.
        """
        if not text:
            raise UgroError("a job name or id is required")
        validate_name(text)
        if (self.dir(text) / "metadata.json").exists():
            return text
        ids = self.ids()
        named = [j for j in ids if job_name(j) == text]
        if named:
            return named[0]
        names = sorted({job_name(j) for j in ids if job_name(j).startswith(text)})
        if len(names) > 1:
            raise UgroError(f"job {text!r} is ambiguous: it could be {', '.join(names)}")
        if names:
            return next(j for j in ids if job_name(j) == names[0])
        prefixed = [j for j in ids if j.startswith(text)]
        if len(prefixed) > 1:
            more = f" and {len(prefixed) - 10} more" if len(prefixed) > 10 else ""
            raise UgroError(f"job {text!r} is ambiguous: it could be "
                            f"{', '.join(prefixed[:10])}{more}")
        if prefixed:
            return prefixed[0]
        hint = suggestion(text, sorted({job_name(j) for j in ids}), ids, "known jobs")
        raise UgroError(f"no job named {text!r}; {hint or 'no jobs yet'}")

    def active(self) -> list[str]:
        out = []
        for job_id in self.ids():
            try:
                if is_active(self.metadata(job_id).get("status")):
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
