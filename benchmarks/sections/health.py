"""`inv health` against pdsh, ssh in turn and the naive way; then where one check's time goes."""

from __future__ import annotations

import contextlib
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable

from benchmarks.bench import Bench, say
from benchmarks.measure import Failed, last_line, run, with_cpu
from benchmarks.tables import Section, ratio, secs, table
from ugro import commands
from ugro.config import Node, PythonEnv
from ugro.node_probe import GPU_QUERY


def run_section(bench: Bench) -> list[Section]:
    rows, cpu_rows = [], []
    probe = shared_probe()
    for n in bench.node_counts:
        hosts = [x.name for x in bench.lab.nodes[:n]]
        env = bench.env(bench.cluster(n))
        argv, pdsh_env = bench.pdsh(hosts, probe)

        def reports(p, n=n) -> None:
            got = p.stdout.count("UGRO_PROBE_SH host ")
            if got != n:
                raise Failed(f"{got} probe reports for {n} nodes: {last_line(p.stderr)}")

        def inv(env=env) -> float:
            return run(bench.inv + ["health"], env=env)[0]

        def pdsh(argv=argv, pdsh_env=pdsh_env, check=reports) -> float:
            t, p = run(argv, env=pdsh_env)
            check(p)
            return t

        light_argv, _ = bench.pdsh(hosts, light_probe())

        def pdsh_light(argv=light_argv, pdsh_env=pdsh_env, n=n) -> float:
            t, p = run(argv, env=pdsh_env)
            if p.stdout.count("Filesystem") != n:
                raise Failed(f"{p.stdout.count('Filesystem')} df reports for {n} nodes")
            return t

        loop = "for h in " + " ".join(hosts) + "; do "
        cfg = shlex.quote(str(bench.ssh_cfg))
        sequential = ["sh", "-c", loop + f'ssh -F {cfg} "$h" "$1" || exit 1; done', "sh", probe]
        smi_args = f"--query-gpu={GPU_QUERY} --format=csv,noheader,nounits"
        naive = ["sh", "-c", loop + f'ssh -F {cfg} "$h" true && '
                 f'ssh -F {cfg} "$h" nvidia-smi {smi_args} && '
                 f'ssh -F {cfg} "$h" python --version && '
                 f"ssh -F {cfg} \"$h\" python -c \"'import torch'\" || exit 1; done"]

        def seq(argv=sequential, check=reports) -> float:
            t, p = run(argv)
            check(p)
            return t

        def naive_way(argv=naive) -> float:
            return run(argv)[0]

        say(f"health N={n}")
        methods = {"inv": inv, "pdsh-light": pdsh_light, "pdsh": pdsh, "seq": seq,
                   "naive": naive_way}
        used = {name: [] for name in methods}
        cells = bench.compare(f"health N={n}", {name: with_cpu(fn, used[name])
                                                for name, fn in methods.items()})
        cpu_rows.append([n, *(f"{statistics.median(v):.2f} s" if v else "–"
                              for v in used.values())])
        r = ratio(cells["inv"], cells["pdsh-light"])
        limit = 0.8 if n == 32 else (1.0 if n >= 4 else None)
        ok = None if r is None or limit is None else r <= limit
        goal = f"≤ {limit:g}× pdsh (light probe)" if limit else "–"
        measured = f"{r:.2f}× pdsh" if r is not None else "n/a"
        met = bench.target(f"inv health, N={n}: {goal}", measured, ok) if limit else "–"
        rows.append([n, *(secs(cells[m], bench.repeat) for m in methods), measured, goal, met])
    main = Section(
        "Health fan-out",
        table(["N", "inv health", "pdsh -R ssh (light probe)", "pdsh -R ssh (same probe)",
               "ssh, one node after another", "naive: 4 ssh per node",
               "inv ÷ pdsh (light)", "target", "met"], rows),
        [
            "The light probe: pdsh running `hostname; python --version; df -Pk ~; "
            "cat /proc/loadavg; nvidia-smi --query-gpu=...` on each node, what a user checks "
            "by hand; the targets are against it.",
            "The other methods run UGRO's probe (`ugro.commands.probe`), except the naive way: "
            "per node `ssh true`, `ssh nvidia-smi --query-gpu=...`, `ssh python --version`, "
            "`ssh python -c 'import torch'`.",
            "pdsh: `PDSH_SSH_ARGS_APPEND=\"-F ssh_config\"` with one Host alias per node "
            "(port, key, known_hosts), default fan-out (32).",
        ],
    )
    cpu = Section(
        "Health: control-node CPU per check",
        table(["N", "inv health", "pdsh -R ssh (light probe)", "pdsh -R ssh (same probe)",
               "ssh, one node after another", "naive: 4 ssh per node"], cpu_rows),
        ["User + system CPU of the command and the processes it waited for (pdsh's and "
         "the loops' ssh clients), not of the nodes' sshd: `inv health` is one Python "
         "process doing every handshake, pdsh one ssh process per node."])
    return [main, cpu, breakdown(bench)]


