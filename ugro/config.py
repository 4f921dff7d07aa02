"""The cluster file, parsed once into typed dataclasses.

Everything downstream takes a `Cluster`; nothing else reads the raw YAML. Every
error names the file and either the YAML line or the field path
(`workers[1].ip: missing`), so a user can fix it from one line.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import UgroError
from .fields import ConfigError, Fields, expand, expand_path, whoami

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]*$")
STRATEGIES = ("pixi", "venv", "system")
SLURM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")  # partition, account, qos
SLURM_TIME_RE = re.compile(
    r"^(?:\d+(?::\d{1,2}){0,2}|\d+-\d{1,2}(?::\d{1,2}){0,2}|UNLIMITED|INFINITE)$"
)


@dataclass(frozen=True)
class PythonEnv:
    """How to run Python on a node: the sync-envs strategy and its interpreter."""

    strategy: str = "system"  # pixi | venv | system
    pixi_env: str = "default"
    venv: str = ".venv"  # relative to the project path, or absolute
    command: str = "python3"  # the system interpreter

    def argv(self) -> list[str]:
        """The interpreter as argv words, run from inside the project path."""
        if self.strategy == "pixi":
            return ["pixi", "run", "--frozen", "-e", self.pixi_env, "python"]
        if self.strategy == "venv":
            return [f"{self.venv.rstrip('/')}/bin/python"]
        return [self.command]


@dataclass(frozen=True)
class Node:
    name: str
    host: str
    user: str
    port: int = 22
    identity_file: str | None = None
    project_path: str = "."
    python: PythonEnv = field(default_factory=PythonEnv)
    gpus: int = 0
    cpu_procs: int = 1  # ranks to start on a node without GPUs
    rank: int = 0  # node rank in a launch over every training node
    local: bool = False  # the control node itself: Invoke's local runner, no SSH
    env: dict[str, str] = field(default_factory=dict)
    gpu_model: str | None = None  # documentation only; health reports the real one

    @property
    def procs(self) -> int:
        """Default ranks per node: one per GPU, or cpu_procs on a CPU node."""
        return self.gpus if self.gpus > 0 else self.cpu_procs

    @property
    def address(self) -> str:
        return self.host if self.port == 22 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SlurmSettings:
    """A Slurm cluster's `slurm:` section: what every job asks of Slurm, and how it runs."""

    shared_dir: str  # absolute, seen by the login node and every compute node: job dirs
    project_path: str  # where torchrun starts on the compute nodes (the code, shared)
    nodes: int = 1  # per job
    gpus_per_node: int = 0  # asked for as gres gpu:N, and one rank each
    cpu_procs: int = 1  # ranks per node when there are no GPUs
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str | None = None
    setup: tuple[str, ...] = ()  # shell lines before srun (`module load ...`)
    python: PythonEnv = field(default_factory=PythonEnv)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def procs(self) -> int:
        return self.gpus_per_node or self.cpu_procs

    def node(self, name: str) -> Node:
        """A compute node of an allocation, as Slurm names it."""
        if not NAME_RE.match(name):
            raise UgroError(f"not a Slurm node name: {name!r}")
        return Node(name=name, host=name, user="", project_path=self.project_path,
                    python=self.python, gpus=self.gpus_per_node, cpu_procs=self.cpu_procs,
                    env=self.env)


@dataclass(frozen=True)
class Cluster:
    name: str
    source: Path
    nodes: tuple[Node, ...]  # training nodes, ordered by rank
    master: Node  # hosts the rendezvous; rank 0
    master_port: int = 29500
    rdzv_backend: str = "static"  # or "c10d" (see README, "How a launch works")
    health_timeout: float = 5.0
    known_hosts: str = "~/.ssh/known_hosts"
    port_policy: str = "next-free"  # or "refuse": what a busy master port does
    lost_after: float = 30.0  # seconds a node may stay silent before its job fails as lost
    sync_paths: tuple[str, ...] = ()
    # With Slurm, `master` (the only node) is the login node that runs Slurm's commands;
    # the compute nodes are Slurm's to choose, named per job.
    slurm: SlurmSettings | None = None

    def node(self, name: str) -> Node:
        if self.slurm is not None:
            return self.slurm.node(name)
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise UgroError(f"unknown node '{name}' (this cluster has: {known})")

    def select(self, names: str | None) -> tuple[Node, ...]:
        """The nodes named in a comma list (all when empty), in rank order."""
        if not names:
            return self.nodes
        wanted = [s.strip() for s in names.split(",") if s.strip()]
        if not wanted:
            raise UgroError(f"--nodes {names!r}: no node names in it")
        for name in wanted:
            self.node(name)
        return tuple(n for n in self.nodes if n.name in wanted)

    @property
    def known_hosts_path(self) -> Path:
        return Path(os.path.expanduser(self.known_hosts))


