"""scripts/train_single_test.py, run for real: torchrun with 2 CPU ranks (gloo) on this machine."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_single_test.py"
METRIC_KEYS = {"step", "epoch", "loss", "lr", "samples_per_sec", "time"}
STEPS_PER_EPOCH = 15
# Small runs: a few seconds each on 2 cores, still enough steps for the loss to fall.
FAST = ["--steps-per-epoch", str(STEPS_PER_EPOCH), "--log-every", "5"]


def env():
    # Gloo picks its interface from the hostname; pin it to loopback so a test run never
    # touches another interface, whatever the machine's hostname resolves to.
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def run_script(*args, timeout=60):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT,
    )


def torchrun(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(SCRIPT), *args],
        capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT,
    )


def read_metrics(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        assert set(record) == METRIC_KEYS
        assert isinstance(record["step"], int) and isinstance(record["epoch"], int)
        for key in ("loss", "lr", "samples_per_sec", "time"):
            assert isinstance(record[key], float)
    return records


def test_help_lists_the_launcher_arguments():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--epochs", "--lr", "--batch-size", "--output-dir", "--resume", "--model",
                 "--dataset", "--steps-per-epoch", "--crash-at-step", "--sleep-per-step"):
        assert flag in result.stdout


def test_unknown_argument_is_refused():
    result = run_script("--no-such-flag")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr


def test_missing_dataset_file_is_one_clear_line(tmp_path):
    result = run_script("--dataset", str(tmp_path / "absent.txt"))
    assert result.returncode == 2
    assert f"--dataset {tmp_path / 'absent.txt'}: no such file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    result = torchrun("--epochs", "2", "--output-dir", str(out), "--model", "tiny", *FAST)
    return out, result


@pytest.mark.slow
def test_two_rank_run_logs_metrics_and_loss_falls(two_epochs):
    out, result = two_epochs
    assert result.returncode == 0, result.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert [r["epoch"] for r in records] == [1, 1, 1, 2, 2, 2]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert all(r["lr"] == 3e-3 and r["samples_per_sec"] > 0 for r in records)

    lines = result.stdout.splitlines()
    config = json.loads(next(line for line in lines if line.startswith("config: "))[8:])
    assert config["world_size"] == 2 and config["backend"] == "gloo"
    assert config["model"] == "tiny" and config["epochs"] == 2
    # Rank 0 alone prints: one config line, one line per logged step.
    assert sum(line.startswith("config: ") for line in lines) == 1
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == len(records)
    assert step_lines[0].startswith("step 5 | epoch 1 | loss ")
    assert " | lr 3.00e-03 | samples/s " in step_lines[0]
    assert lines[-1] == f"done: epochs=2 final_loss={records[-1]['loss']:.4f}"


@pytest.mark.slow
def test_two_rank_run_checkpoints_every_epoch(two_epochs):
    out, result = two_epochs
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["epoch_1.pt", "epoch_2.pt"]


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch(two_epochs, tmp_path):
    out, result = two_epochs
    assert result.returncode == 0, result.stderr
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    # A line from a run that died after the epoch 2 checkpoint must not survive the resume.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 33, "epoch": 3, "loss": 9.0, "lr": 0.003, "samples_per_sec": 1.0, '
                '"time": 1.0}\n{"step": 3')

    resumed = torchrun("--epochs", "3", "--output-dir", str(tmp_path), "--resume", *FAST)
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch_2.pt" in resumed.stdout
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert [r["epoch"] for r in records][6:] == [3, 3, 3]
    # Continuing from the trained weights, epoch 3 starts near where epoch 2 ended.
    assert records[6]["loss"] < records[0]["loss"] - 0.5
    assert (tmp_path / "checkpoints" / "epoch_3.pt").exists()
    assert resumed.stdout.splitlines()[-1].startswith("done: epochs=3 final_loss=")


@pytest.mark.slow
def test_a_crashing_rank_fails_the_run(tmp_path):
    result = torchrun("--epochs", "2", "--output-dir", str(tmp_path), "--crash-at-step", "7",
                      "--crash-rank", "1", *FAST)
    assert result.returncode != 0
    assert "crash-at-step: rank 1 exits with status 3 at step 7" in result.stderr
    assert "done:" not in result.stdout
    assert not (tmp_path / "checkpoints" / "epoch_1.pt").exists()


@pytest.mark.slow
def test_single_process_without_torchrun(tmp_path):
    result = run_script("--epochs", "1", "--steps-per-epoch", "5", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5]
    assert (tmp_path / "checkpoints" / "epoch_1.pt").exists()
