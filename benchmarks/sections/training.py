"""Training untouched: the default script's samples per second under `inv launch` against the
same torchrun commands typed by hand (pdsh), on the same nodes, runs taking turns.

Both runs train `scripts/train_single_test.py` with the same argv (UGRO's plan, as in the
launch section); the rate is rank 0's logged `samples/s` windows, the first window (start-up)
left out, read from the job's records for UGRO and from pdsh's output by hand.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import statistics
import time

from benchmarks.bench import Bench, job_processes, kill, say
from benchmarks.measure import ROOT, Failed, run
from benchmarks.sections import jobs
from benchmarks.tables import Section, ratio, table
from ugro import records
from ugro.config import load_cluster
from ugro.jobs import Jobs
from ugro.metrics import MetricPoint, parse_log
from ugro.plan import LaunchConfig

SCRIPT = "scripts/train_single_test.py"
LOG_EVERY = 10
AT_LEAST = 0.98  # UGRO's rate may be this fraction of the by-hand rate
RUN_TIMEOUT_S = 600


def rate(points: list[MetricPoint]) -> float:
    """Rank 0's mean samples/s over its logged windows after the first (start-up)."""
    rates = [p.samples_per_sec for p in points if p.samples_per_sec is not None][1:]
    if not rates:
        raise Failed("no samples/s windows after the first were logged")
    return statistics.fmean(rates)


def script_args(bench: Bench) -> tuple[str, ...]:
    return ("--steps-per-epoch", str(bench.sizes.train_steps), "--log-every", str(LOG_EVERY))


def ugro_rate(bench: Bench, env: dict, name: str) -> float:
    run(bench.inv + ["launch", "--name", name, "--nproc-per-node", "1", "--script", SCRIPT,
                     "--epochs", "1", "--script-args", " ".join(script_args(bench))],
        env=env, timeout=RUN_TIMEOUT_S)
    ugro_jobs = Jobs(bench.data)
    return rate(records.load(ugro_jobs, ugro_jobs.find(name)).points)


def pdsh_rate(bench: Bench, cluster, tag: str) -> float:
    cfg = LaunchConfig(name=tag, script=SCRIPT, nproc_per_node=1, epochs=1,
                       script_args=script_args(bench))
    argv, env = jobs.pdsh_torchrun(bench, cluster, tag, cfg=cfg)
    try:
        _, p = run(argv, env=env, timeout=RUN_TIMEOUT_S)
    finally:
        for pid, _, _ in job_processes(tag):
            kill(pid)
    return rate(parse_log("\n".join(line for line in p.stdout.splitlines()
                                     if "[rank0]:" in line)))


def run_section(bench: Bench) -> list[Section]:
    n = bench.sizes.launch_nodes
    cluster_file = bench.cluster(n, name="training")
    env = bench.env(cluster_file)
    cluster = load_cluster(cluster_file)
    for node in bench.lab.nodes[:n]:  # the script and its data, as `inv sync` would copy them
        shutil.copytree(ROOT / "scripts", node.project / "scripts", dirs_exist_ok=True)
    runs = itertools.count()

    def method(how: str):
        def fn() -> float:
            tag = f"bench-train-{how}-{next(runs)}"
            t0 = time.perf_counter()
            try:
                return ugro_rate(bench, env, tag) if how == "ugro" else \
                    pdsh_rate(bench, cluster, tag)
            except Failed:
                with contextlib.suppress(Failed):
                    jobs.stop_jobs(bench, env, tag)
                raise
            finally:
                say(f"training {how}: {time.perf_counter() - t0:.1f} s")
        return fn

    cells = bench.compare("training", {"ugro": method("ugro"), "pdsh": method("pdsh")},
                          warm=False, budget=math.inf)
    r = ratio(cells["ugro"], cells["pdsh"])
    ok = None if r is None else r >= AT_LEAST
    goal = f"≥ {AT_LEAST:g}× by hand"

    def cell(how: str) -> str:
        c = cells[how]
        if c.median is None:
            return "error"
        return f"{c.median:.0f}" + (f" (n={len(c.samples)})"
                                    if len(c.samples) != bench.repeat else "")

    measured = "–" if r is None else f"{r:.3f}× ({cell('ugro')} vs {cell('pdsh')})"
    rows = [[f"samples/s, {n} nodes × 1 rank", cell("ugro"), cell("pdsh"),
             "–" if r is None else f"{r:.3f}×", goal,
             bench.target(f"training under inv launch {goal}", measured, ok)]]
    return [Section(
        "Training throughput",
        table(["", "inv launch", "pdsh + torchrun", "UGRO ÷ by hand", "target", "met"], rows),
        [f"`{SCRIPT}` (DDP, gloo, CPU), {bench.sizes.train_steps} steps, log every "
         f"{LOG_EVERY}; rank 0's mean samples/s over its windows after the first; median of "
         f"{bench.repeat} runs each, taking turns. UGRO streams every node's log home while "
         "its supervisor watches; by hand, pdsh prints the output.",
         "Every lab node shares this machine's cores, so a busy control plane would show "
         "here as a lower rate."],
    )]
