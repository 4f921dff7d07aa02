"""Stall detection and `inv status` from the monitor, for real on the sshd lab.

A stall is a job whose processes are alive and running but silent (a rank blocked in a
collective, or sleeping), not one whose processes are stopped (that is the fault suite's
"hung"). The script here prints a few lines, then sleeps without a word, then speaks again.
"""

from __future__ import annotations

import json
import resource
import time
import urllib.request
from datetime import datetime

import pytest
from conftest import ROOT, meta_of, wait_for

from ugro import procs
from ugro.config import load_cluster
from ugro.monitor.service import Monitor, MonitorConfig

pytestmark = [pytest.mark.lab, pytest.mark.slow]

# argv: seconds of silence, then seconds of speaking again (a line a second) before exiting.
QUIET = """\
import os, sys, time
rank = os.environ.get("RANK", "?")
silent, after = float(sys.argv[1]), int(sys.argv[2])
for i in range(3):
    print(f"rank {rank} step {i}", flush=True)
print(f"rank {rank} sleeping", flush=True)
time.sleep(silent)
for i in range(after):
    print(f"rank {rank} awake {i}", flush=True)
    time.sleep(1)
"""


@pytest.fixture(scope="module")
def project(lab):
    for node in lab.nodes:
        (node.project / "stall").mkdir(exist_ok=True)
        (node.project / "stall/quiet.py").write_text(QUIET)
    return lab


@pytest.fixture
def cluster(project, tmp_path):
    return project.cluster_file(tmp_path / "lab.yaml", project.nodes[:2])


def only_job(data) -> str:
    (job,) = [p.name for p in (data / "experiments").iterdir()]
    return job


def logs_of(data, job_id) -> str:
    return "".join(p.read_text() for p in (data / "experiments" / job_id / "logs").glob("*.log"))


def metrics(mon) -> str:
    with urllib.request.urlopen(mon.url + "metrics", timeout=10) as r:
        return r.read().decode()


