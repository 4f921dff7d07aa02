"""A job directory on the control node, read into a `JobRecord`.

`load` notes each damaged file (which one, why) instead of failing, so the rest of the job
still shows; `history_entries` reads job_history.jsonl the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .jobs import Jobs
from .metrics import MetricPoint, load_metrics, parse_jsonl
from .state import JobStatus, is_active

STATUSES = tuple(s.value for s in JobStatus)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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
        key=lambda item: natural(item[0]),
    )
    return rec


def history_entries(values: list[tuple[int, object]], bad: list[int]
                    ) -> tuple[list[dict], str | None]:
    """The entries of job_history.jsonl, newest first, and what was wrong with it, if anything,
    from its lines as `Jobs.history_lines` reads them."""
    bad = list(bad)
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


def mapping(data: dict, key: str) -> dict:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def parse_time(text) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def natural(name: str) -> list:
    """Sort key that puts epoch_9 before epoch_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
