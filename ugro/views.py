"""What `inv results`, `inv status`, `inv jobs` and `inv compare` show, built from job records.

`load` reads one job directory into a `JobRecord`, noting each damaged file (which one, why)
instead of failing, so the rest of the job still shows. The views are pure functions: records
and the current time in, plain dicts out; `--json` prints those dicts as they are and the
`*_text` functions lay them out with tabulate.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tabulate import tabulate

from . import store
from .errors import UgroError
from .jobs import Jobs, job_name
from .metrics import MetricPoint, load_metrics, parse_jsonl, sparkline, summarize
from .state import JobStatus, is_active, is_stalled

STATUSES = tuple(s.value for s in JobStatus)
STATE_MAX_AGE = 300.0  # seconds a saved health check still counts as recent for `inv status`
RECENT_JOBS = 5
TAIL_LINES = 10  # of a failed node's log, on the results screen
# LaunchConfig fields that say how to run a job, not what it computes.
NOT_HYPERPARAMETERS = ("name", "detach", "grace", "queue", "num_nodes", "min_gpu_mem",
                       "priority", "after", "stall_after", "on_stall")
LABELS = {"duration_s": "duration", "final_loss": "final loss", "best_loss": "best loss",
          "samples_per_sec": "samples/s", "world_size": "world size"}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# -- reading a job directory ---------------------------------------------------
@dataclass
class JobRecord:
    """Everything on the control node about one job; damaged files leave their part empty."""

    job_id: str
    meta: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    points: list[MetricPoint] = field(default_factory=list)
    metrics_source: str | None = None  # "metrics.jsonl", "logs", or None when there are none
    checkpoint_files: list[tuple[str, int]] = field(default_factory=list)  # (name, bytes) here
    damaged: list[str] = field(default_factory=list)

    @property
    def status(self) -> str | None:
        return self.meta.get("status")


def read_object(path: Path) -> tuple[dict, str | None]:
    """A JSON object from a file, or ({}, why it cannot be used)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, f"{path.name}: missing"
    except OSError as exc:
        return {}, f"{path.name}: unreadable ({exc.strerror or exc})"
    except (ValueError, RecursionError) as exc:
        return {}, f"{path.name}: not valid JSON ({exc})"
    if not isinstance(data, dict):
        return {}, f"{path.name}: not a JSON object"
    return data, None


def _meta_problem(meta: dict) -> str | None:
    if meta.get("status") not in STATUSES:
        return f"metadata.json: status {meta.get('status')!r} is not a job status"
    if not isinstance(meta.get("nodes"), dict):
        return "metadata.json: nodes: expected a mapping"
    return None


