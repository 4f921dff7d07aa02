"""The launch plan: validated options and the exact torchrun command per node (no SSH)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ugro.backends.ssh import SSHBackend
from ugro.config import load_cluster, parse_cluster
from ugro.errors import UgroError
from ugro.logs import NodeLog
from ugro.plan import LaunchConfig, plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def homelab():
    return load_cluster("config/examples/homelab.yaml", ROOT)


def test_homelab_plan_works_out_ranks_and_rendezvous(homelab):
    cfg = LaunchConfig(name="exp1", script="scripts/train_single_test.py", epochs=3)
    plans = plan(homelab, cfg, "exp1_20260120_120000", 29500)
    assert [(p.node.name, p.node_rank, p.nproc) for p in plans] == [
        ("gpu-master", 0, 1), ("gpu1", 1, 1), ("gpu2", 2, 1)]
    assert plans[1].argv == [
        "pixi", "run", "--frozen", "-e", "default", "python",
        "-m", "torch.distributed.run", "--nnodes", "3", "--nproc-per-node", "1",
        "--max-restarts", "0", "--tee", "3",
        "--log-dir", "data/experiments/exp1_20260120_120000/nodes/gpu1/torchrun",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "192.168.1.100:29500",
        "--rdzv-id", "exp1_20260120_120000", "--rdzv-conf", "is_host=0",
        "--local-addr", "192.168.1.101",
        "scripts/train_single_test.py", "--epochs", "3",
        "--output-dir", "data/experiments/exp1_20260120_120000",
    ]
    assert "is_host=1" in plans[0].argv
    assert plans[1].env["NCCL_SOCKET_IFNAME"] == "eno1"
    command = SSHBackend(homelab).command_line("exp1_20260120_120000", plans[1])
    assert command.startswith("cd /home/ob/projects/UGRO || exit 1; ")
    assert "UGRO_JOB_ID=exp1_20260120_120000" in command


def test_subset_of_nodes_and_static_backend(homelab, tmp_path):
    cfg = LaunchConfig(name="x", script="s.py", nodes="gpu2,gpu1", lr=0.01,
                       script_args=("--foo", "a b"))
    plans = plan(homelab, cfg, "x_1", 29501)
    assert [p.node.name for p in plans] == ["gpu1", "gpu2"]  # rank order, not typed order
    assert plans[0].argv[plans[0].argv.index("--rdzv-endpoint") + 1] == "192.168.1.101:29501"
    assert plans[0].argv[-4:] == ["--output-dir", "data/experiments/x_1", "--foo", "a b"]
    text = (ROOT / "config/examples/homelab.yaml").read_text().replace(
        "rdzv_backend: c10d", "rdzv_backend: static")
    static = parse_cluster(text, Path("h.yaml"), ROOT)
    argv = plan(static, cfg, "x_1", 29501)[1].argv
    assert argv[argv.index("--node-rank") + 1] == "1"
    assert argv[argv.index("--master-addr") + 1] == "192.168.1.101"


def test_uneven_ranks_are_refused_unless_explicit(homelab):
    text = (ROOT / "config/examples/homelab.yaml").read_text().replace(
        "gpu_model: RTX 4070 8 GB", "gpu_model: x").replace("    gpus: 1\n    gpu_model: x",
                                                            "    gpus: 2\n    gpu_model: x")
    uneven = parse_cluster(text, Path("h.yaml"), ROOT)
    cfg = LaunchConfig(name="x", script="s.py")
    with pytest.raises(UgroError, match=r"different numbers of ranks \(gpu-master: 1, gpu1: 2"):
        plan(uneven, cfg, "x_1", 29500)
    plans = plan(uneven, LaunchConfig(name="x", script="s.py", nproc_per_node=1), "x_1", 29500)
    assert {p.nproc for p in plans} == {1}


@pytest.mark.parametrize("options, message", [
    ({"name": "x; touch /tmp/pwned"}, "invalid job name"),
    ({"name": "../etc"}, "invalid job name"),
    ({"name": None}, "a job name is required"),
    ({"name": "ok", "epochs": "0"}, "--epochs must be >= 1"),
    ({"name": "ok", "epochs": "three"}, "--epochs: not a int"),
    ({"name": "ok", "lr": "-1"}, "--lr must be > 0"),
    ({"name": "ok", "script": "/etc/passwd"}, "--script must be a path inside the project"),
    ({"name": "ok", "script": "../x.py"}, "--script must be a path inside the project"),
    ({"name": "ok", "script_args": "--a 'unclosed"}, "--script-args: No closing quotation"),
])
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(UgroError, match=message.replace("(", r"\(")):
        LaunchConfig.from_options({}, **options)


def test_defaults_come_from_training_defaults_then_cli_wins():
    cfg = LaunchConfig.from_options({"script": "scripts/a.py", "epochs": 2}, name="n", epochs="5")
    assert (cfg.script, cfg.epochs) == ("scripts/a.py", 5)


def test_node_log_prefixes_lines_and_reads_the_exit_marker(tmp_path):
    sink = NodeLog(tmp_path / "gpu1.log", "gpu1")
    for chunk in ["[rank1]:step 1 | lo", "ss 2.0\nagent line\n", "\n", "[rank1]:ok 1[rank1]:2\n",
                  "[rank1]:  rank      : 1 (local_rank: 0)\n\n\x1eUGRO_", "EXIT 3\n"]:
        sink.write(chunk)
    sink.close()
    assert (tmp_path / "gpu1.log").read_text().splitlines() == [
        "gpu1 r1 | step 1 | loss 2.0",
        "gpu1    | agent line",
        "gpu1    |",
        "gpu1 r1 | ok 12",
        "gpu1 r1 |   rank      : 1 (local_rank: 0)",
    ]
    assert sink.exit == "3" and sink.failed_rank == 1
