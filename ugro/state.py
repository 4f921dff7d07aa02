"""What a job and its nodes can be, as values that answer questions.

States are enums (as torchelastic's `WorkerState` and SkyPilot's `JobStatus`):
code asks `status.is_active()`, never compares against tuples of strings. They
are `str` enums, so a record on disk holds the plain name (`"RUNNING"`), and
`parse` turns whatever a record holds back into a state, or None when it holds
no state at all (a damaged record).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class _State(str, Enum):
    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value):
        try:
            return cls(value)
        except ValueError:
            return None


class JobStatus(_State):
    QUEUED = "QUEUED"  # waiting in the queue (or Slurm's) for its nodes or predecessors; holds none
    PENDING = "PENDING"  # recorded, nodes not started yet
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    # A cancel was sent but some node has not confirmed its processes gone (it could not be
    # reached): the job still holds its nodes, and the next cancel, status or reconcile retries.
    CANCELLING = "CANCELLING"

    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)

    def is_active(self) -> bool:
        """The job is not over yet: queued, starting or running."""
        return not self.is_terminal()

    def holds_nodes(self) -> bool:
        """The job holds its nodes: it may have processes on them."""
        return self.is_active() and self is not JobStatus.QUEUED


class NodeStatus(_State):
    STARTING = "starting"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    START_FAILED = "failed to start"
    CANCEL_PENDING = "cancel pending"  # stop sent, not confirmed: the node could not be reached
    LOST = "lost"  # silent beyond cluster.lost_after; its processes not yet confirmed stopped

    def is_terminal(self) -> bool:
        return self not in (NodeStatus.STARTING, NodeStatus.RUNNING, NodeStatus.CANCEL_PENDING,
                            NodeStatus.LOST)

    def needs_stop(self) -> bool:
        """The node may still run the job's processes though the job has given up on them."""
        return self in (NodeStatus.CANCEL_PENDING, NodeStatus.LOST)


def is_active(status) -> bool:
    """Whether a record's status (a string from disk) is an active job's."""
    state = JobStatus.parse(status)
    return state is not None and state.is_active()


def is_terminal(status) -> bool:
    state = JobStatus.parse(status)
    return state is not None and state.is_terminal()


def holds_nodes(meta: dict) -> bool:
    """Whether a job record keeps its nodes from other jobs: it is active and past the queue,
    or a node it lost has not yet confirmed its processes stopped. A record too damaged to
    tell holds them."""
    if not isinstance(meta, dict):
        return True
    status = JobStatus.parse(meta.get("status"))
    if status is None:
        return True
    if status.is_active():
        return status.holds_nodes()
    nodes = meta.get("nodes")
    if not isinstance(nodes, dict):
        return False
    return any(isinstance(f, dict) and NodeStatus.parse(f.get("status")) in
               (NodeStatus.CANCEL_PENDING, NodeStatus.LOST) for f in nodes.values())


def held_as(meta: dict) -> str:
    """Why a job holds its nodes, in a few words: its status, and any node still to stop."""
    pending = [n for n, f in meta["nodes"].items()
               if (NodeStatus.parse(f.get("status")) or NodeStatus.RUNNING).needs_stop()]
    if pending and JobStatus.parse(meta["status"]).is_terminal():
        return f"{meta['status']}, processes not yet confirmed stopped on {', '.join(pending)}"
    return str(meta["status"])


def is_stalled(meta: dict) -> bool:
    """A running job whose supervisor found it silent for its `stall_after` (its record's
    `stalled_since`). The job stays RUNNING, active and holding its nodes: a stall is a flag on
    a running job, not a state of its own, and it clears when the job prints again."""
    return (isinstance(meta, dict) and bool(meta.get("stalled_since"))
            and JobStatus.parse(meta.get("status")) is JobStatus.RUNNING)


def in_queue(meta: dict) -> bool:
    """Whether a job waits in UGRO's own queue, which `ugro.schedule` owns. A job the cluster's
    scheduler holds QUEUED (Slurm: a `slurm` record, no `queue`) is not: its supervisor waits."""
    return (isinstance(meta, dict) and JobStatus.parse(meta.get("status")) is JobStatus.QUEUED
            and "slurm" not in meta)


def watched(meta: dict) -> bool:
    """Whether a job holds nodes or has a supervisor watching it: any job not over but one in
    UGRO's own queue (a Slurm-queued one included), and an ended one with a node to stop."""
    return holds_nodes(meta) or (is_active(meta.get("status")) and not in_queue(meta))


@dataclass(frozen=True)
class Failure:
    """The first node that failed a job, as the record keeps it (`metadata.json` `failure`)."""

    node: str
    summary: str  # "lab1 rank 1 failed first (exit code 3)"
    at: str
    rank: int | None = None
    exit_code: int | None = None
    log_tail: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NodeState:
    """What a node says of a job's processes there, or why it said nothing."""

    pgid: int | None = None
    exit_code: str | None = None  # as the node wrote it; None while running or never started
    alive: bool = False
    error: str | None = None  # the node could not be asked
    ended_at: float | None = None  # when the exit code was written (epoch seconds)
    stopped: int = 0  # processes of the job that are stopped (SIGSTOP)
    metrics_at: float | None = None  # when its metrics.jsonl last changed, by the node's clock
    ranks: int | None = None  # workers torchrun has started there (None: not said)

    @property
    def reachable(self) -> bool:
        return self.error is None


def exit_code_int(code: str | None) -> int | None:
    return int(code) if code and code.lstrip("-").isdigit() else None
