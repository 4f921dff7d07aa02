"""The queue for real: queued torchrun jobs on the sshd lab, started by passes with no daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
from conftest import ROOT, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SHORT = ("--nproc-per-node", "1", "--epochs", "1", "--script-args", "--steps-per-epoch 4")
LONG = ("--nproc-per-node", "1", "--epochs", "1",
        "--script-args", "--steps-per-epoch 1000 --sleep-per-step 0.2")


@pytest.fixture
def cluster(lab_project, tmp_path):
    return lab_project.cluster_file(tmp_path / "lab.yaml")


def record(data, name) -> dict:
    (path,) = (data / "experiments").glob(f"{name}_*/metadata.json")
    return json.loads(path.read_text())


def wait_status(data, names, statuses=("COMPLETED", "FAILED", "CANCELLED"), timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metas = {n: record(data, n) for n in names}
        if all(m["status"] in statuses for m in metas.values()):
            return metas
        time.sleep(0.2)
    raise AssertionError(f"not {statuses} in time: {[(n, m['status']) for n, m in metas.items()]}")


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def assert_one_after_another(metas: list[dict]):
    for before, after in zip(metas, metas[1:], strict=False):
        assert when(before["ended_at"]) <= when(after["started_at"]), (before, after)


def test_jobs_needing_both_nodes_run_one_after_another_and_priority_overtakes(inv, cluster):
    nodes = ("--nodes", "lab0,lab1")
    # q1 trains for ~15 s, so every later job is queued behind it, however slow the machine.
    r = inv("launch", "--name", "q1", "--queue", "--detach", *nodes, *LONG[:4],
            "--script-args", "--steps-per-epoch 30 --sleep-per-step 0.5", cluster=cluster,
            check=0)
    assert "lab0 1/1 ranks, lab1 1/1 ranks" in r.stdout  # free nodes: it started at once
    for name, extra in (("q2", ()), ("q3", ()), ("urgent", ("--priority", "5"))):
        r = inv("launch", "--name", name, "--queue", *nodes, *extra, *SHORT, cluster=cluster,
                check=0)
        assert "queued at position" in r.stdout, r.stdout
    listed = json.loads(inv("queue", "--json", cluster=cluster, check=0).stdout)
    if len(listed) == 3:  # q1 still runs (it does but on a very slow machine)
        assert [(r["position"], r["name"]) for r in listed] == [
            (1, "urgent"), (2, "q2"), (3, "q3")]
        assert listed[2]["reason"].startswith("nodes busy: lab0 held by q1, lab1 held by q1")
        assert listed[2]["request"] == "lab0,lab1"
        assert "urgent" in inv("queue", cluster=cluster, check=0).stdout
    metas = wait_status(inv.data, ["q1", "q2", "q3", "urgent"], timeout=180)
    assert {m["status"] for m in metas.values()} == {"COMPLETED"}
    order = sorted(metas.values(), key=lambda m: m["started_at"])
    assert [m["name"] for m in order] == ["q1", "urgent", "q2", "q3"]
    assert_one_after_another(order)
    assert all(m["queue"]["request_text"] == "lab0,lab1" for m in order)
    assert "QUEUED" not in inv("jobs", cluster=cluster, check=0).stdout


def test_after_chain_runs_in_order_and_a_failed_predecessor_cancels_its_dependents(inv, cluster):
    one = ("--nodes", "lab2", "--queue", "--detach")
    inv("launch", "--name", "first", *one, *LONG[:4], "--script-args",
        "--steps-per-epoch 4 --sleep-per-step 0.5", cluster=cluster, check=0)
    inv("launch", "--name", "second", *one, "--after", "first", *SHORT, cluster=cluster, check=0)
    inv("launch", "--name", "crash", "--nodes", "lab0", "--queue", "--detach",
        "--nproc-per-node", "1",
        # Fails ~8 s into training: after dep1 and dep2 are queued behind it, even on a
        # loaded machine.
        "--script-args",
        "--steps-per-epoch 20 --crash-at-step 16 --crash-rank 0 --sleep-per-step 0.5",
        cluster=cluster, check=0)
    inv("launch", "--name", "dep1", *one, "--after", "crash", *SHORT, cluster=cluster, check=0)
    inv("launch", "--name", "dep2", "--nodes", "lab1", "--queue", "--detach", "--after", "dep1",
        *SHORT,
        cluster=cluster, check=0)
    queue = json.loads(inv("queue", "--json", cluster=cluster, check=0).stdout)
    waiting = {row["name"]: row["reason"] for row in queue}
    if "second" in waiting:
        assert waiting["second"] == "after first (RUNNING)"
    metas = wait_status(inv.data, ["first", "second", "crash", "dep1", "dep2"], timeout=180)
    assert metas["first"]["status"] == metas["second"]["status"] == "COMPLETED"
    assert_one_after_another([metas["first"], metas["second"]])
    assert metas["crash"]["status"] == "FAILED"
    assert metas["dep1"]["status"] == "CANCELLED" and metas["dep1"]["started_at"] is None
    assert metas["dep1"]["error"] == "never started: after crash: it ended FAILED"
    assert metas["dep2"]["status"] == "CANCELLED"
    assert "after dep1: it ended CANCELLED" in metas["dep2"]["error"]


def test_queued_job_is_cancelled_and_the_queue_survives_a_killed_supervisor(inv, cluster, lab):
    nodes = ("--nodes", "lab0", "--queue", "--detach")
    inv("launch", "--name", "holder", *nodes, "--nproc-per-node", "1",
        "--script-args", "--steps-per-epoch 16 --sleep-per-step 0.5", cluster=cluster, check=0)
    inv("launch", "--name", "dropped", *nodes, *SHORT, cluster=cluster, check=0)
    inv("launch", "--name", "next", *nodes, *SHORT, cluster=cluster, check=0)
    r = inv("cancel", "dropped", cluster=cluster, check=0)
    assert "CANCELLED" in r.stdout
    dropped = record(inv.data, "dropped")
    assert dropped["status"] == "CANCELLED" and dropped["started_at"] is None
    assert not list(lab.nodes[0].project.glob(f"data/experiments/{dropped['job_id']}"))
    holder = record(inv.data, "holder")
    os.kill(holder["supervisor_pid"], signal.SIGKILL)
    # Holder ends on its node; nobody is watching.
    wait_for(lambda: (lab.nodes[0].project / "data/experiments" / holder["job_id"]
                      / "nodes/lab0/exit_code").exists(), timeout=90)
    assert record(inv.data, "next")["status"] == "QUEUED"
    inv("status", cluster=cluster, check=0)  # reconciles holder, which kicks a pass
    metas = wait_status(inv.data, ["holder", "next"], timeout=120)
    assert metas["holder"]["status"] == metas["next"]["status"] == "COMPLETED"
    assert_one_after_another([metas["holder"], metas["next"]])


def test_two_queued_launches_at_the_same_instant_both_run_never_at_once(inv, cluster, tmp_path):
    env = dict(os.environ, INVOKE_UGRO_CLUSTER=str(cluster), INVOKE_UGRO_DATA_DIR=str(inv.data),
               INVOKE_UGRO_LOG_DIR=str(tmp_path / "logs"))
    procs = [subprocess.Popen([sys.executable, "-m", "invoke", "launch", "--name", name,
                               "--queue", "--detach", "--nodes", "lab0,lab1", *SHORT],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for name in ("twin_a", "twin_b")]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    metas = wait_status(inv.data, ["twin_a", "twin_b"], timeout=120)
    assert {m["status"] for m in metas.values()} == {"COMPLETED"}
    assert_one_after_another(sorted(metas.values(), key=lambda m: m["started_at"]))


def test_min_gpu_mem_places_on_big_gpus_and_refuses_what_no_node_has(inv, cluster):
    r = inv("launch", "--name", "big", "--queue", "--detach", "--min-gpu-mem", "10G", *SHORT,
            cluster=cluster, check=0)
    assert "lab1 1/1 ranks" in r.stdout and "lab0" not in r.stdout
    assert list(record(inv.data, "big")["nodes"]) == ["lab1"]
    r = inv("launch", "--name", "huge", "--queue", "--min-gpu-mem", "30G", *SHORT,
            cluster=cluster, check=1)
    assert r.stderr.strip() == ("ugro: --min-gpu-mem 30G: no node has GPUs with 30 GiB "
                                "(lab0: 8188 MiB, lab1: 24576 MiB, lab2: no GPU)")
    assert not list((inv.data / "experiments").glob("huge_*"))
    r = inv("launch", "--name", "x", "--after", "big", *SHORT, cluster=cluster, check=1)
    assert r.stderr.strip() == "ugro: --after: only for queued jobs; add --queue"
    wait_status(inv.data, ["big"])
