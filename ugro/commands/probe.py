"""Questions put to a node: the health probe, a launch's preflight, the monitor's sample."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..config import Node
from ..node_probe import GPU_QUERY as GPU_QUERY_PROBE
from .shell import in_project, join, q, rpath

PROBE_SOURCE = (Path(__file__).parent.parent / "node_probe.py").read_text()
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


def listening_ports(node: Node) -> str:
    """Print the TCP ports something listens on, one hex number a line (from /proc)."""
    return (
        "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | "
        "awk '$4 == \"0A\" { split($2, a, \":\"); print a[2] }' | sort -u"
    )


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


def free_space(node: Node) -> str:
    """`df -Pk` for the project path, or its nearest directory that exists."""
    return (
        f"d={rpath(node.project_path)}; "
        'while [ ! -d "$d" ]; do d=$(dirname -- "$d"); done; df -Pk -- "$d"'
    )
