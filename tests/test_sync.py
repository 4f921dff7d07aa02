"""Sync without SSH: exact command lines, rsync's output parsed from real samples, real local rsync.

The samples are what rsync 3.5.0 printed for `commands.rsync(...)` pushing over SSH to an
sshd lab node (`<f` = sent), except where a comment says otherwise.
"""

from __future__ import annotations

import hashlib
import io
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ugro import commands
from ugro.config import Cluster, Node, PythonEnv, parse_cluster
from ugro.envs import (
    EnvReport,
    Fingerprint,
    NodeEnv,
    Step,
    env_drift,
    env_steps,
    env_table,
    parse_fingerprint,
    sync_envs,
)
from ugro.errors import UgroError
from ugro.sync import (
    NodeSync,
    Progress,
    describe_rsync_failure,
    filters,
    parse_df,
    parse_itemized,
    parse_stats,
    sync_code,
    sync_set,
    sync_table,
)

KNOWN_HOSTS = Path("/home/me/.ssh/known_hosts")
FILTERS = ["--filter=:- .gitignore", "--exclude=/data/", "--exclude=__pycache__/",
           "--include=/scripts/***", "--exclude=*"]


def node(project_path="~/projects/UGRO", **kw) -> Node:
    kw.setdefault("identity_file", "/home/me/.ssh/id_ed25519")
    return Node(name="gpu1", host="127.0.0.101", user="ob", port=2222,
                project_path=project_path, **kw)


def sh(command: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **env})


def cluster(root: Path, *nodes: str) -> Cluster:
    text = "cluster: {name: t, known_hosts: /dev/null}\nmaster: {name: control, local: true}\n"
    text += "workers:\n" + "".join(f"  - {n}\n" for n in nodes)
    return parse_cluster(text, Path("t.yaml"), root)


# -- command lines -----------------------------------------------------------

SSH_E = ("ssh -p 2222 -o IdentityFile=/home/me/.ssh/id_ed25519 "
         "-o UserKnownHostsFile=/home/me/.ssh/known_hosts -o StrictHostKeyChecking=yes "
         "-o BatchMode=yes -o ConnectTimeout=5")


def test_ssh_transport_is_ugros_connection():
    assert commands.ssh_transport(node(), KNOWN_HOSTS, 5.0) == SSH_E
    bare = node(identity_file=None)
    assert commands.ssh_transport(bare, KNOWN_HOSTS, 0.2) == (
        "ssh -p 2222 -o UserKnownHostsFile=/home/me/.ssh/known_hosts "
        "-o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=1"
    )


def test_ssh_transport_quotes_hostile_paths_for_ssh_and_for_rsync():
    # ssh reads `-o` values as config lines (%-tokens, quotes); rsync splits -e like a shell.
    e = commands.ssh_transport(node(identity_file="/k/it's 100%"), Path('/k/"my" hosts'), 5)
    assert commands.ssh_option("/k/it's 100%") == '"/k/it\'s 100%%"'
    assert commands.ssh_option('/k/"my" hosts') == '"/k/\\"my\\" hosts"'
    assert shlex.split(e) == [
        "ssh", "-p", "2222", "-o", 'IdentityFile="/k/it\'s 100%%"',
        "-o", 'UserKnownHostsFile="/k/\\"my\\" hosts"', "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
    ]


@pytest.mark.parametrize("path,dest", [
    ("~/projects/UGRO", "ob@127.0.0.101:projects/UGRO/"),
    ("~/my projects/", "ob@127.0.0.101:my projects/"),
    ("~", "ob@127.0.0.101:./"),
    ("/home/ob/projects/UGRO", "ob@127.0.0.101:/home/ob/projects/UGRO/"),
    ("projects/UGRO", "ob@127.0.0.101:projects/UGRO/"),
])
def test_rsync_dest(path, dest):
    assert commands.rsync_dest(node(path)) == dest


def test_rsync_dest_ipv6():
    n = Node(name="v6", host="fd00::5", user="ob", project_path="/p")
    assert commands.rsync_dest(n) == "ob@[fd00::5]:/p/"


