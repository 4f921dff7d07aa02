"""What `inv results`, `inv status`, `inv jobs`, `inv queue` and `inv compare` show.

The views are pure functions: job records (`ugro.records`) and the current time in, plain
dicts out; `--json` prints those dicts as they are and `ugro.render` lays them out as text.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

from . import store
from .errors import UgroError
from .jobs import job_name
from .metrics import MetricPoint, sparkline, summarize
from .records import STATUSES, JobRecord, mapping, natural, parse_time
from .state import JobStatus, is_active, is_stalled

STATE_MAX_AGE = 300.0  # seconds a saved health check still counts as recent for `inv status`
RECENT_JOBS = 5
# LaunchConfig fields that say how to run a job, not what it computes.
NOT_HYPERPARAMETERS = ("name", "detach", "grace", "queue", "num_nodes", "min_gpu_mem",
                       "priority", "after", "stall_after", "on_stall")


def results(rec: JobRecord, now: datetime) -> dict:
    """The facts of one job, for `inv results`."""
    meta, config = rec.meta, rec.config
    versions = mapping(config, "versions")
    nodes = mapping(meta, "nodes") or mapping(config, "nodes")
    return {
        "job_id": rec.job_id,
        "name": meta.get("name") or job_name(rec.job_id),
        "status": rec.status,
        "started_at": meta.get("started_at"),
        "ended_at": meta.get("ended_at"),
        "duration_s": duration(meta, now),
        "world_size": meta.get("world_size") or config.get("world_size"),
        "nodes": [
            {
                "node": name,
                "node_rank": mapping(nodes, name).get("node_rank"),
                "nproc": mapping(nodes, name).get("nproc"),
                "status": mapping(nodes, name).get("status"),
                "exit_code": mapping(nodes, name).get("exit_code"),
                "gpus": mapping(versions, name).get("gpus"),
            }
            for name in nodes
        ],
        "metrics": {**summarize(rec.points), "source": rec.metrics_source,
                    "first_loss": next((p.loss for p in rec.points if p.loss is not None
                                        and math.isfinite(p.loss)), None)},
        "loss_curve": sparkline(p.loss for p in rec.points),
        "checkpoints": checkpoints(rec),
        "error": meta.get("error"),
        "failure": meta.get("failure") if isinstance(meta.get("failure"), dict) else None,
        "damaged": rec.damaged,
    }


def checkpoints(rec: JobRecord) -> list[dict]:
    """Checkpoints on the control node, then those only a node holds (as its job record says)."""
    out = [{"name": name, "bytes": size, "node": None} for name, size in rec.checkpoint_files]
    here = {name for name, _ in rec.checkpoint_files}
    for node, facts in mapping(rec.meta, "nodes").items():
        names = facts.get("checkpoints") if isinstance(facts, dict) else None
        for name in sorted(names or [], key=natural):
            if isinstance(name, str) and name not in here:
                out.append({"name": name, "bytes": None, "node": node})
    return out


def waiting(meta: dict) -> str | None:
    """Why a job handed to Slurm has not started yet, as Slurm says it."""
    slurm = meta.get("slurm")
    if meta.get("status") != JobStatus.QUEUED or not isinstance(slurm, dict):
        return None
    if not slurm.get("job_id"):
        return "submitting to Slurm"
    reason = f" ({slurm['reason']})" if slurm.get("reason") else ""
    return f"Slurm job {slurm['job_id']} {slurm.get('state') or 'PENDING'}{reason}"


def job_row(rec: JobRecord, now: datetime) -> dict:
    """One line of `inv jobs`."""
    meta = rec.meta
    m = summarize(rec.points)
    return {
        "job_id": rec.job_id,
        "name": meta.get("name") or job_name(rec.job_id),
        "status": rec.status,
        "started_at": meta.get("started_at"),
        "duration_s": duration(meta, now),
        "nodes": list(mapping(meta, "nodes")),
        "world_size": meta.get("world_size"),
        "steps": m["steps"],
        "final_loss": m["final_loss"],
        "error": meta.get("error"),
        **stall(meta),
        "waiting": waiting(meta),
        "damaged": rec.damaged,
    }


def stall(meta: dict) -> dict:
    """Whether the job's supervisor flags it stalled, and since when it has been silent."""
    return {"stalled": is_stalled(meta),
            "stalled_since": meta.get("stalled_since") if is_stalled(meta) else None}


def status_filter(status: str | None) -> str | None:
    """The job status `--status` asks for, checked (STALLED, a flag on RUNNING jobs, is asked
    for like a status); None for every status."""
    if status is None:
        return None
    wanted = status.upper()
    if wanted != "STALLED" and wanted not in STATUSES:
        raise UgroError(f"--status {status}: not a job status ({', '.join(STATUSES)}, "
                        "or STALLED)")
    return wanted


def filter_rows(rows: list[dict], status: str | None) -> list[dict]:
    wanted = status_filter(status)
    if wanted is None:
        return rows
    if wanted == "STALLED":
        return [r for r in rows if r["stalled"]]
    return [r for r in rows if r["status"] == wanted]


def queue(metas: list[dict], now: datetime) -> list[dict]:
    """`inv queue`: the queued jobs in the order they will start, each with why it waits."""
    rows = [m for m in metas if m.get("status") == JobStatus.QUEUED and isinstance(
        m.get("queue"), dict)]
    rows.sort(key=lambda m: (-m["queue"].get("priority", 0), m["queue"].get("queued_at", ""),
                             m["job_id"]))
    out = []
    for position, m in enumerate(rows, 1):
        q = m["queue"]
        queued_at = parse_time(q.get("queued_at"))
        out.append({
            "position": position, "job_id": m["job_id"], "name": m.get("name"),
            "priority": q.get("priority", 0), "request": q.get("request_text"),
            "after": q.get("after") or [],
            "waiting_s": round((now - queued_at).total_seconds(), 1) if queued_at else None,
            "reason": q.get("reason"), "since": q.get("since"),
        })
    return out


