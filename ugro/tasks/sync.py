"""Sync tasks: sync (the project's code) and sync-envs (the Python environments)."""

from __future__ import annotations

import sys

from invoke import Collection, task
from invoke.exceptions import Exit

from .common import ROOT, cli, cluster_of, target_nodes


@task(
    help={
        "nodes": "comma-separated node names (default: all)",
        "dry_run": "show what would change on each node, and change nothing",
        "delete": "also delete files on the nodes that the control node no longer has",
    }
)
@cli
def sync(c, nodes=None, dry_run=False, delete=False):
    """Copy the project's code to every worker at once (rsync over SSH, delta only)."""
    from .. import sync as sync_mod

    cluster = cluster_of(c)
    targets = target_nodes(c, cluster, nodes)
    paths = sync_mod.sync_set(cluster, ROOT)
    print(f"{'dry run: ' if dry_run else ''}{', '.join(paths)} from {ROOT}", flush=True)
    with sync_mod.Progress(sys.stderr) as progress:
        results = sync_mod.sync_code(cluster, targets, ROOT, dry_run=dry_run, delete=delete,
                                     progress=progress)
    print(sync_mod.sync_table(results))
    if dry_run:
        for s in results:
            for path in s.changed:
                print(f"  {s.node}: would send {path}")
            for path in s.deleted:
                print(f"  {s.node}: would delete {path}")
    failed = [s.node for s in results if not s.ok]
    if failed:
        raise Exit(f"sync failed on: {', '.join(failed)}", code=1)


@task(
    name="sync-envs",
    help={
        "nodes": "comma-separated node names (default: all)",
        "find_links": "directory or URL of wheels for pip on venv nodes (a path as each node "
                      "sees it; relative to its project path)",
        "no_index": "pip must not use any package index: install offline from --find-links",
        "check": "install nothing: only fingerprint the environments and compare them",
    },
)
@cli
def sync_envs(c, nodes=None, find_links=None, no_index=False, check=False):
    """Make every worker's Python environment match the lock, then compare fingerprints."""
    from .. import envs
    from .. import sync as sync_mod

    cluster = cluster_of(c)
    targets = target_nodes(c, cluster, nodes)
    with sync_mod.Progress(sys.stderr) as progress:
        report = envs.sync_envs(cluster, targets, ROOT, find_links=find_links,
                                    no_index=no_index, check=check, progress=progress)
    print(envs.env_table(report))
    for e in report.nodes:
        if e.error:
            print(f"FAILED: {e.error}")
    for line in report.drift:
        print(f"DRIFT: {line}")
    if not report.ok:
        raise Exit(code=1)
    print(f"environments match on {', '.join(e.node for e in report.nodes)}")


ns = Collection(sync, sync_envs)