def test_rsync_argv_pushes_over_ugros_ssh():
    argv = commands.rsync(node(), Path("/work/UGRO"), FILTERS, known_hosts=KNOWN_HOSTS, timeout=5)
    assert argv == [
        "rsync", "--recursive", "--links", "--perms", "--times", "--itemize-changes", "--stats",
        "--no-human-readable", "--timeout=120", *FILTERS,
        "--protect-args", "-e", SSH_E,
        "--rsync-path=command -v rsync >/dev/null 2>&1 || "
        "{ echo 'ugro: rsync is not installed on this node' >&2; exit 127; }; "
        'mkdir -p "$HOME"/projects/UGRO && exec rsync',
        "/work/UGRO/", "ob@127.0.0.101:projects/UGRO/",
    ]
    dry = commands.rsync(node(), Path("/work/UGRO"), FILTERS, known_hosts=KNOWN_HOSTS, timeout=5,
                         dry_run=True, delete=True)
    flags = dry[dry.index("--exclude=*") + 1:dry.index("--protect-args")]
    assert flags == ["--dry-run", "--delete"]
    # A dry run creates nothing on the node, not even the project path.
    assert [a for a in dry if a.startswith("--rsync-path=")] == [
        "--rsync-path=command -v rsync >/dev/null 2>&1 || "
        "{ echo 'ugro: rsync is not installed on this node' >&2; exit 127; }; exec rsync"
    ]


def test_rsync_argv_for_a_local_node_has_no_ssh():
    local = Node(name="l", host="127.0.0.1", user="me", local=True, project_path="/srv/other/")
    argv = commands.rsync(local, Path("/work/UGRO/"), FILTERS, known_hosts=KNOWN_HOSTS, timeout=5)
    assert argv[-2:] == ["/work/UGRO/", "/srv/other/"]
    assert "-e" not in argv and not any(a.startswith("--rsync-path") for a in argv)


def test_rsync_receiver_says_when_rsync_is_missing_and_makes_the_project(tmp_path):
    n = node("~/deep/er project")
    command = commands.rsync_receiver(n, create=True).replace("exec rsync", "echo ran")
    out = sh(command, HOME=str(tmp_path))
    assert out.returncode == 0 and out.stdout == "ran\n"
    assert (tmp_path / "deep" / "er project").is_dir()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    out = sh(command, PATH=str(empty), HOME=str(tmp_path))
    assert out.returncode == 127
    assert out.stderr.strip() == commands.NO_RSYNC


# -- sync-envs steps: the exact command sequence per strategy -----------------

def test_pixi_steps_sync_the_lock_then_install_it_frozen(tmp_path):
    n = node(python=PythonEnv(strategy="pixi", pixi_env="cuda"))
    c = cluster(tmp_path)
    steps = env_steps(c, n, tmp_path)
    assert steps == [
        Step("sync pixi.toml, pixi.lock", rsync=tuple(commands.rsync(
            n, tmp_path,
            ["--filter=:- .gitignore", "--exclude=/data/", "--exclude=__pycache__/",
             "--include=/pixi.toml", "--include=/pixi.lock", "--exclude=*"],
            known_hosts=Path("/dev/null"), timeout=5.0,
        ))),
        Step("pixi install --frozen -e cuda", remote=(
            "command -v pixi >/dev/null 2>&1 || "
            "{ echo 'ugro: pixi is not installed on this node' >&2; exit 127; }; "
            + commands.in_project(n, "pixi install --frozen -e cuda")
        )),
    ]


def test_pixi_install_reports_a_missing_pixi(tmp_path):
    out = sh(commands.pixi_install(node("/tmp")), PATH=str(tmp_path))
    assert out.returncode == 127 and out.stderr.strip() == commands.NO_PIXI


def test_venv_steps_sync_requirements_then_pip_install(tmp_path):
    n = node("/srv/UGRO", python=PythonEnv(strategy="venv", venv="envs/train env",
                                           command="/usr/bin/python3.11"))
    steps = env_steps(cluster(tmp_path), n, tmp_path, find_links="/mnt/wheels; rm -rf ~",
                      no_index=True)
    assert [s.label for s in steps] == ["sync scripts/requirements.txt",
                                        "pip install -r scripts/requirements.txt"]
    assert "--include=/scripts/" in steps[0].rsync
    assert "--include=/scripts/requirements.txt" in steps[0].rsync
    py = "'envs/train env'/bin/python"
    assert steps[1].remote == commands.in_project(n, (
        f"{{ [ -x {py} ] || /usr/bin/python3.11 -m venv --system-site-packages "
        f"--without-pip 'envs/train env'; }} && "
        f"{{ {py} -m pip --version >/dev/null 2>&1 || {py} -m ensurepip >/dev/null; }} && "
        f"{py} -m pip install --disable-pip-version-check -r scripts/requirements.txt "
        "--no-index --find-links '/mnt/wheels; rm -rf ~'"
    ))


