"""The job views over hand-made job directories: results, jobs, status, compare, logs.

No SSH and no training: each test writes the files a job leaves on the control node
(metadata.json, config.json, metrics.jsonl, logs/<node>.log) and reads them back through the
pure functions, and through `inv` for the one-line errors.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ugro import commands, logs, records, render, views
from ugro.config import Node
from ugro.errors import UgroError
from ugro.jobs import Jobs
from ugro.metrics import parse_jsonl
from ugro.state import JobStatus

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
T0 = "2026-03-01T11:00:00.000+00:00"
T1 = "2026-03-01T11:02:05.000+00:00"

METRICS = "".join(
    json.dumps({"step": s, "epoch": 1 + (s > 20), "loss": loss, "lr": 3e-3,
                "samples_per_sec": 100.0 + s, "time": 1.0 * s}) + "\n"
    for s, loss in ((10, 3.5), (20, 2.9), (30, 2.4), (40, 2.6))
)
RAW_OUTPUT = """\
*****************************************
Setting OMP_NUM_THREADS environment variable for each process to be 1 in default.
*****************************************
[rank0]:step 10 | epoch 1 | loss 3.5000 | lr 3.00e-03 | samples/s 110.0

[rank1]:crash-at-step: rank 1 exits with status 3 at step 3
[rank1]:Traceback (most recent call last):
E1129 15:00:27.186000 2775 api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 3939)
"""


def meta_for(job_id: str, status: str = "COMPLETED", nodes=("gpu0", "gpu1"), **extra) -> dict:
    return {
        "job_id": job_id, "name": job_id.rsplit("_", 2)[0], "status": status,
        "created_at": T0, "started_at": T0,
        "ended_at": None if status in ("PENDING", "RUNNING") else T1,
        "world_size": 2 * len(nodes), "master": "127.0.1.1:29500",
        "nodes": {n: {"node_rank": i, "nproc": 2, "status": "completed", "exit_code": 0,
                      "pgid": 100 + i} for i, n in enumerate(nodes)},
        **extra,
    }


def config_for(job_id: str, nodes=("gpu0", "gpu1"), **launch) -> dict:
    return {
        "job_id": job_id,
        "launch": {"name": job_id.rsplit("_", 2)[0], "script": "scripts/train_single_test.py",
                   "epochs": 2, "lr": 0.003, "model": None, "dataset": None,
                   "batch_size": None, "nodes": None, "nproc_per_node": 2, "detach": False,
                   "resume": False, "script_args": [], "grace": 3.0, **launch},
        "world_size": 2 * len(nodes),
        "nodes": {n: {"node_rank": i, "nproc": 2, "host": f"127.0.1.{i + 1}"}
                  for i, n in enumerate(nodes)},
        "versions": {
            "gpu0": {"python": "3.11.7", "torch": "2.13.0", "gpus": ["NVIDIA GeForce RTX 4070"]},
            "gpu1": {"python": "3.11.7", "torch": "2.13.0",
                     "gpus": ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3090"]},
        },
    }


def make_job(data: Path, job_id: str, meta: dict | str | None = None,
             config: dict | str | None = None, metrics: str | None = METRICS,
             node_logs: dict[str, str] | None = None, checkpoints=("epoch_1.pt",)) -> Path:
    """A job directory as launch and the supervisor leave it; str contents are written as is."""
    d = data / "experiments" / job_id
    for sub in ("logs", "checkpoints", "artifacts"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    meta = meta_for(job_id) if meta is None else meta
    config = config_for(job_id) if config is None else config
    for name, content in (("metadata.json", meta), ("config.json", config)):
        (d / name).write_text(content if isinstance(content, str) else json.dumps(content))
    if metrics is not None:
        (d / "metrics.jsonl").write_text(metrics)
    for node, text in (node_logs or {}).items():
        (d / "logs" / f"{node}.log").write_text(text)
    for name in checkpoints:
        (d / "checkpoints" / name).write_bytes(b"x" * 2048)
    return d


@pytest.fixture
def jobs(tmp_path) -> Jobs:
    return Jobs(tmp_path / "data")


# --- finding a job ---------------------------------------------------------------------


def test_resolve_by_id_name_and_unique_prefix(jobs):
    make_job(jobs.data_dir, "exp1_20260301_100000")
    make_job(jobs.data_dir, "exp1_20260301_110000")
    make_job(jobs.data_dir, "other_20260301_090000")
    assert jobs.find("exp1_20260301_100000") == "exp1_20260301_100000"
    assert jobs.find("exp1") == "exp1_20260301_110000"  # the latest of that name
    assert jobs.find("oth") == "other_20260301_090000"
    assert jobs.find("exp1_20260301_10") == "exp1_20260301_100000"


def test_resolve_ambiguous_lists_the_candidates(jobs):
    make_job(jobs.data_dir, "exp1_20260301_100000")
    make_job(jobs.data_dir, "exp2_20260301_110000")
    with pytest.raises(UgroError, match=r"'exp' is ambiguous: it could be exp1, exp2"):
        jobs.find("exp")
    make_job(jobs.data_dir, "exp1_20260301_100000_2")
    with pytest.raises(UgroError, match=r"exp1_20260301_100000_2, exp1_20260301_100000$"):
        jobs.find("exp1_20260301_1000")


def test_resolve_unknown_names_the_closest_and_bad_names_are_refused(jobs):
    make_job(jobs.data_dir, "baseline_20260301_100000")
    with pytest.raises(UgroError, match="no job named 'baselin3'; did you mean: baseline"):
        jobs.find("baselin3")
    with pytest.raises(UgroError, match="invalid job name"):
        jobs.find("../etc")
    with pytest.raises(UgroError, match="required"):
        jobs.find(None)


# --- loading, with damage --------------------------------------------------------------


def test_load_reads_everything(jobs):
    make_job(jobs.data_dir, "a_20260301_100000", checkpoints=("epoch_10.pt", "epoch_9.pt"))
    rec = records.load(jobs, "a_20260301_100000")
    assert rec.damaged == []
    assert rec.status == "COMPLETED"
    assert [p.step for p in rec.points] == [10, 20, 30, 40]
    assert rec.metrics_source == "metrics.jsonl"
    assert rec.checkpoint_files == [("epoch_9.pt", 2048), ("epoch_10.pt", 2048)]


@pytest.mark.parametrize("content, why", [
    ("{bad", "metadata.json: not valid JSON (Expecting property name"),
    ("", "metadata.json: not valid JSON (Expecting value"),
    ("[1, 2]", "metadata.json: not a JSON object"),
    ('{"status": "WEIRD", "nodes": {}}', "metadata.json: status 'WEIRD' is not a job status"),
    ('{"status": "FAILED", "nodes": [1]}', "metadata.json: nodes: expected a mapping"),
])
def test_damaged_metadata_is_named_and_the_rest_still_loads(jobs, content, why):
    make_job(jobs.data_dir, "a_20260301_100000", meta=content)
    rec = records.load(jobs, "a_20260301_100000")
    assert len(rec.damaged) == 1 and rec.damaged[0].startswith(why)
    assert rec.status is None
    assert rec.config["world_size"] == 4
    view = views.results(rec, NOW)
    assert view["metrics"]["final_loss"] == 2.6
    assert [n["node"] for n in view["nodes"]] == ["gpu0", "gpu1"]  # from config.json
    text = render.results_text(view)
    assert f"DAMAGED      {why}" in text
    assert "unknown (damaged record)" in text


def test_damaged_config_and_binary_garbage(jobs):
    make_job(jobs.data_dir, "a_20260301_100000", config="\x00\xff garbage")
    rec = records.load(jobs, "a_20260301_100000")
    assert rec.damaged == ["config.json: not valid JSON (Expecting value: line 1 column 1 "
                           "(char 0))"]
    assert rec.status == "COMPLETED"
    (jobs.dir("a_20260301_100000") / "config.json").write_bytes(b"\xff\xfe{")
    assert records.load(jobs, "a_20260301_100000").damaged[0].startswith(
        "config.json: not valid JSON")
    (jobs.dir("a_20260301_100000") / "config.json").unlink()
    assert records.load(jobs, "a_20260301_100000").damaged == ["config.json: missing"]


def test_garbage_metrics_lines_are_counted_and_skipped(jobs):
    make_job(jobs.data_dir, "a_20260301_100000",
             metrics=METRICS + "garbage\n[1, 2]\n\x00\x01\n" + METRICS.splitlines()[0] + "\n")
    rec = records.load(jobs, "a_20260301_100000")
    assert rec.damaged == ["metrics.jsonl: 3 of 8 lines are not JSON objects (first: line 5)"]
    assert len(rec.points) == 5


def test_metrics_all_garbage_falls_back_to_the_logs(jobs):
    make_job(jobs.data_dir, "a_20260301_100000", metrics="{{{{\n",
             node_logs={"gpu0": "gpu0 r0 | step 5 | epoch 1 | loss 4.1000\n"})
    rec = records.load(jobs, "a_20260301_100000")
    assert rec.metrics_source == "logs"
    assert [(p.step, p.loss) for p in rec.points] == [(5, 4.1)]
    assert rec.damaged == ["metrics.jsonl: 1 of 1 lines are not JSON objects (first: line 1)"]


def test_torn_last_line_is_damage_only_once_the_job_ended():
    text = METRICS + '{"step": 50, "lo'
    assert records.jsonl_problem(text, active=True) is None
    assert records.jsonl_problem(text, active=False) == (
        "metrics.jsonl: 1 of 5 lines are not JSON objects (first: line 5)")
    assert records.jsonl_problem("", active=False) is None


# --- results -----------------------------------------------------------------------------


def test_results_facts(jobs):
    make_job(jobs.data_dir, "exp1_20260301_100000")
    view = views.results(records.load(jobs, "exp1_20260301_100000"), NOW)
    assert view["status"] == "COMPLETED"
    assert view["duration_s"] == 125.0
    assert view["world_size"] == 4
    assert view["nodes"][1]["gpus"] == ["NVIDIA GeForce RTX 3090"] * 2
    m = view["metrics"]
    assert (m["final_loss"], m["best_loss"], m["best_step"], m["steps"]) == (2.6, 2.4, 30, 40)
    assert m["samples_per_sec"] == pytest.approx(125.0)
    assert view["checkpoints"] == [{"name": "epoch_1.pt", "bytes": 2048, "node": None}]
    text = render.results_text(view)
    for expected in ("status       COMPLETED", "duration     2m 05s", "world size   4 (2 per node)",
                     "gpu0: NVIDIA GeForce RTX 4070", "gpu1: 2x NVIDIA GeForce RTX 3090",
                     "final loss   2.6000", "best loss    2.4000 (step 30)",
                     "steps        40 (epoch 2)", "samples/s    125.0 (mean)",
                     "epoch_1.pt (1, 2.0 KiB)", "3.5000 -> 2.6000"):
        assert expected in text, text
    assert "error" not in text


def test_results_of_a_failed_job_name_the_node_and_show_its_rank(jobs):
    tail = ["gpu1 r3 | crash-at-step: rank 3 exits with status 3 at step 3",
            "gpu1    | torch.distributed.elastic.multiprocessing.errors.ChildFailedError:"]
    failure = {"node": "gpu1", "rank": 3, "exit_code": 1, "summary":
               "gpu1 rank 3 failed first (exit code 1)", "log_tail": tail}
    meta = meta_for("bad_20260301_100000", "FAILED", failure=failure, error=failure["summary"])
    meta["nodes"]["gpu0"]["checkpoints"] = ["epoch_2.pt", "epoch_1.pt"]
    make_job(jobs.data_dir, "bad_20260301_100000", meta=meta, metrics="", checkpoints=())
    view = views.results(records.load(jobs, "bad_20260301_100000"), NOW)
    assert view["failure"]["node"] == "gpu1"
    assert view["checkpoints"] == [{"name": "epoch_1.pt", "bytes": None, "node": "gpu0"},
                                   {"name": "epoch_2.pt", "bytes": None, "node": "gpu0"}]
    text = render.results_text(view)
    assert "error        gpu1 rank 3 failed first (exit code 1)" in text
    assert "failed       node gpu1, rank 3, exit code 1" in text
    assert "epoch_1.pt, epoch_2.pt (2, on gpu0)" in text
    assert "last lines of gpu1 rank 3:\n  gpu1 r3 | crash-at-step" in text
    assert "ChildFailedError" not in text  # torchrun's report names the rank, not the cause
    assert "final loss   -" in text


def test_results_of_a_running_job_count_time_until_now(jobs):
    make_job(jobs.data_dir, "run_20260301_100000", meta=meta_for("run_20260301_100000", "RUNNING"))
    view = views.results(records.load(jobs, "run_20260301_100000"), NOW)
    assert view["duration_s"] == 3600.0
    assert "ended        -" in render.results_text(view)


def test_plot_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path, note = views.plot_loss(parse_jsonl(METRICS), tmp_path / "artifacts" / "loss.png", "x")
    assert path is None and "matplotlib is not installed" in note and "ugro[plot]" in note
    assert not (tmp_path / "artifacts" / "loss.png").exists()
    assert views.plot_loss([], tmp_path / "loss.png", "x") == (None, "no loss values to plot")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    points = parse_jsonl(METRICS + '{"step": 50, "loss": NaN}\n')
    path, note = views.plot_loss(points, tmp_path / "artifacts" / "loss.png", "exp1")
    assert path == tmp_path / "artifacts" / "loss.png" and note == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]  # no temp file left


# --- jobs, compare -----------------------------------------------------------------------


def test_job_rows_and_status_filter(jobs):
    make_job(jobs.data_dir, "a_20260301_100000")
    make_job(jobs.data_dir, "b_20260301_110000",
             meta=meta_for("b_20260301_110000", "FAILED", error="gpu1 rank 3 failed first"))
    make_job(jobs.data_dir, "c_20260301_120000", meta="{")
    rows = [views.job_row(records.load(jobs, j), NOW) for j in jobs.ids()]
    assert [r["job_id"] for r in rows] == ["c_20260301_120000", "b_20260301_110000",
                                           "a_20260301_100000"]
    assert views.status_filter("failed") == "FAILED" and views.status_filter(None) is None
    with pytest.raises(UgroError, match="--status DONE: not a job status"):
        views.status_filter("DONE")
    text = render.jobs_text(rows)
    assert "gpu1 rank 3 failed first" in text
    assert "damaged: metadata.json: not valid JSON" in text
    assert render.jobs_text([]) == "no jobs"
    json.dumps(rows)


def test_compare_marks_what_differs(jobs):
    make_job(jobs.data_dir, "a_20260301_100000")
    make_job(jobs.data_dir, "b_20260301_110000",
             config=config_for("b_20260301_110000", lr=0.001, script_args=["--seed", "2"]),
             metrics=METRICS.replace("2.6", "1.9"))
    make_job(jobs.data_dir, "c_20260301_120000", config="nope")
    view = views.compare([records.load(jobs, j) for j in
                          ("a_20260301_100000", "b_20260301_110000")], NOW)
    differs = {r["key"]: r["differs"] for r in view["rows"]}
    assert differs["lr"] and differs["script_args"] and differs["final_loss"]
    assert not differs["epochs"] and not differs["status"] and not differs["world_size"]
    assert "name" not in differs and "detach" not in differs
    lines = render.compare_text(view).splitlines()
    assert any(line.startswith("*") and "lr" in line and "0.003" in line and "0.001" in line
               for line in lines)
    assert any(line.startswith("  ") and " epochs " in line for line in lines)
    assert any("final loss" in line and "2.6000" in line and "1.9000" in line for line in lines)
    damaged = views.compare([records.load(jobs, j) for j in
                             ("a_20260301_100000", "c_20260301_120000")], NOW)
    assert "DAMAGED c_20260301_120000: config.json: not valid JSON" in render.compare_text(damaged)


# --- status ------------------------------------------------------------------------------

STATE = {
    "checked_at": "2026-03-01T11:58:00+00:00",
    "cluster": "home",
    "drift": ["driver differs: 550 on gpu0; 535 on gpu1"],
    "nodes": [
        {"node": "gpu0", "address": "127.0.1.1", "healthy": True, "problems": [],
         "warnings": [], "loadavg": [0.5, 0.4, 0.3],
         "gpus": [{"index": 0, "name": "NVIDIA GeForce RTX 4070", "memory_total_mib": 8188,
                   "memory_used_mib": 4094, "utilization_pct": 87, "temperature_c": 60,
                   "driver": "550"}]},
        {"node": "gpu1", "address": "127.0.1.2", "healthy": False,
         "problems": ["gpu1: 127.0.1.2 did not answer (timed out)"], "warnings": [], "gpus": []},
    ],
}


def test_state_is_recent_only_for_this_cluster_and_young():
    assert views.state_is_recent(STATE, "home", NOW)
    assert not views.state_is_recent(STATE, "other", NOW)
    assert not views.state_is_recent(STATE, "home", NOW + timedelta(minutes=10))
    assert not views.state_is_recent(STATE, "home", NOW - timedelta(hours=1))  # from the future
    assert not views.state_is_recent({}, "home", NOW)
    assert not views.state_is_recent({"checked_at": "yesterday", "cluster": "home"}, "home", NOW)


def test_status_view_and_text(jobs):
    make_job(jobs.data_dir, "run_20260301_110000", meta=meta_for("run_20260301_110000", "RUNNING"),
             metrics=METRICS + '{"step": 50, "lo')
    jobs.history.write_text(
        json.dumps({"job_id": "a_20260301_100000", "name": "a", "status": "COMPLETED",
                    "started_at": T0, "ended_at": T1, "nodes": ["gpu0"], "world_size": 2,
                    "error": None}) + "\nnot json\n"
        + json.dumps({"job_id": "b_20260301_100500", "name": "b", "status": "FAILED",
                      "started_at": T0, "ended_at": T0, "nodes": ["gpu0", "gpu1"],
                      "error": "gpu1 rank 3 failed first (exit code 1)"}) + "\n")
    history, problem = records.history_entries(*jobs.history_lines())
    assert problem == "job_history.jsonl: 1 unreadable line(s) skipped (first: line 2)"
    view = views.status(STATE, [records.load(jobs, "run_20260301_110000")], history, NOW,
                        notes=[problem])
    assert view["health"]["age_s"] == 120.0
    (running,) = view["running"]
    assert (running["epoch"], running["epochs"], running["step"], running["loss"]) == (2, 2, 40,
                                                                                        2.6)
    assert running["elapsed_s"] == 3600.0 and running["damaged"] == []
    assert [e["job_id"] for e in view["recent"]] == ["b_20260301_100500", "a_20260301_100000"]
    json.dumps(view)
    text = render.status_text(view)
    for expected in ("Nodes (home, health checked 2m 00s ago; inv status --refresh",
                     "0: NVIDIA GeForce RTX 4070", "4.0/8.0 GiB", "87%", "UNHEALTHY",
                     "did not answer", "DRIFT: driver differs", "epoch 2/2, step 40",
                     "2.6000", "1h 00m", "gpu1 rank 3 failed first",
                     "note: job_history.jsonl: 1 unreadable"):
        assert expected in text, text
    empty = render.status_text(views.status({}, [], [], NOW, refreshed=True))
    assert "health checked just now" in empty and empty.count("none") == 2


# --- logs ----------------------------------------------------------------------------------


def test_parse_line_and_select():
    raw = ["gpu0 r0 | step 10 | loss 2.0", "gpu0    | torchrun says", "gpu0    |",
           "gpu1 r13 | hello | world", "no prefix at all"]
    lines = [logs.parse_line(r, "gpu0") for r in raw]
    assert [(x.node, x.rank, x.text) for x in lines] == [
        ("gpu0", 0, "step 10 | loss 2.0"), ("gpu0", None, "torchrun says"), ("gpu0", None, ""),
        ("gpu1", 13, "hello | world"), ("gpu0", None, "no prefix at all")]
    assert [x.raw for x in logs.select(lines, rank=13)] == ["gpu1 r13 | hello | world"]
    assert [x.raw for x in logs.select(lines, tail=2)] == raw[-2:]
    assert logs.select(lines, tail=0) == []
    assert logs.select(lines, tail=100) == lines
    assert json.loads(logs.render(lines[0], True)) == {"node": "gpu0", "rank": 0,
                                                       "text": "step 10 | loss 2.0"}


def test_format_output_is_what_the_supervisor_writes():
    lines = logs.format_output(RAW_OUTPUT, "gpu1")
    assert lines[3] == "gpu1 r0 | step 10 | epoch 1 | loss 3.5000 | lr 3.00e-03 | samples/s 110.0"
    assert [(x.node, x.rank, x.text) for x in (logs.parse_line(r, "?") for r in lines)] == [
        ("gpu1", None, "*****************************************"),
        ("gpu1", None, "Setting OMP_NUM_THREADS environment variable for each process to be 1 "
                       "in default."),
        ("gpu1", None, "*****************************************"),
        ("gpu1", 0, "step 10 | epoch 1 | loss 3.5000 | lr 3.00e-03 | samples/s 110.0"),
        ("gpu1", None, ""),
        ("gpu1", 1, "crash-at-step: rank 1 exits with status 3 at step 3"),
        ("gpu1", 1, "Traceback (most recent call last):"),
        ("gpu1", None, "E1129 15:00:27.186000 2775 api.py:1002] failed (exitcode: 1) "
                       "local_rank: 0 (pid: 3939)"),
    ]


def test_stale_logs_are_missing_empty_or_cut_short(tmp_path):
    meta = meta_for("a_20260301_100000", "FAILED")
    meta["nodes"]["gpu1"]["exit_code"] = None
    (tmp_path / "gpu0.log").write_text("gpu0 r0 | hi\n")
    assert logs.stale(meta, tmp_path, ["gpu0", "gpu1"]) == ["gpu1"]  # missing, and cut short
    (tmp_path / "gpu1.log").write_text("gpu1 r2 | hi\n")
    assert logs.stale(meta, tmp_path, ["gpu0", "gpu1"]) == ["gpu1"]
    meta["nodes"]["gpu1"]["log_fetched_at"] = T1
    assert logs.stale(meta, tmp_path, ["gpu0", "gpu1"]) == []
    (tmp_path / "gpu0.log").write_text("")
    assert logs.stale(meta, tmp_path, ["gpu0", "gpu1"]) == ["gpu0"]
    assert logs.stale({**meta, "status": "RUNNING"}, tmp_path, ["gpu0"]) == []
    assert logs.stale({}, tmp_path, ["gpu0"]) == []


def test_host_jobs_and_picking_one():
    listing = ("data/experiments/exp2_20260301_110000/nodes/gpu1\n"
               "data/experiments/exp1_20260301_100000/nodes/gpu1\n"
               "data/experiments/exp1_20260301_090000/nodes/gpu1\n"
               "data/experiments/x y/nodes/gpu1\nls: cannot access\n")
    ids = logs.host_jobs(listing)
    assert ids == ["exp2_20260301_110000", "exp1_20260301_100000", "exp1_20260301_090000"]
    assert logs.pick_host_job(ids, None, "gpu1") == "exp2_20260301_110000"
    assert logs.pick_host_job(ids, "exp1", "gpu1") == "exp1_20260301_100000"
    assert logs.pick_host_job(ids, "exp1_20260301_090000", "gpu1") == "exp1_20260301_090000"
    with pytest.raises(UgroError, match="gpu1: no job named 'exp3' here; did you mean: exp"):
        logs.pick_host_job(ids, "exp3", "gpu1")
    with pytest.raises(UgroError, match="gpu1: no job has run here"):
        logs.pick_host_job([], None, "gpu1")


def test_follow_streams_until_the_job_ends(jobs):
    job_id = "run_20260301_110000"
    d = make_job(jobs.data_dir, job_id, meta=meta_for(job_id, "RUNNING"))
    (d / "logs" / "gpu0.log").write_text("gpu0 r0 | old 1\ngpu0 r0 | old 2\ngpu0    | agent\n")
    out = io.StringIO()

    def training():
        time.sleep(0.3)
        with (d / "logs" / "gpu1.log").open("a") as f:
            f.write("gpu1 r2 | new line\ngpu1 r3 | half")
            f.flush()
            time.sleep(0.3)
            f.write(" a line\n")
        jobs.finish(job_id, JobStatus.COMPLETED)

    writer = threading.Thread(target=training)
    writer.start()
    start = time.monotonic()
    logs.follow(jobs, job_id, out=out, poll=0.05, tail=2)
    writer.join()
    assert time.monotonic() - start < 5
    assert out.getvalue().splitlines() == [
        "gpu0 r0 | old 2", "gpu0    | agent", "gpu1 r2 | new line", "gpu1 r3 | half a line"]
    out = io.StringIO()
    logs.follow(jobs, job_id, out=out, nodes=["gpu1"], rank=3, as_json=True)
    assert [json.loads(x) for x in out.getvalue().splitlines()] == [
        {"node": "gpu1", "rank": 3, "text": "half a line"}]


# --- the remote commands ---------------------------------------------------------------------


def test_job_output_and_node_job_dirs_commands():
    node = Node(name="gpu1", host="127.0.1.2", user="me", project_path="~/ugro")
    assert commands.job_output(node, "exp1_20260301_100000") == (
        'cd "$HOME"/ugro || exit 1; '
        "cat data/experiments/exp1_20260301_100000/nodes/gpu1/output.log")
    assert commands.node_job_dirs(node) == (
        'cd "$HOME"/ugro || exit 1; '
        "{ ls -1dt data/experiments/*/nodes/gpu1 2>/dev/null || true; }")
    odd = Node(name="gpu;1", host="h", user="u", project_path="/p q")
    assert commands.node_job_dirs(odd).endswith("data/experiments/*/nodes/'gpu;1' "
                                                "2>/dev/null || true; }")


def test_node_job_dirs_runs_newest_first(tmp_path):
    node = Node(name="gpu1", host="h", user="u", project_path=str(tmp_path))
    run = lambda: subprocess.run(["sh", "-c", commands.node_job_dirs(node)],  # noqa: E731
                                 capture_output=True, text=True)
    assert (run().returncode, run().stdout) == (0, "")
    for i, job_id in enumerate(("old_20260301_100000", "new_20260301_110000")):
        d = tmp_path / "data/experiments" / job_id / "nodes/gpu1"
        d.mkdir(parents=True)
        t = 1_700_000_000 + i * 60
        os.utime(d, (t, t))
    (tmp_path / "data/experiments/other_20260301_120000/nodes/gpu2").mkdir(parents=True)
    assert logs.host_jobs(run().stdout) == ["new_20260301_110000", "old_20260301_100000"]
    assert subprocess.run(["sh", "-c", commands.node_job_dirs(
        Node(name="gpu1", host="h", user="u", project_path=str(tmp_path / "nope")))],
        capture_output=True).returncode == 1


# --- the tasks' bad input: one line, non-zero exit, no traceback -------------------------------


def test_tasks_bad_input_is_one_line(inv):
    make_job(inv.data, "exp1_20260301_100000",
             node_logs={"gpu0": "gpu0 r0 | a\n", "gpu1": "gpu1 r2 | b\n"})
    make_job(inv.data, "exp2_20260301_110000", meta="{oops")
    cases = [
        (("results", "exp9"), "no job named 'exp9'; did you mean: exp"),
        (("results", "ex"), "'ex' is ambiguous: it could be exp1, exp2"),
        (("logs", "exp1", "--node", "gpu7"), "ran on gpu0, gpu1, not on 'gpu7'"),
        (("logs", "exp1", "--rank", "4"), "--rank 4: job exp1_20260301_100000 has ranks 0-3"),
        (("logs", "exp1", "--tail", "-2"), "--tail: expected a whole number >= 0"),
        (("jobs", "--status", "done"), "--status done: not a job status"),
        (("jobs", "--name", "exp3"), "no job named 'exp3'; did you mean"),
        (("compare", "exp1", "exp1_20260301_100000"), "compare needs two different jobs"),
    ]
    for args, message in cases:
        r = inv(*args, check=1)
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith("ugro: ") and message in line, (args, r.stderr)


def test_tasks_show_a_damaged_job_and_the_rest(inv):
    make_job(inv.data, "exp1_20260301_100000",
             node_logs={"gpu0": "gpu0 r0 | a\n", "gpu1": "gpu1 r2 | b\ngpu1 r3 | c\n"})
    make_job(inv.data, "exp2_20260301_110000", meta="{oops",
             node_logs={"gpu0": "gpu0 r0 | z\n"})
    r = inv("results", "exp2", check=0)
    assert "DAMAGED      metadata.json: not valid JSON" in r.stdout
    assert "final loss   2.6000" in r.stdout
    r = inv("jobs", "--json", check=0)
    rows = json.loads(r.stdout)
    assert [x["status"] for x in rows] == [None, "COMPLETED"]
    assert rows[0]["damaged"][0].startswith("metadata.json: not valid JSON")
    r = inv("logs", "exp2", check=0)
    assert r.stdout == "gpu0 r0 | z\n" and "metadata.json: not valid JSON" in r.stderr
    r = inv("logs", "exp1", "--rank", "3", "--json", check=0)
    assert [json.loads(x)["text"] for x in r.stdout.splitlines()] == ["c"]
    r = inv("compare", "exp1", "exp2", "--json", check=0)
    assert json.loads(r.stdout)["jobs"] == ["exp1_20260301_100000", "exp2_20260301_110000"]
    r = inv("results", "exp1", "--json", check=0)
    view = json.loads(r.stdout)
    assert view["metrics"]["final_loss"] == 2.6 and not math.isnan(view["metrics"]["best_loss"])
    assert view["plot"]["note"]


def test_status_reconciles_a_job_whose_supervisor_died(inv, tmp_path):
    """The supervisor is gone and the node's job ended: `inv status` writes the final record."""
    job_id = "orphan_20260301_100000"
    node_dir = tmp_path / "proj" / "data/experiments" / job_id / "nodes/local"
    node_dir.mkdir(parents=True)
    (node_dir / "output.log").write_text("[rank0]:step 5 | epoch 1 | loss 3.0\n[rank0]:done\n")
    (node_dir / "pgid").write_text("999999\n")  # no such process: the job is over
    (node_dir / "exit_code").write_text("0\n")
    cluster = tmp_path / "solo.yaml"
    cluster.write_text(
        "cluster: {name: solo}\n"
        f"master: {{name: local, local: true, host: 127.0.0.1, project_path: {tmp_path}/proj,"
        f" python: {sys.executable}}}\n")
    meta = meta_for(job_id, "RUNNING", nodes=("local",))
    meta["nodes"]["local"].update(status="running", exit_code=None)
    make_job(inv.data, job_id, meta=meta, metrics=None, checkpoints=())
    r = inv("status", cluster=cluster, check=0)
    assert "Running jobs\nnone" in r.stdout
    assert f"{job_id}  COMPLETED" in r.stdout.split("Recent jobs")[1]
    assert json.loads((inv.data / "experiments" / job_id / "metadata.json").read_text())[
        "status"] == "COMPLETED"
    r = inv("logs", "orphan", cluster=cluster, check=0)
    assert r.stdout == "local r0 | step 5 | epoch 1 | loss 3.0\nlocal r0 | done\n"
