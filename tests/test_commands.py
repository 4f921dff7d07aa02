"""Remote command lines: exact strings, quoting of hostile values, and the job scripts run for real.

The job scripts are POSIX sh over /proc, so they run here under /bin/sh exactly as a
node's shell would run them; no SSH is involved.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ugro import commands, procs
from ugro.commands import (
    EXIT_MARKER,
    job_path,
    job_state,
    kill_all_jobs,
    kill_job,
    listening_ports,
    node_job_dir,
    probe,
    q,
    rpath,
    start_job,
    watch_job,
)
from ugro.config import Node, PythonEnv
from ugro.health import parse_probe

PIXI = PythonEnv(strategy="pixi", pixi_env="default")
HOSTILE_PATH = "/tmp/x; touch /tmp/pwned"
HOSTILE_ENV = {
    "A": "$(touch /tmp/pwned)",
    "B": '"double" `id` $HOME',
    "C": "it's; rm -rf ~",
}


def node(project_path: str, **kw) -> Node:
    return Node(name="gpu1", host="127.0.0.101", user="ob", project_path=project_path, **kw)


def sh(command: str, shell: tuple[str, ...] = ("/bin/sh",)) -> subprocess.CompletedProcess:
    return subprocess.run([*shell, "-c", command], capture_output=True, text=True, timeout=30)


def single_quoted(command: str) -> set[int]:
    """Indices of the characters a POSIX shell reads inside single quotes."""
    inside, quote, escaped = set(), None, False
    for i, ch in enumerate(command):
        if escaped:
            escaped = False
        elif quote == "'":
            if ch == "'":
                quote = None
            else:
                inside.add(i)
        elif ch == "\\":
            escaped = True
        elif quote == '"':
            if ch == '"':
                quote = None
        elif ch in "'\"":
            quote = ch
    return inside


def assert_only_single_quoted(command: str, value: str):
    inside = single_quoted(command)
    start, found = command.find(value), 0
    while start != -1:
        found += 1
        assert set(range(start, start + len(value))) <= inside, (value, command)
        start = command.find(value, start + 1)
    assert found, f"{value!r} not in {command!r}"


@pytest.mark.parametrize("path,quoted", [
    ("~", '"$HOME"'),
    ("~/projects/UGRO", '"$HOME"/projects/UGRO'),
    ("~/my projects/UGRO", "\"$HOME\"/'my projects/UGRO'"),
    ("~/$(id)", "\"$HOME\"/'$(id)'"),
    ("/home/ob/projects/UGRO", "/home/ob/projects/UGRO"),
    ("projects/UGRO", "projects/UGRO"),
    ("/srv/my projects", "'/srv/my projects'"),
    (HOSTILE_PATH, "'/tmp/x; touch /tmp/pwned'"),
    ("/tmp/it's", "'/tmp/it'\"'\"'s'"),
    ("$HOME/x", "'$HOME/x'"),
    ("~bob/x", "'~bob/x'"),  # only the node user's own home is expanded
    ("", "''"),
])
def test_rpath(path, quoted):
    assert rpath(path) == quoted


def test_rpath_means_the_nodes_home():
    out = sh(f"HOME=/nodehome; printf '%s\\n' {rpath('~/my projects/$(id)')} {rpath('~')}")
    assert out.stdout == "/nodehome/my projects/$(id)\n/nodehome\n"


def test_probe_with_home_relative_path():
    src = shlex.quote(commands.PROBE_SOURCE)
    n = node("~/projects/UGRO", python=PIXI)
    assert probe(n, deep=True) == (
        '{ cd "$HOME"/projects/UGRO 2>/dev/null || cd; } && '
        f'pixi run --frozen -e default python -c {src} "$HOME"/projects/UGRO --deep'
    )
    assert probe(n).startswith(
        'if cd "$HOME"/projects/UGRO 2>/dev/null; then E=1; else cd; E=0; fi; '
        'C="$HOME/.cache/ugro/probe-')
    assert f"X=pixi; set -- pixi run --frozen -e default python -c {src} --env \"$C\"; " \
        in probe(n)
    assert probe(n, then="echo hi").endswith(probe(n) + "\necho UGRO_PROBE_END; echo hi")


def test_probe_with_absolute_paths():
    src = shlex.quote(commands.PROBE_SOURCE)
    assert probe(node("/home/ob/projects/UGRO"), deep=True) == (
        "{ cd /home/ob/projects/UGRO 2>/dev/null || cd; } && "
        f"python3 -c {src} /home/ob/projects/UGRO --deep"
    )
    venv = PythonEnv(strategy="venv", venv=".venv")
    assert probe(node("/srv/my projects", python=venv)).startswith(
        "if cd '/srv/my projects' 2>/dev/null; then E=1; else cd; E=0; fi; ")
    assert f"set -- .venv/bin/python -c {src} --env" in probe(node("/x", python=venv))
    for deep in (False, True):
        hostile = probe(node(HOSTILE_PATH), deep=deep)
        assert "cd '/tmp/x; touch /tmp/pwned' 2>/dev/null" in hostile
        assert_only_single_quoted(hostile, HOSTILE_PATH)


def test_probe_runs_and_reports(tmp_path):
    n = Node(name="n", host="127.0.0.1", user="u", local=True, project_path=str(tmp_path),
             python=PythonEnv(command=sys.executable))
    for deep in (False, True):
        out = sh(f"HOME={q(tmp_path)}; " + probe(n, deep))
        assert out.returncode == 0, out.stderr
        report = parse_probe(out.stdout)
        assert report["project_exists"] is True
        assert report["disk"]["path"] == str(tmp_path) and report["disk"]["free"] > 0
        assert report["python"] and report["hostname"] and len(report["loadavg"]) == 3


def fake_torch(site, version: str) -> None:
    """A torch that package metadata finds first on PYTHONPATH: what the probe reports."""
    for old in site.glob("torch-*.dist-info"):
        (old / "METADATA").unlink()
        old.rmdir()
    (site / "torch").mkdir(parents=True, exist_ok=True)
    (site / "torch" / "__init__.py").write_text(
        "class cuda:\n    is_available = staticmethod(lambda: False)\n")
    (site / "torch" / "version.py").write_text("cuda = '12.4'\n")
    info = site / f"torch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")


def test_light_probe_starts_python_only_when_the_environment_changed(tmp_path):
    site, home = tmp_path / "site", tmp_path / "home"
    fake_torch(site, "9.1")
    n = Node(name="n", host="127.0.0.1", user="u", local=True, project_path=str(tmp_path),
             python=PythonEnv(command=sys.executable))
    env = f"HOME={q(home)}; PYTHONPATH={q(site)}; export HOME PYTHONPATH; "

    def probed() -> dict:
        out = sh(env + probe(n))
        assert out.returncode == 0, out.stderr
        return parse_probe(out.stdout)

    assert not list(home.glob(".cache/ugro/*"))
    for _ in range(2):  # the key is taken before Python runs: the second run keys the cache
        assert probed()["torch"] == "9.1"
    (cached,) = home.glob(".cache/ugro/*.json")
    key = cached.with_suffix(".key")
    assert key.is_file() and str(site) in cached.with_suffix(".paths").read_text()
    # From now on the cache answers (shown by an edit only a cache read can report) ...
    cached.write_text(cached.read_text().replace("9.1", "9.1-from-cache"))
    assert probed()["torch"] == "9.1-from-cache"
    # ... until a package is installed, upgraded or removed: Python runs and sees it.
    fake_torch(site, "9.2")
    assert probed()["torch"] == "9.2"
    # A different key (another $PYTHONPATH, say) is a changed environment too.
    cached.write_text(cached.read_text().replace("9.2", "9.2-from-cache"))
    key.write_text("something else\n")
    assert probed()["torch"] == "9.2"
    # --deep always runs the whole probe in Python.
    cached.write_text(cached.read_text().replace("9.2", "9.2-from-cache"))
    assert parse_probe(sh(env + probe(n, deep=True)).stdout)["torch"] == "9.2"


def test_node_job_dir():
    assert node_job_dir(node("~/p"), "20260101-120000-lora") == (
        "data/experiments/20260101-120000-lora/nodes/gpu1"
    )


def test_listening_ports_exact():
    assert listening_ports(node(".")) == (
        "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | "
        "awk '$4 == \"0A\" { split($2, a, \":\"); print a[2] }' | sort -u"
    )


def test_listening_ports_sees_a_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = sh(listening_ports(node(".")))
        assert out.returncode == 0, out.stderr
        assert f"{port:04X}" in out.stdout.split()
        assert all(len(p) == 4 and int(p, 16) > 0 for p in out.stdout.split())
    assert f"{port:04X}" not in sh(listening_ports(node("."))).stdout.split()


def test_job_commands_quote_hostile_values():
    n = node(HOSTILE_PATH)
    argv = ["python", "train.py", "--name", "$(reboot)"]
    scripts = [
        start_job(n, "j1", argv, HOSTILE_ENV),
        watch_job(n, "j1"),
        kill_job(n, "j1"),
        job_state(n, "j1"),
    ]
    for script in scripts:
        assert script.startswith("cd '/tmp/x; touch /tmp/pwned' || exit 1; D=")
        assert_only_single_quoted(script, HOSTILE_PATH)
    start = scripts[0]
    assert_only_single_quoted(start, "$(touch /tmp/pwned)")
    assert_only_single_quoted(start, "$(reboot)")
    assert "A='$(touch /tmp/pwned)'" in start
    assert f"B={shlex.quote(HOSTILE_ENV['B'])}" in start
    assert f"C={shlex.quote(HOSTILE_ENV['C'])}" in start
    assert "UGRO_JOB_ID=j1" in start


def test_job_ids_are_quoted():
    n = node("/p")
    job = "j; touch /tmp/pwned"
    for script in (start_job(n, job, ["true"], {}), watch_job(n, job), kill_job(n, job),
                   job_state(n, job)):
        assert_only_single_quoted(script, job)


# The scripts for real, under /bin/sh (dash on Debian); the stream's watcher also under bash,
# a login shell's usual, where it naps with a builtin instead of `sleep`, and bash in POSIX
# mode (a login shell of /bin/sh that is bash), where it may have to fall back.
DASH = os.path.basename(os.path.realpath("/bin/sh")) == "dash"


@pytest.fixture(params=[("/bin/sh",), ("/bin/bash",), ("/bin/bash", "--posix")],
                ids=["sh", "bash", "bash-posix"])
def shell(request):
    return request.param


@pytest.fixture
def local(tmp_path):
    return Node(name="n", host="127.0.0.1", user="u", local=True, project_path=str(tmp_path))


@pytest.fixture
def job_id():
    # Unique: job_state and kill_job find processes by this id across the whole machine.
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def reap():
    """Kill whatever process groups a test started, even when it fails."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def start(node: Node, job_id: str, argv: list[str], reap: list[int], env=None) -> int:
    out = sh(start_job(node, job_id, argv, env or {}))
    assert out.returncode == 0, out.stderr
    pgid = int(out.stdout.strip())
    reap.append(pgid)
    return pgid