def test_system_nodes_are_only_checked(tmp_path):
    assert env_steps(cluster(tmp_path), node(), tmp_path) == []


def test_sync_envs_needs_the_lock_on_the_control_node(tmp_path):
    c = cluster(tmp_path, "{name: w, ip: 127.0.1.9, python: {strategy: pixi}}")
    (tmp_path / "pixi.toml").write_text("")
    with pytest.raises(UgroError, match=r"w uses python.strategy pixi, but pixi.lock is not in"):
        sync_envs(c, c.nodes, tmp_path)


# -- what is synced ----------------------------------------------------------

def test_sync_set_defaults_that_exist_then_configured_paths(tmp_path):
    for d in ("scripts", "config", "docs/api"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "pixi.toml").write_text("")
    c = cluster(tmp_path)
    assert sync_set(c, tmp_path) == ["scripts", "config", "pixi.toml"]
    c2 = parse_cluster("master: {name: m, local: true}\nsync: {paths: [docs/api/, scripts]}\n",
                       Path("t.yaml"), tmp_path)
    assert sync_set(c2, tmp_path) == ["scripts", "config", "pixi.toml", "docs/api"]
    assert filters(tmp_path, ["docs/api", "pixi.toml"]) == [
        "--filter=:- .gitignore", "--exclude=/data/", "--exclude=__pycache__/",
        "--include=/docs/", "--include=/docs/api/***", "--include=/pixi.toml", "--exclude=*",
    ]


@pytest.mark.parametrize("path,why", [
    ("/etc", "must be a path inside the project"),
    ("../secrets", "no '..'"),
    ("docs/*.md", "not a pattern"),
    ("nope", "does not exist in"),
])
def test_sync_paths_errors_name_the_field(tmp_path, path, why):
    c = parse_cluster(f"master: {{name: m, local: true}}\nsync: {{paths: ['{path}']}}\n",
                      Path("c.yaml"), tmp_path)
    with pytest.raises(UgroError, match=re.escape(f"c.yaml: sync.paths: '{path}' ") + ".*" + why):
        sync_set(c, tmp_path)


