"""A job's logs: every node's output, each line prefixed with node and rank, whole lines, live.

The control node keeps a copy per node, `logs/<node>.log` in the job directory, written by the
supervisor's `NodeLog` (`lab0 r0 | text` for a rank's line, `lab0    | text` for torchrun's own).
The raw output stays on each node (`data/experiments/<job>/nodes/<node>/output.log`, with
torchrun's `[rankN]:` prefixes); `fetch` brings it home through the same `NodeLog` when the
copy is missing or stale.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from . import commands, store
from .backends import backend_for
from .config import Cluster
from .errors import UgroError
from .jobs import NAME_RE, Jobs, job_name, now, started_key
from .state import is_active, is_terminal
from .wording import suggestion

TORCHRUN_RANK = re.compile(r"^\[rank(\d+)\]:")
FAILED_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
ROOT_CAUSE = "Root Cause (first observed failure)"


class NodeLog:
    """An output stream for one node: whole lines, prefixed, appended to its log file."""

    def __init__(self, path: Path, node: str):
        self.node = node
        self.file = path.open("w")
        self.buffer = ""
        self.blank = 0  # blank lines held back: the last one may be the marker's own
        self.exit: str | None = None
        self.failed_rank: int | None = None
        self.root_cause_next = False  # the next `rank :` line is torchrun's root cause
        self.lock = threading.Lock()
        self.lost_lines = 0  # lines the file could not take (a full disk): the gap
        self.write_error: str | None = None
        self.last_data = time.monotonic()  # when the node last sent output: a stall's clock

    def write(self, data: str) -> None:
        with self.lock:
            if data:
                self.last_data = time.monotonic()
            self.buffer += data
            *lines, self.buffer = self.buffer.split("\n")
            self._emit(lines)

    def _emit(self, lines: list[str]) -> None:
        # One write per chunk, whole lines only: a reader never sees half a line.
        out: list[str] = []
        for line in lines:
            self._line(line, out)
        if out:
            self._write(out)

    def _write(self, out: list[str]) -> None:
        """Write whole lines; a failed write (disk full) loses them but never the stream, whose
        exit marker still counts. Once writing works again, a line marks the gap."""
        if self.lost_lines:
            out.insert(0, f"{self.node}    | [ugro: {self.gap}]\n")
        try:
            self.file.write("".join(out))
            self.file.flush()
        except OSError as exc:
            self.lost_lines += len(out) - (1 if self.lost_lines else 0)
            self.write_error = exc.strerror or str(exc)
            return
        self.lost_lines = 0

    @property
    def gap(self) -> str | None:
        if self.write_error is None:
            return None
        return (f"log lines not saved ({self.write_error} writing {self.file.name}); "
                f"the node keeps the whole output")

    def _line(self, line: str, out: list[str]) -> None:
        if self.exit is not None:
            return
        if line.startswith(commands.EXIT_MARKER):
            self.exit = line[len(commands.EXIT_MARKER):].strip()
            self.blank = max(0, self.blank - 1)  # the marker's own leading newline
            self._blanks(out)
            return
        if not line:
            self.blank += 1
            return
        self._blanks(out)
        m = TORCHRUN_RANK.match(line)
        prefix = f"{self.node} r{m.group(1)}" if m else f"{self.node}   "
        text = line[m.end():] if m else line
        if m and "[rank" in text:
            # torchrun's tee reads a rank's file mid-line at times and prefixes
            # the rest of the line again: "step 1[rank0]:0 ..." is "step 10 ...".
            text = text.replace(m.group(0), "")
        # torchrun's summary lists the other failures first, then the root cause: the rank
        # after "Root Cause" is the one that failed first (the first one, without that line).
        if ROOT_CAUSE in text:
            self.root_cause_next = True
        fm = FAILED_RANK.match(text)
        if fm and (self.failed_rank is None or self.root_cause_next):
            self.failed_rank = int(fm.group(1))
            self.root_cause_next = False
        out.append(f"{prefix} | {text.rstrip(chr(13))}\n")

    def _blanks(self, out: list[str]) -> None:
        if self.blank:
            out.append(f"{self.node}    |\n" * self.blank)
            self.blank = 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        with self.lock:
            self._emit([self.buffer] if self.buffer else [])
            out: list[str] = []
            self._blanks(out)
            if out:
                self._write(out)
            self.buffer = ""
            try:
                self.file.close()
            except OSError as exc:  # the last buffered bytes could not be written
                self.write_error = exc.strerror or str(exc)

    def tail(self, n: int = 50) -> list[str]:
        return Path(self.file.name).read_text(errors="replace").splitlines()[-n:]


ERROR_RE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit)\b(?::|$)")


def first_error(lines: Iterable[str]) -> str | None:
    """The first exception line (`ModuleNotFoundError: No module named 'x'`) among log lines
    as NodeLog writes them; what a user needs to read first when a rank dies."""
    for raw in lines:
        text = raw.split(" | ", 1)[-1].strip()
        if ERROR_RE.match(text):
            return text
    return None


LINE_RE = re.compile(r"^(?P<node>\S+) +(?:r(?P<rank>\d+) +)?\| ?(?P<text>.*)$")


@dataclass(frozen=True)
class LogLine:
    node: str
    rank: int | None  # the global rank; None for torchrun's own lines
    text: str
    raw: str  # the line as NodeLog wrote it

    def as_dict(self) -> dict:
        return {"node": self.node, "rank": self.rank, "text": self.text}


def parse_line(raw: str, node: str) -> LogLine:
    """One control-node log line; a line in no known shape counts as the node's own."""
    m = LINE_RE.match(raw)
    if not m:
        return LogLine(node, None, raw, raw)
    rank = m.group("rank")
    return LogLine(m.group("node"), int(rank) if rank else None, m.group("text"), raw)


