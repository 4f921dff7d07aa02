"""Making nodes alike: rsync over SSH, environment installs, the environment fingerprint."""

from __future__ import annotations

from pathlib import Path

from ..config import Node
from .shell import in_project, join, q, rpath

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
