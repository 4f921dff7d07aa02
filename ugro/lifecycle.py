"""A job's life on the machines: start it, hand it to a supervisor, cancel it, reconcile it.

The flow of `inv launch`: `plan.ranks_per_node`, a job directory and its supervisor
on standby (`Standby`: the launch's process forked, connecting to the nodes meanwhile),
`busy_nodes` (nothing else holds the nodes), `plan.preflight` (health, the script on every
node, versions, master port), the record (`Jobs.begin`), the backend starts every node, and
the supervisor takes over: it streams every node's output home, fails fast, and writes the
final record. The launcher then follows the logs
(`wait_attached`) or returns once every rank runs (`wait_for_ranks`); either way
the job is supervised without the user's terminal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

from . import procs, store, supervise, transport
from .backends import backend_for
from .cluster import Session
from .config import Cluster, Node
from .errors import UgroError
from .jobs import DamagedRecord, Jobs, git_state
from .plan import LaunchConfig, plan, preflight, ranks_per_node
from .state import JobStatus, NodeStatus, held_as, holds_nodes, in_queue, is_active, is_terminal
from .supervise import Supervisor, iso

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def busy_nodes(jobs: Jobs, cluster: Cluster, nodes: tuple[Node, ...]) -> list[str]:
    """Jobs that hold any of these nodes now (after reconciling stale records).

    A job whose record is damaged holds the nodes its config.json names (every node when that
    is damaged too) until the record is fixed or removed: damage never frees a busy node.
    """
    wanted = {n.name for n in nodes}
    holding = []
    for job_id in jobs.active():
        try:
            meta = reconcile(jobs, cluster, job_id)
        except DamagedRecord as exc:
            named = jobs.nodes_of(job_id)
            shared = wanted & set(named) if named is not None else wanted
            if shared:
                holding.append(f"{job_id} (on {', '.join(sorted(shared))}; its record is "
                               f"damaged: {exc}; fix or remove it once its processes are gone)")
            continue
        shared = wanted & set(meta["nodes"])
        if holds_nodes(meta) and shared:
            holding.append(f"{job_id} ({held_as(meta)} on {', '.join(sorted(shared))})")
    return holding


def launch(jobs: Jobs, cluster: Cluster, cfg: LaunchConfig, root: Path,
           warn=lambda line: None, queued: str | None = None) -> str:
    """Preflight, record, start every node, hand over to a supervisor; returns the job id.

    `warn` hears what preflight found harmless but worth saying (a Python patch release
    that differs). Nothing is recorded until the plan is valid. `queued` is a queued job's
    id: its record exists already (`ugro.schedule` made it, and chose the nodes in
    `cfg.nodes`), and it starts here by the same path as any launch. A cluster whose own
    scheduler runs jobs (Slurm) gets the job submitted instead (`submit`).
    """
    backend = backend_for(cluster)
    if backend.schedules:
        return submit(jobs, cluster, cfg, root, backend)
    backend.close()
    nodes = cluster.select(cfg.nodes)
    ranks_per_node(cluster, cfg)  # a plan that cannot work is refused before anything runs
    transport.preload()  # before the job directory: nothing slow between it and `Standby`
    job_id = queued or jobs.create(cfg.name)  # a directory only: no record, no job yet
    # The supervisor starts now (`Standby`), so its connections to the nodes open during the
    # preflight and its streams start as soon as the nodes have. Released once the start is
    # recorded (or refused), it supervises the job if it runs, and otherwise just exits.
    try:
        standby = Standby(jobs, cluster, job_id, nodes, fork=not queued)
    except BaseException:
        if not queued:
            jobs.discard(job_id)
        raise
    session = Session(cluster)
    with closing(standby), store.locked(jobs.data_dir / ".launch.lock"), closing(session):
        try:
            holding = busy_nodes(jobs, cluster, nodes)
            if holding:
                raise UgroError(f"nodes are busy with job {'; '.join(holding)}; wait for it, "
                                "add --queue to start once they are free, or run: "
                                "inv cancel <job>")
            reports, port, warnings = preflight(cluster, cfg, session)
            for line in warnings:
                warn(line)
            plans = plan(cluster, cfg, job_id, port)
            # The nodes start over the connections the preflight opened.
            backend = backend_for(cluster, session)
            master = f"{plans[0].node.host}:{port}"
            world = sum(p.nproc for p in plans)
            store.write_json(jobs.dir(job_id) / "config.json", {
                "job_id": job_id,
                "launch": asdict(cfg),
                "cluster": {"name": cluster.name, "file": str(cluster.source),
                            "rdzv_backend": cluster.rdzv_backend, "master": master},
                "world_size": world,
                "nodes": {p.node.name: {"node_rank": p.node_rank, "nproc": p.nproc,
                                        "host": p.node.host, "argv": p.argv,
                                        "command": backend.command_line(job_id, p)} for p in plans},
                "versions": {r.node: {"python": r.python, "torch": r.torch,
                                      "cuda": r.torch_cuda, "driver": r.driver,
                                      "gpus": [g.name for g in r.gpus]} for r in reports},
                "git": git_state(root),
            })
            jobs.begin(job_id, cfg.name, cluster_file=str(cluster.source), world_size=world,
                       master=master,
                       nodes={p.node.name: {"node_rank": p.node_rank, "nproc": p.nproc}
                              for p in plans},
                       supervisor=(standby.pid, standby.started))
        except BaseException:
            if not queued:  # a queued job keeps its record; the scheduler decides
                jobs.discard(job_id)  # no job directory is left without its record
            raise
        with closing(backend):
            started = backend.start(job_id, plans)
            pgids = {name: v for name, v in started.items() if isinstance(v, int)}
            meta = jobs.mark_running(job_id, pgids)
            standby.release()
            if not supervisor_alive(meta):  # it died on standby (killed, out of memory)
                spawn_supervisor(jobs, cluster, job_id)
            failed = {name: why for name, why in started.items() if name not in pgids}
            if failed:
                why = "; ".join(f"{name}: {text}" for name, text in failed.items())
                backend.stop([p.node for p in plans], job_id, cfg.grace)
                jobs.finish(job_id, JobStatus.FAILED, error=f"start failed: {why}",
                            nodes={name: {"status": NodeStatus.START_FAILED} for name in failed})
                raise UgroError(f"job {job_id}: start failed: {why}")
    return job_id


def submit(jobs: Jobs, cluster: Cluster, cfg: LaunchConfig, root: Path, backend) -> str:
    """Hand the job to the cluster's scheduler: it waits QUEUED until the scheduler starts it.

    No health probe, port check or busy-node check: the scheduler chooses the nodes, and
    the batch script the rendezvous port on the first of them.
    """
    with closing(backend):
        backend.preflight(cfg)
        job_id = jobs.create(cfg.name)
        job = backend.batch_job(job_id, cfg)
        world = job.nodes * job.nproc_per_node
        facts = {"job_dir": job.job_dir, "nodes": job.nodes, "nproc": job.nproc_per_node}
        config = {
            "job_id": job_id,
            "launch": asdict(cfg),
            "cluster": {"name": cluster.name, "file": str(cluster.source), "backend": "slurm"},
            "world_size": world,
            "slurm": facts,
            "git": git_state(root),
        }
        store.write_json(jobs.dir(job_id) / "config.json", config)
        jobs.submitted(job_id, cfg.name, cluster_file=str(cluster.source), world_size=world,
                       slurm={"job_id": None, **facts})
        try:
            slurm_id, script = backend.submit(job)
        except UgroError as exc:
            jobs.finish(job_id, JobStatus.FAILED, error=f"submit failed: {exc}")
            raise UgroError(f"job {job_id}: submit failed: {exc}") from None
        config["slurm"] = {**facts, "job_id": slurm_id, "script": script}
        store.write_json(jobs.dir(job_id) / "config.json", config)
        jobs.note_slurm(job_id, {"job_id": slurm_id, "state": "PENDING", "reason": None})
    spawn_supervisor(jobs, cluster, job_id)
    return job_id


def short_of_ranks(meta: dict) -> list[str]:
    """The job's nodes where torchrun has not yet started all their ranks, as recorded."""
    return [name for name, facts in meta["nodes"].items()
            if (facts.get("ranks") or 0) < (facts.get("nproc") or 1)]


