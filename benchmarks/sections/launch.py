"""`inv launch` until every rank runs, against pdsh running UGRO's torchrun commands by hand."""

from __future__ import annotations

from benchmarks.bench import JOB, Bench
from benchmarks.sections import jobs
from benchmarks.tables import Section, ratio_text, secs, table

OVER_PDSH_S = 0.3  # UGRO's launch may add this much to pdsh + torchrun by hand


def run_section(bench: Bench) -> list[Section]:
    runs = jobs.measure(bench)
    n, r = bench.sizes.launch_nodes, bench.repeat
    u, b, cells = runs.ugro, runs.pdsh, runs.cells
    none, b_none = runs.ugro_none, runs.pdsh_none
    ranks = u.get("ranks", none)
    by_hand = b.get("ranks", b_none)
    ok = None if ranks is None or ranks.median is None or by_hand is None \
        or by_hand.median is None else ranks.median <= by_hand.median + OVER_PDSH_S
    goal = f"≤ pdsh + {OVER_PDSH_S:g} s"
    rows = [
        ["`inv launch --detach` returns", secs(u.get("returns", none), r), "–", "–", "–", "–"],
        ["first job process on a node", secs(u.get("first", none), r),
         secs(b.get("first", b_none), r), ratio_text(u.get("first"), b.get("first")), "–", "–"],
        ["every rank running", secs(ranks, r), secs(b.get("ranks", b_none), r),
         ratio_text(ranks, b.get("ranks")), goal,
         bench.target(f"launch → all ranks running, {n} nodes {goal} + torchrun by hand",
                      f"{secs(ranks, r)} (pdsh + torchrun: {secs(by_hand, r)})", ok)],
        ["every `rank N/W up` line in the control logs", secs(u.get("up_lines", none), r),
         "–", "–", "–", "–"],
        ["whole launch (attached) of a script that exits at once",
         secs(cells["launch:attached"], r), secs(cells["launch:pdsh-exit"], r),
         ratio_text(cells["launch:attached"], cells["launch:pdsh-exit"]), "–", "–"],
        ["… baseline: `torchrun --standalone` on one node, 1 rank", "–",
         secs(cells["launch:standalone"], r), "–", "–", "–"],
    ]
    hosts = ",".join(x.name for x in bench.lab.nodes[:n])
    return [Section(
        f"Launch ({n} nodes, 1 rank each)",
        table(["from the start of the launch command to …", "inv launch",
               "pdsh + torchrun", "UGRO ÷ pdsh", "target", "met"], rows),
        [f"pdsh + torchrun: `pdsh -R ssh -w {hosts}` running on each node the "
         "torchrun command UGRO would (`ugro.plan.plan`, the cluster's default "
         "rendezvous: static, `--node-rank` and `--master-addr` lab0; each node picks its "
         "line by its address in `$SSH_CONNECTION`), "
         "i.e. a multi-node launch by hand.",
         "Running: a process with the job's tag (`UGRO_JOB_ID`) and torchrun's "
         "`LOCAL_RANK`/`RANK` in its environment exists for every rank (/proc, polled "
         "every 20 ms; every lab node lives on this machine).",
         f"The job is `{JOB}` (no torch import): the figures are UGRO and torchrun, "
         "not a training script."])]
