"""Planning a launch: the validated options, each node's torchrun command, the preflight.

Nothing here starts a process. `LaunchConfig` is checked before anything runs;
`plan` works out ranks and the rendezvous for every node; `preflight` asks the
nodes whether they can run it (healthy, versions that agree, a free master port).
"""

from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from . import commands, health
from .cluster import Session
from .config import Cluster, Node
from .errors import UgroError
from .jobs import validate_name
from .wording import differs, group_by

STORE_GRACE = 60  # seconds the rendezvous store outlives its node's torchrun at most
PORT_SEARCH = 50  # how far past a busy master port `next-free` looks
RANK_PREFIX = "[rank${rank}]:"  # torchrun's per-line prefix template


HYPERPARAMETERS = ("epochs", "lr", "model", "dataset", "batch_size")
MODULE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
STALL_AFTER = 600.0  # seconds of silence (no output, no metric) before a running job is stalled
ON_STALL = ("flag", "cancel")  # what the supervisor does with a stalled job
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h)?\s*$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, None: 1}


def parse_duration(option: str, value) -> float:
    """Seconds from `90s`, `10m`, `1.5h` or a plain number of seconds; > 0 and at most a week."""
    m = DURATION_RE.match(str(value))
    seconds = float(m.group(1)) * UNIT_SECONDS[m.group(2)] if m else 0.0
    if not 0 < seconds <= 7 * 86400:
        raise UgroError(f"--{option}: expected a duration such as 90s, 10m or 1h (more than 0, "
                        f"at most a week), got {value!r}")
    return seconds


