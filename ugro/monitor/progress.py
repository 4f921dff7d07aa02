"""Where each job stands, from its files on the control node, read cheaply and tolerantly.

Only the tail of `metrics.jsonl` and of each `logs/<node>.log` is read: a day-long job's files
are large, and the monitor looks every few seconds. A torn or garbage line costs that line only
(`metrics.parse_jsonl`, `metrics.parse_log_line`). The age of a node's last log line is its log
file's modification time: the supervisor appends every line as it arrives. Whether a job is
stalled is its supervisor's call (`stalled_since` in its record), shown here as it is.
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path

from .. import records
from ..jobs import Jobs
from ..logs import LogLine, parse_line
from ..metrics import MetricPoint, parse_jsonl, parse_log_line
from ..state import JobStatus, is_active, is_stalled

TAIL_BYTES = 64 * 1024
RECENT = 10  # finished jobs the monitor keeps reporting


def is_queued(status) -> bool:
    return JobStatus.parse(status) is JobStatus.PENDING


def read_tail(path: Path, size: int = TAIL_BYTES) -> str:
    """The last `size` bytes of a file as whole lines ('' when it is missing)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read()
    except OSError:
        return ""
    if end > size:
        data = data.partition(b"\n")[2]  # the first line is cut
    return data.decode("utf-8", errors="replace")


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def latest_point(job_dir: Path) -> MetricPoint | None:
    """The job's newest metrics: from metrics.jsonl, else from its logs' last metric line."""
    points = parse_jsonl(read_tail(job_dir / "metrics.jsonl"))
    if points:
        return points[-1]
    best: tuple[float, MetricPoint] | None = None
    for log in (job_dir / "logs").glob("*.log"):
        for line in reversed(read_tail(log).splitlines()):
            point = parse_log_line(line)
            if point is not None:
                when = mtime(log) or 0.0
                if best is None or when > best[0]:
                    best = (when, point)
                break
    return best[1] if best else None


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _timestamp(text) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def job_progress(jobs: Jobs, job_id: str, now: float) -> dict:
    """One job's progress record: status, latest step/loss/rate, log age per node, and
    whether its supervisor flagged it stalled."""
    d = jobs.dir(job_id)
    meta, damaged = records.read_object(d / "metadata.json")
    status = meta.get("status")
    nodes = list(meta.get("nodes") or {}) if isinstance(meta.get("nodes"), dict) else []
    nodes = nodes or sorted(p.stem for p in (d / "logs").glob("*.log"))
    log_age = {}
    for node in nodes:
        when = mtime(d / "logs" / f"{node}.log")
        log_age[node] = None if when is None else round(max(0.0, now - when), 1)
    point = latest_point(d)
    activity = [t for t in [mtime(d / "metrics.jsonl")] + [mtime(d / "logs" / f"{n}.log")
                                                            for n in nodes] if t is not None]
    since = now - max(activity) if activity else None
    started = _timestamp(meta.get("started_at"))
    if since is None and started is not None:
        since = now - started
    return {
        "job_id": job_id,
        "name": meta.get("name"),
        "status": status,
        "damaged": damaged,
        "nodes": nodes,
        "world_size": meta.get("world_size"),
        "step": point.step if point else None,
        "epoch": _finite(point.epoch) if point else None,
        "loss": point.loss if point else None,
        "samples_per_sec": _finite(point.samples_per_sec) if point else None,
        "log_age_s": log_age,
        "quiet_s": None if since is None else round(since, 1),
        "stalled": is_stalled(meta),
        "stalled_since": meta.get("stalled_since") if is_stalled(meta) else None,
        "reason": meta.get("reason") or meta.get("error") if is_queued(status) else None,
    }


def watched(jobs: Jobs) -> list[str]:
    """The active jobs and the most recent finished ones, newest first."""
    out, finished = [], 0
    for job_id in jobs.ids():
        meta, _ = records.read_object(jobs.dir(job_id) / "metadata.json")
        if is_active(meta.get("status")):
            out.append(job_id)
        elif finished < RECENT:
            out.append(job_id)
            finished += 1
    return out


def log_tail(job_dir: Path, node: str, lines: int = 50, rank: int | None = None) -> list[dict]:
    """The last `lines` lines of a node's log, optionally of one rank, as {node, rank, text}."""
    parsed: list[LogLine] = [parse_line(raw, node)
                             for raw in read_tail(job_dir / "logs" / f"{node}.log").splitlines()]
    if rank is not None:
        parsed = [x for x in parsed if x.rank == rank]
    return [x.as_dict() for x in parsed[-lines:]]
