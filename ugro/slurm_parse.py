"""What Slurm's tools print, parsed: job and node records, and UGRO's status for a job state.

Pure functions over text, reading exactly the formats `ugro.slurm`'s command
lines ask for; anything they do not recognise raises `UgroError` naming the
tool and the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UgroError
from .state import JobStatus

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = (
    JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.COMPLETED, JobStatus.FAILED,
    JobStatus.CANCELLED,
)
STATUS = {
    # CONFIGURING: nodes are booting for the job; allocated, but nothing of ours runs yet.
    **dict.fromkeys(("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                     "RESV_DEL_HOLD"), QUEUED),
    # COMPLETING: the processes have ended, the outcome is final once the epilog is done.
    **dict.fromkeys(("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING",
                     "STAGE_OUT"), RUNNING),
    "COMPLETED": COMPLETED,
    # PREEMPTED (without requeue): ended by the scheduler, not by the user.
    **dict.fromkeys(("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                     "SPECIAL_EXIT", "PREEMPTED"), FAILED),
    **dict.fromkeys(("CANCELLED", "REVOKED"), CANCELLED),
}


def status(state: str) -> JobStatus:
    """UGRO's status for a Slurm job state (`CANCELLED by 1000` reads as CANCELLED)."""
    words = state.split()
    base = words[0].rstrip("+") if words else ""
    if base not in STATUS:
        raise UgroError(f"unknown Slurm job state: {state!r}")
    return STATUS[base]


def slurm_id(value: str) -> str:
    """`value` if it is a Slurm job (or step) id, else UgroError."""
    if not re.fullmatch(r"\d+(?:_\d+)?(?:\.\w+)?", str(value)):
        raise UgroError(f"not a Slurm job id: {value!r}")
    return str(value)


@dataclass(frozen=True)
class SlurmJob:
    """One job (or, from sacct, one step: `123.batch`, `123.0`) as Slurm reports it."""

    slurm_id: str
    state: str  # Slurm's, e.g. PENDING, "CANCELLED by 0"
    reason: str | None = None  # why it is pending, e.g. Resources, Priority
    nodelist: str | None = None  # compressed, e.g. gpu[01-04]
    exit_code: int | None = None
    signal: int | None = None

    @property
    def status(self) -> JobStatus:
        return status(self.state)

    @property
    def is_step(self) -> bool:
        return "." in self.slurm_id


@dataclass(frozen=True)
class SlurmNode:
    name: str
    partition: str
    state: str  # sinfo's long form with its flags, e.g. idle, mixed, down*, drained
    cpus: int
    memory_mb: int
    gres: str | None
    reason: str | None

    @property
    def usable(self) -> bool:
        """Up and schedulable: not down, drained, failing, powered off or unresponsive."""
        base = re.match(r"[a-z_]*", self.state).group(0)
        flags = self.state[len(base):]
        return base in {"idle", "mixed", "allocated", "completing", "planned"} and not (
            set(flags) & set("*~#!%")
        )


def parse_submit(text: str) -> str:
    """`sbatch --parsable` prints `123` or `123;cluster`."""
    line = text.strip().split(";")[0]
    if not re.fullmatch(r"\d+", line):
        raise UgroError(f"sbatch: expected a job id, got {text.strip()[:200]!r}")
    return line


