"""One benchmark run's world: its sizes, its sshd lab, its temporary directory, and the
processes it started, all stopped by `close()`.

Every lab node lives on this machine, so the job processes a run starts on "nodes" are found
in this machine's /proc (`ugro.procs`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from sshlab import Lab

from benchmarks.measure import CELL_BUDGET_S, ROOT, Cell, compare
from benchmarks.tables import mark
from ugro import procs
from ugro.lifecycle import supervisor_alive

JOB = "benchmarks/bench_job.py"  # relative to the project, on the control node and every node


@dataclass(frozen=True)
class Sizes:
    """How big each section's work is. `full` is what results/ reports; `tiny` is a smoke test."""

    launch_nodes: int = 3  # launch, cancel and logs
    sync_nodes: int = 16
    sync_first_nodes: int = 4
    sync_tree_mb: int = 50
    log_lines: int = 100_000
    history_jobs: int = 10_000
    train_steps: int = 200  # per training run
    warm_up: bool = True


SIZES = {
    "full": Sizes(),
    # Runs every section in well under a minute of a 2-core machine; its figures are cold
    # (no warm-up) and not comparable with a full run's.
    "tiny": Sizes(launch_nodes=2, sync_nodes=2, sync_first_nodes=2, sync_tree_mb=1,
                  log_lines=1_000, history_jobs=200, train_steps=30, warm_up=False),
}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class BenchLab(Lab):
    """The test suite's lab, with each node's HOME its own directory.

    This machine's root has a ~/.bashrc that runs `pyenv init` (0.4 s), and bash reads it for
    every command sshd starts; that would add the same 0.4 s to every SSH session of every method
    and hide the control plane. A node's HOME here is its directory: no rc files, its project at
    ~/project.
    """

    def __init__(self, root: Path, size: int):
        super().__init__(root, ["rtx4070"] * size)
        for node in self.nodes:
            node.env["HOME"] = str(node.dir)

    def start(self) -> BenchLab:
        super().start()
        for node in self.nodes:
            (node.project / "benchmarks").mkdir(exist_ok=True)
            shutil.copy(ROOT / JOB, node.project / JOB)
        return self

    def ssh_config(self, path: Path) -> Path:
        """An ssh_config with one Host alias per node, for pdsh, ssh and rsync (`-F path`)."""
        path.write_text("".join(
            f"Host {n.name}\n  HostName {n.host}\n  Port {n.port}\n"
            f"  IdentityFile {self.key}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n  LogLevel ERROR\n\n" for n in self.nodes))
        return path


