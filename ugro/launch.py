"""`inv launch`: preflight, start torchrun on every node, supervise, cancel.

The flow: `LaunchConfig` (validated before anything runs) -> `preflight`
(health, versions, master port, busy nodes) -> `start` (one background
process group per node, tagged with the job id) -> a supervisor process on the
control node (`python -m ugro.supervise`) that streams every node's output
home, fails fast when a node fails, and writes the final record. The launcher
then follows the logs (attached) or returns (`--detach`); either way the job is
supervised without the user's terminal.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import commands, health, store
from .cluster import Answer, Session, fan_out
from .config import Cluster, Node
from .errors import UgroError
from .jobs import ACTIVE, CANCELLED, COMPLETED, FAILED, RUNNING, Jobs, git_state, now, validate_name

PORT_SEARCH = 50  # how far past a busy master port `next-free` looks
RANK_PREFIX = "[rank${rank}]:"  # torchrun's per-line prefix template


@dataclass(frozen=True)
class LaunchConfig:
    """Everything a launch needs from the command line, checked before anything runs."""

    name: str
    script: str
    epochs: int | None = None
    lr: float | None = None
    model: str | None = None
    dataset: str | None = None
    batch_size: int | None = None
    nodes: str | None = None
    nproc_per_node: int | None = None
    detach: bool = False
    resume: bool = False
    script_args: tuple[str, ...] = ()
    grace: float = 3.0

    def __post_init__(self):
        validate_name(self.name)
        if self.epochs is not None and self.epochs < 1:
            raise UgroError(f"--epochs must be >= 1, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise UgroError(f"--lr must be > 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UgroError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise UgroError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if os.path.isabs(self.script) or ".." in Path(self.script).parts:
            raise UgroError(f"--script must be a path inside the project, got {self.script!r}")

    @classmethod
    def from_options(cls, defaults: dict, **options) -> LaunchConfig:
        """Command-line options over `training_defaults.yaml`'s `launch:` section."""
        def pick(key, kind):
            value = options.get(key)
            if value is None:
                value = defaults.get(key)
            if value is None:
                return None
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise UgroError(f"--{key.replace('_', '-')}: not a {kind.__name__}: "
                                f"{value!r}") from None

        try:
            extra = tuple(shlex.split(options.get("script_args") or ""))
        except ValueError as exc:
            raise UgroError(f"--script-args: {exc}") from None
        return cls(
            name=options.get("name"),
            script=pick("script", str) or "scripts/train_single_test.py",
            epochs=pick("epochs", int),
            lr=pick("lr", float),
            model=pick("model", str),
            dataset=pick("dataset", str),
            batch_size=pick("batch_size", int),
            nodes=options.get("nodes"),
            nproc_per_node=pick("nproc_per_node", int),
            detach=bool(options.get("detach")),
            resume=bool(options.get("resume")),
            script_args=extra,
        )

    def script_argv(self, output_dir: str) -> list[str]:
        argv = [self.script]
        for flag, value in (("--epochs", self.epochs), ("--lr", self.lr),
                            ("--model", self.model), ("--dataset", self.dataset),
                            ("--batch-size", self.batch_size)):
            if value is not None:
                argv += [flag, str(value)]
        argv += ["--output-dir", output_dir]
        if self.resume:
            argv.append("--resume")
        return argv + list(self.script_args)


@dataclass
class NodePlan:
    node: Node
    node_rank: int
    nproc: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def command_line(self, job_id: str) -> str:
        return commands.start_job(self.node, job_id, self.argv, self.env)


