"""The queue's decisions, without SSH: order, backfill, dependencies, reasons, requests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ugro import render, views
from ugro.config import Cluster, Node
from ugro.errors import UgroError
from ugro.health import Gpu, NodeHealth
from ugro.jobs import Jobs
from ugro.plan import LaunchConfig
from ugro.schedule import Request, Waiting, decide, in_order, parse_mem, resolve
from ugro.state import JobStatus

C, R, F, X = JobStatus.COMPLETED, JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED
ALL = ("gpu1", "gpu2", "gpu3")


def job(name, pool=ALL, count=None, priority=0, at="2026-12-01T20:00", after=(), mem=None):
    return Waiting(f"{name}_id", name, priority, at, Request(tuple(pool), count or len(pool), mem),
                   tuple(after))


def test_jobs_needing_the_same_nodes_start_one_at_a_time_oldest_first():
    queue = [job("b", at="2026-12-01T20:02"), job("a", at="2026-12-01T20:01")]
    d = decide(queue, {}, {}, {})
    assert d.starts == {"a_id": ALL}
    assert d.waits == {"b_id": "nodes busy: gpu1 held by a, gpu2 held by a, gpu3 held by a"}


def test_higher_priority_goes_first_whatever_its_age():
    queue = [job("old", at="2026-12-01T20:00"), job("urgent", priority=5, at="2026-12-01T22:00")]
    assert [w.name for w in in_order(queue)] == ["urgent", "old"]
    assert decide(queue, {}, {}, {}).starts == {"urgent_id": ALL}


def test_backfill_uses_only_nodes_the_head_job_cannot_use():
    head = job("head", pool=("gpu1", "gpu2"), priority=1)
    on_head_nodes = job("small", pool=("gpu2",), at="2026-12-01T20:01")
    elsewhere = job("other", pool=("gpu3",), at="2026-12-01T20:02")
    d = decide([head, on_head_nodes, elsewhere], {"gpu1": "exp3"}, {}, {})
    assert d.starts == {"other_id": ("gpu3",)}  # gpu2 is free, but kept for the head job
    assert d.waits["head_id"] == "nodes busy: gpu1 held by exp3"
    assert d.waits["small_id"] == "gpu2 kept for head (ahead in the queue)"


def test_any_k_takes_free_healthy_nodes_in_rank_order():
    d = decide([job("k", count=2)], {"gpu1": "exp3"}, {}, {})
    assert d.starts == {"k_id": ("gpu2", "gpu3")}
    d = decide([job("k", count=2)], {"gpu1": "exp3"}, {"gpu3": "unreachable (refused)"}, {})
    assert d.waits == {"k_id": "needs 2 of 3 nodes, 1 free: nodes busy: gpu1 held by exp3; "
                               "gpu3 unreachable (refused)"}


def test_an_unhealthy_node_keeps_its_job_queued_with_the_reason():
    d = decide([job("a", pool=("gpu2",))], {}, {"gpu2": "unreachable (connection refused)"}, {})
    assert d.starts == {} and d.cancels == {}
    assert d.waits == {"a_id": "gpu2 unreachable (connection refused)"}


def test_memory_requests_say_no_node_has_the_memory_free():
    d = decide([job("big", pool=("gpu1",), count=1, mem=10240)], {"gpu1": "exp3"}, {}, {})
    assert d.waits == {"big_id": "no node has 10 GiB GPUs free: nodes busy: gpu1 held by exp3"}


def test_after_waits_for_completion_and_a_failure_cancels_the_chain():
    first = job("b", after=("a_id",))
    second = job("c", after=("b_id",), priority=9)  # ahead of its predecessor in the queue
    d = decide([first, second], {}, {}, {"a_id": ("a", R), "b_id": ("b", JobStatus.QUEUED)})
    assert d.waits == {"c_id": "after b (QUEUED)", "b_id": "after a (RUNNING)"}
    assert d.starts == {}
    d = decide([first, second], {}, {}, {"a_id": ("a", C), "b_id": ("b", JobStatus.QUEUED)})
    assert d.starts == {"b_id": ALL}
    d = decide([first, second], {}, {}, {"a_id": ("a", F), "b_id": ("b", JobStatus.QUEUED)})
    assert d.cancels == {"b_id": "after a: it ended FAILED", "c_id": "after b: it ended CANCELLED"}
    assert d.starts == {} and d.waits == {}


def test_a_waiting_dependent_keeps_no_nodes():
    d = decide([job("dep", after=("a_id",), priority=9), job("free", pool=("gpu3",))], {}, {},
               {"a_id": ("a", X)})
    assert d.cancels == {"dep_id": "after a: it ended CANCELLED"}
    assert d.starts == {"free_id": ("gpu3",)}


@pytest.mark.parametrize("text,mib", [("10G", 10240), ("10GB", 10240), ("10 GiB", 10240),
                                      ("9500M", 9500), ("8188", 8188), ("1.5g", 1536)])
def test_parse_mem(text, mib):
    assert parse_mem(text) == mib


@pytest.mark.parametrize("text", ["", "ten", "-1G", "0", "10T", "10G;rm"])
def test_parse_mem_refuses_garbage_in_one_line(text):
    with pytest.raises(UgroError, match="--min-gpu-mem"):
        parse_mem(text)


def lab_cluster() -> Cluster:
    nodes = tuple(Node(n, f"127.0.0.{i + 2}", "me", gpus=g, rank=i)
                  for i, (n, g) in enumerate((("lab0", 1), ("lab1", 2), ("lab2", 0))))
    return Cluster("lab", Path("lab.yaml"), nodes, nodes[0])


def report(node, *mib, answered=True):
    gpus = [Gpu(i, "GPU", m, 0, 0, 30, "550") for i, m in enumerate(mib)]
    return NodeHealth(node, node, answered, gpus=gpus, hostname=node if answered else None)


REPORTS = [report("lab0", 8188), report("lab1", 24576, 24576), report("lab2")]


def cfg(**kw):
    return LaunchConfig(name="exp", script="scripts/train_single_test.py", queue=True, **kw)


def test_min_gpu_mem_places_on_the_nodes_that_have_it():
    req = resolve(lab_cluster(), cfg(min_gpu_mem="10G"), REPORTS)
    assert req == Request(("lab1",), 1, 10240)
    assert req.text() == "lab1 with >= 10 GiB GPUs"
    assert resolve(lab_cluster(), cfg(min_gpu_mem="8000M"), REPORTS).pool == ("lab0", "lab1")


def test_min_gpu_mem_no_node_can_ever_satisfy_is_refused_at_once():
    with pytest.raises(UgroError) as e:
        resolve(lab_cluster(), cfg(min_gpu_mem="30G"), REPORTS)
    assert str(e.value) == ("--min-gpu-mem 30G: no node has GPUs with 30 GiB "
                            "(lab0: 8188 MiB, lab1: 24576 MiB, lab2: no GPU)")
    with pytest.raises(UgroError, match="no chosen node"):
        resolve(lab_cluster(), cfg(min_gpu_mem="10G", nodes="lab0,lab1"), REPORTS)
    unreachable = [report("lab0", answered=False)] + REPORTS[1:]
    with pytest.raises(UgroError, match="lab0: unknown"):
        resolve(lab_cluster(), cfg(min_gpu_mem="30G"), unreachable)


def test_num_nodes_requests():
    assert resolve(lab_cluster(), cfg(num_nodes=2)) == Request(("lab0", "lab1", "lab2"), 2)
    assert resolve(lab_cluster(), cfg(nodes="lab2,lab0")) == Request(("lab0", "lab2"), 2)
    with pytest.raises(UgroError, match="only 3 node"):
        resolve(lab_cluster(), cfg(num_nodes=4))
    with pytest.raises(UgroError, match="give one of them"):
        resolve(lab_cluster(), cfg(num_nodes=1, nodes="lab0"))


def test_a_queued_record_keeps_its_queue_facts_when_it_starts(tmp_path):
    jobs = Jobs(tmp_path)
    job_id = jobs.create("exp")
    jobs.enqueue(job_id, "exp", cluster_file="lab.yaml", queue={"priority": 2, "reason": "x"})
    created = jobs.metadata(job_id)["created_at"]
    assert jobs.status(job_id) is JobStatus.QUEUED
    assert JobStatus.QUEUED.is_active() and not JobStatus.QUEUED.holds_nodes()
    jobs.begin(job_id, "exp", cluster_file="lab.yaml", world_size=1, master="h:1",
               nodes={"lab0": {"node_rank": 0, "nproc": 1}})
    meta = jobs.metadata(job_id)
    assert meta["status"] == "PENDING" and meta["created_at"] == created
    assert meta["queue"]["priority"] == 2
    meta = jobs.requeue(job_id, "put back")
    assert meta["status"] == "QUEUED" and meta["nodes"] == {}
    assert meta["queue"]["reason"] == "put back"


def test_queue_view_lists_in_start_order_with_reasons():
    now = datetime(2026, 12, 1, 21, 0, tzinfo=timezone.utc)
    meta = [
        {"job_id": j, "name": j, "status": "QUEUED", "nodes": {}, "queue": {
            "priority": p, "queued_at": (now - timedelta(minutes=m)).isoformat(),
            "request_text": "lab0,lab1", "reason": why, "since": now.isoformat()}}
        for j, p, m, why in (("b", 0, 5, "nodes busy: lab0 held by a"),
                             ("c", 3, 1, "after a (RUNNING)"))
    ] + [{"job_id": "a", "status": "RUNNING", "nodes": {"lab0": {}}}]
    rows = views.queue(meta, now)
    assert [(r["position"], r["job_id"], r["waiting_s"]) for r in rows] == [
        (1, "c", 60.0), (2, "b", 300.0)]
    text = render.queue_text(rows)
    assert "after a (RUNNING) (since" in text and "5m 00s" in text
    assert render.queue_text([]) == "the queue is empty"
