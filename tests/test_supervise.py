"""The supervisor's failure rules, and who owns a QUEUED job, with the machines faked."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

import pytest
from conftest import ROOT, begun, wait_for

from ugro import blame, procs, schedule
from ugro.blame import lost_a_peer
from ugro.cluster import Session
from ugro.config import parse_cluster
from ugro.jobs import Jobs
from ugro.logs import NodeLog
from ugro.plan import LaunchConfig
from ugro.state import JobStatus, in_queue, watched
from ugro.supervise import (
    ABANDONED,
    GO,
    LET_GO,
    Supervisor,
    standby,
    started,
    supervise,
)

CLUSTER = """
master: {name: a, local: true}
workers:
  - {name: b, ip: 127.0.0.9}
  - {name: c, ip: 127.0.0.10}
"""


class Killer:
    """A backend whose stops are only noted."""

    def __init__(self, schedules: bool = False):
        self.schedules = schedules
        self.stopped: list[list[str]] = []

    def stop(self, nodes, job_id, grace):
        self.stopped.append([n.name for n in nodes])
        return dict.fromkeys((n.name for n in nodes), "stopped")


@pytest.fixture(autouse=True)
def short_cause_wait(monkeypatch):
    """A failure that follows another's waits a moment for the cause; here, a short one."""
    monkeypatch.setattr(blame, "CAUSE_WAIT", 0.2)


def supervisor(tmp_path, schedules=False) -> tuple[Supervisor, Killer]:
    cluster = parse_cluster(CLUSTER, tmp_path / "c.yaml")
    jobs = Jobs(tmp_path / "data")
    job_id = begun(jobs, "exp", nodes="abc")
    jobs.mark_running(job_id, {"a": 1, "b": 2, "c": 3})
    sup = Supervisor(jobs, cluster, job_id)
    sup.schedules = schedules
    return sup, Killer(schedules)


def end(sup: Supervisor, killer: Killer, name: str, code: str) -> None:
    sup._ended(sup.cluster.node(name), code, None, None, killer)


def test_a_node_that_failed_by_itself_takes_the_blame_from_a_killed_one(tmp_path):
    for killed in ("143", "137", "killed"):
        sup, killer = supervisor(tmp_path / killed)
        end(sup, killer, "a", killed)
        end(sup, killer, "b", "1")
        assert (sup.blame.failure.node, sup.blame.failure.exit_code) == ("b", 1)
        assert killer.stopped == [["b", "c"]]  # stopped once, by the first failure read


def test_a_killed_node_never_takes_the_blame(tmp_path):
    sup, killer = supervisor(tmp_path)
    end(sup, killer, "b", "1")
    end(sup, killer, "a", "143")
    end(sup, killer, "c", "killed")
    assert sup.blame.failure.node == "b"
    assert killer.stopped == [["c"], ["a"]]  # the rendezvous host (a) last


def test_the_first_of_two_failures_keeps_the_blame(tmp_path):
    sup, killer = supervisor(tmp_path)
    end(sup, killer, "c", "2")
    end(sup, killer, "a", "1")
    assert sup.blame.failure.node == "c"


def sink(tmp_path, node: str, rank: int, *lines: str) -> NodeLog:
    """A node's log as the supervisor keeps it: a rank's lines, then torchrun's summary."""
    log = NodeLog(tmp_path / f"{node}.log", node)
    log.write("".join(f"[rank{rank}]:{line}\n" for line in lines))
    log.write(f"  rank      : {rank} (local_rank: 0)\n  exitcode  : 1 (pid: 9)\n")
    log.close()
    return log


