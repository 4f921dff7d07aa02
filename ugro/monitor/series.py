"""The monitor's time series: samples in SQLite under the data directory, kept for N days.

WAL mode with `synchronous=FULL` and one transaction per sample: readers (the dashboard, a
Prometheus scrape, `latest()` from another process) never block the sampler, and a crash loses
at most the sample being written. Old rows are pruned by the writer every few minutes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .sample import GpuSample, NodeSample

PRUNE_EVERY = 600.0  # seconds between deletions of samples past the retention
MAX_POINTS = 720  # per series in one history answer; longer windows are averaged into buckets

SCHEMA = """
CREATE TABLE IF NOT EXISTS node (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, node TEXT NOT NULL, up INTEGER NOT NULL,
    error TEXT, down_since REAL, load1 REAL, load5 REAL, load15 REAL,
    memory_total_kib INTEGER, memory_available_kib INTEGER, disk_free_kib INTEGER,
    disk_path TEXT, problems TEXT);
CREATE INDEX IF NOT EXISTS node_by_name ON node (node, ts);
CREATE INDEX IF NOT EXISTS node_by_ts ON node (ts);
CREATE TABLE IF NOT EXISTS gpu (
    sample INTEGER NOT NULL REFERENCES node (id), ts REAL NOT NULL, node TEXT NOT NULL,
    idx INTEGER NOT NULL, uuid TEXT, name TEXT, memory_total_mib REAL, memory_used_mib REAL,
    utilization_pct REAL, temperature_c REAL, power_w REAL);
CREATE INDEX IF NOT EXISTS gpu_by_sample ON gpu (sample);
CREATE INDEX IF NOT EXISTS gpu_by_node ON gpu (node, ts);
CREATE TABLE IF NOT EXISTS job (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, job_id TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS job_by_id ON job (job_id, ts);
CREATE INDEX IF NOT EXISTS job_by_ts ON job (ts);
CREATE TABLE IF NOT EXISTS monitor (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""
GPU_COLUMNS = ("idx", "uuid", "name", "memory_total_mib", "memory_used_mib", "utilization_pct",
               "temperature_c", "power_w")
NODE_COLUMNS = ("ts", "node", "up", "error", "down_since", "load1", "load5", "load15",
                "memory_total_kib", "memory_available_kib", "disk_free_kib", "disk_path",
                "problems")


def db_path(data_dir: Path) -> Path:
    return Path(data_dir) / "monitor" / "samples.sqlite3"


@dataclass
class Snapshot:
    """The latest sample of every node and job, each with its age in seconds at `now`."""

    now: float
    nodes: dict[str, NodeSample] = field(default_factory=dict)
    jobs: dict[str, dict] = field(default_factory=dict)  # a job's latest progress record
    interval: float | None = None  # the monitor's --interval
    beat: float | None = None  # when the monitor last finished a round (it runs while recent)

    def age(self, sample_ts: float) -> float:
        return max(0.0, self.now - sample_ts)

    def is_fresh(self, intervals: float = 3.0) -> bool:
        """Whether the monitor is running: its last round is younger than a few intervals."""
        return (self.beat is not None and self.interval is not None
                and self.age(self.beat) <= intervals * self.interval)


class Series:
    """The samples database: the sampler writes, everyone else reads."""

    def __init__(self, path: Path, retention_s: float = 7 * 86400.0):
        self.path = Path(path)
        self.retention_s = retention_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._pruned = 0.0
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing ----------------------------------------------------------------
    def add_node(self, s: NodeSample) -> None:
        row = (s.ts, s.node, int(s.up), s.error, s.down_since, s.load1, s.load5, s.load15,
               s.memory_total_kib, s.memory_available_kib, s.disk_free_kib, s.disk_path,
               json.dumps(s.problems) if s.problems else None)
        with self._lock, self._db:
            cur = self._db.execute(
                f"INSERT INTO node ({', '.join(NODE_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(NODE_COLUMNS))})", row)
            self._db.executemany(
                f"INSERT INTO gpu (sample, ts, node, {', '.join(GPU_COLUMNS)}) "
                f"VALUES (?, ?, ?, {', '.join('?' * len(GPU_COLUMNS))})",
                [(cur.lastrowid, s.ts, s.node, g.index, g.uuid, g.name, g.memory_total_mib,
                  g.memory_used_mib, g.utilization_pct, g.temperature_c, g.power_w)
                 for g in s.gpus])
        self._maybe_prune(s.ts)

    def add_job(self, ts: float, record: dict) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT INTO job (ts, job_id, data) VALUES (?, ?, ?)",
                             (ts, record["job_id"], json.dumps(record, default=str)))

    def beat(self, ts: float, interval: float) -> None:
        """Note that the monitor, sampling every `interval` seconds, is alive at `ts`."""
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO monitor (key, value) VALUES (?, ?)",
                                 [("beat", ts), ("interval", interval)])

    def _maybe_prune(self, now: float) -> None:
        if now - self._pruned < PRUNE_EVERY:
            return
        self._pruned = now
        cutoff = now - self.retention_s
        with self._lock, self._db:
            self._db.execute("DELETE FROM gpu WHERE ts < ?", (cutoff,))
            self._db.execute("DELETE FROM node WHERE ts < ?", (cutoff,))
            self._db.execute("DELETE FROM job WHERE ts < ?", (cutoff,))

    # -- reading ----------------------------------------------------------------
    def latest(self, now: float | None = None) -> Snapshot:
        with self._lock:
            return read_latest(self._db, time.time() if now is None else now)

    def node_history(self, node: str, since: float, until: float) -> dict:
        """Per GPU: timestamps, utilisation and memory used; per node: load. Bucket-averaged."""
        bucket = max(1.0, (until - since) / MAX_POINTS)
        with self._lock:
            gpu_rows = self._db.execute(
                "SELECT idx, CAST(ts / ? AS INTEGER) AS b, avg(ts) AS t, avg(utilization_pct) AS u,"
                " avg(memory_used_mib) AS m, max(memory_total_mib) AS mt FROM gpu "
                "WHERE node = ? AND ts >= ? AND ts <= ? GROUP BY idx, b ORDER BY idx, b",
                (bucket, node, since, until)).fetchall()
            node_rows = self._db.execute(
                "SELECT CAST(ts / ? AS INTEGER) AS b, avg(ts) AS t, avg(load1) AS l, min(up) AS up"
                " FROM node WHERE node = ? AND ts >= ? AND ts <= ? GROUP BY b ORDER BY b",
                (bucket, node, since, until)).fetchall()
        gpus: dict[int, dict] = {}
        for r in gpu_rows:
            g = gpus.setdefault(r["idx"], {"index": r["idx"], "ts": [], "utilization_pct": [],
                                           "memory_used_mib": [], "memory_total_mib": None})
            g["ts"].append(round(r["t"], 3))
            g["utilization_pct"].append(r["u"])
            g["memory_used_mib"].append(r["m"])
            g["memory_total_mib"] = r["mt"]
        return {
            "node": node, "since": since, "until": until, "bucket_s": bucket,
            "gpus": list(gpus.values()),
            "load": {"ts": [round(r["t"], 3) for r in node_rows],
                     "load1": [r["l"] for r in node_rows], "up": [r["up"] for r in node_rows]},
        }

    def job_history(self, job_id: str, since: float) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT data FROM job WHERE job_id = ? AND ts >= ? "
                                    "ORDER BY ts", (job_id, since)).fetchall()
        return [json.loads(r["data"]) for r in rows]


