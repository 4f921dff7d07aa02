"""Job tasks: launch, cancel, reset."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from invoke import Collection, task
from invoke.exceptions import Exit

from ..errors import UgroError
from ..state import JobStatus, is_active
from .common import ROOT, LetterFlags, cli, cluster_of, positive, print_json, project_path

if TYPE_CHECKING:
    from ..jobs import Jobs

# The package's modules are imported in the task bodies: `inv --list` and `inv TASK --help`
# pay for none of them (SSH, YAML, tabulate, the launch path).


def jobs_of(c) -> Jobs:
    from ..jobs import Jobs

    return Jobs(project_path(c, "data_dir"))


def note(line: str) -> None:
    print(f"ugro: note: {line}", file=sys.stderr)


def launch_defaults(c) -> tuple[dict, dict]:
    """training_defaults.yaml's `launch:` section, and its `scripts:` (each script's defaults)."""
    import yaml

    path = project_path(c, "defaults")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        return {}, {}
    except yaml.YAMLError as exc:
        raise UgroError(f"{path}: invalid YAML ({exc})") from None
    sections = []
    for key in ("launch", "scripts"):
        section = data.get(key) or {} if isinstance(data, dict) else None
        if not isinstance(section, dict):
            raise UgroError(f"{path}: {key}: expected a mapping")
        sections.append(section)
    for script, values in sections[1].items():
        if not isinstance(values, dict):
            raise UgroError(f"{path}: scripts.{script}: expected a mapping of option: value")
    return sections[0], sections[1]


@task(
    klass=LetterFlags,
    help={
        "name": "job name (letters, digits, '.', '_', '-'); the job id adds a timestamp",
        "epochs": "training epochs (passed to the script as --epochs; UGRO passes a script only "
                  "the options you type, plus its own defaults under scripts: in "
                  "config/training_defaults.yaml)",
        "lr": "learning rate (--lr)",
        "model": "model name or path (--model)",
        "dataset": "dataset name or path (--dataset)",
        "batch_size": "batch size per rank (--batch-size)",
        "script": "training script, relative to the project, or '-m package.module' (default "
                  "from config/training_defaults.yaml: scripts/train_single_test.py)",
        "nodes": "comma-separated node names (default: every node)",
        "nproc_per_node": "ranks per node (default: the node's GPU count, or cpu_procs)",
        "detach": "return once torchrun on every node has started all its ranks; the job "
                  "is supervised in the background",
        "resume": "pass --resume to the script (continue from its latest checkpoint)",
        "script_args": "extra arguments for the script, as one quoted string",
        "sync": "run `inv sync` to every node first (default: launch.sync in "
                "config/training_defaults.yaml, off)",
        "stall_after": "flag the job STALLED after this long with no output and no metric "
                       "from any rank (90s, 10m, 1h; default 10m)",
        "on_stall": "what a stall does: flag (the default: shown in inv status, the job runs "
                    "on) or cancel (stop it: FAILED, \"stalled\")",
        "queue": "start now if the nodes are free, else wait in the queue (see inv queue)",
        "num_nodes": "with --queue: any K healthy nodes instead of every node",
        "min_gpu_mem": "with --queue: only nodes whose GPUs have this much memory (10G, 9500M)",
        "priority": "with --queue: higher starts first (default 0)",
        "after": "with --queue: start only once these jobs COMPLETED (exp1,exp2); "
                 "if one fails or is cancelled, this one is cancelled",
    }
)
@cli
def launch(c, name=None, epochs=None, lr=None, model=None, dataset=None, batch_size=None,
           script=None, nodes=None, nproc_per_node=None, detach=False, resume=False,
           script_args=None, stall_after=None, on_stall=None, sync=False, queue=False,
           num_nodes=None, min_gpu_mem=None, priority=None, after=None):
    """Run a distributed torchrun training job on the cluster's nodes (or queue it)."""
    from .. import lifecycle, records, schedule, views
    from ..plan import LaunchConfig

    positive("lr", lr)
    defaults, scripts = launch_defaults(c)
    cfg = LaunchConfig.from_options(
        defaults, scripts, name=name, epochs=epochs, lr=lr, model=model, dataset=dataset,
        batch_size=batch_size, script=script, nodes=nodes, nproc_per_node=nproc_per_node,
        detach=detach, resume=resume, script_args=script_args, stall_after=stall_after,
        on_stall=on_stall,
    )
    asked = [f"--{k.replace('_', '-')}" for k, v in (
        ("num_nodes", num_nodes), ("min_gpu_mem", min_gpu_mem), ("priority", priority),
        ("after", after)) if v is not None]
    if asked and not queue:
        raise UgroError(f"{', '.join(asked)}: only for queued jobs; add --queue")
    if queue:
        cfg = replace(cfg, queue=True, num_nodes=whole("num-nodes", num_nodes),
                      min_gpu_mem=min_gpu_mem, priority=whole("priority", priority) or 0,
                      after=tuple(a.strip() for a in (after or "").split(",") if a.strip()))
    cluster = cluster_of(c)
    if queue and cluster.slurm is not None:
        raise UgroError(f"--queue: Slurm queues every job itself (slurm: in {cluster.source}); "
                        "launch without --queue")
    jobs = jobs_of(c)
    if sync or defaults.get("sync", False):
        from .. import sync as sync_mod

        results = sync_mod.sync_code(cluster, cluster.select(cfg.nodes), ROOT)
        failed = [r for r in results if not r.ok]
        if failed:
            raise UgroError("sync before launch failed: " + "; ".join(
                f"{r.node}: {r.error}" for r in failed))
        print(sync_mod.sync_table(results), flush=True)
    detached = (f"detached; follow with: inv logs {cfg.name} --follow; "
                f"stop with: inv cancel {cfg.name}")
    if queue:
        job_id = schedule.enqueue(jobs, cluster, cfg, ROOT)
        schedule.run_pass(jobs, cluster, ROOT)
        meta = jobs.metadata(job_id)
        if meta["status"] == JobStatus.QUEUED:
            row = next(r for r in views.queue([jobs.metadata(j) for j in jobs.active()],
                                              records.utcnow()) if r["job_id"] == job_id)
            print(f"job {job_id}: queued at position {row['position']} ({row['reason']}); "
                  f"see: inv queue")
            return
        if not is_active(meta["status"]):
            raise UgroError(f"job {job_id}: {meta['status']}: {meta.get('error')}")
    else:
        job_id = lifecycle.launch(jobs, cluster, cfg, ROOT, warn=note)
    meta = jobs.metadata(job_id)
    if meta.get("slurm"):
        s = meta["slurm"]
        print(f"job {job_id}: Slurm job {s['job_id']}, world size {meta['world_size']} "
              f"({s['nodes']} nodes x {s['nproc']}); QUEUED until Slurm starts it",
              flush=True)
        if detach:
            print(detached)
            return
    else:
        where = ", ".join(f"{n} ({v['nproc']} rank{'s' if v['nproc'] > 1 else ''})"
                          for n, v in meta["nodes"].items())
        print(f"job {job_id}: world size {meta['world_size']} on {where}; "
              f"rendezvous {meta['master']}", flush=True)
        if detach:
            started = lifecycle.wait_for_ranks(jobs, job_id)
            print("started: " + ", ".join(f"{n} {s}" for n, s in started.items()))
            meta = jobs.metadata(job_id)
            if meta["status"] == JobStatus.COMPLETED:
                print(f"job {job_id}: COMPLETED already")
                return
            if not is_active(meta["status"]):
                raise Exit(f"ugro: job {job_id}: {meta['status']}: {meta.get('error')}",
                           code=1)
            short = lifecycle.short_of_ranks(meta)
            if short:
                raise Exit(f"ugro: job {job_id}: {meta['status']}, but not every rank has "
                           f"started on {', '.join(short)}; see: inv status, inv logs "
                           f"{cfg.name}", code=1)
            print(detached)
            return
    attached(jobs, cluster, job_id)