def test_start_state_kill(local, job_id, reap):
    pgid = start(local, job_id, ["sh", "-c", "echo hi; sleep 30"], reap)
    assert procs.group(pgid)
    assert sh(job_state(local, job_id)).stdout == (
        f"pgid={pgid} exit= alive=1 ended= stopped=0 metrics= ranks=0\n")

    again = sh(start_job(local, job_id, ["sh", "-c", "echo hi; sleep 30"], {}))
    assert again.returncode == 17
    assert again.stderr == "job already started here\n"

    stopped = sh(kill_job(local, job_id, grace=2))
    assert stopped.stdout == "stopped\n"
    assert sh(job_state(local, job_id)).stdout == (
        f"pgid={pgid} exit= alive=0 ended= stopped=0 metrics= ranks=0\n")
    assert procs.group(pgid) == []

    d = Path(local.project_path) / node_job_dir(local, job_id)
    assert (d / "output.log").read_text() == "hi\n"
    assert not (d / "exit_code").exists()
    assert sh(watch_job(local, job_id, tick=0.05)).stdout.endswith(f"\n{EXIT_MARKER} killed\n")


def test_watch_streams_output_and_exit_code(local, job_id, reap, shell):
    pgid = start(local, job_id, ["sh", "-c", "echo out; exit 3"], reap)
    out = sh(watch_job(local, job_id, tick=0.05), shell)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("out\n")
    assert out.stdout.endswith(f"\n{EXIT_MARKER} 3\n")
    # Not splitlines(): Python counts \x1e itself as a line boundary.
    assert out.stdout.split("\n")[-2] == "\x1eUGRO_EXIT 3"
    exit_file = Path(local.project_path) / node_job_dir(local, job_id) / "exit_code"
    ended = int(exit_file.stat().st_mtime)
    assert sh(job_state(local, job_id)).stdout == (
        f"pgid={pgid} exit=3 alive=0 ended={ended} stopped=0 metrics= ranks=0\n")
    metrics = Path(local.project_path) / job_path(job_id, "metrics.jsonl")
    metrics.write_text('{"step": 1}\n')
    assert sh(job_state(local, job_id)).stdout.endswith(
        f" metrics={int(metrics.stat().st_mtime)} ranks=0\n")


