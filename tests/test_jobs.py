"""Job records: transitions, finding jobs, and what holds a node (fast: no SSH, no torch)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
from conftest import begun

from ugro.config import parse_cluster
from ugro.errors import UgroError
from ugro.jobs import Jobs
from ugro.lifecycle import busy_nodes
from ugro.plan import pick_port
from ugro.state import JobStatus, NodeStatus

CLUSTER = """
master: {name: a, local: true}
workers:
  - {name: b, ip: 127.0.0.9}
  - {name: c, ip: 127.0.0.10}
"""


def test_states_answer_questions():
    assert JobStatus.RUNNING.is_active() and not JobStatus.RUNNING.is_terminal()
    assert JobStatus.CANCELLED.is_terminal()
    assert JobStatus.parse("RUNNING") is JobStatus.RUNNING
    assert JobStatus.parse("nonsense") is None and JobStatus.parse(None) is None
    assert json.dumps({"s": JobStatus.FAILED}) == '{"s": "FAILED"}'
    assert f"{JobStatus.FAILED}" == "FAILED" and str(NodeStatus.START_FAILED) == "failed to start"


def test_transitions_write_the_record(tmp_path):
    jobs = Jobs(tmp_path)
    job_id = begun(jobs, "exp")
    assert jobs.status(job_id) is JobStatus.PENDING
    meta = jobs.mark_running(job_id, {"a": 100, "b": 200})
    assert meta["status"] == "RUNNING" and meta["nodes"]["b"]["pgid"] == 200
    meta = jobs.finish(job_id, JobStatus.COMPLETED, nodes={"a": {"exit_code": 0}})
    assert meta["status"] == "COMPLETED" and meta["ended_at"]
    # A second finisher adds its node facts but never changes the outcome.
    meta = jobs.finish(job_id, JobStatus.FAILED, error="late", nodes={"b": {"exit_code": 1}})
    assert meta["status"] == "COMPLETED" and "error" not in meta
    assert meta["nodes"]["b"]["exit_code"] == 1
    assert len(jobs.history.read_text().splitlines()) == 1


def _finish(data_dir, job_id, status, node):
    Jobs(data_dir).finish(job_id, JobStatus(status), nodes={node: {"seen": True}})


def test_two_concurrent_finishers_one_outcome_one_history_line(tmp_path):
    jobs = Jobs(tmp_path)
    for round_ in range(5):
        job_id = begun(jobs, f"race{round_}")
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_finish, args=(tmp_path, job_id, status, node))
                 for status, node in (("CANCELLED", "a"), ("FAILED", "b"))]
        for p in procs:
            p.start()
        for p in procs:
            p.join(10)
        meta = jobs.metadata(job_id)
        assert meta["status"] in ("CANCELLED", "FAILED")
        assert meta["nodes"]["a"]["seen"] and meta["nodes"]["b"]["seen"]
    lines = [json.loads(x) for x in jobs.history.read_text().splitlines()]
    assert sorted(x["name"] for x in lines) == [f"race{i}" for i in range(5)]


def test_find_by_id_name_prefix_and_hint(tmp_path):
    jobs = Jobs(tmp_path)
    first = begun(jobs, "exp1")
    begun(jobs, "other")
    assert jobs.find(first) == first
    assert jobs.find("exp1") == first
    assert jobs.find("oth").startswith("other_")
    with pytest.raises(UgroError, match="did you mean: exp1"):
        jobs.find("exp2")
    with pytest.raises(UgroError, match="invalid job name"):
        jobs.find("../x")


def test_pick_port_next_free_and_refuse():
    assert pick_port(set(), 29500, "next-free", "n") == 29500
    assert pick_port({29500, 29501}, 29500, "next-free", "n") == 29502
    with pytest.raises(UgroError, match="master port 29500 is busy on n"):
        pick_port({29500}, 29500, "refuse", "n")
    with pytest.raises(UgroError, match="no free port"):
        pick_port(set(range(29500, 29600)), 29500, "next-free", "n")


def test_busy_nodes_names_the_job_holding_them(tmp_path):
    cluster = parse_cluster(CLUSTER, tmp_path / "c.yaml")
    jobs = Jobs(tmp_path)
    holder = begun(jobs, "holder", ("a", "b"))
    jobs.mark_running(holder, {"a": 1, "b": 2})
    done = begun(jobs, "done", ("c",))
    jobs.finish(done, JobStatus.COMPLETED)
    # A live supervisor for `holder`: nothing needs reconciling, so no node is asked.
    sup = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                            "ugro.supervise", holder])
    try:
        jobs.set_supervisor(holder, sup.pid)
        nodes = cluster.select("b,c")
        assert busy_nodes(jobs, cluster, nodes) == [f"{holder} (RUNNING on b)"]
        assert busy_nodes(jobs, cluster, cluster.select("c")) == []
    finally:
        sup.kill()
        sup.wait()


def test_a_supervisor_is_known_by_its_pid_and_start_time(tmp_path):
    """A launch's supervisor is the launch's process forked: its command line says `inv
    launch`, so the record names it by pid and start time, which a reused pid does not
    repeat."""
    from ugro import procs
    from ugro.lifecycle import supervisor_alive

    jobs = Jobs(tmp_path)
    job_id = begun(jobs, "sup", ("a",))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = procs.start_time(proc.pid)
        assert isinstance(started, int) and started >= procs.start_time(os.getpid())
        assert supervisor_alive(jobs.set_supervisor(job_id, proc.pid, started))
        assert not supervisor_alive(jobs.set_supervisor(job_id, proc.pid, started - 1))
        # No start time recorded (an older record): the command line must say what it is.
        assert not supervisor_alive(jobs.set_supervisor(job_id, proc.pid))
    finally:
        proc.kill()
        proc.wait()
    assert procs.start_time(proc.pid) is None
    assert not supervisor_alive(jobs.set_supervisor(job_id, proc.pid, started))


DAMAGED = {"list": "[]", "null": "null", "no nodes": '{"job_id": "x", "name": "x", "status": '
           '"RUNNING"}', "torn": '{"job_id": "x", "na', "bad status": '{"job_id": "x", "name": '
           '"x", "status": 7, "nodes": {}}'}


@pytest.mark.parametrize("text", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_record_holds_its_nodes_with_a_note_naming_the_file(tmp_path, text):
    cluster = parse_cluster(CLUSTER, tmp_path / "c.yaml")
    jobs = Jobs(tmp_path)
    broken = begun(jobs, "broken", ("a", "b"))
    (jobs.dir(broken) / "config.json").write_text(json.dumps({"nodes": {"b": {}}}))
    (jobs.dir(broken) / "metadata.json").write_text(text)
    (jobs.history).write_text('{"job_id": "old", "status": "COMPL\n')  # a torn history line
    assert jobs.active() == [broken]
    (held,) = busy_nodes(jobs, cluster, cluster.select("b,c"))
    assert held.startswith(f"{broken} (on b; its record is damaged: ") and "metadata.json" in held
    assert busy_nodes(jobs, cluster, cluster.select("c")) == []
    # Once its history line says it ended, the damage frees nothing it held and blocks nothing.
    jobs.history.write_text(json.dumps({"job_id": broken}) + "\n")
    assert jobs.active() == [] and busy_nodes(jobs, cluster, cluster.select("b")) == []


def test_cancel_is_cancelled_only_when_every_node_confirmed(tmp_path):
    jobs = Jobs(tmp_path)
    job_id = begun(jobs, "c", ("a", "b"))
    jobs.mark_running(job_id, {"a": 1, "b": 2})
    jobs.request_cancel(job_id, "cancelled by user")
    meta = jobs.cancel_outcome(job_id, {"a": "stopped", "b": "b: no answer within 5s"},
                               "cancelled by user")
    assert meta["status"] == JobStatus.CANCELLING and meta["status"].is_active()
    assert meta["error"] == "cancel pending on b (b: no answer within 5s)"
    assert meta["nodes"]["b"]["status"] == NodeStatus.CANCEL_PENDING
    assert job_id in jobs.active() and not jobs.history.exists()
    meta = jobs.cancel_outcome(job_id, {"b": "stopped"}, "cancelled by user")
    assert meta["status"] == "CANCELLED" and meta["error"] == "cancelled by user"
    assert {f["status"] for f in meta["nodes"].values()} == {"cancelled"}
    assert jobs.active() == [] and len(jobs.history.read_text().splitlines()) == 1


def test_a_lost_node_holds_its_node_after_the_job_failed(tmp_path):
    from ugro.state import holds_nodes

    jobs = Jobs(tmp_path)
    job_id = begun(jobs, "l", ("a", "b"))
    meta = jobs.finish(job_id, JobStatus.FAILED, error="lost contact with b",
                       nodes={"b": {"status": NodeStatus.LOST}})
    assert holds_nodes(meta) and jobs.active() == [job_id]
    meta = jobs.note_nodes(job_id, {"b": {"status": NodeStatus.FAILED, "stop": "stopped"}})
    assert not holds_nodes(meta) and jobs.active() == []


def test_detached_wait_reads_the_ranks_the_supervisor_recorded(tmp_path):
    from ugro import lifecycle

    jobs = Jobs(tmp_path)
    job_id = begun(jobs, "d", ("a", "b"))
    jobs.mark_running(job_id, {"a": 1, "b": 2})
    jobs.set_supervisor(job_id, os.getpid())  # not a supervisor: gone, as far as it can tell
    t0 = time.monotonic()
    assert lifecycle.wait_for_ranks(jobs, job_id, poll=0.01, gone_after=0.2) == {
        "a": "0/1 ranks when its supervisor stopped (see: inv status)",
        "b": "0/1 ranks when its supervisor stopped (see: inv status)"}
    assert time.monotonic() - t0 < 5

    # What the supervisor records as each node's stream says torchrun started its ranks.
    threading.Timer(0.3, lambda: jobs.note_nodes(job_id, {"a": {"ranks": 1},
                                                         "b": {"ranks": 1}})).start()
    assert lifecycle.wait_for_ranks(jobs, job_id, poll=0.01, gone_after=30) == {
        "a": "1/1 ranks", "b": "1/1 ranks"}

    jobs.note_nodes(job_id, {"b": {"ranks": 0}})
    jobs.finish(job_id, JobStatus.FAILED, error="two control nodes launched at once")
    assert lifecycle.wait_for_ranks(jobs, job_id, poll=0.01) == {
        "a": "1/1 ranks", "b": "never ran all its ranks (job FAILED)"}


def test_bad_names_and_node_lists_are_one_clear_line(tmp_path):
    from ugro.jobs import validate_name

    with pytest.raises(UgroError, match="invalid job name '-rf'"):
        validate_name("-rf")
    cluster = parse_cluster(CLUSTER, tmp_path / "c.yaml")
    with pytest.raises(UgroError, match="--nodes ',': no node names"):
        cluster.select(",")


def test_a_failed_write_names_the_path(tmp_path):
    from ugro import store

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        target = ro / "sub" / "x.json"
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a read-only directory is writable")
        with pytest.raises(store.WriteError, match=f"cannot write {target}: Permission denied"):
            store.write_json(target, {})
    finally:
        ro.chmod(0o700)


def test_active_jobs_are_found_without_reading_the_records_of_jobs_that_let_go(tmp_path):
    jobs = Jobs(tmp_path)
    done = begun(jobs, "done")
    jobs.mark_running(done, {"a": 1, "b": 2})
    jobs.finish(done, JobStatus.COMPLETED)
    lost = begun(jobs, "lost")
    jobs.mark_running(lost, {"a": 1, "b": 2})
    jobs.finish(lost, JobStatus.FAILED, nodes={"b": {"status": NodeStatus.LOST}})
    running = begun(jobs, "running")
    lines = {e["job_id"]: e for e in map(json.loads, jobs.history.read_text().splitlines())}
    assert lines[done]["holds"] is False and lines[lost]["holds"] is True
    assert jobs.released() == {done}
    # A released job's record is never read: even unreadable, it holds nothing.
    (jobs.dir(done) / "metadata.json").write_text("{torn")
    assert sorted(jobs.active()) == sorted([lost, running])
    # A job that ended holding a node is read each time, and lets go once the node is stopped.
    jobs.note_nodes(lost, {"b": {"status": NodeStatus.FAILED, "stop": "stopped"}})
    assert jobs.active() == [running]
    # A history line from before `holds` was kept releases nothing: that record is read.
    legacy = begun(jobs, "legacy")
    jobs.history.open("a").write(json.dumps({"job_id": legacy, "status": "COMPLETED"}) + "\n")
    assert legacy in jobs.active()


def test_json_lines_parses_whole_and_finds_the_bad_lines():
    from ugro.store import json_lines

    assert json_lines('{"a": 1}\n\n[2]\n') == ([(1, {"a": 1}), (3, [2])], [])
    assert json_lines('{"a": 1}\n{"b": \n3\n') == ([(1, {"a": 1}), (3, 3)], [2])
    assert json_lines('1, 2\n') == ([], [1])  # two values on one line is not one line's value


def test_ids_newest_first_skipping_half_made_directories_unless_known(tmp_path):
    jobs = Jobs(tmp_path)
    older = jobs.create("a", when=datetime(2026, 1, 1, 9, 0, 0))
    jobs.begin(older, "a", cluster_file="c.yaml", world_size=1, master="x:1",
               nodes={"a": {"node_rank": 0, "nproc": 1}})
    newer = begun(jobs, "b")
    (jobs.root / "c_20260101_100000").mkdir()  # a launch that has not written its record yet
    assert jobs.ids() == [newer, older]
    assert jobs.ids(skip={newer}) == [older]
    # A job in the history has a record: it is taken without a look at its files.
    assert jobs.ids(known={"c_20260101_100000"}) == [newer, "c_20260101_100000", older]