def plan(cluster: Cluster, cfg: LaunchConfig, job_id: str, port: int) -> list[NodePlan]:
    """The torchrun command for each node: ranks and rendezvous worked out here."""
    nodes = cluster.select(cfg.nodes)
    procs = {n.name: cfg.nproc_per_node or n.procs for n in nodes}
    if len(set(procs.values())) > 1:
        counts = ", ".join(f"{k}: {v}" for k, v in procs.items())
        raise UgroError(
            f"nodes would start different numbers of ranks ({counts}); "
            "pass --nproc-per-node N to start N on each"
        )
    master = nodes[0]  # the lowest-ranked chosen node hosts the rendezvous
    output_dir = f"data/experiments/{job_id}"
    plans = []
    for node_rank, node in enumerate(nodes):
        d = commands.node_job_dir(node, job_id)
        argv = node.python.argv() + [
            "-m", "torch.distributed.run",
            "--nnodes", str(len(nodes)),
            "--nproc-per-node", str(procs[node.name]),
            "--max-restarts", "0",
            "--tee", "3",
            "--log-dir", f"{d}/torchrun",
        ]
        if cluster.rdzv_backend == "c10d":
            argv += [
                "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{master.host}:{port}",
                "--rdzv-id", job_id,
                "--rdzv-conf", f"is_host={1 if node is master else 0}",
                # The address the other nodes reach this one by; c10d also
                # orders global ranks by it (it ignores --node-rank).
                "--local-addr", node.host,
            ]
        else:
            argv += ["--node-rank", str(node_rank),
                     "--master-addr", master.host, "--master-port", str(port)]
        argv += cfg.script_argv(output_dir)
        env = {
            **node.env,
            "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": RANK_PREFIX,
            "PYTHONUNBUFFERED": "1",
        }
        plans.append(NodePlan(node, node_rank, procs[node.name], argv, env))
    return plans


# -- preflight -------------------------------------------------------------
def choose_port(cluster: Cluster, session: Session, master: Node) -> int:
    answer = session.run(master, commands.listening_ports(master))
    if not answer.ok:
        raise UgroError(f"preflight: cannot read ports on {master.name}: "
                        f"{answer.error or answer.stderr.strip()}")
    busy = {int(h, 16) for h in answer.stdout.split() if re.fullmatch(r"[0-9A-Fa-f]+", h)}
    port = cluster.master_port
    if port not in busy:
        return port
    if cluster.port_policy == "refuse":
        raise UgroError(f"preflight: master port {port} is busy on {master.name} "
                        "(cluster.port_policy: refuse)")
    for candidate in range(port + 1, min(port + PORT_SEARCH, 65535)):
        if candidate not in busy:
            return candidate
    raise UgroError(f"preflight: no free port in {port}..{port + PORT_SEARCH} on {master.name}")


def busy_nodes(jobs: Jobs, cluster: Cluster, nodes: tuple[Node, ...]) -> list[str]:
    """Jobs that hold any of these nodes now (after reconciling stale records)."""
    wanted = {n.name for n in nodes}
    holding = []
    for job_id in jobs.active():
        meta = reconcile(jobs, cluster, job_id)
        if meta["status"] in ACTIVE and wanted & set(meta.get("nodes", {})):
            shared = ", ".join(sorted(wanted & set(meta["nodes"])))
            holding.append(f"{job_id} ({meta['status']} on {shared})")
    return holding


def preflight(jobs: Jobs, cluster: Cluster, cfg: LaunchConfig, session: Session,
              root: Path) -> tuple[list[health.NodeHealth], int]:
    nodes = cluster.select(cfg.nodes)
    if not (root / cfg.script).is_file():
        raise UgroError(f"script not found: {cfg.script}")
    holding = busy_nodes(jobs, cluster, nodes)
    if holding:
        raise UgroError(f"nodes are busy with job {'; '.join(holding)}; "
                        "wait for it or run: inv cancel <job>")
    reports = health.check(cluster, nodes, session=session)
    bad = [r for r in reports if not r.healthy]
    if bad:
        raise UgroError("preflight: " + "; ".join(
            f"{r.node} unhealthy: {', '.join(r.problems)}" for r in bad))
    for name in ("python", "torch"):
        versions = {getattr(r, name) for r in reports}
        if len(versions) > 1:
            found = ", ".join(f"{r.node}={getattr(r, name)}" for r in reports)
            raise UgroError(f"preflight: {name} versions differ ({found}); run inv sync-envs")
    return reports, choose_port(cluster, session, nodes[0])


