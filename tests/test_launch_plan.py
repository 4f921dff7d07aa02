"""The launch plan: validated options and the exact torchrun command per node (no SSH)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ugro import commands
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
        "-c", commands.TORCHRUN_STATIC, "--nnodes", "3", "--nproc-per-node", "1",
        "--max-restarts", "0", "--tee", "3",
        "--log-dir", "data/experiments/exp1_20260120_120000/nodes/gpu1/torchrun",
        "--node-rank", "1", "--master-addr", "192.168.1.100", "--master-port", "29500",
        "--rdzv-id", "exp1_20260120_120000",
        "scripts/train_single_test.py", "--epochs", "3",
    ]
    # The static rendezvous's store is rank 0's agent: no store of UGRO's own.
    assert [p.store for p in plans] == [None, None, None]
    assert plans[1].env["NCCL_SOCKET_IFNAME"] == "eno1"
    command = SSHBackend(homelab).command_line("exp1_20260120_120000", plans[1])
    assert command.startswith("cd /home/ob/projects/UGRO || exit 1; ")
    assert "UGRO_JOB_ID=exp1_20260120_120000" in command
    assert 'UGRO_JOB_DIR="$PWD"/data/experiments/exp1_20260120_120000' in command
    assert plans[1].env["UGRO_JOB_NAME"] == "exp1"


def arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def c10d(homelab_text: str) -> str:
    return homelab_text.replace("rdzv_backend: static", "rdzv_backend: c10d")


def test_subset_of_nodes_is_ranked_from_zero(homelab):
    cfg = LaunchConfig(name="x", script="s.py", nodes="gpu2,gpu1", lr=0.01,
                       script_args=("--foo", "a b"))
    plans = plan(homelab, cfg, "x_1", 29501)
    assert [p.node.name for p in plans] == ["gpu1", "gpu2"]  # rank order, not typed order
    assert [arg(p.argv, "--node-rank") for p in plans] == ["0", "1"]
    assert {arg(p.argv, "--master-addr") for p in plans} == {"192.168.1.101"}
    assert {arg(p.argv, "--master-port") for p in plans} == {"29501"}
    # Only what was given for this launch: no --output-dir, no defaults.
    assert plans[0].argv[-5:] == ["s.py", "--lr", "0.01", "--foo", "a b"]


def test_c10d_backend_has_its_own_store_and_orders_ranks_by_address(homelab):
    text = c10d((ROOT / "config/examples/homelab.yaml").read_text())
    cluster = parse_cluster(text, Path("h.yaml"), ROOT)
    cfg = LaunchConfig(name="x", script="s.py", nodes="gpu2,gpu1")
    plans = plan(cluster, cfg, "x_1", 29501)
    argv = plans[1].argv
    assert argv[argv.index("--rdzv-backend"):argv.index("s.py")] == [
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "192.168.1.101:29501",
        "--rdzv-id", "x_1", "--rdzv-conf", "is_host=0", "--local-addr", "192.168.1.102"]
    assert "--node-rank" not in argv  # c10d would ignore it
    # Plain torchrun: the store below outlives every agent, none has to leave last.
    assert argv[argv.index("python") + 1:][:2] == ["-m", "torch.distributed.run"]
    # The host node runs the rendezvous store beside torchrun, so it outlives every agent.
    assert plans[0].store[-3:] == ["192.168.1.101", "29501", "60"] and plans[1].store is None


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
    ({"name": "ok", "lr": "-1"}, "--lr must be a finite number > 0"),
    ({"name": "ok", "lr": "inf"}, "--lr must be a finite number > 0"),
    ({"name": "ok", "lr": "nan"}, "--lr must be a finite number > 0"),
    ({"name": "ok", "script": "/etc/passwd"}, "--script must be a path inside the project"),
    ({"name": "ok", "script": "-rf"}, "--script must be a path inside the project or -m"),
    ({"name": "ok", "script": "-m os; rm"}, "expected -m package.module"),
    ({"name": "ok", "script": "../x.py"}, "--script must be a path inside the project"),
    ({"name": "ok", "script_args": "--a 'unclosed"}, "--script-args: No closing quotation"),
])
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(UgroError, match=message.replace("(", r"\(")):
        LaunchConfig.from_options({}, {}, **options)


def test_defaults_come_from_the_scripts_own_entry_then_cli_wins():
    scripts = {"scripts/a.py": {"epochs": 2, "lr": 0.5}}
    cfg = LaunchConfig.from_options({"script": "scripts/a.py"}, scripts, name="n", epochs="5")
    assert (cfg.script, cfg.epochs, cfg.lr) == ("scripts/a.py", 5, 0.5)
    # A script without an entry gets only what was typed.
    cfg = LaunchConfig.from_options({"script": "scripts/a.py"}, scripts, name="n",
                                    script="other.py")
    assert cfg.script_argv() == ["other.py"]


def test_module_scripts_run_with_torchruns_module_flag(homelab):
    cfg = LaunchConfig(name="m", script="-m mypkg.train", epochs=2, script_args=("x",))
    assert cfg.module == "mypkg.train"
    argv = plan(homelab, cfg, "m_1", 29500)[0].argv
    assert argv[-5:] == ["--module", "mypkg.train", "--epochs", "2", "x"]


def test_version_policy_refuses_what_breaks_a_job_and_notes_the_rest():
    from ugro.health import Gpu, NodeHealth
    from ugro.plan import version_problems

    def node(name, python="3.11.7", torch="2.13.0", cuda="12.8", gpus=1, driver="550"):
        g = [Gpu(0, "RTX", 8192, 0, 0, 30, driver)] * gpus
        return NodeHealth(name, name, True, python=python, torch=torch, torch_cuda=cuda,
                          driver=driver, gpus=g)

    assert version_problems([node("a"), node("b")]) == ([], [])
    errors, warnings = version_problems([node("a"), node("b", python="3.11.2", driver="535")])
    assert errors == []
    assert warnings == ["python differs: 3.11.7 on a; 3.11.2 on b",
                        "driver differs: 550 on a; 535 on b"]
    errors, warnings = version_problems([node("a"), node("b", python="3.12.1")])
    assert errors == ["python differs: 3.11 on a; 3.12 on b"] and warnings == []
    errors, _ = version_problems([node("a"), node("b", torch="2.12.0", cuda="12.1")])
    assert errors == ["torch differs: 2.13.0 on a; 2.12.0 on b",
                      "CUDA build differs: 12.8 on a; 12.1 on b"]
    # A CPU node's torch build has no CUDA: that is no drift.
    assert version_problems([node("a"), node("c", cuda=None, gpus=0)]) == ([], [])


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


def test_node_log_takes_the_failed_rank_from_torchruns_root_cause(tmp_path):
    # torchrun's summary (torch.distributed.elastic...errors): other failures first.
    summary = """\
