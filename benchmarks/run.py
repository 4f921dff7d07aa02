"""What UGRO's control plane costs, side by side with pdsh, plain ssh and torchrun.

    python benchmarks/run.py [--nodes 1,4,16,32] [--only health,cli,launch,cancel,sync,logs]
                             [--repeat N] [--output FILE]

Runs on the sshd lab of the test suite (tests/sshlab.py: real OpenSSH daemons on 127.0.0.2...,
nothing leaves loopback), prints markdown tables and writes them to
benchmarks/results/<YYYY-MM-DD>.md (or --output). Every figure is the median whole-process wall
time of --repeat runs after one warm-up run per method; the methods of one row take turns, so
load on a shared machine falls on all of them alike, and ratios compare figures of the same run.
A method that has spent CELL_BUDGET_S seconds in one row stops repeating there (the row says n).

Everything lives in a temporary directory (cluster files, INVOKE_UGRO_DATA_DIR, INVOKE_UGRO_LOG_DIR,
the lab) and everything started is stopped on exit, error, Ctrl-C or SIGTERM. Timings are for
reading, never for asserting: tests/test_benchmarks.py only checks that the tables come out.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import yaml  # noqa: E402
from sshlab import Lab, free_port  # noqa: E402

from ugro import commands  # noqa: E402
from ugro.config import Node, PythonEnv  # noqa: E402

SECTIONS = ("health", "cli", "launch", "cancel", "sync", "logs")
JOB = "benchmarks/bench_job.py"  # relative to the project, on the control node and every node
CELL_BUDGET_S = 10.0
LAUNCH_BUDGET_S = 25.0
LOGS_BUDGET_S = 35.0
LAUNCH_NODES = 3
SYNC_NODES = 16
SYNC_FIRST_NODES = 4
SYNC_TREE_MB = 50
LOG_LINES = 100_000
TIMEOUT_S = 300
MAX_FAILURES = 2  # failed runs after which a method stops repeating in a row
SMI_ARGS = ("--query-gpu=index,name,memory.total,memory.used,utilization.gpu,temperature.gpu,"
            "driver_version --format=csv,noheader,nounits")


class Failed(Exception):
    """A measured command did not do what it should; its cell shows why instead of a time."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- measuring -----------------------------------------------------------------
@dataclass
class Cell:
    """The runs of one method in one row: the times of those that worked, why others did not."""

    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def error(self) -> str | None:
        """Why the method has no figure at all."""
        return None if self.samples or not self.errors else self.errors[0]


def compare(methods: dict[str, Callable[[], float]], repeat: int, warm: set[str] | None,
            budget: float = CELL_BUDGET_S) -> dict[str, Cell]:
    """Run each method `repeat` times, taking turns, after one warm-up run of each method not in
    `warm` yet (None: no warm-up). A method stops repeating once it has spent `budget` seconds
    here, warm-up included (every method gets at least one timed run), or has failed twice.
    """
    cells = {name: Cell() for name in methods}
    spent = dict.fromkeys(methods, 0.0)

    def once(name: str) -> float | None:
        t0 = time.perf_counter()
        try:
            return methods[name]()
        except Failed as exc:
            cells[name].errors.append(str(exc))
            return None
        finally:
            spent[name] += time.perf_counter() - t0

    for name in methods:
        if warm is not None and name not in warm:
            once(name)
            warm.add(name)
    for _ in range(repeat):
        for name in methods:
            cell = cells[name]
            if len(cell.errors) >= MAX_FAILURES or (cell.samples and spent[name] >= budget):
                continue
            value = once(name)
            if value is not None:
                cell.samples.append(value)
    return cells


def run(argv: list[str], *, env: dict | None = None, cwd: Path = ROOT,
        timeout: float = TIMEOUT_S) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command to its end; (wall seconds, result). A non-zero exit is a Failed."""
    start = time.perf_counter()
    try:
        p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Failed(f"timed out after {timeout:g} s") from None
    elapsed = time.perf_counter() - start
    if p.returncode != 0:
        raise Failed(f"exit {p.returncode}: {last_line(p.stderr or p.stdout)}")
    return elapsed, p


def why(text: str) -> str:
    """The line of a failed command's output most likely to say why: its last error, else last."""
    errors = [x for x in text.splitlines() if "rror" in x and "frame #" not in x]
    return last_line(errors[-1] if errors else text)


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return (lines[-1] if lines else "no output")[:160].replace("|", "/")


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def with_cpu(fn: Callable[[], float], into: list[float]) -> Callable[[], float]:
    """`fn`, also noting the CPU its child processes used (their user + system time)."""
    def wrapped() -> float:
        before = child_cpu()
        t = fn()
        into.append(child_cpu() - before)
        return t
    return wrapped


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               every: float = 0.02) -> float:
    """Poll until `predicate()` is true; the perf_counter time it first was."""
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if predicate():
            return now
        if now > deadline:
            raise Failed(f"{what}: not within {timeout:g} s")
        time.sleep(every)


