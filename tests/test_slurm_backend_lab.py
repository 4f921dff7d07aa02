"""`inv launch`, logs, results, cancel and health against the two-node loopback Slurm.

The cluster file says `backend: slurm` and nothing else changes: the same tasks,
the same default training script (real torch DDP over gloo on the CPU).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tagged_pids, wait_for

from ugro import procs, slurm_parse

pytest_plugins = ["slurm_fixtures"]
pytestmark = [pytest.mark.lab, pytest.mark.slow]

TINY = "--steps-per-epoch 6 --log-every 2 --batch-size 8 --seq-len 32"


def cluster_file(tmp_path: Path, partition: str = "debug") -> Path:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "slurm-lab.yaml"
    path.write_text(f"""\
backend: slurm
cluster: {{name: slurmlab}}
slurm:
  login: {{local: true}}
  partition: {partition}
  nodes: 2
  cpu_procs: 1
  time: "10"
  shared_dir: {tmp_path / 'shared'}
  project_path: {ROOT}
  python: {sys.executable}
  env: {{GLOO_SOCKET_IFNAME: lo, OMP_NUM_THREADS: "1"}}
""")
    return path


@pytest.fixture
def run(inv, slurm_lab, tmp_path):
    """`inv ...` against the lab's Slurm (clients find it through SLURM_CONF alone)."""
    cluster = cluster_file(tmp_path)

    def go(*args, **kw):
        return inv(*args, cluster=kw.pop("cluster", cluster),
                   env={"SLURM_CONF": str(slurm_lab.conf)}, **kw)

    go.data = inv.data
    return go


def meta_of(run, name: str) -> dict:
    [job_dir] = sorted((run.data / "experiments").glob(f"{name}_*"))
    return json.loads((job_dir / "metadata.json").read_text())


def wait_meta(run, name: str, ready, timeout: float = 60) -> dict:
    def meta() -> dict | None:
        try:
            m = meta_of(run, name)
        except (ValueError, FileNotFoundError):
            return None
        return m if ready(m) else None

    return wait_for(meta, timeout, every=0.3)


