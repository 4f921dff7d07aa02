"""What `inv monitor` costs: SSH connections per node and control-node CPU at the default interval.

Standalone: starts a 3-node sshd lab (tests/sshlab.py) on loopback, runs the monitor in this
process for --seconds (default 60) at --interval (default 5), and reports
- the SSH connections each node's sshd accepted (TCP connections seen to its port, sampled
  every second, plus the sshd processes forked per connection), and
- this process's CPU time (user + system) over the run, less the measuring thread's own, as a
  percentage of one core, and
- how long `inv status --json` takes while the monitor runs (it answers from the latest
  sample), next to `inv --list` (Python and Invoke start-up alone) and `inv status --refresh`
  (a health probe of every node over SSH): the median wall time of --runs runs each.

    .venv/bin/python benchmarks/monitor_cost.py [--seconds 60] [--interval 5] [--runs 5]
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sshlab import Lab  # noqa: E402

from ugro.config import load_cluster  # noqa: E402
from ugro.monitor.service import Monitor, MonitorConfig  # noqa: E402


def connections(host: str, port: int) -> set[str]:
    """Local ends of the established TCP connections to host:port."""
    addr = "".join(f"{int(o):02X}" for o in reversed(host.split("."))) + f":{port:04X}"
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[2] == addr and cols[3] == "01":
            found.add(cols[1])
    return found


def forked(pid: int) -> set[int]:
    """The per-connection processes an sshd listener has forked."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.add(int(stat.parent.name))
    return out


def inv_seconds(args: list[str], env: dict, runs: int) -> tuple[float, list[dict]]:
    """The median wall time of `inv ARGS` over `runs` runs, and what each printed as JSON."""
    times, views = [], []
    for _ in range(runs):
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        times.append(time.monotonic() - started)
        if proc.returncode != 0:
            raise SystemExit(f"inv {' '.join(args)}: {proc.stderr.strip()}")
        if "--json" in args:
            views.append(json.loads(proc.stdout))
    return statistics.median(times), views


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ugro-monitor-cost-") as tmp:
        lab = Lab(Path(tmp) / "lab", ["rtx4070", "2x3090", None]).start()
        try:
            cluster = load_cluster(str(lab.cluster_file(Path(tmp) / "cluster.yaml")), ROOT)
            seen = {n.name: set() for n in lab.nodes}
            children = {n.name: set() for n in lab.nodes}
            config = MonitorConfig(interval=args.interval, port=0)
            with Monitor(cluster, Path(tmp) / "data", config) as mon:
                time.sleep(min(args.interval, 2.0))  # connect before measuring
                cpu0, wall0, own0 = os.times(), time.monotonic(), time.thread_time()
                while time.monotonic() - wall0 < args.seconds:
                    for n in lab.nodes:
                        seen[n.name] |= connections(n.host, n.port)
                        children[n.name] |= forked(n.proc.pid)
                    time.sleep(1.0)
                # This thread's /proc scans are the measurement's cost, not the monitor's.
                cpu1, wall1, own1 = os.times(), time.monotonic(), time.thread_time()
                samples = sum(w.samples for w in mon.sampler.nodes)
                env = {**os.environ, "INVOKE_UGRO_CLUSTER": str(cluster.source),
                       "INVOKE_UGRO_DATA_DIR": str(Path(tmp) / "data"),
                       "INVOKE_UGRO_LOG_DIR": str(Path(tmp) / "logs")}
                listing, _ = inv_seconds(["--list"], env, args.runs)
                status, views = inv_seconds(["status", "--json"], env, args.runs)
                probed, _ = inv_seconds(["status", "--refresh", "--json"], env, args.runs)
                sources = {v["source"]["from"] for v in views}
        finally:
            lab.stop()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system) - (own1 - own0)
    wall = wall1 - wall0
    print(f"monitor over {wall:.0f}s at --interval {args.interval:g}, {len(seen)} lab nodes, "
          f"{samples} node samples")
    for name in seen:
        print(f"  {name}: {len(seen[name])} SSH connection(s), "
              f"{len(children[name])} sshd session process(es)")
    print(f"  control-node CPU: {cpu:.2f}s = {100 * cpu / wall:.2f}% of one core "
          f"(target < 2%)")
    print(f"  inv status with the monitor running: {status:.2f}s (answered from: "
          f"{', '.join(sorted(sources))}; target < 0.5 s); inv --list {listing:.2f}s; "
          f"inv status --refresh {probed:.2f}s (medians of {args.runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