def breakdown(bench: Bench) -> Section:
    """Where one node's health check spends its time, piece by piece."""
    node = bench.lab.nodes[0]
    py = sys.executable
    probe_local = [py, "-c", commands.PROBE_SOURCE, str(node.project)]
    steps: dict[str, Callable[[], float]] = {}
    cpu: dict[str, list[float]] = {}

    def proc(label: str, argv: list[str], env: dict | None = None) -> None:
        steps[label] = with_cpu(lambda: run(argv, env=env)[0], cpu.setdefault(label, []))

    proc("`python -c pass` (here)", [py, "-c", "pass"])
    proc("the probe alone (here)", probe_local)
    proc("the probe --deep alone (here: imports torch)", probe_local + ["--deep"])
    proc("`python -c 'import fabric'` (here)", [py, "-c", "import fabric"])
    proc("`ssh lab0 true` (OpenSSH: connect, key exchange, auth, session)",
         bench.ssh("lab0", "true"))
    proc("`ssh lab0 python -c pass`", bench.ssh("lab0", f"{py} -c pass"))
    proc("`ssh lab0 <probe>`", bench.ssh("lab0", shared_probe()))
    proc("`inv health`, N=1", bench.inv + ["health"], bench.env(bench.cluster(1)))
    deep_n = min(4, len(bench.lab.nodes))
    env_deep = bench.env(bench.cluster(deep_n))
    proc(f"`inv health`, N={deep_n}", bench.inv + ["health"], env_deep)
    proc(f"`inv health --deep`, N={deep_n}", bench.inv + ["health", "--deep"], env_deep)
    say("health breakdown")
    with paramiko_steps(bench, cpu) as in_process:
        cells = bench.compare("health breakdown", {**steps, **in_process})
    rows = []
    for label, c in cells.items():
        spent = cpu.get(label)
        rows.append([label, secs(c, bench.repeat),
                     f"{statistics.median(spent):.2f} s" if spent else "–"])
    imports = run([py, "-X", "importtime", "-c", commands.PROBE_SOURCE,
                   str(node.project)])[1].stderr
    pays = bool(re.search(r"\|\s+torch$", imports, re.M))
    plain, deep = cells[f"`inv health`, N={deep_n}"], cells[f"`inv health --deep`, N={deep_n}"]
    rows.append(["probe without --deep imports torch?", "yes" if pays else "no", "–"])
    bench.target("health probe imports torch only with --deep",
                 f"plain probe imports torch: {'yes' if pays else 'no'}; "
                 f"N={deep_n}: {secs(plain, bench.repeat)} plain, "
                 f"{secs(deep, bench.repeat)} --deep", not pays)
    return Section(
        "Health: where the time goes (lab0 unless N is given)",
        table(["step", "wall", "CPU of the child processes"], rows),
        ["The paramiko rows run inside this process, with UGRO's own `Session` (the "
         "`connect()` every task uses): the CPU column there is this process's.",
         "`import torch` in the probe is checked with `python -X importtime`."],
    )


@contextlib.contextmanager
def paramiko_steps(bench: Bench, cpu: dict[str, list[float]]):
    """UGRO's own SSH steps, timed in this process: connect, exec on a new and an open one."""
    from ugro.cluster import Session
    from ugro.config import load_cluster
    from ugro.transport import connect

    cluster = load_cluster(bench.cluster(1, "paramiko"))
    node = cluster.nodes[0]

    def timed(label: str, fn: Callable[[], None]) -> float:
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        cpu.setdefault(label, []).append(time.process_time() - c0)
        return t

    connecting = "UGRO `connect()`: TCP, key exchange, auth (paramiko, in-process)"
    first = "UGRO `Session.run(true)` on a new connection (connect + exec)"
    again = "UGRO `Session.run(true)` on an open connection (exec only)"

    def new_connection() -> None:
        cx = connect(node, cluster)
        cx.open()
        cx.close()

    def true_on(session: Session) -> None:
        if not session.run(node, "true").ok:
            raise Failed("true failed")

    def run_new() -> None:
        with Session(cluster) as s:
            true_on(s)

    with Session(cluster) as session:
        session.run(node, "true")
        yield {connecting: lambda: timed(connecting, new_connection),
               first: lambda: timed(first, run_new),
               again: lambda: timed(again, lambda: true_on(session))}


def light_probe() -> str:
    """What a user would check by hand on each node, with nothing of UGRO's."""
    smi = shlex.quote(f"--query-gpu={GPU_QUERY}")
    return (f"hostname; {shlex.quote(sys.executable)} --version; df -Pk ~; cat /proc/loadavg; "
            f"nvidia-smi {smi} --format=csv,noheader,nounits")


def shared_probe() -> str:
    """UGRO's probe command, the same for every lab node (each has its project at ~/project)."""
    node = Node("any", "-", "-", project_path="~/project",
                python=PythonEnv(command=sys.executable))
    return commands.probe(node)
