"""The runs the launch and cancel tables share: each UGRO run launches a job that holds, times
it coming up, cancels it and times it going away; the by-hand runs do the same with pdsh, and
with Fabric from Python (the floor for a launcher written in Python).

A rank runs when /proc shows a process carrying the job's `UGRO_JOB_ID` and torchrun's
`RANK`/`LOCAL_RANK` (every lab node lives on this machine).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sshlab import rendezvous_port

from benchmarks.bench import JOB, Bench, job_processes, kill, say, supervisors
from benchmarks.measure import ROOT, Cell, Failed, last_line, run, wait_until, why
from ugro import commands, procs
from ugro.config import Cluster, load_cluster
from ugro.plan import LaunchConfig, plan

LAUNCH_BUDGET_S = 75.0  # a held launch and its cancel take 6-10 s: five runs and a warm-up
RUN_S = 7.0  # ... and more for a longer --repeat: its runs, at about this much each


def launch_budget(repeat: int) -> float:
    """Seconds each launch method may take in all (`measure.compare`)."""
    return max(LAUNCH_BUDGET_S, RUN_S * (repeat + 1))


@dataclass
class Runs:
    """The launch section's cells, and the facts of each held run (`ugro`, `pdsh`) by name."""

    cells: dict[str, Cell]
    ugro: dict[str, Cell]
    pdsh: dict[str, Cell]
    fabric: dict[str, Cell]
    ugro_none: Cell | None  # stands in for every UGRO fact when no UGRO run worked
    pdsh_none: Cell | None
    fabric_none: Cell | None


@functools.cache
def measure(bench: Bench) -> Runs:
    """Launch and cancel share their runs, so a run with both sections takes them once."""
    n = bench.sizes.launch_nodes
    cluster_file = bench.cluster(n)
    env = bench.env(cluster_file)
    cluster = load_cluster(cluster_file)
    runs = itertools.count()
    facts: dict[str, dict[str, Cell]] = {"ugro": {}, "pdsh": {}, "fabric": {}}

    def held(how: str) -> Callable[[], float]:
        def fn() -> float:
            tag = f"bench-{how}-{next(runs)}"
            try:
                got = ugro_hold(bench, env, tag) if how == "ugro" else \
                    pdsh_hold(bench, cluster, tag, via=how)
            except Failed:
                stop_jobs(bench, env, tag)  # the next run gets the nodes, and the machine
                raise
            for k, v in got.items():
                facts[how].setdefault(k, Cell()).samples.append(v)
            return got["ranks"]
        return fn

    def attached() -> float:
        t, p = run(bench.inv + ["launch", "--name", f"bench-exit-{next(runs)}",
                                "--nproc-per-node", "1", "--script", JOB,
                                "--script-args", "--mode exit"], env=env)
        if "COMPLETED" not in p.stdout:
            raise Failed(f"not COMPLETED: {last_line(p.stdout)}")
        return t

    def pdsh_exit() -> float:
        argv, penv = pdsh_torchrun(bench, cluster, f"bench-pexit-{next(runs)}", "exit")
        return run(argv, env=penv)[0]

    node = bench.lab.nodes[0]
    standalone = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", "1", JOB, "--mode", "exit"]
    node_env = {**os.environ, "HOME": str(node.dir), "OMP_NUM_THREADS": "1"}

    say(f"launch/cancel on {n} nodes")
    cells = bench.compare("launch", {
        "launch:ugro": held("ugro"), "launch:pdsh": held("pdsh"),
        "launch:fabric": held("fabric"),
        "launch:attached": attached, "launch:pdsh-exit": pdsh_exit,
        "launch:standalone": lambda: run(standalone, env=node_env, cwd=node.project)[0],
    }, budget=launch_budget(bench.repeat))
    for how in ("ugro", "pdsh", "fabric"):
        runs_of = cells[f"launch:{how}"]
        for c in facts[how].values():
            c.samples = c.samples[len(c.samples) - len(runs_of.samples):]  # not the warm-up's
            c.errors = runs_of.errors

    def none(how: str) -> Cell | None:
        c = cells[f"launch:{how}"]
        return Cell(errors=c.errors) if c.error else None

    return Runs(cells, facts["ugro"], facts["pdsh"], facts["fabric"], none("ugro"),
                none("pdsh"), none("fabric"))


def stop_jobs(bench: Bench, env: dict, tag: str) -> None:
    """End what a failed run left: its UGRO jobs (cancelled), then any tagged process."""
    for job_dir in (bench.data / "experiments").glob(f"{tag}_*"):
        with contextlib.suppress(Failed):
            run(bench.inv + ["cancel", job_dir.name], env=env)
    for pid, _, _ in job_processes(tag):
        kill(pid)
    with contextlib.suppress(Failed):
        wait_until(lambda: not supervisors(bench.data), 30, "supervisors exit", 0.1)