# -- start ---------------------------------------------------------------------
def launch(jobs: Jobs, cluster: Cluster, cfg: LaunchConfig, root: Path) -> str:
    """Preflight, record, start every node, hand over to a supervisor; returns the job id."""
    with store.locked(jobs.data_dir / ".launch.lock"), Session(cluster) as session:
        reports, port = preflight(jobs, cluster, cfg, session, root)
        job_id = jobs.create(cfg.name)
        plans = plan(cluster, cfg, job_id, port)
        world = sum(p.nproc for p in plans)
        store.write_json(jobs.dir(job_id) / "config.json", {
            "job_id": job_id,
            "launch": asdict(cfg),
            "cluster": {"name": cluster.name, "file": str(cluster.source),
                        "rdzv_backend": cluster.rdzv_backend,
                        "master": f"{plans[0].node.host}:{port}"},
            "world_size": world,
            "nodes": {p.node.name: {"node_rank": p.node_rank, "nproc": p.nproc,
                                    "host": p.node.host, "argv": p.argv,
                                    "command": p.command_line(job_id)} for p in plans},
            "versions": {r.node: {"python": r.python, "torch": r.torch,
                                  "cuda": r.torch_cuda, "driver": r.driver,
                                  "gpus": [g.name for g in r.gpus]} for r in reports},
            "git": git_state(root),
        })
        jobs.write_metadata(job_id, {
            "job_id": job_id, "name": cfg.name, "status": "PENDING",
            "created_at": now(), "started_at": None, "ended_at": None,
            "cluster_file": str(cluster.source), "world_size": world,
            "master": f"{plans[0].node.host}:{port}",
            "nodes": {p.node.name: {"node_rank": p.node_rank, "nproc": p.nproc,
                                    "status": "starting", "pgid": None, "exit_code": None}
                      for p in plans},
        })
        answers = fan_out([p.node for p in plans],
                          lambda n: session.run(n, next(p for p in plans if p.node is n)
                                                .command_line(job_id), timeout=30))
        started = {name: a.stdout.strip() for name, a in answers.items()
                   if a.ok and a.stdout.strip().isdigit()}

        def running(meta):
            meta["status"] = RUNNING
            meta["started_at"] = now()
            for name, pgid in started.items():
                meta["nodes"][name].update(status="running", pgid=int(pgid))

        jobs.update(job_id, running)
        failed = [a for name, a in answers.items() if name not in started]
        if failed:
            why = "; ".join(f"{a.node.name}: {a.error or a.stderr.strip() or 'no pgid'}"
                            for a in failed)
            stop(session, [p.node for p in plans], job_id, cfg.grace)
            jobs.finish(job_id, FAILED, error=f"start failed: {why}", nodes={
                a.node.name: {"status": "failed to start"} for a in failed})
            raise UgroError(f"job {job_id}: start failed: {why}")
    spawn_supervisor(jobs, cluster, job_id)
    return job_id


PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def wait_for_ranks(jobs: Jobs, cluster: Cluster, job_id: str, timeout: float = 300.0,
                   poll: float = 0.2) -> dict[str, str]:
    """Wait until every node runs all its ranks; node -> 'N/N ranks', 'ended' or why not.

    Returns early when the job stops being active (a node failed at start-up).
    """
    meta = jobs.metadata(job_id)
    want = {name: facts["nproc"] for name, facts in meta["nodes"].items()}
    nodes = [cluster.node(n) for n in want]
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    with Session(cluster) as session:
        while True:
            pending = [n for n in nodes if n.name not in seen]
            answers = session.run_all(pending, lambda n: commands.ranks_started(n, job_id))
            for name, a in answers.items():
                out = a.stdout.strip()
                if out == "ended":
                    seen[name] = "ended"
                elif out.isdigit() and int(out) >= want[name]:
                    seen[name] = f"{out}/{want[name]} ranks"
            if len(seen) == len(nodes) or jobs.metadata(job_id)["status"] not in ACTIVE:
                break
            if time.monotonic() > deadline:
                for n in nodes:
                    seen.setdefault(n.name, "not all ranks started yet")
                break
            time.sleep(poll)
    return {n.name: seen[n.name] for n in nodes}  # node order, whoever was first


