"""The monitor's pure parts: the node command, its parsers, the series, /metrics, job progress."""

from __future__ import annotations

import json
import sqlite3

import pytest

from ugro import commands
from ugro.config import Node
from ugro.errors import UgroError
from ugro.jobs import Jobs
from ugro.monitor import exporter, progress, series
from ugro.monitor.sample import NodeSample, parse_gpu_csv, parse_sample, split_sections
from ugro.monitor.sampler import MAX_BACKOFF, backoff
from ugro.monitor.service import MonitorConfig

# What a node with two GPUs prints for commands.monitor_sample (a real RTX 3090 box; the second
# GPU reports no power reading), after a login banner.
REAL = """\
Welcome to Ubuntu 22.04.4 LTS
UGRO_MON load
0.52 0.61 0.70 2/1437 92811
UGRO_MON mem
MemTotal:       65796452 kB
MemAvailable:   51234560 kB
UGRO_MON disk
Filesystem     1024-blocks      Used Available Capacity Mounted on
/dev/nvme0n1p2   959786032 412345678 498765432      46% /home
UGRO_MON gpu
0, GPU-e1d2c3b4-a596-4788-9a0b-1c2d3e4f5a52, NVIDIA GeForce RTX 3090, 24576, 20113, 98, 71, 342.18
1, GPU-f0e1d2c3-b4a5-4687-8a9b-0c1d2e3f4a53, NVIDIA GeForce RTX 3090, 24576, 1, 0, 33, [N/A]
UGRO_MON gpu-exit 0
"""


def test_command_is_exact_and_quotes_the_project_path():
    node = Node("gpu1", "127.0.1.2", "me", project_path="~/my proj;rm")
    assert commands.monitor_sample(node) == (
        "echo UGRO_MON load; cat /proc/loadavg; "
        "echo UGRO_MON mem; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo; "
        "echo UGRO_MON disk; d=\"$HOME\"/'my proj;rm'; "
        'while [ ! -d "$d" ]; do d=$(dirname -- "$d"); done; df -Pk -- "$d"; '
        "echo UGRO_MON gpu; if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi "
        "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu,temperature.gpu,"
        "power.draw --format=csv,noheader,nounits 2>&1; echo UGRO_MON gpu-exit $?; "
        "else echo UGRO_MON gpu-exit none; fi"
    )


def test_real_sample():
    s = parse_sample("gpu1", 100.0, REAL)
    assert (s.up, s.load1, s.load5, s.load15) == (True, 0.52, 0.61, 0.70)
    assert (s.memory_total_kib, s.memory_available_kib) == (65796452, 51234560)
    assert (s.disk_free_kib, s.disk_path) == (498765432, "/home")
    assert [g.index for g in s.gpus] == [0, 1]
    g0, g1 = s.gpus
    assert g0.uuid == "GPU-e1d2c3b4-a596-4788-9a0b-1c2d3e4f5a52"
    assert (g0.name, g0.utilization_pct, g0.memory_used_mib, g0.power_w) == (
        "NVIDIA GeForce RTX 3090", 98.0, 20113.0, 342.18)
    assert g0.memory_free_mib == 4463.0
    assert g1.power_w is None and g1.temperature_c == 33.0
    assert s.problems == []


def test_node_without_nvidia_smi_has_no_gpus_and_no_problem():
    text = REAL.split("UGRO_MON gpu\n")[0] + "UGRO_MON gpu\nUGRO_MON gpu-exit none\n"
    s = parse_sample("cpu", 1.0, text)
    assert s.gpus == [] and s.problems == []


def test_broken_driver_is_a_problem_not_a_crash():
    text = REAL.split("UGRO_MON gpu\n")[0] + (
        "UGRO_MON gpu\nNVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
        "driver.\nUGRO_MON gpu-exit 9\n")
    s = parse_sample("g", 1.0, text)
    assert s.gpus == []
    assert s.problems == ["nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it "
                          "couldn't communicate with the NVIDIA driver."]


@pytest.mark.parametrize("garbage", [
    "", "hello\nworld", "\x00\xff", "UGRO_MONX load\n1 2 3",
])
def test_no_markers_is_not_a_sample(garbage):
    with pytest.raises(ValueError, match="no monitor sample"):
        parse_sample("n", 1.0, garbage)


