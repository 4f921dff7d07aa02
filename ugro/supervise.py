"""The job supervisor: `python -m ugro.supervise --data-dir D --cluster F JOB_ID`, or
`inv launch`'s own process forked (`lifecycle.Standby`; `supervise` is its life either way).

It runs in its own session, so fail-fast and the final record keep working when the
user's terminal closes or the launcher is killed. It
streams every node's output home (one `NodeLog` per node) and, on the same
stream, how the job's processes there are every few seconds; it stops the other
nodes as soon as one fails or falls silent for `cluster.lost_after` seconds, and
writes the final record. One connection per node: a node whose stream drops is
asked instead, until its processes have ended. Each node's stream runs in a thread
of its own, so a node whose sshd hangs holds up nothing: it is declared lost on time.

It also notices a job that is alive but silent: no node has sent output and no
node's metrics.jsonl has changed for the job's `stall_after`. Such a job is
flagged stalled in its record (still RUNNING, still holding its nodes) until it
prints again, or, with `--on-stall cancel`, stopped and FAILED "stalled".

A job the cluster's scheduler runs (Slurm, `Backend.schedules`) is watched, not
driven: the supervisor waits while Slurm holds it QUEUED, records the nodes Slurm
chose, and streams their output from the shared directory. Slurm stops the other
nodes when one fails (`--kill-on-bad-exit`) and ends the job when a node dies, so
nothing here stops nodes or declares them lost; their output carries no state.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from . import store
from .backends import Backend, backend_for
from .blame import Blame, failure_of
from .cluster import Session
from .config import Cluster, Node, load_cluster
from .errors import UgroError
from .jobs import Jobs, validate_name
from .logs import NodeLog
from .plan import STALL_AFTER
from .state import JobStatus, NodeState, NodeStatus, exit_code_int, is_active

GO = b"go"  # what a launch writes its standby supervisor as it lets go (`standby`)
LET_GO, ABANDONED = "let go", "abandoned"  # how the launch left a job it recorded (`standby`)
SETTLE = 2.0  # seconds for a start still on its way to a node, once its launch is gone
RECORD_RETRY = 30.0  # seconds to keep retrying a record the control node cannot write
LOST_RETRY = 600.0  # seconds to keep trying to stop a lost node's processes once it is back


class Supervisor:
    """Watch every node of a job until it ends; fail fast; write the final record."""

    def __init__(self, jobs: Jobs, cluster: Cluster, job_id: str, grace: float = 3.0,
                 ended_at: str | None = None, session: Session | None = None):
        self.jobs, self.cluster, self.job_id, self.grace = jobs, cluster, job_id, grace
        self.session = session  # connections to stream over, opened in `standby`
        self.ended_at = ended_at  # a reconciled job: when its nodes ended, not now
        meta = jobs.metadata(job_id)
        self.nodes = [cluster.node(n) for n in meta["nodes"]]
        self.blame = Blame()  # which node failed first (under `lock`)
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.codes: dict[str, str] = {}  # node -> exit code, `lost`, `hung` or `killed`
        self.unstreamed: set[str] = set()  # nodes whose stream ended without an exit marker
        self.heard: dict[str, float] = {}
        self.frozen_since: dict[str, float] = {}
        self.gaps: dict[str, str] = {}
        self.every = max(0.2, min(2.0, cluster.lost_after / 4))
        self.schedules = False  # the cluster's scheduler runs the job (set in `run`)
        launch = self._launch_settings()
        self.stall_after = float(launch.get("stall_after") or STALL_AFTER)
        self.on_stall = launch.get("on_stall") or "flag"
        self.sinks: dict[str, NodeLog] = {}
        self.metrics_at: dict[str, float | None] = {}  # each node's metrics.jsonl mtime, as seen
        self.ranks: dict[str, int] = {}  # workers torchrun has started on each node, as recorded
        self.active_at = time.monotonic()  # the last metrics change seen (output: in `sinks`)
        self.stalled = bool(meta.get("stalled_since"))
        self.stop_reason: str | None = None  # why the supervisor itself stopped the job

    def _launch_settings(self) -> dict:
        try:
            launch = self.jobs.config(self.job_id).get("launch")
        except UgroError:
            return {}
        return launch if isinstance(launch, dict) else {}

    def run(self) -> dict:
        logs_dir = self.jobs.dir(self.job_id) / "logs"
        with store.writing(logs_dir):
            logs_dir.mkdir(exist_ok=True)
        # A backend for stops apart from the streams: those connections are busy streaming.
        with closing(backend_for(self.cluster, self.session)) as streams, \
                closing(backend_for(self.cluster)) as killer:
            self.schedules = streams.schedules
            if self.schedules and not self.nodes:
                meta = self._wait_allocated(streams)
                if not is_active(meta["status"]):
                    return meta
                self.nodes = [self.cluster.node(n) for n in meta["nodes"]]
            self.heard = {n.name: time.monotonic() for n in self.nodes}
            for node in self.nodes:
                threading.Thread(target=self._watch, args=(streams, node, logs_dir),
                                 daemon=True).start()
            self._wait(killer)
            reachable = [n for n in self.nodes if self.codes[n.name] != "lost"]
            stops = None
            if not self.schedules and reachable:
                # Every node has ended; what may live on goes now: c10d's rendezvous store
                # beside the host's torchrun, a hung node's stopped processes, workers whose
                # agent was killed.
                stops = self._stop_host_last(killer, reachable)
            self._fetch_outputs(killer, reachable)
            meta = self._retrying(lambda: self._final(killer, reachable, stops))
        lost = [n for n in self.nodes if self.codes[n.name] == "lost"]
        if lost and not meta.get("cancel_requested_at"):
            self._stop_when_back(lost)
        return self.jobs.metadata(self.job_id)

    # -- waiting for the scheduler ---------------------------------------------
    def _wait_allocated(self, backend: Backend, poll: float = 1.0) -> dict:
        """While the scheduler holds the job QUEUED, keep its state and reason in the record;
        once it starts, record the nodes it chose (in rank order)."""
        meta = self.jobs.metadata(self.job_id)
        slurm_id = meta["slurm"]["job_id"]
        said = (None, None)
        while meta["status"] == JobStatus.QUEUED:
            try:
                job = backend.allocation(slurm_id)
            except UgroError:
                time.sleep(poll)  # the controller did not answer this time
                continue
            if job is None:
                return self.jobs.finish(self.job_id, JobStatus.FAILED,
                                        error=f"Slurm has no record of job {slurm_id}")
            if job.nodelist and job.state.split()[0] != "PENDING":
                names = backend.hostnames(job.nodelist)
                nproc = meta["slurm"]["nproc"]
                return self.jobs.mark_allocated(
                    self.job_id,
                    {name: {"node_rank": i, "nproc": nproc} for i, name in enumerate(names)},
                    slurm={"state": job.state, "reason": None})
            if job.status.is_terminal():
                return self.jobs.finish(self.job_id, job.status,
                                        error=f"Slurm: {job.state} before it started"
                                        + (f" ({job.reason})" if job.reason else ""))
            if (job.state, job.reason) != said:
                said = (job.state, job.reason)
                self.jobs.note_slurm(self.job_id, {"state": job.state, "reason": job.reason})
            time.sleep(poll)
            meta = self.jobs.metadata(self.job_id)
        return meta

    # -- watching ------------------------------------------------------------
    def _watch(self, streams: Backend, node: Node, logs_dir: Path) -> None:
        """Stream one node's output home until its exit marker."""
        sink = NodeLog(logs_dir / f"{node.name}.log", node.name)
        self.sinks[node.name] = sink
        try:
            error = streams.stream(node, self.job_id, sink,
                                   on_state=lambda state: self._answered(node, state),
                                   every=self.every)
        finally:
            sink.close()
        if sink.gap:
            self.gaps[node.name] = sink.gap
        if sink.exit is None:
            # No marker: the connection dropped. `_ask` learns the outcome from the node.
            with self.lock:
                self.unstreamed.add(node.name)
            self._ask(node)
            return
        self._ended(node, sink.exit, sink, error)

    def _ask(self, node: Node) -> None:
        """Once a node's stream is gone, ask the node about the job's processes every few
        seconds until they have ended (its stream told us, while it ran)."""
        with closing(backend_for(self.cluster)) as backend:
            while node.name not in self.codes:
                self._answered(node, backend.states([node], self.job_id)[node.name])
                time.sleep(self.every)

    def _answered(self, node: Node, state: NodeState) -> None:
        """What a node said of the job's processes: it is there, frozen or not, its metrics
        moved or not, how many ranks torchrun started there (recorded); its outcome when its
        stream is gone and they have ended."""
        if state.reachable:
            self.heard[node.name] = time.monotonic()
            if state.stopped and state.alive:
                self.frozen_since.setdefault(node.name, time.monotonic())
            else:
                self.frozen_since.pop(node.name, None)
            if state.metrics_at != self.metrics_at.get(node.name):
                self.metrics_at[node.name] = state.metrics_at
                self.active_at = time.monotonic()
            if node.name in self.unstreamed and not state.alive:
                self._ended(node, state.exit_code or "killed", None, None)
            if state.ranks and state.ranks != self.ranks.get(node.name):
                # What `inv launch --detach` waits for (`lifecycle.wait_for_ranks`).
                if self._note(lambda: self.jobs.note_nodes(
                        self.job_id, {node.name: {"ranks": state.ranks}})):
                    self.ranks[node.name] = state.ranks
        self.changed.set()

    def _wait(self, killer: Backend) -> None:
        """Until every node has an outcome; a silent or frozen node is given one here
        (not a scheduler's node: the scheduler ends the job when one dies)."""
        limit = self.cluster.lost_after
        while len(self.codes) < len(self.nodes):
            self.changed.wait(self.every)
            self.changed.clear()
            t = time.monotonic()
            for node in () if self.schedules else self.nodes:
                if node.name in self.codes:
                    continue
                # Output on its stream is an answer too (the first asking may be slow).
                sink = self.sinks.get(node.name)
                silent = t - max(self.heard[node.name], sink.last_data if sink else 0.0)
                frozen = t - self.frozen_since.get(node.name, t)
                if silent > limit:
                    self._ended(node, "lost", None,
                                f"lost contact with {node.name} (no answer for {silent:.0f}s)",
                                killer)
                elif frozen > limit:
                    self._ended(node, "hung", None,
                                f"{node.name}: the job's processes are stopped (SIGSTOP) "
                                f"for {frozen:.0f}s", killer)
            if len(self.codes) < len(self.nodes):
                self._check_stall(killer, time.monotonic())

    def _quiet(self, t: float) -> float | None:
        """Seconds since any node sent output or changed its metrics; None while a node's
        stream is down (its output cannot be seen, so its silence means nothing)."""
        with self.lock:
            if self.unstreamed - set(self.codes):
                return None
        return t - max([self.active_at] + [s.last_data for s in list(self.sinks.values())])

    def _check_stall(self, killer: Backend, t: float) -> None:
        """Flag the job stalled once silent for `stall_after`, unflag it when it speaks again;
        with `on_stall: cancel`, stop it instead of waiting."""
        quiet = self._quiet(t)
        if quiet is None or self.stop_reason or self._cancel_requested():
            return
        if quiet >= self.stall_after and not self.stalled:
            since = iso(time.time() - quiet)
            self.stalled = self._note(lambda: self.jobs.mark_stalled(self.job_id, since))
            say(f"{self.job_id}: stalled: no output or metric for {quiet:.0f}s")
            if self.on_stall == "cancel":
                self._stop_stalled(killer, quiet)
        elif quiet < self.stall_after and self.stalled:
            self.stalled = not self._note(lambda: self.jobs.clear_stalled(self.job_id))
            say(f"{self.job_id}: no longer stalled")

    def _stop_stalled(self, killer: Backend, quiet: float) -> None:
        with self.lock:
            if self.blame.failure is not None:
                return
            self.stop_reason = (f"stalled: no output or metric for {quiet:.0f}s "
                                f"(--stall-after {self.stall_after:g}s, --on-stall cancel); "
                                "stopped on every node")
            others = [n for n in self.nodes if n.name not in self.codes]
        self._stop_host_last(killer, others)

    def _note(self, write) -> bool:
        """A record change that may fail (a full disk, a damaged record) without ending the
        supervision; False when it did not happen (the next poll tries again)."""
        try:
            write()
        except UgroError as exc:
            say(str(exc))
            return False
        return True

    def _ended(self, node: Node, code: str, sink: NodeLog | None, why: str | None,
               killer: Backend | None = None) -> None:
        with self.lock:
            if node.name in self.codes:
                return
            self.codes[node.name] = code
        self.changed.set()
        if code != "0":
            self._failed(killer, node, code, sink, why)

    def _failed(self, killer: Backend | None, node: Node, code: str, sink: NodeLog | None,
                why: str | None):
        failure, followed = failure_of(node.name, code, sink, why)
        with self.lock:
            if self.stop_reason or self._cancel_requested():
                return
            taken = self.blame.offer(failure, followed)
        if taken != "first" or self.schedules:  # the scheduler stops the others itself
            return
        self.blame.await_cause(lambda: len(self.codes) == len(self.nodes))
        others = [n for n in self.nodes if n is not node and n.name not in self.codes]
        if not others:
            return
        if killer is not None:
            self._stop_host_last(killer, others)
            return
        with closing(backend_for(self.cluster)) as backend:  # from a node's own thread
            self._stop_host_last(backend, others)

    def _stop_host_last(self, backend: Backend, nodes: list[Node]) -> dict[str, str]:
        """Stop `nodes`, the rendezvous host last: the store there (rank 0's agent; with c10d
        UGRO's own beside it) must outlive the other nodes' agents, or their shutdown ends in
        rendezvous errors in the logs.
        Each node's answer, as `Backend.stop` gives it."""
        host = self.nodes[0]
        rest = [n for n in nodes if n is not host]
        if host not in nodes or not rest:
            return backend.stop(nodes, self.job_id, self.grace)
        answers: dict[str, str] = {}
        others = threading.Thread(
            target=lambda: answers.update(backend.stop(rest, self.job_id, self.grace)),
            daemon=True)
        others.start()
        # Their agents end within the grace; a node that does not answer holds nothing up.
        others.join(self.grace + 2)
        host_answer = backend.stop([host], self.job_id, self.grace)
        others.join()
        return {**answers, **host_answer}

    def _cancel_requested(self) -> bool:
        try:
            meta = self.jobs.metadata(self.job_id)
        except UgroError:
            return False
        return bool(meta.get("cancel_requested_at")) or meta["status"] in (
            JobStatus.CANCELLED, JobStatus.CANCELLING)

    # -- the final record ----------------------------------------------------
    def _final(self, killer: Backend, reachable: list[Node],
               stops: dict[str, str] | None = None) -> dict:
        """The record's last word. `stops`: the reachable nodes' answers to the stop already
        sent at the end (a cancel needs them; without them it stops the nodes itself)."""
        cancelled = self._cancel_requested()
        nodes = {}
        for node in self.nodes:
            code = self.codes[node.name]
            facts: dict = {"exit_code": exit_code_int(code)}
            if code == "0":
                facts["status"] = NodeStatus.COMPLETED
            elif code == "lost":
                facts["status"] = NodeStatus.CANCEL_PENDING if cancelled else NodeStatus.LOST
            else:
                facts["status"] = (NodeStatus.CANCELLED if cancelled or self.stop_reason
                                   else NodeStatus.FAILED)
            if node.name in self.gaps:
                facts["log_gap"] = self.gaps[node.name]
            nodes[node.name] = facts
        if cancelled:
            # The cancel is over only when every node confirms; a lost one cannot yet.
            self.jobs.note_nodes(self.job_id, nodes)
            if stops is None:
                stops = killer.stop(reachable, self.job_id, self.grace) if reachable else {}
            stops = {**stops, **{n.name: "lost contact" for n in self.nodes if n not in reachable}}
            meta = self.jobs.metadata(self.job_id)
            return self.jobs.cancel_outcome(self.job_id, stops,
                                            meta.get("cancel_reason") or "cancelled")
        if self.stop_reason:
            return self.jobs.finish(self.job_id, JobStatus.FAILED, error=self.stop_reason,
                                    nodes=nodes, ended_at=self.ended_at)
        failure = self.blame.failure
        if failure:
            return self.jobs.finish(self.job_id, JobStatus.FAILED, failure=failure,
                                    error=failure.summary, nodes=nodes,
                                    ended_at=self.ended_at)
        if all(code == "0" for code in self.codes.values()):
            return self.jobs.finish(self.job_id, JobStatus.COMPLETED, nodes=nodes,
                                    ended_at=self.ended_at)
        # Non-zero without a recorded failure: a cancel that finished while we looked.
        return self.jobs.finish(self.job_id, JobStatus.CANCELLED, nodes=nodes,
                                ended_at=self.ended_at)

    def _retrying(self, write):
        """A record write, retried while the control node cannot write it (a full disk)."""
        deadline = time.monotonic() + RECORD_RETRY
        while True:
            try:
                return write()
            except store.WriteError as exc:
                if time.monotonic() > deadline:
                    raise
                say(f"{exc}; retrying")
                time.sleep(2)

    def _stop_when_back(self, lost: list[Node]) -> None:
        """Stop a lost node's processes once it answers again (the job has failed already)."""
        deadline = time.monotonic() + LOST_RETRY
        while lost and time.monotonic() < deadline:
            with closing(backend_for(self.cluster)) as backend:
                stops = backend.stop(lost, self.job_id, self.grace)
            done = {name: {"status": NodeStatus.FAILED, "stop": "stopped"}
                    for name, outcome in stops.items() if outcome == "stopped"}
            if done:
                self._retrying(lambda done=done: self.jobs.note_nodes(self.job_id, done))
            lost = [n for n in lost if n.name not in done]
            time.sleep(self.every)

    def _fetch_outputs(self, backend: Backend, nodes: list[Node]):
        """Bring rank 0's metrics home, and note which node holds which checkpoints."""
        if not nodes:
            return
        listing = backend.listdir(nodes, self.job_id, "checkpoints")
        self._retrying(lambda: self.jobs.note_nodes(
            self.job_id, {name: {"checkpoints": files}
                          for name, files in listing.items() if files is not None}))
        target = self.jobs.dir(self.job_id) / "metrics.jsonl"
        if target.exists() and target.stat().st_size:
            return  # a local rank 0 wrote it in place
        found = backend.read(nodes, self.job_id, "metrics.jsonl")
        for fetched in found.values():
            if fetched.text and fetched.text.strip():
                try:
                    store.write_text(target, fetched.text)
                except store.WriteError as exc:
                    say(str(exc))
                return


