"""Job tasks: launch, cancel, reset."""

from __future__ import annotations

import sys

import yaml
from invoke import Collection, task
from invoke.exceptions import Exit

from .. import lifecycle
from ..cluster import Session
from ..errors import UgroError
from ..jobs import Jobs
from ..plan import LaunchConfig
from ..state import JobStatus, is_active
from .common import ROOT, cli, cluster_of, project_path


def jobs_of(c) -> Jobs:
    return Jobs(project_path(c, "data_dir"))


def launch_defaults(c) -> tuple[dict, dict]:
    """training_defaults.yaml's `launch:` section, and its `scripts:` (each script's defaults)."""
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
        "detach": "return once every rank runs; the job is supervised in the background",
        "resume": "pass --resume to the script (continue from its latest checkpoint)",
        "script_args": "extra arguments for the script, as one quoted string",
        "sync": "run `inv sync` to every node first (default: launch.sync in "
                "config/training_defaults.yaml, off)",
    }
)
@cli
def launch(c, name=None, epochs=None, lr=None, model=None, dataset=None, batch_size=None,
           script=None, nodes=None, nproc_per_node=None, detach=False, resume=False,
           script_args=None, sync=False):
    """Run a distributed torchrun training job on the cluster's nodes."""
    defaults, scripts = launch_defaults(c)
    cfg = LaunchConfig.from_options(
        defaults, scripts, name=name, epochs=epochs, lr=lr, model=model, dataset=dataset,
        batch_size=batch_size, script=script, nodes=nodes, nproc_per_node=nproc_per_node,
        detach=detach, resume=resume, script_args=script_args,
    )
    cluster = cluster_of(c)
    jobs = jobs_of(c)
    if sync or defaults.get("sync", False):
        from .. import sync as sync_mod

        results = sync_mod.sync_code(cluster, cluster.select(cfg.nodes), ROOT)
        failed = [r for r in results if not r.ok]
        if failed:
            raise UgroError("sync before launch failed: " + "; ".join(
                f"{r.node}: {r.error}" for r in failed))
        print(sync_mod.sync_table(results), flush=True)
    job_id = lifecycle.launch(jobs, cluster, cfg, ROOT,
                              warn=lambda line: print(f"ugro: note: {line}", file=sys.stderr))
    meta = jobs.metadata(job_id)
    if meta.get("slurm"):
        s = meta["slurm"]
        print(f"job {job_id}: Slurm job {s['job_id']}, world size {meta['world_size']} "
              f"({s['nodes']} nodes x {s['nproc']}); QUEUED until Slurm starts it", flush=True)
        if detach:
            print(f"detached; follow with: inv logs {cfg.name} --follow; "
                  f"stop with: inv cancel {cfg.name}")
            return
        return attached(jobs, cluster, job_id)
    where = ", ".join(f"{n} ({v['nproc']} rank{'s' if v['nproc'] > 1 else ''})"
                      for n, v in meta["nodes"].items())
    print(f"job {job_id}: world size {meta['world_size']} on {where}; "
          f"rendezvous {meta['master']}", flush=True)
    if detach:
        started = lifecycle.wait_for_ranks(jobs, cluster, job_id)
        print("started: " + ", ".join(f"{n} {s}" for n, s in started.items()))
        print(f"detached; follow with: inv logs {cfg.name} --follow; "
              f"stop with: inv cancel {cfg.name}")
        return
    attached(jobs, cluster, job_id)


def attached(jobs: Jobs, cluster, job_id: str) -> None:
    """Follow the job's logs until it ends; exit 1 unless it COMPLETED."""
    meta = lifecycle.wait_attached(jobs, cluster, job_id)
    print(f"job {job_id}: {meta['status']}", flush=True)
    if meta.get("error"):
        print(f"  {meta['error']}", file=sys.stderr)
    if meta["status"] != JobStatus.COMPLETED:
        raise Exit(code=1)


@task(help={"name": "job name (the latest with that name) or job id",
            "grace": "seconds between SIGTERM and SIGKILL (default 3)"})
@cli
def cancel(c, name, grace=3.0):
    """Cancel a job: stop exactly its processes on every node."""
    jobs = jobs_of(c)
    job_id = jobs.find(name)
    before = jobs.metadata(job_id).get("status")
    meta = lifecycle.cancel(jobs, cluster_of(c), job_id, float(grace))
    if not is_active(before):
        print(f"job {job_id} already ended: {before}")
        return
    for node, facts in meta["nodes"].items():
        print(f"  {node}: {facts.get('stop', '-')}")
    print(f"job {job_id}: {meta['status']}")
    if any(f.get("stop") not in ("stopped", None) for f in meta["nodes"].values()):
        raise Exit("some nodes did not confirm the stop", code=1)


@task(help={"grace": "seconds between SIGTERM and SIGKILL (default 3)"})
@cli
def reset(c, grace=3.0):
    """Emergency stop: end every UGRO-started job on every node, mark them CANCELLED."""
    from .. import commands

    cluster = cluster_of(c)
    jobs = jobs_of(c)
    for job_id in jobs.active():
        lifecycle.cancel(jobs, cluster, job_id, float(grace), reason="inv reset")
        print(f"{job_id}: CANCELLED")
    if cluster.slurm is not None:
        print("reset: every UGRO job on this Slurm cluster is cancelled (scancel)")
        return
    with Session(cluster) as session:
        answers = session.run_all(cluster.nodes,
                                  lambda n: commands.kill_all_jobs(n, float(grace)),
                                  timeout=float(grace) + 60)
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


ns = Collection(launch, cancel, reset)
