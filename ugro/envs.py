"""`inv sync-envs`: every worker's Python environment made to match the control node's lock.

Each node follows its `python.strategy` (pixi installs pixi.lock, venv installs
scripts/requirements.txt, system is only checked); then every node's environment
is fingerprinted (Python, torch, CUDA, NCCL, the lock's hash, a venv's packages)
and any difference is named. `parse_fingerprint` and `env_drift` are pure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import commands, health
from .cluster import Session, fan_out
from .config import Cluster, Node
from .errors import UgroError
from .sync import (
    PIXI_FILES,
    REQUIREMENTS,
    Progress,
    filters,
    is_control,
    require_rsync,
    run_rsync,
)
from .wording import differs, group_by


def lock_file(strategy: str) -> str:
    """The file that pins a strategy's environment, relative to the project."""
    return "pixi.lock" if strategy == "pixi" else REQUIREMENTS


def sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class Step:
    """One step of bringing a node's environment in line: an rsync here, or a command there."""

    label: str
    rsync: tuple[str, ...] | None = None  # argv run on the control node
    remote: str | None = None  # shell command line run on the node


def env_steps(cluster: Cluster, node: Node, root: Path, find_links: str | None = None,
              no_index: bool = False) -> list[Step]:
    """What `sync-envs` runs for a node, in order; none for the `system` strategy."""
    strategy = node.python.strategy
    if strategy == "system":
        return []
    files = PIXI_FILES if strategy == "pixi" else (REQUIREMENTS,)
    copy = Step(f"sync {', '.join(files)}", rsync=tuple(commands.rsync(
        node, root, filters(root, files),
        known_hosts=cluster.known_hosts_path, timeout=cluster.health_timeout,
    )))
    if strategy == "pixi":
        return [copy, Step(f"pixi install --frozen -e {node.python.pixi_env}",
                           remote=commands.pixi_install(node))]
    return [copy, Step(f"pip install -r {REQUIREMENTS}",
                       remote=commands.venv_install(node, REQUIREMENTS, find_links, no_index))]


@dataclass(frozen=True)
class Fingerprint:
    python: str | None
    torch: str | None
    cuda: str | None
    nccl: str | None
    lock: str | None  # sha256 of the node's lock file; None when it has none
    packages: tuple[str, ...] | None = None  # name==version, for venvs

    @property
    def packages_hash(self) -> str | None:
        if self.packages is None:
            return None
        return hashlib.sha256("\n".join(self.packages).encode()).hexdigest()


def parse_fingerprint(stdout: str) -> dict:
    """The ENV_PROBE report, found among whatever else the login printed."""
    return health.parse_marked_json(stdout, commands.ENV_PREFIX, "environment report")


@dataclass
class NodeEnv:
    node: str
    strategy: str
    action: str  # "installed", "checked" (system, or --check), "control node"
    error: str | None = None
    fingerprint: Fingerprint | None = None
    seconds: float = 0.0  # its steps and its fingerprint

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class EnvReport:
    nodes: list[NodeEnv]
    drift: list[str]

    @property
    def ok(self) -> bool:
        return not self.drift and all(n.ok for n in self.nodes)


