"""The job queue, with no daemon: `inv launch --queue` records a job QUEUED; passes start it.

A queued job is an ordinary job record (`Jobs.enqueue`) whose `queue` facts hold its request
(which nodes, how many), its priority, its predecessors (`--after`) and why it waits. A pass
(`run_pass`) is exclusive (a lock file beside the records), reads the queue from disk, asks the
pure `decide` what to start, and starts each job by `lifecycle.launch` itself. Whatever frees
nodes runs one: a supervisor as its job ends, `inv cancel`, a view that reconciles a dead job
(`kick` spawns it detached), and `inv queue --run` as a watcher.

Crash safety: a job leaves the queue only inside a pass, by its PENDING record (`Jobs.begin`),
so a second pass never starts it again; a pass killed between that record and the nodes'
start leaves a PENDING job that no node knows, which its supervisor (on standby since before
that record) puts back and runs a pass for, or the next pass if that supervisor is gone too
(`put_back`, `recover`).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from . import health, lifecycle, store
from .backends import backend_for
from .config import Cluster, load_cluster
from .errors import UgroError
from .jobs import Jobs, now
from .lifecycle import PACKAGE_ROOT
from .plan import LaunchConfig, plan
from .state import JobStatus, in_queue

LOCK = ".queue.lock"
MEM_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([MG])?(?:I?B)?$", re.IGNORECASE)


def parse_mem(text: str) -> int:
    """`--min-gpu-mem`: `10G`, `10GB`, `10GiB`, `9500M` or plain MiB -> MiB (G means GiB)."""
    m = MEM_RE.match(str(text).strip())
    if not m or float(m.group(1)) <= 0:
        raise UgroError(f"--min-gpu-mem: expected an amount such as 10G or 9500M, got {text!r}")
    return int(float(m.group(1)) * (1024 if (m.group(2) or "M").upper() == "G" else 1))


def gib(mib: int) -> str:
    return f"{mib / 1024:g} GiB"


# -- the decision: pure --------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """`count` nodes out of `pool` (rank order); exactly the pool when they are as many."""

    pool: tuple[str, ...]
    count: int
    min_gpu_mem_mib: int | None = None

    def text(self) -> str:
        mem = f" with >= {gib(self.min_gpu_mem_mib)} GPUs" if self.min_gpu_mem_mib else ""
        if self.count == len(self.pool):
            return ",".join(self.pool) + mem
        return f"any {self.count} of {','.join(self.pool)}{mem}"


@dataclass(frozen=True)
class Waiting:
    """A queued job as the scheduler sees it."""

    job_id: str
    name: str
    priority: int
    queued_at: str
    request: Request
    after: tuple[str, ...] = ()  # job ids that must be COMPLETED first


@dataclass
class Decision:
    starts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # job id -> nodes
    waits: dict[str, str] = field(default_factory=dict)  # job id -> why
    cancels: dict[str, str] = field(default_factory=dict)  # job id -> why


def in_order(queue: list[Waiting]) -> list[Waiting]:
    """Start order: highest priority first, then the oldest."""
    return sorted(queue, key=lambda w: (-w.priority, w.queued_at, w.job_id))


def decide(queue: list[Waiting], held: dict[str, str], down: dict[str, str],
           before: dict[str, tuple[str, JobStatus | None]]) -> Decision:
    """What to start now, and why the others wait.

    `held`: node -> the job that holds it; `down`: node -> why it cannot take a job;
    `before`: each predecessor's job id -> (name, status). Jobs go in order; a job that cannot
    start keeps every node of its pool for itself, so a later job starts only on nodes that
    job could not use, and never delays it (backfill without run-time estimates).
    """
    status = {job_id: state for job_id, (_, state) in before.items()}
    names = {job_id: name for job_id, (name, _) in before.items()}
    names.update({w.job_id: w.name for w in queue})
    out = Decision()
    settled = False
    while not settled:  # a cancelled job cancels its own dependents too
        settled = True
        for w in queue:
            dead = [a for a in w.after if w.job_id not in out.cancels
                    and (status.get(a) is None or status[a].is_terminal()
                         and status[a] is not JobStatus.COMPLETED)]
            if dead:
                ended = status.get(dead[0])
                out.cancels[w.job_id] = (f"after {names.get(dead[0], dead[0])}: it ended "
                                         f"{ended or 'without a record'}")
                status[w.job_id] = JobStatus.CANCELLED
                settled = False
    held = dict(held)
    kept: dict[str, str] = {}  # node -> the earlier waiting job it is kept for
    for w in in_order([w for w in queue if w.job_id not in out.cancels]):
        pending = [a for a in w.after if status.get(a) is not JobStatus.COMPLETED]
        if pending:
            out.waits[w.job_id] = ", ".join(f"after {names.get(a, a)} ({status.get(a)})"
                                            for a in pending)
            continue
        free = [n for n in w.request.pool if n not in held and n not in down and n not in kept]
        if len(free) >= w.request.count:
            chosen = tuple(free[:w.request.count])
            out.starts[w.job_id] = chosen
            held.update(dict.fromkeys(chosen, w.name))
            continue
        out.waits[w.job_id] = _why(w.request, free, held, down, kept)
        for n in w.request.pool:
            kept.setdefault(n, w.name)
    return out


def _why(req: Request, free: list[str], held: dict[str, str], down: dict[str, str],
         kept: dict[str, str]) -> str:
    busy = [f"{n} held by {held[n]}" for n in req.pool if n in held]
    parts = (["nodes busy: " + ", ".join(busy)] if busy else []) + [
        f"{n} {down[n]}" for n in req.pool if n not in held and n in down] + [
        f"{n} kept for {kept[n]} (ahead in the queue)" for n in req.pool
        if n not in held and n not in down and n in kept]
    detail = "; ".join(parts)
    if req.min_gpu_mem_mib:
        many = "no node has" if req.count == 1 else f"fewer than {req.count} nodes have"
        return f"{many} {gib(req.min_gpu_mem_mib)} GPUs free: {detail}"
    if req.count < len(req.pool):
        return f"needs {req.count} of {len(req.pool)} nodes, {len(free)} free: {detail}"
    return detail


def down_reason(report: health.NodeHealth) -> str:
    if report.hostname is None:  # the probe never answered
        return f"unreachable ({'; '.join(report.problems)})"
    return f"unhealthy ({'; '.join(report.problems)})"


# -- queueing a job ------------------------------------------------------------------------
def resolve(cluster: Cluster, cfg: LaunchConfig,
            reports: list[health.NodeHealth] | None = None) -> Request:
    """The nodes a queued job may use, or one line on why no node ever could."""
    if cfg.num_nodes is not None and cfg.num_nodes < 1:
        raise UgroError(f"--num-nodes must be >= 1, got {cfg.num_nodes}")
    if cfg.nodes and cfg.num_nodes is not None:
        raise UgroError("--nodes names the nodes, --num-nodes asks for any: give one of them")
    pool = tuple(n.name for n in cluster.select(cfg.nodes))
    mem = parse_mem(cfg.min_gpu_mem) if cfg.min_gpu_mem is not None else None
    if mem:
        sizes = {r.node: [g.memory_total_mib or 0 for g in r.gpus] for r in reports or []
                 if r.hostname is not None}  # a node that did not answer: unknown, not GPU-less
        fits = tuple(n for n in pool if sizes.get(n) and min(sizes[n]) >= mem)
        if not fits or (cfg.nodes and fits != pool):
            have = ", ".join(f"{n}: " + (f"{min(sizes[n])} MiB" if sizes.get(n) else
                                         "no GPU" if n in sizes else "unknown")
                             for n in pool)
            raise UgroError(f"--min-gpu-mem {cfg.min_gpu_mem}: no {'chosen ' if cfg.nodes else ''}"
                            f"node has GPUs with {gib(mem)} ({have})")
        pool = fits
    count = cfg.num_nodes or len(pool)
    if count > len(pool):
        raise UgroError(f"--num-nodes {count}: only {len(pool)} node(s) can take this job "
                        f"({', '.join(pool)})")
    return Request(pool, count, mem)


def enqueue(jobs: Jobs, cluster: Cluster, cfg: LaunchConfig, root: Path) -> str:
    """Record a job QUEUED (config.json, then metadata.json: it is queued once that lands)."""
    reports = health.check(cluster) if cfg.min_gpu_mem is not None else None
    request = resolve(cluster, cfg, reports)
    plan(cluster, replace(cfg, nodes=",".join(request.pool)), cfg.name, cluster.master_port)
    after = tuple(dict.fromkeys(jobs.find(a) for a in cfg.after))
    job_id = jobs.create(cfg.name)
    store.write_json(jobs.dir(job_id) / "config.json", {"job_id": job_id, "launch": asdict(cfg)})
    jobs.enqueue(job_id, cfg.name, cluster_file=str(cluster.source), queue={
        "queued_at": now(), "priority": cfg.priority, "request": asdict(request),
        "request_text": request.text(), "after": list(after),
        "reason": "waiting for the first scheduling pass", "since": now()})
    return job_id


def queued(jobs: Jobs) -> list[Waiting]:
    out = []
    for job_id in jobs.active():
        meta = jobs.metadata(job_id)
        if not in_queue(meta):
            continue
        q = meta["queue"]
        r = q["request"]
        out.append(Waiting(job_id, meta["name"], q["priority"], q["queued_at"],
                           Request(tuple(r["pool"]), r["count"], r.get("min_gpu_mem_mib")),
                           tuple(q.get("after") or ())))
    return in_order(out)


# -- a pass --------------------------------------------------------------------------------
@dataclass
class Pass:
    started: list[str] = field(default_factory=list)
    cancelled: dict[str, str] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)


def run_pass(jobs: Jobs, cluster: Cluster, root: Path) -> Pass:
    """One exclusive pass: start every queued job that can start, note why the others wait."""
    result = Pass()
    with store.locked(jobs.data_dir / LOCK):
        recover(jobs, cluster)
        queue = queued(jobs)
        if not queue:
            return result
        held = holders(jobs, cluster)
        before = {}
        for a in {a for w in queue for a in w.after}:
            meta = _metadata(jobs, a)
            before[a] = (meta.get("name", a), JobStatus.parse(meta.get("status")))
        decision = decide(queue, held, {}, before)
        # Health matters to the choice only where a job takes any K of a pool; a job that
        # names its nodes is checked by the launch's own preflight, which one probe less
        # keeps off the gap between jobs.
        pools = {w.job_id: w.request for w in queue}
        if any(pools[j].count < len(pools[j].pool) for j in decision.starts):
            ready = set().union(*(pools[j].pool for j in decision.starts)) - set(held)
            reports = health.check(cluster, cluster.select(",".join(sorted(ready))))
            down = {r.node: down_reason(r) for r in reports if not r.healthy}
            decision = decide(queue, held, down, before)
        for job_id, why in decision.cancels.items():
            jobs.finish(job_id, JobStatus.CANCELLED, error=f"never started: {why}")
            result.cancelled[job_id] = why
        for job_id, nodes in decision.starts.items():
            cfg = launch_config(jobs, job_id, nodes)
            try:
                lifecycle.launch(jobs, cluster, cfg, root, queued=job_id)
                result.started.append(job_id)
            except UgroError as exc:
                if jobs.status(job_id) is JobStatus.QUEUED:
                    decision.waits[job_id] = f"start refused: {exc}"
                else:
                    result.cancelled[job_id] = str(exc)  # it left the queue and failed to start
        for job_id, why in decision.waits.items():
            q = jobs.metadata(job_id).get("queue", {})
            if q.get("reason") != why:
                jobs.note_queue(job_id, {"reason": why, "since": now()})
            result.waiting[job_id] = why
    return result


def launch_config(jobs: Jobs, job_id: str, nodes: tuple[str, ...]) -> LaunchConfig:
    launch = dict(jobs.config(job_id)["launch"])
    launch.update(nodes=",".join(nodes), script_args=tuple(launch.get("script_args") or ()),
                  after=tuple(launch.get("after") or ()))
    return LaunchConfig(**launch)


def holders(jobs: Jobs, cluster: Cluster) -> dict[str, str]:
    """Node -> the name of the job holding it; a RUNNING job whose supervisor died is
    reconciled first. A PENDING one is left alone: a launch may be starting it right now."""
    held = {}
    for job_id in jobs.active():
        meta = jobs.metadata(job_id)
        if JobStatus.parse(meta.get("status")) is JobStatus.RUNNING:
            meta = lifecycle.reconcile(jobs, cluster, job_id)
        state = JobStatus.parse(meta.get("status"))
        if state is not None and state.holds_nodes():
            held.update(dict.fromkeys(meta["nodes"], meta["name"]))
    return held


def recover(jobs: Jobs, cluster: Cluster) -> None:
    """Put back in the queue a job a killed pass had claimed but started on no node (one whose
    supervisor still runs sees to its own job: `put_back`)."""
    for job_id in jobs.active():
        meta = jobs.metadata(job_id)
        if not lifecycle.supervisor_alive(meta):
            put_back(jobs, cluster, meta)


def put_back(jobs: Jobs, cluster: Cluster, meta: dict, settle: float = 0.0) -> bool:
    """Put a job back in the queue if a pass claimed it (PENDING) and was stopped before any
    node started it; whether it did. `settle`: seconds to wait before asking the nodes, for a
    start the pass had sent that is still on its way."""
    if (JobStatus.parse(meta.get("status")) is not JobStatus.PENDING or "queue" not in meta
            or meta.get("started_at")):
        return False
    time.sleep(settle)
    job_id = meta["job_id"]
    with closing(backend_for(cluster)) as backend:
        states = backend.states([cluster.node(n) for n in meta["nodes"]], job_id)
    if all(s.reachable and s.pgid is None and not s.alive for s in states.values()):
        meta = jobs.requeue(job_id, "put back: the pass starting it was stopped")
        return JobStatus.parse(meta.get("status")) is JobStatus.QUEUED
    return False


def _metadata(jobs: Jobs, job_id: str) -> dict:
    try:
        return jobs.metadata(job_id)
    except UgroError:
        return {}


def cancel(jobs: Jobs, cluster: Cluster, job_id: str, grace: float = 3.0,
           reason: str = "cancelled by user") -> dict:
    """Cancel a job: a queued one leaves the queue (never started), any other stops."""
    with store.locked(jobs.data_dir / LOCK):  # no pass may be starting it meanwhile
        if in_queue(jobs.metadata(job_id)):
            return jobs.finish(job_id, JobStatus.CANCELLED, error=f"{reason} while queued")
    return lifecycle.cancel(jobs, cluster, job_id, grace, reason=reason)


def kick(jobs: Jobs, cluster: Cluster) -> int | None:
    """Run a pass in a detached process when anything is queued (the caller does not wait)."""
    if not queued(jobs):
        return None
    log = (jobs.data_dir / "queue.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ugro.schedule", "--data-dir", str(jobs.data_dir.resolve()),
         "--cluster", str(cluster.source.resolve())],
        cwd=PACKAGE_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        start_new_session=True)
    return proc.pid


def report(result: Pass) -> list[str]:
    return ([f"started {j}" for j in result.started]
            + [f"cancelled {j}: {why}" for j, why in result.cancelled.items()]
            + [f"waiting {j}: {why}" for j, why in result.waiting.items()])


def watch(jobs: Jobs, cluster: Cluster, root: Path, every: float, out=sys.stdout) -> None:
    """`inv queue --run`: a pass now and every `every` seconds, until interrupted."""
    while True:
        stamp = datetime.now().strftime("%H:%M:%S")
        for line in report(run_pass(jobs, cluster, root)):
            print(f"{stamp} {line}", file=out, flush=True)
        time.sleep(every)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ugro.schedule", description="one scheduling pass")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--cluster", required=True)
    args = parser.parse_args(argv)
    try:
        result = run_pass(Jobs(args.data_dir), load_cluster(args.cluster), PACKAGE_ROOT)
    except UgroError as exc:
        print(f"ugro.schedule: {exc}", file=sys.stderr)
        return 1
    stamp = datetime.now().isoformat(timespec="seconds")
    for line in report(result):
        print(f"{stamp} {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
