"""Seeing jobs: logs, results, status, jobs, compare."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from invoke import Collection, task

from ..errors import UgroError
from ..state import JobStatus, held_as, is_active, watched
from .common import (
    cli,
    cluster_of,
    host_node,
    is_connection,
    print_json,
    project_path,
)
from .jobs import jobs_of

if TYPE_CHECKING:
    from ..jobs import Jobs

# The package's modules are imported in the task bodies, so `inv --list` pays for none of them.

# Invoke has no optional positional arguments: `inv logs exp1` needs JOB positional, while
# `fab -H gpu1 logs` (the latest job on that host) must parse without one, so under fab the
# job is given as `--job`.
UNDER_FAB = "fabric.main" in sys.modules
JOBS_SHOWN = 20  # `inv jobs` without --limit or --all


def note(text: str) -> None:
    print(f"ugro: {text}", file=sys.stderr, flush=True)


def count(option: str, value) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0:
        raise UgroError(f"--{option}: expected a whole number >= 0, got {value!r}")
    return number


def show(view, text, as_json: bool, notes: list[str]) -> None:
    """Print a view as JSON or as `text(view)`, then the notes on stderr."""
    if as_json:
        print_json(view)
    else:
        print(text(view))
    for line in notes:
        note(line)


def reconcile(c, jobs: Jobs, job_ids: list[str], cluster=None) -> list[str]:
    """`lifecycle.reconcile` each active job among these (one whose supervisor died is brought in
    line with its nodes); returns a note for each that could not be. A job that ended so frees
    its nodes: a scheduling pass starts in the background."""
    from .. import records

    notes = []
    freed = False
    for job_id in job_ids:
        meta, damaged = records.read_object(jobs.dir(job_id) / "metadata.json")
        if damaged or not watched(meta):
            continue
        from .. import lifecycle  # the launch path: paid only when a job may need it

        try:
            cluster = cluster or cluster_of(c)
            freed |= not is_active(lifecycle.reconcile(jobs, cluster, job_id).get("status"))
        except UgroError as exc:
            notes.append(f"{job_id}: not reconciled: {exc}")
    if freed:
        from .. import schedule

        schedule.kick(jobs, cluster)
    return notes


# -- logs ------------------------------------------------------------------------
@task(
    positional=[] if UNDER_FAB else ["job"],
    help={
        "job": "job name (its latest run), job id, or a unique prefix; under `fab -H NODE` "
               "give it as --job (default: the latest job that ran on NODE)",
        "node": "only this node's lines",
        "rank": "only this global rank's lines",
        "tail": "only the last N lines of each node",
        "follow": "keep printing new lines until the job ends",
        "json": "one JSON object per line: {node, rank, text}",
    },
)
@cli
def logs(c, job=None, node=None, rank=None, tail=None, follow=False, json=False):
    """Show a job's logs from every node, each line prefixed with node and rank."""
    from .. import logs as logs_mod
    from .. import records

    rank, tail = count("rank", rank), count("tail", tail)
    if is_connection(c):
        return host_logs(c, job, node, rank, tail, follow, json)
    jobs = jobs_of(c)
    job_id = jobs.find(job)
    for line in reconcile(c, jobs, [job_id]):
        note(line)
    meta, damaged = records.read_object(jobs.dir(job_id) / "metadata.json")
    logs_dir = jobs.dir(job_id) / "logs"
    if damaged:
        note(f"job {job_id}: {damaged}; showing the logs that are here")
        names = sorted(p.stem for p in logs_dir.glob("*.log"))
    else:
        names = list(meta.get("nodes") or {})
    if node is not None:
        if node not in names:
            raise UgroError(f"job {job_id} ran on {', '.join(names) or 'no node'}, "
                            f"not on {node!r}")
        names = [node]
    world = meta.get("world_size")
    if rank is not None and isinstance(world, int) and rank >= world:
        raise UgroError(f"--rank {rank}: job {job_id} has ranks 0-{world - 1}")
    fetch = logs_mod.stale(meta, logs_dir, names)
    if fetch:
        try:
            problems = logs_mod.fetch(jobs, cluster_of(c), job_id, fetch)
        except UgroError as exc:
            problems = dict.fromkeys(fetch, str(exc))
        for name, why in problems.items():
            note(f"{name}: could not fetch the node's log ({why}); showing the copy here")
    if follow and not damaged:
        logs_mod.follow(jobs, job_id, nodes=names, rank=rank, tail=tail, as_json=json)
        return
    for lines in logs_mod.read(logs_dir, names).values():
        for line in logs_mod.select(lines, rank, tail):
            print(logs_mod.render(line, json))


