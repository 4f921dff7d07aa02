"""Reading a job's logs on the control node: all nodes, whole lines, live."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .jobs import ACTIVE, Jobs


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
           poll: float = 0.1) -> None:
    """Print every node's log lines as they arrive, until the job has ended."""
    logs = jobs.dir(job_id) / "logs"
    names = nodes or list(jobs.metadata(job_id)["nodes"])
    readers = [_Reader(logs / f"{n}.log") for n in names]
    while True:
        active = jobs.metadata(job_id)["status"] in ACTIVE
        for r in readers:
            for line in r.lines():
                out.write(line + "\n")
        out.flush()
        if not active:
            return
        time.sleep(poll)
