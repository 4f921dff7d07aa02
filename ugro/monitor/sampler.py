"""The sampling loops: one thread per node over one persistent SSH connection, one for jobs.

Each node has its own `Session` (so its connection is opened once and reused by every sample)
and its own thread (so a slow or dead node never delays the others). A failed sample closes the
connection; the next attempt reconnects after an exponential backoff, and until one succeeds the
node is written as down since the first failure. Nothing a node does ends the monitor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .. import commands
from ..cluster import Session
from ..config import Cluster, Node
from ..jobs import Jobs
from ..state import is_active
from . import progress
from .sample import NodeSample, parse_sample
from .series import Series

MAX_BACKOFF = 300.0  # seconds between attempts to reach a node that stays down


def backoff(interval: float, failures: int) -> float:
    """Seconds before the next attempt after `failures` failures in a row."""
    if failures <= 0:
        return interval
    return min(MAX_BACKOFF, max(interval, interval * 2 ** (failures - 1)))


def monitored_nodes(cluster: Cluster) -> list[Node]:
    """The training nodes and the master (when it does not train), each once."""
    nodes = list(cluster.nodes)
    if all(n.name != cluster.master.name for n in nodes):
        nodes.insert(0, cluster.master)
    return nodes


class NodeWatcher:
    """Samples one node every `interval` seconds until stopped."""

    def __init__(self, cluster: Cluster, node: Node, series: Series, interval: float,
                 stop: threading.Event, clock: Callable[[], float] = time.time):
        self.node = node
        self.series = series
        self.interval = interval
        self.stop = stop
        self.clock = clock
        self.timeout = max(cluster.health_timeout, 1.0)
        self.session = Session(cluster, self.timeout)
        self.command = commands.monitor_sample(node)
        self.failures = 0
        self.down_since: float | None = None
        self.samples = 0

    def sample_once(self) -> NodeSample:
        ts = self.clock()
        answer = self.session.run(self.node, self.command, timeout=self.timeout)
        error = answer.error
        if error is None:
            try:
                sample = parse_sample(self.node.name, ts, answer.stdout)
            except ValueError as exc:
                why = (answer.stderr.strip().splitlines() or [str(exc)])[-1]
                error = f"{self.node.name}: sample failed (exit {answer.exited}): {why}"
        if error is not None:
            # The connection may be half-dead; the next attempt starts a new one.
            self.session.close()
            self.failures += 1
            self.down_since = self.down_since or ts
            sample = NodeSample(self.node.name, ts, up=False, error=error,
                                down_since=self.down_since)
        else:
            self.failures, self.down_since = 0, None
        self.series.add_node(sample)
        self.samples += 1
        return sample

    def run(self) -> None:
        try:
            next_at = time.monotonic()
            while not self.stop.is_set():
                self.sample_once()
                next_at += backoff(self.interval, self.failures)
                next_at = max(next_at, time.monotonic())  # a slow round is not made up for
                self.stop.wait(next_at - time.monotonic())
        finally:
            self.session.close()


class JobWatcher:
    """Records the progress of the active and recent jobs every `interval` seconds, and that
    the monitor is alive (`Series.beat`: `inv status` answers from the samples while it is)."""

    def __init__(self, data_dir, series: Series, interval: float, stop: threading.Event,
                 clock: Callable[[], float] = time.time):
        self.jobs = Jobs(data_dir)
        self.series = series
        self.interval = interval
        self.stop = stop
        self.clock = clock
        self._ended: set[str] = set()  # finished jobs already recorded once in their end state

    def sample_once(self) -> list[dict]:
        now = self.clock()
        records = []
        for job_id in progress.watched(self.jobs):
            if job_id in self._ended:
                continue
            record = progress.job_progress(self.jobs, job_id, now)
            if not is_active(record["status"]):
                self._ended.add(job_id)
            self.series.add_job(now, record)
            records.append(record)
        return records

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample_once()
            self.series.beat(self.clock(), self.interval)
            self.stop.wait(self.interval)


class Sampler:
    """Every node's watcher and the job watcher, each in its own daemon thread."""

    def __init__(self, cluster: Cluster, data_dir, series: Series, interval: float = 5.0):
        self.stop_event = threading.Event()
        self.nodes = [NodeWatcher(cluster, n, series, interval, self.stop_event)
                      for n in monitored_nodes(cluster)]
        self.job_watcher = JobWatcher(data_dir, series, interval, self.stop_event)
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        loops = [(w.run, f"ugro-monitor-{w.node.name}") for w in self.nodes]
        loops.append((self.job_watcher.run, "ugro-monitor-jobs"))
        for target, name in loops:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