def spawn_supervisor(jobs: Jobs, cluster: Cluster, job_id: str) -> int:
    log = (jobs.dir(job_id) / "supervisor.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ugro.supervise", "--data-dir", str(jobs.data_dir.resolve()),
         "--cluster", str(cluster.source.resolve()), job_id],
        cwd=PACKAGE_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )
    jobs.update(job_id, lambda m: m.update(supervisor_pid=proc.pid))
    return proc.pid


def supervisor_alive(meta: dict) -> bool:
    pid = meta.get("supervisor_pid")
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return b"ugro.supervise" in cmdline and meta["job_id"].encode() in cmdline and state != "Z"


# -- stop, cancel, reconcile ---------------------------------------------------
def stop(session: Session, nodes: list[Node], job_id: str, grace: float) -> dict[str, str]:
    """Stop the job's process groups on these nodes; node -> 'stopped' or why not."""
    answers = session.run_all(nodes, lambda n: commands.kill_job(n, job_id, grace),
                              timeout=grace + 30)
    return {name: (a.stdout.strip() or "no answer") if a.error is None else a.error
            for name, a in answers.items()}


def cancel(jobs: Jobs, cluster: Cluster, job_id: str, grace: float = 3.0,
           reason: str = "cancelled by user") -> dict:
    meta = jobs.metadata(job_id)
    if meta["status"] not in ACTIVE:
        return meta
    jobs.update(job_id, lambda m: m.setdefault("cancel_requested_at", now()))
    nodes = [cluster.node(n) for n in meta["nodes"]]
    with Session(cluster) as session:
        result = stop(session, nodes, job_id, grace)
    return jobs.finish(job_id, CANCELLED, error=reason, nodes={
        name: {"status": "cancelled", "stop": outcome} for name, outcome in result.items()})


STATE_RE = re.compile(r"pgid=(\d*) exit=(\S*) alive=([01])")


def node_states(session: Session, nodes: list[Node], job_id: str) -> dict[str, dict]:
    out = {}
    for name, a in session.run_all(nodes, lambda n: commands.job_state(n, job_id)).items():
        m = STATE_RE.search(a.stdout) if a.error is None else None
        out[name] = ({"pgid": m.group(1), "exit": m.group(2), "alive": m.group(3) == "1"}
                     if m else {"error": a.error or a.stderr.strip() or "no answer"})
    return out


def reconcile(jobs: Jobs, cluster: Cluster, job_id: str) -> dict:
    """Bring an active job's record in line with its nodes when its supervisor is gone.

    Nodes still running: a new supervisor takes over. All ended: the final
    record is written from their exit-code files (and their logs fetched).
    """
    meta = jobs.metadata(job_id)
    if meta["status"] not in ACTIVE or supervisor_alive(meta):
        return meta
    nodes = [cluster.node(n) for n in meta["nodes"]]
    with Session(cluster) as session:
        states = node_states(session, nodes, job_id)
    if any(s.get("alive") for s in states.values()):
        spawn_supervisor(jobs, cluster, job_id)
        return jobs.metadata(job_id)
    unreachable = [n for n, s in states.items() if "error" in s]
    if unreachable:
        return meta  # can't tell yet; never guess a final status
    Monitor(jobs, cluster, job_id).run()
    return jobs.metadata(job_id)


