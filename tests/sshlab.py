"""A lab of real OpenSSH daemons on loopback addresses, for tests and benchmarks.

Each node is its own `sshd -D` on 127.0.0.(2+i) with its own config, host key,
authorized key and directory (its project path lives there). Nodes that "have"
GPUs get a stand-in `nvidia-smi` first on their PATH that prints the real
tool's CSV format. The lab writes the matching cluster file and known_hosts,
and stops exactly the daemons it started. Nothing here leaves 127.0.0.0/8.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

# What the real `nvidia-smi --query-gpu=index,name,memory.total,memory.used,
# utilization.gpu,temperature.gpu,driver_version --format=csv,noheader,nounits` prints.
GPU_CSV = {
    "rtx4070": ["0, NVIDIA GeForce RTX 4070, 8188, 415, 3, 38, 550.54.14"],
    "rtx3070ti": ["0, NVIDIA GeForce RTX 3070 Ti, 8192, 1021, 17, 45, 550.54.14"],
    "2x3090": [
        "0, NVIDIA GeForce RTX 3090, 24576, 20113, 98, 71, 535.183.01",
        "1, NVIDIA GeForce RTX 3090, 24576, 1, 0, 33, 535.183.01",
    ],
}
# The same GPUs as the monitor asks for them: `--query-gpu=index,uuid,name,memory.total,
# memory.used,utilization.gpu,temperature.gpu,power.draw --format=csv,noheader,nounits`.
GPU_MONITOR_CSV = {
    "rtx4070": ["0, GPU-5b3a2f0e-7c1d-4e8a-9f6b-0a1b2c3d4e50, NVIDIA GeForce RTX 4070, 8188, "
                "415, 3, 38, 14.52"],
    "rtx3070ti": ["0, GPU-0c9e8d7f-6a5b-4c3d-2e1f-0a9b8c7d6e51, NVIDIA GeForce RTX 3070 Ti, "
                  "8192, 1021, 17, 45, 31.07"],
    "2x3090": [
        "0, GPU-e1d2c3b4-a596-4788-9a0b-1c2d3e4f5a52, NVIDIA GeForce RTX 3090, 24576, 20113, "
        "98, 71, 342.18",
        "1, GPU-f0e1d2c3-b4a5-4687-8a9b-0c1d2e3f4a53, NVIDIA GeForce RTX 3090, 24576, 1, 0, 33, "
        "[N/A]",
    ],
}
SMI_BROKEN = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous_port() -> int:
    """A free port for a job's rendezvous store, below the kernel's ephemeral range.

    The store binds every address. A port from the ephemeral range can meanwhile become the
    local end of any outgoing connection (an SSH session of another test), and the store's
    bind then fails with EADDRINUSE: a busy test run showed it. Real clusters use 29500.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(20000, max(20001, low - 100))  # room for `next-free`'s search
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range for a rendezvous")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class LabNode:
    name: str
    host: str
    port: int
    dir: Path
    gpus: str | None = None  # a GPU_CSV key, "broken", or None for no nvidia-smi
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def project(self) -> Path:
        return self.dir / "project"

    @property
    def bin(self) -> Path:
        return self.dir / "bin"

    @property
    def gpu_count(self) -> int:
        return len(GPU_CSV.get(self.gpus or "", []))


