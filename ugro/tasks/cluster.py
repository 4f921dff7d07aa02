"""Cluster tasks: health, trust-hosts, init."""

from __future__ import annotations

from invoke import Collection, task
from invoke.exceptions import Exit

from .common import cli, cluster_of, positive, print_json, project_path, target_nodes


@task(
    help={
        "nodes": "comma-separated node names (default: all)",
        "json": "print the reports as JSON instead of a table",
        "deep": "also import torch on each node and check that CUDA initialises (slower)",
        "timeout": "seconds to wait for each node (default: cluster.health_timeout)",
    }
)
@cli
def health(c, nodes=None, json=False, deep=False, timeout=None):
    """Check every node in parallel: reachable, GPUs, Python, torch/CUDA, disk."""
    from .. import health as health_mod

    timeout = positive("timeout", timeout)
    cluster = cluster_of(c)
    targets = target_nodes(c, cluster, nodes)
    reports = health_mod.check(cluster, targets, deep=deep, timeout=timeout)
    drift = health_mod.drift(reports)
    health_mod.save(project_path(c, "data_dir"), project_path(c, "log_dir"), cluster, reports)
    if json:
        print_json({"nodes": [r.as_dict() for r in reports], "drift": drift})
    else:
        print(health_mod.table(reports))
        for line in drift:
            print(f"DRIFT: {line}")
    bad = [r.node for r in reports if not r.healthy]
    if bad:
        raise Exit(f"unhealthy: {', '.join(bad)}" if not json else None, code=1)


@task(
    name="trust-hosts",
    help={
        "nodes": "comma-separated node names (default: all)",
        "replace": "replace a known key that changed (only after checking why it changed)",
    },
)
@cli
def trust_hosts(c, nodes=None, replace=False):
    """Pin the nodes' SSH host keys in known_hosts, showing each fingerprint."""
    from tabulate import tabulate

    from ..cluster import trust_hosts as pin_host_keys

    cluster = cluster_of(c)
    rows = pin_host_keys(cluster, cluster.select(nodes), replace=replace)
    if not rows:
        print("no SSH nodes in this cluster: nothing to trust")
        return
    print(tabulate(rows, headers="keys"))
    print(f"known_hosts: {cluster.known_hosts_path}")
    if any(r["action"].startswith(("failed", "REFUSED")) for r in rows):
        raise Exit(code=1)


@task(help={"nodes": "comma-separated node names (default: all)"})
@cli
def init(c, nodes=None):
    """First-time setup: trust host keys, create project/data dirs on nodes, check health."""
    from .. import commands
    from ..cluster import Session

    cluster = cluster_of(c)
    targets = cluster.select(nodes)
    trust_hosts(c, nodes=nodes)
    with Session(cluster) as session:
        answers = session.run_all(targets, commands.make_project_dirs)
        failed = [a.error or a.stderr.strip() for a in answers.values() if not a.ok]
        for line in failed:
            print(f"mkdir failed: {line}")
    health(c, nodes=nodes)
    if failed:
        raise Exit(code=1)


ns = Collection(health, trust_hosts, init)
