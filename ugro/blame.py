"""Which node failed a job first, when its nodes end in any order.

When one rank dies the others follow within moments: gloo's peers see their socket close,
NCCL's see the remote process exit, fail-fast (UGRO's own stop, Slurm's --kill-on-bad-exit)
signals the rest. The supervisor reads the nodes' ends in whatever order they arrive. `Blame`
keeps the failure the record will name: the first one read, unless it only followed another's
and the node that failed by itself reports after it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from .jobs import now
from .logs import NodeLog, first_error, parse_line, select
from .state import Failure, exit_code_int

KILLED = ("143", "137", "killed")  # SIGTERM, SIGKILL as exit codes; a group gone without one
CAUSE_WAIT = 2.0  # seconds a failure that followed another's waits for the cause to report

# What a rank prints when it dies because another rank did: gloo's peer closing its socket
# (torch adds "typically caused by a remote worker crashing"), NCCL's remote exit or abort.
PEER_LOST_RE = re.compile(r"Connection (?:closed|reset) by peer|remote worker crash"
                          r"|remote process exited|communicator was aborted", re.IGNORECASE)


def lost_a_peer(lines: Iterable[str], node: str, rank: int | None = None) -> bool:
    """Whether a failed rank's first error (the node's, when its rank is unknown) says it
    died because another rank did: a consequence of a failure, never its cause."""
    error = first_error(x.raw for x in select((parse_line(raw, node) for raw in lines), rank))
    return bool(error and PEER_LOST_RE.search(error))


def failure_of(node: str, code: str, sink: NodeLog | None, why: str | None
               ) -> tuple[Failure, bool]:
    """A node's failure as the record would name it, and whether it looks like the
    consequence of another's (a node stopped by a signal, a rank that lost its peers)."""
    rank = sink.failed_rank if sink else None
    lines = sink.tail(200) if sink else []  # the rank's own error precedes torchrun's summary
    tail = lines[-50:]
    where = f"{node} rank {rank}" if rank is not None else node
    cause = first_error(tail)
    failure = Failure(
        node=node, rank=rank, exit_code=exit_code_int(code), at=now(),
        summary=why or (f"the job never started on {node}" if code == "missing"
                        else f"{where} failed first (exit code {code})"
                        + (f": {cause}" if cause else "")),
        log_tail=tail,
    )
    return failure, code in KILLED or lost_a_peer(lines, node, rank)


class Blame:
    """The failure a job's record names. Callers hold the supervisor's lock around `offer`,
    so that no stop decided elsewhere (a stall, a cancel) slips in between."""

    def __init__(self):
        self.failure: Failure | None = None
        self.followed = False  # the failure on record looks like the consequence of another

    def offer(self, failure: Failure, followed: bool) -> str | None:
        """Take a node's failure: `first` (the job's first: the caller stops the others),
        `replaced` (it failed by itself and takes the blame from a consequence), or None
        (the failure on record stands)."""
        if self.failure is not None and (not self.followed or followed):
            return None
        taken = "replaced" if self.failure is not None else "first"
        self.failure, self.followed = failure, followed
        return taken

    def await_cause(self, all_ended: Callable[[], bool]) -> None:
        """While the failure looks like a consequence, give the node that failed by itself
        a moment to report (and take the blame): stopping it now would cut its report short."""
        deadline = time.monotonic() + CAUSE_WAIT
        while self.followed and not all_ended() and time.monotonic() < deadline:
            time.sleep(0.05)

