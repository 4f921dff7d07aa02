"""Slurm itself, and UGRO's batch scripts, on the two-node loopback lab."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from ugro import slurm, slurm_parse

pytest_plugins = ["slurm_fixtures"]  # the slurm_lab fixture, kept out of conftest.py
pytestmark = pytest.mark.lab

# Stands in for `python -m torch.distributed.run`: prints its argv and the tags
# UGRO exports; `fail-on NODE` as the script makes NODE exit 3 and the others wait.
STUB_RUN = """\
import json, os, sys, time
argv = sys.argv[1:]
node = os.environ["UGRO_NODE"]
print("stub", json.dumps({"argv": argv, "node": node, "job": os.environ["UGRO_JOB_ID"],
                          "mark": os.environ.get("LAB_MARK")}), flush=True)
script = argv[argv.index("--local-addr") + 2:]
if script[:1] == ["fail-on"]:
    if node == script[1]:
        sys.exit(3)
    time.sleep(60)
"""

# Two nodes x one rank of real DDP over gloo: an all-reduce and one optimizer step.
DDP_SCRIPT = """\
import os, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
torch.manual_seed(0)
model = DDP(torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loss = model(torch.full((8, 4), float(rank))).pow(2).mean()
loss.backward()
opt.step()
w = [p.detach().clone() for p in model.parameters()]
gathered = [torch.zeros_like(w[0]) for _ in range(world)]
dist.all_gather(gathered, w[0])
same = all(torch.equal(g, gathered[0]) for g in gathered)
out = os.path.join(sys.argv[1], f"rank{rank}.txt")
with open(out, "w") as f:
    f.write(f"{world} {t.item():.0f} {os.environ['UGRO_NODE']} {same}\\n")
dist.destroy_process_group()
"""


def submit(lab, job: slurm.BatchJob) -> str:
    out = lab.sh(slurm.write_and_submit(job.job_dir, slurm.batch_script(job))).stdout
    return slurm_parse.parse_submit(out)


def show(lab, slurm_id: str) -> slurm_parse.SlurmJob:
    [job] = slurm_parse.parse_show_job(lab.sh(slurm.show_job(slurm_id)).stdout)
    return job


def node_file(job: slurm.BatchJob, node: str, name: str) -> str:
    return (Path(job.job_dir) / "nodes" / node / name).read_text()


@pytest.fixture
def stub_python(tmp_path):
    """The venv's Python, finding a stand-in torch.distributed.run first."""
    pkg = tmp_path / "stub" / "torch" / "distributed"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "run.py").write_text(STUB_RUN)
    return [sys.executable], {"PYTHONPATH": str(tmp_path / "stub"), "LAB_MARK": "it's here"}


def test_srun_reaches_both_nodes(slurm_lab):
    out = slurm_lab.run("srun", "-N2", "-l", "printenv", "SLURMD_NODENAME").stdout
    assert sorted(out.split("\n")[:2]) == ["0: n1", "1: n2"]
    nodes = slurm_parse.parse_sinfo(slurm_lab.sh(slurm.sinfo("debug")).stdout)
    assert [(n.name, n.partition, n.usable) for n in nodes] == [
        ("n1", "debug", True), ("n2", "debug", True)]


def test_sbatch_two_nodes_with_output_per_node(slurm_lab, tmp_path):
    script = tmp_path / "two.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n"
        f"srun --output={tmp_path}/out-%t.txt bash -c 'echo $SLURMD_NODENAME $SLURM_NODEID'\n"
    )
    job_id = slurm_parse.parse_submit(slurm_lab.run("sbatch", "--parsable", str(script),
                                              cwd=tmp_path).stdout)
    assert slurm_lab.wait(job_id) == "COMPLETED"
    # %t, the task: %N is the host's name, and both lab nodes are this host.
    assert (tmp_path / "out-0.txt").read_text() == "n1 0\n"
    assert (tmp_path / "out-1.txt").read_text() == "n2 1\n"


