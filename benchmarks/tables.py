"""How figures read in the report: cells, ratios, marks, markdown tables and sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate

from benchmarks.measure import Cell


def secs(cell: Cell | None, repeat: int) -> str:
    if cell is None:
        return "–"
    if cell.error:
        return f"error: {cell.error}"
    notes = [f"n={len(cell.samples)}"] if len(cell.samples) < repeat else []
    notes += [f"{len(cell.errors)} failed"] if cell.errors else []
    return f"{cell.median:.2f} s" + (f" ({', '.join(notes)})" if notes else "")


def ratio(a: Cell | None, b: Cell | None) -> float | None:
    if a is None or b is None or a.median is None or not b.median:
        return None
    return a.median / b.median


def ratio_text(a: Cell | None, b: Cell | None) -> str:
    r = ratio(a, b)
    return f"{r:.2f}×" if r is not None else "–"


def mark(ok: bool | None) -> str:
    return "–" if ok is None else ("✓" if ok else "✗")


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; cells as given (no number parsing), `|` escaped, one line each."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    return tabulate([[cell(x) for x in row] for row in rows], headers=[cell(h) for h in headers],
                    tablefmt="github", disable_numparse=True)


@dataclass
class Section:
    title: str
    body: str
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        notes = "".join(f"\n- {n}" for n in self.notes)
        return f"## {self.title}\n\n{self.body}\n{notes}\n"