def say(text: str) -> None:
    """A line for supervisor.log, which may sit on the very disk that is full."""
    try:
        print(f"ugro.supervise: {text}", file=sys.stderr, flush=True)
    except OSError:
        pass


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


def started(jobs: Jobs, job_id: str, launcher: int | None, settle: float = SETTLE) -> bool:
    """Whether there is a job to supervise. A launch spawns its supervisor while the nodes
    start, so the record may still be PENDING: wait for RUNNING, or for the launch to record
    that the start failed (then there is nothing to supervise).

    A launch that dies in between records neither: its process, `launcher`, is no longer
    this one's parent (so gone, even before this process started); None: the launch has
    already let go or died (`standby`). Then the supervisor takes the job over as RUNNING,
    after `settle` seconds for a start still on its way to a node. A node where nothing
    started then ends as `missing`, which fails the job and stops the others, so nothing is
    left running whatever the launch had done.
    """
    while (status := JobStatus.parse(jobs.metadata(job_id)["status"])) is JobStatus.PENDING:
        if launcher is None or os.getppid() != launcher:
            time.sleep(settle)
            if JobStatus.parse(jobs.metadata(job_id)["status"]) is JobStatus.PENDING:
                say(f"{job_id}: its launch ended before recording the start; supervising "
                    "what the nodes have")
                jobs.mark_running(job_id, {})
            continue
        time.sleep(0.05)
    return not status.is_terminal()


