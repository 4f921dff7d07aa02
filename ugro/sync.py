"""`inv sync`: every worker runs the control node's code (`envs.py` does the environments).

Code goes with rsync over SSH (the user, port, key and pinned host keys of UGRO's
own connections) to every node at once, delta only: `sync_code()`. The parsers
(`parse_itemized`, `parse_stats`, `describe_rsync_failure`, `parse_df`) are pure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import commands
from .cluster import fan_out
from .config import Cluster, Node
from .errors import UgroError
from .render import human_bytes
from .transport import known_hosts_name

DEFAULT_PATHS = ("scripts", "config", "pixi.toml", "pixi.lock")
PIXI_FILES = ("pixi.toml", "pixi.lock")
REQUIREMENTS = "scripts/requirements.txt"
# `/data/` is anchored at the project root: scripts/data/ holds the built-in
# corpus that training needs on every worker.
EXCLUDES = ("--filter=:- .gitignore", "--exclude=/data/", "--exclude=__pycache__/")
WILDCARDS = set("*?[\\")


# -- what to sync ------------------------------------------------------------

def sync_set(cluster: Cluster, root: Path) -> list[str]:
    """The project paths `inv sync` copies: the defaults that exist, then cluster `sync.paths`."""
    paths = [p for p in DEFAULT_PATHS if (root / p).exists()]
    for raw in cluster.sync_paths:
        path = raw.strip().rstrip("/")
        parts = path.split("/")
        why = None
        if not path or path.startswith("/") or path == ".":
            why = "must be a path inside the project"
        elif ".." in parts or "" in parts or "." in parts:
            why = "must be a plain path inside the project (no '..', '.' or '//')"
        elif WILDCARDS & set(path):
            why = "must name a file or directory, not a pattern"
        elif not (root / path).exists():
            why = f"does not exist in {root}"
        if why:
            raise UgroError(f"{cluster.source}: sync.paths: {raw!r} {why}")
        if path not in paths:
            paths.append(path)
    return paths


def filters(root: Path, paths: Iterable[str]) -> list[str]:
    """rsync filter rules that send exactly `paths` (and their parents), less ignored files."""
    rules = list(EXCLUDES)
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = f"--include=/{'/'.join(parts[:i])}/"
            if parent not in rules:
                rules.append(parent)
        rules.append(f"--include=/{path}/***" if (root / path).is_dir() else f"--include=/{path}")
    rules.append("--exclude=*")
    return rules


def is_control(node: Node, root: Path) -> bool:
    """The node whose project is the one being synced from: nothing to copy there."""
    return node.local and Path(node.project_path).resolve() == Path(root).resolve()


# -- reading rsync's output --------------------------------------------------



# `--itemize-changes`: YXcstpoguax then the path; `*deleting` for deletions.
ITEM_RE = re.compile(r"^([<>ch.])([fdLDS])\S{7,9} (.+)$")
DELETING_RE = re.compile(r"^\*deleting +(.+)$")


def parse_itemized(text: str) -> tuple[list[str], list[str]]:
    """The files rsync changed (sent, created or re-attributed) and deleted, from -i output.

    Directories are left out: a directory whose mtime moved is no change of code.
    """
    changed, deleted = [], []
    for line in text.splitlines():
        m = DELETING_RE.match(line)
        if m:
            deleted.append(m.group(1))
            continue
        m = ITEM_RE.match(line)
        if m and m.group(2) != "d":
            path = m.group(3)
            changed.append(path.split(" -> ", 1)[0] if m.group(2) == "L" else path)
    return changed, deleted


STATS = {
    "Number of regular files transferred": "files_transferred",
    "Number of files transferred": "files_transferred",  # rsync < 3.1
    "Number of deleted files": "deleted",
    "Total file size": "total_size",
    "Total transferred file size": "transferred_size",
    "Total bytes sent": "bytes_sent",
    "Total bytes received": "bytes_received",
}
STAT_RE = re.compile(r"^([A-Za-z ]+): ([\d,.]+)")


def parse_stats(text: str) -> dict[str, int]:
    """The numbers of `rsync --stats` that UGRO reports, by short name."""
    stats = {}
    for line in text.splitlines():
        m = STAT_RE.match(line.strip())
        if m and m.group(1) in STATS:
            digits = re.sub(r"[,.]", "", m.group(2))
            if digits.isdigit():
                stats[STATS[m.group(1)]] = int(digits)
    return stats


DF_RE = re.compile(r"\s(\d+)\s+(\d+)\s+(\d+)\s+\d+%\s")


def parse_df(text: str) -> int | None:
    """Bytes available, from `df -Pk` output (whatever the file system and mount are named)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    m = DF_RE.search(lines[-1] + " ") if len(lines) >= 2 else None
    return int(m.group(3)) * 1024 if m else None


