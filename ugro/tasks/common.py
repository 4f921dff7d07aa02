"""What every task shares: the project root, the cluster file, error handling."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from invoke import Context, Task
from invoke.exceptions import Exit

from ..errors import UgroError

if TYPE_CHECKING:
    from ..config import Cluster, Node


def _project_root() -> Path:
    """The checkout this package sits in (`inv` from a clone), else the current directory
    (the installed `ugro` command, run from a project directory)."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "tasks.py").is_file() else Path.cwd()


ROOT = _project_root()
PROGRAM = "invoke"  # what `--help` re-executes: "invoke", "fabric" or "ugro"
DEFAULTS = {
    "ugro": {
        "cluster": "config/cluster.yaml",
        "data_dir": "data",
        "log_dir": "logs",
        "defaults": "config/training_defaults.yaml",
    }
}


HELP_FLAGS = {"--help", "-h"}


def keep_bytecode() -> None:
    """Let Python cache the package's bytecode as usual.

    Invoke turns caches off (its `--write-pyc` flag) before it runs: before it loads the tasks
    file under `inv`, after the namespace is imported under `ugro`. Left so, every command
    would compile the package from source again (30-80 ms a command, more for a launch).
    PYTHONDONTWRITEBYTECODE or -B still turn the caches off.
    """
    sys.dont_write_bytecode = sys.flags.dont_write_bytecode


def cli(fn):
    """Let a task raise UgroError for one clear line on stderr and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if HELP_FLAGS & {v for v in (*args[1:], *kwargs.values()) if isinstance(v, str)}:
            # Invoke hands `inv cancel --help` to a positional argument as its
            # value; show the help the user asked for instead.
            prog = "fabric" if "fabric.main" in sys.modules else PROGRAM
            os.execv(sys.executable, [sys.executable, "-m", prog, "--help",
                                      fn.__name__.replace("_", "-")])
        keep_bytecode()  # for the modules the task body imports
        try:
            return fn(*args, **kwargs)
        except UgroError as exc:
            raise Exit(f"ugro: {exc}", code=exc.exit_code) from None
        except OSError as exc:
            # The control node's own files (a full disk, a read-only or foreign directory):
            # store.py names most; this catches the rest, still as one line with the path.
            where = f"{exc.filename}: " if exc.filename else ""
            raise Exit(f"ugro: {where}{exc.strerror or exc}", code=1) from None

    return wrapper


class LetterFlags(Task):
    """A task whose automatic short flags are letters only: Invoke would give an option whose
    first letters are taken the flag `--` (launch's `--on-stall`, shown as `--=STRING`)."""

    def arg_opts(self, name, default, taken_names):
        return super().arg_opts(name, default, taken_names | {"-"})


def positive(option: str, value, default: float | None = None) -> float | None:
    """A command-line number that must be finite and > 0 (seconds, a learning rate)."""
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UgroError(f"--{option}: not a number: {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise UgroError(f"--{option}: must be a finite number > 0, got {value!r}")
    return number


def setting(c: Context, key: str) -> str:
    return c.config.get("ugro", {}).get(key) or DEFAULTS["ugro"][key]


def project_path(c: Context, key: str) -> Path:
    p = Path(setting(c, key)).expanduser()
    return p if p.is_absolute() else ROOT / p


def cluster_of(c: Context) -> Cluster:
    from ..config import load_cluster  # yaml: paid by the tasks that read the cluster

    return load_cluster(setting(c, "cluster"), ROOT)


def is_connection(c: Context) -> bool:
    """True under `fab -H host`: the task was handed a Connection to one host."""
    return type(c).__module__.startswith("fabric")


def host_node(c: Context, cluster: Cluster) -> Node:
    """The cluster node a `fab -H NAME` connection means (by node name or address)."""
    host = getattr(c, "original_host", None) or c.host
    for n in cluster.nodes + (cluster.master,):
        if host in (n.name, n.host, f"{n.user}@{n.host}", f"{n.host}:{n.port}"):
            return n
    known = ", ".join(n.name for n in cluster.nodes)
    raise UgroError(f"host '{host}' is not a node of cluster {cluster.name} ({known})")


def target_nodes(c: Context, cluster: Cluster, nodes: str | None) -> tuple[Node, ...]:
    if is_connection(c):
        return (host_node(c, cluster),)
    return cluster.select(nodes)


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