class Bench:
    """What the sections share: the lab, cluster files and environments for `inv`, the
    baselines' command lines, the targets and failures for the report."""

    def __init__(self, nodes: list[int], only: list[str], repeat: int, sizes: Sizes):
        self.node_counts, self.only, self.repeat, self.sizes = nodes, only, repeat, sizes
        self.tmp = Path(tempfile.mkdtemp(prefix="ugro-bench-"))
        self.data = self.tmp / "data"
        self.warm: set[str] = set()
        self.targets: list[tuple[str, str, bool | None]] = []
        self.popens: list[subprocess.Popen] = []
        self.tags: set[str] = set()  # job tags of the by-hand (pdsh) launches
        self.failures: list[str] = []
        entry = Path(sys.executable).with_name("inv")
        self.inv = [str(entry)] if entry.is_file() else [sys.executable, "-m", "invoke"]
        on_launch_nodes = {"launch", "cancel", "logs", "training"} & set(only)
        size = max([*(nodes if "health" in only else [1]),
                    *([sizes.launch_nodes] if on_launch_nodes else []),
                    *([sizes.sync_nodes] if "sync" in only else [])])
        self.lab = BenchLab(self.tmp / "lab", size)

    def start(self) -> None:
        say(f"starting {len(self.lab.nodes)} sshd lab nodes in {self.tmp}")
        self.lab.start()
        self.ssh_cfg = self.lab.ssh_config(self.tmp / "ssh_config")

    def cluster(self, count: int, name: str | None = None,
                project_path: Callable | None = None, sync_paths: list[str] | None = None) -> Path:
        """A cluster file for the first `count` lab nodes; no GPUs claimed, so --deep is healthy."""
        nodes = self.lab.nodes[:count]
        over = {n.name: {"gpus": 0, **({"project_path": str(project_path(n))}
                                       if project_path else {})} for n in nodes}
        data = self.lab.cluster_dict(nodes, timeout=30, node_overrides=over)
        if sync_paths:
            data["sync"] = {"paths": sync_paths}
        path = self.tmp / f"{name or f'cluster{count}'}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def env(self, cluster: Path) -> dict:
        return {**os.environ, "INVOKE_UGRO_CLUSTER": str(cluster),
                "INVOKE_UGRO_DATA_DIR": str(self.data),
                "INVOKE_UGRO_LOG_DIR": str(self.tmp / "logs")}

    def ssh(self, host: str, command: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_cfg), host, command]

    def pdsh(self, hosts: list[str], command: str) -> tuple[list[str], dict]:
        env = {**os.environ, "PDSH_RCMD_TYPE": "ssh",
               "PDSH_SSH_ARGS_APPEND": f"-F {self.ssh_cfg}"}
        # pdsh replaces %h, %u and %n in the command (host, user, rank); %% is a plain %.
        # Unescaped, UGRO's probe (`stat -c '%y %i %n'`) got its cache key mangled there, so
        # every pdsh run and the `inv health` after it started Python on every node.
        return ["pdsh", "-R", "ssh", "-w", ",".join(hosts), command.replace("%", "%%")], env

    def fabric(self, hosts: list[str], command: str) -> tuple[list[str], dict]:
        """The same by hand in Python: Fabric's ThreadingGroup (`fabric_launch.py`)."""
        return [sys.executable, str(ROOT / "benchmarks" / "fabric_launch.py"),
                str(self.ssh_cfg), command, *hosts], dict(os.environ)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
        self.popens.append(p)
        return p

    def close(self) -> None:
        """Stop every process this run started, then the lab; remove the temporary directory."""
        for p in self.popens:
            if p.poll() is None:
                p.kill()
                p.wait()
        ours = self.tags | {d.name for d in (self.data / "experiments").glob("*") if d.is_dir()}
        for pid, job_id, _ in job_processes(""):
            if job_id in ours:
                kill(pid)
        for pid in supervisors(self.data):
            kill(pid)
        self.lab.stop()
        # Anything else still running from this run's directory (a node-side watcher whose
        # session was cut, say) is this run's too.
        for pid in processes_mentioning(str(self.tmp).encode()):
            kill(pid)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def compare(self, label: str, methods: dict[str, Callable[[], float]], *,
                warm: bool = True, budget: float = CELL_BUDGET_S,
                repeat: int | None = None) -> dict[str, Cell]:
        """`measure.compare()`, noting every failed run for the report's Failures section."""
        warm_set = self.warm if warm and self.sizes.warm_up else None
        cells = compare(methods, repeat or self.repeat, warm_set, budget)
        self.failures += [f"{label}, {name}: {e}" for name, c in cells.items() for e in c.errors]
        return cells

    def target(self, what: str, measured: str, ok: bool | None) -> str:
        self.targets.append((what, measured, ok))
        return mark(ok)


def job_processes(prefix: str) -> list[tuple[int, str, str | None]]:
    """(pid, job id, torchrun RANK or None) of live processes tagged UGRO_JOB_ID=<prefix>..."""
    found = []
    for pid in procs.pids():
        env = procs.environ(pid) or {}
        job = env.get(b"UGRO_JOB_ID")
        if job is None or not job.startswith(prefix.encode()) or procs.state(pid) in (None, "Z"):
            continue
        rank = env.get(b"RANK") if b"LOCAL_RANK" in env else None
        found.append((pid, job.decode(), rank.decode() if rank is not None else None))
    return found


def processes_mentioning(*words: bytes) -> list[int]:
    """Pids of live processes, other than this one, whose command line holds every word."""
    return [pid for pid in procs.pids() if pid != os.getpid() and procs.running(pid, *words)]


def supervisors(data_dir: Path, job_id: str = "") -> list[int]:
    """Pids of the live supervisors of this run's jobs (of `job_id`'s only, when given), as
    their records name them; and any other `ugro.supervise` process for this data dir."""
    found = set(processes_mentioning(b"ugro.supervise", str(data_dir).encode(),
                                     job_id.encode()))
    for meta_file in (data_dir / "experiments").glob(f"{job_id or '*'}/metadata.json"):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("job_id") and supervisor_alive(meta):
            found.add(meta["supervisor_pid"])
    return sorted(found)


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
