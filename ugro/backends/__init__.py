"""Where a job's processes run: the one seam between the launch path and the machines.

A launch plans its nodes (`ugro.plan`), then hands the plans to a backend, which
starts every node's torchrun, streams a node's output home, answers what state a
node's processes are in, reads the files a job leaves on a node, and stops them.
`SSHBackend` does it over SSH for the lab's own machines; a Slurm cluster is
another implementation of the same calls, not a fork of the launch path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..config import Cluster, Node
from ..state import NodeState

if TYPE_CHECKING:
    from ..cluster import Answer, Session
    from ..plan import NodePlan


class OverSession:
    """A backend whose connections are one `Session`: closing the backend closes them."""

    session: Session

    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class Fetched:
    """A file read from a node: its text, or why there is none."""

    text: str | None
    error: str | None = None

    @classmethod
    def of(cls, answer: Answer) -> Fetched:
        """What a `cat` on a node gave: the file's text, or why there is none."""
        if answer.ok:
            return cls(answer.stdout)
        return cls(None, answer.error or answer.stderr.strip() or f"exit code {answer.exited}")


class Sink(Protocol):
    def write(self, data: str) -> None: ...
    def flush(self) -> None: ...


class Backend(Protocol):
    # True when the cluster's own scheduler queues the job, starts it and fails it fast
    # (Slurm): `inv launch` submits instead of starting, and the supervisor only watches.
    schedules: bool

    def command_line(self, job_id: str, plan: NodePlan) -> str:
        """What the node runs for this plan, exactly (the job record keeps it)."""

    def start(self, job_id: str, plans: list[NodePlan]) -> dict[str, int | str]:
        """Start every node's plan; node -> its process group id, or why it did not start."""

    def stream(self, node: Node, job_id: str, sink: Sink,
               on_state: Callable[[NodeState], None] | None = None,
               every: float = 2.0) -> str | None:
        """Write the node's output for the job to `sink` until its exit marker; an error or None.

        A backend whose stream also carries the node's state (SSH) hands it to `on_state`
        every `every` seconds while the job runs, and as soon as torchrun has started more of
        its ranks there (`NodeState.ranks`); the others never call it.
        """

    def output(self, nodes: list[Node], job_id: str) -> dict[str, Fetched]:
        """Each node's whole raw output for the job (torchrun's, `[rankN]:` prefixes and all)."""

    def states(self, nodes: list[Node], job_id: str) -> dict[str, NodeState]: ...

    def stop(self, nodes: list[Node], job_id: str, grace: float) -> dict[str, str]:
        """Stop the job on these nodes; node -> `stopped`, `still-alive` or why it could not."""

    def read(self, nodes: list[Node], job_id: str, relpath: str) -> dict[str, Fetched]:
        """A file of the job's output directory (`relpath` in it) from each node."""

    def listdir(self, nodes: list[Node], job_id: str,
                relpath: str) -> dict[str, list[str] | None]:
        """The names in a directory of the job's output directory, on each node."""

    def close(self) -> None: ...


def backend_for(cluster: Cluster, session: Session | None = None) -> Backend:
    """The cluster's backend; `session` lends an SSH backend connections already open (a
    launch's preflight), which it then closes with its own."""
    if cluster.slurm is not None:
        from .slurm import SlurmBackend

        return SlurmBackend(cluster)
    from .ssh import SSHBackend

    return SSHBackend(cluster, session)
