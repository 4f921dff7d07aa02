from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sshlab import Lab  # noqa: E402

from ugro import procs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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
