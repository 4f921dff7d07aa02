"""`inv launch` for real: torchrun with gloo over three sshd lab nodes, and the local cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tagged_pids, wait_for

from ugro import procs

pytestmark = [pytest.mark.lab, pytest.mark.slow]

FAST = "--steps-per-epoch 6 --log-every 2"


@pytest.fixture
def cluster(lab_project, tmp_path):
    return lab_project.cluster_file(tmp_path / "lab.yaml")


def only_job(data: Path) -> tuple[str, dict]:
    (job,) = [p for p in (data / "experiments").iterdir()]
    return job.name, json.loads((job / "metadata.json").read_text())


@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_three_node_launch_completes(inv, lab_project, tmp_path, lab, backend):
    cluster = lab_project.cluster_file(tmp_path / "lab.yaml", rdzv_backend=backend)
    r = inv("launch", "--name", "exp1", "--epochs", "2", "--nproc-per-node", "1",
            "--script-args", FAST, cluster=cluster, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id, meta = only_job(inv.data)
    assert meta["status"] == "COMPLETED"
    assert meta["world_size"] == 3
    assert {n: v["exit_code"] for n, v in meta["nodes"].items()} == {
        "lab0": 0, "lab1": 0, "lab2": 0}
    job = inv.data / "experiments" / job_id
    config = json.loads((job / "config.json").read_text())
    argv = config["nodes"]["lab1"]["argv"]
    assert config["cluster"]["rdzv_backend"] == backend
    assert config["nodes"]["lab1"]["node_rank"] == 1
    assert argv[argv.index("--rdzv-id") + 1] == job_id
    if backend == "static":  # the node ranks are UGRO's; rank 0's agent holds the store
        assert argv[argv.index("--node-rank") + 1] == "1"
        assert argv[argv.index("--master-addr") + 1] == "127.0.0.2"
    else:  # c10d orders ranks by the address each node gives
        assert argv[argv.index("--local-addr") + 1] == "127.0.0.3"
        assert argv[argv.index("--rdzv-endpoint") + 1].startswith("127.0.0.2:")
    assert set(config["versions"]) == {"lab0", "lab1", "lab2"}
    # Every node's log came home, each line prefixed with its node (and rank).
    ranks = set()
    for node in ("lab0", "lab1", "lab2"):
        lines = (job / "logs" / f"{node}.log").read_text().splitlines()
        assert lines and all(line.startswith(node) for line in lines)
        ranks |= {line.split()[1] for line in lines if " up on " in line}
    assert ranks == {"r0", "r1", "r2"}  # every rank joined and said so
    assert "lab0 r0 | step 2" in (job / "logs" / "lab0.log").read_text()
    # The terminal saw the same prefixed lines live.
    assert "r0 | step 2 | epoch 1" in r.stdout
    metrics = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["epoch"] == 2 and metrics[-1]["loss"] < metrics[0]["loss"]
    rank0_node = [n for n in lab.nodes
                  if (n.project / "data/experiments" / job_id / "checkpoints/epoch_2.pt").exists()]
    assert len(rank0_node) == 1
    history = [json.loads(x) for x in (inv.data / "job_history.jsonl").read_text().splitlines()]
    assert history[-1]["job_id"] == job_id and history[-1]["status"] == "COMPLETED"
    assert tagged_pids(job_id) == []


# Widens torch's exit-barrier race (pytorch/pytorch#69520) from a scheduling accident to a
# certainty: this node's agent arrives late, and after marking the barrier passed, naps before
# its last call to rank 0's store.
LATE_TO_THE_BARRIER = """
import time
import torch.distributed.elastic.utils.store as s
barrier = s._barrier_nonblocking
def late(*a, **k):
    time.sleep(1)
    key = barrier(*a, **k)
    time.sleep(1)
    return key