class Lab:
    """N sshd daemons; `start()` them, `cluster_file()` describes them, `stop()` ends them."""

    def __init__(self, root: Path, gpus: list[str | None]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = self.root / "client_key"
        self.known_hosts = self.root / "known_hosts"
        self.nodes = [
            LabNode(f"lab{i}", f"127.0.0.{2 + i}", 0, self.root / f"lab{i}", g)
            for i, g in enumerate(gpus)
        ]

    # -- setup --------------------------------------------------------------
    def start(self) -> Lab:
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privsep dir
        if not self.key.exists():
            keygen("-t", "ed25519", "-N", "", "-q", "-f", str(self.key))
        for node in self.nodes:
            self._prepare(node)
            self.start_node(node)
        self.write_known_hosts()
        return self

    def _prepare(self, node: LabNode) -> None:
        node.project.mkdir(parents=True, exist_ok=True)
        node.bin.mkdir(parents=True, exist_ok=True)
        hostkey = node.dir / "ssh_host_ed25519_key"
        if not hostkey.exists():
            keygen("-t", "ed25519", "-N", "", "-q", "-f", str(hostkey))
        shutil.copy(self.key.with_suffix(".pub"), node.dir / "authorized_keys")
        self.set_gpus(node, node.gpus)

    def set_gpus(self, node: LabNode, gpus: str | None) -> None:
        node.gpus = gpus
        smi = node.bin / "nvidia-smi"
        smi.unlink(missing_ok=True)
        if gpus is None:
            return
        if gpus == "broken":
            body = f"echo {SMI_BROKEN!r}\nexit 9\n"
        else:
            lines = "\n".join(GPU_CSV[gpus])
            monitor = "\n".join(GPU_MONITOR_CSV.get(gpus, []))
            body = (
                'case "$*" in *--query-gpu=index,name,memory.total,memory.used,utilization.gpu,'
                "temperature.gpu,driver_version*--format=csv,noheader,nounits*) ;;\n"
                "  *--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu,"
                "temperature.gpu,power.draw*--format=csv,noheader,nounits*)\n"
                f"    cat <<'EOF'\n{monitor}\nEOF\n    exit 0;;\n"
                '  *) echo "stand-in nvidia-smi: unsupported arguments: $*" >&2; exit 2;; esac\n'
                f"cat <<'EOF'\n{lines}\nEOF\n"
            )
        smi.write_text("#!/bin/sh\n" + body)
        smi.chmod(0o755)

    def _sshd_config(self, node: LabNode) -> Path:
        path_env = ":".join([str(node.bin), os.path.dirname(sys.executable),
                             "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"])
        setenv = " ".join(f"{k}={v}" for k, v in {"PATH": path_env, **node.env}.items())
        cfg = node.dir / "sshd_config"
        cfg.write_text(f"""\
ListenAddress {node.host}:{node.port}
HostKey {node.dir / 'ssh_host_ed25519_key'}
PidFile {node.dir / 'sshd.pid'}
AuthorizedKeysFile {node.dir / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PrintMotd no
SetEnv {setenv}
MaxStartups 200:30:400
MaxSessions 100
LogLevel ERROR
""")
        return cfg

    def start_node(self, node: LabNode, timeout: float = 10.0) -> None:
        if node.port == 0:
            node.port = free_port(node.host)
        cfg = self._sshd_config(node)
        log = (node.dir / "sshd.log").open("ab")
        node.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not port_open(node.host, node.port):
            if node.proc.poll() is not None:
                raise RuntimeError(f"sshd for {node.name} exited: "
                                   f"{(node.dir / 'sshd.log').read_text()[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd for {node.name} did not listen on {node.port}")
            time.sleep(0.02)

    def stop_node(self, node: LabNode) -> None:
        if node.proc and node.proc.poll() is None:
            node.proc.terminate()
            try:
                node.proc.wait(5)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        node.proc = None

    def new_host_key(self, node: LabNode) -> None:
        """Give the node a different host key, as a reinstall (or an attacker) would."""
        self.stop_node(node)
        for f in node.dir.glob("ssh_host_ed25519_key*"):
            f.unlink()
        keygen("-t", "ed25519", "-N", "", "-q", "-f", str(node.dir / "ssh_host_ed25519_key"))
        self.start_node(node)

    def stop(self) -> None:
        for node in self.nodes:
            self.stop_node(node)

    # -- what clients need -------------------------------------------------
    def host_key_line(self, node: LabNode) -> str:
        kind, blob = (node.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        return f"[{node.host}]:{node.port} {kind} {blob}\n"

    def write_known_hosts(self, nodes: list[LabNode] | None = None) -> None:
        nodes = self.nodes if nodes is None else nodes
        self.known_hosts.write_text("".join(self.host_key_line(n) for n in nodes))

    def node_config(self, node: LabNode, **overrides) -> dict:
        cfg = {
            "name": node.name,
            "ip": node.host,
            "ssh_port": node.port,
            "user": os.environ.get("USER") or _whoami(),
            "identity_file": str(self.key),
            "project_path": str(node.project),
            "python": {"strategy": "system", "command": sys.executable},
            "gpus": node.gpu_count,
            "cpu_procs": 1,
            "env": {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"},
        }
        cfg.update(overrides)
        return cfg

    def cluster_dict(self, nodes: list[LabNode] | None = None, *, master_port: int | None = None,
                     timeout: float = 5.0, node_overrides: dict | None = None,
                     rdzv_backend: str | None = None) -> dict:
        """The lab as a cluster file's data; `rdzv_backend` None leaves UGRO's default."""
        nodes = self.nodes if nodes is None else nodes
        over = node_overrides or {}
        configs = [self.node_config(n, **over.get(n.name, {})) for n in nodes]
        return {
            "cluster": {
                "name": "lab",
                "master_port": master_port or rendezvous_port(),
                **({"rdzv_backend": rdzv_backend} if rdzv_backend else {}),
                "health_timeout": timeout,
                "known_hosts": str(self.known_hosts),
            },
            "master": configs[0],
            "workers": configs[1:],
        }

    def cluster_file(self, path: Path, nodes: list[LabNode] | None = None, **kwargs) -> Path:
        path.write_text(yaml.safe_dump(self.cluster_dict(nodes, **kwargs), sort_keys=False))
        return path


def keygen(*args: str) -> None:
    subprocess.run(["ssh-keygen", *args], check=True, stdin=subprocess.DEVNULL)


def _whoami() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
