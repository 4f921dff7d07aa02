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
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import store
from .errors import UgroError
from .state import Failure, JobStatus, NodeStatus, holds_nodes, is_active, is_terminal
from .wording import suggestion

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def validate_name(name: str | None) -> str:
    if not name:
        raise UgroError("a job name is required (--name NAME)")
    if not NAME_RE.match(name) or name in (".", "..") or name.startswith("-"):
        raise UgroError(
            f"invalid job name {name!r}: use 1-64 letters, digits, '.', '_' or '-' "
            "(not first)"
        )
    return name


class Jobs:
    """The job records under one data directory."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "experiments"
        self.history = self.data_dir / "job_history.jsonl"
        self._lines: tuple[tuple, list, list] | None = None  # (file signature, values, bad)

    def dir(self, job_id: str) -> Path:
        return self.root / job_id

    def create(self, name: str, when: datetime | None = None) -> str:
        """A new job directory with a unique id `<name>_<YYYYmmdd_HHMMSS>[_N]`."""
        validate_name(name)
        stamp = (when or datetime.now()).strftime("%Y%m%d_%H%M%S")
        with store.writing(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            job_id = f"{name}_{stamp}" + (f"_{n}" if n > 1 else "")
            try:
                self.dir(job_id).mkdir()  # atomic: two launches never share an id
            except FileExistsError:
                continue
            except OSError as exc:
                raise store.WriteError(self.dir(job_id), exc) from None
            try:
                with store.writing(self.dir(job_id)):
                    for sub in ("logs", "checkpoints", "artifacts"):
                        (self.dir(job_id) / sub).mkdir()
            except UgroError:
                self.discard(job_id)
                raise
            return job_id
        raise UgroError(f"too many jobs named {name} in one second")

    def discard(self, job_id: str) -> None:
        """Remove a job directory that never got its record (its launch failed first)."""
        if not (self.dir(job_id) / "metadata.json").exists():
            shutil.rmtree(self.dir(job_id), ignore_errors=True)

    # -- reading ------------------------------------------------------------
    def metadata(self, job_id: str) -> dict:
        """The job's record; a damaged one (not JSON, not an object, keys missing or of the
        wrong type) raises `DamagedRecord` naming the file and what is wrong."""
        path = self.dir(job_id) / "metadata.json"
        try:
            meta = store.read_json(path)
        except FileNotFoundError:
            raise DamagedRecord(path, "missing") from None
        except OSError as exc:
            raise DamagedRecord(path, f"unreadable ({exc.strerror or exc})") from None
        except (ValueError, RecursionError) as exc:
            raise DamagedRecord(path, f"not valid JSON ({exc})") from None
        why = record_problem(meta)
        if why:
            raise DamagedRecord(path, why)
        return meta

    def status(self, job_id: str) -> JobStatus | None:
        return JobStatus.parse(self.metadata(job_id).get("status"))

    def config(self, job_id: str) -> dict:
        path = self.dir(job_id) / "config.json"
        try:
            data = store.read_json(path)
        except (OSError, ValueError, RecursionError) as exc:
            raise UgroError(f"{path}: unreadable ({exc})") from None
        if not isinstance(data, dict):
            raise UgroError(f"{path}: not a JSON object")
        return data

    def nodes_of(self, job_id: str) -> list[str] | None:
        """The nodes a job was planned on, from config.json (for a job whose metadata.json is
        damaged); None when that is unreadable too."""
        try:
            nodes = self.config(job_id).get("nodes")
        except UgroError:
            return None
        return list(nodes) if isinstance(nodes, dict) else None

    def history_lines(self) -> tuple[list[tuple[int, object]], list[int]]:
        """job_history.jsonl as `store.json_lines` reads it: (line number, value) pairs, and
        the numbers of the unreadable lines. Read once per process while the file is
        unchanged: a command that asks several questions of a long history parses it once."""
        try:
            st = os.stat(self.history)
        except OSError:
            return [], []
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._lines is None or self._lines[0] != sig:
            try:
                text = self.history.read_text(errors="replace")
            except OSError:
                return [], []
            self._lines = (sig, *store.json_lines(text))
        return self._lines[1], self._lines[2]

    def summaries(self) -> dict[str, dict]:
        """job id -> its line in job_history.jsonl (a job gets its line when it ends), in the
        file's order; damaged lines are skipped."""
        entries, _ = self.history_lines()
        return {e["job_id"]: e for _, e in entries
                if isinstance(e, dict) and isinstance(e.get("job_id"), str)}

    def released(self, summaries: dict[str, dict] | None = None) -> set[str]:
        """Ended jobs whose history line says they let their nodes go when they ended.

        Nothing else ever makes such a job hold a node again, so finding the active jobs
        needs no look at their records. A line without `holds` (written before it was kept)
        releases nothing: that job's record is read, as before."""
        summaries = self.summaries() if summaries is None else summaries
        return {j for j, e in summaries.items() if e.get("holds") is False}

    # -- transitions --------------------------------------------------------
    def begin(self, job_id: str, name: str, *, cluster_file: str, world_size: int, master: str,
              nodes: dict[str, dict], supervisor: tuple[int, int | None] | None = None) -> dict:
        """The first record of a job: PENDING, each node `starting` with its rank and rank count,
        and its supervisor already, when it has one (`set_supervisor`).

        A queued job keeps its creation time and its queue facts (`enqueue`).
        """
        path = self.dir(job_id) / "metadata.json"
        queued = store.read_json(path) if path.exists() else {}
        meta = {
            "job_id": job_id, "name": name, "status": JobStatus.PENDING,
            "created_at": queued.get("created_at") or now(), "started_at": None, "ended_at": None,
            "cluster_file": cluster_file, "world_size": world_size, "master": master,
            "nodes": {node: {**facts, "status": NodeStatus.STARTING, "pgid": None,
                             "exit_code": None} for node, facts in nodes.items()},
        }
        if "queue" in queued:
            meta["queue"] = queued["queue"]
        if supervisor is not None:
            name_supervisor(meta, *supervisor)
        store.write_json(path, meta)
        return meta

    def _queued(self, job_id: str, name: str, cluster_file: str, world_size: int | None,
                **facts) -> dict:
        """The first record of a job that waits: QUEUED, no nodes yet; `facts` say for what
        (UGRO's queue: `queue`; Slurm's: `slurm`)."""
        meta = {
            "job_id": job_id, "name": name, "status": JobStatus.QUEUED,
            "created_at": now(), "started_at": None, "ended_at": None,
            "cluster_file": cluster_file, "world_size": world_size, "master": None,
            "nodes": {}, **facts,
        }
        store.write_json(self.dir(job_id) / "metadata.json", meta)
        return meta

    def _note(self, job_id: str, key: str, facts: dict) -> dict:
        return self._update(job_id, lambda meta: meta.setdefault(key, {}).update(facts))

    def enqueue(self, job_id: str, name: str, *, cluster_file: str, queue: dict) -> dict:
        """The first record of a queued job: QUEUED, no nodes yet, the request in `queue`."""
        return self._queued(job_id, name, cluster_file, None, queue=queue)

    def note_queue(self, job_id: str, facts: dict) -> dict:
        """Update a queued job's queue facts (why it waits, since when)."""
        return self._note(job_id, "queue", facts)

    def requeue(self, job_id: str, why: str) -> dict:
        """Put a claimed job whose start never reached any node back in the queue; a job no
        longer claimed (cancelled meanwhile, started) is left as it is."""
        def change(meta):
            if JobStatus.parse(meta.get("status")) is not JobStatus.PENDING \
                    or meta.get("started_at"):
                return
            meta.update(status=JobStatus.QUEUED, nodes={}, world_size=None, master=None)
            meta["queue"].update(reason=why, since=now())
            name_supervisor(meta, None)

        return self._update(job_id, change)

    def submitted(self, job_id: str, name: str, *, cluster_file: str, world_size: int,
                  slurm: dict) -> dict:
        """The first record of a job handed to Slurm: QUEUED, no nodes until Slurm picks them."""
        return self._queued(job_id, name, cluster_file, world_size, slurm=slurm)

    def note_slurm(self, job_id: str, facts: dict) -> dict:
        """What Slurm says of the job now (its state, why it is pending)."""
        return self._note(job_id, "slurm", facts)

    def mark_allocated(self, job_id: str, nodes: dict[str, dict], slurm: dict) -> dict:
        """RUNNING from now on the nodes Slurm chose (each with its rank and rank count), with
        what Slurm says of it (`note_slurm`); a job no longer QUEUED (cancelled meanwhile)
        keeps its status and nodes."""
        def change(meta):
            meta.setdefault("slurm", {}).update(slurm)
            if JobStatus.parse(meta.get("status")) is not JobStatus.QUEUED:
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

    def mark_stalled(self, job_id: str, since: str) -> dict:
        """Flag a running job stalled, silent since `since`; a job no longer running is left
        as it is (its end raced the flag)."""
        def change(meta):
            if JobStatus.parse(meta.get("status")) is JobStatus.RUNNING:
                meta["stalled_since"] = since

        return self._update(job_id, change)

    def clear_stalled(self, job_id: str) -> dict:
        """The job printed or logged again: plain running."""
        return self._update(job_id, lambda meta: meta.pop("stalled_since", None))

    def set_supervisor(self, job_id: str, pid: int, started: int | None = None) -> dict:
        """The job's supervisor: its pid and, to tell it from a later process with that pid,
        its start time (`procs.start_time`)."""
        return self._update(job_id, lambda meta: name_supervisor(meta, pid, started))

    def request_cancel(self, job_id: str, reason: str) -> dict:
        """Note that a cancel was asked for (the first time only): the supervisor then records
        the nodes' non-zero exits as the cancel's doing, not as a failure."""
        def change(meta):
            meta.setdefault("cancel_requested_at", now())
            meta.setdefault("cancel_reason", reason)

        return self._update(job_id, change)

    def cancel_outcome(self, job_id: str, stops: dict[str, str], reason: str) -> dict:
        """Record what each node answered to a stop (`stopped` confirms it). CANCELLED only
        once every node has confirmed; until then CANCELLING, naming the nodes still pending."""
        def change(meta):
            for name, outcome in stops.items():
                facts = meta["nodes"].setdefault(name, {})
                facts["stop"] = outcome
                if outcome == "stopped":
                    if NodeStatus.parse(facts.get("status")) not in (NodeStatus.COMPLETED,
                                                                     NodeStatus.START_FAILED):
                        facts["status"] = NodeStatus.CANCELLED
                else:
                    facts["status"] = NodeStatus.CANCEL_PENDING
            if is_terminal(meta.get("status")):
                return
            pending = {n: f.get("stop") for n, f in meta["nodes"].items()
                       if f.get("status") == NodeStatus.CANCEL_PENDING}
            if pending:
                meta["status"] = JobStatus.CANCELLING
                meta["error"] = "cancel pending on " + "; ".join(
                    f"{n} ({why})" for n, why in pending.items())
                return
            meta.update(status=JobStatus.CANCELLED, ended_at=now(), error=reason)
            first.append(True)

        first: list[bool] = []
        meta = self._update(job_id, change)
        if first:
            store.append_json(self.history, history_line(meta))
        return meta

    def note_nodes(self, job_id: str, facts: dict[str, dict]) -> dict:
        """Add facts about nodes (checkpoints they hold, when their log was fetched)."""
        def change(meta):
            for name, more in facts.items():
                meta["nodes"].setdefault(name, {}).update(more)

        return self._update(job_id, change)

    def finish(self, job_id: str, status: JobStatus, *, failure: Failure | None = None,
               error: str | None = None, nodes: dict[str, dict] | None = None,
               ended_at: str | None = None) -> dict:
        """Move a job to a final status once; a job already final keeps its status.

        `inv cancel` and the supervisor may both finish the same job: whoever is
        first decides the status, the other only adds its per-node facts. `ended_at` is for
        a job found ended after the fact (reconciled): when it ended, not when it was noticed.
        """
        assert status.is_terminal(), status
        first = []

        def change(meta):
            for name, facts in (nodes or {}).items():
                meta["nodes"].setdefault(name, {}).update(facts)
            if is_terminal(meta.get("status")):
                return
            meta["status"] = status
            meta["ended_at"] = ended_at or now()
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
    def ids(self, skip: set[str] = frozenset(), known: set[str] = frozenset()) -> list[str]:
        """Every job id, newest first; those in `skip` are left out and those in `known` (in
        the history, so with a record) taken, each without a look at its files."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        root = str(self.root)
        ids = [n for n in names if n not in skip and (
            n in known or os.path.exists(os.path.join(root, n, "metadata.json")))]
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
        """Jobs not over: queued, starting, running or cancelling ones, ones with a node still to
        stop, and ones whose record is too damaged to tell and that never ended (no history
        line): damage must never free a busy node."""
        summaries = self.summaries()
        out = []
        for job_id in self.ids(skip=self.released(summaries)):
            try:
                meta = self.metadata(job_id)
                if is_active(meta.get("status")) or holds_nodes(meta):
                    out.append(job_id)
            except DamagedRecord:
                if job_id not in summaries:
                    out.append(job_id)
        return out


class DamagedRecord(UgroError):
    """A job's metadata.json that cannot be used as a record."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


