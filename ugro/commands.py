"""Every shell command line UGRO runs on a node, built in one place.

Each value passes through `shlex.quote` (or `rpath` for paths, which keeps a
leading `~/` meaning the node's own home). The scripts are POSIX sh and use
only what every Linux node has: coreutils, grep, and /proc.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

from .config import ENV_KEY_RE as ENV_KEY
from .config import Node
from .node_probe import GPU_QUERY as GPU_QUERY_PROBE

PROBE_SOURCE = (Path(__file__).parent / "node_probe.py").read_text()
EXIT_MARKER = "\x1eUGRO_EXIT"  # record separator: never part of a training log line
# The marker as printf writes it, and how far from a file's end its line can start
# (newline, marker, space, an exit code or `killed`/`missing`, newline).
_MARKER_PRINTF = EXIT_MARKER.replace("\x1e", "\\036")
_MARKER_SPAN = len(EXIT_MARKER) + 30


def q(value) -> str:
    return shlex.quote(str(value))


def rpath(path: str) -> str:
    """Quote a path for a node's shell; `~` and `~/...` mean that node's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + q(path[2:])
    return q(path)


def join(argv: list[str]) -> str:
    # `~/...` words (a venv's python, say) mean the node's home, as in a shell.
    return " ".join(rpath(a) if a.startswith("~/") else q(a) for a in argv)


def in_project(node: Node, command: str) -> str:
    return f"cd {rpath(node.project_path)} || exit 1; {command}"


PROBE_END = "UGRO_PROBE_END"  # the probe's last line; what a command run after it prints follows
_SMI_ARGS = "--query-gpu={} --format=csv,noheader,nounits"

# The probe without --deep starts no Python while the node's environment is as it was at the
# last probe: the Python and torch facts come from a cache in ~/.cache/ugro, keyed on the
# modification times (and inodes) of the paths the last Python run listed, on $PYTHONPATH
# and on where the interpreter command resolves. The key is taken before Python runs, so a
# change made while it runs is seen by the next probe. The rest is read by the shell: the
# host name and load from /proc, df, nvidia-smi (5 s at most where `timeout` exists).
_LIGHT_PROBE = r"""
k() {
  [ -s "$C.paths" ] || return 0
  set --; while IFS= read -r p; do set -- "$@" "$p"; done <"$C.paths"
  printf '%s
' "${PYTHONPATH-}" "$(command -v "$X")"; stat -L -c '%y %i %n' -- "$@" 2>&1
}
K=$(k)
if [ -n "$K" ] && [ "$K" = "$(cat "$C.key" 2>/dev/null)" ] && [ -s "$C.json" ]; then
  printf 'UGRO_PROBE_ENV '; cat "$C.json"
else
  "$@" && [ -n "$K" ] && printf '%s
' "$K" >"$C.key.$$" && mv -f "$C.key.$$" "$C.key"
fi
read -r h </proc/sys/kernel/hostname; echo "UGRO_PROBE_SH host $h"
read -r l </proc/loadavg; echo "UGRO_PROBE_SH load $l"
echo "UGRO_PROBE_SH project $E $PWD"
df -Pk -- "$PWD" 2>&1 | { read -r _; read -r d; echo "UGRO_PROBE_SH disk $d"; }
if command -v nvidia-smi >/dev/null 2>&1; then
  T=; command -v timeout >/dev/null 2>&1 && T="timeout 5"
  o=$($T nvidia-smi $S 2>&1); echo "UGRO_PROBE_SH smi $?"; [ -z "$o" ] || printf '%s
' "$o"
else echo "UGRO_PROBE_SH smi absent"; fi
"""