s._barrier_nonblocking = late
"""


def test_rank_0_leaves_the_exit_barrier_last(inv, lab_project, tmp_path):
    site = tmp_path / "late"
    site.mkdir()
    (site / "sitecustomize.py").write_text(LATE_TO_THE_BARRIER)
    late = {n.name: {"env": {**lab_project.node_config(n)["env"], "PYTHONPATH": str(site)}}
            for n in lab_project.nodes[1:]}
    cluster = lab_project.cluster_file(tmp_path / "lab.yaml", node_overrides=late)
    r = inv("launch", "--name", "late", "--epochs", "1", "--nproc-per-node", "1",
            "--script-args", FAST, cluster=cluster, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id, meta = only_job(inv.data)
    assert meta["status"] == "COMPLETED"
    logs = "".join(p.read_text() for p in (inv.data / "experiments" / job_id / "logs").glob("*"))
    # Rank 0's agent waited for the late ones: none lost the store in its last call.
    for noise in ("exit barrier", "Connection reset", "frame #", "Traceback"):
        assert noise not in logs, noise
    assert tagged_pids(job_id) == []


# Rank 0's node also holds the rendezvous store (static: in its torchrun agent): its crash
# must still be blamed on it, not on the other nodes losing the store.
@pytest.mark.parametrize("rank", [1, 0])
def test_crashing_rank_fails_the_job_fast_everywhere(inv, cluster, rank):
    r = inv("launch", "--name", "crash", "--epochs", "1", "--nproc-per-node", "1",
            "--script-args", "--steps-per-epoch 1000 --sleep-per-step 0.2 "
            f"--crash-at-step 4 --crash-rank {rank}", cluster=cluster, timeout=300)
    assert r.returncode == 1
    job_id, meta = only_job(inv.data)
    assert meta["status"] == "FAILED"
    failure = meta["failure"]
    assert failure["rank"] == rank and failure["exit_code"] != 0
    assert failure["node"] == f"lab{rank}"
    assert "failed first" in meta["error"]
    assert any("crash-at-step" in line for line in failure["log_tail"])
    # FAILED within 10 s of the crash; the other nodes were stopped, not waited for.
    crash_log = inv.data / "experiments" / job_id / "logs" / f"{failure['node']}.log"
    assert crash_log.exists()
    from datetime import datetime
    ended = datetime.fromisoformat(meta["ended_at"])
    started = datetime.fromisoformat(meta["started_at"])
    assert (ended - started).total_seconds() < 90  # 1000 steps would take 200 s + start-up
    assert tagged_pids(job_id) == []


def test_cancel_stops_everything(inv, cluster):
    r = inv("launch", "--name", "long", "--nproc-per-node", "1", "--detach", "--script-args",
            "--steps-per-epoch 1000 --sleep-per-step 0.2", cluster=cluster, check=0)
    # --detach returns once every rank runs.
    assert "lab0 1/1 ranks, lab1 1/1 ranks, lab2 1/1 ranks" in r.stdout
    job_id, meta = only_job(inv.data)
    assert meta["status"] == "RUNNING"
    # Its supervisor is the launch's process forked (no interpreter of its own), in a session
    # of its own, known by its pid and start time.
    sup = meta["supervisor_pid"]
    assert procs.running(sup, b"invoke\0launch\0--name\0long\0")
    assert procs.start_time(sup) == meta["supervisor_started"]
    assert os.getsid(sup) == sup
    log = inv.data / "experiments" / job_id / "logs"
    wait_for(lambda: "| step" in "".join(p.read_text() for p in log.glob("*.log")), 120)
    # A second launch on the same nodes is refused, naming the job that holds them.
    r = inv("launch", "--name", "second", "--nodes", "lab1", "--nproc-per-node", "1",
            cluster=cluster, check=1)
    assert f"busy with job {job_id}" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = inv("cancel", "long", cluster=cluster, check=0)
    assert "CANCELLED" in r.stdout
    assert json.loads((inv.data / "experiments" / job_id / "metadata.json").read_text())[
        "status"] == "CANCELLED"
    assert tagged_pids(job_id) == []
    time.sleep(1.0)  # the supervisor must not overwrite CANCELLED when it notices
    _, meta = only_job(inv.data)
    assert meta["status"] == "CANCELLED"


def test_ctrl_c_cancels_on_every_node(inv, cluster, tmp_path):
    env = dict(os.environ, INVOKE_UGRO_CLUSTER=str(cluster),
               INVOKE_UGRO_DATA_DIR=str(inv.data), INVOKE_UGRO_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "launch", "--name", "ctrlc", "--nproc-per-node", "1",
         "--script-args", "--steps-per-epoch 1000 --sleep-per-step 0.2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "| step" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    job_id, meta = only_job(inv.data)
    assert meta["status"] == "CANCELLED", out
    assert tagged_pids(job_id) == []


def test_bad_names_are_refused_before_anything_runs(inv, cluster):
    for name in ("x; touch /tmp/pwned", "../etc", "", "a" * 65):
        r = inv("launch", "--name", name, cluster=cluster, check=1)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
    assert not (inv.data / "experiments").exists()
    assert not Path("/tmp/pwned").exists()


def test_unreachable_node_fails_preflight(inv, cluster, lab):
    lab.stop_node(lab.nodes[2])
    try:
        r = inv("launch", "--name", "pre", "--nproc-per-node", "1", cluster=cluster, check=1)
    finally:
        lab.start_node(lab.nodes[2])
    assert "lab2 unhealthy" in r.stderr and "connection refused" in r.stderr
    # No job: its directory went with the refusal, and its supervisor (on standby since the
    # start, the launch's process forked) with it.
    assert not (inv.data / "experiments").exists() or not list(
        (inv.data / "experiments").iterdir())
    assert wait_for(lambda: not [p for p in procs.pids() if p != os.getpid() and (
        procs.running(p, b"launch\0--name\0pre\0")
        or procs.running(p, b"ugro.supervise", str(inv.data).encode()))], 10)


def test_killed_supervisor_is_reconciled_from_the_nodes(inv, lab_project, tmp_path, lab):
    from ugro.config import load_cluster
    from ugro.jobs import Jobs
    from ugro.lifecycle import reconcile

    # c10d: its store on the host outlives torchrun, and the reconcile must stop it.
    cluster = lab_project.cluster_file(tmp_path / "c10d.yaml", rdzv_backend="c10d")
    inv("launch", "--name", "orphan", "--nproc-per-node", "1", "--detach", "--script-args",
        "--steps-per-epoch 4", cluster=cluster, check=0)
    job_id, meta = only_job(inv.data)
    os.kill(meta["supervisor_pid"], signal.SIGKILL)
    # The job runs on without UGRO, to its end on every node (the host's store lives on).
    exits = [n.project / "data/experiments" / job_id / "nodes" / n.name / "exit_code"
             for n in lab.nodes]
    wait_for(lambda: all(e.exists() for e in exits), 120)
    _, meta = only_job(inv.data)
    assert meta["status"] == "RUNNING"  # nobody has looked yet
    assert tagged_pids(job_id)  # the store, still there
    meta = reconcile(Jobs(inv.data), load_cluster(cluster), job_id)
    assert meta["status"] == "COMPLETED"
    assert all(v["exit_code"] == 0 for v in meta["nodes"].values())
    assert tagged_pids(job_id) == []  # the rendezvous store stopped, nothing left
    logs = inv.data / "experiments" / job_id / "logs"
    assert "lab0 r0 | step" in (logs / "lab0.log").read_text()
    assert "lab1 r1 | rank 1/3 up" in (logs / "lab1.log").read_text()


def test_local_cluster_quick_start(inv, tmp_path):
    """The README's first command, on the shipped config/cluster.yaml (2 CPU ranks, no SSH).

    Only its project path is moved to a temporary directory, so the node's own files (pgid,
    checkpoints) are written there and never into this checkout.
    """
    project = tmp_path / "project"
    project.mkdir()
    (project / "scripts").symlink_to(ROOT / "scripts")
    shipped = yaml.safe_load((ROOT / "config/cluster.yaml").read_text())
    shipped["master"]["project_path"] = str(project)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(shipped))
    r = inv("launch", "--name", "demo", "--epochs", "2", "--script-args", FAST,
            timeout=240, cluster=cluster)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id, meta = only_job(inv.data)
    assert meta["status"] == "COMPLETED" and meta["world_size"] == 2
    metrics = [json.loads(x) for x in
               (inv.data / "experiments" / job_id / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (project / "data/experiments" / job_id / "checkpoints/epoch_2.pt").exists()
    assert "local r1 |" in (inv.data / "experiments" / job_id / "logs/local.log").read_text() \
        or "local r0 |" in r.stdout


def test_reset_stops_every_job_and_marks_it_cancelled(inv, cluster, lab):
    inv("launch", "--name", "r1", "--nodes", "lab0", "--nproc-per-node", "1", "--detach",
        "--script-args", "--steps-per-epoch 1000 --sleep-per-step 0.2", cluster=cluster,
        check=0)
    job_id, _ = only_job(inv.data)
    wait_for(lambda: tagged_pids(job_id), 60)
    # The emergency button, as a user would press it (the shell wrapper over `inv reset`).
    env = dict(os.environ, INVOKE_UGRO_CLUSTER=str(cluster),
               INVOKE_UGRO_DATA_DIR=str(inv.data), PATH=f"{Path(sys.executable).parent}:"
               + os.environ["PATH"])
    r = subprocess.run(["bash", str(ROOT / "tools/reset_cluster.sh")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{job_id}: CANCELLED" in r.stdout
    _, meta = only_job(inv.data)
    assert meta["status"] == "CANCELLED"
    assert tagged_pids(job_id) == []


def test_launch_with_sync_copies_the_code_to_fresh_workers(inv, lab, tmp_path):
    fresh = {n.name: {"project_path": str(tmp_path / f"{n.name}-project")} for n in lab.nodes[:2]}
    cluster = lab.cluster_file(tmp_path / "fresh.yaml", lab.nodes[:2], node_overrides=fresh)
    r = inv("launch", "--name", "synced", "--sync", "--nproc-per-node", "1",
            "--script-args", FAST, cluster=cluster, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "lab1-project/scripts/train_single_test.py").exists()
    assert not (tmp_path / "lab1-project/data/experiments").is_symlink()
    _, meta = only_job(inv.data)
    assert meta["status"] == "COMPLETED"


SPEW = """\
import os
rank = os.environ["RANK"]
for i in range(int(os.environ.get("LINES", "30000"))):
    print(f"spew {rank} {i}")
"""


def test_no_log_line_is_lost_however_fast_the_ranks_print(inv, cluster, lab):
    for node in lab.nodes:
        (node.project / "spew.py").write_text(SPEW)
    r = inv("launch", "--name", "spew", "--nproc-per-node", "1", "--script", "spew.py",
            cluster=cluster, timeout=240)
    assert r.returncode == 0, r.stderr
    job_id, meta = only_job(inv.data)
    seen = {}
    for log in (inv.data / "experiments" / job_id / "logs").glob("*.log"):
        for line in log.read_text().splitlines():
            parts = line.split(" | ", 1)[-1].split()
            if parts[:1] == ["spew"]:
                seen.setdefault(parts[1], set()).add(int(parts[2]))
    assert {rank: len(numbers) for rank, numbers in seen.items()} == {
        "0": 30000, "1": 30000, "2": 30000}
    terminal = [x for x in r.stdout.splitlines() if " | spew " in x]
    assert len(terminal) == 90000