def _why(answer) -> str:
    """The line of a failed command's output that says why (pip's ERROR: line when it has one)."""
    if answer.error:
        return answer.error
    lines = [ln.strip() for ln in (answer.stderr + "\n" + answer.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    why = errors[0] if errors else (lines[-1] if lines else "no output")
    return f"{answer.node.name}: exit {answer.exited}: {why}"


def _fingerprint(session: Session, node: Node, report: health.NodeHealth) -> Fingerprint | str:
    if not report.hostname:
        return "; ".join(report.problems) or f"{node.name}: no health report"
    strategy = node.python.strategy
    command = commands.env_fingerprint(node, lock_file(strategy), packages=strategy == "venv")
    answer = session.run(node, command, timeout=session.timeout + 30)
    if not answer.ok:
        return _why(answer)
    try:
        env = parse_fingerprint(answer.stdout)
    except ValueError as exc:
        return f"{node.name}: {exc}"
    packages = env.get("packages")
    return Fingerprint(report.python, report.torch, report.torch_cuda, env.get("nccl"),
                       env.get("lock"), tuple(packages) if packages is not None else None)


def env_drift(envs: list[NodeEnv], control_locks: dict[str, str | None]) -> list[str]:
    """Every way the fingerprinted nodes differ, one line each, naming the nodes.

    Versions are compared across the nodes; each node's lock file against the
    control node's; a venv's packages against the other venvs'.
    """
    prints = [(e, e.fingerprint) for e in envs if e.fingerprint is not None]
    lines = []
    for label in ("python", "torch", "cuda", "nccl"):
        line = differs(label, group_by((e.node, getattr(fp, label) or "none") for e, fp in prints))
        if line:
            lines.append(line)
    for name in sorted({lock_file(e.strategy) for e, _ in prints}):
        locks = [(e.node, fp.lock) for e, fp in prints if lock_file(e.strategy) == name]
        stale = [node for node, lock in locks if lock and lock != control_locks.get(name)]
        missing = [node for node, lock in locks if not lock]
        if stale:
            lines.append(f"{name} differs from the control node's on {', '.join(stale)} "
                         "(run: inv sync)")
        if missing:
            lines.append(f"{name} missing on {', '.join(missing)} (run: inv sync)")
    venvs = [(e, dict(p.split("==", 1) for p in fp.packages if "==" in p))
             for e, fp in prints if fp.packages is not None]
    names = sorted({k for _, pkgs in venvs for k in pkgs})
    for name in names:
        line = differs(f"package {name}",
                       group_by((e.node, pkgs.get(name, "absent")) for e, pkgs in venvs))
        if line:
            lines.append(line)
    return lines


def sync_envs(cluster: Cluster, nodes: Iterable[Node], root: Path, *, find_links: str | None = None,
              no_index: bool = False, check: bool = False,
              progress: Progress | None = None) -> EnvReport:
    """Bring every node's environment to the control node's lock, then compare fingerprints.

    `find_links` and `no_index` go to pip on venv nodes, as seen from each node.
    With `check`, nothing is installed anywhere: the fingerprints are only compared.
    The control node is only fingerprinted: its lock is the reference.
    """
    root = Path(root).resolve()
    nodes = list(nodes)
    progress = progress or Progress(None)
    workers = [] if check else [n for n in nodes if not is_control(n, root)]
    for n in workers:
        needed = {"pixi": PIXI_FILES, "venv": (REQUIREMENTS,)}.get(n.python.strategy, ())
        missing = [f for f in needed if not (root / f).is_file()]
        if missing:
            hint = " (create it there with: pixi lock)" if "pixi.lock" in missing else ""
            raise UgroError(f"{n.name} uses python.strategy {n.python.strategy}, but "
                            f"{' and '.join(missing)} is not in {root}{hint}")
    if any(n.python.strategy != "system" for n in workers):
        require_rsync()
    control_locks = {f: sha256_file(root / f) for f in ("pixi.lock", REQUIREMENTS)}

    with Session(cluster) as session:
        def prepare(node: Node) -> NodeEnv:
            strategy = node.python.strategy
            if is_control(node, root):
                return NodeEnv(node.name, strategy, "control node")
            steps = [] if check else env_steps(cluster, node, root, find_links, no_index)
            env = NodeEnv(node.name, strategy, "installed" if steps else "checked")
            for step in steps:
                if step.rsync:
                    done = run_rsync(cluster, node, root, list(step.rsync), progress, step.label)
                    env.error = done.error
                    env.seconds += done.seconds
                else:
                    progress.start(node.name, step.label)
                    answer = session.run(node, step.remote)
                    if answer.ok:
                        env.error = None
                    elif commands.NO_PIXI in answer.stderr:
                        env.error = (f"{node.name}: pixi is not installed (not on the PATH "
                                     "of SSH commands; see https://pixi.sh)")
                    else:
                        env.error = _why(answer)
                    env.seconds += progress.end(node.name, step.label, env.error)
                if env.error:
                    break
            return env

        envs = fan_out(nodes, prepare)
        ready = [n for n in nodes if envs[n.name].ok]

        def fingerprint(node: Node) -> Fingerprint | str:
            progress.start(node.name, "fingerprint")
            (report,) = health.check(cluster, (node,), session=session)
            result = _fingerprint(session, node, report)
            envs[node.name].seconds += progress.end(
                node.name, "fingerprint", result if isinstance(result, str) else None)
            return result

        fingerprints = fan_out(ready, fingerprint) if ready else {}
        for name, result in fingerprints.items():
            if isinstance(result, str):
                envs[name].error = result
            else:
                envs[name].fingerprint = result
    results = list(envs.values())
    return EnvReport(results, env_drift(results, control_locks))


def env_table(report: EnvReport) -> str:
    """The nodes' fingerprints side by side, one column per node."""
    from tabulate import tabulate

    def short(value: str | None) -> str:
        return value[:12] if value else "-"

    cols = []
    for e in report.nodes:
        fp = e.fingerprint
        packages = "-"
        if fp and fp.packages is not None:
            packages = f"{short(fp.packages_hash)} ({len(fp.packages)})"
        cols.append([
            e.strategy,
            "FAILED" if e.error else e.action,
            (fp and fp.python) or "-",
            (fp and fp.torch) or "-",
            (fp and fp.cuda) or "-",
            (fp and fp.nccl) or "-",
            short(fp.lock) if fp else "-",
            packages,
            f"{e.seconds:.1f}s",
        ])
    labels = ["strategy", "step", "python", "torch", "cuda", "nccl", "lock sha256", "packages",
              "time"]
    rows = [[label] + [col[i] for col in cols] for i, label in enumerate(labels)]
    return tabulate(rows, headers=[""] + [e.node for e in report.nodes], tablefmt="simple")
