"""benchmarks/run.py, smallest run: one lab node, health and CLI only. Shape, never speed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def tables(markdown: str) -> dict[str, list[list[str]]]:
    """Each `## section`'s table, as rows of cells (header first, separator left out)."""
    found: dict[str, list[list[str]]] = {}
    section = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("|") and section is not None:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r"-{3,}", c) for c in cells):
                found.setdefault(section, []).append(cells)
    return found


@pytest.mark.lab
@pytest.mark.slow
def test_one_node_smoke_produces_well_formed_tables(tmp_path):
    out = tmp_path / "result.md"
    p = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--nodes", "1", "--only", "health,cli",
         "--repeat", "1", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert out.read_text().strip() == p.stdout.strip()
    assert p.stdout.startswith("# UGRO control-plane benchmarks")
    found = tables(p.stdout)
    assert set(found) == {"Targets", "Health fan-out", "Health: control-node CPU per check",
                          "Health: where the time goes (lab0 unless N is given)",
                          "CLI start-up"}
    for name, rows in found.items():
        header, body = rows[0], rows[1:]
        assert body, name
        assert all(len(row) == len(header) for row in body), name
        assert all(cell for row in body for cell in row), name  # "–" where nothing applies
        assert not any(cell.startswith("error") for row in body for cell in row), (name, body)
    # The separator row follows every header.
    assert len(re.findall(r"^\|(?:---\|)+$", p.stdout, re.M)) == len(found)
    (n1,) = found["Health fan-out"][1:]
    assert n1[0] == "1" and all(c.endswith(" s") for c in n1[1:5])
    commands = [row[0] for row in found["CLI start-up"][1:]]
    assert "`inv --list`" in commands and "`python -c pass`" in commands
    assert {row[-1] for row in found["Targets"][1:]} <= {"✓", "✗", "–"}
    # Everything it started, it stopped: its lab's daemons, and its temporary directory.
    (work,) = re.findall(r"sshd lab nodes in (\S+)", p.stderr)
    assert not Path(work).exists()
    assert work not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                      text=True).stdout


def test_bad_arguments_are_one_line_errors():
    p = subprocess.run([sys.executable, "benchmarks/run.py", "--only", "health,nope"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "--only: unknown section(s) nope" in p.stderr
    assert "Traceback" not in p.stderr
