"""How long `inv` takes to start, next to a bare Python."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from benchmarks.bench import Bench, say
from benchmarks.measure import run
from benchmarks.tables import Section, secs, table

LIST_TARGET_S = 0.25


def run_section(bench: Bench) -> list[Section]:
    steps = {"`inv --list`": bench.inv + ["--list"],
             "`inv health --help`": bench.inv + ["health", "--help"],
             "`python -c pass`": [sys.executable, "-c", "pass"]}
    on_path = shutil.which("inv")
    if on_path and Path(on_path).resolve() != Path(bench.inv[0]).resolve():
        steps[f"`inv --list` via PATH ({on_path})"] = [on_path, "--list"]
    say("cli")
    cells = bench.compare("cli", {k: (lambda a=a: run(a)[0]) for k, a in steps.items()})
    rows = []
    for label, c in cells.items():
        if label.startswith("`inv"):
            ok = None if c.median is None else c.median <= LIST_TARGET_S
            met = bench.target(f"{label} ≤ {LIST_TARGET_S:g} s", secs(c, bench.repeat), ok)
            rows.append([label, secs(c, bench.repeat), f"≤ {LIST_TARGET_S:g} s", met])
        else:
            rows.append([label, secs(c, bench.repeat), "–", "–"])
    return [Section("CLI start-up", table(["command", "wall", "target", "met"], rows),
                    [f"`inv` is `{' '.join(bench.inv)}`, run from the project root."])]