def attached(jobs: Jobs, cluster, job_id: str) -> None:
    """Follow the job's logs until it ends; exit 1 unless it COMPLETED."""
    from .. import lifecycle

    meta = lifecycle.wait_attached(jobs, cluster, job_id)
    print(f"job {job_id}: {meta['status']}", flush=True)
    if meta.get("error"):
        print(f"  {meta['error']}", file=sys.stderr)
    if meta["status"] != JobStatus.COMPLETED:
        raise Exit(code=1)


@task(help={"name": "job name (the latest with that name) or job id",
            "grace": "seconds between SIGTERM and SIGKILL (default 3)"})
@cli
def cancel(c, name, grace=None):
    """Cancel a job: stop exactly its processes on every node."""
    from .. import schedule
    from ..jobs import job_name

    grace = positive("grace", grace, 3.0)
    jobs = jobs_of(c)
    job_id = jobs.find(name)
    cluster = cluster_of(c)
    before = jobs.metadata(job_id).get("status")
    meta = schedule.cancel(jobs, cluster, job_id, grace)
    if not is_active(before):
        print(f"job {job_id} already ended: {before}")
        return
    schedule.kick(jobs, cluster)
    for node, facts in meta["nodes"].items():
        print(f"  {node}: {facts.get('stop', '-')}")
    print(f"job {job_id}: {meta['status']}")
    if meta["status"] != JobStatus.CANCELLED:
        raise Exit(f"{meta.get('error')}; its nodes stay held: inv cancel {job_name(job_id)} "
                   "(or inv status) tries again", code=1)