def standby(jobs: Jobs, job_id: str, session: Session, names: list[str]) -> str | None:
    """Whether there is a job to supervise, once the launch that started this process is
    done with the preflight and the start: it writes `GO` and closes our stdin. None when
    there is not; `LET_GO` or, when the launch died (its input ended without the word),
    `ABANDONED`.

    Meanwhile `session` connects to the nodes the job will run on, so its streams start on
    open connections. A launch that let go with no record refused the job, and removed its
    directory itself (the id may already be another launch's again); one that died leaves it
    here to remove. A queued job still QUEUED: its start was put off, and the queue keeps it.
    """
    for name in names:
        try:
            node = session.cluster.node(name)
        except UgroError:
            continue  # the cluster file changed under the launch: its preflight says so
        threading.Thread(target=_connect, args=(session, node), daemon=True).start()
    try:
        said = sys.stdin.buffer.read()
    except OSError:
        said = b""
    if not (jobs.dir(job_id) / "metadata.json").exists():
        if said != GO:
            jobs.discard(job_id)
        return None
    if JobStatus.parse(jobs.metadata(job_id)["status"]) is JobStatus.QUEUED:
        return None
    return LET_GO if said == GO else ABANDONED


def _put_back(jobs: Jobs, cluster: Cluster, job_id: str) -> bool:
    """A queued job whose pass died before any node started it goes back in the queue
    (`schedule.put_back`, after `SETTLE`), rather than being taken over and failed as never
    started."""
    from .schedule import put_back

    return put_back(jobs, cluster, jobs.metadata(job_id), settle=SETTLE)