def _fields(tool: str, text: str, count: int) -> list[list[str]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|", count - 1)
        if len(parts) != count:
            raise UgroError(f"{tool}: line {n}: expected {count} '|'-separated fields, "
                            f"got {line[:200]!r}")
        rows.append([p.strip() for p in parts])
    return rows


def _none(value: str) -> str | None:
    return None if value in ("", "(null)", "None", "none", "N/A", "None assigned") else value


def _exit(tool: str, value: str) -> tuple[int | None, int | None]:
    """Slurm's `code:signal` pair."""
    if value in ("", "N/A"):
        return None, None
    m = re.fullmatch(r"(\d+):(\d+)", value)
    if not m:
        raise UgroError(f"{tool}: not an exit code: {value!r}")
    return int(m.group(1)), int(m.group(2))


def _job(tool: str, job_id: str, state: str, **kw) -> SlurmJob:
    try:
        slurm_id(job_id)
    except UgroError:
        raise UgroError(f"{tool}: not a Slurm job id: {job_id[:200]!r}") from None
    status(state)  # an unknown state is an error here, not later
    return SlurmJob(job_id, state, **kw)


def parse_squeue(text: str) -> list[SlurmJob]:
    """Output of `squeue()`; a job with no reason to report shows None."""
    return [
        _job("squeue", i, state, reason=_none(reason), nodelist=_none(nodes))
        for i, state, reason, _count, nodes in _fields("squeue", text, 5)
    ]


def parse_sacct(text: str) -> list[SlurmJob]:
    """Output of `sacct()`: the job's row, then one per step."""
    jobs = []
    for i, state, code, nodes in _fields("sacct", text, 4):
        exit_code, sig = _exit("sacct", code)
        jobs.append(_job("sacct", i, state, nodelist=_none(nodes), exit_code=exit_code,
                         signal=sig))
    return jobs


_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_:/]*=")


def parse_scontrol(text: str) -> list[dict[str, str]]:
    """`scontrol show job|node` output (one-line `-o` or the indented form) as records.

    A value may hold spaces (`OS=Linux 6.1.0 #1 SMP`, a `Reason=` text): a
    word without `Key=` in front belongs to the value before it.
    """
    records: list[dict[str, str]] = []
    key = ""
    for word in text.split():
        m = _KEY.match(word)
        if m:
            key, value = word[: m.end() - 1], word[m.end():]
            if key in ("JobId", "NodeName"):
                records.append({})
        if not records:
            raise UgroError(f"scontrol: expected JobId= or NodeName= first, got {word[:200]!r}")
        if m:
            records[-1][key] = value
        else:
            records[-1][key] += " " + word
    return records


def parse_show_job(text: str) -> list[SlurmJob]:
    """`show_job()` output."""
    jobs = []
    for rec in parse_scontrol(text):
        if "JobId" not in rec or "JobState" not in rec:
            raise UgroError(f"scontrol: not a job record: {str(rec)[:200]}")
        code, sig = _exit("scontrol", rec.get("ExitCode", ""))
        jobs.append(_job("scontrol", rec["JobId"], rec["JobState"],
                         reason=_none(rec.get("Reason", "")),
                         nodelist=_none(rec.get("NodeList", "")), exit_code=code, signal=sig))
    return jobs


def parse_sinfo(text: str) -> list[SlurmNode]:
    """`sinfo()` output: one row per node and partition (the default one loses its `*`)."""
    nodes = []
    for name, part, state, cpus, mem, gres, reason in _fields("sinfo", text, 7):
        if not cpus.isdigit() or not mem.isdigit():
            raise UgroError(f"sinfo: {name}: CPUs and memory must be numbers: {cpus!r}, {mem!r}")
        nodes.append(SlurmNode(name, part.rstrip("*"), state, int(cpus), int(mem),
                               _none(gres), _none(reason)))
    return nodes


def parse_exit_codes(text: str) -> dict[str, str]:
    """`node_exit_codes()` output: node -> the exit code it wrote."""
    return {node: code.strip() for node, _, code in
            (line.partition(" ") for line in text.splitlines()) if code.strip()}


def parse_probe_output(text: str) -> dict[str, str]:
    """`probe()` output (`srun -l`: each line `<task>: <text>`, each task's first line
    `UGRO_NODE <node>`): node -> the probe's own lines."""
    tasks: dict[str, list[str]] = {}
    for line in text.splitlines():
        task, _, rest = line.partition(": ")
        tasks.setdefault(task.strip(), []).append(rest)
    return {lines[0].split()[1]: "\n".join(lines[1:]) for lines in tasks.values()
            if lines and lines[0].startswith("UGRO_NODE ")}