@task(help={"grace": "seconds between SIGTERM and SIGKILL (default 3)"})
@cli
def reset(c, grace=None):
    """Emergency stop: end every UGRO-started job on every node, mark them CANCELLED."""
    from .. import commands, schedule
    from ..cluster import Session

    grace = positive("grace", grace, 3.0)
    cluster = cluster_of(c)
    jobs = jobs_of(c)
    for job_id in jobs.active():
        try:
            meta = schedule.cancel(jobs, cluster, job_id, grace, reason="inv reset")
        except UgroError as exc:  # a damaged record: the sweep below still stops its processes
            print(f"{job_id}: {exc}")
            continue
        print(f"{job_id}: {meta['status']}" + (f" ({meta['error']})"
                                               if meta["status"] != JobStatus.CANCELLED else ""))
    if cluster.slurm is not None:
        print("reset: every UGRO job on this Slurm cluster is cancelled (scancel)")
        return
    with Session(cluster) as session:
        answers = session.run_all(cluster.nodes,
                                  lambda n: commands.kill_all_jobs(n, grace),
                                  timeout=grace + 60)
    failed = False
    for name, a in answers.items():
        if a.error:
            failed = True
            print(f"{name}: {a.error}")
        for line in a.stdout.split("\n"):
            if line.strip():
                print(f"{name}: {line}")
                failed = failed or line.endswith("still-alive")
    if failed:
        raise Exit(code=1)
    print("reset: no UGRO job is running on any node")


def whole(option: str, value) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UgroError(f"--{option}: expected a whole number, got {value!r}") from None


@task(name="queue", help={
    "json": "print the queue as JSON",
    "run": "stay in the foreground and run a scheduling pass now and every --every seconds",
    "every": "seconds between passes with --run (default 15)",
})
@cli
def show_queue(c, json=False, run=False, every=15.0):
    """Show the queued jobs in the order they will start, and why each waits."""
    from .. import records, render, schedule, views

    jobs = jobs_of(c)
    if run:
        try:
            schedule.watch(jobs, cluster_of(c), ROOT, float(every))
        except KeyboardInterrupt:
            return
    rows = views.queue([jobs.metadata(j) for j in jobs.active()], records.utcnow())
    if json:
        print_json(rows)
    else:
        print(render.queue_text(rows))


ns = Collection(launch, cancel, reset, show_queue)