NODE_FIELDS = {
    "name", "ip", "host", "user", "ssh_port", "port", "identity_file", "project_path",
    "python", "gpus", "cpu_procs", "rank", "local", "env", "gpu_model",
}


def _python_env(f: Fields, key: str, local: bool) -> PythonEnv:
    raw = f.data.get(key)
    if raw is None:
        # The control node trains, by default, in the environment UGRO runs in.
        return PythonEnv(command=sys.executable) if local else PythonEnv()
    if isinstance(raw, str):
        return PythonEnv(command=expand(raw))
    sub = Fields(f.source, f"{f.path}.{key}", raw)
    sub.unknown({"strategy", "env", "venv", "command"})
    strategy = sub.string("strategy", "system")
    if strategy not in STRATEGIES:
        sub.fail("strategy", f"must be one of {', '.join(STRATEGIES)}")
    return PythonEnv(
        strategy=strategy,
        pixi_env=sub.string("env", "default"),
        venv=sub.string("venv", ".venv"),
        command=sub.string("command", "python3"),
    )


def _node(source: Path, path: str, data: Any, default_rank: int) -> Node:
    f = Fields(source, path, data)
    f.unknown(NODE_FIELDS)
    name = f.string("name")
    if not NAME_RE.match(name):
        f.fail("name", "use letters, digits, '.', '_' or '-' (at most 64)")
    local = f.get("local", bool, False)
    host = f.string("ip", None) or f.string("host", None)
    if host is None:
        if not local:
            f.fail("ip", "missing")
        host = "127.0.0.1"
    if not HOST_RE.match(host):
        f.fail("ip", f"not a host name or address: {host!r}")
    port = f.port("ssh_port" if "ssh_port" in f.data else "port", 22)
    identity = f.string("identity_file", None)
    return Node(
        name=name,
        host=host,
        user=f.string("user", None) or os.environ.get("USER") or whoami(),
        port=port,
        identity_file=os.path.expanduser(identity) if identity else None,
        project_path=expand_path(f.string("project_path", "."), local),
        python=_python_env(f, "python", local),
        gpus=f.count("gpus", 0),
        cpu_procs=f.count("cpu_procs", 1, minimum=1),
        rank=f.count("rank", default_rank),
        local=local,
        env=f.env("env"),
        gpu_model=f.string("gpu_model", None),
    )


