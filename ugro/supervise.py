"""The job supervisor: `python -m ugro.supervise --data-dir D --cluster F JOB_ID`.

`inv launch` starts it in its own session, so fail-fast and the final record
keep working when the user's terminal closes or the launcher is killed. It
streams every node's output home (one `NodeLog` per node), stops the other
nodes as soon as one fails, and writes the final record.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

from . import commands, store
from .backends import Backend, backend_for
from .cluster import fan_out
from .config import Cluster, Node, load_cluster
from .errors import UgroError
from .jobs import Jobs, now, validate_name
from .logs import NodeLog, first_error
from .state import Failure, JobStatus, NodeStatus, exit_code_int, is_active

KILLED = (143, 137)  # SIGTERM, SIGKILL as exit codes


class Supervisor:
    """Watch every node of a job until it ends; fail fast; write the final record."""

    def __init__(self, jobs: Jobs, cluster: Cluster, job_id: str, grace: float = 3.0):
        self.jobs, self.cluster, self.job_id, self.grace = jobs, cluster, job_id, grace
        meta = jobs.metadata(job_id)
        self.nodes = [cluster.node(n) for n in meta["nodes"]]
        self.failure: Failure | None = None
        self.lock = threading.Lock()

    def run(self) -> dict:
        logs_dir = self.jobs.dir(self.job_id) / "logs"
        logs_dir.mkdir(exist_ok=True)
        # A second backend for stops: the first one's connections are busy streaming.
        with closing(backend_for(self.cluster)) as streams, \
                closing(backend_for(self.cluster)) as killer:
            if streams.schedules and not self.nodes:
                meta = self._wait_allocated(streams)
                if not is_active(meta["status"]):
                    return meta
                self.nodes = [self.cluster.node(n) for n in meta["nodes"]]
            codes = fan_out(self.nodes, lambda n: self._watch(streams, killer, n, logs_dir))
            if not streams.schedules:
                # Every node has ended: the rendezvous store beside the host's torchrun can go.
                killer.stop(self.nodes[:1], self.job_id, self.grace)
            self._fetch_outputs(streams)
        nodes = {name: {"exit_code": exit_code_int(code),
                        "status": NodeStatus.COMPLETED if code == "0" else NodeStatus.FAILED}
                 for name, code in codes.items()}
        if self.failure:
            return self.jobs.finish(self.job_id, JobStatus.FAILED, failure=self.failure,
                                    error=self.failure.summary, nodes=nodes)
        if all(code == "0" for code in codes.values()):
            return self.jobs.finish(self.job_id, JobStatus.COMPLETED, nodes=nodes)
        # Only a cancel ends nodes non-zero without a recorded failure.
        return self.jobs.finish(self.job_id, JobStatus.CANCELLED, nodes=nodes)

    def _wait_allocated(self, backend: Backend, poll: float = 1.0) -> dict:
        """While the scheduler holds the job QUEUED, keep its state and reason in the record;
        once it starts, record the nodes it chose (in rank order)."""
        meta = self.jobs.metadata(self.job_id)
        slurm_id = meta["slurm"]["job_id"]
        said = (None, None)
        while is_active(meta["status"]):
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
                self.jobs.note_slurm(self.job_id, {"state": job.state, "reason": None})
                return self.jobs.mark_allocated(self.job_id, {
                    name: {"node_rank": i, "nproc": nproc} for i, name in enumerate(names)})
            if job.status.is_terminal():
                return self.jobs.finish(self.job_id, job.status,
                                        error=f"Slurm: {job.state} before it started"
                                        + (f" ({job.reason})" if job.reason else ""))
            if (job.state, job.reason) != said:
                said = (job.state, job.reason)
                meta = self.jobs.note_slurm(self.job_id, {"state": job.state,
                                                          "reason": job.reason})
            time.sleep(poll)
            meta = self.jobs.metadata(self.job_id)
        return meta

    def _watch(self, streams: Backend, killer: Backend, node: Node, logs_dir: Path) -> str:
        """Stream one node's output home until it ends; its exit code (or why none)."""
        sink = NodeLog(logs_dir / f"{node.name}.log", node.name)
        error = streams.stream(node, self.job_id, sink)
        sink.close()
        code = sink.exit or ("lost" if error else "unknown")
        if code != "0":
            self._failed(killer, node, code, sink, error)
        return code

    def _failed(self, killer: Backend, node: Node, code: str, sink: NodeLog, error: str | None):
        with self.lock:
            # A node killed by a signal (143, 137) was most likely stopped because another
            # failed (Slurm's --kill-on-bad-exit, or our own stop): a node that failed by
            # itself takes the blame from it, whichever of the two was read first.
            if self.failure is not None and (self.failure.exit_code not in KILLED
                                             or exit_code_int(code) in KILLED):
                return
            replacing = self.failure is not None
            meta = self.jobs.metadata(self.job_id)
            if meta.get("cancel_requested_at") or meta["status"] == JobStatus.CANCELLED:
                return
            rank = f" rank {sink.failed_rank}" if sink.failed_rank is not None else ""
            how = error or f"exit code {code}"
            tail = sink.tail()
            cause = first_error(tail)
            self.failure = Failure(
                node=node.name, rank=sink.failed_rank, exit_code=exit_code_int(code), at=now(),
                summary=f"{node.name}{rank} failed first ({how})" + (f": {cause}" if cause else ""),
                log_tail=tail,
            )
        others = [n for n in self.nodes if n is not node]
        if others and not replacing and not killer.schedules:  # Slurm stops the others itself
            killer.stop(others, self.job_id, self.grace)

    def _fetch_outputs(self, backend: Backend):
        """Bring rank 0's metrics home, and note which node holds which checkpoints."""
        listing = backend.listdir(self.nodes, commands.job_path(self.job_id, "checkpoints"))
        self.jobs.note_nodes(self.job_id, {name: {"checkpoints": files}
                                           for name, files in listing.items() if files is not None})
        target = self.jobs.dir(self.job_id) / "metrics.jsonl"
        if target.exists() and target.stat().st_size:
            return  # a local rank 0 wrote it in place
        found = backend.read(self.nodes, commands.job_path(self.job_id, "metrics.jsonl"))
        for fetched in found.values():
            if fetched.text and fetched.text.strip():
                store.write_text(target, fetched.text)
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ugro.supervise")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--grace", type=float, default=3.0)
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    try:
        validate_name(args.job_id)
        cluster = load_cluster(args.cluster)
        meta = Supervisor(Jobs(args.data_dir), cluster, args.job_id, args.grace).run()
    except UgroError as exc:
        print(f"ugro.supervise: {exc}", file=sys.stderr)
        return 1
    print(f"{args.job_id}: {meta['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
