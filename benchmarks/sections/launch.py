"""`inv launch` until every rank runs, against UGRO's torchrun commands run by hand: with pdsh,
and with Fabric from Python (the floor for a launcher written in Python)."""

from __future__ import annotations

import statistics

from benchmarks.bench import JOB, Bench
from benchmarks.measure import Cell
from benchmarks.sections import jobs
from benchmarks.tables import Section, ratio_text, secs, table

OVER_PDSH_S = 0.3  # UGRO's launch may add this much to pdsh + torchrun by hand


def paired_gap(a: Cell | None, b: Cell | None) -> str:
    """The median of a's run minus b's run in the same round ("+0.12 s"): each round's two
    runs share the machine's state, so the drift between rounds cancels out."""
    if a is None or b is None or a.errors or b.errors or not a.samples \
            or len(a.samples) != len(b.samples):
        return "–"
    pairs = zip(a.samples, b.samples, strict=True)
    return f"{statistics.median(x - y for x, y in pairs):+.2f} s"


def run_section(bench: Bench) -> list[Section]:
    runs = jobs.measure(bench)
    n, r = bench.sizes.launch_nodes, bench.repeat
    u, b, f, cells = runs.ugro, runs.pdsh, runs.fabric, runs.cells
    none, b_none, f_none = runs.ugro_none, runs.pdsh_none, runs.fabric_none
    ranks = u.get("ranks", none)
    by_hand = b.get("ranks", b_none)
    floor = f.get("ranks", f_none)
    ok = None if ranks is None or ranks.median is None or by_hand is None \
        or by_hand.median is None else ranks.median <= by_hand.median + OVER_PDSH_S
    goal = f"≤ pdsh + {OVER_PDSH_S:g} s"
    rows = [
        ["`inv launch --detach` returns", secs(u.get("returns", none), r), "–", "–", "–", "–",
         "–"],
        ["first job process on a node", secs(u.get("first", none), r),
         secs(b.get("first", b_none), r), secs(f.get("first", f_none), r),
         ratio_text(u.get("first"), b.get("first")), "–", "–"],
        ["every rank running", secs(ranks, r), secs(by_hand, r), secs(floor, r),
         ratio_text(ranks, b.get("ranks")), goal,
         bench.target(f"launch → all ranks running, {n} nodes {goal} + torchrun by hand",
                      f"{secs(ranks, r)} (pdsh + torchrun: {secs(by_hand, r)}; "
                      f"Fabric + torchrun: {secs(floor, r)})", ok)],
        ["… minus the by-hand run of the same round (median)", "–",
         paired_gap(ranks, by_hand), paired_gap(ranks, floor), "–", "–", "–"],
        ["every `rank N/W up` line in the control logs", secs(u.get("up_lines", none), r),
         "–", "–", "–", "–", "–"],
        ["whole launch (attached) of a script that exits at once",
         secs(cells["launch:attached"], r), secs(cells["launch:pdsh-exit"], r), "–",
         ratio_text(cells["launch:attached"], cells["launch:pdsh-exit"]), "–", "–"],
        ["… baseline: `torchrun --standalone` on one node, 1 rank", "–",
         secs(cells["launch:standalone"], r), "–", "–", "–", "–"],
    ]
    hosts = ",".join(x.name for x in bench.lab.nodes[:n])
    return [Section(
        f"Launch ({n} nodes, 1 rank each)",
        table(["from the start of the launch command to …", "inv launch",
               "pdsh + torchrun", "Fabric + torchrun", "UGRO ÷ pdsh", "target", "met"], rows),
        [f"pdsh + torchrun: `pdsh -R ssh -w {hosts}` running on each node the "
         "torchrun command UGRO would (`ugro.plan.plan`, the cluster's default "
         "rendezvous: static, `--node-rank` and `--master-addr` lab0; each node picks its "
         "line by its address in `$SSH_CONNECTION`), "
         "i.e. a multi-node launch by hand.",
         "Fabric + torchrun: the same command through Fabric's `ThreadingGroup` "
         "(`benchmarks/fabric_launch.py`): an interpreter, Fabric's imports and one SSH "
         "connection per node, and nothing else. The floor for a launcher written in Python; "
         "UGRO adds its preflight, its records and a supervisor that streams every node "
         "from the start.",
         "Running: a process with the job's tag (`UGRO_JOB_ID`) and torchrun's "
         "`LOCAL_RANK`/`RANK` in its environment exists for every rank (/proc, polled "
         "every 20 ms; every lab node lives on this machine).",
         "Each round runs every method once, in reverse order every other round; the "
         "\"minus\" row pairs each UGRO run with the by-hand run of its own round.",
         f"The job is `{JOB}` (no torch import): the figures are UGRO and torchrun, "
         "not a training script."])]
