"""`inv logs/results/status/jobs/compare` and `fab -H node logs` after real jobs on the sshd lab.

One module fixture runs two 3-node jobs once: `bad` (rank 1 crashes at step 3) attached, then
`good` detached, which is watched while it runs (`inv status`) and followed to its end
(`inv logs --follow`). Every test then only reads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.lab, pytest.mark.slow]

STEPS = "--steps-per-epoch 10"


class Ran:
    """The jobs the fixture ran, and how to ask about them."""

    def __init__(self, lab, tmp):
        self.lab, self.tmp = lab, tmp
        self.cluster = lab.cluster_file(tmp / "lab.yaml")
        self.data = tmp / "data"
        self.env = dict(os.environ)
        for tool in ("INVOKE", "FABRIC"):
            self.env.update({f"{tool}_UGRO_CLUSTER": str(self.cluster),
                             f"{tool}_UGRO_DATA_DIR": str(self.data),
                             f"{tool}_UGRO_LOG_DIR": str(tmp / "logs")})

    def inv(self, *args, check: int | None = 0, timeout=120):
        return self._run([sys.executable, "-m", "invoke", *args], check, timeout)

    def fab(self, *args, check: int | None = 0):
        # The venv's own fab: a fresh machine has none on PATH.
        return self._run([str(Path(sys.executable).parent / "fab"), *args], check, 60)

    def _run(self, argv, check, timeout):
        r = subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check is not None:
            assert r.returncode == check, f"{argv}\n{r.stdout}\n{r.stderr}"
        return r

    def job(self, name: str) -> str:
        (job_id,) = [p.name for p in (self.data / "experiments").iterdir()
                     if p.name.startswith(f"{name}_")]
        return job_id

    def meta(self, name: str) -> dict:
        return json.loads((self.data / "experiments" / self.job(name) / "metadata.json")
                          .read_text())


@pytest.fixture(scope="module")
def ran(lab, tmp_path_factory):
    for node in lab.nodes:
        shutil.copytree(ROOT / "scripts", node.project / "scripts", dirs_exist_ok=True)
    ran = Ran(lab, tmp_path_factory.mktemp("views"))
    ran.launch_bad = ran.inv("launch", "--name", "bad", "--epochs", "1", "--nproc-per-node", "1",
                             "--script-args", f"{STEPS} --crash-at-step 3 --crash-rank 1",
                             check=1, timeout=240)
    ran.inv("launch", "--name", "good", "--epochs", "1", "--nproc-per-node", "1", "--detach",
            "--script-args", f"{STEPS} --log-every 2 --sleep-per-step 1")
    log = ran.data / "experiments" / ran.job("good") / "logs" / "lab0.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "| step 2 " in log.read_text()):
        assert time.monotonic() < deadline, "good never logged a step"
        time.sleep(0.1)
    ran.status_running = ran.inv("status", "--json")
    start = time.monotonic()
    ran.follow = ran.inv("logs", "good", "--follow")
    ran.follow_seconds = time.monotonic() - start
    return ran


def test_follow_streams_the_running_job_and_ends_with_it(ran):
    assert ran.meta("good")["status"] == "COMPLETED"
    lines = ran.follow.stdout.splitlines()
    assert "lab0 r0 | step 2 | epoch 1" in ran.follow.stdout
    assert lines[-1].startswith("lab0 r0 | done: epochs=1") or any(
        line.startswith("lab0 r0 | done: epochs=1") for line in lines)
    assert {line.split()[0] for line in lines} == {"lab0", "lab1", "lab2"}
    assert ran.follow_seconds < 60


def test_status_shows_nodes_gpus_and_the_running_jobs_progress(ran):
    view = json.loads(ran.status_running.stdout)
    assert [n["node"] for n in view["nodes"]] == ["lab0", "lab1", "lab2"]
    lab1 = view["nodes"][1]
    assert [g["name"] for g in lab1["gpus"]] == ["NVIDIA GeForce RTX 3090"] * 2
    assert lab1["gpus"][0]["memory_used_mib"] == 20113 and lab1["gpus"][0]["utilization_pct"] == 98
    (running,) = view["running"]
    assert running["job_id"] == ran.job("good") and running["status"] == "RUNNING"
    assert running["step"] >= 2 and running["epochs"] == 1 and running["world_size"] == 3
    assert [e["job_id"] for e in view["recent"]] == [ran.job("bad")]
    # Now, from the saved health check, with its age, and both jobs in the history.
    r = ran.inv("status")
    assert "health checked" in r.stdout and "ago" in r.stdout
    assert "NVIDIA GeForce RTX 4070" in r.stdout and "19.6/24.0 GiB" in r.stdout
    assert "Running jobs\nnone" in r.stdout
    recent = r.stdout.split("Recent jobs")[1]
    assert recent.index(ran.job("good")) < recent.index(ran.job("bad"))
    assert "rank 1 failed first" in recent


def test_results_of_the_completed_job(ran):
    metrics = [json.loads(line) for line in
               (ran.data / "experiments" / ran.job("good") / "metrics.jsonl").read_text()
               .splitlines()]
    r = ran.inv("results", "good")
    assert "status       COMPLETED" in r.stdout
    assert "world size   3 (1 per node)" in r.stdout
    assert "lab1: 2x NVIDIA GeForce RTX 3090" in r.stdout and "lab2: none (CPU)" in r.stdout
    assert f"final loss   {metrics[-1]['loss']:.4f}" in r.stdout
    assert "steps        10 (epoch 1)" in r.stdout
    assert "epoch_1.pt (1, on lab0)" in r.stdout
    view = json.loads(ran.inv("results", "good", "--json").stdout)
    assert view["status"] == "COMPLETED" and view["world_size"] == 3
    assert view["metrics"]["final_loss"] == metrics[-1]["loss"]
    assert view["metrics"]["source"] == "metrics.jsonl"
    assert [n["exit_code"] for n in view["nodes"]] == [0, 0, 0]


def test_results_of_the_failed_job_name_the_failing_node(ran):
    failure = ran.meta("bad")["failure"]
    assert failure["rank"] == 1
    r = ran.inv("results", "bad")
    assert "status       FAILED" in r.stdout
    assert f"error        {failure['node']} rank 1 failed first" in r.stdout
    assert f"failed       node {failure['node']}, rank 1, exit code" in r.stdout
    assert f"last lines of {failure['node']} rank 1:" in r.stdout
    assert "crash-at-step: rank 1 exits with status 3 at step 3" in r.stdout
    view = json.loads(ran.inv("results", "bad", "--json").stdout)
    assert view["status"] == "FAILED" and view["failure"]["node"] == failure["node"]


def test_logs_filters(ran):
    everything = ran.inv("logs", "bad").stdout.splitlines()
    assert {line.split()[0] for line in everything} == {"lab0", "lab1", "lab2"}
    assert any(line.startswith("lab1 r1 | crash-at-step") for line in everything)
    lab1 = ran.inv("logs", "bad", "--node", "lab1").stdout.splitlines()
    assert lab1 and all(line.startswith("lab1 ") for line in lab1)
    rank1 = ran.inv("logs", "bad", "--rank", "1").stdout.splitlines()
    assert rank1 and all(line.startswith("lab1 r1 | ") for line in rank1)
    tail = ran.inv("logs", "bad", "--tail", "2").stdout.splitlines()
    assert len(tail) == 6 and tail[:2] == [x for x in everything if x.startswith("lab0")][-2:]
    rows = [json.loads(x) for x in
            ran.inv("logs", "bad", "--rank", "1", "--json").stdout.splitlines()]
    assert rows and all(x["node"] == "lab1" and x["rank"] == 1 for x in rows)


def test_missing_control_copy_is_fetched_from_the_node(ran):
    log = ran.data / "experiments" / ran.job("good") / "logs" / "lab2.log"
    before = log.read_text()
    log.unlink()
    r = ran.inv("logs", "good", "--node", "lab2")
    assert r.stdout == before and r.stderr == ""
    assert log.read_text() == before


def test_fab_logs_on_a_host(ran):
    r = ran.fab("-H", "lab1", "logs")
    assert f"lab1: job {ran.job('good')}" in r.stderr  # the latest job there
    assert r.stdout and all(line.startswith("lab1 ") for line in r.stdout.splitlines())
    r = ran.fab("-H", "lab1", "logs", "--job", "bad", "--rank", "1", "--tail", "1")
    assert r.stdout.splitlines() == [
        x for x in ran.inv("logs", "bad", "--rank", "1").stdout.splitlines()][-1:]
    r = ran.fab("-H", "lab2", "logs", "--job", "nope", check=1)
    # Other tests share the lab, so lab2 may hold their jobs too.
    assert r.stderr.startswith("ugro: lab2: no job named 'nope' here; ")
    assert len(r.stderr.strip().splitlines()) == 1


def test_jobs_and_compare(ran):
    rows = json.loads(ran.inv("jobs", "--json").stdout)
    assert [(x["name"], x["status"]) for x in rows] == [("good", "COMPLETED"), ("bad", "FAILED")]
    assert [x["job_id"] for x in json.loads(ran.inv("jobs", "--status", "failed", "--json")
                                            .stdout)] == [ran.job("bad")]
    table = ran.inv("jobs", "--name", "good").stdout
    assert ran.job("good") in table and ran.job("bad") not in table
    r = ran.inv("compare", "good", "bad")
    marked = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("*")}
    assert {"script_args", "status"} <= marked and "epochs" not in marked
    view = json.loads(ran.inv("compare", "good", "bad", "--json").stdout)
    assert view["jobs"] == [ran.job("good"), ran.job("bad")]


def test_unknown_job_lists_the_closest(ran):
    r = ran.inv("results", "goood", check=1)
    assert r.stderr.strip() == "ugro: no job named 'goood'; did you mean: good"
