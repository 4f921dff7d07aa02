"""`inv sync` and `inv sync-envs` against real sshd daemons on loopback, with real rsync and pip.

Each test gives every node a fresh project path of its own (under the node's lab
directory), so a test's first sync really is the first one there.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from ugro.config import load_cluster
from ugro.envs import sync_envs
from ugro.sync import Progress, sync_code

pytestmark = pytest.mark.lab


def project_of(node, tmp_path: Path) -> Path:
    return node.dir / "sync" / tmp_path.name


def cluster_file(lab, tmp_path: Path, python: dict | None = None, **cluster_settings) -> Path:
    over = {n.name: {"project_path": str(project_of(n, tmp_path))} for n in lab.nodes}
    if python:
        for name in over:
            over[name]["python"] = python
    data = lab.cluster_dict(node_overrides=over, timeout=3)
    data["cluster"].update(cluster_settings)
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


TREE = {
    "scripts/train.py": "print('v1')\n",
    "scripts/old.py": "print('old')\n",
    "scripts/data/corpus.txt": "to be or not to be\n",
    "scripts/notes.tmp": "gitignored\n",
    "scripts/__pycache__/train.cpython-311.pyc": "x",
    "config/cluster.yaml": "cluster: {}\n",
    "data/experiments/j/metadata.json": "{}",
    ".gitignore": "*.tmp\n/data/\n",
}
SENT = ["config/cluster.yaml", "scripts/data/corpus.txt", "scripts/old.py", "scripts/train.py"]


def test_sync_three_nodes_delta_only_and_delete_only_when_asked(lab, tmp_path):
    root = make_tree(tmp_path / "control", TREE)
    # The known_hosts path needs quoting for rsync's -e and again inside ssh's -o.
    known = tmp_path / "it's 100% \"known\"" / "known hosts"
    known.parent.mkdir()
    shutil.copy(lab.known_hosts, known)
    cluster = load_cluster(cluster_file(lab, tmp_path, known_hosts=str(known)))
    projects = [project_of(n, tmp_path) for n in lab.nodes]

    first = sync_code(cluster, cluster.nodes, root)
    assert [(s.node, s.ok, sorted(s.changed)) for s in first] == [
        (n.name, True, SENT) for n in lab.nodes], first
    for p in projects:
        got = sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())
        assert got == SENT
        (p / "data").mkdir()
        (p / "data" / "node-only.log").write_text("the node's own\n")

    second = sync_code(cluster, cluster.nodes, root)
    assert [(s.result, s.changed, s.deleted) for s in second] == [("up to date", [], [])] * 3

    # A new size: rsync's quick check (size, whole-second mtime) could miss a same-size
    # edit made within the second of the first sync.
    (root / "scripts/train.py").write_text("print('version 2')\n")
    changed = sync_code(cluster, cluster.nodes, root)
    assert [s.changed for s in changed] == [["scripts/train.py"]] * 3
    assert all((p / "scripts/train.py").read_text() == "print('version 2')\n" for p in projects)

    (root / "scripts/old.py").unlink()
    kept = sync_code(cluster, cluster.nodes, root)
    assert [s.deleted for s in kept] == [[]] * 3
    assert all((p / "scripts/old.py").exists() for p in projects)
    dry = sync_code(cluster, cluster.nodes, root, dry_run=True, delete=True)
    assert [(s.result, s.deleted) for s in dry] == [("would change", ["scripts/old.py"])] * 3
    assert all((p / "scripts/old.py").exists() for p in projects)
    gone = sync_code(cluster, cluster.nodes, root, delete=True)
    assert [s.deleted for s in gone] == [["scripts/old.py"]] * 3
    assert not any((p / "scripts/old.py").exists() for p in projects)
    assert all((p / "data" / "node-only.log").exists() for p in projects)


def test_stopped_node_fails_with_its_reason_the_others_sync(lab, inv, tmp_path):
    cluster = cluster_file(lab, tmp_path)
    down = lab.nodes[1]
    lab.stop_node(down)
    try:
        r = inv("sync", cluster=cluster, check=1)
    finally:
        lab.start_node(down)
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("lab")}
    assert "FAILED" in rows["lab1"]
    assert f"lab1: cannot connect to 127.0.0.3:{down.port} (connection refused)" in rows["lab1"]
    assert rows["lab0"].split()[1] == rows["lab2"].split()[1] == "synced"
    assert "sync failed on: lab1" in r.stderr
    assert "lab1: sync: FAILED after" in r.stderr and "lab0: sync: done in" in r.stderr
    for n in (lab.nodes[0], lab.nodes[2]):
        synced = project_of(n, tmp_path) / "scripts" / "train_single_test.py"
        assert synced.read_bytes() == (ROOT / "scripts" / "train_single_test.py").read_bytes()
    assert not project_of(down, tmp_path).exists()


def test_node_without_rsync_fails_clearly(lab, tmp_path):
    root = make_tree(tmp_path / "control", {"scripts/train.py": "x\n"})
    cluster = load_cluster(cluster_file(lab, tmp_path))
    bare = lab.nodes[2]
    lab.stop_node(bare)
    bare.env["PATH"] = str(bare.bin)  # no /usr/bin: no rsync
    lab.start_node(bare)
    try:
        results = sync_code(cluster, cluster.nodes, root)
    finally:
        lab.stop_node(bare)
        del bare.env["PATH"]
        lab.start_node(bare)
    assert [(s.node, s.ok) for s in results] == [("lab0", True), ("lab1", True), ("lab2", False)]
    assert results[2].error == "lab2: rsync is not installed on the node (e.g. apt install rsync)"


def test_full_disk_fails_that_node(lab, tmp_path):
    small = lab.nodes[0].dir / f"small-{tmp_path.name}"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                             capture_output=True).returncode == 0
    if not mounted:
        small.rmdir()
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        root = make_tree(tmp_path / "control", {"scripts/big.bin": "x" * 300_000})
        path = cluster_file(lab, tmp_path)
        data = yaml.safe_load(path.read_text())
        data["master"]["project_path"] = str(small / "project")
        path.write_text(yaml.safe_dump(data))
        cluster = load_cluster(path)
        (full,) = sync_code(cluster, cluster.nodes[:1], root)
    finally:
        # Lazily: the node's rsync may still be exiting with a file open there.
        subprocess.run(["umount", "--lazy", str(small)], check=True)
        small.rmdir()
    assert not full.ok
    # Either rsync relayed the node's ENOSPC, or UGRO measured the node's free space.
    assert full.error.startswith("lab0: disk full on the node ("), full.error


TINY = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"
[project]
name = "{name}"
version = "{version}"
[tool.setuptools]
py-modules = []
"""


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """A find-links directory: ugro-tiny 1.0 and ugro-extra 1.0 (empty packages)."""
    base = tmp_path_factory.mktemp("wheels")
    for name in ("ugro-tiny", "ugro-extra"):
        (base / name).mkdir()
        (base / name / "pyproject.toml").write_text(TINY.format(name=name, version="1.0"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", "dist", "./ugro-tiny", "./ugro-extra"],
                   cwd=base, check=True, capture_output=True)
    return base / "dist"


def test_venv_strategy_installs_the_lock_offline_and_catches_drift(lab, tmp_path, wheels):
    root = make_tree(tmp_path / "control", {"scripts/requirements.txt": "ugro-tiny==1.0\n"})
    python = {"strategy": "venv", "venv": ".venv", "command": sys.executable}
    cluster = load_cluster(cluster_file(lab, tmp_path, python=python))
    system_torch = subprocess.run(
        [sys._base_executable, "-c", "from importlib import metadata as m\ntry: print(m.version"
         "('torch'))\nexcept m.PackageNotFoundError: print('none')"],
        capture_output=True, text=True, check=True).stdout.strip()
    system_torch = None if system_torch == "none" else system_torch
    out = io.StringIO()
    with Progress(out) as progress:
        report = sync_envs(cluster, cluster.nodes, root, find_links=str(wheels), no_index=True,
                           progress=progress)
    assert report.ok, (report, out.getvalue())
    for e in report.nodes:
        assert e.action == "installed"
        assert "ugro-tiny==1.0" in e.fingerprint.packages
        # The venv sees the system site-packages: the base interpreter's torch, if it has one.
        assert e.fingerprint.torch == system_torch
        assert f"{e.node}: pip install -r scripts/requirements.txt: done in" in out.getvalue()
    venvs = [project_of(n, tmp_path) / ".venv" for n in lab.nodes]
    assert all(list(v.glob("lib/python*/site-packages/ugro_tiny-1.0.dist-info")) for v in venvs)

    # Someone installs a package the lock does not have into lab2's venv, by hand.
    pip = [str(venvs[2] / "bin/python"), "-m", "pip", "install", "-q", "--no-index",
           "--find-links", str(wheels), "ugro-extra"]
    subprocess.run(pip, check=True, capture_output=True, timeout=120)
    checked = sync_envs(cluster, cluster.nodes, root, check=True)
    assert [(e.action, e.error) for e in checked.nodes] == [("checked", None)] * 3
    assert checked.drift == ["package ugro-extra differs: absent on lab0, lab1; 1.0 on lab2"]
    assert not checked.ok


def test_missing_pixi_is_named(lab, tmp_path):
    root = make_tree(tmp_path / "control", {"pixi.toml": "[workspace]\n", "pixi.lock": "v: 6\n"})
    path = cluster_file(lab, tmp_path)
    data = yaml.safe_load(path.read_text())
    data["master"]["python"] = {"strategy": "pixi"}
    path.write_text(yaml.safe_dump(data))
    cluster = load_cluster(path)
    report = sync_envs(cluster, cluster.nodes, root)
    by_node = {e.node: e for e in report.nodes}
    assert by_node["lab0"].error == (
        "lab0: pixi is not installed (not on the PATH of SSH commands; see https://pixi.sh)")
    assert (project_of(lab.nodes[0], tmp_path) / "pixi.lock").read_text() == "v: 6\n"
    assert by_node["lab1"].action == by_node["lab2"].action == "checked"
    assert by_node["lab1"].fingerprint.python == by_node["lab2"].fingerprint.python
    assert not report.ok


def test_cron_wrappers_sync_then_verify_system_nodes(lab, tmp_path):
    env = dict(os.environ, INVOKE_UGRO_CLUSTER=str(cluster_file(lab, tmp_path)),
               INVOKE_UGRO_DATA_DIR=str(tmp_path / "data"),
               INVOKE_UGRO_LOG_DIR=str(tmp_path / "logs"))

    def run(script, *args):
        return subprocess.run([str(ROOT / "tools" / script), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    r = run("sync.sh", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "  lab1: would send scripts/train_single_test.py" in r.stdout
    assert not any(project_of(n, tmp_path).exists() for n in lab.nodes)  # a dry run makes nothing
    r = run("sync.sh")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("sync_envs.sh", "--nodes", "lab0,lab2")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["lab0", "lab2"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:10]}
    assert rows["step"] == ["checked", "checked"]
    assert rows["python"][0] == rows["python"][1] == ".".join(map(str, sys.version_info[:3]))
    assert "environments match on lab0, lab2" in r.stdout
    assert "lab2: fingerprint: done in" in r.stderr
