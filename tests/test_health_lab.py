"""`inv health` against real sshd daemons on loopback."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.lab


def test_health_reports_each_nodes_gpus(lab, inv, tmp_path):
    cluster = lab.cluster_file(tmp_path / "c.yaml")
    r = inv("health", "--json", cluster=cluster, check=0)
    nodes = {n["node"]: n for n in json.loads(r.stdout)["nodes"]}
    assert set(nodes) == {"lab0", "lab1", "lab2"}
    assert all(n["healthy"] for n in nodes.values()), nodes
    assert [g["name"] for g in nodes["lab0"]["gpus"]] == ["NVIDIA GeForce RTX 4070"]
    assert nodes["lab0"]["gpus"][0]["memory_total_mib"] == 8188
    assert [g["index"] for g in nodes["lab1"]["gpus"]] == [0, 1]
    assert nodes["lab1"]["gpus"][0]["utilization_pct"] == 98
    assert nodes["lab2"]["gpus"] == []
    assert nodes["lab0"]["torch"].startswith("2.")
    # Driver versions differ between the stand-ins: that is drift and is called out.
    assert any(d.startswith("driver differs") for d in json.loads(r.stdout)["drift"])
    state = json.loads((inv.data / "cluster_state.json").read_text())
    assert [n["node"] for n in state["nodes"]] == ["lab0", "lab1", "lab2"]


def test_health_table_and_drift(lab, inv, tmp_path):
    r = inv("health", cluster=lab.cluster_file(tmp_path / "c.yaml"), check=0)
    assert "NVIDIA GeForce RTX 4070" in r.stdout
    assert "DRIFT: driver differs" in r.stdout
    assert (tmp_path / "logs" / "health.log").read_text().count("lab0=ok") == 1


def test_stopped_node_is_unreachable_within_timeout_others_fine(lab, inv, tmp_path):
    cluster = lab.cluster_file(tmp_path / "c.yaml", timeout=10)
    lab.stop_node(lab.nodes[1])
    try:
        start = time.monotonic()
        r = inv("health", "--json", cluster=cluster, check=1)
        elapsed = time.monotonic() - start
    finally:
        lab.start_node(lab.nodes[1])
    nodes = {n["node"]: n for n in json.loads(r.stdout)["nodes"]}
    assert not nodes["lab1"]["healthy"]
    assert "connection refused" in nodes["lab1"]["problems"][0]
    assert nodes["lab0"]["healthy"] and nodes["lab2"]["healthy"]
    assert elapsed < 30  # bounded by the per-node timeout, not a hang


def test_missing_gpu_and_broken_nvidia_smi_are_problems(lab, inv, tmp_path):
    node = lab.nodes[0]
    lab.set_gpus(node, "broken")
    try:
        r = inv("health", "--nodes", "lab0", "--json",
                cluster=lab.cluster_file(tmp_path / "c.yaml"), check=1)
    finally:
        lab.set_gpus(node, "rtx4070")
    (report,) = json.loads(r.stdout)["nodes"]
    assert report["problems"][0].startswith("nvidia-smi failed: NVIDIA-SMI has failed")


def test_changed_host_key_is_refused(lab, inv, tmp_path):
    cluster = lab.cluster_file(tmp_path / "c.yaml")
    node = lab.nodes[2]
    lab.new_host_key(node)
    try:
        r = inv("health", "--nodes", "lab2", cluster=cluster, check=1)
        assert "host key CHANGED" in r.stdout
        assert "inv trust-hosts --nodes lab2 --replace" in r.stdout
        # Without --replace, trust-hosts refuses too: a changed key needs a decision.
        r = inv("trust-hosts", "--nodes", "lab2", cluster=cluster, check=1)
        assert "REFUSED" in r.stdout
        r = inv("trust-hosts", "--nodes", "lab2", "--replace", cluster=cluster, check=0)
        assert "replaced" in r.stdout
        inv("health", "--nodes", "lab2", cluster=cluster, check=0)
    finally:
        lab.write_known_hosts()


def test_unknown_host_key_refused_then_trusted(lab, inv, tmp_path):
    cluster = lab.cluster_file(tmp_path / "c.yaml")
    lab.write_known_hosts([n for n in lab.nodes if n.name != "lab1"])
    try:
        r = inv("health", cluster=cluster, check=1)
        assert "lab1: unknown host key" in r.stdout
        assert "SHA256:" in r.stdout and "inv trust-hosts --nodes lab1" in r.stdout
        r = inv("trust-hosts", cluster=cluster, check=0)
        assert "trusted" in r.stdout and "already trusted" in r.stdout
        fp = [line for line in r.stdout.splitlines() if "lab1" in line][0]
        assert "SHA256:" in fp
        inv("health", cluster=cluster, check=0)
    finally:
        lab.write_known_hosts()


def test_fab_host_task_reaches_node_as_configured(lab, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    cluster = lab.cluster_file(tmp_path / "c.yaml")
    env = dict(os.environ, FABRIC_UGRO_CLUSTER=str(cluster),
               FABRIC_UGRO_DATA_DIR=str(tmp_path / "data"),
               FABRIC_UGRO_LOG_DIR=str(tmp_path / "logs"))
    # `python -m fabric` is `fab`, from this interpreter's environment.
    r = subprocess.run([sys.executable, "-m", "fabric", "-H", "lab1", "health", "--json"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    (report,) = json.loads(r.stdout)["nodes"]
    assert report["node"] == "lab1"
    assert report["address"] == f"127.0.0.3:{lab.nodes[1].port}"
    assert len(report["gpus"]) == 2


def test_connections_turn_off_nagle(lab, tmp_path):
    # An SSH exchange is small messages waiting for each other's answers: with Nagle's
    # algorithm on, each waited for the 40 ms delayed-ACK timer (the benchmarks time it).
    import socket

    from ugro.cluster import Session
    from ugro.config import load_cluster

    cluster = load_cluster(lab.cluster_file(tmp_path / "c.yaml"))
    with Session(cluster) as session:
        sock = session.context(cluster.nodes[0]).transport.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert session.run(cluster.nodes[0], "echo ok").stdout == "ok\n"