def describe_rsync_failure(node: Node, code: int, stderr: str,
                           space: tuple[int, int] | None = None) -> str:
    """One line saying why rsync to `node` failed, from its exit code and stderr.

    `space` is (bytes free on the node, bytes of the file rsync was writing):
    rsync >= 3.2.3 often exits before the node's "No space left" reaches us.
    """
    name = node.name
    if commands.NO_RSYNC in stderr:
        return f"{name}: rsync is not installed on the node (e.g. apt install rsync)"
    if "No space left on device" in stderr:
        return f"{name}: disk full on the node (No space left on device)"
    if space and space[0] < space[1]:
        return (f"{name}: disk full on the node ({human_bytes(space[0])} free, "
                f"{human_bytes(space[1])} needed for one file)")
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return (f"{name}: host key CHANGED for {known_hosts_name(node)}; if the node was "
                f"reinstalled, run: inv trust-hosts --nodes {name} --replace")
    if "Host key verification failed" in stderr:
        return (f"{name}: host key for {known_hosts_name(node)} is not trusted; "
                f"run: inv trust-hosts --nodes {name}")
    if "Connection refused" in stderr:
        return f"{name}: cannot connect to {node.address} (connection refused)"
    if "timed out" in stderr.lower():
        return f"{name}: {node.address} did not answer (timed out)"
    if "Permission denied (publickey" in stderr:
        return f"{name}: SSH authentication failed for {node.user}@{node.address}"
    noise = ("rsync error:", "rsync: connection unexpectedly closed", "rsync: [sender] write error")
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith(noise)]
    return f"{name}: rsync failed (exit {code}): {lines[0] if lines else 'no message'}"


# -- progress ----------------------------------------------------------------

class Progress:
    """A line when a node starts and ends a step, and a reminder while a long one runs.

    `Progress(None)` says nothing, for callers that print only the result.
    """

    def __init__(self, out: TextIO | None = sys.stderr, every: float = 30.0):
        self.out, self.every = out, every
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._running: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def say(self, text: str) -> None:
        if self.out is None:
            return
        with self._lock:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=self.out, flush=True)

    def start(self, node: str, what: str) -> None:
        with self._lock:
            self._running[(node, what)] = time.monotonic()
            if self._ticker is None and self.out is not None:
                self._ticker = threading.Thread(target=self._tick, daemon=True)
                self._ticker.start()
        self.say(f"{node}: {what} ...")

    def end(self, node: str, what: str, error: str | None = None) -> float:
        """Say how the step ended; return how long it took, in seconds."""
        with self._lock:
            seconds = time.monotonic() - self._running.pop((node, what))
        outcome = f"FAILED after {seconds:.1f}s" if error else f"done in {seconds:.1f}s"
        self.say(f"{node}: {what}: {outcome}")
        return round(seconds, 2)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                running = list(self._running.items())
            now = time.monotonic()
            for (node, what), since in running:
                self.say(f"{node}: {what}: still running ({now - since:.0f}s)")

    def close(self) -> None:
        self._stop.set()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- inv sync ----------------------------------------------------------------

@dataclass
class NodeSync:
    """What syncing one node did, or why it did not."""

    node: str
    ok: bool
    changed: list[str] = field(default_factory=list)  # files sent or updated on the node
    deleted: list[str] = field(default_factory=list)
    bytes_sent: int = 0  # what went over the wire, file list included
    file_bytes: int = 0  # the changed files' data: what a dry run would send
    seconds: float = 0.0
    dry_run: bool = False
    skipped: str | None = None  # why nothing was copied (the control node)
    error: str | None = None

    @property
    def result(self) -> str:
        if self.error:
            return "FAILED"
        if self.skipped:
            return f"skipped ({self.skipped})"
        if not self.changed and not self.deleted:
            return "up to date"
        return "would change" if self.dry_run else "synced"


