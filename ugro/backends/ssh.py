"""The SSH backend: a job's processes on the lab's own machines, one process group per node.

Each node runs its torchrun in its own session, tagged with the job id and the
node's name (`commands.start_job`); the group id, the exit code and the whole
output stay in the node's job directory, so a dropped connection loses nothing
and a later supervisor can pick the job up again.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import commands
from ..cluster import Session, fan_out
from ..config import Cluster, Node
from ..state import NodeState
from . import Fetched, OverSession, Sink

if TYPE_CHECKING:
    from ..plan import NodePlan

STATE_RE = re.compile(r"pgid=(\d*) exit=(\S*) alive=([01]) ended=(\d*) stopped=(\d+)"
                      r"(?: metrics=(\d*))?(?: ranks=(\d+))?")


class SSHBackend(OverSession):
    schedules = False

    def __init__(self, cluster: Cluster, session: Session | None = None):
        self.cluster = cluster
        self.session = session or Session(cluster)
        # For the quick questions (state, ranks, small files): a hung node answers "no answer"
        # in this time instead of holding up the caller.
        self.quick = cluster.health_timeout + 10

    def command_line(self, job_id: str, plan: NodePlan) -> str:
        return commands.start_job(plan.node, job_id, plan.argv, plan.env, plan.store)

    def start(self, job_id: str, plans: list[NodePlan]) -> dict[str, int | str]:
        by_name = {p.node.name: p for p in plans}

        def one(node: Node) -> int | str:
            a = self.session.run(node, self.command_line(job_id, by_name[node.name]), timeout=30)
            pgid = a.stdout.strip()
            if a.ok and pgid.isdigit():
                return int(pgid)
            return a.error or a.stderr.strip() or "no process group id"

        return fan_out([p.node for p in plans], one)

    def stream(self, node: Node, job_id: str, sink: Sink,
               on_state: Callable[[NodeState], None] | None = None,
               every: float = 2.0) -> str | None:
        err = _StateLines(on_state or (lambda state: None), sink)
        try:
            return self.session.stream(node, commands.watch_job(node, job_id, every), sink,
                                       err).error
        finally:
            err.close()

    def states(self, nodes: list[Node], job_id: str) -> dict[str, NodeState]:
        out = {}
        answers = self.session.run_all(nodes, lambda n: commands.job_state(n, job_id),
                                       timeout=self.quick)
        for name, a in answers.items():
            m = STATE_RE.search(a.stdout) if a.error is None else None
            out[name] = _parsed(m) if m else NodeState(
                error=a.error or a.stderr.strip() or "no answer")
        return out

    def stop(self, nodes: list[Node], job_id: str, grace: float) -> dict[str, str]:
        answers = self.session.run_all(nodes, lambda n: commands.kill_job(n, job_id, grace),
                                       timeout=grace + 30)
        return {name: (a.stdout.strip() or "no answer") if a.error is None else a.error
                for name, a in answers.items()}

    def output(self, nodes: list[Node], job_id: str) -> dict[str, Fetched]:
        return self._fetch(nodes, lambda n: commands.job_output(n, job_id))

    def read(self, nodes: list[Node], job_id: str, relpath: str) -> dict[str, Fetched]:
        path = commands.job_path(job_id, relpath)
        return self._fetch(nodes, lambda n: commands.read_file(n, path))

    def _fetch(self, nodes: list[Node], command) -> dict[str, Fetched]:
        return {name: Fetched.of(a) for name, a in self.session.run_all(nodes, command).items()}

    def listdir(self, nodes: list[Node], job_id: str,
                relpath: str) -> dict[str, list[str] | None]:
        path = commands.job_path(job_id, relpath)
        answers = self.session.run_all(nodes, lambda n: commands.list_files(n, path),
                                       timeout=self.quick)
        return {name: a.stdout.split() if a.ok else None for name, a in answers.items()}


def _parsed(m: re.Match) -> NodeState:
    return NodeState(pgid=int(m.group(1)) if m.group(1) else None,
                     exit_code=m.group(2) or None, alive=m.group(3) == "1",
                     ended_at=float(m.group(4)) if m.group(4) else None,
                     stopped=int(m.group(5)),
                     metrics_at=float(m.group(6)) if m.group(6) else None,
                     ranks=int(m.group(7)) if m.group(7) else None)


class _StateLines:
    """A job stream's stderr: its state lines go to `on_state`, anything else (a node-side
    error) to the log, as it would without them.

    It runs in the stream's reader thread: whatever `on_state` raises is said and dropped,
    since a reader that dies ends the stream while the job runs on.
    """

    def __init__(self, on_state: Callable[[NodeState], None], sink: Sink):
        self.on_state, self.sink, self.buffer = on_state, sink, ""

    def write(self, data: str) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            m = STATE_RE.fullmatch(line)
            if not m:
                self.sink.write(line + "\n")
                continue
            try:
                self.on_state(_parsed(m))
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                print(f"ugro: a node's state could not be noted: {exc!r}", file=sys.stderr,
                      flush=True)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """The last line, when the stream ended without its newline."""
        if self.buffer:
            self.sink.write(self.buffer + "\n")
            self.buffer = ""
