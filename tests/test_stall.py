"""Stall detection without SSH: the duration option, the flag on a record, the supervisor's
decision over fake output clocks, and what status, jobs and the monitor show of it. Also
`inv status` answering from a fresh monitor sample."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ugro import records, render, views
from ugro.config import Cluster, Node
from ugro.errors import UgroError
from ugro.jobs import Jobs
from ugro.monitor import status as monitor_status
from ugro.monitor.exporter import registry
from ugro.monitor.exporter import render as exposition
from ugro.monitor.sample import GpuSample, NodeSample
from ugro.monitor.series import Series, db_path
from ugro.plan import STALL_AFTER, LaunchConfig, parse_duration
from ugro.state import JobStatus, NodeState, holds_nodes, is_active, is_stalled
from ugro.supervise import Supervisor


# -- the option ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [
    ("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0), ("45", 45.0), (" 3s ", 3.0), ("0.5", 0.5),
    (".5m", 30.0), (120, 120.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration("stall-after", text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "0", "0s", "-5s", "10d", "nan", "inf", "1e3",
                                  "5 m s", "8d", "169h", "10m;rm"])
def test_parse_duration_refuses_in_one_line(text):
    with pytest.raises(UgroError) as exc:
        parse_duration("stall-after", text)
    message = str(exc.value)
    assert message.startswith("--stall-after: expected a duration such as 90s, 10m or 1h")
    assert repr(text) in message and "\n" not in message


def test_launch_config_carries_the_stall_settings():
    cfg = LaunchConfig.from_options({}, {}, name="a")
    assert (cfg.stall_after, cfg.on_stall) == (STALL_AFTER, "flag") == (600.0, "flag")
    cfg = LaunchConfig.from_options({"stall_after": "5m", "on_stall": "cancel"}, {}, name="a")
    assert (cfg.stall_after, cfg.on_stall) == (300.0, "cancel")
    cfg = LaunchConfig.from_options({"stall_after": "5m"}, {}, name="a", stall_after="90s",
                                    on_stall="flag")
    assert (cfg.stall_after, cfg.on_stall) == (90.0, "flag")
    with pytest.raises(UgroError, match=r"^--on-stall: expected flag or cancel, got 'kill'$"):
        LaunchConfig.from_options({}, {}, name="a", on_stall="kill")
    with pytest.raises(UgroError, match="--stall-after"):
        LaunchConfig(name="a", script="t.py", stall_after=float("nan"))


# -- the flag on a record -------------------------------------------------------------------
def test_a_stall_is_a_flag_on_a_running_job():
    running = {"status": "RUNNING", "nodes": {}}
    stalled = {**running, "stalled_since": "2026-03-01T11:00:00+00:00"}
    assert not is_stalled(running) and is_stalled(stalled)
    # Still a running job: active, holding its nodes, and so reconciled and queued around.
    assert is_active(stalled["status"]) and holds_nodes(stalled)
    assert JobStatus.parse(stalled["status"]) is JobStatus.RUNNING
    # An ended job keeps when it went silent, but is no longer shown stalled.
    assert not is_stalled({**stalled, "status": "FAILED"})
    assert not is_stalled({**stalled, "status": "CANCELLING"})
    assert not is_stalled(None) and not is_stalled([])


def record(jobs: Jobs, job_id: str, status="RUNNING", launch=None, nodes=("lab0", "lab1")):
    d = jobs.dir(job_id)
    (d / "logs").mkdir(parents=True)
    meta = {"job_id": job_id, "name": job_id.split("_")[0], "status": status,
            "created_at": "2026-03-01T11:00:00+00:00", "started_at": "2026-03-01T11:00:00+00:00",
            "ended_at": None, "world_size": len(nodes),
            "nodes": {n: {"node_rank": i, "nproc": 1, "status": "running"}
                      for i, n in enumerate(nodes)}}
    (d / "metadata.json").write_text(json.dumps(meta))
    (d / "config.json").write_text(json.dumps({"launch": launch or {}}))
    return d


def test_mark_and_clear_stalled(tmp_path):
    jobs = Jobs(tmp_path)
    record(jobs, "a_20260301_110000")
    meta = jobs.mark_stalled("a_20260301_110000", "2026-03-01T11:05:00+00:00")
    assert meta["stalled_since"] == "2026-03-01T11:05:00+00:00" and is_stalled(meta)
    meta = jobs.clear_stalled("a_20260301_110000")
    assert "stalled_since" not in meta and meta["status"] == "RUNNING"
    # A job that ended meanwhile is not flagged after the fact.
    record(jobs, "b_20260301_110000", status="COMPLETED")
    assert "stalled_since" not in jobs.mark_stalled("b_20260301_110000", "x")


# -- the supervisor's decision ----------------------------------------------------------------
class FakeSink:
    def __init__(self, last_data: float):
        self.last_data = last_data


class FakeKiller:
    def __init__(self):
        self.stops = []

    def stop(self, nodes, job_id, grace):
        self.stops.append(sorted(n.name for n in nodes))
        return {n.name: "stopped" for n in nodes}


def lab_cluster() -> Cluster:
    nodes = tuple(Node(n, f"127.0.0.{i + 2}", "me", rank=i) for i, n in enumerate(("lab0",
                                                                                   "lab1")))
    return Cluster("lab", Path("lab.yaml"), nodes, nodes[0])


def supervisor(tmp_path, **launch) -> Supervisor:
    jobs = Jobs(tmp_path)
    record(jobs, "j_20260301_110000", launch=launch)
    sup = Supervisor(jobs, lab_cluster(), "j_20260301_110000", grace=0.1)
    sup.sinks = {"lab0": FakeSink(0.0), "lab1": FakeSink(0.0)}
    sup.active_at = 0.0
    return sup


def test_supervisor_flags_a_silent_job_and_unflags_it_when_it_speaks(tmp_path):
    sup = supervisor(tmp_path, stall_after=10.0)
    killer = FakeKiller()
    assert (sup.stall_after, sup.on_stall) == (10.0, "flag")
    sup._check_stall(killer, 9.0)
    assert not is_stalled(sup.jobs.metadata(sup.job_id))
    sup._check_stall(killer, 12.0)
    meta = sup.jobs.metadata(sup.job_id)
    assert is_stalled(meta) and sup.stalled
    since = datetime.fromisoformat(meta["stalled_since"])
    assert abs((datetime.now(timezone.utc) - since).total_seconds() - 12.0) < 2
    sup.sinks["lab1"].last_data = 11.5  # lab1 printed a line
    sup._check_stall(killer, 12.0)
    assert not is_stalled(sup.jobs.metadata(sup.job_id)) and not sup.stalled
    sup.metrics_at["lab0"] = 1.0  # a metrics change counts as much as a line
    sup.active_at = 30.0
    sup._check_stall(killer, 35.0)
    assert not is_stalled(sup.jobs.metadata(sup.job_id))
    assert killer.stops == [] and sup.stop_reason is None


def test_supervisor_does_not_judge_while_a_stream_is_down_or_a_cancel_runs(tmp_path):
    sup = supervisor(tmp_path, stall_after=1.0)
    sup.unstreamed.add("lab1")
    sup._check_stall(FakeKiller(), 100.0)
    assert not is_stalled(sup.jobs.metadata(sup.job_id))
    sup.unstreamed.clear()
    sup.jobs.request_cancel(sup.job_id, "cancelled by user")
    sup._check_stall(FakeKiller(), 100.0)
    assert not is_stalled(sup.jobs.metadata(sup.job_id))


def test_on_stall_cancel_stops_every_node_and_fails_the_job_as_stalled(tmp_path):
    sup = supervisor(tmp_path, stall_after=3.0, on_stall="cancel")
    killer = FakeKiller()
    sup._check_stall(killer, 5.0)
    assert killer.stops == [["lab1"], ["lab0"]]  # the rendezvous host last
    assert sup.stop_reason.startswith("stalled: no output or metric for 5s (--stall-after 3s")
    # The stopped ranks exit non-zero: the stall, not a node, is why the job failed.
    for node in sup.nodes:
        sup._ended(node, "-15", None, None, killer)
    assert sup.blame.failure is None
    meta = sup._final(killer, sup.nodes)
    assert meta["status"] == "FAILED" and meta["error"] == sup.stop_reason
    assert meta["error"].startswith("stalled")
    assert {f["status"] for f in meta["nodes"].values()} == {"cancelled"}
    history = [json.loads(line) for line in sup.jobs.history.read_text().splitlines()]
    assert history[-1]["error"].startswith("stalled")


def test_node_state_metrics_clock_is_parsed_from_the_node():
    from ugro.backends.ssh import STATE_RE

    m = STATE_RE.search("pgid=12 exit= alive=1 ended= stopped=0 metrics=1767225600")
    assert m.group(6) == "1767225600"
    assert STATE_RE.search("pgid=12 exit= alive=1 ended= stopped=0").group(6) is None
    assert NodeState().metrics_at is None


def test_a_streams_state_lines_are_parsed_and_everything_else_reaches_the_log():
    from ugro.backends.ssh import _StateLines

    states, log = [], []

    class Log:
        def write(self, data):
            log.append(data)

    lines = _StateLines(states.append, Log())
    for chunk in ("pgid=12 exit= alive=1 ended= st", "opped=1 metrics=17\nsh: oops\n",
                  "pgid=12 exit=0 alive=0 ended=1767225600 stopped=0 metrics=\n"):
        lines.write(chunk)
    assert [(s.pgid, s.alive, s.stopped, s.metrics_at, s.exit_code) for s in states] == [
        (12, True, 1, 17.0, None), (12, False, 0, None, "0")]
    assert log == ["sh: oops\n"]

    # What the supervisor does with a state may fail: the stream's reader must live on.
    def fails(state):
        raise OSError("no locks available")

    lines = _StateLines(fails, Log())
    lines.write("pgid=12 exit= alive=1 ended= stopped=0 metrics=\nlast words")
    lines.close()
    assert log[-1] == "last words\n"


# -- what people see --------------------------------------------------------------------------
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def test_status_and_jobs_show_the_flag(tmp_path):
    jobs = Jobs(tmp_path)
    record(jobs, "quiet_20260301_110000")
    record(jobs, "busy_20260301_110500")
    jobs.mark_stalled("quiet_20260301_110000", (NOW - timedelta(minutes=12, seconds=5))
                      .isoformat())
    recs = [records.load(jobs, j) for j in jobs.ids()]
    view = views.status({}, recs, [], NOW)
    by_id = {r["job_id"]: r for r in view["running"]}
    assert by_id["quiet_20260301_110000"]["stalled"] is True
    assert by_id["busy_20260301_110500"]["stalled"] is False
    assert by_id["quiet_20260301_110000"]["status"] == "RUNNING"  # --json keeps the real status
    text = render.status_text(view)
    assert "STALLED, silent 12m 05s" in text
    rows = [views.job_row(r, NOW) for r in recs]
    assert [r["job_id"] for r in views.filter_rows(rows, "stalled")] == ["quiet_20260301_110000"]
    assert len(views.filter_rows(rows, "RUNNING")) == 2
    table = render.jobs_text(rows)
    assert "STALLED" in table and table.count("RUNNING") == 1
    with pytest.raises(UgroError, match="or STALLED"):
        views.filter_rows(rows, "stuck")


def test_metrics_export_the_supervisors_flag(tmp_path):
    from ugro.monitor import progress

    jobs = Jobs(tmp_path)
    record(jobs, "quiet_20260301_110000")
    jobs.mark_stalled("quiet_20260301_110000", "2026-03-01T11:00:00+00:00")
    snap = Series(db_path(tmp_path)).latest()
    snap.jobs = {j: progress.job_progress(jobs, j, time.time()) for j in jobs.ids()}
    text = exposition(registry(lambda: snap)).decode()
    assert 'ugro_job_stalled{job="quiet_20260301_110000",name="quiet"} 1.0' in text


# -- inv status from the monitor's sample -----------------------------------------------------
def sample(node: str, ts: float, up=True) -> NodeSample:
    gpus = [GpuSample(0, "GPU-1", "NVIDIA GeForce RTX 4070", 12282.0, 4096.0, 87.0, 60.0, 200.0)]
    return NodeSample(node, ts, up, load1=0.5, gpus=gpus if up else [],
                      error=None if up else f"{node}: timed out", down_since=None if up else ts)


def test_status_uses_a_fresh_monitor_sample_only(tmp_path):
    cluster = lab_cluster()
    now = time.time()
    assert monitor_status.fresh_snapshot(tmp_path, cluster.nodes, now) is None  # never ran
    series = Series(db_path(tmp_path))
    series.add_node(sample("lab0", now - 1))
    series.beat(now - 1, 2.0)
    # lab1 never sampled (a monitor of another cluster file): probe instead.
    assert monitor_status.fresh_snapshot(tmp_path, cluster.nodes, now) is None
    series.add_node(sample("lab1", now - 4, up=False))
    snap = monitor_status.fresh_snapshot(tmp_path, cluster.nodes, now)
    assert snap is not None and snap.interval == 2.0
    # The monitor stopped: three intervals later its sample no longer counts.
    assert monitor_status.fresh_snapshot(tmp_path, cluster.nodes, now + 6) is None
    rows = monitor_status.node_rows(snap, cluster.nodes)
    assert [(r["node"], r["address"], r["healthy"]) for r in rows] == [
        ("lab0", "127.0.0.2", True), ("lab1", "127.0.0.3", False)]
    assert rows[0]["gpus"][0]["utilization_pct"] == 87.0 and rows[0]["sample_age_s"] == 1.0
    assert rows[1]["problems"][0].startswith("unreachable since")
    source = monitor_status.source(snap, cluster.nodes)
    assert (source["from"], source["age_s"], source["interval_s"]) == ("monitor", 1.0, 2.0)
    view = views.status({}, [], [], NOW, sampled=({**source, "cluster": "lab"}, rows))
    text = render.status_text(view)
    assert "Nodes (lab, from inv monitor's sample 1s old; inv status --refresh" in text
    assert "DOWN" in text and "87.0%" in text and "4.0/12.0 GiB" in text, text
    series.close()