def make_tree(root: Path) -> None:
    files = {
        "scripts/train.py": "print('train')\n",
        "scripts/data/corpus.txt": "to be\n",  # training data that ships with the code
        "scripts/notes.tmp": "ignored\n",
        "scripts/__pycache__/train.cpython-311.pyc": "x",
        "config/cluster.yaml": "cluster: {}\n",
        "data/experiments/job/metadata.json": "{}",
        "README.md": "not synced\n",
        ".gitignore": "*.tmp\n/data/\n",
        "pixi.toml": "[workspace]\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_sync_code_with_real_rsync_to_a_local_node(tmp_path):
    root, dest = tmp_path / "control", tmp_path / "other checkout"
    make_tree(root)
    c = cluster(root, f"{{name: w, local: true, project_path: '{dest}'}}")
    first = {s.node: s for s in sync_code(c, c.nodes, root)}
    assert first["control"].skipped == "control node" and first["control"].ok
    assert sorted(first["w"].changed) == ["config/cluster.yaml", "pixi.toml",
                                          "scripts/data/corpus.txt", "scripts/train.py"]
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["config/cluster.yaml", "pixi.toml", "scripts/data/corpus.txt",
                   "scripts/train.py"]
    (second,) = sync_code(c, c.nodes[1:], root)
    assert second.ok and second.changed == [] and second.result == "up to date"
    (root / "scripts/train.py").unlink()
    (dry,) = sync_code(c, c.nodes[1:], root, dry_run=True, delete=True)
    assert dry.deleted == ["scripts/train.py"] and (dest / "scripts/train.py").exists()
    (kept,) = sync_code(c, c.nodes[1:], root)
    assert kept.deleted == [] and (dest / "scripts/train.py").exists()
    (gone,) = sync_code(c, c.nodes[1:], root, delete=True)
    assert gone.deleted == ["scripts/train.py"] and not (dest / "scripts/train.py").exists()


# -- rsync's output ------------------------------------------------------------

FIRST = """\
.d..t...... ./
cd+++++++++ config/
<f+++++++++ config/cluster.yaml
cd+++++++++ scripts/
<f+++++++++ scripts/old.py
<f+++++++++ scripts/train.py
cd+++++++++ scripts/data/
<f+++++++++ scripts/data/corpus.txt

Number of files: 8 (reg: 4, dir: 4)
Number of created files: 7 (reg: 4, dir: 3)
Number of deleted files: 0
Number of regular files transferred: 4
Total file size: 1234589 bytes
Total transferred file size: 1234589 bytes
Literal data: 1234589 bytes
Matched data: 0 bytes
File list size: 0
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 1235292
Total bytes received: 115

sent 1235292 bytes  received 115 bytes  823604.67 bytes/sec
total size is 1234589  speedup is 1.00
"""

SECOND = """\

Number of files: 8 (reg: 4, dir: 4)
Number of created files: 0
Number of deleted files: 0
Number of regular files transferred: 0
Total file size: 1234589 bytes
Total transferred file size: 0 bytes
Literal data: 0 bytes
Matched data: 0 bytes
File list size: 0
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 219
Total bytes received: 19

sent 219 bytes  received 19 bytes  476.00 bytes/sec
total size is 1234589  speedup is 5187.35
"""

DRY_RUN_DELETE = """\
*deleting   scripts/old.py
.d..t...... config/
<f+++++++++ config/new.yaml
.d..t...... scripts/
<f.st...... scripts/train.py

Number of files: 8 (reg: 4, dir: 4)
Number of created files: 1 (reg: 1)
Number of deleted files: 1 (reg: 1)
Number of regular files transferred: 2
Total file size: 1234600 bytes
Total transferred file size: 28 bytes
Literal data: 0 bytes
Matched data: 0 bytes
File list size: 0
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 346
Total bytes received: 56

sent 346 bytes  received 56 bytes  268.00 bytes/sec
total size is 1234600  speedup is 3071.14 (DRY RUN)
"""

# Lines from several real runs put together: a link, a permission change, a deleted
# directory, and the --stats of a run with rsync's default digit grouping (no --no-h).
MIXED_HUMAN = """\
*deleting   scripts/old/helper.py
*deleting   scripts/old/
.d..t...... scripts/
cL+++++++++ scripts/link.py -> train.py
.f...p..... scripts/data/x.txt
<f.st...... scripts/data/corpus.txt

Number of files: 9 (reg: 4, dir: 4, link: 1)
Number of created files: 1 (link: 1)
Number of deleted files: 2 (reg: 1, dir: 1)
Number of regular files transferred: 1
Total file size: 2,345,711 bytes
Total transferred file size: 2,345,678 bytes
Literal data: 2,345,678 bytes
Matched data: 0 bytes
File list size: 0
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 2,346,531
Total bytes received: 6,756

sent 2,346,531 bytes  received 6,756 bytes  1,568,858.00 bytes/sec
total size is 2,345,711  speedup is 1.00
"""

# rsync 3.0.9's --stats format (CentOS 7's rsync), written out by hand: "files transferred",
# no created/deleted lines, no digit grouping.
RSYNC_30 = """\
>f+++++++++ scripts/train.py

Number of files: 5
Number of files transferred: 1
Total file size: 1234 bytes
Total transferred file size: 1234 bytes
Literal data: 1234 bytes
Matched data: 0 bytes
File list size: 123
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 1456
Total bytes received: 54

sent 1456 bytes  received 54 bytes  3020.00 bytes/sec
total size is 1234  speedup is 0.82
"""


def test_parse_first_sync():
    changed, deleted = parse_itemized(FIRST)
    assert changed == ["config/cluster.yaml", "scripts/old.py", "scripts/train.py",
                       "scripts/data/corpus.txt"]
    assert deleted == []
    assert parse_stats(FIRST) == {
        "deleted": 0, "files_transferred": 4, "total_size": 1234589,
        "transferred_size": 1234589, "bytes_sent": 1235292, "bytes_received": 115,
    }


def test_parse_unchanged_tree_transfers_nothing():
    assert parse_itemized(SECOND) == ([], [])
    stats = parse_stats(SECOND)
    assert stats["files_transferred"] == 0 and stats["transferred_size"] == 0
    assert stats["bytes_sent"] == 219  # the file list itself


def test_parse_dry_run_with_delete():
    assert parse_itemized(DRY_RUN_DELETE) == (["config/new.yaml", "scripts/train.py"],
                                              ["scripts/old.py"])
    assert parse_stats(DRY_RUN_DELETE)["deleted"] == 1


def test_parse_links_permissions_and_grouped_digits():
    changed, deleted = parse_itemized(MIXED_HUMAN)
    assert changed == ["scripts/link.py", "scripts/data/x.txt", "scripts/data/corpus.txt"]
    assert deleted == ["scripts/old/helper.py", "scripts/old/"]
    stats = parse_stats(MIXED_HUMAN)
    assert stats["bytes_sent"] == 2346531 and stats["total_size"] == 2345711


def test_parse_old_rsync_stats():
    assert parse_itemized(RSYNC_30) == (["scripts/train.py"], [])
    assert parse_stats(RSYNC_30)["files_transferred"] == 1


@pytest.mark.parametrize("garbage", [
    "", "\n\n", "Welcome to gpu1!\n*** System restart required ***",
    "Number of files: lots\nTotal bytes sent: \n", "<f+++ short\n.dXXXXXXXXX nospace",
])
def test_parse_garbage(garbage):
    assert parse_itemized(garbage) == ([], [])
    assert parse_stats(garbage) == {}


# What rsync printed on stderr (and its exit code) for each way a node fails; "no rsync" is
# UGRO's own line from `commands.rsync_receiver`, as the lab test sees it.
FAILURES = {
    "refused": (255, """\
ssh: connect to host 127.0.0.3 port 45277: Connection refused
rsync: connection unexpectedly closed (0 bytes received so far) [sender]
rsync error: unexplained error (code 255) at io.c(285) [sender=3.5.0]
""", "gpu1: cannot connect to 127.0.0.101:2222 (connection refused)"),
    "no rsync": (12, """\
ugro: rsync is not installed on this node
rsync: connection unexpectedly closed (0 bytes received so far) [sender]
rsync error: error in rsync protocol data stream (code 12) at io.c(285) [sender=3.5.0]
""", "gpu1: rsync is not installed on the node (e.g. apt install rsync)"),
    "disk full": (11, """\
rsync: [receiver] write failed on "/tmp/small/p/scripts/big.bin": No space left on device (28)
rsync error: error in file IO (code 11) at receiver.c(657) [receiver=3.5.0]
""", "gpu1: disk full on the node (No space left on device)"),
    "unknown key": (255, """\
No ED25519 host key is known for [127.0.0.3]:45277 and you have requested strict checking.
Host key verification failed.
rsync: connection unexpectedly closed (0 bytes received so far) [sender]
rsync error: unexplained error (code 255) at io.c(285) [sender=3.5.0]
""", "gpu1: host key for [127.0.0.101]:2222 is not trusted; run: inv trust-hosts --nodes gpu1"),
    "changed key": (12, """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Host key for [127.0.0.3]:45277 has changed and you have requested strict checking.
Host key verification failed.
rsync: connection unexpectedly closed (0 bytes received so far) [sender]
rsync error: error in rsync protocol data stream (code 12) at io.c(285) [sender=3.5.0]
""", "gpu1: host key CHANGED for [127.0.0.101]:2222; if the node was reinstalled, "
     "run: inv trust-hosts --nodes gpu1 --replace"),
    "auth": (12, """\
root@127.0.0.3: Permission denied (publickey).
rsync: connection unexpectedly closed (0 bytes received so far) [sender]
rsync error: error in rsync protocol data stream (code 12) at io.c(285) [sender=3.5.0]
""", "gpu1: SSH authentication failed for ob@127.0.0.101:2222"),
    "timeout": (255, """\
Connection timed out during banner exchange
Connection to 127.0.0.9 port 38499 timed out
rsync: connection unexpectedly closed (0 bytes received so far) [sender]
rsync error: unexplained error (code 255) at io.c(285) [sender=3.5.0]
""", "gpu1: 127.0.0.101:2222 did not answer (timed out)"),
    "mkdir": (12, """\
mkdir: cannot create directory '/proc/nope': No such file or directory
rsync: connection unexpectedly closed (0 bytes received so far) [sender]
rsync error: error in rsync protocol data stream (code 12) at io.c(285) [sender=3.5.0]
""", "gpu1: rsync failed (exit 12): mkdir: cannot create directory '/proc/nope': "
     "No such file or directory"),
    "silent": (5, "", "gpu1: rsync failed (exit 5): no message"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_describe_rsync_failure(case):
    code, stderr, line = FAILURES[case]
    assert describe_rsync_failure(node(), code, stderr) == line


def test_full_disk_told_from_free_space_when_rsync_says_nothing():
    # rsync 3.5.0 exited 11 with an empty stderr in 4 of 6 runs against a full tmpfs.
    assert describe_rsync_failure(node(), 11, "", space=(61440, 300000)) == (
        "gpu1: disk full on the node (60.0 KiB free, 293.0 KiB needed for one file)")
    assert describe_rsync_failure(node(), 11, "", space=(10**9, 300000)) == (
        "gpu1: rsync failed (exit 11): no message")


@pytest.mark.parametrize("text,free", [
    ("Filesystem     1024-blocks     Used Available Capacity Mounted on\n"
     "/dev/vda         264212084 24136688  82254224      23% /\n", 82254224 * 1024),
    ("Filesystem 1024-blocks Used Available Capacity Mounted on\n"
     "tmpfs 64 64 0 100% /srv/my disk\n", 0),
    ("Filesystem 1024-blocks Used Available Capacity Mounted on\n"
     "//nas/my share 1000 10 990 1% /mnt/nas\n", 990 * 1024),
    ("df: /x: No such file or directory\n", None),
    ("", None),
])
def test_parse_df(text, free):
    assert parse_df(text) == free


def test_free_space_runs_from_the_nearest_existing_directory(tmp_path):
    out = sh(commands.free_space(node(str(tmp_path / "not yet" / "there"))))
    assert out.returncode == 0 and parse_df(out.stdout) > 0


def test_ssh_argv_for_a_command_on_the_node():
    assert commands.ssh(node(), KNOWN_HOSTS, 5, "df -Pk .") == [
        *shlex.split(SSH_E), "--", "ob@127.0.0.101", "df -Pk .",
    ]


# -- fingerprints and drift ----------------------------------------------------

def test_env_probe_runs_on_a_node(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts/requirements.txt").write_text("torch==2.13.0\n")
    n = Node(name="n", host="127.0.0.1", user="u", local=True, project_path=str(tmp_path),
             python=PythonEnv(command=sys.executable))
    out = sh(commands.env_fingerprint(n, "scripts/requirements.txt", packages=True))
    assert out.returncode == 0, out.stderr
    report = parse_fingerprint("Welcome!\n" + out.stdout)
    assert report["lock"] == hashlib.sha256(b"torch==2.13.0\n").hexdigest()
    assert any(p.startswith("pytest==") for p in report["packages"])
    assert not any(p.startswith("pip==") for p in report["packages"])
    bare = parse_fingerprint(sh(commands.env_fingerprint(n, "missing.lock")).stdout)
    assert bare["lock"] is None and "packages" not in bare
    # A node never synced: no project path, so no lock, but its Python still answers.
    unsynced = Node(name="n", host="127.0.0.1", user="u", local=True,
                    project_path=str(tmp_path / "nowhere"),
                    python=PythonEnv(command=sys.executable))
    out = sh(commands.env_fingerprint(unsynced, "scripts/requirements.txt"), HOME=str(tmp_path))
    assert parse_fingerprint(out.stdout)["lock"] is None


@pytest.mark.parametrize("text,error", [
    ("", "no environment report"),
    ("UGRO_ENV {not json", "not JSON"),
    ('UGRO_ENV ["a"]', "not a JSON object"),
])
def test_parse_fingerprint_garbage(text, error):
    with pytest.raises(ValueError, match=error):
        parse_fingerprint(text)


def fp(python="3.11.7", torch="2.13.0+cu121", cuda="12.1", nccl="2.21.5", lock="a" * 64,
       packages=None) -> Fingerprint:
    return Fingerprint(python, torch, cuda, nccl, lock, packages)


def test_no_drift_when_everything_matches():
    envs = [NodeEnv(n, "venv", "installed", fingerprint=fp(packages=("x==1",))) for n in "abc"]
    assert env_drift(envs, {"scripts/requirements.txt": "a" * 64}) == []


def test_drift_names_each_difference_and_the_nodes():
    envs = [
        NodeEnv("m", "pixi", "control node", fingerprint=fp(lock="b" * 64)),
        NodeEnv("a", "venv", "installed", fingerprint=fp(packages=("torch==2.13.0", "x==1"))),
        NodeEnv("b", "venv", "installed",
                fingerprint=fp(torch="2.12.0", packages=("torch==2.12.0", "x==1", "y==3"))),
        NodeEnv("c", "system", "checked", fingerprint=fp(nccl=None, lock=None)),
        NodeEnv("d", "venv", "FAILED", error="d: down"),
    ]
    locks = {"pixi.lock": "b" * 64, "scripts/requirements.txt": "c" * 64}
    assert env_drift(envs, locks) == [
        "torch differs: 2.13.0+cu121 on m, a, c; 2.12.0 on b",
        "nccl differs: 2.21.5 on m, a, b; none on c",
        "scripts/requirements.txt differs from the control node's on a, b (run: inv sync)",
        "scripts/requirements.txt missing on c (run: inv sync)",
        "package torch differs: 2.13.0 on a; 2.12.0 on b",
        "package y differs: absent on a; 3 on b",
    ]


def test_env_table_side_by_side():
    report = EnvReport([
        NodeEnv("a", "venv", "installed", fingerprint=fp(packages=("x==1",))),
        NodeEnv("b", "pixi", "installed", error="b: pixi is not installed"),
    ], [])
    lines = env_table(report).splitlines()
    assert lines[0].split() == ["a", "b"]
    assert lines[3].split() == ["step", "installed", "FAILED"]
    assert lines[5].split() == ["torch", "2.13.0+cu121", "-"]
    digest = hashlib.sha256(b"x==1").hexdigest()[:12]
    assert lines[-2].split() == ["packages", digest, "(1)", "-"]
    assert lines[-1].split() == ["time", "0.0s", "0.0s"]


def test_sync_table():
    rows = sync_table([
        NodeSync("m", True, skipped="control node"),
        NodeSync("a", True, ["x.py"], [], 1536, 1200, 0.42),
        NodeSync("b", True, [], [], 219, 0, 0.3),
        NodeSync("c", False, seconds=5.0, error="c: cannot connect"),
    ]).splitlines()
    assert rows[2].split() == ["m", "skipped", "(control", "node)", "-", "-", "-", "-"]
    assert rows[3].split() == ["a", "synced", "1", "0", "1.5", "KiB", "0.4s"]
    assert rows[4].split() == ["b", "up", "to", "date", "0", "0", "219", "B", "0.3s"]
    assert rows[5].split() == ["c", "FAILED", "-", "-", "-", "5.0s", "c:", "cannot", "connect"]
    dry = sync_table([NodeSync("a", True, ["x.py"], [], 219, 1200, 0.4, dry_run=True)])
    assert dry.splitlines()[0].split()[4:6] == ["would", "send"]
    assert dry.splitlines()[2].split() == ["a", "would", "change", "1", "0", "1.2", "KiB", "0.4s"]


# -- progress ----------------------------------------------------------------

def test_progress_says_start_end_and_still_running():
    out = io.StringIO()
    with Progress(out, every=0.05) as progress:
        progress.start("gpu1", "pip install")
        time.sleep(0.2)
        progress.end("gpu1", "pip install")
        progress.start("gpu2", "sync")
        progress.end("gpu2", "sync", error="gpu2: down")
    lines = [ln.split("] ", 1)[1] for ln in out.getvalue().splitlines()]
    assert lines[0] == "gpu1: pip install ..."
    assert re.fullmatch(r"gpu1: pip install: still running \(0s\)", lines[1])
    assert re.fullmatch(r"gpu1: pip install: done in 0\.\ds", lines[-3])
    assert lines[-2:] == ["gpu2: sync ...", "gpu2: sync: FAILED after 0.0s"]
    silent = Progress(None)
    silent.start("gpu3", "sync")
    assert silent.end("gpu3", "sync") >= 0 and silent._ticker is None
