"""How long the queue leaves nodes idle between jobs, next to a plain launch's start-up.

    python benchmarks/queue_gap.py [--repeat 3] [--nodes 2]

On an sshd lab (tests/sshlab.py, loopback only), per round:
  plain   `inv launch --detach` of benchmarks/bench_job.py --mode hold: from the command
          to every rank running;
  gap     a job A that ends by itself, and a job B queued behind it on the same nodes:
          from A's last node writing its exit code to every rank of B running.
The queue's own cost is gap - plain (target: at most 1 s). bench_job.py imports no torch, so
both figures are UGRO's control plane and torchrun's start-up, nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sshlab import Lab  # noqa: E402

from ugro import procs  # noqa: E402

JOB = "benchmarks/bench_job.py"


def ranks_running(job_id: str) -> int:
    """Ranks of this job alive on this machine (every lab node lives here)."""
    n = 0
    for pid in procs.tagged(b"UGRO_JOB_ID", job_id.encode()):
        env = procs.environ(pid) or {}
        n += b"LOCAL_RANK" in env
    return n


def job_id(data: Path, name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p.name for p in (data / "experiments").glob(f"{name}_*")]
        if found:
            return found[0]
        time.sleep(0.01)
    raise SystemExit(f"no job {name} recorded")


def wait(predicate, timeout: float, what: str, every: float = 0.01) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.time()
        time.sleep(every)
    raise SystemExit(f"timed out: {what}")


def status(data: Path, job: str) -> str:
    return json.loads((data / "experiments" / job / "metadata.json").read_text())["status"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ugro-queue-gap-") as tmp:
        tmp = Path(tmp)
        lab = Lab(tmp / "lab", [None] * args.nodes).start()
        try:
            for node in lab.nodes:
                (node.project / "benchmarks").mkdir(parents=True, exist_ok=True)
                (node.project / JOB).write_text((ROOT / JOB).read_text())
            cluster = lab.cluster_file(tmp / "lab.yaml")
            plain, gaps = [], []
            for round_ in range(args.repeat):
                data = tmp / f"data{round_}"
                env = dict(os.environ, INVOKE_UGRO_CLUSTER=str(cluster),
                           INVOKE_UGRO_DATA_DIR=str(data), INVOKE_UGRO_LOG_DIR=str(tmp / "logs"))

                def inv(*argv, env=env):
                    return subprocess.Popen([sys.executable, "-m", "invoke", "launch", *argv],
                                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL)

                want = args.nodes
                t0 = time.time()
                launch = inv("--name", "plain", "--detach", "--script", JOB, "--script-args",
                             "--mode hold --seconds 3")
                plain_id = job_id(data, "plain")  # poll while it runs: the ranks end soon
                plain.append(wait(lambda j=plain_id, w=want: ranks_running(j) >= w, 60,
                                  "plain ranks") - t0)
                launch.wait()
                wait(lambda j=plain_id, d=data: status(d, j) == "COMPLETED", 60, "plain ends", 0.1)

                inv("--name", "first", "--queue", "--detach", "--script", JOB, "--script-args",
                    "--mode hold --seconds 3").wait()
                first = job_id(data, "first")
                inv("--name", "second", "--queue", "--detach", "--script", JOB,
                    "--script-args", "--mode hold --seconds 1").wait()
                second = job_id(data, "second")
                t_running = wait(lambda j=second, w=want: ranks_running(j) >= w, 60, "queued ranks")
                ended = max((n.project / "data/experiments" / first / "nodes" / n.name /
                             "exit_code").stat().st_mtime for n in lab.nodes)
                gaps.append(t_running - ended)
                wait(lambda j=second, d=data: status(d, j) == "COMPLETED", 60, "second ends", 0.1)
                print(f"round {round_ + 1}: plain launch {plain[-1]:.2f} s, "
                      f"queue gap {gaps[-1]:.2f} s", flush=True)
        finally:
            lab.stop()
    p, g = statistics.median(plain), statistics.median(gaps)
    print(f"\n{args.nodes} nodes, median of {args.repeat}: plain launch -> ranks running "
          f"{p:.2f} s; job end -> next queued job's ranks running {g:.2f} s; "
          f"added by the queue {g - p:+.2f} s (target <= 1 s: {'met' if g - p <= 1 else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
