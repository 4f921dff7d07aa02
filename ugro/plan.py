"""Planning a launch: the validated options, each node's torchrun command, the preflight.

Nothing here starts a process. `LaunchConfig` is checked before anything runs;
`plan` works out ranks and the rendezvous for every node; `preflight` asks the
nodes whether they can run it (healthy, versions that agree, a free master port).
"""

from __future__ import annotations

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
    output_dir = commands.job_path(job_id)
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


def choose_port(cluster: Cluster, session: Session, master: Node) -> int:
    answer = session.run(master, commands.listening_ports(master))
    if not answer.ok:
        raise UgroError(f"preflight: cannot read ports on {master.name}: "
                        f"{answer.error or answer.stderr.strip()}")
    busy = {int(h, 16) for h in answer.stdout.split() if re.fullmatch(r"[0-9A-Fa-f]+", h)}
    return pick_port(busy, cluster.master_port, cluster.port_policy, master.name)


def check_script(cfg: LaunchConfig, root: Path) -> None:
    if not (root / cfg.script).is_file():
        raise UgroError(f"script not found: {cfg.script}")


def preflight(cluster: Cluster, cfg: LaunchConfig,
              session: Session) -> tuple[list[health.NodeHealth], int]:
    """The chosen nodes are healthy and agree on versions; returns their reports and the port."""
    nodes = cluster.select(cfg.nodes)
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
