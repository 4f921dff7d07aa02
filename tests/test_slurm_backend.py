"""The Slurm side without a cluster: the cluster file, the watch loop, gres, the waiting reason."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from ugro import slurm, views
from ugro.commands import EXIT_MARKER
from ugro.config import ConfigError, load_cluster, parse_cluster
from ugro.health import gres_gpus

MINIMAL = "backend: slurm\nslurm:\n  shared_dir: /scratch/u\n  project_path: /home/u/ugro\n"


def test_example_file_parses():
    cluster = load_cluster(ROOT / "config" / "examples" / "slurm.yaml", ROOT)
    s = cluster.slurm
    assert (s.partition, s.account, s.qos, s.time_limit, s.nodes, s.gpus_per_node, s.procs) == (
        "gpu", "ml-lab", "normal", "04:00:00", 2, 4, 4)
    assert s.setup[0] == "module load cuda/12.4" and cluster.master.local
    assert cluster.node("gpu017").name == "gpu017"


def test_minimal_file_defaults():
    cluster = parse_cluster(MINIMAL, Path("s.yaml"))
    assert (cluster.slurm.nodes, cluster.slurm.partition, cluster.master.local) == (1, None, True)


@pytest.mark.parametrize("extra, message", [
    ("  partition: gpu --uid=0\n", "s.yaml: slurm.partition: not a Slurm name"),
    ("  time: 1 day\n", "s.yaml: slurm.time: not a Slurm time limit"),
    ("  nodes: 0\n", "s.yaml: slurm.nodes: must be >= 1"),
    ("  gpus_per_node: two\n", "s.yaml: slurm.gpus_per_node: expected int"),
    ("  setup: [1]\n", "s.yaml: slurm.setup[0]: expected one line of shell"),
    ("  bogus: 1\n", "s.yaml: slurm.bogus: unknown field"),
    ("  login: {user: me}\n", "s.yaml: slurm.login.ip: missing"),
    ("workers: []\n", "s.yaml: workers: unknown field"),
])
def test_bad_slurm_files_name_file_and_field(extra, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        parse_cluster(MINIMAL + extra, Path("s.yaml"))


def test_shared_dir_must_be_absolute():
    text = "backend: slurm\nslurm:\n  shared_dir: scratch\n  project_path: /p\n"
    with pytest.raises(ConfigError, match="slurm.shared_dir: must be an absolute path"):
        parse_cluster(text, Path("s.yaml"))


def test_unknown_backend():
    with pytest.raises(ConfigError, match="s.yaml: backend: must be ssh or slurm"):
        parse_cluster("backend: k8s\n", Path("s.yaml"))


def test_write_and_submit_exact():
    assert slurm.write_and_submit("/s/j 1", "#!/bin/bash\necho it's\n") == (
        "mkdir -p '/s/j 1' && cd '/s/j 1' && printf %s '#!/bin/bash\necho it'\"'\"'s\n' "
        '>batch.sh && id=$(sbatch --parsable batch.sh) && echo "$id" >slurm_id && echo "$id"')


def fake_squeue(tmp_path: Path, state: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho {state}\n")
    (bin_dir / "squeue").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_watch_output_stops_at_the_marker(tmp_path):
    d = tmp_path / "job" / "nodes" / "n1"
    d.mkdir(parents=True)
    (d / "output.log").write_text(f"[rank0]:hello\n\n{EXIT_MARKER} 0\n")
    out = subprocess.run(["bash", "-c", slurm.watch_output(str(tmp_path / "job"), "n1", "7")],
                         env=fake_squeue(tmp_path, "RUNNING"), capture_output=True, text=True,
                         timeout=10).stdout
    assert out == f"[rank0]:hello\n\n{EXIT_MARKER} 0\n"


@pytest.mark.parametrize("written, marker", [("half a line", "killed"), (None, "missing")])
def test_watch_output_ends_when_slurm_says_the_job_ended(tmp_path, written, marker):
    d = tmp_path / "job" / "nodes" / "n1"
    d.mkdir(parents=True)
    if written:
        (d / "output.log").write_text(written)
    out = subprocess.run(["bash", "-c", slurm.watch_output(str(tmp_path / "job"), "n1", "7")],
                         env=fake_squeue(tmp_path, "CANCELLED"), capture_output=True, text=True,
                         timeout=10).stdout
    assert out == (written or "") + f"\n{EXIT_MARKER} {marker}\n"


@pytest.mark.parametrize("gres, names", [
    ("gpu:4", ["gpu"] * 4), ("gpu:a100:2(S:0-1)", ["a100"] * 2), ("gpu:1,shard:8", ["gpu"]),
    (None, []), ("(null)", []), ("tmpdisk:100", []),
])
def test_gres_gpus(gres, names):
    assert [g.name for g in gres_gpus(gres)] == names


def test_gres_gpus_are_numbered_across_items():
    assert [(g.index, g.name) for g in gres_gpus("gpu:a100:2,gpu:v100:1")] == [
        (0, "a100"), (1, "a100"), (2, "v100")]


def test_waiting_reason():
    meta = {"status": "QUEUED", "slurm": {"job_id": "12", "state": "PENDING",
                                          "reason": "Resources"}}
    assert views.waiting(meta) == "Slurm job 12 PENDING (Resources)"
    assert views.waiting({**meta, "status": "RUNNING"}) is None
    assert views.waiting({"status": "QUEUED", "nodes": {}}) is None