def jsonl_problem(text: str, active: bool) -> str | None:
    """Why metrics.jsonl is damaged (how many lines are not JSON objects), or None.

    A running job may be writing its last line right now, so there a torn last line is no damage.
    """
    lines = text.split("\n")
    last = lines.pop()
    if not active:
        lines.append(last)
    bad, total = [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        total += 1
        try:
            ok = isinstance(json.loads(line), dict)
        except (ValueError, RecursionError):
            ok = False
        if not ok:
            bad.append(number)
    if not bad:
        return None
    return (f"metrics.jsonl: {len(bad)} of {total} lines are not JSON objects "
            f"(first: line {bad[0]})")


def load(jobs: Jobs, job_id: str) -> JobRecord:
    """Read one job directory; a damaged file is noted in `damaged` and the rest still loads."""
    d = jobs.dir(job_id)
    rec = JobRecord(job_id)
    meta, why = read_object(d / "metadata.json")
    why = why or _meta_problem(meta)
    if why:
        rec.damaged.append(why)
    else:
        rec.meta = meta
    rec.config, why = read_object(d / "config.json")
    if why:
        rec.damaged.append(why)
    jsonl = d / "metrics.jsonl"
    if jsonl.is_file():
        text = jsonl.read_text(encoding="utf-8", errors="replace")
        why = jsonl_problem(text, is_active(rec.status))
        if why:
            rec.damaged.append(why)
        rec.points = parse_jsonl(text)
        rec.metrics_source = "metrics.jsonl" if rec.points else None
    if not rec.points:
        rec.points = load_metrics(d)
        rec.metrics_source = "logs" if rec.points else None
    rec.checkpoint_files = sorted(
        ((p.name, p.stat().st_size) for p in (d / "checkpoints").glob("*")
         if p.is_file() and not p.name.startswith(".")),
        key=lambda item: _natural(item[0]),
    )
    return rec


def parse_history(text: str) -> tuple[list[dict], str | None]:
    """The entries of job_history.jsonl, newest first, and what was wrong with it, if anything."""
    values, bad = store.json_lines(text)
    entries = []
    for number, entry in values:
        if isinstance(entry, dict) and isinstance(entry.get("job_id"), str):
            entries.append(entry)
        else:
            bad.append(number)
    bad.sort()
    problem = (f"job_history.jsonl: {len(bad)} unreadable line(s) skipped (first: line {bad[0]})"
               if bad else None)
    return entries[::-1], problem


# -- the views -----------------------------------------------------------------
def results(rec: JobRecord, now: datetime) -> dict:
    """The facts of one job, for `inv results`."""
    meta, config = rec.meta, rec.config
    versions = _mapping(config, "versions")
    nodes = _mapping(meta, "nodes") or _mapping(config, "nodes")
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
                "node_rank": _mapping(nodes, name).get("node_rank"),
                "nproc": _mapping(nodes, name).get("nproc"),
                "status": _mapping(nodes, name).get("status"),
                "exit_code": _mapping(nodes, name).get("exit_code"),
                "gpus": _mapping(versions, name).get("gpus"),
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
    for node, facts in _mapping(rec.meta, "nodes").items():
        names = facts.get("checkpoints") if isinstance(facts, dict) else None
        for name in sorted(names or [], key=_natural):
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
        "nodes": list(_mapping(meta, "nodes")),
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
        queued_at = _when(q.get("queued_at"))
        out.append({
            "position": position, "job_id": m["job_id"], "name": m.get("name"),
            "priority": q.get("priority", 0), "request": q.get("request_text"),
            "after": q.get("after") or [],
            "waiting_s": round((now - queued_at).total_seconds(), 1) if queued_at else None,
            "reason": q.get("reason"), "since": q.get("since"),
        })
    return out


def queue_text(rows: list[dict]) -> str:
    if not rows:
        return "the queue is empty"
    table = [[r["position"], r["job_id"], r["priority"], r["request"], _duration(r["waiting_s"]),
              f"{r['reason']} (since {_clock(r['since'])})" if r["since"] else r["reason"]]
             for r in rows]
    return tabulate(table, headers=["#", "job", "priority", "request", "waiting", "why"],
                    tablefmt="simple", disable_numparse=True)


def progress(rec: JobRecord, now: datetime) -> dict:
    """Where a running job is, from its latest metrics."""
    m = summarize(rec.points)
    last_loss = next((p.loss for p in reversed(rec.points) if p.loss is not None), None)
    return {
        "job_id": rec.job_id,
        "status": rec.status,
        "nodes": list(_mapping(rec.meta, "nodes")),
        "world_size": rec.meta.get("world_size"),
        "epoch": m["epochs"],
        "epochs": _mapping(rec.config, "launch").get("epochs"),
        "step": m["steps"],
        "loss": last_loss,
        "elapsed_s": duration(rec.meta, now),
        **stall(rec.meta),
        "waiting": waiting(rec.meta),
        "damaged": rec.damaged,
    }


def health_age(state: dict, now: datetime) -> float | None:
    when = _when(state.get("checked_at"))
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
        keys += [k for k in _mapping(rec.config, "launch")
                 if k not in keys and k not in NOT_HYPERPARAMETERS]
    for key in keys:
        add("hyperparameters", key, [_mapping(r.config, "launch").get(key) for r in records])
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
    start = _when(meta.get("started_at")) or _when(meta.get("created_at"))
    end = _when(meta.get("ended_at"))
    if end is None and is_active(meta.get("status")):
        end = now
    if start is None or end is None:
        return None
    return round(max(0.0, (end - start).total_seconds()), 1)


# -- the loss plot -------------------------------------------------------------
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


# -- text ----------------------------------------------------------------------
def results_text(view: dict) -> str:
    m = view["metrics"]
    rows = [
        ("job", view["job_id"]),
        ("status", view["status"] or "unknown (damaged record)"),
        ("started", _local(view["started_at"])),
        ("ended", _local(view["ended_at"]) if view["ended_at"] else "-"),
        ("duration", _duration(view["duration_s"])),
        ("nodes", ", ".join(n["node"] for n in view["nodes"]) or "-"),
        ("world size", _world(view)),
        ("GPUs", "\n".join(f"{n['node']}: {_gpu_models(n['gpus'])}" for n in view["nodes"])
         or "-"),
        ("final loss", _loss(m["final_loss"])),
        ("best loss", _loss(m["best_loss"]) + (f" (step {m['best_step']})"
                                               if m["best_step"] is not None else "")),
        ("steps", _fmt(m["steps"]) + (f" (epoch {_fmt(m['epochs'])})"
                                      if m["epochs"] is not None else "")),
        ("samples/s", f"{m['samples_per_sec']:.1f} (mean)"
         if m["samples_per_sec"] is not None else "-"),
        ("metrics", f"{m['points']} points from {m['source']}" if m["source"] else "none"),
        ("loss curve", _curve(view)),
        ("checkpoints", _checkpoints(view["checkpoints"])),
    ]
    if "plot" in view:
        rows.append(("plot", view["plot"]["note"]))
    failure = view["failure"] or {}
    if view["error"] or failure:
        rows.append(("error", failure.get("summary") or view["error"]))
    if failure:
        where = ", ".join(f"{k} {failure[k]}" for k in ("node", "rank", "exit_code")
                          if failure.get(k) is not None)
        rows.append(("failed", where.replace("exit_code", "exit code")))
    for why in view["damaged"]:
        rows.append(("DAMAGED", why))
    text = tabulate(rows, tablefmt="plain", disable_numparse=True)
    label, lines = failure_lines(failure)
    if lines:
        text += f"\n\nlast lines of {label}:\n" + "\n".join(f"  {line}" for line in lines)
    return text


def failure_lines(failure: dict) -> tuple[str, list[str]]:
    """What to show of a failed node's log: the failing rank's own last lines, if it said
    anything, else the node's (mostly torchrun's report, which names the rank but not why)."""
    tail = [line for line in failure.get("log_tail") or [] if isinstance(line, str)]
    node, rank = failure.get("node"), failure.get("rank")
    own = [line for line in tail if line.startswith(f"{node} r{rank} |")]
    if rank is not None and own:
        return f"{node} rank {rank}", own[-TAIL_LINES:]
    return f"{node}'s log", tail[-TAIL_LINES:]


def jobs_text(rows: list[dict]) -> str:
    if not rows:
        return "no jobs"
    table = [
        [r["job_id"], ("STALLED" if r["stalled"] else r["status"]) or "?",
         _local(r["started_at"]), _duration(r["duration_s"]),
         ",".join(r["nodes"]) or "-", r["world_size"], r["steps"], r["final_loss"], _note(r)]
        for r in rows
    ]
    headers = ["job", "status", "started", "duration", "nodes", "world", "steps", "final loss",
               "note"]
    return tabulate(table, headers=headers, tablefmt="simple", missingval="-", floatfmt=".4f")


def status_text(view: dict) -> str:
    h, source = view["health"], view.get("source") or {}
    if source.get("from") == "monitor":
        when = (f"from inv monitor's sample {_duration(source['age_s'])} old; "
                "inv status --refresh to check health now")
    elif h["refreshed"]:
        when = "health checked just now"
    else:
        when = (f"health checked {_duration(h['age_s'])} ago; "
                "inv status --refresh to check now")
    sampled = source.get("from") == "monitor"
    out = [f"Nodes ({source.get('cluster') or h['cluster'] or '?'}, {when})"]
    rows = []
    for n in view["nodes"]:
        gpus = n["gpus"]
        rows.append([
            n["node"], n["address"],
            ("up" if n["healthy"] else "DOWN") if sampled else
            ("ok" if n["healthy"] else "UNHEALTHY"),
            "\n".join(f"{g['index']}: {g['name']}" for g in gpus) or "-",
            "\n".join(_memory(g) for g in gpus) or "-",
            "\n".join(_pct(g["utilization_pct"]) for g in gpus) or "-",
            f"{n['load']:.2f}" if isinstance(n["load"], (int, float)) else "-",
            "\n".join(n["problems"] + [f"warning: {w}" for w in n["warnings"]]),
        ])
    out.append(tabulate(rows, headers=["node", "address", "health", "GPU", "memory", "util",
                                       "load", "notes"], tablefmt="simple",
                        disable_numparse=True))
    out += [f"DRIFT: {line}" for line in h["drift"]]
    out.append("\nRunning jobs")
    if view["running"]:
        out.append(tabulate(
            [[r["job_id"], _status(r, view.get("now")), ",".join(r["nodes"]),
              _fmt(r["world_size"]), r["waiting"] or _progress(r), _loss(r["loss"]),
              _duration(r["elapsed_s"])]
             for r in view["running"]],
            headers=["job", "status", "nodes", "world", "progress", "loss", "elapsed"],
            tablefmt="simple", disable_numparse=True))
    else:
        out.append("none")
    if view.get("queued"):
        out += ["\nQueued jobs", queue_text(view["queued"])]
    out.append("\nRecent jobs")
    if view["recent"]:
        out.append(tabulate(
            [[e.get("job_id"), e.get("status"), _local(e.get("ended_at")),
              _duration(e["duration_s"]), ",".join(map(str, e.get("nodes") or [])),
              e.get("error") or ""]
             for e in view["recent"]],
            headers=["job", "status", "ended", "duration", "nodes", "error"],
            tablefmt="simple", disable_numparse=True))
    else:
        out.append("none")
    out += [f"note: {line}" for line in view["notes"]]
    return "\n".join(out)


def compare_text(view: dict) -> str:
    rows = []
    section = None
    for row in view["rows"]:
        if row["section"] != section:
            if section is not None:
                rows.append([""] * (len(view["jobs"]) + 2))
            section = row["section"]
        rows.append(["*" if row["differs"] else "", LABELS.get(row["key"], row["key"]),
                     *(_value(row["key"], v) for v in row["values"])])
    text = tabulate(rows, headers=["", "", *view["jobs"]], tablefmt="simple",
                    disable_numparse=True)
    text += "\n* differs"
    for job_id, problems in view["damaged"].items():
        text += "".join(f"\nDAMAGED {job_id}: {why}" for why in problems)
    return text


# -- formatting helpers --------------------------------------------------------
def _mapping(data: dict, key: str) -> dict:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _when(text) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _local(text) -> str:
    when = _when(text)
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S") if when else "-"


def _clock(text) -> str:
    when = _when(text)
    return when.astimezone().strftime("%H:%M") if when else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "-"
    return str(value)


def _loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _value(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("final_loss", "best_loss"):
        return _loss(value)
    if key == "samples_per_sec":
        return f"{value:.1f}"
    if key == "duration_s":
        return _duration(value)
    return _fmt(value)


def _pct(value) -> str:
    return "?" if value is None else f"{value}%"


def _memory(g: dict) -> str:
    used, total = g["memory_used_mib"], g["memory_total_mib"]
    if total is None:
        return "?"
    return f"{(used or 0) / 1024:.1f}/{total / 1024:.1f} GiB"


def _world(view: dict) -> str:
    procs = {n["nproc"] for n in view["nodes"]}
    each = f" ({procs.pop()} per node)" if len(procs) == 1 and None not in procs else ""
    return _fmt(view["world_size"]) + each


def _gpu_models(names) -> str:
    if names is None:
        return "unknown"
    if not names:
        return "none (CPU)"
    return ", ".join(f"{n}x {name}" if n > 1 else str(name)
                     for name, n in Counter(names).items())


def _curve(view: dict) -> str:
    m = view["metrics"]
    if not view["loss_curve"]:
        return "-"
    return f"{view['loss_curve']}  {m['first_loss']:.4f} -> {m['final_loss']:.4f}"


def _checkpoints(items: list[dict]) -> str:
    if not items:
        return "none"
    lines = []
    for where in dict.fromkeys(c["node"] for c in items):
        group = [c for c in items if c["node"] == where]
        names = [c["name"] for c in group]
        shown = names if len(names) <= 4 else [*names[:2], "...", names[-1]]
        size = sum(c["bytes"] or 0 for c in group)
        place = f"on {where}" if where else (human_bytes(size) if size else "here")
        lines.append(f"{', '.join(shown)} ({len(names)}, {place})")
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _status(r: dict, now: str | None) -> str:
    """A running job's status cell: `STALLED, silent 12m 05s` for a stalled one."""
    if not r["stalled"]:
        return r["status"]
    since, at = _when(r["stalled_since"]), _when(now)
    silent = _duration((at - since).total_seconds()) if since and at else "?"
    return f"STALLED, silent {silent}"


def _progress(r: dict) -> str:
    epoch = "-" if r["epoch"] is None else f"{r['epoch']:g}"
    if r["epochs"] is not None:
        epoch += f"/{r['epochs']}"
    return f"epoch {epoch}, step {_fmt(r['step'])}"


def _note(r: dict) -> str:
    if r["damaged"]:
        return "damaged: " + "; ".join(r["damaged"])
    return r["error"] or r.get("waiting") or ""


def _natural(name: str) -> list:
    """Sort key that puts epoch_9 before epoch_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
