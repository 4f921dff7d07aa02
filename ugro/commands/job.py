"""A job's processes on a node: start, stream, ask, stop; its files there."""

from __future__ import annotations

from ..config import Node
from ..fields import ENV_KEY_RE as ENV_KEY
from .shell import MARKER_PRINTF, MARKER_SPAN, in_project, join, q, rpath


def node_job_dir(node: Node, job_id: str) -> str:
    """A node's own directory for a job, relative to its project path."""
    return job_path(job_id, f"nodes/{node.name}")


# The group-liveness test is zombie-safe: a finished group leader whose parent
# never reaps it still answers `kill -0`, so when the leader is gone or a
# zombie, read each process's state and process group from /proc. The cheap
# checks come first: this runs in every wait loop. `kill -0 -PGID`, never `kill -0 --
# -PGID`: dash, /bin/sh on Debian, reads `--` as a process id and fails.
_ALIVE = r"""
alive() {
  [ -n "$P" ] || return 1
  kill -0 -"$P" 2>/dev/null || return 1
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
tagged_files() {
  f=$(grep -lzxF "UGRO_JOB_ID=$J" /proc/[0-9]*/environ 2>/dev/null)
  [ -z "$f" ] || grep -lzxF "UGRO_NODE=$N" $f 2>/dev/null
}
tagged() {
  for f in $(tagged_files); do f=${f#/proc/}; echo "${f%/environ}"; done
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
    'sig() { [ -n "$P" ] && kill -"$1" -"$P" 2>/dev/null; [ "$1" = KILL ] || return 0; '
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

# torchrun for the static rendezvous (`python -c TORCHRUN_STATIC <torchrun's options>`).
# There the store lives in node rank 0's agent, and torch's exit barrier lets that agent
# leave, taking the store with it, while the last agent to arrive is still waiting on it
# (pytorch/pytorch#69520): a job that succeeded ends with "Connection reset by peer", a
# traceback and C++ frames on that node. Here every other agent says it has left once the
# barrier is passed, and rank 0's agent looks for that (30 s at most, in naps a signal
# ends) before it ends. An error after the barrier is passed loses nothing and prints
# nothing; a torch without these internals runs plain torchrun. Nothing a shell would
# expand or end early (no single quote, `$`, backtick or backslash): `pixi run` passes its
# arguments through one.
TORCHRUN_STATIC = r"""
import sys, time
from torch.distributed.run import main
try:
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
    from torch.distributed.elastic.multiprocessing import SignalException
    barrier = SimpleElasticAgent._exit_barrier
except (ImportError, AttributeError):
    barrier = None
def leave_last(agent):
    barrier(agent)
    group, store, left = agent._worker_group, agent._store, "ugro/left"
    if group.group_world_size < 2:
        return
    try:
        if group.group_rank == 0:
            until = time.monotonic() + 30
            while not store.check([left]) and time.monotonic() < until:
                time.sleep(0.05)
        elif store.add(left + "/count", 1) == group.group_world_size - 1:
            store.set(left, "1")
    except SignalException:
        raise
    except Exception:
        pass
if barrier is not None:
    SimpleElasticAgent._exit_barrier = leave_last
sys.argv[0] = "torchrun"
main()
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
        f"printf '\\n{MARKER_PRINTF} %s\\n' $c >>\"$0/output.log\""
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


def _state(job_id: str) -> str:
    """`state`: print the job's state on this node as one line (see `job_state`); needs
    `D`, `J`, `N`, `P`, `_ALIVE` and `_TAGGED`, and `R` from `ranks`.

    `ranks` counts the workers torchrun has started here by their log directories
    (`--log-dir .../torchrun`, which `plan` always passes: torchrun makes one per local rank
    in `attempt_N/` just before it starts them, and they stay; the attempt with the most
    counts, should torchrun restart its workers): globs only, so the watcher can look every
    tick while the agents import torch. `state` reads the job's processes' environments
    (`tagged`), which it does every few seconds.
    """
    metrics = q(job_path(job_id, "metrics.jsonl"))
    return (
        '\nranks() { R=0; for ra in "$D"/torchrun/*/attempt_*/; do rn=0; '
        'for rd in "$ra"[0-9]*/; do [ -d "$rd" ] && rn=$((rn+1)); done; '
        '[ $rn -gt $R ] && R=$rn; done; }\n'
        "state() { "
        # While the job runs, the exit code's file does not exist yet: the state starts
        # only `tagged`'s greps and the metrics' stat, not cat and stat for it.
        'E=; T=; if [ -e "$D/exit_code" ]; then { read -r E <"$D/exit_code"; } 2>/dev/null; '
        'T=$(stat -c %Y "$D/exit_code" 2>/dev/null); fi; G=$(tagged); '
        'A=0; if alive || [ -n "$G" ]; then A=1; fi; '
        f"W=$(stat -c %Y {metrics} 2>/dev/null); S=0; "
        'for p in $G; do read -r l 2>/dev/null <"/proc/$p/stat" || continue; '
        'set -- ${l##*) }; [ "$1" = T ] && S=$((S+1)); done; '
        'echo "pgid=$P exit=$E alive=$A ended=$T stopped=$S metrics=$W ranks=$R"; }\n'
    )


