"""The launch contract, for real on three sshd lab nodes: any torchrun script runs unmodified.

The scripts here are written the way PyTorch's own examples are, not for UGRO: one parses its
options strictly with argparse, one takes positional arguments. UGRO must pass them only what
the user typed, and tell them everything else through the environment.
"""

from __future__ import annotations

import json

import pytest
from conftest import tagged_pids

pytestmark = [pytest.mark.lab, pytest.mark.slow]

# Like pytorch/examples' mnist DDP: strict argparse, unknown flags are an error.
STRICT = """\
import argparse, os
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

def main():
    parser = argparse.ArgumentParser(description="toy DDP regression")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    x = torch.randn(64, 4); y = x.sum(1, keepdim=True)
    for epoch in range(1, args.epochs + 1):
        for i in range(4):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            if rank == 0:
                print(f"Train Epoch: {epoch} [{i * 16}/64]\\tLoss: {loss.item():.6f}", flush=True)
    if rank == 0:
        env = {k: v for k, v in os.environ.items() if k.startswith("UGRO_")}
        print("ENV " + repr(sorted(env.items())), flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
"""

# Like the DDP tutorial series' multinode.py: `total_epochs save_every` positionally.
POSITIONAL = """\
import os, sys
import torch, torch.distributed as dist

def main(total_epochs, save_every):
    dist.init_process_group(backend="gloo")
    w = torch.ones(1) * int(os.environ["RANK"])
    for epoch in range(total_epochs):
        dist.all_reduce(w)
        if epoch % save_every == 0 and os.environ["RANK"] == "0":
            print(f"Epoch {epoch} | Training snapshot saved", flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
"""

BROKEN = "import torch\nimport a_module_that_is_not_installed\n"


@pytest.fixture(scope="module")
def project(lab_project):
    for node in lab_project.nodes:
        (node.project / "foreign").mkdir(exist_ok=True)
        (node.project / "foreign/strict.py").write_text(STRICT)
        (node.project / "foreign/positional.py").write_text(POSITIONAL)
        (node.project / "foreign/broken.py").write_text(BROKEN)
        pkg = node.project / "mypkg"
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "train.py").write_text(STRICT)
    return lab_project


@pytest.fixture
def cluster(project, tmp_path):
    return project.cluster_file(tmp_path / "lab.yaml")


def only_job(data):
    (job,) = (data / "experiments").iterdir()
    return job, json.loads((job / "metadata.json").read_text())


def node_logs(job) -> str:
    return "".join(p.read_text() for p in sorted((job / "logs").glob("*.log")))


def test_strict_argparse_script_runs_unmodified_and_its_metrics_come_home(inv, cluster, lab):
    r = inv("launch", "--name", "strict", "--script", "foreign/strict.py", "--nproc-per-node",
            "1", "--epochs", "3", cluster=cluster, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    job, meta = only_job(inv.data)
    assert meta["status"] == "COMPLETED"
    config = json.loads((job / "config.json").read_text())
    argv = config["nodes"]["lab1"]["argv"]
    # Only what was typed reaches the script: no --output-dir, no defaults.
    assert argv[argv.index("foreign/strict.py"):] == ["foreign/strict.py", "--epochs", "3"]
    logs = node_logs(job)
    assert "Train Epoch: 3" in logs
    env = dict(eval(next(line.split("ENV ", 1)[1] for line in logs.splitlines()
                         if " | ENV " in line)))
    assert env["UGRO_JOB_ID"] == job.name and env["UGRO_JOB_NAME"] == "strict"
    rank0 = next(n for n in lab.nodes if str(n.project) in env["UGRO_JOB_DIR"])
    assert env["UGRO_JOB_DIR"] == str(rank0.project / "data/experiments" / job.name)
    assert env["UGRO_METRICS_FILE"] == env["UGRO_JOB_DIR"] + "/metrics.jsonl"
    # A clean run reads clean: no C++ frames, no rendezvous shutdown errors on any node.
    for noise in ("frame #", "recvVector", "failed to shutdown", "Traceback"):
        assert noise not in logs, noise
    # The foreign script's log lines are its metrics, and the results say so.
    view = json.loads(inv("results", "strict", "--json", cluster=cluster, check=0).stdout)
    assert view["metrics"]["source"] == "logs" and view["metrics"]["points"] == 12
    assert tagged_pids(job.name) == []


def test_positional_script_gets_its_arguments_verbatim(inv, cluster):
    r = inv("launch", "--name", "pos", "--script", "foreign/positional.py", "--nproc-per-node",
            "1", "--script-args", "4 2", cluster=cluster, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    job, meta = only_job(inv.data)
    assert meta["status"] == "COMPLETED"
    assert "Epoch 2 | Training snapshot saved" in node_logs(job)


def test_module_script_runs_with_dash_m(inv, cluster):
    r = inv("launch", "--name", "mod", "--script", "-m mypkg.train", "--nproc-per-node", "1",
            "--nodes", "lab1,lab2", cluster=cluster, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    job, meta = only_job(inv.data)
    assert meta["status"] == "COMPLETED" and "Train Epoch: 2" in node_logs(job)


@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_a_script_that_cannot_start_fails_with_its_first_error_and_leaves_nothing(
        inv, project, tmp_path, backend):
    cluster = project.cluster_file(tmp_path / "lab.yaml", rdzv_backend=backend)
    r = inv("launch", "--name", "broken", "--script", "foreign/broken.py", "--nproc-per-node",
            "1", cluster=cluster, timeout=240)
    assert r.returncode == 1
    job, meta = only_job(inv.data)
    assert meta["status"] == "FAILED"
    assert "No module named 'a_module_that_is_not_installed'" in meta["error"]
    assert "ModuleNotFoundError" in r.stderr
    # No node failed to shut the rendezvous down (c10d: UGRO's store outlived every agent).
    assert "recvVector" not in node_logs(job) and "failed to shutdown" not in node_logs(job)
    assert tagged_pids(job.name) == []


def test_a_script_missing_on_a_node_is_refused_in_preflight(inv, cluster, lab):
    (lab.nodes[2].project / "foreign/only_two.py").unlink(missing_ok=True)
    for node in lab.nodes[:2]:
        (node.project / "foreign/only_two.py").write_text(POSITIONAL)
    r = inv("launch", "--name", "two", "--script", "foreign/only_two.py", "--nproc-per-node", "1",
            "--script-args", "1 1",
            cluster=cluster, check=1)
    assert r.stderr.strip() == ("ugro: preflight: script foreign/only_two.py not found on lab2 "
                                "(in the project path; run: inv sync)")
    assert not (inv.data / "experiments").exists() or not list(
        (inv.data / "experiments").iterdir())
