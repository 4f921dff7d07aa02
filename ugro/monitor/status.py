"""What `inv status` takes from a running monitor: its latest sample of the nodes.

While `inv monitor` runs, its samples are seconds old, so `inv status` shows them instead of
probing every node over SSH; without a fresh sample (no monitor, or one that stopped) it
checks health as it always did. Pure functions over a `Snapshot`, plus one read-only query.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from ..config import Node
from .series import Snapshot, latest

FRESH_INTERVALS = 3.0  # a monitor whose last round is older than this many intervals is gone


def fresh_snapshot(data_dir: Path, nodes: tuple[Node, ...],
                   now: float | None = None) -> Snapshot | None:
    """The monitor's latest sample when the monitor still runs and has sampled every one of
    these nodes; None otherwise (then `inv status` probes)."""
    snap = latest(data_dir, now)
    if snap is None or not snap.is_fresh(FRESH_INTERVALS):
        return None
    if any(n.name not in snap.nodes for n in nodes):
        return None  # a monitor of another cluster file, or one that has not reached a node yet
    return snap


def node_rows(snap: Snapshot, nodes: tuple[Node, ...]) -> list[dict]:
    """One row per node in `inv status`'s shape, from its latest sample; `healthy` means it
    answered the monitor."""
    rows = []
    for node in nodes:
        s = snap.nodes[node.name]
        problems = ([s.error] if s.error else []) + list(s.problems)
        if s.down_since is not None:
            problems.insert(0, f"unreachable since {_clock(s.down_since)}")
        rows.append({
            "node": node.name,
            "address": node.host,
            "healthy": s.up,
            "problems": problems,
            "warnings": [],
            "gpus": [{"index": g.index, "name": g.name, "memory_used_mib": g.memory_used_mib,
                      "memory_total_mib": g.memory_total_mib,
                      "utilization_pct": g.utilization_pct} for g in s.gpus],
            "load": s.load1,
            "sample_age_s": round(snap.age(s.ts), 1),
        })
    return rows


def source(snap: Snapshot, nodes: tuple[Node, ...]) -> dict:
    """Where the node rows came from and how old they are: the newest of the nodes' samples
    (a node that is down is retried less often; its own row says how old its sample is)."""
    newest = max(snap.nodes[n.name].ts for n in nodes)
    return {"from": "monitor", "sampled_at": _iso(newest), "age_s": round(snap.age(newest), 1),
            "interval_s": snap.interval}


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")