def probe(node: Node, deep: bool = False, then: str | None = None) -> str:
    """Run the health probe, from the node's project path if it exists (else its home).

    `--deep` runs the whole probe in the node's Python (it imports torch); otherwise a shell
    script answers, starting Python only when the environment changed (`_LIGHT_PROBE`).
    `then`, a command, runs after the probe in the same session; its output follows the
    `PROBE_END` line.
    """
    path = rpath(node.project_path)
    argv = node.python.argv()
    if deep:
        command = (f"{{ cd {path} 2>/dev/null || cd; }} && "
                   f"{join(argv + ['-c', PROBE_SOURCE])} {path} --deep")
    else:
        # One cache per interpreter command: nodes sharing a home keep theirs apart.
        key = hashlib.sha256(" ".join(argv).encode()).hexdigest()[:16]
        script = _LIGHT_PROBE.replace("$S", q(_SMI_ARGS.format(GPU_QUERY_PROBE)))
        command = (
            f"if cd {path} 2>/dev/null; then E=1; else cd; E=0; fi; "
            f'C="$HOME/.cache/ugro/probe-{key}"; X={rpath(argv[0])}; '
            f'set -- {join(argv + ["-c", PROBE_SOURCE, "--env"])} "$C"; {script}'
        )
    if then is None:
        return command
    return f"{command}\necho {PROBE_END}; {then}"


def node_job_dir(node: Node, job_id: str) -> str:
    """A node's own directory for a job, relative to its project path."""
    return job_path(job_id, f"nodes/{node.name}")


# The group-liveness test is zombie-safe: a finished group leader whose parent
# never reaps it still answers `kill -0`, so when the leader is gone or a
# zombie, read each process's state and process group from /proc. The cheap
# checks come first: this runs in every wait loop.
_ALIVE = r"""
alive() {
  [ -n "$P" ] || return 1
  kill -0 -- -"$P" 2>/dev/null || return 1
  if read -r l 2>/dev/null <"/proc/$P/stat"; then
    set -- ${l##*) }
    [ "$1" != Z ] && return 0
  fi
  for f in /proc/[0-9]*/stat; do
    read -r l 2>/dev/null <"$f" || continue
    set -- ${l##*) }
    [ "$3" = "$P" ] && [ "$1" != Z ] && return 0
  done
  return 1
}
"""

# Processes tagged with this job's id and this node's name (torchrun starts its
# workers in new sessions, so the group alone does not reach them after a
# SIGKILL; the node name keeps nodes that share a machine apart).
_TAGGED = r"""
tagged() {
  for f in $(grep -lzxF "UGRO_JOB_ID=$J" /proc/[0-9]*/environ 2>/dev/null); do
    grep -qzxF "UGRO_NODE=$N" "$f" 2>/dev/null && { f=${f#/proc/}; echo "${f%/environ}"; }
  done
}
"""


def _stop(ticks: int, report: str) -> str:
    """TERM the group and tagged processes, wait up to ticks/10 s, then KILL; `report`."""
    return (
        "sig TERM; i=0; "
        f"while any && [ $i -lt {ticks} ]; do sleep 0.1; i=$((i+1)); done; "
        "if any; then sig KILL; sleep 0.3; fi; "
        f"{report}"
    )


# SIGTERM goes to the group alone: torchrun forwards it to its workers, and a
# second SIGTERM landing on the agent mid-shutdown wedges it until the SIGKILL.
# SIGKILL goes to the group and to every tagged process.
_SIGNALS = (
    'any() { alive || [ -n "$(tagged)" ]; }; '
    'sig() { [ -n "$P" ] && kill -"$1" -- -"$P" 2>/dev/null; [ "$1" = KILL ] || return 0; '
    'for p in $(tagged); do kill -"$1" "$p" 2>/dev/null; done; }; '
)