# -- job processes: every lab node lives on this machine --------------------------
def job_processes(prefix: str) -> list[tuple[int, str, str | None]]:
    """(pid, job id, torchrun RANK or None) of live processes tagged UGRO_JOB_ID=<prefix>..."""
    tag = f"UGRO_JOB_ID={prefix}".encode()
    found = []
    for d in os.scandir("/proc"):
        if not d.name.isdigit():
            continue
        try:
            with open(f"/proc/{d.name}/environ", "rb") as f:
                env = f.read()
            if tag not in env:
                continue
            with open(f"/proc/{d.name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except (OSError, IndexError):
            continue
        values = dict(x.split(b"=", 1) for x in env.split(b"\0") if b"=" in x)
        rank = values.get(b"RANK") if b"LOCAL_RANK" in values else None
        found.append((int(d.name), values[b"UGRO_JOB_ID"].decode(),
                      rank.decode() if rank is not None else None))
    return found


# -- the lab ---------------------------------------------------------------------
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


# -- tables ------------------------------------------------------------------------
def secs(cell: Cell | None, repeat: int) -> str:
    if cell is None:
        return "–"
    if cell.error:
        return f"error: {cell.error}"
    notes = [f"n={len(cell.samples)}"] if len(cell.samples) < repeat else []
    notes += [f"{len(cell.errors)} failed"] if cell.errors else []
    return f"{cell.median:.2f} s" + (f" ({', '.join(notes)})" if notes else "")


def ratio(a: Cell | None, b: Cell | None) -> float | None:
    if a is None or b is None or a.median is None or not b.median:
        return None
    return a.median / b.median


def mark(ok: bool | None) -> str:
    return "–" if ok is None else ("✓" if ok else "✗")


def table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(out)


@dataclass
class Section:
    title: str
    body: str
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        notes = "".join(f"\n- {n}" for n in self.notes)
        return f"## {self.title}\n\n{self.body}\n{notes}\n"


# -- the benchmark ------------------------------------------------------------------------
class Bench:
    def __init__(self, nodes: list[int], only: list[str], repeat: int):
        self.node_counts, self.only, self.repeat = nodes, only, repeat
        self.tmp = Path(tempfile.mkdtemp(prefix="ugro-bench-"))
        self.data = self.tmp / "data"
        self.warm: set[str] = set()
        self.targets: list[tuple[str, str, bool | None]] = []
        self.popens: list[subprocess.Popen] = []
        self.machine = ""
        self.tags: set[str] = set()  # job tags of the by-hand (pdsh) launches
        self.failures: list[str] = []
        entry = Path(sys.executable).with_name("inv")
        self.inv = [str(entry)] if entry.is_file() else [sys.executable, "-m", "invoke"]
        size = max([*(nodes if "health" in only else [1]),
                    *([LAUNCH_NODES] if {"launch", "cancel", "logs"} & set(only) else []),
                    *([SYNC_NODES] if "sync" in only else [])])
        self.lab = BenchLab(self.tmp / "lab", size)

    # -- plumbing --------------------------------------------------------------------
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
        return ["pdsh", "-R", "ssh", "-w", ",".join(hosts), command], env

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
        """`compare()`, noting every failed run for the report's Failures section."""
        cells = compare(methods, repeat or self.repeat, self.warm if warm else None, budget)
        self.failures += [f"{label}, {name}: {e}" for name, c in cells.items() for e in c.errors]
        return cells

    def target(self, what: str, measured: str, ok: bool | None) -> str:
        self.targets.append((what, measured, ok))
        return mark(ok)

    # -- sections ----------------------------------------------------------------------
    def run_sections(self) -> list[Section]:
        sections = []
        for name in SECTIONS:
            if name in self.only and not (name == "cancel" and "launch" in self.only):
                say(f"== {name}")
                sections += getattr(self, f"bench_{name}")()
        return sections

    def bench_health(self) -> list[Section]:
        rows, cpu_rows = [], []
        for n in self.node_counts:
            nodes = self.lab.nodes[:n]
            hosts = [x.name for x in nodes]
            env = self.env(self.cluster(n))
            probe = shared_probe()
            argv, pdsh_env = self.pdsh(hosts, probe)

            def reports(p, n=n) -> None:
                got = p.stdout.count("UGRO_PROBE ")
                if got != n:
                    raise Failed(f"{got} probe reports for {n} nodes: {last_line(p.stderr)}")

            def inv(env=env) -> float:
                return run(self.inv + ["health"], env=env)[0]

            def pdsh(argv=argv, pdsh_env=pdsh_env, check=reports) -> float:
                t, p = run(argv, env=pdsh_env)
                check(p)
                return t

            loop = "for h in " + " ".join(hosts) + "; do "
            cfg = shlex.quote(str(self.ssh_cfg))
            sequential = ["sh", "-c", loop + f'ssh -F {cfg} "$h" "$1" || exit 1; done', "sh",
                          probe]
            naive = ["sh", "-c", loop + f'ssh -F {cfg} "$h" true && '
                     f'ssh -F {cfg} "$h" nvidia-smi {SMI_ARGS} && '
                     f'ssh -F {cfg} "$h" python --version && '
                     f"ssh -F {cfg} \"$h\" python -c \"'import torch'\" || exit 1; done"]

            def seq(argv=sequential, check=reports) -> float:
                t, p = run(argv)
                check(p)
                return t

            def naive_way(argv=naive) -> float:
                return run(argv)[0]

            say(f"health N={n}")
            methods = {"inv": inv, "pdsh": pdsh, "seq": seq, "naive": naive_way}
            used = {name: [] for name in methods}
            cells = self.compare(f"health N={n}", {name: with_cpu(fn, used[name])
                                                   for name, fn in methods.items()})
            cpu_rows.append([n, *(f"{statistics.median(v):.2f} s" if v else "–"
                                  for v in used.values())])
            r = ratio(cells["inv"], cells["pdsh"])
            limit = 0.8 if n == 32 else (1.0 if n >= 4 else None)
            ok = None if r is None or limit is None else r <= limit
            goal = f"≤ {limit:g}× pdsh" if limit else "–"
            measured = f"{r:.2f}× pdsh" if r is not None else "n/a"
            met = self.target(f"inv health, N={n}: {goal}", measured, ok) if limit else "–"
            rows.append([n, secs(cells["inv"], self.repeat), secs(cells["pdsh"], self.repeat),
                         secs(cells["seq"], self.repeat), secs(cells["naive"], self.repeat),
                         measured, goal, met])
        main = Section(
            "Health fan-out",
            table(["N", "inv health", "pdsh -R ssh (same probe)", "ssh, one node after another",
                   "naive: 4 ssh per node", "inv ÷ pdsh", "target", "met"], rows),
            [
                "Every method runs UGRO's probe (`ugro.commands.probe`), except the naive way: "
                "per node `ssh true`, `ssh nvidia-smi --query-gpu=...`, `ssh python --version`, "
                "`ssh python -c 'import torch'`.",
                "pdsh: `PDSH_SSH_ARGS_APPEND=\"-F ssh_config\"` with one Host alias per node "
                "(port, key, known_hosts), default fan-out (32).",
            ],
        )
        cpu = Section(
            "Health: control-node CPU per check",
            table(["N", "inv health", "pdsh -R ssh", "ssh, one node after another",
                   "naive: 4 ssh per node"], cpu_rows),
            ["User + system CPU of the command and the processes it waited for (pdsh's and "
             "the loops' ssh clients), not of the nodes' sshd: `inv health` is one Python "
             "process doing every handshake, pdsh one ssh process per node."])
        return [main, cpu, self.health_breakdown()]

    def health_breakdown(self) -> Section:
        """Where one node's health check spends its time, piece by piece."""
        node = self.lab.nodes[0]
        py = sys.executable
        probe_local = [py, "-c", commands.PROBE_SOURCE, str(node.project)]
        probe_remote = shared_probe()
        steps: dict[str, Callable[[], float]] = {}
        cpu: dict[str, list[float]] = {}

        def proc(label: str, argv: list[str], env: dict | None = None) -> None:
            steps[label] = with_cpu(lambda: run(argv, env=env)[0], cpu.setdefault(label, []))

        proc("`python -c pass` (here)", [py, "-c", "pass"])
        proc("the probe alone (here)", probe_local)
        proc("the probe --deep alone (here: imports torch)", probe_local + ["--deep"])
        proc("`python -c 'import fabric'` (here)", [py, "-c", "import fabric"])
        proc("`ssh lab0 true` (OpenSSH: connect, key exchange, auth, session)",
             self.ssh("lab0", "true"))
        proc("`ssh lab0 python -c pass`", self.ssh("lab0", f"{py} -c pass"))
        proc("`ssh lab0 <probe>`", self.ssh("lab0", probe_remote))
        env1 = self.env(self.cluster(1))
        proc("`inv health`, N=1", self.inv + ["health"], env1)
        deep_n = min(4, len(self.lab.nodes))
        env_deep = self.env(self.cluster(deep_n))
        proc(f"`inv health`, N={deep_n}", self.inv + ["health"], env_deep)
        proc(f"`inv health --deep`, N={deep_n}", self.inv + ["health", "--deep"], env_deep)
        say("health breakdown")
        with self.paramiko_steps(cpu) as in_process:
            cells = self.compare("health breakdown", {**steps, **in_process})
        rows = []
        for label, c in cells.items():
            spent = cpu.get(label)
            rows.append([label, secs(c, self.repeat),
                         f"{statistics.median(spent):.2f} s" if spent else "–"])
        imports = run([py, "-X", "importtime", "-c", commands.PROBE_SOURCE,
                       str(node.project)])[1].stderr
        pays = bool(re.search(r"\|\s+torch$", imports, re.M))
        plain, deep = cells[f"`inv health`, N={deep_n}"], cells[f"`inv health --deep`, N={deep_n}"]
        rows.append(["probe without --deep imports torch?", "yes" if pays else "no", "–"])
        self.target("health probe imports torch only with --deep",
                    f"plain probe imports torch: {'yes' if pays else 'no'}; "
                    f"N={deep_n}: {secs(plain, self.repeat)} plain, "
                    f"{secs(deep, self.repeat)} --deep", not pays)
        return Section(
            "Health: where the time goes (lab0 unless N is given)",
            table(["step", "wall", "CPU of the child processes"], rows),
            ["The paramiko rows run inside this process, with UGRO's own `Session` (the "
             "`connect()` every task uses): the CPU column there is this process's.",
             "`import torch` in the probe is checked with `python -X importtime`."],
        )

    @contextlib.contextmanager
    def paramiko_steps(self, cpu: dict[str, list[float]]):
        """UGRO's own SSH steps, timed in this process: connect, exec on a new and an open one."""
        from ugro.cluster import Session
        from ugro.config import load_cluster

        cluster = load_cluster(self.cluster(1, "paramiko"))
        node = cluster.nodes[0]

        def timed(label: str, fn: Callable[[], None]) -> float:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t = time.perf_counter() - t0
            cpu.setdefault(label, []).append(time.process_time() - c0)
            return t

        connect = "UGRO `connect()`: TCP, key exchange, auth (paramiko, in-process)"
        first = "UGRO `Session.run(true)` on a new connection (connect + exec)"
        again = "UGRO `Session.run(true)` on an open connection (exec only)"

        def new_connection() -> None:
            from ugro.cluster import connect as ugro_connect

            cx = ugro_connect(node, cluster)
            cx.open()
            cx.close()

        def run_new() -> None:
            with Session(cluster) as s:
                if not s.run(node, "true").ok:
                    raise Failed("true failed")

        with Session(cluster) as session:
            session.run(node, "true")

            def run_open() -> None:
                if not session.run(node, "true").ok:
                    raise Failed("true failed")

            yield {connect: lambda: timed(connect, new_connection),
                   first: lambda: timed(first, run_new),
                   again: lambda: timed(again, run_open)}

    def bench_cli(self) -> list[Section]:
        py = sys.executable
        steps = {"`inv --list`": self.inv + ["--list"],
                 "`inv health --help`": self.inv + ["health", "--help"],
                 "`python -c pass`": [py, "-c", "pass"]}
        on_path = shutil.which("inv")
        if on_path and Path(on_path).resolve() != Path(self.inv[0]).resolve():
            steps[f"`inv --list` via PATH ({on_path})"] = [on_path, "--list"]
        say("cli")
        cells = self.compare("cli", {k: (lambda a=a: run(a)[0]) for k, a in steps.items()})
        rows = []
        for label, c in cells.items():
            if "--list" in label:
                ok = None if c.median is None else c.median <= 0.4
                met = self.target(f"{label} ≤ 0.4 s", secs(c, self.repeat), ok)
                rows.append([label, secs(c, self.repeat), "≤ 0.4 s", met])
            else:
                rows.append([label, secs(c, self.repeat), "–", "–"])
        return [Section("CLI start-up", table(["command", "wall", "target", "met"], rows),
                        [f"`inv` is `{' '.join(self.inv)}`, run from the project root."])]

    # -- launch and cancel --------------------------------------------------------------
    def bench_launch(self) -> list[Section]:
        """Launch and cancel share their runs: each UGRO run launches a job, then cancels it."""
        env = self.env(self.cluster(LAUNCH_NODES))
        r = self.repeat
        runs = itertools.count()
        facts: dict[str, dict[str, Cell]] = {"ugro": {}, "pdsh": {}}

        def held(how: str) -> Callable[[], float]:
            def fn() -> float:
                tag = f"bench-{how}-{next(runs)}"
                try:
                    got = (self.ugro_hold(env, tag) if how == "ugro" else self.pdsh_hold(tag))
                except Failed:
                    self.stop_jobs(env, tag)  # the next run gets the nodes, and the machine
                    raise
                for k, v in got.items():
                    facts[how].setdefault(k, Cell()).samples.append(v)
                return got["ranks"]
            return fn

        def attached() -> float:
            t, p = run(self.inv + ["launch", "--name", f"bench-exit-{next(runs)}",
                                   "--nproc-per-node", "1", "--script", JOB,
                                   "--script-args", "--mode exit"], env=env)
            if "COMPLETED" not in p.stdout:
                raise Failed(f"not COMPLETED: {last_line(p.stdout)}")
            return t

        def pdsh_exit() -> float:
            argv, penv = self.pdsh_torchrun(f"bench-pexit-{next(runs)}", "exit")
            return run(argv, env=penv)[0]

        node = self.lab.nodes[0]
        standalone = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc-per-node", "1", JOB, "--mode", "exit"]
        node_env = {**os.environ, "HOME": str(node.dir), "OMP_NUM_THREADS": "1"}

        say(f"launch/cancel on {LAUNCH_NODES} nodes")
        cells = self.compare("launch", {
            "launch:ugro": held("ugro"), "launch:pdsh": held("pdsh"),
            "launch:attached": attached, "launch:pdsh-exit": pdsh_exit,
            "launch:standalone": lambda: run(standalone, env=node_env, cwd=node.project)[0],
        }, budget=LAUNCH_BUDGET_S)
        for how in ("ugro", "pdsh"):
            runs_of = cells[f"launch:{how}"]
            for c in facts[how].values():
                c.samples = c.samples[len(c.samples) - len(runs_of.samples):]  # not the warm-up's
                c.errors = runs_of.errors
        u, b = facts["ugro"], facts["pdsh"]
        none = Cell(errors=cells["launch:ugro"].errors) if cells["launch:ugro"].error else None
        b_none = Cell(errors=cells["launch:pdsh"].errors) if cells["launch:pdsh"].error else None
        sections = []
        if "launch" in self.only:
            ranks = u.get("ranks", none)
            ok = None if ranks is None or ranks.median is None else ranks.median <= 1.5
            rows = [
                ["`inv launch --detach` returns", secs(u.get("returns", none), r), "–", "–",
                 "–", "–"],
                ["first job process on a node", secs(u.get("first", none), r),
                 secs(b.get("first", b_none), r), _ratio_text(u.get("first"), b.get("first")), "–",
                 "–"],
                ["every rank running", secs(ranks, r), secs(b.get("ranks", b_none), r),
                 _ratio_text(ranks, b.get("ranks")), "≤ 1.5 s",
                 self.target(f"launch → all ranks running, {LAUNCH_NODES} nodes ≤ 1.5 s",
                             secs(ranks, r), ok)],
                ["every `rank N/W up` line in the control logs", secs(u.get("up_lines", none), r),
                 "–", "–", "–", "–"],
                ["whole launch (attached) of a script that exits at once",
                 secs(cells["launch:attached"], r), secs(cells["launch:pdsh-exit"], r),
                 _ratio_text(cells["launch:attached"], cells["launch:pdsh-exit"]), "–", "–"],
                ["… baseline: `torchrun --standalone` on one node, 1 rank", "–",
                 secs(cells["launch:standalone"], r), "–", "–", "–"],
            ]
            sections.append(Section(
                f"Launch ({LAUNCH_NODES} nodes, 1 rank each)",
                table(["from the start of the launch command to …", "inv launch",
                       "pdsh + torchrun", "UGRO ÷ pdsh", "target", "met"], rows),
                ["pdsh + torchrun: `pdsh -R ssh -w lab0,lab1,lab2` running on each node the "
                 "torchrun command UGRO would (c10d rendezvous on lab0, `is_host` and "
                 "`--local-addr` from `$SSH_CONNECTION`), i.e. a multi-node launch by hand.",
                 "Running: a process with the job's tag (`UGRO_JOB_ID`) and torchrun's "
                 "`LOCAL_RANK`/`RANK` in its environment exists for every rank (/proc, polled "
                 "every 20 ms; every lab node lives on this machine).",
                 f"The job is `{JOB}` (no torch import): the figures are UGRO and torchrun, "
                 "not a training script."]))
        if "cancel" in self.only:
            zero = u.get("cancel_zero", none)
            ok = None if zero is None or zero.median is None else zero.median <= 3.0
            sections.append(Section(
                f"Cancel ({LAUNCH_NODES} nodes)",
                table(["from the start of the stop to …", "inv cancel",
                       "SIGTERM to each torchrun agent, no SSH", "target", "met"], [
                    ["no job process left on any node", secs(zero, r),
                     secs(b.get("cancel_zero", b_none), r), "≤ 3 s",
                     self.target(f"cancel → zero processes, {LAUNCH_NODES} nodes ≤ 3 s",
                                 secs(zero, r), ok)],
                    ["`inv cancel` returns", secs(u.get("cancel_inv", none), r), "–", "–", "–"],
                ]),
                ["The baseline signals the torchrun agents of the pdsh-launched job straight "
                 "from this process: a floor for any tool, since it pays no SSH and no start-up."]))
        return sections

    def bench_cancel(self) -> list[Section]:
        return self.bench_launch()

    def stop_jobs(self, env: dict, tag: str) -> None:
        """End what a failed run left: its UGRO jobs (cancelled), then any tagged process."""
        for job_dir in (self.data / "experiments").glob(f"{tag}_*"):
            with contextlib.suppress(Failed):
                run(self.inv + ["cancel", job_dir.name], env=env)
        for pid, _, _ in job_processes(tag):
            kill(pid)
        with contextlib.suppress(Failed):
            wait_until(lambda: not supervisors(self.data), 30, "supervisors exit", 0.1)

    def ugro_hold(self, env: dict, name: str) -> dict[str, float]:
        """Launch a job that holds, time it coming up; cancel it, time it going away."""
        t0 = time.perf_counter()
        p = self.popen(self.inv + ["launch", "--name", name, "--detach", "--nproc-per-node", "1",
                                   "--script", JOB, "--script-args", "--mode hold"],
                       env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
        facts = self.watch_start(name + "_", t0, p)
        (job_dir,) = (self.data / "experiments").glob(f"{name}_*")
        job_id = job_dir.name

        def all_up() -> bool:
            text = "".join(f.read_text(errors="replace") for f in (job_dir / "logs").glob("*.log"))
            return len(set(re.findall(rf"rank (\d+)/{LAUNCH_NODES} up", text))) == LAUNCH_NODES

        facts["up_lines"] = wait_until(all_up, 60, "rank-up lines") - t0
        t1 = time.perf_counter()
        c = self.popen(self.inv + ["cancel", job_id], env=env, cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        facts["cancel_zero"] = wait_until(lambda: not job_processes(job_id), 60,
                                          "job processes gone") - t1
        c.wait(60)
        facts["cancel_inv"] = time.perf_counter() - t1
        if c.returncode != 0:
            raise Failed(f"inv cancel: exit {c.returncode}: {last_line(c.stderr.read())}")
        # The supervisor notices and ends; the next run should not share the machine with it.
        wait_until(lambda: not supervisors(self.data, job_id), 60, "supervisor exit", 0.05)
        return facts

    def pdsh_hold(self, tag: str) -> dict[str, float]:
        """The same by hand: pdsh starts torchrun on every node; SIGTERM to the agents stops it."""
        argv, env = self.pdsh_torchrun(tag, "hold")
        t0 = time.perf_counter()
        log = self.tmp / f"{tag}.log"
        with log.open("w") as out:
            p = self.popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        facts = self.watch_start(tag, t0, p, log=log)
        t1 = time.perf_counter()
        for pid, _, rank in job_processes(tag):
            if rank is None and b"torch.distributed.run" in cmdline(pid):
                kill(pid, signal.SIGTERM)
        facts["cancel_zero"] = wait_until(lambda: not job_processes(tag), 60,
                                          "job processes gone") - t1
        p.wait(60)
        return facts

    def watch_start(self, tag: str, t0: float, p: subprocess.Popen,
                    log: Path | None = None) -> dict[str, float]:
        """Poll /proc until every rank of the job tagged `tag...` runs.

        `p` is `inv launch --detach`, which should also have returned by then; or, with `log`
        (its output), a pdsh that must keep running.
        """
        facts: dict[str, float] = {}
        want = {str(i) for i in range(LAUNCH_NODES)}
        while "ranks" not in facts or (log is None and "returns" not in facts):
            now = time.perf_counter()
            if p.poll() is not None and "returns" not in facts:
                facts["returns"] = now - t0
                if log is not None:
                    raise Failed(f"exit {p.returncode} before every rank ran: "
                                 f"{why(log.read_text(errors='replace'))}")
                if p.returncode != 0:
                    raise Failed(f"exit {p.returncode}: {last_line(p.stderr.read())}")
            procs = job_processes(tag)
            if procs and "first" not in facts:
                facts["first"] = now - t0
            if "ranks" not in facts and {r for _, _, r in procs if r is not None} >= want:
                facts["ranks"] = now - t0
            if now - t0 > 120:
                raise Failed("the ranks did not all run within 120 s")
            time.sleep(0.02)
        return facts

    def pdsh_torchrun(self, tag: str, mode: str) -> tuple[list[str], dict]:
        """pdsh running, on every launch node, the torchrun command UGRO would build."""
        self.tags.add(tag)
        master = self.lab.nodes[0].host
        port = free_port(master)
        torchrun = commands.join([
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(LAUNCH_NODES),
            "--nproc-per-node", "1", "--max-restarts", "0", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{master}:{port}", "--rdzv-id", tag])
        command = (
            'set -- $SSH_CONNECTION; L=$3; H=0; [ "$L" = ' + master + " ] && H=1; "
            f"cd ~/project && UGRO_JOB_ID={tag} OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo "
            f"PYTHONUNBUFFERED=1 exec {torchrun} --rdzv-conf is_host=$H --local-addr $L "
            f"{JOB} --mode {mode}")
        return self.pdsh([n.name for n in self.lab.nodes[:LAUNCH_NODES]], command)

    # -- sync -------------------------------------------------------------------------------
    def bench_sync(self) -> list[Section]:
        goal = f"no-op sync, {SYNC_NODES} nodes ≤ 1.5 s"
        listing = run(self.inv + ["--list"])[1].stdout
        if not re.search(r"^\s+sync\s", listing, re.M):
            self.target(goal, "n/a: inv sync missing", None)
            return [Section("Sync", "n/a: inv sync missing")]
        from ugro import sync as sync_mod
        from ugro.config import load_cluster

        r = self.repeat
        project = self.project_copy(self.tmp / "project")
        make_tree(project / "payload", SYNC_TREE_MB)
        runs = itertools.count()
        env16 = self.env(self.cluster(SYNC_NODES, "sync16", project_path=lambda n: n.dir / "sync"))
        say(f"sync: first fill of {SYNC_NODES} nodes")
        try:
            run(self.inv + ["sync"], env=env16, cwd=project)
        except Failed as exc:
            self.target(goal, f"error: {exc}", None)
            return [Section("Sync", f"error: `inv sync` failed: {exc}")]

        def rsync(paths: list[str], count: int, fresh: bool) -> float:
            """rsync -a of the same selection, with UGRO's own filter rules, to `count` nodes."""
            sub = f"rsync{next(runs)}" if fresh else "rsync"
            rules = sync_mod.filters(project, paths)
            nodes = self.lab.nodes[:count]
            t0 = time.perf_counter()
            procs = [subprocess.Popen(["rsync", "-a", *rules, "-e", f"ssh -F {self.ssh_cfg}",
                                       f"{project}/", f"{n.name}:{n.dir / sub}/"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True) for n in nodes]
            codes = [p.wait(TIMEOUT_S) for p in procs]
            t = time.perf_counter() - t0
            if fresh:
                for n in nodes:
                    shutil.rmtree(n.dir / sub, ignore_errors=True)
            if any(codes):
                raise Failed(f"rsync exit codes {codes}: {last_line(procs[0].stderr.read())}")
            return t

        code = sync_mod.sync_set(load_cluster(env16["INVOKE_UGRO_CLUSTER"]), project)
        say(f"sync: no-op on {SYNC_NODES} nodes")
        rsync(code, SYNC_NODES, fresh=False)
        noop = self.compare("sync no-op", {
            "sync:inv": lambda: run(self.inv + ["sync"], env=env16, cwd=project)[0],
            "sync:rsync": lambda: rsync(code, 1, fresh=False),
            "sync:rsync16": lambda: rsync(code, SYNC_NODES, fresh=False),
        })

        def first_inv() -> float:
            sub = f"first{next(runs)}"
            cluster = self.cluster(SYNC_FIRST_NODES, "sync4", project_path=lambda n: n.dir / sub,
                                   sync_paths=["payload"])
            try:
                return run(self.inv + ["sync"], env=self.env(cluster), cwd=project)[0]
            finally:
                for n in self.lab.nodes[:SYNC_FIRST_NODES]:
                    shutil.rmtree(n.dir / sub, ignore_errors=True)

        tree = [*code, "payload"]
        say(f"sync: first sync of {SYNC_TREE_MB} MB to {SYNC_FIRST_NODES} nodes")
        first = self.compare("sync first", {
            "sync:first-inv": first_inv,
            "sync:first-rsync1": lambda: rsync(tree, 1, fresh=True),
            "sync:first-rsync4": lambda: rsync(tree, SYNC_FIRST_NODES, fresh=True),
        })
        inv_noop, inv_first = noop["sync:inv"], first["sync:first-inv"]
        one, four = first["sync:first-rsync1"], first["sync:first-rsync4"]
        ok = None if inv_noop.median is None else inv_noop.median <= 1.5
        rows = [
            [f"no-op `inv sync`, {SYNC_NODES} nodes", secs(inv_noop, r),
             "one no-op `rsync -a` to one node", secs(noop["sync:rsync"], r),
             _ratio_text(inv_noop, noop["sync:rsync"]), "≤ 1.5 s",
             self.target(goal, secs(inv_noop, r), ok)],
            ["", "", f"{SYNC_NODES} × no-op `rsync -a` at once", secs(noop["sync:rsync16"], r),
             _ratio_text(inv_noop, noop["sync:rsync16"]), "–", "–"],
            [f"first `inv sync` of a {SYNC_TREE_MB} MB tree, {SYNC_FIRST_NODES} nodes",
             secs(inv_first, r), "one `rsync -a` to one node", secs(one, r),
             _ratio_text(inv_first, one), "–", "–"],
            ["", "", f"{SYNC_FIRST_NODES} × `rsync -a` at once", secs(four, r),
             _ratio_text(inv_first, four), "–", "–"],
        ]
        return [Section("Sync", table(["measure", "UGRO", "baseline", "baseline time",
                                       "UGRO ÷ baseline", "target", "met"], rows),
                        [f"`inv sync` runs from a copy of the project, so the repository stays "
                         f"as it is; the code it sends is {', '.join(code)}. The first-sync row "
                         f"adds `sync.paths: [payload]`, {SYNC_TREE_MB} MB of random files in "
                         "200 files, and goes to new, empty project directories each time.",
                         "The rsync baselines send the same selection with UGRO's own filter "
                         "rules (`ugro.sync.filters`), over `ssh -F ssh_config`."])]

    def project_copy(self, dest: Path) -> Path:
        """The project's files as a user would have them: no VCS, run state or caches."""
        top = {".git", "data", "logs", ".pytest_cache", ".ruff_cache", ".venv", ".pixi"}

        def skip(folder: str, names: list[str]) -> set[str]:
            at_top = Path(folder) == ROOT
            return {n for n in names if n == "__pycache__" or n.endswith(".egg-info")
                    or (at_top and n in top)}

        shutil.copytree(ROOT, dest, ignore=skip)
        return dest

    # -- logs ------------------------------------------------------------------------------
    def bench_logs(self) -> list[Section]:
        env = self.env(self.cluster(LAUNCH_NODES))
        hosts = [n.name for n in self.lab.nodes[:LAUNCH_NODES]]
        runs = itertools.count()
        ugro_runs: list[dict] = []
        pdsh_runs: list[dict] = []

        def ugro() -> float:
            ugro_runs.append(self.stream_launch(env, f"bench-logs-{next(runs)}"))
            return ugro_runs[-1]["wall"]

        command = ("cd ~/project && PYTHONUNBUFFERED=1 exec "
                   f"{shlex.quote(sys.executable)} {JOB} --mode spew --lines {LOG_LINES}")
        argv, pdsh_env = self.pdsh(hosts, command)

        def pdsh() -> float:
            pdsh_runs.append(self.stream_pdsh(argv, pdsh_env))
            return pdsh_runs[-1]["wall"]

        say(f"logs: {LAUNCH_NODES} nodes × {LOG_LINES} lines")
        # No warm-up: each run moves 300,000 lines, which start-up caching cannot hide.
        cells = self.compare("logs", {"logs:ugro": ugro, "logs:pdsh": pdsh}, warm=False,
                             budget=LOGS_BUDGET_S)
        r = self.repeat

        def worst(facts: list[dict], key: str):
            return max((f[key] for f in facts), default="–")

        def rate(facts: list[dict], key: str) -> str:
            values = [f[key] for f in facts if f.get(key)]
            return f"{statistics.median(values):,.0f} lines/s" if values else "–"

        err = cells["logs:ugro"].error
        lost_files, lost_term = worst(ugro_runs, "lost_files"), worst(ugro_runs, "lost_term")
        ok = None if err or not ugro_runs else lost_files == 0 and lost_term == 0
        measured = f"error: {err}" if err else f"{lost_files} in the log files, " \
                                                f"{lost_term} on the terminal (worst run)"
        rows = [
            ["lines lost in the control node's logs/<node>.log", f"error: {err}" if err else
             lost_files, "–", "0", self.target("zero lost log lines", measured, ok)],
            ["lines lost on the terminal", f"error: {err}" if err else lost_term,
             worst(pdsh_runs, "lost"), "0", "–"],
            ["lines/s the script printed, per node", rate(ugro_runs, "rate_node"),
             rate(pdsh_runs, "rate_node"), "–", "–"],
            ["lines/s reaching the nodes' output.log (torchrun's tee)",
             rate(ugro_runs, "rate_output"), "–", "–", "–"],
            ["lines/s reaching the control node's log files", rate(ugro_runs, "rate_files"),
             "–", "–", "–"],
            ["lines/s reaching the terminal", rate(ugro_runs, "rate_term"),
             rate(pdsh_runs, "rate_term"), "–", "–"],
            ["whole run, start to exit", secs(cells["logs:ugro"], r),
             secs(cells["logs:pdsh"], r), "–", "–"],
        ]
        notes = [f"{LAUNCH_NODES} nodes × 1 rank, each printing {LOG_LINES:,} numbered lines "
                 f"({LOG_LINES * LAUNCH_NODES:,} in all) with PYTHONUNBUFFERED=1, as UGRO sets "
                 "it; attached `inv launch`, its stdout read from a pipe. A line is lost when "
                 "its (rank, number) never arrives. Rates other than the script's are for all "
                 "nodes together, first line to last; losses are the worst run's.",
                 "Baseline: `pdsh -R ssh` running the same script on the same nodes, without "
                 "torchrun, its output counted from the pipe the same way.",
                 "No warm-up run here: each run moves 300,000 lines."]
        notes += [f"run {i + 1}, lines at each hop: {f['stages']}"
                  for i, f in enumerate(ugro_runs) if f["lost_files"] or f["lost_term"]]
        return [Section(f"Log streaming ({LAUNCH_NODES} nodes × {LOG_LINES:,} lines)",
                        table(["measure", "inv launch", "pdsh -R ssh", "target", "met"], rows),
                        notes)]

    def stream_launch(self, env: dict, name: str) -> dict:
        argv = self.inv + ["launch", "--name", name, "--nproc-per-node", "1", "--script", JOB,
                           "--script-args", f"--mode spew --lines {LOG_LINES}"]
        nodes = self.lab.nodes[:LAUNCH_NODES]
        t0 = time.perf_counter()
        p = self.popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        term = PipeCounter(p.stdout, rb"^\S+ r(\d+) +\| spew (\d+) (\d+) ")
        err: list[bytes] = []
        reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
        reader.start()
        files, outputs = FileCounter(b"| spew "), FileCounter(b"]:spew ")

        def poll() -> None:
            files.poll((self.data / "experiments").glob(f"{name}_*/logs/*.log"))
            outputs.poll(f for n in nodes for f in (n.project / "data" / "experiments").glob(
                f"{name}_*/nodes/{n.name}/output.log"))

        while p.poll() is None:
            poll()
            if time.perf_counter() - t0 > TIMEOUT_S:
                p.kill()
                raise Failed(f"inv launch did not end within {TIMEOUT_S} s")
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        poll()
        term.join()
        reader.join(10)
        if p.returncode != 0:
            raise Failed(f"inv launch: exit {p.returncode}: "
                         f"{last_line((err or [b''])[0].decode(errors='replace'))}")
        (job_dir,) = (self.data / "experiments").glob(f"{name}_*")
        seen = set()
        for f in (job_dir / "logs").glob("*.log"):
            seen |= {(r, i) for r, _, i in re.findall(rb"^\S+ r(\d+) +\| spew (\d+) (\d+) ",
                                                      f.read_bytes(), re.M)}
        raw = b"".join(f.read_bytes() for f in outputs.offsets)
        done = re.findall(rb"spew-done \d+ (\d+) lines in ([\d.]+) s", raw)
        total = LOG_LINES * LAUNCH_NODES
        facts = {
            "wall": wall,
            "lost_files": total - len(seen),
            "lost_term": total - len({(r, i) for r, _, i in term.keys}),
            "rate_node": statistics.median(int(n) / float(s) for n, s in done if float(s) > 0)
            if done else None,
            "rate_output": outputs.rate(),
            "rate_files": files.rate(),
            "rate_term": term.rate(),
        }
        if facts["lost_files"] or facts["lost_term"]:
            facts["stages"] = self.stages(job_dir.name, len(seen), len(term.keys))
        return facts

    def stages(self, job_id: str, files: int, term: int) -> str:
        """Count the job's lines at each hop, to say where the lost ones went missing."""
        worker = output = 0
        for node in self.lab.nodes[:LAUNCH_NODES]:
            d = node.project / commands.node_job_dir(node, job_id)
            worker += sum(len(re.findall(rb"^spew \d+ \d+ ", f.read_bytes(), re.M))
                          for f in (d / "torchrun").rglob("stdout.log"))
            if (d / "output.log").exists():
                output += len(re.findall(rb"^\[rank\d+\]:spew \d+ \d+ ",
                                         (d / "output.log").read_bytes(), re.M))
        return (f"workers' stdout files {worker:,}, nodes' output.log {output:,}, "
                f"control logs {files:,}, terminal {term:,}")

    def stream_pdsh(self, argv: list[str], env: dict) -> dict:
        t0 = time.perf_counter()
        p = self.popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL)
        term = PipeCounter(p.stdout, rb"^(\S+): spew (\d+) (\d+) ")
        p.wait(TIMEOUT_S)
        term.join()
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise Failed(f"pdsh: exit {p.returncode}")
        node_rates = [int(n) / float(s) for n, s in term.done if float(s) > 0]
        return {"wall": wall, "rate_term": term.rate(),
                "lost": LOG_LINES * LAUNCH_NODES - len({(h, i) for h, _, i in term.keys}),
                "rate_node": statistics.median(node_rates) if node_rates else None}


class PipeCounter:
    """Reads a pipe to its end in a thread: the distinct keys of matching lines, and when."""

    def __init__(self, pipe, pattern: bytes):
        self.pipe, self.re = pipe, re.compile(pattern)
        self.keys: set[tuple] = set()
        self.done: list[tuple[bytes, bytes]] = []
        self.first = self.last = None
        self.count = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        done = re.compile(rb"spew-done \d+ (\d+) lines in ([\d.]+) s")
        for line in self.pipe:
            m = self.re.match(line)
            if m:
                now = time.perf_counter()
                self.first = self.first or now
                self.last = now
                self.count += 1
                self.keys.add(m.groups())
            elif d := done.search(line):
                self.done.append(d.groups())

    def join(self) -> None:
        self.thread.join(60)

    def rate(self) -> float | None:
        return _rate(self.count, self.first, self.last)


class FileCounter:
    """Counts the lines holding `needle` as they land in growing files, and when they did."""

    def __init__(self, needle: bytes):
        self.needle = needle
        self.offsets: dict[Path, int] = {}
        self.count = 0
        self.first = self.last = None

    def poll(self, paths) -> None:
        grew = 0
        for path in paths:
            with path.open("rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            cut = data.rfind(b"\n") + 1  # whole lines only; the rest is read next time
            self.offsets[path] = self.offsets.get(path, 0) + cut
            grew += data[:cut].count(self.needle)
        if grew:
            now = time.perf_counter()
            self.first = self.first or now
            self.last = now
            self.count += grew

    def rate(self) -> float | None:
        return _rate(self.count, self.first, self.last)


def _rate(count: int, first: float | None, last: float | None) -> float | None:
    return count / (last - first) if count and first and last and last > first else None


def make_tree(root: Path, megabytes: int) -> None:
    """`megabytes` MB of random (incompressible) files: 10 folders of 20 files each."""
    size = megabytes * 1024 * 1024 // 200
    for d in range(10):
        (root / f"part{d}").mkdir(parents=True, exist_ok=True)
        for i in range(20):
            (root / f"part{d}" / f"shard{i:02d}.bin").write_bytes(os.urandom(size))


def shared_probe() -> str:
    """UGRO's probe command, the same for every lab node (each has its project at ~/project)."""
    node = Node("any", "-", "-", project_path="~/project",
                python=PythonEnv(command=sys.executable))
    return commands.probe(node)


def processes_mentioning(*words: bytes) -> list[int]:
    """Pids of live processes, other than this one, whose command line holds every word."""
    pids = []
    for d in os.scandir("/proc"):
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{d.name}/cmdline", "rb") as f:
                argv = f.read()
            with open(f"/proc/{d.name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except (OSError, IndexError):
            continue
        if all(w in argv for w in words):
            pids.append(int(d.name))
    return pids


def supervisors(data_dir: Path, job_id: str = "") -> list[int]:
    """Pids of UGRO supervisors of this run's jobs (found by the data dir on their command line)."""
    return processes_mentioning(b"ugro.supervise", str(data_dir).encode(), job_id.encode())


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _ratio_text(a: Cell, b: Cell) -> str:
    r = ratio(a, b)
    return f"{r:.2f}×" if r is not None else "–"


def machine() -> str:
    def version(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "missing"
        return ((p.stdout or p.stderr).strip().splitlines() or ["?"])[0]

    import fabric
    import invoke
    import paramiko

    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = "missing"
    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = version(["git", "-C", str(ROOT), "status", "--porcelain",
                     "--untracked-files=no"]) not in ("", "?")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.node()}: {os.cpu_count()} CPUs, load {load} at the start; "
            f"Python {platform.python_version()}, torch {torch_version}, invoke "
            f"{invoke.__version__}, fabric {fabric.__version__}, paramiko {paramiko.__version__}"
            f"; {version(['ssh', '-V'])}; {version(['pdsh', '-V'])}; "
            f"{version(['rsync', '--version'])}; UGRO {commit}{' (uncommitted changes)' * dirty}")


def report(bench: Bench, sections: list[Section], started: str, took: float) -> str:
    targets = table(["target", "measured", "met"],
                    [[what, measured, mark(ok)] for what, measured, ok in bench.targets])
    head = (f"# UGRO control-plane benchmarks, {started}\n\n"
            f"{bench.machine}\n\n"
            f"`python benchmarks/run.py --nodes {','.join(map(str, bench.node_counts))} "
            f"--only {','.join(bench.only)} --repeat {bench.repeat}` took {took:.0f} s. "
            f"Whole-process wall times, median of {bench.repeat} run{'s' * (bench.repeat > 1)} "
            f"after a warm-up run; n=… where a method stopped repeating after {CELL_BUDGET_S:g} s "
            f"in one row ({LAUNCH_BUDGET_S:g} s for launch, {LOGS_BUDGET_S:g} s and no warm-up "
            "for logs). Lab: "
            f"{len(bench.lab.nodes)} OpenSSH daemons on 127.0.0.2…, each with a stand-in "
            "`nvidia-smi` (RTX 4070) and this machine's Python and torch; each node's HOME is "
            "its own directory (no shell rc files).\n")
    failures = [Section("Failed runs", "Runs that failed (the figures above leave them out):",
                        bench.failures)] if bench.failures else []
    return "\n".join([head, "## Targets\n\n" + targets + "\n",
                      *(s.markdown() for s in [*sections, *failures])])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,4,16,32",
                        help="lab node counts for the health fan-out (default 1,4,16,32)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"sections to run, comma-separated (default {','.join(SECTIONS)})")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed runs per figure, after one warm-up (default 5)")
    parser.add_argument("--output", type=Path,
                        help="where to write the tables (default benchmarks/results/<date>.md)")
    args = parser.parse_args(argv)
    try:
        args.nodes = sorted({int(x) for x in args.nodes.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--nodes: expected numbers like 1,4,16,32, got {args.nodes!r}")
    if not args.nodes or min(args.nodes) < 1 or max(args.nodes) > 200:
        parser.error("--nodes: each count must be between 1 and 200")
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown or not args.only:
        parser.error(f"--only: unknown section(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(SECTIONS)}")
    args.only = [s for s in SECTIONS if s in args.only]
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    for tool in ("sshd", "ssh", "pdsh", "rsync"):
        if not shutil.which(tool) and not (tool == "sshd" and Path("/usr/sbin/sshd").exists()):
            parser.error(f"{tool} is not installed")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = date.today().isoformat()
    output = args.output or ROOT / "benchmarks" / "results" / f"{started}.md"
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    t0 = time.perf_counter()
    bench = Bench(args.nodes, args.only, args.repeat)
    try:
        bench.machine = machine()
        bench.start()
        sections = bench.run_sections()
        text = report(bench, sections, started, time.perf_counter() - t0)
    except KeyboardInterrupt:
        say("interrupted: stopping everything this run started")
        return 130
    finally:
        bench.close()
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    say(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
