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
    QUEUED = "QUEUED"  # waiting in the queue for its nodes or its predecessors; holds nothing
    PENDING = "PENDING"  # recorded, nodes not started yet
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)

    def is_active(self) -> bool:
        """The job holds its nodes: it may have processes on them."""
        return not self.is_terminal()


class NodeStatus(_State):
    STARTING = "starting"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    START_FAILED = "failed to start"

    def is_terminal(self) -> bool:
        return self not in (NodeStatus.STARTING, NodeStatus.RUNNING)


def is_active(status) -> bool:
    """Whether a record's status (a string from disk) is an active job's."""
    state = JobStatus.parse(status)
    return state is not None and state.is_active()


def is_terminal(status) -> bool:
    state = JobStatus.parse(status)
    return state is not None and state.is_terminal()


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

    @property
    def reachable(self) -> bool:
        return self.error is None


def exit_code_int(code: str | None) -> int | None:
    return int(code) if code and code.lstrip("-").isdigit() else None