# The rendezvous store, run by the node that hosts the rendezvous beside its torchrun, in the
# job's process group. torchrun's own host agent closes the store as it exits, while the other
# nodes' agents are still shutting the rendezvous down through it ("recvVector failed", C++
# frames, "failed to shutdown the rendezvous" on every other node). This store outlives its
# node's torchrun until the job's group is stopped (the supervisor does that once every node
# has ended), or for at most `grace` seconds, so no node's shutdown finds it gone.
RDZV_STORE = r"""
import os, sys, time
from datetime import timedelta
from torch.distributed import TCPStore
host, port, grace, done = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
store = TCPStore(host, port, is_master=True, wait_for_workers=False,
                 timeout=timedelta(seconds=60))
while not os.path.exists(done):
    time.sleep(0.2)
time.sleep(grace)
"""


def start_job(node: Node, job_id: str, argv: list[str], env: dict[str, str],
              store: list[str] | None = None) -> str:
    """Start `argv` in its own session in the background; print the group id.

    The group leader records its pid as `pgid`, and the exit code of `argv` as
    `exit_code` when it ends, both atomically, in the node's job directory.
    Output goes to `output.log` there, so a dropped SSH session loses nothing;
    the exit marker is appended to it last, so a reader that stops at the
    marker has read every line. `store` (argv) runs beside it in the same group,
    with the exit-code path as its last argument (`RDZV_STORE`).
    """
    d = node_job_dir(node, job_id)
    bad = [k for k in env if not ENV_KEY.match(k)]
    if bad:
        raise ValueError(f"not environment variable names: {bad}")
    tags = {"UGRO_JOB_ID": job_id, "UGRO_NODE": node.name}
    store_line = f'{join(store)} "$0"' if store else ""
    exports = " ".join(f"{k}={q(v)}" for k, v in sorted({**env, **tags}.items()))
    wrapper = (
        'echo $$ >"$0/pgid.tmp" && mv "$0/pgid.tmp" "$0/pgid"; '
        's=$1; shift; [ -z "$s" ] || { sh -c "$s" "$0/exit_code" >"$0/store.log" 2>&1 & }; '
        '"$@" >"$0/output.log" 2>&1 </dev/null; c=$?; '
        'echo $c >"$0/exit_code.tmp"; mv "$0/exit_code.tmp" "$0/exit_code"; '
        f"printf '\\n{_MARKER_PRINTF} %s\\n' $c >>\"$0/output.log\""
    )
    return in_project(
        node,
        f"D={q(d)}; "
        'if [ -e "$D/pgid" ]; then echo "job already started here" >&2; exit 17; fi; '
        'mkdir -p "$D" && '
        f"export {exports} && "
        f'export UGRO_JOB_DIR="$PWD"/{q(job_path(job_id))} '
        f'UGRO_METRICS_FILE="$PWD"/{q(job_path(job_id, "metrics.jsonl"))} && '

        f'{{ nohup setsid sh -c {q(wrapper)} "$PWD/$D" {q(store_line)} {join(argv)} '
        ">/dev/null 2>&1 </dev/null & }; "
        'i=0; while [ ! -s "$D/pgid" ] && [ $i -lt 200 ]; do sleep 0.02; i=$((i+1)); done; '
        'cat "$D/pgid"',
    )


def watch_job(node: Node, job_id: str, poll: float = 0.2) -> str:
    """Stream the job's output from the start through its exit marker.

    The marker carries the exit code, `killed` when the group died without
    writing one, or `missing` when the job never started here. The loop sends
    whatever the file gained since the last round in one piece (few, large SSH
    packets, whatever the line rate) and stops only once it has sent the
    marker, so no line is lost however far behind the reader is. When the
    group is gone and its wrapper wrote no marker, the loop appends one.
    """
    d = node_job_dir(node, job_id)
    f = '"$D/output.log"'
    return in_project(
        node,
        f"D={q(d)}; "
        f'if [ ! -e "$D/pgid" ]; then printf "{_MARKER_PRINTF} missing\\n"; exit 0; fi; '
        f'P=$(cat "$D/pgid"); M=$(printf "{_MARKER_PRINTF}")' + _ALIVE + "\n"
        "off=0; end=0; "
        "while :; do "
        # Decide "finished" before measuring: what was written before it is sent below.
        '  [ -e "$D/exit_code" ] || ! alive && end=$((end+1)); '
        f"  size=$(wc -c <{f} 2>/dev/null || echo 0); "
        f'  if [ "$size" -gt "$off" ]; then tail -c +$((off+1)) {f} | head -c $((size-off)); '
        "    off=$size; fi; "
        '  if [ $end -gt 0 ]; then '
        # The marker must be among the bytes already sent, not just in the file.
        f"    s0=$((size-{_MARKER_SPAN})); [ $s0 -lt 1 ] && s0=1; "
        f'    tail -c +$s0 {f} 2>/dev/null | head -c $((size-s0+1)) | grep -q "$M" && break; '
        # Gone without a marker (killed, or died between exit code and marker):
        # write it after a moment's grace for a wrapper still finishing.
        '    if [ $end -gt 3 ] && ! alive; then '
        '      C=$(cat "$D/exit_code" 2>/dev/null) || C=killed; '
        f"      printf '\\n%s %s\\n' \"$M\" \"${{C:-killed}}\" >>{f}; fi; "
        "  fi; "
        f"  sleep {poll}; "
        "done",
    )


def job_state(node: Node, job_id: str) -> str:
    """Print `pgid=… exit=… alive=0|1 ended=… stopped=… metrics=…` for the job on this node.

    `ended` is when the exit code was written (seconds since the epoch; empty while it
    runs), `stopped` how many of its processes are stopped (SIGSTOP: hung for good),
    `metrics` when the job's metrics.jsonl last changed here (empty when it has none): a
    script that logs metrics without printing is not silent.
    """
    d = node_job_dir(node, job_id)
    return in_project(
        node,
        f"D={q(d)}; J={q(job_id)}; N={q(node.name)}; "
        'P=$(cat "$D/pgid" 2>/dev/null); E=$(cat "$D/exit_code" 2>/dev/null)' + _ALIVE + _TAGGED
        + "\nA=0; if alive || [ -n \"$(tagged)\" ]; then A=1; fi; "
        'T=$(stat -c %Y "$D/exit_code" 2>/dev/null); '
        f'W=$(stat -c %Y {q(job_path(job_id, "metrics.jsonl"))} 2>/dev/null); S=0; '
        'for p in $(tagged); do read -r l 2>/dev/null <"/proc/$p/stat" || continue; '
        'set -- ${l##*) }; [ "$1" = T ] && S=$((S+1)); done; '
        'echo "pgid=$P exit=$E alive=$A ended=$T stopped=$S metrics=$W"',
    )


def kill_job(node: Node, job_id: str, grace: float = 3.0) -> str:
    """Stop the job's process group and every process tagged with its id.

    SIGTERM first (torchrun forwards it to its workers), SIGKILL after `grace`
    seconds. Prints `stopped` or `still-alive`.
    """
    d = node_job_dir(node, job_id)
    ticks = max(1, int(grace * 10))
    return in_project(
        node,
        f"D={q(d)}; J={q(job_id)}; N={q(node.name)}; "
        'P=$(cat "$D/pgid" 2>/dev/null)' + _ALIVE + _TAGGED + "\n" + _SIGNALS
        + _stop(ticks, "if any; then echo still-alive; else echo stopped; fi"),
    )


def ranks_started(node: Node, job_id: str) -> str:
    """Print how many of the job's ranks (torchrun workers) run on this node, and
    `ended` if the node's launch is already over (an exit code is written)."""
    d = node_job_dir(node, job_id)
    return in_project(
        node,
        f"D={q(d)}; J={q(job_id)}; N={q(node.name)}" + _TAGGED + "\n"
        '[ -e "$D/exit_code" ] && { echo ended; exit 0; }; n=0; '
        "for p in $(tagged); do "
        "  grep -qz '^LOCAL_RANK=' /proc/$p/environ 2>/dev/null && n=$((n+1)); "
        'done; echo "$n"',
    )


FIND_MODULE = (
    "import importlib.util, sys\n"
    "try:\n    found = importlib.util.find_spec(sys.argv[1]) is not None\n"
    "except (ImportError, ValueError):\n    found = False\n"
    "sys.exit(0 if found else 3)"
)


def has_script(node: Node, script: str | None, module: str | None) -> str:
    """Exit 0 when the training script (a project file, or a module the node's Python finds
    from its project path) is there; 3 when it is not."""
    if module is not None:
        return in_project(node, join(node.python.argv() + ["-c", FIND_MODULE, module]))
    return in_project(node, f"test -f {q(script)} || exit 3")


SCRIPT_MARK = "UGRO_SCRIPT"
PORTS_MARK = "UGRO_PORTS"


def preflight_checks(node: Node, script: str | None, module: str | None, ports: bool) -> str:
    """A launch's questions to a node, asked right after its probe (`probe(then=...)`):
    `UGRO_SCRIPT <has_script's exit status>`, and with `ports` the listening ports after a
    `UGRO_PORTS` line."""
    line = f'( {has_script(node, script, module)} ); echo "{SCRIPT_MARK} $?"'
    return line + (f"; echo {PORTS_MARK}; {listening_ports(node)}" if ports else "")


def read_file(node: Node, relpath: str) -> str:
    return in_project(node, f"cat {q(relpath)}")


def job_path(job_id: str, relpath: str = "") -> str:
    """A path in a job's output directory on a node (the script's checkpoints, metrics)."""
    return f"data/experiments/{job_id}" + (f"/{relpath}" if relpath else "")


def list_files(node: Node, relpath: str) -> str:
    """Print the names in a project directory, one a line; nothing when it does not exist."""
    return in_project(node, f"{{ ls -1 {q(relpath)} 2>/dev/null || true; }}")


def make_project_dirs(node: Node) -> str:
    return f"mkdir -p {rpath(node.project_path)}/data/experiments"


def listening_ports(node: Node) -> str:
    """Print the TCP ports something listens on, one hex number a line (from /proc)."""
    return (
        "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | "
        "awk '$4 == \"0A\" { split($2, a, \":\"); print a[2] }' | sort -u"
    )


def kill_all_jobs(node: Node, grace: float = 3.0) -> str:
    """Stop every UGRO job still running on this node, found from its job directories.

    For `inv reset`: it needs no record on the control node, only what each
    job left on the node (its `pgid`, and no `exit_code` yet). Prints one line
    per job it stopped.
    """
    ticks = max(1, int(grace * 10))
    return in_project(
        node,
        f"N={q(node.name)}" + _ALIVE + _TAGGED + "\n" + _SIGNALS
        + f"for D in data/experiments/*/nodes/{q(node.name)}; do "
        '  [ -e "$D/pgid" ] && [ ! -e "$D/exit_code" ] || continue; '
        '  P=$(cat "$D/pgid"); J=${D#data/experiments/}; J=${J%%/*}; '
        "  any || continue; "
        + _stop(ticks, 'if any; then echo "$J still-alive"; else echo "$J stopped"; fi; ')
        + "done; true",
    )


def job_output(node: Node, job_id: str) -> str:
    """Print the job's raw output on this node (torchrun's, with its `[rankN]:` prefixes)."""
    return read_file(node, f"{node_job_dir(node, job_id)}/output.log")


def node_job_dirs(node: Node) -> str:
    """Print this node's own job directories, newest first; nothing when it has none."""
    return in_project(
        node, f"{{ ls -1dt data/experiments/*/nodes/{q(node.name)} 2>/dev/null || true; }}"
    )


# -- sync: rsync over SSH, environment installs, the environment fingerprint --