def wait_for_ranks(jobs: Jobs, job_id: str, timeout: float = 300.0, poll: float = 0.05,
                   gone_after: float = 5.0) -> dict[str, str]:
    """Wait until every node runs all its ranks; node -> 'N/N ranks' or why not.

    Nothing is asked of the nodes here: each node's stream tells the supervisor how many
    ranks torchrun started there (`commands.watch_job`), and the supervisor records it
    (`ranks` in the node's facts). Returns early when the job stops being active (a node
    failed at start-up), or when its supervisor has been gone for `gone_after` seconds.
    """
    deadline = time.monotonic() + timeout
    gone_since = None
    while True:
        meta = jobs.metadata(job_id)
        short = short_of_ranks(meta)
        if not short:
            break
        if not is_active(meta.get("status")) or time.monotonic() > deadline:
            break
        if supervisor_alive(meta):
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since > gone_after:
            break
        time.sleep(poll)

    def said(name: str, facts: dict) -> str:
        got, want = facts.get("ranks") or 0, facts.get("nproc") or 1
        if name not in short:
            return f"{got}/{want} ranks"
        if not is_active(meta.get("status")):
            return f"never ran all its ranks (job {meta.get('status')})"
        if gone_since is not None:
            return f"{got}/{want} ranks when its supervisor stopped (see: inv status)"
        return f"{got}/{want} ranks after {timeout:g}s"

    return {name: said(name, facts) for name, facts in meta["nodes"].items()}


