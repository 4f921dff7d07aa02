"""A real Slurm cluster on loopback, for tests: one munged, one slurmctld, two slurmd.

Both nodes (`n1`, `n2`) are this machine: two `slurmd -N <name>` daemons on
their own ports, as Debian's multiple-slurmd build allows. Every file (config,
munge key and socket, state, spool, logs, pid files) lives under the lab's
directory, every daemon listens on 127.0.0.1 only (`NoInAddrAny,
NoCtldInAddrAny`), and clients find the cluster through `SLURM_CONF` alone:
a Slurm client without it falls back to DNS SRV lookups for a controller,
so never run one outside `lab.env()`.

Slurm 22.05 without slurmdbd has no `sacct` ("Slurm accounting storage is
disabled"). A finished job stays visible to `squeue -t all` and `scontrol
show job` for `MinJobAge` seconds (an hour here), and `jobcomp/filetxt`
appends one `Key=Value` line per finished job (JobState, ExitCode) to
`lab.jobcomp` for good.

`stop()` cancels the lab's jobs, ends exactly the daemons it started (by their
pids), then any job step process still carrying this lab's `SLURM_CONF`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURMCTLD = shutil.which("slurmctld") or "/usr/sbin/slurmctld"
SLURMD = shutil.which("slurmd") or "/usr/sbin/slurmd"
MUNGED = shutil.which("munged") or "/usr/sbin/munged"
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")
NODES = ("n1", "n2")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def unavailable() -> str | None:
    """Why the lab cannot run here, or None."""
    missing = [p for p in (SLURMCTLD, SLURMD, MUNGED) if not os.access(p, os.X_OK)]
    missing += [c for c in CLIENTS if not shutil.which(c)]
    if missing:
        return ("Slurm lab needs slurmctld, slurmd, slurm-client and munge "
                f"(apt-get install slurmctld slurmd slurm-client munge); missing: {missing}")
    if os.geteuid() != 0:
        return "Slurm lab needs root: slurmd starts job steps as the submitting user"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detected_cpus() -> int:
    """The CPU count slurmd sees (a node configured with more is drained)."""
    out = subprocess.run([SLURMD, "-C"], capture_output=True, text=True, check=True,
                         env=_clean_env(), stdin=subprocess.DEVNULL).stdout
    m = re.search(r"\bCPUs=(\d+)", out)
    return int(m.group(1)) if m else (os.cpu_count() or 1)


def _clean_env() -> dict[str, str]:
    # A test run inside a Slurm job must not leak that job's settings into the lab.
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}


class SlurmLab:
    """`start()` a two-node Slurm on loopback, run clients with `run()`, `stop()` it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.jobcomp = self.logs / "jobcomp.txt"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.nodes = NODES
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**_clean_env(), "SLURM_CONF": str(self.conf), **(extra or {})}

    def run(self, *argv: str, check: bool = True, timeout: float = 30,
            env: dict[str, str] | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
        """A Slurm client command against this lab."""
        proc = subprocess.run(list(argv), env=self.env(env), cwd=cwd or self.root,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                               f"{proc.stdout}{proc.stderr}")
        return proc

    def sh(self, command: str, **kwargs) -> subprocess.CompletedProcess:
        """A shell command line (as the backend would run on a login node) against this lab."""
        return self.run("bash", "-c", command, **kwargs)

    def state(self, slurm_id: str) -> str:
        out = self.run("squeue", "-h", "-t", "all", "-j", slurm_id, "-o", "%T").stdout
        return out.strip()

    def wait(self, slurm_id: str, states: tuple[str, ...] = FINISHED,
             timeout: float = 60) -> str:
        """Poll until the job is in one of `states`; return that state."""
        deadline = time.monotonic() + timeout
        while (state := self.state(slurm_id)) not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {slurm_id} still {state}, not {states}")
            time.sleep(0.1)
        return state

    # -- setup --------------------------------------------------------------
    def start(self, timeout: float = 30) -> SlurmLab:
        for d in ("munge", "state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._write_munge_key()
        self._write_conf()
        try:
            self._start_munged(timeout)
            self._spawn("slurmctld", [SLURMCTLD, "-D", "-c", "-f", str(self.conf)])
            for name in self.nodes:
                self._spawn(f"slurmd-{name}", [SLURMD, "-D", "-N", name, "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_munge_key(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

    def _write_conf(self) -> None:
        r = self.root
        host = socket.gethostname().split(".")[0]
        cpus = detected_cpus()
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={cpus} RealMemory=500 State=UNKNOWN"
            for n in self.nodes
        )
        (r / "plugstack.conf").write_text("")
        self.conf.write_text(f"""\
ClusterName=ugrolab
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
PlugStackConfig={r / 'plugstack.conf'}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}
SlurmdPidFile={r / 'run'}/slurmd-%n.pid
SlurmctldLogFile={self.logs / 'slurmctld.log'}
SlurmdLogFile={self.logs}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/linear
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
{nodes}
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.out").open("ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                env=self.env())
        log.close()
        self.procs[name] = proc
        return proc

    def _start_munged(self, timeout: float) -> None:
        m = self.root / "munge"
        # --force: munged wants every directory above its socket open to all,
        # and pytest's temporary directories are private to their owner.
        self._spawn("munged", [
            MUNGED, "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
            f"--seed-file={m / 'munged.seed'}", f"--log-file={self.logs / 'munged.log'}",
        ])
        self._until(lambda: self.munge_socket.exists(), timeout, "munged")

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10).stdout
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            return all(states.get(n) == "idle" for n in self.nodes)

        self._until(idle, timeout, "the nodes to be idle")

    def _until(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"Slurm lab: waiting for {what}: "
                                   f"{'exited: ' + str(dead) if dead else 'timed out'}\n"
                                   + self.log_tail())
            time.sleep(0.1)

    def log_tail(self, lines: int = 8) -> str:
        out = []
        for f in sorted(self.logs.glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"== {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    # -- teardown -----------------------------------------------------------
    def stop(self) -> None:
        ctld = self.procs.get("slurmctld")
        if ctld and ctld.poll() is None:
            self._cancel_all()
        # Daemons first, munged last: slurmd and slurmctld need it to shut down cleanly.
        order = [n for n in self.procs if n != "munged"] + ["munged"]
        for name in order:
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._kill_strays()

    def _cancel_all(self, timeout: float = 10) -> None:
        """Cancel every unfinished job and give the steps a moment to end."""

        def unfinished() -> list[str]:
            return self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()

        ids = unfinished()
        if ids:
            self.run("scancel", *ids, check=False, timeout=10)
        deadline = time.monotonic() + timeout
        while ids and time.monotonic() < deadline:
            time.sleep(0.1)
            ids = unfinished()

    def _kill_strays(self) -> None:
        """SIGKILL job step processes (slurmstepd and its tasks) left by this lab.

        slurmstepd detaches from slurmd, so ending the daemons does not end
        it; it and every task it started carry this lab's SLURM_CONF.
        """
        tag = f"SLURM_CONF={self.conf}".encode()
        for _ in range(3):
            strays = [pid for pid in _pids() if tag in _environ(pid)]
            if not strays:
                return
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
            and int(p.name) != os.getpid()]


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []
