"""benchmarks/run.py at its smallest: every section, one lab node for health, tiny sizes, one
run per method. Shape and numbers, never speed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SECS = re.compile(r"\d+\.\d\d s(?: \(.+\))?")  # a figure: median seconds, maybe with notes
COUNT = re.compile(r"\d[\d,]*")
RATE = re.compile(r"\d[\d,]* lines/s")


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


def figures(rows: list[list[str]], column: str, pattern: re.Pattern) -> dict[str, str]:
    """Each body row's cell in `column` (by header), keyed by the row's first cell; every one
    must match `pattern`."""
    header, body = rows[0], rows[1:]
    i = header.index(column)
    bad = [row for row in body if not pattern.fullmatch(row[i])]
    assert not bad, (column, bad)
    return {row[0]: row[i] for row in body}


@pytest.mark.lab
@pytest.mark.slow
def test_every_section_at_tiny_size_produces_its_rows(tmp_path):
    out = tmp_path / "result.md"
    results = sorted((ROOT / "benchmarks" / "results").iterdir())
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache")}
    p = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--nodes", "1", "--size", "tiny", "--repeat", "1",
         "--out", str(out)],
        # About 5 minutes on a shared 2-core machine under load 5-8; 1-2 minutes idle.
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert out.read_text().strip() == p.stdout.strip()
    assert sorted((ROOT / "benchmarks" / "results").iterdir()) == results
    assert p.stdout.startswith("# UGRO control-plane benchmarks")
    assert "--size tiny" in p.stdout
    found = tables(p.stdout)
    assert set(found) == {
        "Targets", "Health fan-out", "Health: control-node CPU per check",
        "Health: where the time goes (lab0 unless N is given)", "CLI start-up",
        "Launch (2 nodes, 1 rank each)", "Cancel (2 nodes)", "Sync",
        "Log streaming (2 nodes × 1,000 lines)", "Growth with history", "Training throughput",
    }, p.stderr
    for name, rows in found.items():
        header, body = rows[0], rows[1:]
        assert body, name
        assert all(len(row) == len(header) for row in body), name
        assert not any(cell.startswith("error") for row in body for cell in row), (name, body)
    # A separator row follows every header.
    assert len(re.findall(r"^\|(?:-{3,}\|)+$", p.stdout, re.M)) == len(found)
    assert "## Failed runs" not in p.stdout

    # Each section's rows, with numbers where they hold figures.
    targets = found["Targets"]
    assert {row[-1] for row in targets[1:]} <= {"✓", "✗", "–"}
    # No health fan-out target at N=1; one for each other section, two for the CLI (--list,
    # --help) and three for the history (jobs, status, preflight).
    assert len(targets) - 1 == 11
    (n1,) = found["Health fan-out"][1:]
    assert n1[0] == "1" and all(SECS.fullmatch(c) for c in n1[1:6]), n1
    assert re.fullmatch(r"\d+\.\d\d× pdsh", n1[6]), n1
    (cpu,) = found["Health: control-node CPU per check"][1:]
    assert all(SECS.fullmatch(c) for c in cpu[1:]), cpu
    steps = found["Health: where the time goes (lab0 unless N is given)"]
    assert steps[-1][:2] == ["probe without --deep imports torch?", "no"]
    figures(steps[:-1], "wall", SECS)
    cli = figures(found["CLI start-up"], "wall", SECS)
    assert "`inv --list`" in cli and "`python -c pass`" in cli
    history = figures(found["Growth with history"], "200 finished jobs", SECS)
    assert set(history) == {"`inv jobs`", "`inv status`",
                            "a launch's preflight (in-process, 1 node)"}
    launch = found["Launch (2 nodes, 1 rank each)"]
    figures([*launch[:4], *launch[5:7]], "inv launch", SECS)
    by_hand = figures([launch[0], *launch[2:4], *launch[6:]], "pdsh + torchrun", SECS)
    assert "every rank running" in by_hand
    assert "every rank running" in figures(launch[:1] + launch[2:4], "Fabric + torchrun", SECS)
    gap = re.compile(r"[+-]\d+\.\d\d s")
    assert figures(launch[:1] + launch[4:5], "pdsh + torchrun", gap) \
        == {"… minus the by-hand run of the same round (median)": launch[4][2]}
    figures(launch[:1] + launch[4:5], "Fabric + torchrun", gap)
    cancel = found["Cancel (2 nodes)"]
    figures(cancel, "inv cancel", SECS)
    figures(cancel[:2], "SIGTERM to each torchrun agent, no SSH", SECS)
    sync = found["Sync"]
    figures(sync, "baseline time", SECS)
    figures([sync[0], sync[1], sync[3]], "UGRO", SECS)
    logs = found["Log streaming (2 nodes × 1,000 lines)"]
    figures(logs[:3], "inv launch", COUNT)
    figures([logs[0], logs[3], logs[6]], "inv launch", RATE)
    figures([logs[0], logs[2]], "pdsh -R ssh", COUNT)
    figures([logs[0], logs[3], logs[6]], "pdsh -R ssh", RATE)
    assert SECS.fullmatch(logs[-1][1]) and SECS.fullmatch(logs[-1][2]), logs[-1]
    (train,) = found["Training throughput"][1:]
    assert train[0] == "samples/s, 2 nodes × 1 rank"
    assert all(COUNT.fullmatch(c) for c in train[1:3]), train
    assert re.fullmatch(r"\d\.\d{3}×", train[3]), train

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