@dataclass(frozen=True)
class LaunchConfig:
    """Everything a launch needs from the command line, checked before anything runs.

    The launch contract: the script's argv gets only the hyperparameters given for this
    launch (typed, or the script's own entry under `scripts:` in training_defaults.yaml),
    `--resume` when asked, and `--script-args` verbatim. Everything else UGRO knows reaches
    every rank through the environment (`UGRO_JOB_ID`, `UGRO_JOB_DIR`, ...).
    """

    name: str
    script: str  # a path in the project, or `-m package.module`
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
    stall_after: float = STALL_AFTER  # the supervisor flags the job after this much silence
    on_stall: str = "flag"  # or "cancel": stop the job, FAILED "stalled"
    # The queue's requests (`ugro.schedule` checks and resolves them).
    queue: bool = False
    num_nodes: int | None = None
    min_gpu_mem: str | None = None
    priority: int = 0
    after: tuple[str, ...] = ()

    def __post_init__(self):
        validate_name(self.name)
        if self.epochs is not None and self.epochs < 1:
            raise UgroError(f"--epochs must be >= 1, got {self.epochs}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UgroError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UgroError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise UgroError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if not (math.isfinite(self.stall_after) and self.stall_after > 0):
            raise UgroError(f"--stall-after must be a duration > 0, got {self.stall_after}")
        if self.on_stall not in ON_STALL:
            raise UgroError(f"--on-stall: expected {' or '.join(ON_STALL)}, "
                            f"got {self.on_stall!r}")
        if self.script.startswith("-m"):
            if not MODULE_RE.match(self.module or ""):
                raise UgroError(f"--script {self.script!r}: expected -m package.module")
        elif (not self.script or self.script.startswith("-") or os.path.isabs(self.script)
              or ".." in Path(self.script).parts):
            raise UgroError(f"--script must be a path inside the project or -m package.module, "
                            f"got {self.script!r}")

    @property
    def module(self) -> str | None:
        """The module of `-m package.module`, or None for a script file."""
        return self.script[2:].strip() if self.script.startswith("-m") else None

    @classmethod
    def from_options(cls, defaults: dict, scripts: dict, **options) -> LaunchConfig:
        """Command-line options over the script's own defaults (`scripts:` in
        training_defaults.yaml); the script itself over `launch: script:`."""
        def pick(key, kind, fallback):
            value = options.get(key)
            if value is None:
                value = fallback.get(key)
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
        stall_after = options.get("stall_after")
        if stall_after is None:
            stall_after = defaults.get("stall_after")
        script = pick("script", str, defaults) or "scripts/train_single_test.py"
        own = scripts.get(script) or {}
        return cls(
            name=options.get("name"),
            script=script,
            epochs=pick("epochs", int, own),
            lr=pick("lr", float, own),
            model=pick("model", str, own),
            dataset=pick("dataset", str, own),
            batch_size=pick("batch_size", int, own),
            nodes=options.get("nodes"),
            nproc_per_node=pick("nproc_per_node", int, defaults),
            detach=bool(options.get("detach")),
            resume=bool(options.get("resume")),
            script_args=extra,
            stall_after=(STALL_AFTER if stall_after is None
                         else parse_duration("stall-after", stall_after)),
            on_stall=options.get("on_stall") or defaults.get("on_stall") or "flag",
        )

    def script_argv(self) -> list[str]:
        """What follows torchrun's own options: the script (or `--module M`) and its argv."""
        argv = ["--module", self.module] if self.module else [self.script]
        for key in HYPERPARAMETERS:
            value = getattr(self, key)
            if value is not None:
                argv += [f"--{key.replace('_', '-')}", str(value)]
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
    store: list[str] | None = None  # the rendezvous store the host node runs beside torchrun


def rank_env(node: Node, cfg: LaunchConfig) -> dict[str, str]:
    """What every rank's environment gets beside torchrun's own, on any backend."""
    return {
        **node.env,
        "UGRO_JOB_NAME": cfg.name,
        "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": RANK_PREFIX,
        "PYTHONUNBUFFERED": "1",
    }


def ranks_per_node(cluster: Cluster, cfg: LaunchConfig) -> dict[str, int]:
    """How many ranks each chosen node starts; refused unless every node starts as many."""
    procs = {n.name: cfg.nproc_per_node or n.procs for n in cluster.select(cfg.nodes)}
    if len(set(procs.values())) > 1:
        counts = ", ".join(f"{k}: {v}" for k, v in procs.items())
        raise UgroError(
            f"nodes would start different numbers of ranks ({counts}); "
            "pass --nproc-per-node N to start N on each"
        )
    return procs


def plan(cluster: Cluster, cfg: LaunchConfig, job_id: str, port: int) -> list[NodePlan]:
    """The torchrun command for each node: ranks and rendezvous worked out here."""
    nodes = cluster.select(cfg.nodes)
    procs = ranks_per_node(cluster, cfg)
    master = nodes[0]  # the lowest-ranked chosen node hosts the rendezvous
    plans = []
    for node_rank, node in enumerate(nodes):
        d = commands.node_job_dir(node, job_id)
        store = None
        if cluster.rdzv_backend == "c10d":
            torchrun = ["-m", "torch.distributed.run"]
            rdzv = [
                "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{master.host}:{port}",
                "--rdzv-id", job_id,
                # The store is the host node's own process (`store`), not an agent's.
                "--rdzv-conf", "is_host=0",
                # The address the other nodes reach this one by; c10d also
                # orders global ranks by it (it ignores --node-rank).
                "--local-addr", node.host,
            ]
            if node is master:
                store = node.python.argv() + ["-c", commands.RDZV_STORE, master.host,
                                              str(port), str(STORE_GRACE)]
        else:
            # torchrun with rank 0's agent, which holds the store, leaving last.
            torchrun = ["-c", commands.TORCHRUN_STATIC]
            rdzv = ["--node-rank", str(node_rank),
                    "--master-addr", master.host, "--master-port", str(port),
                    # The workers' TORCHELASTIC_RUN_ID and the store's key prefix.
                    "--rdzv-id", job_id]
        argv = node.python.argv() + torchrun + [
            "--nnodes", str(len(nodes)),
            "--nproc-per-node", str(procs[node.name]),
            "--max-restarts", "0",
            "--tee", "3",
            "--log-dir", f"{d}/torchrun",
            *rdzv,
            *cfg.script_argv(),
        ]
        plans.append(NodePlan(node, node_rank, procs[node.name], argv, rank_env(node, cfg),
                              store))
    return plans


def pick_port(busy: set[int], port: int, policy: str, node: str) -> int:
    """The master port to use given the ports already listening on the master node."""
    if port not in busy:
        return port
    if policy == "refuse":
        raise UgroError(f"preflight: master port {port} is busy on {node} "
                        "(cluster.port_policy: refuse)")
    for candidate in range(port + 1, min(port + PORT_SEARCH, 65535)):
        if candidate not in busy:
            return candidate
    raise UgroError(f"preflight: no free port in {port}..{port + PORT_SEARCH} on {node}")


def choose_port(cluster: Cluster, report: health.NodeHealth) -> int:
    """The master port, from the ports the master's preflight found listening."""
    head, marked, ports = report.then.partition(commands.PORTS_MARK + "\n")
    if not marked:
        raise UgroError(f"preflight: cannot read ports on {report.node}")
    busy = {int(h, 16) for h in ports.split() if re.fullmatch(r"[0-9A-Fa-f]+", h)}
    return pick_port(busy, cluster.master_port, cluster.port_policy, report.node)


def script_status(report: health.NodeHealth) -> int | None:
    """has_script's exit status as the node's preflight answered it; None if it did not."""
    m = re.search(rf"^{commands.SCRIPT_MARK} (\d+)$", report.then, re.M)
    return int(m.group(1)) if m else None


def version_problems(reports: list[health.NodeHealth]) -> tuple[list[str], list[str]]:
    """(what breaks a job, what only differs) among the nodes' versions.

    Python's major.minor and torch's version must agree (pickled state and the
    collectives' wire format change with them), and so must the CUDA build across the
    nodes that have GPUs; a Python patch release or the driver only warrants a note.
    """
    def split(label: str, value_of, nodes) -> str | None:
        return differs(label, group_by((r.node, str(value_of(r))) for r in nodes))

    def minor(r):
        return ".".join(str(r.python).split(".")[:2])

    gpu_nodes = [r for r in reports if r.gpus]
    errors = [split("python", minor, reports), split("torch", lambda r: r.torch, reports),
              split("CUDA build", lambda r: r.torch_cuda, gpu_nodes)]
    warnings = [split("driver", lambda r: r.driver, gpu_nodes)]
    if errors[0] is None:  # the same major.minor: a patch release alone is harmless
        warnings.insert(0, split("python", lambda r: r.python, reports))
    return [e for e in errors if e], [w for w in warnings if w]


def preflight(cluster: Cluster, cfg: LaunchConfig,
              session: Session) -> tuple[list[health.NodeHealth], int, list[str]]:
    """The chosen nodes are healthy, have the script, and agree on the versions that matter.

    Returns their reports, the master port and warnings (versions that differ harmlessly).
    """
    nodes = cluster.select(cfg.nodes)
    # One exec per node: the probe, then whether the script is there and, on the node that
    # hosts the rendezvous, which ports are taken.
    reports = health.check(cluster, nodes, session=session, then=lambda n: (
        commands.preflight_checks(n, cfg.script, cfg.module, ports=n is nodes[0])))
    bad = [r for r in reports if not r.healthy]
    if bad:
        raise UgroError("preflight: " + "; ".join(
            f"{r.node} unhealthy: {', '.join(r.problems)}" for r in bad))
    errors, warnings = version_problems(reports)
    if errors:
        raise UgroError(f"preflight: {'; '.join(errors)}; make the environments match "
                        "(inv sync-envs) or choose matching nodes with --nodes")
    answers = {r.node: script_status(r) for r in reports}
    missing = [name for name, code in answers.items() if code == 3]
    if missing:
        what = f"module {cfg.module}" if cfg.module else f"script {cfg.script}"
        raise UgroError(f"preflight: {what} not found on {', '.join(missing)} "
                        f"(in the project path; run: inv sync)")
    broken = [f"{name}: {'no answer' if code is None else f'exit code {code}'}"
              for name, code in answers.items() if code not in (0, 3)]
    if broken:
        raise UgroError(f"preflight: cannot check the script on {'; '.join(broken)}")
    return reports, choose_port(cluster, reports[0]), warnings