# -- supervision ---------------------------------------------------------------
TORCHRUN_RANK = re.compile(r"^\[rank(\d+)\]:")
FAILED_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")


class NodeLog:
    """An output stream for one node: whole lines, prefixed, appended to its log file."""

    def __init__(self, path: Path, node: str):
        self.node = node
        self.file = path.open("w")
        self.buffer = ""
        self.blank = 0  # blank lines held back: the last one may be the marker's own
        self.exit: str | None = None
        self.failed_rank: int | None = None
        self.lock = threading.Lock()

    def write(self, data: str) -> None:
        with self.lock:
            self.buffer += data
            *lines, self.buffer = self.buffer.split("\n")
            self._emit(lines)

    def _emit(self, lines: list[str]) -> None:
        # One write per chunk, whole lines only: a reader never sees half a line.
        out: list[str] = []
        for line in lines:
            self._line(line, out)
        if out:
            self.file.write("".join(out))
            self.file.flush()

    def _line(self, line: str, out: list[str]) -> None:
        if self.exit is not None:
            return
        if line.startswith(commands.EXIT_MARKER):
            self.exit = line[len(commands.EXIT_MARKER):].strip()
            self.blank = max(0, self.blank - 1)  # the marker's own leading newline
            self._blanks(out)
            return
        if not line:
            self.blank += 1
            return
        self._blanks(out)
        m = TORCHRUN_RANK.match(line)
        prefix = f"{self.node} r{m.group(1)}" if m else f"{self.node}   "
        text = line[m.end():] if m else line
        if m and "[rank" in text:
            # torchrun's tee reads a rank's file mid-line at times and prefixes
            # the rest of the line again: "step 1[rank0]:0 ..." is "step 10 ...".
            text = text.replace(m.group(0), "")
        if self.failed_rank is None:
            fm = FAILED_RANK.match(text)
            if fm:
                self.failed_rank = int(fm.group(1))
        out.append(f"{prefix} | {text.rstrip(chr(13))}\n")

    def _blanks(self, out: list[str]) -> None:
        if self.blank:
            out.append(f"{self.node}    |\n" * self.blank)
            self.blank = 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        with self.lock:
            self._emit([self.buffer] if self.buffer else [])
            out: list[str] = []
            self._blanks(out)
            if out:
                self.file.write("".join(out))
            self.buffer = ""
            self.file.close()

    def tail(self, n: int = 50) -> list[str]:
        return Path(self.file.name).read_text(errors="replace").splitlines()[-n:]