def test_a_rank_that_lost_its_peers_gives_the_blame_to_the_one_that_crashed(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(blame, "CAUSE_WAIT", 30.0)  # ends when the cause reports
    # gloo's message as torch 2.13 prints it on the ranks that survive a crashed one.
    lost = ("RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection closed by peer "
            "[127.0.0.2]:4105 This is typically caused by a remote worker crashing.")
    sup, killer = supervisor(tmp_path)
    # c is read first; while it waits for the cause, b reports its crash and takes the blame.
    first = threading.Thread(target=sup._ended, args=(
        sup.cluster.node("c"), "1", sink(tmp_path, "c", 2, "Traceback:", lost), None, killer))
    first.start()
    wait_for(lambda: sup.blame.failure is not None, 10)
    assert sup.blame.failure.node == "c"
    sup._ended(sup.cluster.node("b"), "1",
               sink(tmp_path, "b", 1, "crash-at-step: rank 1 exits with status 3"), None, killer)
    first.join()
    assert (sup.blame.failure.node, sup.blame.failure.rank) == ("b", 1)
    assert killer.stopped == [["a"]]  # once, and only what still ran
    # The other way round, the rank that crashed keeps the blame.
    sup, killer = supervisor(tmp_path / "2")
    sup._ended(sup.cluster.node("b"), "1", sink(tmp_path / "2", "b", 1, "ValueError: x"),
               None, killer)
    sup._ended(sup.cluster.node("c"), "1", sink(tmp_path / "2", "c", 2, lost), None, killer)
    assert (sup.blame.failure.node, sup.blame.failure.rank) == ("b", 1)
    assert sup.blame.failure.summary == "b rank 1 failed first (exit code 1): ValueError: x"


def test_only_a_ranks_first_error_decides_whether_it_lost_a_peer():
    lost = "RuntimeError: [pair.cc:534] Connection closed by peer [127.0.0.2]:4105"
    assert lost_a_peer([f"b r1 | {lost}"], "b", 1)
    # A warning about a reset connection before its own error: the rank failed by itself.
    assert not lost_a_peer(["b r1 | hub: Connection reset by peer, retrying",
                            "b r1 | ValueError: bad shape"], "b", 1)
    # Another rank's lost peer says nothing about this one.
    assert not lost_a_peer([f"b r0 | {lost}", "b r1 | ValueError: bad shape"], "b", 1)


def test_a_node_that_does_not_answer_a_stop_does_not_hold_up_the_host(tmp_path):
    sup, _ = supervisor(tmp_path)
    sup.grace = 0.1
    release = threading.Event()

    class Hung(Killer):
        def stop(self, nodes, job_id, grace):
            super().stop(nodes, job_id, grace)
            if [n.name for n in nodes] == ["b"]:
                release.wait(30)  # b's sshd hangs
            return {}

    killer = Hung()
    stopper = threading.Thread(target=sup._stop_host_last,
                               args=(killer, [sup.cluster.node("b"), sup.cluster.node("a")]))
    stopper.start()
    wait_for(lambda: killer.stopped == [["b"], ["a"]], 10)  # a, the host, stopped meanwhile
    release.set()
    stopper.join()


def test_a_node_where_the_job_never_started_is_named_as_such(tmp_path):
    sup, killer = supervisor(tmp_path)
    end(sup, killer, "a", "0")
    end(sup, killer, "c", "missing")
    assert sup.blame.failure.summary == "the job never started on c"
    assert killer.stopped == [["b"]]


def test_a_scheduler_run_job_leaves_stopping_the_others_to_the_scheduler(tmp_path):
    sup, killer = supervisor(tmp_path, schedules=True)
    end(sup, killer, "a", "143")
    end(sup, killer, "b", "1")
    assert sup.blame.failure.node == "b" and killer.stopped == []


def test_a_slurm_job_is_queued_by_slurm_not_by_the_ugro_queue(tmp_path):
    jobs = Jobs(tmp_path)
    slurm_job = jobs.create("on-slurm")
    jobs.submitted(slurm_job, "on-slurm", cluster_file="s.yaml", world_size=2,
                   slurm={"job_id": "7", "nodes": 2, "nproc": 1})
    ours = jobs.create("here")
    jobs.enqueue(ours, "here", cluster_file="c.yaml", queue={
        "queued_at": "2024-01-01T00:00:00+00:00", "priority": 0,
        "request": {"pool": ["a"], "count": 1, "min_gpu_mem_mib": None}, "after": []})
    assert not in_queue(jobs.metadata(slurm_job)) and in_queue(jobs.metadata(ours))
    # Its supervisor waits (and `inv status` restarts a dead one); the queue's job has none yet.
    assert watched(jobs.metadata(slurm_job)) and not watched(jobs.metadata(ours))
    assert [w.job_id for w in schedule.queued(jobs)] == [ours]
    assert set(jobs.active()) == {slurm_job, ours}


def test_allocated_only_while_queued(tmp_path):
    jobs = Jobs(tmp_path)
    job_id = jobs.create("on-slurm")
    jobs.submitted(job_id, "on-slurm", cluster_file="s.yaml", world_size=2,
                   slurm={"job_id": "7", "nodes": 2, "nproc": 1})
    jobs.finish(job_id, JobStatus.CANCELLED, error="cancelled by user")
    meta = jobs.mark_allocated(job_id, {"n1": {"node_rank": 0, "nproc": 1}},
                               slurm={"state": "RUNNING", "reason": None})
    assert meta["status"] == "CANCELLED" and meta["nodes"] == {}


def pending(tmp_path) -> tuple[Jobs, str]:
    jobs = Jobs(tmp_path / "data")
    return jobs, begun(jobs, "exp")


def test_a_launch_that_died_before_recording_the_start_hands_the_job_over(tmp_path):
    jobs, job_id = pending(tmp_path)
    # The launcher is not this process's parent any more: it is gone.
    assert started(jobs, job_id, launcher=os.getppid() + 1, settle=0)
    assert jobs.metadata(job_id)["status"] == JobStatus.RUNNING


def test_a_start_the_launch_recorded_as_failed_is_not_supervised(tmp_path):
    jobs, job_id = pending(tmp_path)
    jobs.finish(job_id, JobStatus.FAILED, error="start failed: b: no route")
    assert not started(jobs, job_id, launcher=os.getppid())
    assert jobs.metadata(job_id)["status"] == JobStatus.FAILED


def standing_by(tmp_path, monkeypatch, record=None) -> tuple[Jobs, str]:
    """A launch's job directory, with `record` as its record (or none), and the supervisor's
    stdin closed: the launch has let go."""
    jobs = Jobs(tmp_path / "data")
    if record is None:
        job_id = jobs.create("exp")
    else:
        job_id = begun(jobs, "exp", nodes="ab")
        record(jobs, job_id)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    return jobs, job_id


def test_a_standby_supervisor_of_a_launch_that_recorded_nothing_removes_its_directory(
        tmp_path, monkeypatch):
    """...only when the launch died: one that let go (refused) removed it itself, and the
    id may be another launch's again by the time the supervisor looks."""
    jobs, job_id = standing_by(tmp_path, monkeypatch)
    cluster = parse_cluster(CLUSTER, tmp_path / "c.yaml")
    assert standby(jobs, job_id, Session(cluster), []) is None
    assert not jobs.dir(job_id).exists()
    job_id = jobs.create("exp")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(GO)))
    assert standby(jobs, job_id, Session(cluster), []) is None
    assert jobs.dir(job_id).exists()