def follow(command: str, env: dict | None = None,
           shell: tuple[str, ...] = ("/bin/sh",)) -> tuple[subprocess.Popen, float]:
    p = subprocess.Popen([*shell, "-c", command], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    return p, time.monotonic()


def telling_sleep(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose `sleep` notes each call in the returned file, then sleeps."""
    fake = tmp_path / "bin"
    fake.mkdir()
    slept = tmp_path / "slept"
    (fake / "sleep").write_text(
        f'#!/bin/sh\necho "$@" >>{shlex.quote(str(slept))}\nexec /bin/sleep "$@"\n')
    (fake / "sleep").chmod(0o755)
    return {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}, slept


def test_watch_sends_each_line_as_it_comes_and_the_state_beside_it(
        local, job_id, reap, shell, tmp_path):
    from ugro.backends.ssh import STATE_RE

    pgid = start(local, job_id, ["sh", "-c", "echo first; sleep 4; echo second"], reap)
    env, slept = telling_sleep(tmp_path)  # the watcher's naps under bash start no `sleep`
    p, t0 = follow(watch_job(local, job_id, every=0.2, tick=0.05), env=env, shell=shell)
    assert p.stdout.readline() == "first\n"
    assert time.monotonic() - t0 < 3  # long before the job ends
    rest, err = p.communicate(timeout=30)
    assert rest == f"second\n\n{EXIT_MARKER} 0\n"
    states = [STATE_RE.fullmatch(line) for line in err.splitlines()]
    assert states and all(states), err  # stderr carries state lines and nothing else
    assert {m.group(1) for m in states} == {str(pgid)}
    assert states[0].group(3) == "1" and len(states) >= 5  # every 0.2 s while it ran
    if shell == ("/bin/bash",):
        assert not slept.exists()
    elif shell == ("/bin/sh",) and DASH:
        assert slept.exists()  # dash has no `read -t`: it sleeps


@pytest.mark.skipif(not DASH, reason="/bin/sh is not dash")
def test_watch_falls_back_to_sleep_where_the_bash_nap_cannot_be_set_up(local, job_id, reap,
                                                                       tmp_path):
    # dash that inherited BASH_VERSION parses bash's <(...) as an error, as bash before 5.1
    # does in POSIX mode: the watcher must fall back, not die with the stream half sent.
    env, slept = telling_sleep(tmp_path)
    start(local, job_id, ["sh", "-c", "echo a; sleep 0.5; echo b; exit 5"], reap)
    p, _ = follow(watch_job(local, job_id, every=0.2, tick=0.05),
                  env={**env, "BASH_VERSION": "4.4.20(1)-release"})
    out, err = p.communicate(timeout=30)
    assert (p.returncode, out) == (0, f"a\nb\n\n{EXIT_MARKER} 5\n"), err
    assert slept.exists()


def test_watch_with_a_tail_that_cannot_follow_sends_every_byte(local, job_id, reap, tmp_path):
    # A tail without --pid/-f (busybox): the file's new bytes every tick instead.
    fake = tmp_path / "bin"
    fake.mkdir()
    refused = tmp_path / "refused"
    (fake / "tail").write_text(
        '#!/bin/sh\nfor a; do case $a in --pid=*|-f|---disable-inotify) '
        f'touch {shlex.quote(str(refused))}; exit 1;; esac; done\n'
        'exec /usr/bin/tail "$@"\n')
    (fake / "tail").chmod(0o755)
    start(local, job_id, ["sh", "-c", "seq 1 3000; sleep 0.3; echo last; exit 4"], reap)
    p, _ = follow(watch_job(local, job_id, tick=0.05),
                  env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    out, _ = p.communicate(timeout=30)
    assert out == "".join(f"{i}\n" for i in range(1, 3001)) + f"last\n\n{EXIT_MARKER} 4\n"
    assert refused.exists()  # the fallback ran: this tail refused to follow


def test_the_state_counts_the_ranks_torchrun_started_and_the_stream_says_so_at_once(
        local, job_id, reap, shell, tmp_path):
    from ugro.backends.ssh import STATE_RE

    # torchrun makes one log directory per local rank just before it starts them; here
    # once the stream's first line has been read.
    logs = f"{node_job_dir(local, job_id)}/torchrun/{job_id}_x/attempt_0"
    go = shlex.quote(str(tmp_path / "go"))
    worker = f"while [ ! -e {go} ]; do sleep 0.05; done; mkdir -p {logs}/0 {logs}/1; sleep 30"
    start(local, job_id, ["sh", "-c", worker], reap)
    assert sh(job_state(local, job_id)).stdout.endswith(" ranks=0\n")
    p, _ = follow(watch_job(local, job_id, every=60, tick=0.05), shell=shell)

    def ranks() -> int:
        return int(STATE_RE.fullmatch(p.stderr.readline().rstrip("\n")).group(7))

    assert ranks() == 0  # the first line at once
    (tmp_path / "go").touch()
    t0 = time.monotonic()
    # The next as soon as the count changed (not 60 s later).
    assert ranks() == 2 and time.monotonic() - t0 < 10
    assert sh(job_state(local, job_id)).stdout.endswith(" ranks=2\n")
    # A restart makes attempt_1: the ranks of one attempt are counted, not of all.
    root = Path(local.project_path) / logs.replace("attempt_0", "attempt_1")
    (root / "0").mkdir(parents=True)
    (root / "1").mkdir()
    assert sh(job_state(local, job_id)).stdout.endswith(" ranks=2\n")
    p.kill()
    assert sh(kill_job(local, job_id, grace=1)).stdout == "stopped\n"


def test_watch_never_started(local, job_id):
    out = sh(watch_job(local, job_id))
    assert (out.returncode, out.stdout) == (0, "\x1eUGRO_EXIT missing\n")


def test_hostile_values_reach_the_job_verbatim(tmp_path, job_id, reap):
    project = tmp_path / f"x; touch {tmp_path}/pwned"
    project.mkdir(parents=True)
    n = Node(name="n", host="127.0.0.1", user="u", local=True, project_path=str(project))
    env = {**HOSTILE_ENV, "A": f"$(touch {tmp_path}/pwned)"}
    argv = ["sh", "-c", 'printf "%s|%s|%s|%s\\n" "$A" "$B" "$C" "$1"', "sh", "`touch pwned2`"]
    pgid = start(n, job_id, argv, reap, env)
    assert sh(watch_job(n, job_id, tick=0.05)).stdout.endswith(f"{EXIT_MARKER} 0\n")
    log = (project / node_job_dir(n, job_id) / "output.log").read_text()
    # The job's own output, then the exit marker the wrapper appends last.
    assert log == f"{env['A']}|{env['B']}|{env['C']}|`touch pwned2`\n\n{EXIT_MARKER} 0\n"
    assert not (tmp_path / "pwned").exists()
    assert not (project / "pwned2").exists()
    assert procs.group(pgid) == []


def test_kill_all_jobs_stops_only_running_jobs(local, reap):
    running, finished = f"test-{uuid.uuid4().hex}", f"test-{uuid.uuid4().hex}"
    start(local, finished, ["true"], reap)
    exit_code = Path(local.project_path) / node_job_dir(local, finished) / "exit_code"
    deadline = time.monotonic() + 30
    while not exit_code.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert exit_code.read_text() == "0\n"
    pgid = start(local, running, ["sh", "-c", "sleep 30"], reap)
    assert sh(kill_all_jobs(local, grace=2)).stdout == f"{running} stopped\n"
    assert procs.group(pgid) == []
    assert sh(kill_all_jobs(local, grace=2)).stdout == ""
