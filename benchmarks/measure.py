"""Taking figures: run a command, time it, take turns between methods, keep the median.

Every figure is the median whole-process wall time of `repeat` runs after one warm-up run per
method; the methods of one row take turns, so load on a shared machine falls on all of them
alike. A method that has spent its budget in one row stops repeating there (the row says n).
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELL_BUDGET_S = 10.0
TIMEOUT_S = 300
MAX_FAILURES = 2  # failed runs after which a method stops repeating in a row


class Failed(Exception):
    """A measured command did not do what it should; its cell shows why instead of a time."""


@dataclass
class Cell:
    """The runs of one method in one row: the times of those that worked, why others did not."""

    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def error(self) -> str | None:
        """Why the method has no figure at all."""
        return None if self.samples or not self.errors else self.errors[0]


def compare(methods: dict[str, Callable[[], float]], repeat: int, warm: set[str] | None,
            budget: float = CELL_BUDGET_S) -> dict[str, Cell]:
    """Run each method `repeat` times, taking turns (in reverse order every other round),
    after one warm-up run of each method not in `warm` yet (None: no warm-up). A method stops
    repeating once it has spent `budget` seconds here, warm-up included (every method gets at
    least one timed run), or has failed twice.
    """
    cells = {name: Cell() for name in methods}
    spent = dict.fromkeys(methods, 0.0)

    def once(name: str) -> float | None:
        t0 = time.perf_counter()
        try:
            return methods[name]()
        except Failed as exc:
            cells[name].errors.append(str(exc))
            return None
        finally:
            spent[name] += time.perf_counter() - t0

    for name in methods:
        if warm is not None and name not in warm:
            once(name)
            warm.add(name)
    for round_ in range(repeat):
        # Every other round in reverse order: no method always runs right after the same one.
        for name in (list(methods) if round_ % 2 == 0 else list(methods)[::-1]):
            cell = cells[name]
            if len(cell.errors) >= MAX_FAILURES or (cell.samples and spent[name] >= budget):
                continue
            value = once(name)
            if value is not None:
                cell.samples.append(value)
    return cells


def run(argv: list[str], *, env: dict | None = None, cwd: Path = ROOT,
        timeout: float = TIMEOUT_S) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command to its end; (wall seconds, result). A non-zero exit is a Failed."""
    start = time.perf_counter()
    try:
        p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Failed(f"timed out after {timeout:g} s") from None
    elapsed = time.perf_counter() - start
    if p.returncode != 0:
        raise Failed(f"exit {p.returncode}: {last_line(p.stderr or p.stdout)}")
    return elapsed, p


def why(text: str) -> str:
    """The line of a failed command's output most likely to say why: its last error, else last."""
    errors = [x for x in text.splitlines() if "rror" in x and "frame #" not in x]
    return last_line(errors[-1] if errors else text)


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return (lines[-1] if lines else "no output")[:160].replace("|", "/")


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def with_cpu(fn: Callable[[], float], into: list[float]) -> Callable[[], float]:
    """`fn`, also noting the CPU its child processes used (their user + system time)."""
    def wrapped() -> float:
        before = child_cpu()
        t = fn()
        into.append(child_cpu() - before)
        return t
    return wrapped


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               every: float = 0.02) -> float:
    """Poll until `predicate()` is true; the perf_counter time it first was."""
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if predicate():
            return now
        if now > deadline:
            raise Failed(f"{what}: not within {timeout:g} s")
        time.sleep(every)
