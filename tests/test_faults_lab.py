"""The fault suite: what UGRO does when nodes hang, die or lie, disks fill and records rot.

Every case asserts the final record, the exit code, the one-line message and that no process
of the job is left on any node (every lab node lives on this machine). Freezing a node is
SIGSTOP of its sshd and that sshd's children; every test that freezes thaws in `finally`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, meta_of, tagged_pids, wait_for

from ugro import procs

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LONG = "--steps-per-epoch 1000 --sleep-per-step 0.2"
LOST_AFTER = 4.0
ENDED = ("COMPLETED", "FAILED", "CANCELLED")


def only_job(data: Path) -> str:
    (job,) = [p.name for p in (data / "experiments").iterdir()]
    return job


def one_line(text: str) -> str:
    """The one error line; preflight's notes (a driver that differs between lab nodes) aside."""
    assert "Traceback" not in text and "No existing session" not in text, text
    lines = [x for x in text.strip().splitlines() if not x.startswith("ugro: note: ")]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def cluster(lab_project, tmp_path):
    """lab0 and lab1 (two nodes keep two shared cores quick), lost after 4 s of silence."""
    data = lab_project.cluster_dict(lab_project.nodes[:2])
    data["cluster"]["lost_after"] = LOST_AFTER
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def descendants(pid: int) -> list[int]:
    kids = {}
    for p in procs.pids():
        try:
            ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


@contextmanager
def frozen(node):
    """The node's sshd and its sessions stopped (SIGSTOP), as a hung machine looks over SSH."""
    pids = []
    for p in descendants(node.proc.pid):
        if b"sshd" in (procs.cmdline(p) or b""):
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                continue  # a session that was ending as we looked
            pids.append(p)
    try:
        yield
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass


