"""What a long job history costs: `inv jobs`, `inv status` and a launch's preflight, with
10,000 finished jobs in the data directory next to none.

The history is fake but valid: every job has the files a finished job leaves (metadata.json,
config.json, metrics.jsonl, logs/) and its line in job_history.jsonl, as `Jobs.finish`
writes it.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

from benchmarks.bench import Bench, say
from benchmarks.measure import Failed, run
from benchmarks.tables import Section, ratio_text, secs, table
from ugro.jobs import history_line

TARGET_S = 0.3

# A launch's preflight, in-process (the launch lock, the busy-node check over the job records,
# the probe with the script and port questions), timed without Python's start-up.
PREFLIGHT = r"""
import sys, time
from ugro import store
from ugro.config import load_cluster
from ugro.cluster import Session
from ugro.jobs import Jobs
from ugro.lifecycle import busy_nodes
from ugro.plan import LaunchConfig, preflight
cluster, jobs = load_cluster(sys.argv[1]), Jobs(sys.argv[2])
cfg = LaunchConfig(name="bench", script="benchmarks/bench_job.py")
with Session(cluster) as session:
    session.run(cluster.nodes[0], "true")  # connected, as `inv launch` is by then
    t0 = time.perf_counter()
    with store.locked(jobs.data_dir / ".launch.lock"):
        assert not busy_nodes(jobs, cluster, cluster.select(None))
        preflight(cluster, cfg, session)
    print(f"{time.perf_counter() - t0:.4f}")
"""


def build(data: Path, count: int) -> None:
    """`count` finished jobs, one a minute, each with its records and its history line."""
    root = data / "experiments"
    root.mkdir(parents=True, exist_ok=True)
    start = datetime(2026, 1, 1)
    lines = []
    for i in range(count):
        when = start + timedelta(minutes=i)
        job_id = f"hist{i % 50}_{when:%Y%m%d_%H%M%S}"
        d = root / job_id
        (d / "logs").mkdir(parents=True)
        iso = when.isoformat() + "+00:00"
        meta = {"job_id": job_id, "name": f"hist{i % 50}", "status": "COMPLETED",
                "created_at": iso, "started_at": iso, "ended_at": iso, "cluster_file": "c",
                "world_size": 1, "master": "127.0.0.2:29500", "supervisor_pid": 1,
                "nodes": {"lab0": {"node_rank": 0, "nproc": 1, "status": "COMPLETED",
                                   "pgid": 1, "exit_code": "0"}}}
        (d / "metadata.json").write_text(json.dumps(meta, indent=2))
        (d / "config.json").write_text(json.dumps({"job_id": job_id, "nodes": {"lab0": {}}}))
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 4.0 - s / 10, "samples_per_sec": 100.0}) + "\n"
            for s in range(1, 11)))
        (d / "logs" / "lab0.log").write_text("lab0 r0 | step 10 loss 3.0\n")
        lines.append(json.dumps(history_line(meta), sort_keys=True))
    (data / "job_history.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))


def run_section(bench: Bench) -> list[Section]:
    count = bench.sizes.history_jobs
    cluster = bench.cluster(1, "history")
    sets = {}
    for label, n in (("none", 0), (f"{count:,}", count)):
        data = bench.tmp / f"history-{n}"
        say(f"history: building {n} finished jobs")
        build(data, n)
        env = {**bench.env(cluster), "INVOKE_UGRO_DATA_DIR": str(data)}
        run(bench.inv + ["health"], env=env)  # a recent health check: `inv status` asks none
        sets[label] = (data, env)

    def preflight(data: Path, env: dict):
        def fn() -> float:
            out = run([sys.executable, "-c", PREFLIGHT, str(cluster), str(data)], env={
                **env, "PYTHONPATH": os.pathsep.join(sys.path)})[1].stdout
            try:
                return float(out.split()[-1])
            except (IndexError, ValueError):
                raise Failed(f"no time in {out!r}") from None
        return fn

    def inv(argv: list[str], env: dict):
        return lambda: run(bench.inv + argv, env=env)[0]

    rows = []
    for what, make in (("`inv jobs`", lambda d, e: inv(["jobs"], e)),
                       ("`inv status`", lambda d, e: inv(["status"], e)),
                       ("a launch's preflight (in-process, 1 node)", preflight)):
        say(f"history: {what}")
        cells = bench.compare(f"history {what}",
                              {label: make(*args) for label, args in sets.items()})
        empty, full = cells.values()
        ok = None if full.median is None else full.median <= TARGET_S
        met = bench.target(f"{what} with {count:,} finished jobs ≤ {TARGET_S:g} s",
                           f"{secs(full, bench.repeat)} (no jobs: {secs(empty, bench.repeat)})",
                           ok)
        rows.append([what, secs(empty, bench.repeat), secs(full, bench.repeat),
                     ratio_text(full, empty), f"≤ {TARGET_S:g} s", met])
    return [Section(
        "Growth with history",
        table(["command", "no jobs", f"{count:,} finished jobs", "ratio", "target", "met"],
              rows),
        ["Fake but valid finished jobs (records, metrics, a log, their history lines as "
         "`Jobs.finish` writes them). `inv jobs` shows the latest 20; `inv status` with a "
         "recent health check, so it asks no node. The preflight row is timed inside one "
         "process, connections open, from the launch lock to the port chosen."])]