NO_RSYNC = "ugro: rsync is not installed on this node"
NO_PIXI = "ugro: pixi is not installed on this node"
RSYNC_IO_TIMEOUT = 120  # seconds without any data before rsync gives up on a node


def ssh_option(value) -> str:
    """A value for `ssh -o Key=VALUE`: ssh expands %-tokens there and splits at spaces."""
    value = str(value).replace("%", "%%")
    if any(ch in value for ch in " \t\n'\"\\"):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def ssh_argv(node: Node, known_hosts: Path, timeout: float) -> list[str]:
    """OpenSSH as UGRO connects (port, key, pinned host keys), never prompting.

    `-o IdentityFile=` rather than `-i`: ssh reads `-i`'s path raw but expands
    %-tokens in it afterwards, so no quoting makes a `%` in it work.
    """
    argv = ["ssh", "-p", str(node.port)]
    if node.identity_file:
        argv += ["-o", f"IdentityFile={ssh_option(node.identity_file)}"]
    return argv + [
        "-o", f"UserKnownHostsFile={ssh_option(known_hosts)}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={max(1, round(timeout))}",
    ]


def ssh_transport(node: Node, known_hosts: Path, timeout: float) -> str:
    """rsync's `-e`, which rsync splits into words as a shell would."""
    return join(ssh_argv(node, known_hosts, timeout))


def ssh(node: Node, known_hosts: Path, timeout: float, command: str) -> list[str]:
    """The argv that runs `command` on the node over the same ssh as rsync's."""
    return ssh_argv(node, known_hosts, timeout) + ["--", f"{node.user}@{node.host}", command]


def free_space(node: Node) -> str:
    """`df -Pk` for the project path, or its nearest directory that exists."""
    return (
        f"d={rpath(node.project_path)}; "
        'while [ ! -d "$d" ]; do d=$(dirname -- "$d"); done; df -Pk -- "$d"'
    )


def rsync_dest(node: Node) -> str:
    """`user@host:path/` for rsync; a `~/x` project path is `x`, relative to the login's home."""
    path = node.project_path
    if path == "~" or path == "~/":
        path = "."
    elif path.startswith("~/"):
        path = path[2:]
    host = f"[{node.host}]" if ":" in node.host else node.host
    return f"{node.user}@{host}:{path if path.endswith('/') else path + '/'}"


def rsync_receiver(node: Node, create: bool) -> str:
    """rsync's `--rsync-path`: say plainly when rsync is missing; make the project path."""
    mkdir = f"mkdir -p {rpath(node.project_path)} && " if create else ""
    return (
        f"command -v rsync >/dev/null 2>&1 || {{ echo {q(NO_RSYNC)} >&2; exit 127; }}; "
        f"{mkdir}exec rsync"
    )


def rsync(node: Node, source: Path, filters: list[str], *, known_hosts: Path, timeout: float,
          dry_run: bool = False, delete: bool = False) -> list[str]:
    """The rsync argv (run on the control node) that copies `source`'s selection to the node.

    Every argument is its own argv word; the two strings a shell or rsync splits
    (`-e`, `--rsync-path`) are quoted. `--protect-args` keeps the node's shell
    away from the paths, and `--no-human-readable` keeps --stats plain digits.
    """
    argv = [
        "rsync", "--recursive", "--links", "--perms", "--times",
        "--itemize-changes", "--stats", "--no-human-readable", f"--timeout={RSYNC_IO_TIMEOUT}",
        *filters,
    ]
    if dry_run:
        argv.append("--dry-run")
    if delete:
        argv.append("--delete")
    src = str(source).rstrip("/") + "/"
    if node.local:
        return argv + [src, node.project_path.rstrip("/") + "/"]
    return argv + [
        "--protect-args",
        "-e", ssh_transport(node, known_hosts, timeout),
        f"--rsync-path={rsync_receiver(node, create=not dry_run)}",
        src, rsync_dest(node),
    ]


