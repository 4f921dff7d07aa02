"""`/metrics`: the latest sample in Prometheus text format.

GPU series carry the DCGM exporter's names and labels, so dashboards and alerts written for
dcgm-exporter work unchanged; node and job series are `ugro_*`. A custom collector reads the
latest snapshot on every scrape: nothing is kept in global metric objects, and a node that has
stopped answering simply reports `ugro_node_up 0` and no GPU series.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..state import JobStatus
from .series import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DCGM_LABELS = ["gpu", "UUID", "modelName", "Hostname"]
JOB_STATUSES = tuple(s.value for s in JobStatus)
MIB = 1024 * 1024


def _gauge(name: str, doc: str, labels: list[str], unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels, unit=unit)


class MonitorCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]):
        self.snapshot = snapshot

    def collect(self):
        snap = self.snapshot()
        yield from self._gpus(snap)
        yield from self._nodes(snap)
        yield from self._jobs(snap)

    def _gpus(self, snap: Snapshot):
        families = {
            "util": _gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", DCGM_LABELS),
            "used": _gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).",
                           DCGM_LABELS),
            "free": _gauge("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).",
                           DCGM_LABELS),
            "temp": _gauge("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", DCGM_LABELS),
            "power": _gauge("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", DCGM_LABELS),
        }
        for s in snap.nodes.values():
            if not s.up:
                continue
            for g in s.gpus:
                labels = [str(g.index), g.uuid or "", g.name or "", s.node]
                for key, value in (("util", g.utilization_pct), ("used", g.memory_used_mib),
                                   ("free", g.memory_free_mib), ("temp", g.temperature_c),
                                   ("power", g.power_w)):
                    if value is not None:
                        families[key].add_metric(labels, value)
        yield from families.values()

    def _nodes(self, snap: Snapshot):
        up = _gauge("ugro_node_up", "1 when the node answered its latest sample.", ["node"])
        age = _gauge("ugro_node_sample_age_seconds", "Age of the node's latest sample.", ["node"])
        load = _gauge("ugro_node_load1", "1-minute load average.", ["node"])
        mem_total = _gauge("ugro_node_memory_total_bytes", "Memory installed.", ["node"])
        mem_avail = _gauge("ugro_node_memory_available_bytes", "Memory available.", ["node"])
        disk = _gauge("ugro_node_disk_free_bytes", "Free disk space of the project path.",
                      ["node", "path"])
        for s in snap.nodes.values():
            up.add_metric([s.node], 1.0 if s.up else 0.0)
            age.add_metric([s.node], snap.age(s.ts))
            if not s.up:
                continue
            for family, value in ((load, s.load1), (mem_total, s.memory_total_kib),
                                  (mem_avail, s.memory_available_kib)):
                if value is not None:
                    family.add_metric([s.node], value * (1024 if family is not load else 1))
            if s.disk_free_kib is not None:
                disk.add_metric([s.node, s.disk_path or ""], s.disk_free_kib * 1024)
        yield from (up, age, load, mem_total, mem_avail, disk)

    def _jobs(self, snap: Snapshot):
        labels = ["job", "name"]
        status = _gauge("ugro_job_status", "1 for the job's current status.", labels + ["status"])
        step = _gauge("ugro_job_step", "Latest training step.", labels)
        loss = _gauge("ugro_job_loss", "Latest training loss.", labels)
        rate = _gauge("ugro_job_samples_per_second", "Latest training throughput.", labels)
        stalled = _gauge("ugro_job_stalled", "1 while the job's supervisor flags it stalled "
                         "(no output or metric for its --stall-after).", labels)
        quiet = _gauge("ugro_job_log_age_seconds", "Age of the node's last log line.",
                       labels + ["node"])
        for job_id, r in snap.jobs.items():
            names = [job_id, r.get("name") or ""]
            for value in JOB_STATUSES:
                status.add_metric(names + [value], 1.0 if r.get("status") == value else 0.0)
            for family, key in ((step, "step"), (loss, "loss"), (rate, "samples_per_sec")):
                if isinstance(r.get(key), (int, float)):
                    family.add_metric(names, r[key])
            stalled.add_metric(names, 1.0 if r.get("stalled") else 0.0)
            for node, seconds in (r.get("log_age_s") or {}).items():
                if seconds is not None:
                    quiet.add_metric(names + [node], seconds)
        yield from (status, step, loss, rate, stalled, quiet)


def registry(snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MonitorCollector(snapshot))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