def _supervisor(jobs: Jobs, cluster: Cluster, job_id: str, args: list[str],
                stdin=subprocess.DEVNULL) -> subprocess.Popen:
    try:
        log = (jobs.dir(job_id) / "supervisor.log").open("ab")
    except OSError:
        log = subprocess.DEVNULL  # a full disk: the supervisor still runs, and says why it can
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "ugro.supervise", "--data-dir", str(jobs.data_dir.resolve()),
             "--cluster", str(cluster.source.resolve()), "--launcher", str(os.getpid()),
             *args, job_id],
            cwd=PACKAGE_ROOT, stdin=stdin, stdout=log, stderr=log, start_new_session=True,
        )
    finally:
        if log is not subprocess.DEVNULL:
            log.close()


def spawn_supervisor(jobs: Jobs, cluster: Cluster, job_id: str) -> int:
    """A supervisor for a job already recorded (started, submitted, or to reconcile)."""
    proc = _supervisor(jobs, cluster, job_id, [])
    jobs.set_supervisor(job_id, proc.pid, procs.start_time(proc.pid))
    return proc.pid


class Standby:
    """A supervisor started before its job is recorded: it connects to `nodes` meanwhile,
    and waits for `release()` (or this process's end: its stdin closes either way).

    From a launch command (one thread, no lock held), it is this process forked: the modules
    the supervisor needs are already loaded here, so it starts without an interpreter's
    start-up and imports of its own, which would take CPU from the nodes' start on a control
    node that trains too. Elsewhere (a queue pass, with threads or locks that a fork would
    copy), it is `python -m ugro.supervise --standby`.
    """

    def __init__(self, jobs: Jobs, cluster: Cluster, job_id: str, nodes: tuple[Node, ...],
                 fork: bool = False):
        # /proc tells the forked supervisor by its start time (`supervisor_alive`).
        r, self._go = os.pipe()  # the supervisor's stdin; `release` writes GO and closes it
        try:
            if fork and hasattr(os, "fork") and threading.active_count() == 1 \
                    and procs.start_time(os.getpid()) is not None and not _open_fds(r, self._go):
                self.pid = _fork_supervisor(jobs, cluster, job_id, nodes, r, self._go)
            else:
                self.pid = _supervisor(jobs, cluster, job_id,
                                       ["--standby", ",".join(n.name for n in nodes)],
                                       stdin=r).pid
        except BaseException:
            os.close(self._go)
            raise
        finally:
            os.close(r)
        self.started = procs.start_time(self.pid)

    def release(self) -> None:
        """Let the supervisor go: it supervises the job if it is recorded running, and exits
        if not (`supervise.standby`)."""
        if self._go is not None:
            go, self._go = self._go, None
            with contextlib.suppress(OSError):  # it died: `launch` starts another
                os.write(go, supervise.GO)
            os.close(go)

    close = release


