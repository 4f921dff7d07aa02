"""What the dashboard's JSON endpoints answer, built from the series and the job records.

Plain functions: a `Series` (or a snapshot), the data directory and the time in, plain dicts out.
Job records come through `views`, so the dashboard shows what `inv results`/`inv compare` show.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

from .. import records, views
from ..errors import UgroError
from ..jobs import Jobs
from ..metrics import MetricPoint
from ..state import is_active
from . import progress
from .series import Series, Snapshot

CURVE_POINTS = 2000  # loss points sent for one job; longer runs are thinned evenly


def _clean(value):
    """JSON has no NaN: a diverged loss is sent as null and still counted as a point."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def cluster(snap: Snapshot, interval: float) -> dict:
    nodes = []
    for s in snap.nodes.values():
        row = s.as_dict()
        row["age_s"] = round(snap.age(s.ts), 1)
        row["stale"] = row["age_s"] > 3 * interval
        for g, sample in zip(row["gpus"], s.gpus, strict=True):
            g["memory_free_mib"] = sample.memory_free_mib
        nodes.append(row)
    return {"now": snap.now, "interval_s": interval, "nodes": nodes}


def history(series: Series, node: str, seconds: float, now: float) -> dict:
    if not 0 < seconds <= 31 * 86400:
        raise UgroError(f"seconds={seconds:g}: expected 0 < seconds <= 31 days")
    return series.node_history(node, now - seconds, now)


def curve(points: list[MetricPoint], limit: int = CURVE_POINTS) -> dict:
    """Steps and losses of the points that carry a loss, thinned to at most `limit`."""
    pairs = [(p.step if p.step is not None else i, p.loss)
             for i, p in enumerate(points) if p.loss is not None]
    if len(pairs) > limit:
        pairs = [pairs[i * len(pairs) // limit] for i in range(limit - 1)] + [pairs[-1]]
    return {"step": [s for s, _ in pairs], "loss": [_clean(v) for _, v in pairs]}


def jobs_view(data_dir: Path, snap: Snapshot) -> dict:
    jobs = Jobs(data_dir)
    running, recent, queued = [], [], []
    for job_id in progress.watched(jobs):
        r = snap.jobs.get(job_id) or progress.job_progress(jobs, job_id, snap.now)
        r = {k: _clean(v) for k, v in r.items()}
        if progress.is_queued(r["status"]):
            queued.append({**r, "reason": r.get("reason") or "waiting for its nodes to start"})
        elif is_active(r["status"]):
            rec = records.load(jobs, job_id)
            running.append({**r, **{k: _clean(v) for k, v in views.progress(
                rec, _utc(snap.now)).items() if k in ("epochs", "elapsed_s")},
                "curve": curve(rec.points, 500)})
        else:
            rec = records.load(jobs, job_id)
            row = views.job_row(rec, _utc(snap.now))
            recent.append({k: _clean(v) for k, v in row.items()})
    return {"now": snap.now, "running": running, "queued": queued, "recent": recent}


def job_view(data_dir: Path, job_text: str, now: float, lines: int = 50) -> dict:
    jobs = Jobs(data_dir)
    job_id = jobs.find(job_text)
    rec = records.load(jobs, job_id)
    record = views.results(rec, _utc(now))
    record["metrics"] = {k: _clean(v) for k, v in record["metrics"].items()}
    live = progress.job_progress(jobs, job_id, now)
    d = jobs.dir(job_id)
    tails = {node: progress.log_tail(d, node, lines) for node in live["nodes"]}
    return {"now": now, "job": record, "progress": {k: _clean(v) for k, v in live.items()},
            "curve": curve(rec.points), "logs": tails}


def compare_view(data_dir: Path, wanted: list[str], now: float) -> dict:
    jobs = Jobs(data_dir)
    ids = list(dict.fromkeys(jobs.find(w) for w in wanted))
    if len(ids) < 2:
        raise UgroError("compare needs two or more different jobs (?jobs=a,b)")
    loaded = [records.load(jobs, j) for j in ids]
    table = views.compare(loaded, _utc(now))
    for row in table["rows"]:
        row["values"] = [_clean(v) for v in row["values"]]
    return {"now": now, **table, "curves": {r.job_id: curve(r.points) for r in loaded}}


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)
