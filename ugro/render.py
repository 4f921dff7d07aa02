"""The views as terminal text: tables laid out with tabulate, values formatted for people.

Each `*_text` takes the plain dict a view in `ugro.views` built (what `--json` prints) and
returns the text `inv` prints.
"""

from __future__ import annotations

from collections import Counter

from tabulate import tabulate

from .records import parse_time

TAIL_LINES = 10  # of a failed node's log, on the results screen
LABELS = {"duration_s": "duration", "final_loss": "final loss", "best_loss": "best loss",
          "samples_per_sec": "samples/s", "world_size": "world size"}


def queue_text(rows: list[dict]) -> str:
    if not rows:
        return "the queue is empty"
    table = [[r["position"], r["job_id"], r["priority"], r["request"], _duration(r["waiting_s"]),
              f"{r['reason']} (since {_clock(r['since'])})" if r["since"] else r["reason"]]
             for r in rows]
    return tabulate(table, headers=["#", "job", "priority", "request", "waiting", "why"],
                    tablefmt="simple", disable_numparse=True)


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


def _local(text) -> str:
    when = parse_time(text)
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S") if when else "-"


def _clock(text) -> str:
    when = parse_time(text)
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
    since, at = parse_time(r["stalled_since"]), parse_time(now)
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
