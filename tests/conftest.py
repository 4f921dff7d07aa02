from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sshlab import Lab  # noqa: E402

from ugro import procs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# A test run started in the background of a shell without job control inherits SIGINT
# ignored, and so would every `inv` it starts: the Ctrl-C tests would then wait forever.
# A handler (unlike SIG_IGN) is reset on exec, so the children start with the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """Three real sshd nodes on 127.0.0.2-4: an RTX 4070, two RTX 3090s, and no GPU."""
    lab = Lab(tmp_path_factory.mktemp("lab"), ["rtx4070", "2x3090", None])
    lab.start()
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def lab_project(lab):
    """Each node's project holds the training scripts (what `inv sync` would copy)."""
    for node in lab.nodes:
        shutil.copytree(ROOT / "scripts", node.project / "scripts", dirs_exist_ok=True)
    return lab


def tagged_pids(job_id: str) -> list[int]:
    """Processes on this machine (every lab node lives here) tagged with the job id."""
    return procs.tagged(b"UGRO_JOB_ID", job_id.encode())


def meta_of(data: Path, job_id: str) -> dict:
    """A job's record in a data directory."""
    return json.loads((data / "experiments" / job_id / "metadata.json").read_text())


def begun(jobs, name: str, nodes=("a", "b")) -> str:
    """A new job's first record (PENDING), one rank on each of `nodes`."""
    job_id = jobs.create(name)
    jobs.begin(job_id, name, cluster_file="c.yaml", world_size=len(nodes), master="x:1",
               nodes={n: {"node_rank": i, "nproc": 1} for i, n in enumerate(nodes)})
    return job_id


def wait_for(predicate, timeout=60.0, every=0.1):
    """The predicate's first true value, polled every `every` seconds for `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def inv(tmp_path):
    """Run `inv ...` from the project root with its state in tmp_path."""

    def run(*args, cluster=None, timeout=120, env=None, check=None):
        e = dict(os.environ)
        e["INVOKE_UGRO_DATA_DIR"] = str(tmp_path / "data")
        e["INVOKE_UGRO_LOG_DIR"] = str(tmp_path / "logs")
        if cluster:
            e["INVOKE_UGRO_CLUSTER"] = str(cluster)
        e.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "invoke", *args], cwd=ROOT, env=e,
            capture_output=True, text=True, timeout=timeout,
        )
        if check is not None:
            assert proc.returncode == check, proc.stdout + proc.stderr
        return proc

    run.data = tmp_path / "data"
    return run


def write_jobs(data: Path) -> None:
    """A running job with metrics and logs, a finished one and a failed one."""
    specs = [
        ("exp_20260101_100000", "RUNNING", None),
        ("exp_20260101_090000", "COMPLETED", None),
        ("bad_20260101_080000", "FAILED", {"summary": "lab1 rank 1 exited with code 1",
                                           "tail": ["Traceback ...", "RuntimeError: boom"]}),
    ]
    for job_id, status, failure in specs:
        d = data / "experiments" / job_id
        (d / "logs").mkdir(parents=True)
        meta = {"job_id": job_id, "name": job_id.split("_")[0], "status": status,
                "world_size": 3, "started_at": "2026-01-01T10:00:00+00:00",
                "nodes": {"lab0": {"node_rank": 0, "nproc": 1}, "lab1": {"node_rank": 1,
                                                                         "nproc": 2}}}
        if status != "RUNNING":
            meta["ended_at"] = "2026-01-01T10:30:00+00:00"
        if failure:
            meta.update(failure=failure, error=failure["summary"])
        (d / "metadata.json").write_text(json.dumps(meta))
        (d / "config.json").write_text(json.dumps({"launch": {"epochs": 3, "lr": 0.003}}))
        scale = 1.0 if status == "RUNNING" else 1.3
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "epoch": s / 40, "loss": scale * 4 / (1 + s / 20),
                        "samples_per_sec": 120.0}) + "\n" for s in range(0, 120, 5)))
        for node, ranks in (("lab0", [0]), ("lab1", [1, 2])):
            (d / "logs" / f"{node}.log").write_text("".join(
                f"{node} r{r} | step {s} | loss {4 / (1 + s / 20):.4f}\n"
                for s in range(0, 120, 20) for r in ranks))