def host_logs(c, job, node, rank, tail, follow, as_json):
    """`fab -H NODE logs`: the raw output on that node, formatted as the control node would."""
    from .. import commands
    from .. import logs as logs_mod
    from ..cluster import Session

    cluster = cluster_of(c)
    here = host_node(c, cluster)
    if node not in (None, here.name):
        raise UgroError(f"--node {node}: this is {here.name} (fab -H chose it)")
    if follow:
        raise UgroError(f"--follow needs the job's supervisor: run inv logs JOB --follow "
                        f"--node {here.name} on the control node")
    with Session(cluster) as session:
        listing = session.run(here, commands.node_job_dirs(here))
        if not listing.ok:
            raise UgroError(listing.error or f"{here.name}: {listing.stderr.strip()}")
        job_id = logs_mod.pick_host_job(logs_mod.host_jobs(listing.stdout), job, here.name)
        out = session.run(here, commands.job_output(here, job_id))
    if not out.ok:
        raise UgroError(out.error or f"{here.name}: job {job_id}: no output.log here "
                                     f"({out.stderr.strip()})")
    note(f"{here.name}: job {job_id}")
    lines = [logs_mod.parse_line(raw, here.name)
             for raw in logs_mod.format_output(out.stdout, here.name)]
    for line in logs_mod.select(lines, rank, tail):
        print(logs_mod.render(line, as_json))


# -- results, jobs, compare ------------------------------------------------------
@task(positional=["job"], help={
    "job": "job name (its latest run), job id, or a unique prefix of either",
    "json": "print the summary as JSON",
})
@cli
def results(c, job, json=False):
    """Summarize a job: status, duration, nodes, GPUs, loss, throughput, checkpoints, errors."""
    from .. import records, render, views

    jobs = jobs_of(c)
    job_id = jobs.find(job)
    notes = reconcile(c, jobs, [job_id])
    rec = records.load(jobs, job_id)
    view = views.results(rec, records.utcnow())
    path, plot_note = views.plot_loss(rec.points, jobs.dir(job_id) / "artifacts" / "loss.png",
                                      job_id)
    view["plot"] = {"path": str(path) if path else None, "note": plot_note}
    show(view, render.results_text, json, notes)


@task(name="jobs", help={
    "name": "only jobs with this name",
    "status": "only jobs with this status (QUEUED, PENDING, RUNNING, COMPLETED, FAILED, "
              "CANCELLED)",
    "limit": f"show the latest N jobs (default {JOBS_SHOWN})",
    "all": "show every job (reads every job's files: slow with a long history)",
    "json": "print the list as JSON",
})
@cli
def list_jobs(c, name=None, status=None, limit=None, all=False, json=False):
    """List past and running jobs, newest first (the latest 20 unless --limit or --all)."""
    from .. import records, render, views
    from ..jobs import job_name

    limit = None if all else count("limit", limit) if limit is not None else JOBS_SHOWN
    wanted = views.status_filter(status)
    jobs = jobs_of(c)
    summaries = jobs.summaries()
    released = jobs.released(summaries)
    ids = jobs.ids(known=set(summaries))
    if name is not None:
        ids = [j for j in ids if job_name(j) == name]
        if not ids:
            jobs.find(name)  # raises, naming the closest matches
    # Only jobs that may still run are reconciled (their records read); an ended job's status
    # comes from its history line, so choosing the rows to show reads no job's files.
    notes = reconcile(c, jobs, [j for j in ids if j not in released])
    if wanted is not None:
        def matches(job_id: str) -> bool:
            if job_id in released:  # ended: its history line has its status
                return summaries[job_id]["status"] == wanted
            meta = records.read_object(jobs.dir(job_id) / "metadata.json")[0]
            if wanted == "STALLED":
                return views.stall(meta)["stalled"]
            return meta.get("status") == wanted

        ids = [j for j in ids if matches(j)]
    shown = ids if limit is None else ids[:limit]
    now = records.utcnow()
    rows = [views.job_row(records.load(jobs, j), now) for j in shown]
    if len(shown) < len(ids):
        notes.append(f"showing the latest {len(shown)} of {len(ids)} jobs; "
                     "--limit N or --all for more")
    show(rows, render.jobs_text, json, notes)