def launch_detached(inv, cluster, name, script_args=LONG, nodes="lab0,lab1"):
    r = inv("launch", "--name", name, "--nproc-per-node", "1", "--nodes", nodes, "--detach",
            "--script-args", script_args, cluster=cluster, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = [p.name for p in (inv.data / "experiments").iterdir() if p.name.startswith(name)][0]
    return job_id


def test_cancel_of_an_unreachable_node_stays_pending_and_holds_it(inv, cluster, lab):
    job_id = launch_detached(inv, cluster, "cxl")
    try:
        with frozen(lab.nodes[1]):
            t0 = time.monotonic()
            r = inv("cancel", "cxl", "--grace", "1", cluster=cluster)
            took = time.monotonic() - t0
            assert r.returncode == 1
            assert one_line(r.stderr).startswith("cancel pending on lab1 (lab1: ")
            assert "CANCELLING" in r.stdout
            meta = meta_of(inv.data, job_id)
            assert meta["status"] == "CANCELLING"
            assert meta["nodes"]["lab0"]["status"] == "cancelled"
            assert meta["nodes"]["lab1"]["status"] == "cancel pending"
            # Nobody has confirmed lab1's processes gone (they may die with their peers, or
            # not): lab1 stays held.
            r = inv("launch", "--name", "second", "--nodes", "lab1", cluster=cluster, check=1)
            assert f"busy with job {job_id} (CANCELLING on lab1)" in one_line(r.stderr)
        print(f"\ncancel against a frozen node answered in {took:.1f}s")
        # Thawed: the next status retries the cancel and it completes.
        r = inv("status", cluster=cluster, timeout=120)
        meta = wait_for(lambda: (m := meta_of(inv.data, job_id))["status"] == "CANCELLED" and m,
                        60)
        assert {f["status"] for f in meta["nodes"].values()} == {"cancelled"}
        wait_for(lambda: tagged_pids(job_id) == [], 30)
    finally:
        inv("cancel", job_id, cluster=cluster)
        for p in tagged_pids(job_id):
            os.kill(p, signal.SIGKILL)


def test_a_silent_node_is_lost_fast_and_stopped_when_it_is_back(inv, cluster, lab):
    job_id = launch_detached(inv, cluster, "lost")
    wait_for(lambda: "| step" in (inv.data / "experiments" / job_id / "logs/lab0.log")
             .read_text(), 120)
    try:
        with frozen(lab.nodes[1]):
            t0 = time.monotonic()
            meta = wait_for(lambda: (m := meta_of(inv.data, job_id))["status"] != "RUNNING" and m,
                            60)
            detect = time.monotonic() - t0
            assert meta["status"] == "FAILED"
            assert meta["error"].startswith("lost contact with lab1 (no answer for ")
            assert meta["nodes"]["lab1"]["status"] == "lost"
            r = inv("launch", "--name", "other", "--nodes", "lab1", cluster=cluster, check=1)
            assert "processes not yet confirmed stopped on lab1" in one_line(r.stderr)
            r = inv("health", "--timeout", "2", cluster=cluster, timeout=60)
            assert r.returncode == 1
            assert "Traceback" not in r.stdout + r.stderr
            assert "No existing session" not in r.stdout + r.stderr
            assert "lab1: 127.0.0.3" in r.stdout and "did not answer" in r.stdout
        print(f"\nnode silent -> FAILED (lost contact) in {detect:.1f}s with lost_after "
              f"{LOST_AFTER:g}s")
        assert detect < LOST_AFTER + 20  # the final record: stops, outputs, one write
        wait_for(lambda: tagged_pids(job_id) == [], 60)
        meta = wait_for(lambda: (m := meta_of(inv.data, job_id))["nodes"]["lab1"]["status"]
                        == "failed" and m, 30)
        assert meta["nodes"]["lab1"]["stop"] == "stopped"
    finally:
        for p in tagged_pids(job_id):
            os.kill(p, signal.SIGKILL)


def test_stopped_rank_processes_fail_the_job(inv, cluster):
    job_id = launch_detached(inv, cluster, "hung")
    mine = [p for p in tagged_pids(job_id)
            if (procs.environ(p) or {}).get(b"UGRO_NODE") == b"lab1"]
    try:
        t0 = time.monotonic()
        for p in mine:
            with suppress(ProcessLookupError):  # a short-lived one, gone
                os.kill(p, signal.SIGSTOP)
        meta = wait_for(lambda: (m := meta_of(inv.data, job_id))["status"] != "RUNNING" and m, 60)
        detect = time.monotonic() - t0
        assert meta["status"] == "FAILED"
        assert meta["error"].startswith("lab1: the job's processes are stopped (SIGSTOP)")
        print(f"\nrank processes SIGSTOPped -> FAILED in {detect:.1f}s")
        # The stopped processes are killed too: nothing is left holding the node.
        wait_for(lambda: tagged_pids(job_id) == [], 30)
    finally:
        for p in mine:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass


def test_a_killed_node_is_lost_contact_not_an_unknown_exit(inv, cluster, lab):
    job_id = launch_detached(inv, cluster, "killed")
    node = lab.nodes[1]
    t0 = time.monotonic()
    try:
        # The machine gone: its sshd, every session of it, and the job's processes there.
        doomed = descendants(node.proc.pid) + [
            p for p in tagged_pids(job_id)
            if (procs.environ(p) or {}).get(b"UGRO_NODE") == b"lab1"]
        for p in doomed:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.proc.wait()
        meta = wait_for(lambda: (m := meta_of(inv.data, job_id))["status"] != "RUNNING" and m, 60)
        detect = time.monotonic() - t0
    finally:
        lab.start_node(node)
    assert meta["status"] == "FAILED"
    assert meta["error"].startswith("lost contact with lab1"), meta["error"]
    print(f"\nnode killed -> FAILED in {detect:.1f}s: {meta['error']}")
    wait_for(lambda: tagged_pids(job_id) == [], 30)


def test_rank_crash_fails_fast_everywhere(inv, cluster):
    t0 = time.monotonic()
    r = inv("launch", "--name", "crash", "--nproc-per-node", "1", "--nodes", "lab0,lab1",
            "--script-args", "--steps-per-epoch 200 --sleep-per-step 0.2 --crash-at-step 3 "
            "--crash-rank 1", cluster=cluster, timeout=120)
    assert r.returncode == 1
    job_id = only_job(inv.data)
    meta = meta_of(inv.data, job_id)
    assert meta["status"] == "FAILED" and "rank 1 failed first (exit code" in meta["error"]
    assert meta["error"] in r.stderr
    assert tagged_pids(job_id) == []
    print(f"\nrank crash: launch to FAILED in {time.monotonic() - t0:.1f}s")


def test_killed_launcher_and_supervisor(inv, cluster, tmp_path):
    env = dict(os.environ, INVOKE_UGRO_CLUSTER=str(cluster),
               INVOKE_UGRO_DATA_DIR=str(inv.data), INVOKE_UGRO_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "launch", "--name", "k9", "--nproc-per-node", "1",
         "--nodes", "lab0,lab1", "--script-args", "--steps-per-epoch 6"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job_id = wait_for(lambda: (inv.data / "experiments").is_dir() and
                      [p.name for p in (inv.data / "experiments").iterdir()
                       if (p / "metadata.json").exists()], 60)[0]
    wait_for(lambda: meta_of(inv.data, job_id).get("supervisor_pid"), 60)
    proc.kill()  # SIGKILL: the launcher gets no say; the supervisor carries on
    proc.wait()
    # Killed as soon as the supervisor exists: the record may still be PENDING (the nodes are
    # starting); the supervisor takes the job over either way. A node whose start the launch
    # had not yet sent never runs: the job then fails naming it, and stops the other node.
    meta = wait_for(lambda: (m := meta_of(inv.data, job_id))["status"] in ENDED and m, 120)
    assert meta["status"] == "COMPLETED" or (
        meta["status"] == "FAILED" and meta["error"].startswith("the job never started on lab")
    ), meta
    assert tagged_pids(job_id) == []
    # The supervisor SIGKILLed: the job runs on, and status reconciles it from the nodes.
    job2 = launch_detached(inv, cluster, "orphan", "--steps-per-epoch 4")
    os.kill(meta_of(inv.data, job2)["supervisor_pid"], signal.SIGKILL)
    exits = [Path(cluster_node_project(cluster, n)) / "data/experiments" / job2 /
             f"nodes/{n}/exit_code" for n in meta_of(inv.data, job2)["nodes"]]
    wait_for(lambda: all(e.exists() for e in exits), 120)  # ended on every node
    time.sleep(1.5)
    inv("status", cluster=cluster, timeout=120)
    meta = meta_of(inv.data, job2)
    assert meta["status"] == "COMPLETED"
    assert tagged_pids(job2) == []  # nothing of the job left
    last_exit = max(e.stat().st_mtime for e in exits)
    # ended_at is when the last node ended (whole seconds), not when status noticed.
    from datetime import datetime
    ended = datetime.fromisoformat(meta["ended_at"]).timestamp()
    assert abs(ended - last_exit) < 1.5


def cluster_node_project(cluster: Path, name: str) -> str:
    data = yaml.safe_load(cluster.read_text())
    for node in [data["master"], *data["workers"]]:
        if node["name"] == name:
            return node["project_path"]
    raise KeyError(name)


def test_simultaneous_launches_one_wins(inv, cluster, tmp_path):
    env = dict(os.environ, INVOKE_UGRO_CLUSTER=str(cluster),
               INVOKE_UGRO_DATA_DIR=str(inv.data), INVOKE_UGRO_LOG_DIR=str(tmp_path / "logs"))
    argv = [sys.executable, "-m", "invoke", "launch", "--nproc-per-node", "1", "--nodes",
            "lab0,lab1", "--detach", "--script-args", LONG, "--name"]
    both = [subprocess.Popen(argv + [n], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for n in ("twin-a", "twin-b")]
    results = [(p.wait(120), p.stderr.read()) for p in both]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "nodes are busy with job twin-" in one_line(loser)
    job_id = only_job(inv.data)
    inv("cancel", job_id, cluster=cluster, check=0)
    assert meta_of(inv.data, job_id)["status"] == "CANCELLED"
    assert tagged_pids(job_id) == []


def test_host_key_changed_or_unknown_is_refused(inv, lab, tmp_path):
    other = lab.cluster_dict(lab.nodes[:1])
    kh = tmp_path / "known_hosts"
    other["cluster"]["known_hosts"] = str(kh)
    path = tmp_path / "kh.yaml"
    path.write_text(yaml.safe_dump(other, sort_keys=False))
    kh.write_text("")
    r = inv("health", cluster=path, check=1)
    assert "lab0: unknown host key" in r.stdout and "Traceback" not in r.stdout + r.stderr
    wrong = (tmp_path / "wrong")
    subprocess.run(["ssh-keygen", "-t", "ed25519", "-N", "", "-q", "-f", str(wrong)], check=True)
    kind, blob = (tmp_path / "wrong.pub").read_text().split()[:2]
    kh.write_text(f"[{lab.nodes[0].host}]:{lab.nodes[0].port} {kind} {blob}\n")
    r = inv("health", cluster=path, check=1)
    assert "lab0: host key CHANGED" in r.stdout and "Traceback" not in r.stdout + r.stderr


def test_bad_values_are_one_line_before_anything_runs(inv, cluster, tmp_path):
    cases = [
        (("launch", "--name", "-rf"), "invalid job name '-rf'"),
        (("launch", "--name", "x", "--nodes", ","), "--nodes ',': no node names"),
        (("launch", "--name", "x", "--lr", "inf"), "--lr: must be a finite number > 0"),
        (("launch", "--name", "x", "--epochs", "abc"), "--epochs: not a int"),
        (("health", "--timeout", "abc"), "--timeout: not a number: 'abc'"),
        (("health", "--timeout", "-1"), "--timeout: must be a finite number > 0"),
        (("cancel", "x", "--grace", "abc"), "--grace: not a number: 'abc'"),
        (("reset", "--grace", "nan"), "--grace: must be a finite number > 0"),
    ]
    for args, message in cases:
        r = inv(*args, cluster=cluster)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert message in one_line(r.stderr), (args, r.stderr)
    bad = tmp_path / "bad.yaml"
    for text, message in [("cluster: [", "invalid YAML"),
                          ("master: {name: a, ip: 'x;rm -rf /'}", "not a host name"),
                          ("cluster: {lost_after: 0}\nmaster: {name: a, local: true}",
                           "lost_after: must be a number of seconds > 0")]:
        bad.write_text(text)
        r = inv("health", cluster=bad, check=1)
        assert message in one_line(r.stderr)
    assert not (inv.data / "experiments").exists()


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_full_disk_is_one_line_and_the_supervisor_survives(inv, cluster, lab, small_disk):
    data = small_disk / "data"
    env = {"INVOKE_UGRO_DATA_DIR": str(data)}
    filler = fill(small_disk, 0)
    try:
        r = inv("health", cluster=cluster, env=env)
        assert r.returncode == 1
        assert one_line(r.stderr) == (f"ugro: cannot write {data / 'cluster_state.json'}: "
                                      "No space left on device")
        r = inv("launch", "--name", "full", "--nproc-per-node", "1", cluster=cluster, env=env)
        assert r.returncode == 1 and "No space left on device" in one_line(r.stderr)
        exp = data / "experiments"
        assert not exp.exists() or all((p / "metadata.json").exists() for p in exp.iterdir())
    finally:
        filler.unlink()
    # Room for the record but not for the logs: lines are lost, the job is not.
    spew = "import os\nfor i in range(20000):\n    print('spew', os.environ['RANK'], i)\n"
    for node in lab.nodes[:2]:
        (node.project / "spew.py").write_text(spew)
    try:
        inv("health", cluster=cluster, env=env, check=0)
        filler = fill(small_disk, 160_000)
        proc = subprocess.Popen(
            [sys.executable, "-m", "invoke", "launch", "--name", "spew", "--nproc-per-node", "1",
             "--script", "spew.py"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=dict(os.environ, INVOKE_UGRO_CLUSTER=str(cluster),
                                INVOKE_UGRO_DATA_DIR=str(data),
                                INVOKE_UGRO_LOG_DIR=str(small_disk / "logs")))
        # Once the disk is full, make room again: the supervisor's retried record lands.
        wait_for(lambda: os.statvfs(small_disk).f_bavail == 0, 120)
        time.sleep(2)
        filler.unlink()
        code = proc.wait(120)
        err = proc.stderr.read()
    finally:
        filler.unlink(missing_ok=True)
    job_id = only_job(data)
    meta = meta_of(data, job_id)
    assert meta["status"] == "COMPLETED", (meta, err)
    assert code == 0
    gaps = [f.get("log_gap") for f in meta["nodes"].values() if f.get("log_gap")]
    assert gaps and "No space left on device" in gaps[0], meta
    assert tagged_pids(job_id) == []