def _open_fds(*ours: int) -> list[int]:
    """This process's open file descriptors past stdin, stdout and stderr, and `ours`: a fork
    would hold them for as long as the job runs (a lock, a pipe whose reader waits for its
    end)."""
    try:
        listed = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return [-1]  # cannot tell
    found = []
    for fd in listed:
        if fd > 2 and fd not in ours:
            try:
                os.fstat(fd)  # the listing's own descriptor is closed by now
            except OSError:
                continue
            found.append(fd)
    return found


def _fork_supervisor(jobs: Jobs, cluster: Cluster, job_id: str, nodes: tuple[Node, ...],
                     stdin: int, go: int) -> int:
    """Fork the supervisor (see `Standby`); its pid. In the child, stdin is `stdin` (the
    release pipe, whose other end `go` only the launch keeps) and stdout and stderr
    supervisor.log; it leaves by `_exit`, so nothing of
    the launch (its atexit hooks, its stack) runs there again."""
    try:
        log = os.open(jobs.dir(job_id) / "supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                      0o644)
    except OSError:
        log = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # or the child would print it again
        except (OSError, ValueError):
            pass
    pid = os.fork()
    if pid == 0:  # the supervisor: never returns to the launch's code
        code = 1
        try:
            os.setsid()
            os.dup2(stdin, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            for fd in {stdin, go, log} - {0, 1, 2}:  # the only others (`_open_fds`)
                os.close(fd)
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                              else signal.SIG_DFL)
            code = supervise.supervise(jobs, cluster, job_id,
                                       standby_for=[n.name for n in nodes])
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(log)
    return pid


def supervisor_alive(meta: dict) -> bool:
    """Whether the job's supervisor still runs: the process recorded, by its pid and start
    time (a launch's supervisor is the launch's process forked: `Standby`), or by its
    command line where the record has no start time."""
    pid, started = meta.get("supervisor_pid"), meta.get("supervisor_started")
    if not (isinstance(pid, int) and pid > 0):
        return False
    if isinstance(started, int):
        return procs.start_time(pid) == started and procs.state(pid) not in (None, "Z")
    return procs.running(pid, b"ugro.supervise", meta["job_id"].encode())


def cancel(jobs: Jobs, cluster: Cluster, job_id: str, grace: float = 3.0,
           reason: str = "cancelled by user") -> dict:
    """Stop the job on every node it may still run on. CANCELLED once every node confirmed its
    processes gone; a node that could not be reached leaves it CANCELLING ("cancel pending on
    lab2"), holding its nodes, and the next cancel, status or launch tries that node again."""
    meta = jobs.metadata(job_id)
    if not is_active(meta.get("status")):
        return meta
    meta = jobs.request_cancel(job_id, reason)
    names = [n for n, f in meta["nodes"].items() if f.get("stop") != "stopped"]
    nodes = [cluster.node(n) for n in names]
    with closing(backend_for(cluster)) as backend:
        result = backend.stop(nodes, job_id, grace)
    return jobs.cancel_outcome(job_id, result, meta.get("cancel_reason") or reason)


def reconcile(jobs: Jobs, cluster: Cluster, job_id: str) -> dict:
    """Bring a job's record in line with its nodes where nobody else does.

    A cancel still pending is tried again. With its supervisor gone: nodes still running get
    a new supervisor; all ended, the final record is written from their exit-code files
    (ended when the last of them ended) and c10d's rendezvous store on the host is stopped;
    a node it lost is stopped once it answers again.
    """
    meta = jobs.metadata(job_id)
    status = JobStatus.parse(meta["status"])
    if in_queue(meta):
        return meta  # nothing runs yet: the queue's scheduling pass owns it
    if status is JobStatus.CANCELLING:
        return cancel(jobs, cluster, job_id, reason=meta.get("cancel_reason") or "cancelled")
    if supervisor_alive(meta):
        return meta
    if status.is_terminal():
        return _stop_lost(jobs, cluster, meta)
    nodes = [cluster.node(n) for n in meta["nodes"]]
    with closing(backend_for(cluster)) as backend:
        if backend.schedules and not nodes:
            # Still queued, or started since: the new supervisor finds out which.
            spawn_supervisor(jobs, cluster, job_id)
            return jobs.metadata(job_id)
        states = backend.states(nodes, job_id)
    # A node with an exit code has ended; what may live on there is c10d's rendezvous store
    # on the host (up to a minute), which the final record's supervisor stops at once.
    if any(s.alive and s.exit_code is None for s in states.values()):
        spawn_supervisor(jobs, cluster, job_id)
        return jobs.metadata(job_id)
    if not all(s.reachable for s in states.values()):
        return meta  # can't tell yet; never guess a final status
    times = [s.ended_at for s in states.values() if s.ended_at]
    # One final record at a time: two commands reconciling at once would both stream the
    # nodes' logs into the same files.
    with store.locked(jobs.dir(job_id) / ".reconcile.lock"):
        meta = jobs.metadata(job_id)
        if is_terminal(meta["status"]):
            return meta
        Supervisor(jobs, cluster, job_id, ended_at=iso(max(times)) if times else None).run()
    return jobs.metadata(job_id)


def _stop_lost(jobs: Jobs, cluster: Cluster, meta: dict) -> dict:
    lost = [n for n, f in meta["nodes"].items() if f.get("status") == NodeStatus.LOST]
    if not lost:
        return meta
    with closing(backend_for(cluster)) as backend:
        stops = backend.stop([cluster.node(n) for n in lost], meta["job_id"], 3.0)
    return jobs.note_nodes(meta["job_id"], {
        name: {"stop": outcome, **({"status": NodeStatus.FAILED} if outcome == "stopped" else {})}
        for name, outcome in stops.items()})


# -- attached mode -------------------------------------------------------------
def wait_attached(jobs: Jobs, cluster: Cluster, job_id: str, out=sys.stdout,
                  every: float = 2.0) -> dict:
    """Stream the job's logs until it ends; Ctrl-C or SIGTERM cancels it everywhere.

    Always returns: when the supervisor is gone and its record cannot be finished here either
    (a full disk), it raises that one-line problem instead of following forever.
    """
    from .logs import follow

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    ended = threading.Event()
    problems: list[str] = []

    def follower():
        try:
            follow(jobs, job_id, out=out)
        except UgroError as exc:
            problems.append(str(exc))
        finally:
            ended.set()

    threading.Thread(target=follower, daemon=True).start()
    try:
        while not ended.wait(every) and not problems:
            problems.extend(_watchdog(jobs, cluster, job_id))
    except KeyboardInterrupt:
        print(f"\ncancelling {job_id} on every node...", file=sys.stderr, flush=True)
        cancel(jobs, cluster, job_id, reason="interrupted (Ctrl-C/SIGTERM on inv launch)")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if problems:
        raise UgroError(f"job {job_id}: {problems[0]}; its final state stays on the nodes: "
                        "inv status reconciles it once that is fixed")
    deadline = time.monotonic() + 30
    meta = jobs.metadata(job_id)
    while is_active(meta.get("status")) and meta["status"] != JobStatus.CANCELLING \
            and time.monotonic() < deadline:
        time.sleep(0.1)
        meta = jobs.metadata(job_id)
    ended.wait(5)  # the follower prints the last lines once it sees the job ended
    return meta


def _watchdog(jobs: Jobs, cluster: Cluster, job_id: str) -> list[str]:
    """While attached, make sure a dead supervisor cannot leave us following forever;
    returns why the job cannot be followed to its end, if it cannot."""
    try:
        meta = jobs.metadata(job_id)
        if is_active(meta.get("status")) and not supervisor_alive(meta):
            meta = reconcile(jobs, cluster, job_id)
            if is_active(meta.get("status")) and not supervisor_alive(meta) \
                    and meta["status"] != JobStatus.CANCELLING:
                return ["its supervisor is gone and its nodes cannot be asked"]
    except UgroError as exc:
        return [str(exc)]
    return []


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
