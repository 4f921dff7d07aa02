"""The monitor against the real sshd lab: sampling, reconnecting, HTTP, Prometheus, a browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import wait_for, write_jobs
from sshlab import Lab, free_port

from ugro.config import load_cluster
from ugro.monitor.sampler import NodeWatcher
from ugro.monitor.series import Series
from ugro.monitor.service import Monitor, MonitorConfig

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[1]


def cluster_of(lab, tmp_path, **kwargs):
    return load_cluster(str(lab.cluster_file(tmp_path / "cluster.yaml", **kwargs)), ROOT)


def established(host: str, port: int) -> int:
    """Open TCP connections from here to host:port (from /proc/net/tcp)."""
    octets = [int(x) for x in host.split(".")]
    addr = "".join(f"{o:02X}" for o in reversed(octets)) + f":{port:04X}"
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[2] == addr and cols[3] == "01":
            n += 1
    return n


def test_sampler_reads_every_node_over_one_connection_each(lab, tmp_path):
    cluster = cluster_of(lab, tmp_path)
    series = Series(tmp_path / "s.sqlite3")
    watchers = [NodeWatcher(cluster, n, series, 1.0, threading.Event()) for n in cluster.nodes]
    try:
        for _ in range(3):
            samples = {w.node.name: w.sample_once() for w in watchers}
        assert all(s.up for s in samples.values()), samples
        assert [g.name for g in samples["lab1"].gpus] == ["NVIDIA GeForce RTX 3090"] * 2
        assert samples["lab0"].gpus[0].uuid.startswith("GPU-")
        assert samples["lab2"].gpus == [] and samples["lab2"].problems == []
        assert samples["lab0"].disk_free_kib > 0 and samples["lab0"].memory_total_kib > 0
        for n in lab.nodes:
            assert established(n.host, n.port) == 1, n.name
        snap = series.latest()
        assert sorted(snap.nodes) == ["lab0", "lab1", "lab2"]
    finally:
        for w in watchers:
            w.session.close()
        series.close()


def _kill_sessions(node) -> None:
    """End the per-connection sshd processes the node's listener forked (by pid)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == node.proc.pid:
            os.kill(int(stat.parent.name), signal.SIGKILL)


def test_lost_node_is_down_since_then_comes_back(tmp_path):
    lab = Lab(tmp_path / "lab", ["rtx4070"]).start()
    try:
        # Refused connections fail at once: the timeout only bounds the healthy samples.
        cluster = cluster_of(lab, tmp_path, timeout=10.0)
        series = Series(tmp_path / "s.sqlite3")
        w = NodeWatcher(cluster, cluster.nodes[0], series, 1.0, threading.Event())
        assert w.sample_once().up
        node = lab.nodes[0]
        _kill_sessions(node)
        lab.stop_node(node)
        first = w.sample_once()
        assert not first.up and first.down_since == first.ts and "lab0" in first.error
        second = w.sample_once()
        assert not second.up and second.down_since == first.ts and w.failures == 2
        lab.start_node(node)
        back = w.sample_once()
        assert back.up and back.down_since is None and w.failures == 0
        w.session.close()
        series.close()
    finally:
        lab.stop()


def get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_http_endpoints_on_the_lab(lab, tmp_path):
    cluster = cluster_of(lab, tmp_path)
    with Monitor(cluster, tmp_path / "data", MonitorConfig(interval=0.5, port=0)) as mon:
        assert mon.token is None
        wait_for(lambda: len(mon.snapshot().nodes) == 3, timeout=15.0, every=0.2)
        status, body = get(mon.url + "api/cluster")
        assert status == 200
        assert [n["node"] for n in json.loads(body)["nodes"]] == ["lab0", "lab1", "lab2"]
        status, body = get(mon.url + "metrics")
        assert status == 200 and b'DCGM_FI_DEV_GPU_UTIL{Hostname="lab1"' in body
        status, body = get(mon.url + "api/job/nope")
        assert status == 404 and b"no job named" in body
        status, body = get(mon.url + "api/history?node=lab1&seconds=-1")
        assert status == 404 and b"seconds" in body
        status, _ = get(mon.url + "static/../service.py")
        assert status == 404
        status, body = get(mon.url + "jobs")
        assert status == 200 and b"uPlot.iife.min.js" in body


def test_token_required_off_127_0_0_1(lab, tmp_path):
    cluster = cluster_of(lab, tmp_path)
    cfg = MonitorConfig(interval=5, port=0, host="127.0.0.5")
    with Monitor(cluster, tmp_path / "data", cfg) as mon:
        assert mon.token and mon.url.endswith(f"?token={mon.token}")
        base = f"http://127.0.0.5:{mon.port}/"
        assert get(base + "metrics")[0] == 401
        assert get(base + "metrics?token=wrong")[0] == 401
        assert get(base + "metrics", {"Authorization": f"Bearer {mon.token}"})[0] == 200
        assert get(base + f"api/cluster?token={mon.token}")[0] == 200
        cookie = {"Cookie": f"ugro_monitor_token={mon.token}"}
        assert get(base + "api/jobs", cookie)[0] == 200