def watch_job(node: Node, job_id: str, every: float = 2.0, tick: float = 0.25) -> str:
    """Stream the job's output from the start through its exit marker on stdout, and its
    state (`job_state`'s line) on stderr every `every` seconds while it runs, and at once
    when torchrun has started more of its ranks.

    The marker carries the exit code, `killed` when the group died without writing one,
    or `missing` when the job never started here. One stream is all the control node needs
    to follow a node: its output, and that the node still answers and how the job's
    processes are (no second connection asking).

    The output is followed by one `tail -f`, which looks every `tick` seconds and sends
    what the file gained in one piece (few, large SSH packets whatever the line rate; with
    inotify it would wake, and send a packet, for every write), until the watcher (a loop
    that wakes every `tick` seconds) has seen the job end and its marker in the file, and
    then to the file's end: every byte written before the marker, and the marker, are sent.
    When the group is gone and its wrapper wrote no marker, the watcher appends one. Where
    tail cannot do this (busybox: no `--pid`), a loop sends the file's new bytes every `tick`.
    """
    d = node_job_dir(node, job_id)
    f = '"$D/output.log"'
    ticks = max(1, round(every / tick))
    grace = max(1, round(0.75 / tick))  # ticks a wrapper still finishing has for its marker
    return in_project(
        node,
        f"D={q(d)}; J={q(job_id)}; N={q(node.name)}; "
        f'if [ ! -e "$D/pgid" ]; then printf "{MARKER_PRINTF} missing\\n"; exit 0; fi; '
        f'P=$(cat "$D/pgid"); M=$(printf "{MARKER_PRINTF}")' + _ALIVE + _TAGGED
        + _state(job_id)
        + f'marked() {{ s=$(wc -c <{f}); s=$((s-{MARKER_SPAN})); [ $s -lt 1 ] && s=1; '
        f'tail -c +$s {f} | grep -q "$M"; }}; '
        f": >>{f}; "  # the wrapper may not have opened it yet: follow it from the start
        # bash naps with its own `read -t` on a pipe nobody writes to: no `sleep` started
        # four times a second on every node for as long as the job runs. `command` keeps a
        # shell that cannot (bash before 5.1 as sh: no <(...) in POSIX mode) from exiting
        # on the error, so it falls back to sleep.
        "( if [ -n \"$BASH_VERSION\" ] && "
        "command eval 'command exec 9<> <(:)' 2>/dev/null; then "
        f"nap() {{ read -r -t {tick} -u 9 _; }}; else nap() {{ sleep {tick}; }}; fi; "
        "i=0; end=0; r=; while :; do ranks; "
        f'  if [ $((i % {ticks})) -eq 0 ] || [ "$R" != "$r" ]; then state >&2; r=$R; fi; '
        '  { [ -e "$D/exit_code" ] || ! alive; } && end=$((end+1)); '
        "  if [ $end -gt 0 ]; then marked && break; "
        f"    if [ $end -gt {grace} ] && ! alive; then "
        '      C=$(cat "$D/exit_code" 2>/dev/null) || C=killed; '
        f"      printf '\\n%s %s\\n' \"$M\" \"${{C:-killed}}\" >>{f}; break; fi; fi; "
        "  nap; i=$((i+1)); done ) & K=$!; "
        "if tail ---disable-inotify --pid=$$ -c 0 /dev/null 2>/dev/null; then "
        f"  tail ---disable-inotify --pid=$K -s {tick} -c +1 -f {f}; "
        "else "
        # Decide "over" before measuring: what was written before it is sent below.
        "  off=0; o=; while :; do kill -0 $K 2>/dev/null || o=1; "
        f"    size=$(wc -c <{f}); "
        f'    if [ "$size" -gt "$off" ]; then tail -c +$((off+1)) {f} | head -c $((size-off)); '
        "      off=$size; fi; "
        f'    [ -n "$o" ] && break; sleep {tick}; done; '
        "fi; wait $K",
    )


def job_state(node: Node, job_id: str) -> str:
    """Print `pgid=… exit=… alive=0|1 ended=… stopped=… metrics=… ranks=…` for the job on
    this node.

    `ended` is when the exit code was written (seconds since the epoch; empty while it
    runs), `stopped` how many of its processes are stopped (SIGSTOP: hung for good),
    `metrics` when the job's metrics.jsonl last changed here (empty when it has none): a
    script that logs metrics without printing is not silent. `ranks`: how many workers
    torchrun has started here (see `_state`).
    """
    d = node_job_dir(node, job_id)
    return in_project(
        node,
        f"D={q(d)}; J={q(job_id)}; N={q(node.name)}; "
        'P=$(cat "$D/pgid" 2>/dev/null)' + _ALIVE + _TAGGED + _state(job_id) + "ranks; state",
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