def _queue_pass(jobs: Jobs, cluster: Cluster) -> None:
    """Run the queue in this process (already detached, its imports paid for). Imported here,
    in the process's entry point, because the scheduler starts jobs through the launch path,
    which uses Supervisor."""
    from .schedule import PACKAGE_ROOT, queued, report, run_pass

    if queued(jobs):
        try:
            for line in report(run_pass(jobs, cluster, PACKAGE_ROOT)):
                say(f"queue: {line}")
        except UgroError as exc:
            say(f"queue pass: {exc}")


def _connect(session: Session, node: Node) -> None:
    try:
        session.context(node)
    except Exception:
        pass  # the stream connects again, and says why it cannot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ugro.supervise")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--grace", type=float, default=3.0)
    parser.add_argument("--launcher", type=int, default=None,
                        help="pid of the launch that spawned this process (see `started`)")
    parser.add_argument("--standby", metavar="NODES", default=None,
                        help="started before the launch records the job: connect to these "
                             "nodes (comma-separated) and wait for stdin to close (see "
                             "`standby`)")
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    try:
        validate_name(args.job_id)
        cluster = load_cluster(args.cluster)
    except UgroError as exc:
        say(str(exc))
        return 1
    return supervise(Jobs(args.data_dir), cluster, args.job_id, args.grace,
                     launcher=args.launcher or os.getppid(),
                     standby_for=None if args.standby is None else args.standby.split(","))


def supervise(jobs: Jobs, cluster: Cluster, job_id: str, grace: float = 3.0,
              launcher: int | None = None, standby_for: list[str] | None = None) -> int:
    """The supervisor process's life: wait for the job to start (`standby_for` its nodes:
    see `standby`; else `started`), supervise it to its end, then run the queue."""
    try:
        session = None
        if standby_for is not None:
            session = Session(cluster)
            how = standby(jobs, job_id, session, standby_for)
            if how is None or (how == ABANDONED and _put_back(jobs, cluster, job_id)):
                session.close()
                if how is not None:
                    say(f"{job_id}: back in the queue (the pass starting it was stopped)")
                    _queue_pass(jobs, cluster)
                return 0
            launcher = None  # its launch has let go (or died): see `started`
        if not started(jobs, job_id, launcher):
            return 0
        meta = Supervisor(jobs, cluster, job_id, grace, session=session).run()
    except UgroError as exc:
        say(str(exc))
        return 1
    say(f"{job_id}: {meta['status']}")
    _queue_pass(jobs, cluster)  # the job's nodes are free: the queue moves on
    return 0


if __name__ == "__main__":
    sys.exit(main())
