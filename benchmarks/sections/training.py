"""Training untouched: the default script's samples per second under `inv launch` against the
same torchrun commands typed by hand (pdsh), on the same nodes, runs alternating.

Both runs train `scripts/train_single_test.py` with the same argv (UGRO's plan, as in the
launch section); the rate is rank 0's logged `samples/s` windows, the first window (start-up)
left out, read from the job's records for UGRO and from pdsh's output by hand.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import time

from benchmarks.bench import Bench, job_processes, kill, say
from benchmarks.measure import ROOT, Failed, run, why
from benchmarks.sections import jobs
from benchmarks.tables import Section, table
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
        p = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)
    finally:
        for pid, _, _ in job_processes(tag):
            kill(pid)
    if p.returncode != 0:
        raise Failed(f"pdsh: exit {p.returncode}: {why(p.stdout + p.stderr)}")
    return rate(parse_log("\n".join(line for line in p.stdout.splitlines()
                                     if "[rank0]:" in line)))


def run_section(bench: Bench) -> list[Section]:
    n = bench.sizes.launch_nodes
    cluster_file = bench.cluster(n, name="training")
    env = bench.env(cluster_file)
    cluster = load_cluster(cluster_file)
    for node in bench.lab.nodes[:n]:  # the script and its data, as `inv sync` would copy them
        shutil.copytree(ROOT / "scripts", node.project / "scripts", dirs_exist_ok=True)
    got: dict[str, list[float]] = {"ugro": [], "pdsh": []}
    errors: list[str] = []
    for i in range(bench.repeat):
        # Alternating, so a change in the machine's load falls on both alike.
        for how in ("pdsh", "ugro") if i % 2 else ("ugro", "pdsh"):
            tag = f"bench-train-{how}-{i}"
            t0 = time.perf_counter()
            try:
                got[how].append(ugro_rate(bench, env, tag) if how == "ugro"
                                else pdsh_rate(bench, cluster, tag))
            except (Failed, subprocess.TimeoutExpired) as exc:
                errors.append(f"training, {how}: {exc}")
                with contextlib.suppress(Failed):
                    jobs.stop_jobs(bench, env, tag)
            say(f"training {how} run {i + 1}: {time.perf_counter() - t0:.1f} s")
    bench.failures += errors
    med = {how: statistics.median(v) if v else None for how, v in got.items()}
    ratio = med["ugro"] / med["pdsh"] if med["ugro"] and med["pdsh"] else None
    ok = None if ratio is None else ratio >= AT_LEAST
    goal = f"≥ {AT_LEAST:g}× by hand"

    def cell(how: str) -> str:
        v = got[how]
        if not v:
            return "error"
        return f"{med[how]:.0f}" + (f" (n={len(v)})" if len(v) != bench.repeat else "")

    measured = "–" if ratio is None else f"{ratio:.3f}× ({cell('ugro')} vs {cell('pdsh')})"
    rows = [[f"samples/s, {n} nodes × 1 rank", cell("ugro"), cell("pdsh"),
             "–" if ratio is None else f"{ratio:.3f}×", goal,
             bench.target(f"training under inv launch {goal}", measured, ok)]]
    return [Section(
        "Training throughput",
        table(["", "inv launch", "pdsh + torchrun", "UGRO ÷ by hand", "target", "met"], rows),
        [f"`{SCRIPT}` (DDP, gloo, CPU), {bench.sizes.train_steps} steps, log every "
         f"{LOG_EVERY}; rank 0's mean samples/s over its windows after the first; median of "
         f"{bench.repeat} runs each, alternating. UGRO streams every node's log home while "
         "its supervisor watches; by hand, pdsh prints the output.",
         "Every lab node shares this machine's cores, so a busy control plane would show "
         "here as a lower rate."],
    )]
