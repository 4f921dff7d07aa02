"""`inv cancel` until no job process is left, against SIGTERM straight to the torchrun agents."""

from __future__ import annotations

from benchmarks.bench import Bench
from benchmarks.sections import jobs
from benchmarks.tables import Section, secs, table

TARGET_S = 3.0


def run_section(bench: Bench) -> list[Section]:
    runs = jobs.measure(bench)
    n, r = bench.sizes.launch_nodes, bench.repeat
    zero = runs.ugro.get("cancel_zero", runs.ugro_none)
    ok = None if zero is None or zero.median is None else zero.median <= TARGET_S
    rows = [
        ["no job process left on any node", secs(zero, r),
         secs(runs.pdsh.get("cancel_zero", runs.pdsh_none), r), f"≤ {TARGET_S:g} s",
         bench.target(f"cancel → zero processes, {n} nodes ≤ {TARGET_S:g} s", secs(zero, r),
                      ok)],
        ["`inv cancel` returns", secs(runs.ugro.get("cancel_inv", runs.ugro_none), r), "–", "–",
         "–"],
    ]
    return [Section(
        f"Cancel ({n} nodes)",
        table(["from the start of the stop to …", "inv cancel",
               "SIGTERM to each torchrun agent, no SSH", "target", "met"], rows),
        ["The baseline signals the torchrun agents of the pdsh-launched job straight "
         "from this process: a floor for any tool, since it pays no SSH and no start-up."])]