@task(positional=["first", "second"], help={
    "first": "a job name or id (or a comma-separated list of them)",
    "second": "another job name or id (or a comma-separated list: exp2,exp3)",
    "json": "print the comparison as JSON",
})
@cli
def compare(c, first, second, json=False):
    """Compare jobs side by side: hyperparameters and final metrics, differences marked."""
    from .. import records, render, views

    jobs = jobs_of(c)
    wanted = [w.strip() for w in f"{first},{second}".split(",") if w.strip()]
    ids = list(dict.fromkeys(jobs.find(w) for w in wanted))
    if len(ids) < 2:
        raise UgroError(f"compare needs two different jobs; {', '.join(wanted)} are all {ids[0]}")
    notes = reconcile(c, jobs, ids)
    view = views.compare([records.load(jobs, j) for j in ids], records.utcnow())
    show(view, render.compare_text, json, notes)


# -- status ----------------------------------------------------------------------
@task(help={
    "refresh": "check the nodes' health now instead of using a recent check or the "
               "monitor's latest sample",
    "json": "print the status as JSON",
})
@cli
def status(c, refresh=False, json=False):
    """Show the nodes and their GPUs, running jobs with their progress, and recent jobs."""
    from .. import records, render, views
    from ..monitor import status as monitor_status

    cluster = cluster_of(c)
    jobs = jobs_of(c)
    data_dir = project_path(c, "data_dir")
    active_ids = jobs.active()
    notes = reconcile(c, jobs, active_ids, cluster)
    state_file = data_dir / "cluster_state.json"
    state, _ = records.read_object(state_file)
    now = records.utcnow()
    # A running monitor sampled every node seconds ago: show that, and probe nothing.
    snap = None if refresh else monitor_status.fresh_snapshot(data_dir, cluster.nodes)
    sampled = None
    if snap is not None:
        sampled = ({**monitor_status.source(snap, cluster.nodes), "cluster": cluster.name},
                   monitor_status.node_rows(snap, cluster.nodes))
    fresh = snap is None and (refresh or not views.state_is_recent(state, cluster.name, now))
    if fresh:
        from .. import health  # the probe: paid only when the nodes are asked

        reports = health.check(cluster)
        health.save(data_dir, project_path(c, "log_dir"), cluster, reports)
        state, _ = records.read_object(state_file)
    history, damaged = records.history_entries(*jobs.history_lines())
    if damaged:
        notes.append(damaged)
    # The jobs active before reconciling (one that ended since is left out below by `watched`).
    active = [records.load(jobs, j) for j in active_ids]
    running = [r for r in active if r.damaged or watched(r.meta)]
    for rec in running:
        if rec.damaged:
            notes.append(f"{rec.job_id}: holds its nodes until its record is fixed or removed "
                         f"({'; '.join(rec.damaged)})")
        elif rec.status == JobStatus.CANCELLING or not is_active(rec.status):
            notes.append(f"{rec.job_id}: {held_as(rec.meta)}: {rec.meta.get('error')}")
    queued = views.queue([r.meta for r in active if not r.damaged], records.utcnow())
    view = views.status(state, running, history, records.utcnow(), fresh, notes, queued, sampled)
    show(view, render.status_text, json, [])  # status shows its notes itself


ns = Collection(logs, results, status, list_jobs, compare)