def ugro_hold(bench: Bench, env: dict, name: str) -> dict[str, float]:
    """Launch a job that holds, time it coming up; cancel it, time it going away."""
    n = bench.sizes.launch_nodes
    t0 = time.perf_counter()
    p = bench.popen(bench.inv + ["launch", "--name", name, "--detach", "--nproc-per-node", "1",
                                 "--script", JOB, "--script-args", "--mode hold"],
                    env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    facts = watch_start(n, name + "_", t0, p)
    (job_dir,) = (bench.data / "experiments").glob(f"{name}_*")
    job_id = job_dir.name

    def all_up() -> bool:
        text = "".join(f.read_text(errors="replace") for f in (job_dir / "logs").glob("*.log"))
        return len(set(re.findall(rf"rank (\d+)/{n} up", text))) == n

    facts["up_lines"] = wait_until(all_up, 60, "rank-up lines") - t0
    t1 = time.perf_counter()
    c = bench.popen(bench.inv + ["cancel", job_id], env=env, cwd=ROOT,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    facts["cancel_zero"] = wait_until(lambda: not job_processes(job_id), 60,
                                      "job processes gone") - t1
    c.wait(60)
    facts["cancel_inv"] = time.perf_counter() - t1
    if c.returncode != 0:
        raise Failed(f"inv cancel: exit {c.returncode}: {last_line(c.stderr.read())}")
    # The supervisor notices and ends; the next run should not share the machine with it.
    wait_until(lambda: not supervisors(bench.data, job_id), 60, "supervisor exit", 0.05)
    return facts


def pdsh_hold(bench: Bench, cluster: Cluster, tag: str, via: str = "pdsh") -> dict[str, float]:
    """The same by hand: pdsh (or, `via` "fabric", Fabric from Python) starts torchrun on every
    node; SIGTERM to the agents stops it."""
    argv, env = pdsh_torchrun(bench, cluster, tag, "hold", via=via)
    t0 = time.perf_counter()
    log = bench.tmp / f"{tag}.log"
    with log.open("w") as out:
        p = bench.popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    facts = watch_start(bench.sizes.launch_nodes, tag, t0, p, log=log)
    t1 = time.perf_counter()
    for pid, _, rank in job_processes(tag):
        if rank is None and procs.running(pid, b"torch.distributed.run"):
            kill(pid, signal.SIGTERM)
    facts["cancel_zero"] = wait_until(lambda: not job_processes(tag), 60,
                                      "job processes gone") - t1
    p.wait(60)
    return facts


def watch_start(n: int, tag: str, t0: float, p: subprocess.Popen,
                log: Path | None = None) -> dict[str, float]:
    """Poll /proc until every one of the `n` ranks of the job tagged `tag...` runs.

    `p` is `inv launch --detach`, which should also have returned by then; or, with `log`
    (its output), a pdsh that must keep running.
    """
    facts: dict[str, float] = {}
    want = {str(i) for i in range(n)}
    while "ranks" not in facts or (log is None and "returns" not in facts):
        now = time.perf_counter()
        if p.poll() is not None and "returns" not in facts:
            facts["returns"] = now - t0
            if log is not None:
                raise Failed(f"exit {p.returncode} before every rank ran: "
                             f"{why(log.read_text(errors='replace'))}")
            if p.returncode != 0:
                raise Failed(f"exit {p.returncode}: {last_line(p.stderr.read())}")
        found = job_processes(tag)
        if found and "first" not in facts:
            facts["first"] = now - t0
        if "ranks" not in facts and {r for _, _, r in found if r is not None} >= want:
            facts["ranks"] = now - t0
        if now - t0 > 120:
            raise Failed("the ranks did not all run within 120 s")
        time.sleep(0.02)
    return facts


def pdsh_torchrun(bench: Bench, cluster: Cluster, tag: str, mode: str | None = None,
                  cfg: LaunchConfig | None = None, via: str = "pdsh") -> tuple[list[str], dict]:
    """pdsh (or Fabric: `via`) running, on every launch node, that node's torchrun command
    from UGRO's own plan.

    One command line for all nodes, as a user would type it: each node picks its own line of
    the plan by the address it was reached on (`$SSH_CONNECTION`).
    """
    bench.tags.add(tag)
    cfg = cfg or LaunchConfig(name=tag, script=JOB, nproc_per_node=1,
                              script_args=("--mode", mode))
    nodes = plan(cluster, cfg, tag, rendezvous_port())
    def line(p) -> str:
        exports = "export " + " ".join(
            f"{k}={commands.q(v)}" for k, v in {"UGRO_JOB_ID": tag, **p.env}.items()) + "; "
        if not p.store:
            return exports + f"exec {commands.join(p.argv)}"
        # The host node runs the rendezvous store beside its torchrun (its agent does not
        # host one: `--rdzv-conf is_host=0`), stopped once torchrun ends.
        never = commands.q(str(bench.tmp / f"{tag}.never"))
        return (exports + f"{commands.join(p.store)} {never} & s=$!; "
                f"{commands.join(p.argv)}; kill $s")

    cases = "".join(f"{p.node.host}) " + commands.in_project(p.node, line(p)) + ";; "
                    for p in nodes)
    command = f"set -- $SSH_CONNECTION; case $3 in {cases}esac"
    return (bench.fabric if via == "fabric" else bench.pdsh)([p.node.name for p in nodes], command)