class Monitor:
    """Watch every node of a job until it ends; fail fast; write the final record."""

    def __init__(self, jobs: Jobs, cluster: Cluster, job_id: str, grace: float = 3.0):
        self.jobs, self.cluster, self.job_id, self.grace = jobs, cluster, job_id, grace
        meta = jobs.metadata(job_id)
        self.nodes = [cluster.node(n) for n in meta["nodes"]]
        self.failure: dict | None = None
        self.lock = threading.Lock()

    def run(self) -> dict:
        logs_dir = self.jobs.dir(self.job_id) / "logs"
        logs_dir.mkdir(exist_ok=True)
        with Session(self.cluster) as session:
            # A second session for kills: the first is busy streaming.
            with Session(self.cluster) as killer:
                codes = fan_out(self.nodes, lambda n: self._watch(session, killer, n, logs_dir))
            self._fetch_outputs(session)
        node_facts = {name: {"exit_code": _as_int(code),
                             "status": "completed" if code == "0" else "failed"}
                      for name, code in codes.items()}
        if self.failure:
            return self.jobs.finish(self.job_id, FAILED, failure=self.failure,
                                    error=self.failure["summary"], nodes=node_facts)
        if all(code == "0" for code in codes.values()):
            return self.jobs.finish(self.job_id, COMPLETED, nodes=node_facts)
        # Only a cancel ends nodes non-zero without a recorded failure.
        return self.jobs.finish(self.job_id, CANCELLED, nodes=node_facts)

    def _watch(self, session: Session, killer: Session, node: Node, logs_dir: Path) -> str:
        """Stream one node's output home until it ends; its exit code (or why none)."""
        sink = NodeLog(logs_dir / f"{node.name}.log", node.name)
        answer: Answer = session.stream(node, commands.watch_job(node, self.job_id), sink)
        sink.close()
        code = sink.exit or ("lost" if answer.error else "unknown")
        if code != "0":
            self._failed(killer, node, code, sink, answer.error)
        return code

    def _failed(self, killer: Session, node: Node, code: str, sink: NodeLog, error):
        with self.lock:
            if self.failure is not None:
                return
            meta = self.jobs.metadata(self.job_id)
            if meta.get("cancel_requested_at") or meta["status"] == CANCELLED:
                return
            rank = f" rank {sink.failed_rank}" if sink.failed_rank is not None else ""
            how = error or f"exit code {code}"
            self.failure = {
                "node": node.name, "rank": sink.failed_rank, "exit_code": _as_int(code),
                "at": now(), "summary": f"{node.name}{rank} failed first ({how})",
                "log_tail": sink.tail(),
            }
        others = [n for n in self.nodes if n is not node]
        if others:
            stop(killer, others, self.job_id, self.grace)

    def _fetch_outputs(self, session: Session):
        """Bring rank 0's metrics home, and note which node holds which checkpoints."""
        job_dir = f"data/experiments/{self.job_id}"
        listing = session.run_all(
            self.nodes, lambda n: commands.in_project(n, f"ls -1 {job_dir}/checkpoints"))
        found = {name: a.stdout.split() for name, a in listing.items() if a.ok}
        self.jobs.update(self.job_id, lambda m: [
            m["nodes"][name].update(checkpoints=files) for name, files in found.items()])
        target = self.jobs.dir(self.job_id) / "metrics.jsonl"
        if target.exists() and target.stat().st_size:
            return  # a local rank 0 wrote it in place
        answers = session.run_all(self.nodes,
                                  lambda n: commands.read_file(n, f"{job_dir}/metrics.jsonl"))
        for a in answers.values():
            if a.ok and a.stdout.strip():
                store.write_text(target, a.stdout)
                return


def _as_int(code: str | None) -> int | None:
    return int(code) if code and code.lstrip("-").isdigit() else None


# -- attached mode -------------------------------------------------------------
def wait_attached(jobs: Jobs, cluster: Cluster, job_id: str, out=sys.stdout) -> dict:
    """Stream the job's logs until it ends; Ctrl-C or SIGTERM cancels it everywhere."""
    from .logs import follow

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    done = threading.Event()
    threading.Thread(target=_watchdog, args=(jobs, cluster, job_id, done), daemon=True).start()
    try:
        follow(jobs, job_id, out=out)
    except KeyboardInterrupt:
        print(f"\ncancelling {job_id} on every node...", file=sys.stderr, flush=True)
        cancel(jobs, cluster, job_id, reason="interrupted (Ctrl-C/SIGTERM on inv launch)")
    finally:
        done.set()
        signal.signal(signal.SIGTERM, previous)
    deadline = time.monotonic() + 30
    meta = jobs.metadata(job_id)
    while meta["status"] in ACTIVE and time.monotonic() < deadline:
        time.sleep(0.1)
        meta = jobs.metadata(job_id)
    return meta


def _watchdog(jobs: Jobs, cluster: Cluster, job_id: str, done: threading.Event,
              every: float = 2.0) -> None:
    """While attached, make sure a dead supervisor cannot leave us following forever."""
    while not done.wait(every):
        meta = jobs.metadata(job_id)
        if meta["status"] not in ACTIVE:
            return
        if not supervisor_alive(meta):
            reconcile(jobs, cluster, job_id)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