def test_inv_monitor_refuses_bad_options(inv):
    proc = inv("monitor", "--interval", "soon", check=1)
    assert proc.stderr.strip() == "ugro: --interval: expected a number, got 'soon'"
    proc = inv("monitor", "--port", "99999", check=1)
    assert "Traceback" not in proc.stderr and "--port 99999" in proc.stderr


# -- real consumers: Prometheus and a headless browser ------------------------------------
@pytest.mark.slow
def test_prometheus_scrapes_the_dcgm_series(lab, tmp_path):
    binary = shutil.which("prometheus")
    if not binary:
        pytest.skip("the prometheus binary is missing (apt-get install prometheus)")
    cluster = cluster_of(lab, tmp_path)
    with Monitor(cluster, tmp_path / "data", MonitorConfig(interval=1, port=0)) as mon:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: ugro\n    static_configs: [{{targets: ['127.0.0.1:{mon.port}']}}]\n")
        port = free_port("127.0.0.1")
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
        try:
            query = f"http://127.0.0.1:{port}/api/v1/query?query=DCGM_FI_DEV_GPU_UTIL"

            def series():
                try:
                    result = json.loads(get(query)[1])["data"]["result"]
                except (OSError, ValueError, KeyError):
                    return None
                return result if len(result) == 3 else None

            result = wait_for(series, timeout=40, every=0.2)
        finally:
            proc.terminate()
            proc.wait(10)
    got = sorted((r["metric"]["Hostname"], r["metric"]["gpu"], r["metric"]["modelName"],
                  r["value"][1]) for r in result)
    assert got == [("lab0", "0", "NVIDIA GeForce RTX 4070", "3"),
                   ("lab1", "0", "NVIDIA GeForce RTX 3090", "98"),
                   ("lab1", "1", "NVIDIA GeForce RTX 3090", "0")]
    assert all(r["metric"]["UUID"].startswith("GPU-") for r in result)


def chromium(url: str, tmp_path: Path, screenshot: Path) -> str:
    args = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,1400",
            "--virtual-time-budget=4000"]
    subprocess.run(args + [f"--screenshot={screenshot}", url], capture_output=True, timeout=60)
    return subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True,
                          timeout=60).stdout


@pytest.mark.slow
def test_dashboard_pages_render_in_a_real_browser(lab, tmp_path):
    if not shutil.which("chromium"):
        pytest.skip("chromium is missing (apt-get install chromium)")
    cluster = cluster_of(lab, tmp_path)
    write_jobs(tmp_path / "data")
    with Monitor(cluster, tmp_path / "data", MonitorConfig(interval=0.5, port=0)) as mon:
        def drawn(n):
            # What the cluster page asks for, over HTTP as it does: the last hour, which
            # averages into 5 s buckets on multiples of 5 s; every chart needs two of them to
            # draw a line.
            h = json.loads(get(f"{mon.url}api/history?node={n}&seconds=3600")[1])
            return [len(h["load"]["ts"])] + [len(g["ts"]) for g in h["gpus"]]

        wait_for(lambda: all(min(drawn(n)) >= 2 for n in ("lab0", "lab1", "lab2")),
                 timeout=20.0, every=0.2)
        pages = {
            "cluster": "",
            "jobs": "jobs",
            "job": "job/bad_20260101_080000",
            "compare": "compare?jobs=exp_20260101_100000,exp_20260101_090000",
        }
        dom = {}
        for name, path in pages.items():
            dom[name] = chromium(mon.url + path, tmp_path, tmp_path / f"{name}.png")
            assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name
    for node in ("lab0", "lab1", "lab2"):
        assert f'data-node="{node}"' in dom["cluster"]
    assert "NVIDIA GeForce RTX 3090" in dom["cluster"]
    assert 'class="uplot' in dom["cluster"]
    for name in pages:
        points = [int(p.split('"')[0]) for p in dom[name].split('data-points="')[1:]]
        assert points and min(points) >= 2, (name, points)
    assert "exp_20260101_100000" in dom["jobs"] and "no queued jobs" in dom["jobs"]
    assert "RuntimeError: boom" in dom["job"] and "lab1 r2 |" in dom["job"]
    assert 'class="differs"' in dom["compare"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_inv_monitor_prints_the_url_and_stops_cleanly(lab, tmp_path, sig):
    env = {**os.environ, "INVOKE_UGRO_CLUSTER": str(lab.cluster_file(tmp_path / "c.yaml")),
           "INVOKE_UGRO_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "monitor", "--port", "0"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        url = lines[1].split()[1]
        assert url.startswith("http://127.0.0.1:") and get(url + "api/cluster")[0] == 200
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.strip().endswith("ugro monitor: stopped") and "Traceback" not in err