def test_a_standby_supervisor_supervises_a_started_job_and_leaves_a_queued_one(
        tmp_path, monkeypatch):
    cluster = parse_cluster(CLUSTER, tmp_path / "c.yaml")
    jobs, job_id = standing_by(tmp_path, monkeypatch,
                               lambda jobs, j: jobs.mark_running(j, {"a": 1, "b": 2}))
    assert standby(jobs, job_id, Session(cluster), ["a", "not-in-the-cluster"]) == ABANDONED
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(GO)))
    assert standby(jobs, job_id, Session(cluster), []) == LET_GO
    # A queued job whose start was put off stays the queue's.
    queued = Jobs(tmp_path / "q")
    later = LaunchConfig(name="later", script="train.py", nodes="a")
    job_id = schedule.enqueue(queued, cluster, later, tmp_path)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert standby(queued, job_id, Session(cluster), ["a"]) is None
    assert in_queue(queued.metadata(job_id))


FORKED = """
import os, sys
from pathlib import Path
from ugro.config import parse_cluster
from ugro.jobs import Jobs
from ugro.lifecycle import Standby
tmp, how = Path(sys.argv[1]), sys.argv[2]
cluster = parse_cluster("master: {name: a, local: true}", tmp / "c.yaml")
jobs = Jobs(tmp / "data")
job_id = jobs.create("exp")
print("before the fork;", end="")
standby = Standby(jobs, cluster, job_id, cluster.select(None), fork=True)
print(f" {standby.pid} {standby.started} {job_id}", flush=True)
if how == "refused":  # the launch removes the directory, and the id is taken again at once
    jobs.discard(job_id)
    jobs.dir(job_id).mkdir()
    standby.release()
else:  # killed before it recorded anything: no word to the supervisor
    os._exit(0)
"""