def progress(rec: JobRecord, now: datetime) -> dict:
    """Where a running job is, from its latest metrics."""
    m = summarize(rec.points)
    last_loss = next((p.loss for p in reversed(rec.points) if p.loss is not None), None)
    return {
        "job_id": rec.job_id,
        "status": rec.status,
        "nodes": list(mapping(rec.meta, "nodes")),
        "world_size": rec.meta.get("world_size"),
        "epoch": m["epochs"],
        "epochs": mapping(rec.config, "launch").get("epochs"),
        "step": m["steps"],
        "loss": last_loss,
        "elapsed_s": duration(rec.meta, now),
        **stall(rec.meta),
        "waiting": waiting(rec.meta),
        "damaged": rec.damaged,
    }


def health_age(state: dict, now: datetime) -> float | None:
    when = parse_time(state.get("checked_at"))
    return None if when is None else (now - when).total_seconds()


def state_is_recent(state: dict, cluster: str, now: datetime,
                    max_age: float = STATE_MAX_AGE) -> bool:
    """Whether a saved health check is this cluster's and young enough to show as it is."""
    age = health_age(state, now)
    return state.get("cluster") == cluster and age is not None and 0 <= age <= max_age


def status(state: dict, running: list[JobRecord], history: list[dict], now: datetime,
           refreshed: bool = False, notes: list[str] | None = None,
           queued: list[dict] | None = None, sampled: tuple[dict, list[dict]] | None = None
           ) -> dict:
    """The whole cluster at a glance, for `inv status`.

    The nodes come from the saved health check, or, with `sampled` (where they came from,
    and their rows), from a running monitor's latest sample.
    """
    nodes = state.get("nodes") if isinstance(state.get("nodes"), list) else []
    rows = sampled[1] if sampled else [_node_row(n) for n in nodes if isinstance(n, dict)]
    return {
        "now": now.isoformat(),
        "source": sampled[0] if sampled else {"from": "health check"},
        "health": {
            "cluster": state.get("cluster"),
            "checked_at": state.get("checked_at"),
            "age_s": health_age(state, now),
            "refreshed": refreshed,
            "drift": state.get("drift") or [],
        },
        "nodes": rows,
        "running": [progress(r, now) for r in running],
        "queued": queued or [],
        "recent": [{**e, "duration_s": duration(e, now)} for e in history[:RECENT_JOBS]],
        "notes": notes or [],
    }


def _node_row(n: dict) -> dict:
    gpus = [g for g in n.get("gpus") or [] if isinstance(g, dict)]
    return {
        "node": n.get("node"),
        "address": n.get("address"),
        "healthy": n.get("healthy"),
        "problems": n.get("problems") or [],
        "warnings": n.get("warnings") or [],
        "gpus": [{k: g.get(k) for k in ("index", "name", "memory_used_mib", "memory_total_mib",
                                        "utilization_pct")} for g in gpus],
        "load": (n.get("loadavg") or [None])[0],
    }


def compare(records: list[JobRecord], now: datetime) -> dict:
    """Hyperparameters and final metrics of several jobs side by side, differences marked."""
    rows: list[dict] = []

    def add(section: str, key: str, values: list):
        seen = {json.dumps(v, sort_keys=True, default=str) for v in values}
        rows.append({"section": section, "key": key, "values": values,
                     "differs": len(seen) > 1})

    keys: list[str] = []
    for rec in records:
        keys += [k for k in mapping(rec.config, "launch")
                 if k not in keys and k not in NOT_HYPERPARAMETERS]
    for key in keys:
        add("hyperparameters", key, [mapping(r.config, "launch").get(key) for r in records])
    add("hyperparameters", "world_size",
        [r.meta.get("world_size") or r.config.get("world_size") for r in records])
    add("results", "status", [r.status for r in records])
    add("results", "duration_s", [duration(r.meta, now) for r in records])
    summaries = [summarize(r.points) for r in records]
    add("results", "steps", [s["steps"] for s in summaries])
    add("results", "epoch", [s["epochs"] for s in summaries])  # the last one reached
    for key in ("final_loss", "best_loss", "samples_per_sec"):
        add("results", key, [s[key] for s in summaries])
    return {"jobs": [r.job_id for r in records], "rows": rows,
            "damaged": {r.job_id: r.damaged for r in records if r.damaged}}


def duration(meta: dict, now: datetime) -> float | None:
    """Seconds from start to end, or to now while the job is active."""
    start = parse_time(meta.get("started_at")) or parse_time(meta.get("created_at"))
    end = parse_time(meta.get("ended_at"))
    if end is None and is_active(meta.get("status")):
        end = now
    if start is None or end is None:
        return None
    return round(max(0.0, (end - start).total_seconds()), 1)


def plot_loss(points: list[MetricPoint], path: Path, title: str) -> tuple[Path | None, str]:
    """Save the loss curve as a PNG if matplotlib is there; (the path or None, a note)."""
    curve = [(p.step if p.step is not None else i, p.loss) for i, p in enumerate(points)
             if p.loss is not None and math.isfinite(p.loss)]
    if not curve:
        return None, "no loss values to plot"
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None, "loss.png skipped: matplotlib is not installed (pip install 'ugro[plot]')"
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot([s for s, _ in curve], [loss for _, loss in curve])
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    with store.replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    return path, str(path)