def test_two_node_ddp_job_completes_with_metrics_and_logs(run):
    r = run("launch", "--name", "ddp", "--script-args", TINY, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "QUEUED until Slurm starts it" in r.stdout
    assert "n1 r" in r.stdout and "n2 r" in r.stdout  # followed live, prefixed
    meta = meta_of(run, "ddp")
    job_id = meta["job_id"]
    assert meta["status"] == "COMPLETED"
    assert list(meta["nodes"]) == ["n1", "n2"]
    assert {n["exit_code"] for n in meta["nodes"].values()} == {0}
    config = json.loads((run.data / "experiments" / job_id / "config.json").read_text())
    assert config["slurm"]["job_id"] == meta["slurm"]["job_id"]
    assert "srun --kill-on-bad-exit=1" in config["slurm"]["script"]
    logs = {n: (run.data / "experiments" / job_id / "logs" / f"{n}.log").read_text()
            for n in ("n1", "n2")}
    ranks = {line.split(" |")[0] for text in logs.values() for line in text.splitlines()
             if " r" in line.split(" |")[0]}
    assert ranks == {"n1 r0", "n2 r1"} or ranks == {"n1 r1", "n2 r0"}, ranks
    assert (run.data / "experiments" / job_id / "metrics.jsonl").read_text().count("loss") >= 3

    results = run("results", "ddp", "--json", check=0)
    view = json.loads(results.stdout)
    assert view["status"] == "COMPLETED" and view["world_size"] == 2
    assert view["metrics"]["source"] == "metrics.jsonl" and view["metrics"]["final_loss"]
    out = run("logs", "ddp", "--rank", "0", "--tail", "3", check=0).stdout
    assert len(out.splitlines()) == 3 and all(" r0 | " in x for x in out.splitlines())
    assert "ddp" in run("jobs", check=0).stdout
    assert "COMPLETED" in run("status", check=0).stdout


def test_failing_rank_ends_failed_naming_node_and_rank(run):
    r = run("launch", "--name", "crash", "--script-args",
            f"{TINY} --crash-at-step 2 --crash-rank 1", timeout=180)
    assert r.returncode == 1
    meta = meta_of(run, "crash")
    failure = meta["failure"]
    assert meta["status"] == "FAILED" and failure["rank"] == 1 and failure["exit_code"] != 143
    log = run.data / "experiments" / meta["job_id"] / "logs" / f"{failure['node']}.log"
    assert "crash-at-step: rank 1" in log.read_text()
    assert f"{failure['node']} rank 1 failed first" in meta["error"]
    other = next(n for n in meta["nodes"] if n != failure["node"])
    # srun stopped it: 143 or 137, or 1 when the SIGTERM found torchrun in its monitor loop
    # (it raises SignalException and exits 1; both seen on this 2-core machine).
    assert meta["nodes"][other]["exit_code"] in (1, 143, 137)
    assert "rank 1" in run("results", "crash", check=0).stdout


def test_cancel_ends_cancelled_with_no_process_left(run):
    run("launch", "--name", "long", "--detach", "--script-args",
        f"{TINY} --steps-per-epoch 1000 --sleep-per-step 0.2", check=0)
    meta = wait_meta(run, "long", lambda m: m["status"] == "RUNNING" and any(
        " r0 | step" in p.read_text() for p in
        (run.data / "experiments" / m["job_id"] / "logs").glob("*.log")), timeout=90)
    r = run("cancel", "long", check=0)
    assert "CANCELLED" in r.stdout
    job_id = meta["job_id"]
    assert tagged_pids(job_id) == []
    meta = wait_meta(run, "long", lambda m: all(
        n.get("exit_code") is not None for n in m["nodes"].values()), timeout=30)
    assert meta["status"] == "CANCELLED" and "failure" not in meta


def test_waiting_job_is_queued_with_slurms_reason(run, slurm_lab, tmp_path):
    holder = slurm_parse.parse_submit(slurm_lab.run(
        "sbatch", "--parsable", "--nodes=2", "--output=/dev/null", "--wrap", "sleep 300",
        cwd=tmp_path).stdout)
    try:
        slurm_lab.wait(holder, ("RUNNING",), timeout=20)
        r = run("launch", "--name", "waiter", "--detach", check=0)
        assert "QUEUED" in r.stdout
        meta = wait_meta(run, "waiter", lambda m: (m.get("slurm") or {}).get("reason"))
        assert (meta["status"], meta["slurm"]["reason"]) == ("QUEUED", "Resources")
        rows = json.loads(run("jobs", "--json", check=0).stdout)
        assert rows[0]["waiting"] == f"Slurm job {meta['slurm']['job_id']} PENDING (Resources)"
        assert "PENDING (Resources)" in run("status", check=0).stdout
        # Queued by Slurm, not by UGRO's queue: a dead supervisor is started again by status.
        dead = meta["supervisor_pid"]
        os.kill(dead, signal.SIGKILL)
        wait_for(lambda: not procs.running(dead, b"ugro.supervise"), 10)
        assert "PENDING (Resources)" in run("status", check=0).stdout
        again = meta_of(run, "waiter")["supervisor_pid"]
        assert again != dead and procs.running(again, b"ugro.supervise")
        assert "CANCELLED" in run("cancel", "waiter", check=0).stdout
        assert meta_of(run, "waiter")["status"] == "CANCELLED"
        assert slurm_lab.state(meta["slurm"]["job_id"]) == "CANCELLED"
    finally:
        slurm_lab.run("scancel", holder, check=False)


def test_bad_partition_is_one_clear_line(run, tmp_path):
    bad = cluster_file(tmp_path / "bad", partition="nope")
    r = run("launch", "--name", "x", cluster=bad)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "ugro: partition 'nope' has no nodes or does not exist (slurm.partition in "
        f"{bad}; this cluster has: debug)"]


def test_health_reports_the_partition_without_occupying_it(run):
    r = run("health", "--json", check=0)
    nodes = {n["node"]: n for n in json.loads(r.stdout)["nodes"]}
    assert sorted(nodes) == ["n1", "n2"]
    assert all(n["healthy"] and n["address"] == "debug/idle" for n in nodes.values())
    deep = json.loads(run("health", "--deep", "--json", timeout=120, check=0).stdout)
    assert {n["node"]: bool(n["torch"]) for n in deep["nodes"]} == {"n1": True, "n2": True}