def record_problem(meta) -> str | None:
    """What makes `meta` unusable as a job record, or None."""
    if not isinstance(meta, dict):
        return f"not a JSON object (a {type(meta).__name__})"
    for key in ("job_id", "name"):
        if not isinstance(meta.get(key), str):
            return f"{key}: missing or not a string"
    if JobStatus.parse(meta.get("status")) is None:
        return f"status {meta.get('status')!r} is not a job status"
    nodes = meta.get("nodes")
    if not isinstance(nodes, dict) or not all(isinstance(f, dict) for f in nodes.values()):
        return "nodes: expected a mapping of node name to facts"
    return None


def job_name(job_id: str) -> str:
    return re.sub(r"_\d{8}_\d{6}(_\d+)?$", "", job_id)


_STARTED = re.compile(r"_(\d{8}_\d{6})(?:_(\d+))?$")


def started_key(job_id: str) -> str:
    m = _STARTED.search(job_id)
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
        # Whether a node may still run its processes (lost, or a cancel still pending); a job
        # that holds nothing is never read again to find the active jobs (`Jobs.released`).
        "holds": holds_nodes(meta),
    }


def name_supervisor(meta: dict, pid: int | None, started: int | None = None) -> None:
    """Name the job's supervisor in its record (none: `pid` None), replacing any before."""
    meta.pop("supervisor_pid", None)
    meta.pop("supervisor_started", None)
    if pid is not None:
        meta["supervisor_pid"] = pid
        if started is not None:
            meta["supervisor_started"] = started


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