def test_a_silent_job_is_flagged_stalled_and_unflagged_when_it_speaks(inv, cluster, tmp_path):
    lab_cluster = load_cluster(str(cluster), ROOT)
    with Monitor(lab_cluster, inv.data, MonitorConfig(interval=0.5, port=0)) as mon:
        r = inv("launch", "--name", "quiet", "--script", "stall/quiet.py", "--nproc-per-node",
                "1", "--detach", "--stall-after", "3s", "--script-args", "20 15",
                cluster=cluster, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        job_id = only_job(inv.data)
        config = json.loads((inv.data / "experiments" / job_id / "config.json").read_text())
        assert (config["launch"]["stall_after"], config["launch"]["on_stall"]) == (3.0, "flag")
        wait_for(lambda: "sleeping" in logs_of(inv.data, job_id))
        silent_at, seen = time.monotonic(), time.time()

        def stalled_after_sleeping():
            # A start-up slower than 3s (torchrun importing torch) may have been flagged
            # already; that flag clears at the first line. Wait for the flag of the sleep.
            m = meta_of(inv.data, job_id)
            since = m.get("stalled_since")
            return since and datetime.fromisoformat(since).timestamp() > seen - 1.5 and m

        meta = wait_for(stalled_after_sleeping)
        flagged_in = time.monotonic() - silent_at
        # --stall-after, the other node's last line, two of the supervisor's 2 s rounds, and
        # room for a loaded machine: well before the job speaks again, 15 s after its last.
        assert meta["status"] == "RUNNING" and flagged_in < 3 + 1 + 2 * 2 + 4, flagged_in
        print(f"flagged stalled {flagged_in:.1f}s after its last line (--stall-after 3s)")
        view = json.loads(inv("status", "--json", cluster=cluster, check=0).stdout)
        (running,) = view["running"]
        assert (running["job_id"], running["status"], running["stalled"]) == (
            job_id, "RUNNING", True)
        text = inv("status", cluster=cluster, check=0).stdout
        assert "STALLED, silent" in text
        line = f'ugro_job_stalled{{job="{job_id}",name="quiet"}}'
        wait_for(lambda: f"{line} 1.0" in metrics(mon), timeout=10)
        # It speaks again: plain running, everywhere.
        wait_for(lambda: "awake" in logs_of(inv.data, job_id), timeout=40)
        meta = wait_for(lambda: "stalled_since" not in (m := meta_of(inv.data, job_id)) and m,
                        timeout=15)
        assert meta["status"] == "RUNNING", meta
        wait_for(lambda: f"{line} 0.0" in metrics(mon), timeout=10)
        assert not json.loads(inv("status", "--json", cluster=cluster,
                                  check=0).stdout)["running"][0]["stalled"]
        meta = wait_for(lambda: (m := meta_of(inv.data, job_id))["status"] != "RUNNING" and m,
                        timeout=60)
    assert meta["status"] == "COMPLETED", meta
    assert procs.tagged(b"UGRO_JOB_ID", job_id.encode()) == []


def test_on_stall_cancel_fails_the_job_as_stalled_and_stops_every_node(inv, cluster):
    started = time.monotonic()
    r = inv("launch", "--name", "hang", "--script", "stall/quiet.py", "--nproc-per-node", "1",
            "--stall-after", "3s", "--on-stall", "cancel", "--script-args", "300 1",
            cluster=cluster, timeout=120)
    took = time.monotonic() - started
    assert r.returncode == 1, r.stdout + r.stderr
    job_id = only_job(inv.data)
    meta = meta_of(inv.data, job_id)
    assert meta["status"] == "FAILED" and meta["error"].startswith("stalled: no output or metric")
    assert "--on-stall cancel" in meta["error"] and "Traceback" not in r.stderr
    assert meta["error"] in r.stderr
    assert {f["status"] for f in meta["nodes"].values()} == {"cancelled"}
    history = json.loads((inv.data / "job_history.jsonl").read_text().splitlines()[-1])
    assert history["status"] == "FAILED" and history["error"].startswith("stalled")
    assert procs.tagged(b"UGRO_JOB_ID", job_id.encode()) == []
    assert took < 60, took


def test_bad_stall_options_are_one_line(inv, cluster):
    r = inv("launch", "--name", "x", "--stall-after", "soon", cluster=cluster, check=1)
    assert r.stderr.strip() == ("ugro: --stall-after: expected a duration such as 90s, 10m or 1h "
                                "(more than 0, at most a week), got 'soon'")
    r = inv("launch", "--name", "x", "--on-stall", "kill", cluster=cluster, check=1)
    assert r.stderr.strip() == "ugro: --on-stall: expected flag or cancel, got 'kill'"
    assert not (inv.data / "experiments").exists() or not list(
        (inv.data / "experiments").iterdir())


def test_inv_status_answers_from_the_monitor_without_probing(inv, project, tmp_path):
    cluster = project.cluster_file(tmp_path / "lab3.yaml")
    lab_cluster = load_cluster(str(cluster), ROOT)
    with Monitor(lab_cluster, inv.data, MonitorConfig(interval=1, port=0)) as mon:
        wait_for(lambda: (s := mon.snapshot()).is_fresh() and len(s.nodes) == 3, timeout=20)
        cpu = []
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = inv("status", "--json", cluster=cluster, check=0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        view = json.loads(r.stdout)
    assert view["source"]["from"] == "monitor" and view["source"]["age_s"] < 5
    assert [n["node"] for n in view["nodes"]] == ["lab0", "lab1", "lab2"]
    assert all(n["healthy"] for n in view["nodes"])
    assert [g["name"] for g in view["nodes"][1]["gpus"]] == ["NVIDIA GeForce RTX 3090"] * 2
    # No health probe ran: it would have saved its result.
    assert not (inv.data / "cluster_state.json").exists()
    # The whole `inv` process, Python start-up included; CPU time, as wall time on two cores
    # shared with the lab and the monitor says more about them (benchmarks/monitor_cost.py
    # measures the wall time).
    assert min(cpu) < 1.0, cpu
    # Without a running monitor the sample goes stale and status probes as before.
    time.sleep(3.5)
    view = json.loads(inv("status", "--json", cluster=cluster, check=0).stdout)
    assert view["source"]["from"] == "health check" and view["health"]["refreshed"]
    assert (inv.data / "cluster_state.json").exists()