def test_garbage_sections_leave_fields_empty():
    s = parse_sample("n", 1.0, "UGRO_MON load\nbanana\nUGRO_MON mem\nMemTotal: lots\n"
                     "UGRO_MON disk\ndf: /x: No such file\nUGRO_MON gpu\n"
                     "0, GPU-x, A, 1, 2\nnot, a, gpu, line, at, all, ok, 3\n"
                     "UGRO_MON gpu-exit 0\n")
    assert (s.load1, s.memory_total_kib, s.disk_free_kib, s.gpus) == (None, None, None, [])
    assert len(s.problems) == 5


def test_gpu_csv_unknowns_and_nan():
    gpus, problems = parse_gpu_csv(
        "0, [Not Supported], Tesla T4, 15360, [N/A], nan, 40, [Unknown Error]\n\n")
    assert problems == []
    (g,) = gpus
    assert (g.uuid, g.memory_used_mib, g.utilization_pct, g.power_w) == (None, None, None, None)
    assert g.memory_free_mib is None


def test_sections_keep_marker_values():
    assert split_sections("x\nUGRO_MON a\n1\nUGRO_MON gpu-exit 0\n") == {
        "a": ["1"], "gpu-exit": ["0"]}


def test_backoff_doubles_and_is_capped():
    assert [backoff(5, n) for n in range(5)] == [5, 5, 10, 20, 40]
    assert backoff(5, 50) == MAX_BACKOFF


@pytest.mark.parametrize("kwargs, message", [
    ({"interval": 0}, "--interval 0"),
    ({"port": 70000}, "--port 70000"),
    ({"retention_days": -1}, "--retention-days -1"),
])
def test_config_refuses_bad_values(kwargs, message):
    with pytest.raises(UgroError, match=message):
        MonitorConfig(**kwargs)


def test_token_only_off_loopback():
    assert not MonitorConfig(host="127.0.0.1").needs_token
    assert not MonitorConfig(host="::1").needs_token
    assert MonitorConfig(host="0.0.0.0").needs_token
    assert MonitorConfig(host="127.0.0.5").needs_token
    assert MonitorConfig(host="gpu-box.lan").needs_token