def parse_cluster(text: str, source: Path, project_root: Path | None = None) -> Cluster:
    """Parse cluster YAML text; `source` only names the file in errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: {where}: invalid YAML ({problem})") from None
    if data is None:
        raise ConfigError(f"{source}: empty file")
    top = Fields(source, "", data)
    kind = top.string("backend", "ssh")
    if kind not in ("ssh", "slurm"):
        top.fail("backend", "must be ssh or slurm")
    if kind == "slurm":
        return _slurm_cluster(top, project_root)
    # `training:` belongs to the training scripts (train_production.py --config FILE).
    top.unknown({"backend", "cluster", "master", "workers", "training", "sync"})
    top.get("training", dict, {})
    settings = Fields(source, "cluster", data.get("cluster") or {})
    settings.unknown({
        "name", "master_port", "rdzv_backend", "health_timeout", "known_hosts", "port_policy",
        "lost_after",
    })

    master_raw = top.get("master", dict)
    master_f = Fields(source, "master", master_raw)
    trains = master_f.get("train", bool, True)
    master_data = {k: v for k, v in master_raw.items() if k != "train"}
    master = _node(source, "master", master_data, 0)

    workers_raw = top.get("workers", list, [])
    workers = [
        _node(source, f"workers[{i}]", w, i + (1 if trains else 0))
        for i, w in enumerate(workers_raw)
    ]
    nodes = ([master] if trains else []) + workers
    if not nodes:
        top.fail("workers", "no training nodes (add workers or set master.train: true)")
    _refuse_duplicates(source, nodes, "name")
    _refuse_duplicates(source, nodes, "rank")
    if project_root is not None:
        # A local node's relative project path is this checkout's.
        nodes = [
            replace(n, project_path=str((project_root / n.project_path).resolve()))
            if n.local and not os.path.isabs(n.project_path) else n
            for n in nodes
        ]
        master = next((n for n in nodes if n.name == master.name), master)
    nodes.sort(key=lambda n: n.rank)
    if [n.rank for n in nodes] != list(range(len(nodes))):
        ranks = ", ".join(str(n.rank) for n in nodes)
        top.fail("workers", f"node ranks must be 0..{len(nodes) - 1}, got {ranks}")

    backend = settings.string("rdzv_backend", "static")
    if backend not in ("c10d", "static"):
        settings.fail("rdzv_backend", "must be c10d or static")
    policy = settings.string("port_policy", "next-free")
    if policy not in ("next-free", "refuse"):
        settings.fail("port_policy", "must be next-free or refuse")
    timeout = settings.get("health_timeout", float, 5.0)
    if not 0 < timeout < float("inf"):
        settings.fail("health_timeout", "must be > 0")
    lost_after = settings.get("lost_after", float, 30.0)
    if not 0 < lost_after < float("inf"):
        settings.fail("lost_after", "must be a number of seconds > 0")
    sync = Fields(source, "sync", data.get("sync") or {})
    sync.unknown({"paths"})
    extra_paths = sync.get("paths", list, [])
    return Cluster(
        name=settings.string("name", source.stem),
        source=source,
        nodes=tuple(nodes),
        master=master,
        master_port=settings.port("master_port", 29500),
        rdzv_backend=backend,
        health_timeout=timeout,
        known_hosts=expand(settings.string("known_hosts", "~/.ssh/known_hosts")),
        port_policy=policy,
        lost_after=lost_after,
        sync_paths=tuple(str(p) for p in extra_paths),
    )


SLURM_FIELDS = {
    "login", "shared_dir", "project_path", "nodes", "gpus_per_node", "cpu_procs", "partition",
    "account", "qos", "time", "setup", "python", "env",
}


def _slurm_cluster(top: Fields, project_root: Path | None) -> Cluster:
    """`backend: slurm`: the login node, and what every job asks of Slurm."""
    source = top.source
    top.unknown({"backend", "cluster", "slurm", "training"})
    top.get("training", dict, {})
    settings = Fields(source, "cluster", top.data.get("cluster") or {})
    settings.unknown({"name"})
    f = Fields(source, "slurm", top.get("slurm", dict))
    f.unknown(SLURM_FIELDS)
    login_raw = f.get("login", dict, {"local": True})
    login = _node(source, "slurm.login", {"name": "login", **login_raw}, 0)
    local = login.local

    def path(key: str) -> str:
        value = expand_path(f.string(key), local)
        if local and project_root is not None and not os.path.isabs(value):
            value = str((project_root / value).resolve())
        if not value.startswith(("/", "~")):
            f.fail(key, f"must be an absolute path, got {value!r}")
        return value

    shared = path("shared_dir")
    if not shared.startswith("/"):
        f.fail("shared_dir", f"must be an absolute path, got {shared!r}")
    names = {}
    for key in ("partition", "account", "qos"):
        names[key] = f.string(key, None)
        if names[key] is not None and not SLURM_NAME_RE.match(names[key]):
            f.fail(key, f"not a Slurm name: {names[key]!r}")
    time_limit = f.string("time", None)
    if time_limit is not None and not SLURM_TIME_RE.match(time_limit):
        f.fail("time", f"not a Slurm time limit (minutes, H:M:S or D-H:M:S): {time_limit!r}")
    setup = f.get("setup", list, [])
    for i, line in enumerate(setup):
        if not isinstance(line, str) or "\n" in line:
            f.fail(f"setup[{i}]", "expected one line of shell")
    slurm = SlurmSettings(
        shared_dir=shared.rstrip("/") or "/",
        project_path=path("project_path"),
        nodes=f.count("nodes", 1, minimum=1),
        gpus_per_node=f.count("gpus_per_node", 0),
        cpu_procs=f.count("cpu_procs", 1, minimum=1),
        time_limit=time_limit,
        setup=tuple(setup),
        python=_python_env(f, "python", False),
        env=f.env("env"),
        **names,
    )
    return Cluster(name=settings.string("name", source.stem), source=source, nodes=(login,),
                   master=login, slurm=slurm)


def _refuse_duplicates(source: Path, nodes: list[Node], attr: str):
    seen: dict[Any, str] = {}
    for n in nodes:
        value = getattr(n, attr)
        if value in seen:
            raise ConfigError(
                f"{source}: duplicate node {attr} {value!r} ({seen[value]} and {n.name})"
            )
        seen[value] = n.name


def load_cluster(path: str | Path, project_root: Path | None = None) -> Cluster:
    """Read and parse a cluster file; a relative path is taken from the project root."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute() and project_root is not None:
        p = project_root / p
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: cluster file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    return parse_cluster(text, p, project_root)