@pytest.mark.parametrize("how", ["refused", "died"])
def test_a_launch_forks_its_supervisor_which_leaves_only_what_it_must(tmp_path, how):
    """A launch's supervisor is its own process forked (no command line of its own), on
    standby until the launch lets go. Refused, it exits and leaves the directory to the launch
    (whose id another launch may hold again by then); the launch dead, it removes the
    directory the launch left without a record."""
    p = subprocess.run([sys.executable, "-c", FORKED, str(tmp_path), how], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    said, rest = p.stdout.split(";")
    assert said == "before the fork"  # printed once: the child does not print it again
    pid, started, job_id = rest.split()
    pid, started = int(pid), int(started)
    wait_for(lambda: procs.start_time(pid) != started or procs.state(pid) == "Z", 20)
    assert (tmp_path / "data" / "experiments" / job_id).exists() is (how == "refused")


def test_a_queued_job_whose_pass_died_before_starting_it_goes_back_in_the_queue(
        tmp_path, monkeypatch):
    """A pass claims a queued job (PENDING) and is killed before any node starts it: the
    job's supervisor, on standby, puts it back in the queue instead of failing it."""
    (tmp_path / "proj").mkdir()
    cluster = parse_cluster(
        f"master: {{name: a, local: true, project_path: '{tmp_path / 'proj'}'}}",
        tmp_path / "c.yaml")
    jobs = Jobs(tmp_path / "data")
    job_id = schedule.enqueue(jobs, cluster, LaunchConfig(name="q", script="train.py",
                                                          nodes="a"), tmp_path)
    jobs.begin(job_id, "q", cluster_file="c.yaml", world_size=1, master="127.0.0.1:29500",
               nodes={"a": {"node_rank": 0, "nproc": 1}})
    monkeypatch.setattr("ugro.supervise.SETTLE", 0.1)
    monkeypatch.setattr("ugro.supervise._queue_pass", lambda jobs, cluster: passes.append(1))
    passes = []
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))  # no word: it died
    assert supervise(jobs, cluster, job_id, standby_for=["a"]) == 0
    meta = jobs.metadata(job_id)
    assert in_queue(meta) and meta["queue"]["reason"].startswith("put back"), meta
    assert passes == [1]  # and the queue moves on: nothing else may run a pass soon
    assert "supervisor_pid" not in meta


def test_a_claimed_job_that_a_node_started_or_a_cancel_ended_is_not_put_back(tmp_path):
    (tmp_path / "proj").mkdir()
    cluster = parse_cluster(
        f"master: {{name: a, local: true, project_path: '{tmp_path / 'proj'}'}}",
        tmp_path / "c.yaml")
    jobs = Jobs(tmp_path / "data")
    claimed = []
    for name in ("started", "cancelled"):
        job_id = schedule.enqueue(jobs, cluster, LaunchConfig(name=name, script="train.py",
                                                              nodes="a"), tmp_path)
        claimed.append(jobs.begin(job_id, name, cluster_file="c.yaml", world_size=1,
                                  master="127.0.0.1:29500",
                                  nodes={"a": {"node_rank": 0, "nproc": 1}}))
    started_here = tmp_path / "proj" / "data" / "experiments" / claimed[0]["job_id"] / "nodes/a"
    started_here.mkdir(parents=True)
    (started_here / "pgid").write_text("999999\n")  # its start reached the node
    assert schedule.put_back(jobs, cluster, claimed[0]) is False
    assert jobs.status(claimed[0]["job_id"]) is JobStatus.PENDING
    job_id = claimed[1]["job_id"]
    jobs.finish(job_id, JobStatus.CANCELLED, error="cancelled by user")
    assert schedule.put_back(jobs, cluster, claimed[1]) is False  # asked before the cancel
    assert jobs.status(job_id) is JobStatus.CANCELLED