def sample(node, ts, up=True, **kw):
    s = parse_sample(node, ts, REAL) if up else NodeSample(node, ts, up=False, error="down",
                                                          down_since=ts - 10)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_series_latest_history_and_retention(tmp_path):
    db = series.Series(tmp_path / "s.sqlite3", retention_s=100)
    db.add_node(sample("a", 1000.0))
    db.add_node(sample("a", 1005.0, load1=3.0))
    db.add_node(sample("b", 1005.0, up=False))
    db.add_job(1005.0, {"job_id": "j_1", "status": "RUNNING", "step": 7})
    snap = db.latest(now=1010.0)
    assert snap.nodes["a"].load1 == 3.0 and len(snap.nodes["a"].gpus) == 2
    assert snap.nodes["b"].up is False and snap.nodes["b"].down_since == 995.0
    assert snap.age(snap.nodes["a"].ts) == 5.0
    assert snap.jobs["j_1"]["step"] == 7
    hist = db.node_history("a", 900.0, 1010.0)
    assert [g["index"] for g in hist["gpus"]] == [0, 1]
    assert hist["gpus"][0]["ts"] == [1000.0, 1005.0]
    assert hist["load"]["load1"] == [0.52, 3.0]
    # Another process reads the same file read-only.
    assert series.latest(tmp_path, now=1010.0) is None
    assert db.path.name == "s.sqlite3"
    db.add_node(sample("a", 2000.0))  # past PRUNE_EVERY: rows older than 100 s go
    rows = sqlite3.connect(db.path).execute("SELECT count(*) FROM node").fetchone()[0]
    assert rows == 1
    assert sqlite3.connect(db.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_latest_from_another_process(tmp_path):
    db = series.Series(series.db_path(tmp_path))
    db.add_node(sample("a", 50.0))
    db.close()
    snap = series.latest(tmp_path, now=60.0)
    assert snap.nodes["a"].up and snap.age(snap.nodes["a"].ts) == 10.0


def test_metrics_text_has_dcgm_and_ugro_series():
    nodes = {"a": sample("a", 10.0), "b": sample("b", 10.0, up=False)}
    snap = series.Snapshot(now=20.0, nodes=nodes,
                           jobs={"j_1": {"job_id": "j_1", "name": "j", "status": "RUNNING",
                                         "step": 40, "loss": 2.5, "samples_per_sec": 12.0,
                                         "stalled": True, "log_age_s": {"a": 400.0}}})
    text = exporter.render(exporter.registry(lambda: snap)).decode()
    assert ('DCGM_FI_DEV_GPU_UTIL{Hostname="a",UUID="GPU-e1d2c3b4-a596-4788-9a0b-1c2d3e4f5a52",'
            'gpu="0",modelName="NVIDIA GeForce RTX 3090"} 98.0') in text
    assert 'DCGM_FI_DEV_FB_FREE{Hostname="a",UUID="GPU-e1d2c3b4' in text
    assert 'DCGM_FI_DEV_POWER_USAGE{Hostname="a",UUID="GPU-f0e1' not in text  # [N/A]
    assert 'ugro_node_up{node="a"} 1.0' in text and 'ugro_node_up{node="b"} 0.0' in text
    assert 'ugro_node_sample_age_seconds{node="a"} 10.0' in text
    assert 'ugro_node_disk_free_bytes{node="a",path="/home"} 5.10735802368e+11' in text
    assert 'ugro_job_status{job="j_1",name="j",status="RUNNING"} 1.0' in text
    assert 'ugro_job_status{job="j_1",name="j",status="FAILED"} 0.0' in text
    assert 'ugro_job_step{job="j_1",name="j"} 40.0' in text
    assert 'ugro_job_stalled{job="j_1",name="j"} 1.0' in text
    assert 'ugro_job_log_age_seconds{job="j_1",name="j",node="a"} 400.0' in text


def write_job(data, job_id, status, metrics="", logs=None):
    d = Jobs(data).dir(job_id)
    (d / "logs").mkdir(parents=True)
    nodes = {n: {} for n in (logs or {})}
    (d / "metadata.json").write_text(json.dumps({
        "job_id": job_id, "name": job_id.split("_")[0], "status": status, "nodes": nodes,
        "started_at": "2026-01-01T00:00:00+00:00"}))
    (d / "metrics.jsonl").write_text(metrics)
    for node, text in (logs or {}).items():
        (d / "logs" / f"{node}.log").write_text(text)
    return d


def test_progress_reads_a_torn_tail_and_shows_the_supervisors_stall_flag(tmp_path):
    import os

    d = write_job(tmp_path, "exp_20260101_000000", "RUNNING",
                  metrics='{"step": 1, "loss": 3.0}\ngarbage\n{"step": 2, "loss": 2.5, '
                          '"samples_per_sec": 9.5}\n{"step": 3, "lo',
                  logs={"lab0": "lab0 r0 | step 2 | loss 2.5\n", "lab1": "lab1 r1 | hi\n"})
    now = os.path.getmtime(d / "metrics.jsonl") + 10
    p = progress.job_progress(Jobs(tmp_path), "exp_20260101_000000", now)
    assert (p["step"], p["loss"], p["samples_per_sec"], p["stalled"]) == (2, 2.5, 9.5, False)
    assert set(p["log_age_s"]) == {"lab0", "lab1"}
    # Silence alone is not a stall here: only the job's supervisor decides one.
    p = progress.job_progress(Jobs(tmp_path), "exp_20260101_000000", now + 86400)
    assert p["stalled"] is False and p["quiet_s"] > 86400
    meta = json.loads((d / "metadata.json").read_text())
    meta["stalled_since"] = "2026-01-01T00:10:00+00:00"
    (d / "metadata.json").write_text(json.dumps(meta))
    p = progress.job_progress(Jobs(tmp_path), "exp_20260101_000000", now)
    assert (p["stalled"], p["stalled_since"]) == (True, "2026-01-01T00:10:00+00:00")
    assert progress.log_tail(d, "lab1") == [{"node": "lab1", "rank": 1, "text": "hi"}]


def test_progress_falls_back_to_logs_and_tail_skips_a_cut_line(tmp_path):
    d = write_job(tmp_path, "exp_20260101_000001", "COMPLETED",
                  logs={"lab0": "x" * 100 + "\nlab0 r0 | step 9 | loss 1.25\n"})
    assert progress.latest_point(d).step == 9
    assert progress.read_tail(d / "logs" / "lab0.log", 40) == "lab0 r0 | step 9 | loss 1.25\n"
    assert progress.job_progress(Jobs(tmp_path), "exp_20260101_000001", 0.0)["stalled"] is False
