"""`inv sync`, no-op and first fill, against rsync of the same selection with UGRO's filters."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.bench import Bench, say
from benchmarks.measure import ROOT, TIMEOUT_S, Failed, last_line, run
from benchmarks.tables import Section, ratio_text, secs, table
from ugro import sync
from ugro.config import load_cluster

NOOP_TARGET_S = 1.5


def run_section(bench: Bench) -> list[Section]:
    sizes, r = bench.sizes, bench.repeat
    goal = f"no-op sync, {sizes.sync_nodes} nodes ≤ {NOOP_TARGET_S:g} s"
    listing = run(bench.inv + ["--list"])[1].stdout
    if not re.search(r"^\s+sync\s", listing, re.M):
        bench.target(goal, "n/a: inv sync missing", None)
        return [Section("Sync", "n/a: inv sync missing")]
    project = project_copy(bench.tmp / "project")
    make_tree(project / "payload", sizes.sync_tree_mb)
    runs = itertools.count()
    env_all = bench.env(bench.cluster(sizes.sync_nodes, "sync-noop",
                                      project_path=lambda n: n.dir / "sync"))
    say(f"sync: first fill of {sizes.sync_nodes} nodes")
    try:
        run(bench.inv + ["sync"], env=env_all, cwd=project)
    except Failed as exc:
        bench.target(goal, f"error: {exc}", None)
        return [Section("Sync", f"error: `inv sync` failed: {exc}")]

    def rsync(paths: list[str], count: int, fresh: bool) -> float:
        """rsync -a of the same selection, with UGRO's own filter rules, to `count` nodes."""
        sub = f"rsync{next(runs)}" if fresh else "rsync"
        rules = sync.filters(project, paths)
        nodes = bench.lab.nodes[:count]
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["rsync", "-a", *rules, "-e", f"ssh -F {bench.ssh_cfg}",
                                   f"{project}/", f"{n.name}:{n.dir / sub}/"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for n in nodes]
        codes = [p.wait(TIMEOUT_S) for p in procs]
        t = time.perf_counter() - t0
        if fresh:
            for n in nodes:
                shutil.rmtree(n.dir / sub, ignore_errors=True)
        if any(codes):
            raise Failed(f"rsync exit codes {codes}: {last_line(procs[0].stderr.read())}")
        return t

    code = sync.sync_set(load_cluster(env_all["INVOKE_UGRO_CLUSTER"]), project)
    say(f"sync: no-op on {sizes.sync_nodes} nodes")
    rsync(code, sizes.sync_nodes, fresh=False)
    noop = bench.compare("sync no-op", {
        "sync:inv": lambda: run(bench.inv + ["sync"], env=env_all, cwd=project)[0],
        "sync:rsync": lambda: rsync(code, 1, fresh=False),
        "sync:rsync16": lambda: rsync(code, sizes.sync_nodes, fresh=False),
    })

    def first_inv() -> float:
        sub = f"first{next(runs)}"
        cluster = bench.cluster(sizes.sync_first_nodes, "sync-first",
                                project_path=lambda n: n.dir / sub, sync_paths=["payload"])
        try:
            return run(bench.inv + ["sync"], env=bench.env(cluster), cwd=project)[0]
        finally:
            for n in bench.lab.nodes[:sizes.sync_first_nodes]:
                shutil.rmtree(n.dir / sub, ignore_errors=True)

    tree = [*code, "payload"]
    say(f"sync: first sync of {sizes.sync_tree_mb} MB to {sizes.sync_first_nodes} nodes")
    first = bench.compare("sync first", {
        "sync:first-inv": first_inv,
        "sync:first-rsync1": lambda: rsync(tree, 1, fresh=True),
        "sync:first-rsync4": lambda: rsync(tree, sizes.sync_first_nodes, fresh=True),
    })
    inv_noop, inv_first = noop["sync:inv"], first["sync:first-inv"]
    one, many = first["sync:first-rsync1"], first["sync:first-rsync4"]
    ok = None if inv_noop.median is None else inv_noop.median <= NOOP_TARGET_S
    rows = [
        [f"no-op `inv sync`, {sizes.sync_nodes} nodes", secs(inv_noop, r),
         "one no-op `rsync -a` to one node", secs(noop["sync:rsync"], r),
         ratio_text(inv_noop, noop["sync:rsync"]), f"≤ {NOOP_TARGET_S:g} s",
         bench.target(goal, secs(inv_noop, r), ok)],
        ["", "", f"{sizes.sync_nodes} × no-op `rsync -a` at once",
         secs(noop["sync:rsync16"], r), ratio_text(inv_noop, noop["sync:rsync16"]), "–", "–"],
        [f"first `inv sync` of a {sizes.sync_tree_mb} MB tree, {sizes.sync_first_nodes} nodes",
         secs(inv_first, r), "one `rsync -a` to one node", secs(one, r),
         ratio_text(inv_first, one), "–", "–"],
        ["", "", f"{sizes.sync_first_nodes} × `rsync -a` at once", secs(many, r),
         ratio_text(inv_first, many), "–", "–"],
    ]
    return [Section("Sync", table(["measure", "UGRO", "baseline", "baseline time",
                                   "UGRO ÷ baseline", "target", "met"], rows),
                    [f"`inv sync` runs from a copy of the project, so the repository stays "
                     f"as it is; the code it sends is {', '.join(code)}. The first-sync row "
                     f"adds `sync.paths: [payload]`, {sizes.sync_tree_mb} MB of random files in "
                     "200 files, and goes to new, empty project directories each time.",
                     "The rsync baselines send the same selection with UGRO's own filter "
                     "rules (`ugro.sync.filters`), over `ssh -F ssh_config`."])]


def project_copy(dest: Path) -> Path:
    """The project's files as a user would have them: no VCS, run state or caches."""
    top = {".git", "data", "logs", ".pytest_cache", ".ruff_cache", ".venv", ".pixi"}

    def skip(folder: str, names: list[str]) -> set[str]:
        at_top = Path(folder) == ROOT
        return {n for n in names if n == "__pycache__" or n.endswith(".egg-info")
                or (at_top and n in top)}

    shutil.copytree(ROOT, dest, ignore=skip)
    return dest


def make_tree(root: Path, megabytes: int) -> None:
    """`megabytes` MB of random (incompressible) files: 10 folders of 20 files each."""
    size = megabytes * 1024 * 1024 // 200
    for d in range(10):
        (root / f"part{d}").mkdir(parents=True, exist_ok=True)
        for i in range(20):
            (root / f"part{d}" / f"shard{i:02d}.bin").write_bytes(os.urandom(size))