def select(lines: Iterable[LogLine], rank: int | None = None,
           tail: int | None = None) -> list[LogLine]:
    """The lines of one rank (all when None), the last `tail` of them (all when None)."""
    kept = [x for x in lines if rank is None or x.rank == rank]
    return kept[len(kept) - tail:] if tail is not None and tail < len(kept) else kept


def render(line: LogLine, as_json: bool) -> str:
    return json.dumps(line.as_dict()) if as_json else line.raw


def read(logs_dir: Path, nodes: Iterable[str]) -> dict[str, list[LogLine]]:
    """Each node's lines from the control node's copy (none for a missing file)."""
    out = {}
    for node in nodes:
        try:
            text = (logs_dir / f"{node}.log").read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        out[node] = [parse_line(raw, node) for raw in text.splitlines()]
    return out


def format_output(text: str, node: str) -> list[str]:
    """A node's raw output as the supervisor would have logged it (through NodeLog)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{node}.log"
        sink = NodeLog(path, node)
        sink.write(text)
        sink.close()
        return path.read_text(errors="replace").splitlines()


# -- fetching from the nodes ---------------------------------------------------
def stale(meta: dict, logs_dir: Path, nodes: Iterable[str]) -> list[str]:
    """Nodes of an ended job whose control-node copy is missing, empty, or possibly cut short.

    A node that ended without a recorded exit code (killed, or its stream lost) may have said
    more than the supervisor saw; its log is fetched once (`log_fetched_at` records that).
    While a job runs its supervisor writes the copies, so none is stale.
    """
    if not is_terminal(meta.get("status")):
        return []
    out = []
    for node in nodes:
        path = logs_dir / f"{node}.log"
        facts = (meta.get("nodes") or {}).get(node) or {}
        missing = not path.is_file() or path.stat().st_size == 0
        cut = facts.get("exit_code") is None and not facts.get("log_fetched_at")
        if missing or cut:
            out.append(node)
    return out


def fetch(jobs: Jobs, cluster: Cluster, job_id: str, nodes: list[str]) -> dict[str, str]:
    """Rewrite these nodes' control-node logs from their raw output; node -> why it failed."""
    logs_dir = jobs.dir(job_id) / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    problems: dict[str, str] = {}
    targets = []
    for name in nodes:
        try:
            targets.append(cluster.node(name))
        except UgroError as exc:
            problems[name] = str(exc)
    with closing(backend_for(cluster)) as backend:
        outputs = backend.output(targets, job_id)
    fetched = []
    for name, out in outputs.items():
        if out.text is None:
            problems[name] = out.error
            continue
        # NodeLog writes as it goes: written whole beside the copy, then renamed over it.
        with store.replacing(logs_dir / f"{name}.log") as tmp:
            sink = NodeLog(tmp, name)
            sink.write(out.text)
            sink.close()
        fetched.append(name)
    if fetched:
        stamp = now()
        jobs.note_nodes(job_id, {name: {"log_fetched_at": stamp} for name in fetched})
    return problems


# -- a node's own job directories (`fab -H node logs`) --------------------------
def host_jobs(listing: str) -> list[str]:
    """Job ids from `commands.node_job_dirs` output, newest first.

    Ordered by the start time in the id; a directory's mtime moves whenever a
    job writes its exit code, so it would put the last job to *end* first.
    """
    ids = []
    for line in listing.splitlines():
        parts = line.strip().split("/")
        if len(parts) == 5 and parts[:2] == ["data", "experiments"] and parts[3] == "nodes":
            if NAME_RE.match(parts[2]) and parts[2] not in ids:
                ids.append(parts[2])
    return sorted(ids, key=started_key, reverse=True)


def pick_host_job(ids: list[str], wanted: str | None, node: str) -> str:
    """The job id meant on a node: the exact id, else the newest with that name or at all."""
    if not ids:
        raise UgroError(f"{node}: no job has run here (no data/experiments/*/nodes/{node})")
    if wanted is None:
        return ids[0]
    if wanted in ids:
        return wanted
    named = [j for j in ids if job_name(j) == wanted]
    if named:
        return named[0]
    hint = suggestion(wanted, sorted({job_name(j) for j in ids}), ids, "jobs here")
    raise UgroError(f"{node}: no job named {wanted!r} here; {hint}")


# -- following -----------------------------------------------------------------
class _Reader:
    """Yields whole new lines of one growing file; a partial last line waits."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, ""

    def lines(self) -> list[str]:
        try:
            with self.path.open("r", errors="replace") as f:
                f.seek(self.offset)
                data = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        *lines, self.partial = (self.partial + data).split("\n")
        return lines


def follow(jobs: Jobs, job_id: str, out=sys.stdout, nodes: list[str] | None = None,
           poll: float = 0.1, rank: int | None = None, tail: int | None = None,
           as_json: bool = False) -> None:
    """Print every node's log lines as they arrive, until the job has ended.

    `rank` keeps one rank's lines; `tail` starts each node at its last N lines so far.
    A job that has no nodes yet (queued on Slurm) is followed from the nodes it gets.
    """
    logs = jobs.dir(job_id) / "logs"
    readers: dict[str, _Reader] = {}
    first = True
    while True:
        meta = jobs.metadata(job_id)
        active = is_active(meta.get("status"))
        for name in nodes or meta["nodes"]:
            if name not in readers:
                readers[name] = _Reader(logs / f"{name}.log")
        for node, r in readers.items():
            lines = select((parse_line(raw, node) for raw in r.lines()), rank,
                           tail if first else None)
            for line in lines:
                out.write(render(line, as_json) + "\n")
        out.flush()
        if not active:
            return
        first = not readers
        time.sleep(poll)
