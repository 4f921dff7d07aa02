"""The Slurm backend: Slurm queues, starts and fails the job; UGRO submits it and reads its files.

Every Slurm command runs on the login node (the control node itself with
`login: {local: true}`, else over SSH). A job's directory is
`<slurm.shared_dir>/<job id>/`, on the filesystem every node shares: the batch
script and Slurm's own id (`batch.sh`, `slurm_id`), and per node
`nodes/<node>/output.log` and `exit_code`, as `commands.start_job` leaves them
on SSH nodes, so the supervisor and the log readers need nothing new. Slurm
names the nodes when it starts the job; before that a job has none.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import slurm, slurm_parse
from ..cluster import Session
from ..config import Cluster, Node
from ..errors import UgroError
from ..plan import rank_env
from ..state import NodeState
from . import Fetched, OverSession, Sink

if TYPE_CHECKING:
    from ..plan import LaunchConfig, NodePlan

class SlurmBackend(OverSession):
    schedules = True  # Slurm queues, starts and fails the job fast; UGRO submits and watches

    def __init__(self, cluster: Cluster, session: Session | None = None):
        assert cluster.slurm is not None
        self.cluster, self.settings, self.login = cluster, cluster.slurm, cluster.master
        self.session = session or Session(cluster)
        self._slurm_ids: dict[str, str] = {}  # written once at submit, never changed

    # -- the login node -----------------------------------------------------
    def _run(self, command: str, timeout: float = 30) -> str:
        """stdout of `command` on the login node; UgroError with Slurm's last line otherwise."""
        a = self.session.run(self.login, command, timeout=timeout)
        if a.ok:
            return a.stdout
        lines = [x for x in a.stderr.splitlines() if x.strip()]
        raise UgroError(a.error or (lines[-1].strip() if lines else f"exit code {a.exited}"))

    def job_dir(self, job_id: str) -> str:
        return f"{self.settings.shared_dir}/{job_id}"

    def slurm_id(self, job_id: str) -> str | None:
        """The Slurm job id written at submit, asked of the login node until it is there."""
        if job_id not in self._slurm_ids:
            text = self.session.run(
                self.login, f"cat {slurm.rpath(self.job_dir(job_id))}/{slurm.SLURM_ID_FILE}")
            if not (text.ok and text.stdout.strip()):
                return None
            self._slurm_ids[job_id] = text.stdout.strip()
        return self._slurm_ids[job_id]

    # -- submitting ---------------------------------------------------------
    def batch_job(self, job_id: str, cfg: LaunchConfig) -> slurm.BatchJob:
        s = self.settings
        job_dir = self.job_dir(job_id)
        template = s.node("node")
        env = {**rank_env(template, cfg), "UGRO_JOB_DIR": job_dir,
               "UGRO_METRICS_FILE": f"{job_dir}/metrics.jsonl"}
        return slurm.BatchJob(
            job_id=job_id, job_dir=job_dir, workdir=s.project_path, nodes=s.nodes,
            python=s.python.argv(), script=cfg.script_argv(),
            nproc_per_node=cfg.nproc_per_node or s.procs, gpus_per_node=s.gpus_per_node,
            partition=s.partition, account=s.account, qos=s.qos, time_limit=s.time_limit,
            setup=list(s.setup), env=env,
        )

    def preflight(self, cfg: LaunchConfig) -> list[slurm_parse.SlurmNode]:
        """The partition exists and has nodes; nothing is occupied to find out."""
        if cfg.nodes:
            raise UgroError(f"--nodes {cfg.nodes}: Slurm chooses the nodes; set slurm.nodes "
                            f"in {self.cluster.source} for how many")
        nodes = self.partition()
        if not nodes:
            where = f"partition {self.settings.partition!r}" if self.settings.partition \
                else "the default partition"
            known = sorted({n.partition for n in slurm_parse.parse_sinfo(
                self._run(slurm.sinfo()))})
            raise UgroError(f"{where} has no nodes or does not exist (slurm.partition in "
                            f"{self.cluster.source}; this cluster has: "
                            f"{', '.join(known) or 'none'})")
        count = len({n.name for n in nodes})
        if count < self.settings.nodes:
            raise UgroError(f"slurm.nodes is {self.settings.nodes}, but the partition has "
                            f"{count} nodes")
        return nodes

    def submit(self, job: slurm.BatchJob) -> tuple[str, str]:
        """Write the batch script into the job directory and submit it: (Slurm's id, script)."""
        script = slurm.batch_script(job)
        out = self._run(slurm.write_and_submit(job.job_dir, script))
        return slurm_parse.parse_submit(out), script

    # -- where a job is -----------------------------------------------------
    def allocation(self, slurm_id: str) -> slurm_parse.SlurmJob | None:
        """Slurm's record of the job, or None once Slurm has forgotten it."""
        a = self.session.run(self.login, slurm.squeue([slurm_id]), timeout=30)
        if not a.ok and "Invalid job id" in a.stderr:
            return None
        if not a.ok:
            raise UgroError(a.error or a.stderr.strip() or f"squeue: exit code {a.exited}")
        jobs = [j for j in slurm_parse.parse_squeue(a.stdout) if j.slurm_id == slurm_id]
        return jobs[0] if jobs else None

    def hostnames(self, nodelist: str) -> list[str]:
        return self._run(slurm.hostnames(nodelist)).split()

    # -- the Backend calls --------------------------------------------------
    def command_line(self, job_id: str, plan: NodePlan) -> str:
        raise UgroError("a Slurm job is submitted as one batch script, not per node")

    def start(self, job_id: str, plans: list[NodePlan]) -> dict[str, int | str]:
        raise UgroError("a Slurm job is submitted (SlurmBackend.submit), not started")

    def stream(self, node: Node, job_id: str, sink: Sink, on_state=None,
               every: float = 2.0) -> str | None:
        sid = self.slurm_id(job_id)
        if sid is None:
            return f"job {job_id}: no Slurm job id in {self.job_dir(job_id)}"
        command = slurm.watch_output(self.job_dir(job_id), node.name, sid)
        return self.session.stream(self.login, command, sink).error

    def output(self, nodes: list[Node], job_id: str) -> dict[str, Fetched]:
        return {n.name: self._cat(f"{self.job_dir(job_id)}/nodes/{n.name}/output.log")
                for n in nodes}

    def states(self, nodes: list[Node], job_id: str) -> dict[str, NodeState]:
        try:
            sid = self.slurm_id(job_id)
            job = self.allocation(sid) if sid else None
            codes = slurm_parse.parse_exit_codes(
                self._run(slurm.node_exit_codes(self.job_dir(job_id))))
        except UgroError as exc:
            return {n.name: NodeState(error=str(exc)) for n in nodes}
        alive = job is not None and not job.status.is_terminal()
        return {n.name: NodeState(exit_code=codes.get(n.name),
                                  alive=alive and n.name not in codes) for n in nodes}

    def stop(self, nodes: list[Node], job_id: str, grace: float) -> dict[str, str]:
        """scancel the whole job (Slurm's is one unit) and wait until Slurm says it ended."""
        sid = self.slurm_id(job_id)
        if sid is None:
            return {n.name: "no Slurm job id" for n in nodes}
        try:
            self._run(slurm.cancel(sid))
            deadline = time.monotonic() + grace + 30
            while (job := self.allocation(sid)) is not None and not job.status.is_terminal():
                if time.monotonic() > deadline:
                    return {n.name: "still-alive" for n in nodes}
                time.sleep(0.2)
        except UgroError as exc:
            return {n.name: str(exc) for n in nodes}
        return {n.name: "stopped" for n in nodes}

    def read(self, nodes: list[Node], job_id: str, relpath: str) -> dict[str, Fetched]:
        # One shared file: read once, reported under the first node.
        shared = Fetched(None, "on the shared directory, read once")
        path = f"{self.job_dir(job_id)}/{relpath}"
        return {n.name: self._cat(path) if i == 0 else shared for i, n in enumerate(nodes)}

    def listdir(self, nodes: list[Node], job_id: str,
                relpath: str) -> dict[str, list[str] | None]:
        a = self.session.run(self.login, f"ls -1 {slurm.rpath(self.job_dir(job_id))}/{relpath}")
        return {n.name: (a.stdout.split() if a.ok else None) if i == 0 else None
                for i, n in enumerate(nodes)}

    def _cat(self, path: str) -> Fetched:
        return Fetched.of(self.session.run(self.login, f"cat {slurm.rpath(path)}"))

    # -- health -------------------------------------------------------------
    def partition(self) -> list[slurm_parse.SlurmNode]:
        """The partition's nodes as sinfo reports them (one row per node)."""
        return slurm_parse.parse_sinfo(self._run(slurm.sinfo(self.settings.partition)))

    def probe(self, nodes: list[str], source: str, deep: bool,
              timeout: float) -> dict[str, str]:
        """Each node's probe output from one short srun; node -> its lines."""
        return slurm_parse.parse_probe_output(self._run(slurm.probe(
            self.settings.python.argv(), nodes, self.settings.partition, source, deep),
            timeout=timeout))