============================================================
scripts/train.py FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-04_14:51:09
  host      : vm
  rank      : 3 (local_rank: 1)
  exitcode  : 1 (pid: 41)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_14:51:08
  host      : vm
  rank      : 2 (local_rank: 0)
  exitcode  : 3 (pid: 40)
============================================================
"""
    sink = NodeLog(tmp_path / "gpu1.log", "gpu1")
    sink.write(summary)
    sink.close()
    assert sink.failed_rank == 2


def test_rendezvous_is_on_the_lowest_ranked_chosen_node(homelab):
    cfg = LaunchConfig(name="x", script="s.py", nodes="gpu2")
    (only,) = plan(homelab, cfg, "x_1", 29500)
    assert arg(only.argv, "--master-addr") == "192.168.1.102"
    assert arg(only.argv, "--node-rank") == "0"
    # A master that does not train is never in a plan; the first worker hosts.
    text = (ROOT / "config/examples/homelab.yaml").read_text().replace(
        "  train: true ", "  train: false ", 1)
    control_only = parse_cluster(text, Path("h.yaml"), ROOT)
    plans = plan(control_only, LaunchConfig(name="x", script="s.py"), "x_1", 29500)
    assert [p.node.name for p in plans] == ["gpu1", "gpu2"]
    assert {arg(p.argv, "--master-addr") for p in plans} == {"192.168.1.101"}


def test_static_torchrun_is_torchrun_and_nothing_in_it_needs_quoting_for_a_shell():
    # `pixi run` re-joins its arguments for a shell: nothing that would expand or end a quote.
    assert not set("'$`\\") & set(commands.TORCHRUN_STATIC)
    r = subprocess.run([sys.executable, "-c", commands.TORCHRUN_STATIC, "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: torchrun "), r.stderr
