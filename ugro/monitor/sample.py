"""One sample of a node, and the pure parsers that read it from the node's output.

`commands.monitor_sample` prints sections after `UGRO_MON <name>` marker lines (load, mem, disk,
gpu, gpu-exit); whatever a login prints before the first marker is ignored. A section that does
not parse leaves its fields None and a note in `problems`: one odd line never costs the rest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..commands import GPU_QUERY, MONITOR_MARK

GPU_FIELDS = len(GPU_QUERY.split(","))


@dataclass(frozen=True)
class GpuSample:
    index: int
    uuid: str | None
    name: str | None
    memory_total_mib: float | None
    memory_used_mib: float | None
    utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None

    @property
    def memory_free_mib(self) -> float | None:
        if self.memory_total_mib is None or self.memory_used_mib is None:
            return None
        return max(0.0, self.memory_total_mib - self.memory_used_mib)


@dataclass
class NodeSample:
    """What one round learned about one node; `up` False means it did not answer."""

    node: str
    ts: float  # Unix time the sample was taken
    up: bool
    error: str | None = None
    down_since: float | None = None  # when the node stopped answering, while it is down
    load1: float | None = None
    load5: float | None = None
    load15: float | None = None
    memory_total_kib: int | None = None
    memory_available_kib: int | None = None
    disk_free_kib: int | None = None
    disk_path: str | None = None
    gpus: list[GpuSample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _float(text: str) -> float | None:
    text = text.strip()
    try:
        value = float(text)  # nvidia-smi prints [N/A] or [Not Supported] for unknowns
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _int(text: str) -> int | None:
    value = _float(text)
    return int(value) if value is not None else None


def parse_gpu_csv(text: str) -> tuple[list[GpuSample], list[str]]:
    """GPUs from `nvidia-smi --query-gpu=<GPU_QUERY> --format=csv,noheader,nounits`.

    Returns the GPUs of the lines that parse and one problem per line that does not.
    """
    gpus, problems = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cols = [c.strip() for c in line.split(",")]
        index = _int(cols[0]) if cols else None
        if len(cols) != GPU_FIELDS or index is None:
            problems.append(f"nvidia-smi line {lineno}: not a GPU line: {line.strip()[:120]!r}")
            continue
        gpus.append(GpuSample(
            index=index,
            uuid=cols[1] if cols[1].startswith("GPU-") else None,
            name=cols[2] or None,
            memory_total_mib=_float(cols[3]),
            memory_used_mib=_float(cols[4]),
            utilization_pct=_float(cols[5]),
            temperature_c=_float(cols[6]),
            power_w=_float(cols[7]),
        ))
    return gpus, problems


def split_sections(stdout: str) -> dict[str, list[str]]:
    """The lines after each `UGRO_MON <name>` marker, by name; a marker may carry a value."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    prefix = MONITOR_MARK + " "
    for line in stdout.splitlines():
        if line.startswith(prefix):
            name, _, value = line[len(prefix):].strip().partition(" ")
            current = sections.setdefault(name, [])
            if value:
                current.append(value)
        elif current is not None:
            current.append(line)
    return sections


def parse_sample(node: str, ts: float, stdout: str) -> NodeSample:
    """A node's sample from `commands.monitor_sample` output; ValueError when it is not one."""
    sections = split_sections(stdout)
    if not sections:
        raise ValueError("no monitor sample in the output")
    s = NodeSample(node=node, ts=ts, up=True)
    load = " ".join(sections.get("load", [])).split()
    if len(load) >= 3 and None not in (loads := [_float(x) for x in load[:3]]):
        s.load1, s.load5, s.load15 = loads
    else:
        s.problems.append("load: /proc/loadavg unreadable")
    for line in sections.get("mem", []):
        key, _, rest = line.partition(":")
        value = _int(rest.split()[0]) if rest.split() else None
        if key == "MemTotal":
            s.memory_total_kib = value
        elif key == "MemAvailable":
            s.memory_available_kib = value
    if s.memory_total_kib is None or s.memory_available_kib is None:
        s.problems.append("memory: /proc/meminfo unreadable")
    # df -P: a header, then `filesystem blocks used available capacity mountpoint`.
    rows = [line.split(None, 5) for line in sections.get("disk", []) if line.strip()]
    rows = [r for r in rows if len(r) == 6 and _int(r[3]) is not None]
    if rows:
        s.disk_free_kib, s.disk_path = _int(rows[-1][3]), rows[-1][5]
    else:
        s.problems.append("disk: df printed no usable line")
    gpu_exit = (sections.get("gpu-exit") or ["missing"])[0].strip()
    gpu_text = "\n".join(sections.get("gpu", []))
    if gpu_exit == "0":
        s.gpus, problems = parse_gpu_csv(gpu_text)
        s.problems += problems
    elif gpu_exit != "none":
        why = (gpu_text.strip().splitlines() or ["no output"])[-1][:200]
        s.problems.append(f"nvidia-smi failed (exit {gpu_exit}): {why}")
    return s