def require_rsync() -> None:
    if shutil.which("rsync") is None:
        raise UgroError("rsync is not installed on the control node (e.g. apt install rsync)")


def _free_bytes(cluster: Cluster, node: Node) -> int | None:
    if node.local:
        path = Path(node.project_path)
        while not path.is_dir():
            path = path.parent
        return shutil.disk_usage(path).free
    argv = commands.ssh(node, cluster.known_hosts_path, cluster.health_timeout,
                        commands.free_space(node))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, timeout=cluster.health_timeout + 10)
    except subprocess.TimeoutExpired:
        return None
    return parse_df(proc.stdout) if proc.returncode == 0 else None


def _space(cluster: Cluster, node: Node, root: Path, stdout: str) -> tuple[int, int] | None:
    """(free on the node, size of the file rsync was writing), to tell a full disk."""
    changed, _ = parse_itemized(stdout)
    writing = root / changed[-1] if changed else None
    if writing is None or not writing.is_file():
        return None
    free = _free_bytes(cluster, node)
    return None if free is None else (free, writing.stat().st_size)


# rsync's exit codes for a failed write on the receiver: file I/O error, partial transfer.
WRITE_FAILED = (11, 23)


def run_rsync(cluster: Cluster, node: Node, root: Path, argv: list[str], progress: Progress,
              what: str, dry_run: bool = False) -> NodeSync:
    """Run one rsync argv (from `commands.rsync`) and read what it did."""
    progress.start(node.name, what)
    if node.local and "--dry-run" not in argv:
        Path(node.project_path).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        space = None
        if proc.returncode in WRITE_FAILED and "No space left" not in proc.stderr:
            space = _space(cluster, node, root, proc.stdout)
        error = describe_rsync_failure(node, proc.returncode, proc.stderr, space)
        seconds = progress.end(node.name, what, error)
        return NodeSync(node.name, False, seconds=seconds, dry_run=dry_run, error=error)
    seconds = progress.end(node.name, what)
    changed, deleted = parse_itemized(proc.stdout)
    stats = parse_stats(proc.stdout)
    return NodeSync(node.name, True, changed, deleted, stats.get("bytes_sent", 0),
                    stats.get("transferred_size", 0), seconds, dry_run)


def sync_code(cluster: Cluster, nodes: Iterable[Node], root: Path, dry_run: bool = False,
              delete: bool = False, *, progress: Progress | None = None) -> list[NodeSync]:
    """Copy the project's code under `root` to every node at once; one NodeSync per node.

    The control node itself is skipped. A node that fails (unreachable, no
    rsync, disk full) is reported with its reason; the others still sync.
    Files only the node has are deleted only with `delete`.
    """
    root = Path(root).resolve()
    nodes = list(nodes)
    rules = filters(root, sync_set(cluster, root))
    progress = progress or Progress(None)
    if any(not is_control(n, root) for n in nodes):
        require_rsync()

    def one(node: Node) -> NodeSync:
        if is_control(node, root):
            return NodeSync(node.name, True, dry_run=dry_run, skipped="control node")
        argv = commands.rsync(node, root, rules, known_hosts=cluster.known_hosts_path,
                              timeout=cluster.health_timeout, dry_run=dry_run, delete=delete)
        return run_rsync(cluster, node, root, argv, progress, "dry run" if dry_run else "sync",
                         dry_run)

    return list(fan_out(nodes, one).values())


def sync_table(results: list[NodeSync]) -> str:
    from tabulate import tabulate

    dry_run = any(s.dry_run for s in results)
    rows = []
    for s in results:
        done = s.error is None and s.skipped is None
        rows.append([
            s.node, s.result,
            len(s.changed) if done else "-",
            len(s.deleted) if done else "-",
            human_bytes(s.file_bytes if dry_run else s.bytes_sent) if done else "-",
            f"{s.seconds:.1f}s" if not s.skipped else "-",
            s.error or "",
        ])
    headers = ["node", "result", "files", "deleted", "would send" if dry_run else "sent", "time",
               "notes"]
    return tabulate(rows, headers=headers, tablefmt="simple")