def read_latest(db: sqlite3.Connection, now: float) -> Snapshot:
    snap = Snapshot(now)
    ids = [r[0] for r in db.execute("SELECT max(id) FROM node GROUP BY node")]
    marks = ", ".join("?" * len(ids))
    for r in db.execute(f"SELECT id, {', '.join(NODE_COLUMNS)} FROM node "
                        f"WHERE id IN ({marks}) ORDER BY node", ids):
        values = {k: r[k] for k in NODE_COLUMNS}
        values["up"] = bool(values["up"])
        values["problems"] = json.loads(values["problems"]) if values["problems"] else []
        snap.nodes[r["node"]] = NodeSample(**values)
    for r in db.execute(f"SELECT node, {', '.join(GPU_COLUMNS)} FROM gpu "
                        f"WHERE sample IN ({marks}) ORDER BY node, idx", ids):
        snap.nodes[r["node"]].gpus.append(GpuSample(r["idx"], *[r[k] for k in GPU_COLUMNS[1:]]))
    for r in db.execute("SELECT data FROM job WHERE id IN "
                        "(SELECT max(id) FROM job GROUP BY job_id)"):
        record = json.loads(r["data"])
        snap.jobs[record["job_id"]] = record
    try:
        facts = dict(db.execute("SELECT key, value FROM monitor").fetchall())
    except sqlite3.OperationalError:  # written by a monitor from before the table existed
        facts = {}
    snap.beat, snap.interval = facts.get("beat"), facts.get("interval")
    return snap


def latest(data_dir: Path, now: float | None = None) -> Snapshot | None:
    """The monitor's latest sample of every node and job, read-only; None when it never ran.

    For other processes (`inv status`): each sample carries its own `ts`, so
    `snapshot.age(sample.ts)` says how old it is, and `snapshot.is_fresh()` whether the
    monitor still runs.
    """
    path = db_path(data_dir)
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return read_latest(db, time.time() if now is None else now)
    except sqlite3.DatabaseError:
        return None
    finally:
        db.close()