def pixi_install(node: Node) -> str:
    """Install the node's pixi environment exactly as pixi.lock says."""
    return (
        f"command -v pixi >/dev/null 2>&1 || {{ echo {q(NO_PIXI)} >&2; exit 127; }}; "
        + in_project(node, join(["pixi", "install", "--frozen", "-e", node.python.pixi_env]))
    )


def venv_install(node: Node, requirements: str, find_links: str | None = None,
                 no_index: bool = False) -> str:
    """Create the node's venv unless it exists, then pip-install the locked requirements.

    The venv sees the system's site-packages, so a system-wide torch of the
    locked version is used as it is instead of being downloaded again. pip
    comes from there too when it can; ensurepip only when it cannot.
    """
    venv = rpath(node.python.venv.rstrip("/") or ".")
    py = f"{venv}/bin/python"
    pip = ["-m", "pip", "install", "--disable-pip-version-check", "-r", requirements]
    if no_index:
        pip.append("--no-index")
    if find_links:
        pip += ["--find-links", find_links]
    return in_project(
        node,
        f"{{ [ -x {py} ] || {rpath(node.python.command)} -m venv --system-site-packages "
        f"--without-pip {venv}; }} && "
        f"{{ {py} -m pip --version >/dev/null 2>&1 || {py} -m ensurepip >/dev/null; }} && "
        f"{py} {join(pip)}",
    )


ENV_PREFIX = "UGRO_ENV "
# Runs with the node's Python (any 3.8+), from its project path: the lock file's
# sha256, NCCL's version when pip installed it, and with --packages every
# installed distribution as name==version (what `pip freeze` lists). Package
# metadata only, so nothing heavy is imported.
ENV_PROBE = r"""
import hashlib, json, re, sys
from importlib import metadata
try:
    with open(sys.argv[1], "rb") as f:
        lock = hashlib.sha256(f.read()).hexdigest()
except OSError:
    lock = None
found = {}
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    if name:
        found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)
nccl = [v for k, v in sorted(found.items()) if k.startswith("nvidia-nccl")]
report = {"lock": lock, "nccl": nccl[0] if nccl else None}
if "--packages" in sys.argv[2:]:
    tools = {"pip", "setuptools", "wheel", "distribute"}
    report["packages"] = sorted(k + "==" + v for k, v in found.items() if k not in tools)
print("UGRO_ENV " + json.dumps(report), flush=True)
"""


def env_fingerprint(node: Node, lock: str, packages: bool = False) -> str:
    """Print the node's environment fingerprint (`ENV_PROBE`), from its project path.

    A node never synced has no project path: its Python is still fingerprinted
    (from the home directory), with no lock file.
    """
    argv = node.python.argv() + ["-c", ENV_PROBE]
    flag = " --packages" if packages else ""
    return (
        f"if cd {rpath(node.project_path)} 2>/dev/null; then L={q(lock)}; else cd; L=; fi; "
        f'{join(argv)} "$L"{flag}'
    )


# -- monitor: one cheap sample of a node (shell, /proc, df, nvidia-smi; no Python start) --
MONITOR_MARK = "UGRO_MON"
GPU_QUERY = "index,uuid,name,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw"


def monitor_sample(node: Node) -> str:
    """Print load, memory, the project path's free disk and every GPU, each after a marker line.

    `gpu-exit` carries nvidia-smi's exit status, or `none` when the node has no nvidia-smi.
    """
    mark = q(MONITOR_MARK)
    return (
        f"echo {mark} load; cat /proc/loadavg; "
        f"echo {mark} mem; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo; "
        f"echo {mark} disk; {free_space(node)}; "
        f"echo {mark} gpu; if command -v nvidia-smi >/dev/null 2>&1; then "
        f"nvidia-smi {q('--query-gpu=' + GPU_QUERY)} --format=csv,noheader,nounits 2>&1; "
        f"echo {mark} gpu-exit $?; else echo {mark} gpu-exit none; fi"
    )