def test_pending_job_shows_its_reason_and_scancel_ends_it(slurm_lab, tmp_path):
    def sbatch(nodes: int) -> str:
        return slurm_parse.parse_submit(slurm_lab.run(
            "sbatch", "--parsable", f"--nodes={nodes}", "--output=/dev/null",
            "--wrap", "sleep 300", cwd=tmp_path).stdout)

    holder = sbatch(2)
    slurm_lab.wait(holder, ("RUNNING",), timeout=20)
    waiter = sbatch(1)
    deadline = time.monotonic() + 20
    while True:
        jobs = {j.slurm_id: j for j in slurm_parse.parse_squeue(
            slurm_lab.sh(slurm.squeue([holder, waiter])).stdout)}
        if jobs[waiter].reason not in (None, "None") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (jobs[holder].status, jobs[holder].nodelist) == ("RUNNING", "n[1-2]")
    assert (jobs[waiter].state, jobs[waiter].status, jobs[waiter].reason) == (
        "PENDING", "QUEUED", "Resources")
    nodes = slurm_parse.parse_sinfo(slurm_lab.sh(slurm.sinfo()).stdout)
    assert {n.state for n in nodes} == {"allocated"}

    slurm_lab.sh(slurm.cancel(waiter))
    slurm_lab.sh(slurm.cancel(holder))
    assert slurm_lab.wait(waiter, timeout=20) == "CANCELLED"
    assert slurm_lab.wait(holder, timeout=20) == "CANCELLED"
    assert show(slurm_lab, holder).status == "CANCELLED"


def test_rendered_script_runs_one_torchrun_per_node(slurm_lab, tmp_path, stub_python):
    python, env = stub_python
    job = slurm.BatchJob(
        job_id="stub_ok", job_dir=str(tmp_path / "job dir"), workdir=str(tmp_path),
        nodes=2, python=python, script=["train.py", "--name", "a b"], nproc_per_node=1,
        time_limit="5", env=env,
    )
    slurm_id = submit(slurm_lab, job)
    assert slurm_lab.wait(slurm_id, timeout=30) == "COMPLETED", slurm_lab.log_tail()

    seen = {}
    for node in ("n1", "n2"):
        log = node_file(job, node, "output.log")
        assert log.endswith("\n\x1eUGRO_EXIT 0\n"), log
        seen[node] = json.loads(log.split("\n")[0].removeprefix("stub "))
        assert node_file(job, node, "exit_code") == "0\n"
    argv = seen["n1"]["argv"]
    endpoint = argv[argv.index("--rdzv-endpoint") + 1]
    assert endpoint.startswith("127.0.0.1:") and int(endpoint.split(":")[1]) > 0
    assert argv[:4] == ["--nnodes", "2", "--nproc-per-node", "1"]
    assert argv[-5:] == ["--local-addr", "127.0.0.1", "train.py", "--name", "a b"]
    assert argv[argv.index("--rdzv-id") + 1] == "stub_ok"
    assert [seen[n]["argv"][seen[n]["argv"].index("--rdzv-conf") + 1] for n in seen] == [
        "is_host=1", "is_host=0"]
    assert seen["n2"]["argv"][argv.index("--rdzv-endpoint") + 1] == endpoint
    assert {(s["node"], s["job"], s["mark"]) for s in seen.values()} == {
        ("n1", "stub_ok", "it's here"), ("n2", "stub_ok", "it's here")}
    assert (show(slurm_lab, slurm_id).status, show(slurm_lab, slurm_id).exit_code) == (
        "COMPLETED", 0)
    assert "rendezvous 127.0.0.1:" in (Path(job.job_dir) / f"slurm-{slurm_id}.out").read_text()


def test_rendered_script_fails_fast(slurm_lab, tmp_path, stub_python):
    python, env = stub_python
    job = slurm.BatchJob(
        job_id="stub_fail", job_dir=str(tmp_path / "job"), workdir=str(tmp_path), nodes=2,
        python=python, script=["fail-on", "n2"], nproc_per_node=1, env=env,
    )
    started = time.monotonic()
    slurm_id = submit(slurm_lab, job)
    assert slurm_lab.wait(slurm_id, timeout=30) == "FAILED"
    assert time.monotonic() - started < 20  # n1 would sleep 60 s
    assert node_file(job, "n2", "exit_code") == "3\n"
    assert node_file(job, "n1", "exit_code") != "0\n"  # stopped by Slurm (SIGTERM: 143)
    assert node_file(job, "n1", "output.log").rstrip().endswith("UGRO_EXIT 143")
    finished = show(slurm_lab, slurm_id)
    assert finished.status == "FAILED" and finished.exit_code != 0


def test_rendered_script_trains_ddp_on_two_nodes(slurm_lab, tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    job = slurm.BatchJob(
        job_id="ddp", job_dir=str(tmp_path / "job"), workdir=str(tmp_path), nodes=2,
        python=[sys.executable], script=["ddp.py", str(tmp_path)], nproc_per_node=1,
        env={"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"},
    )
    slurm_id = submit(slurm_lab, job)
    state = slurm_lab.wait(slurm_id, timeout=90)
    logs = {n: node_file(job, n, "output.log") for n in ("n1", "n2")}
    assert state == "COMPLETED", logs
    assert sorted((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)) == [
        "2 3 n1 True\n", "2 3 n2 True\n"]
