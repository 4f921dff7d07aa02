"""`inv health`: every node probed at once, one row each, drift called out.

The parsers (`parse_nvidia_smi`, `parse_probe`) are pure functions over text;
`check()` fans the probe out and turns answers into `NodeHealth` records.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import commands, store
from .cluster import Session, fan_out
from .config import Cluster, Node
from .errors import UgroError
from .wording import differs, group_by

PROBE_PREFIX = "UGRO_PROBE "
GIB = 1024 ** 3


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total_mib: int | None
    memory_used_mib: int | None
    utilization_pct: int | None
    temperature_c: int | None
    driver: str | None


def _number(text: str) -> int | None:
    text = text.strip()
    if not text or text.startswith("[") or text.upper() in ("N/A", "NONE"):
        return None  # nvidia-smi prints [N/A] or [Not Supported] for unknowns
    return int(float(text))


def parse_nvidia_smi(csv_text: str) -> list[Gpu]:
    """Parse `nvidia-smi --query-gpu=<probe fields> --format=csv,noheader,nounits`."""
    gpus = []
    for lineno, line in enumerate(csv_text.splitlines(), 1):
        if not line.strip():
            continue
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != 7:
            raise ValueError(f"nvidia-smi line {lineno}: expected 7 fields, got {len(cols)}")
        try:
            gpus.append(Gpu(
                index=int(cols[0]),
                name=cols[1],
                memory_total_mib=_number(cols[2]),
                memory_used_mib=_number(cols[3]),
                utilization_pct=_number(cols[4]),
                temperature_c=_number(cols[5]),
                driver=None if cols[6].startswith("[") else cols[6],
            ))
        except (ValueError, OverflowError):
            raise ValueError(f"nvidia-smi line {lineno}: not a number in {line!r}") from None
    return gpus


def parse_marked_json(stdout: str, prefix: str, what: str) -> dict:
    """The last `PREFIX {json}` line among whatever else the login printed."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(prefix):
            try:
                report = json.loads(line[len(prefix):])
            except json.JSONDecodeError as exc:
                raise ValueError(f"{what} is not JSON ({exc.msg})") from None
            if not isinstance(report, dict):
                raise ValueError(f"{what} is not a JSON object")
            return report
    raise ValueError(f"no {what} in the output")


ENV_PREFIX = "UGRO_PROBE_ENV "
SHELL_PREFIX = "UGRO_PROBE_SH "


def parse_probe(stdout: str) -> dict:
    """The probe's report: the Python probe's JSON (`--deep`), or the shell probe's lines
    (`commands.probe`) made into the same dict. What follows `PROBE_END` is not the probe's."""
    stdout = stdout.split("\n" + commands.PROBE_END + "\n")[0]
    if any(line.startswith(PROBE_PREFIX) for line in stdout.splitlines()):
        return parse_marked_json(stdout, PROBE_PREFIX, "probe report")
    return parse_shell_probe(stdout)


def parse_shell_probe(stdout: str) -> dict:
    """The light probe's output: the cached (or just taken) environment facts as JSON, then
    `UGRO_PROBE_SH <what> ...` lines from the shell, nvidia-smi's output after its own."""
    report = parse_marked_json(stdout, ENV_PREFIX, "probe report")
    lines = stdout.splitlines()
    facts = {}
    for i, line in enumerate(lines):
        if line.startswith(SHELL_PREFIX):
            what, _, rest = line[len(SHELL_PREFIX):].partition(" ")
            facts[what] = (rest, i)
    if "host" not in facts or "smi" not in facts:
        raise ValueError("the probe's shell lines are missing")
    report["hostname"] = facts["host"][0]
    try:
        report["loadavg"] = [float(x) for x in facts["load"][0].split()[:3]]
    except (KeyError, ValueError):
        report["loadavg"] = None
    exists, _, where = facts.get("project", ("0 ", 0))[0].partition(" ")
    report["project_exists"] = exists == "1"
    report["disk"] = _df_line(facts.get("disk", ("", 0))[0], where)
    code, at = facts["smi"]
    output = "\n".join(lines[at + 1:]) + "\n" if at + 1 < len(lines) else ""
    if code == "absent":
        report["nvidia_smi"] = {"status": "absent"}
    elif code == "0":
        report["nvidia_smi"] = {"status": "ok", "csv": output}
    elif code == "124":
        report["nvidia_smi"] = {"status": "error", "error": "nvidia-smi timed out"}
    else:
        first = (output.strip().splitlines() or ["no output"])[0][:200]
        report["nvidia_smi"] = {"status": "error", "error": first,
                                "code": int(code) if code.lstrip("-").isdigit() else code}
    return report


def _df_line(line: str, where: str) -> dict:
    """`df -Pk`'s line for a path: {path, free, total} in bytes ({path} alone if unreadable).
    Counted from the capacity column, so a file system name with spaces still parses."""
    words = line.split()
    cap = next((i for i, w in enumerate(words) if w.endswith("%") and i >= 4), None)
    if cap is None:
        return {"path": where}
    try:
        blocks, _, free = (int(w) for w in words[cap - 3:cap])
    except ValueError:
        return {"path": where}
    return {"path": where, "free": free * 1024, "total": blocks * 1024}


@dataclass
class NodeHealth:
    node: str
    address: str
    healthy: bool
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hostname: str | None = None
    python: str | None = None
    torch: str | None = None
    torch_cuda: str | None = None
    driver: str | None = None
    gpus: list[Gpu] = field(default_factory=list)
    disk_free_gib: float | None = None
    loadavg: list[float] | None = None
    deep: dict | None = None
    seconds: float = 0.0
    then: str = ""  # what the command run after the probe printed (`check(then=...)`)

    def as_dict(self) -> dict:
        out = asdict(self)
        del out["then"]
        return out


MIN_FREE_DISK_GIB = 2.0


def assess(node: Node, report: dict, seconds: float) -> NodeHealth:
    """Turn one probe report into a verdict: problems make a node unhealthy."""
    h = NodeHealth(node=node.name, address=node.address, healthy=True, seconds=seconds)
    h.hostname = report.get("hostname")
    h.python = report.get("python")
    h.torch, h.torch_cuda = report.get("torch"), report.get("torch_cuda")
    h.loadavg = report.get("loadavg")
    disk = report.get("disk") or {}
    if isinstance(disk.get("free"), int):
        h.disk_free_gib = round(disk["free"] / GIB, 1)
        if h.disk_free_gib < MIN_FREE_DISK_GIB:
            h.warnings.append(f"only {h.disk_free_gib} GiB free at {disk.get('path')}")
    if not report.get("project_exists"):
        h.warnings.append(f"project path {node.project_path} does not exist")
    if not h.torch:
        h.problems.append("torch is not installed in the node's Python")
    smi = report.get("nvidia_smi") or {}
    status = smi.get("status")
    if status == "ok":
        try:
            h.gpus = parse_nvidia_smi(smi.get("csv", ""))
        except ValueError as exc:
            h.problems.append(str(exc))
        drivers = sorted({g.driver for g in h.gpus if g.driver})
        h.driver = ",".join(drivers) or None
    elif status == "error":
        h.problems.append(f"nvidia-smi failed: {smi.get('error')}")
    if node.gpus and len(h.gpus) < node.gpus and status != "error":
        found = "none" if not h.gpus else str(len(h.gpus))
        h.problems.append(f"config says {node.gpus} GPU(s), found {found}")
    deep = report.get("deep")
    if deep is not None:
        h.deep = deep
        if not deep.get("ok"):
            h.problems.append(deep.get("error", "deep check failed"))
        elif node.gpus and not deep.get("cuda_available"):
            h.problems.append("torch cannot use CUDA")
    h.healthy = not h.problems
    return h


def check(cluster: Cluster, nodes: tuple[Node, ...] | None = None, *, deep: bool = False,
          timeout: float | None = None, session: Session | None = None,
          then: Callable[[Node], str | None] | None = None) -> list[NodeHealth]:
    """Probe every node at once; a dead or slow node costs at most `timeout`.

    `then(node)`, a command, runs on the node right after its probe, in the same exec (a
    launch's preflight asks its questions so); its output is the report's `then`. On a Slurm
    cluster, the partition's nodes as Slurm reports them (`partition_check`).
    """
    if cluster.slurm is not None:
        return partition_check(cluster, deep=deep, timeout=timeout)
    nodes = nodes or cluster.nodes
    timeout = timeout or cluster.health_timeout
    own = session is None
    session = session or Session(cluster, timeout)
    # Importing torch for --deep takes seconds on its own; don't count it as a hang.
    run_timeout = timeout + (30 if deep else 0)

    def one(node: Node) -> NodeHealth:
        start = time.monotonic()
        command = commands.probe(node, deep, then(node) if then else None)
        answer = session.run(node, command, timeout=run_timeout)
        seconds = round(time.monotonic() - start, 2)
        if answer.error:
            return NodeHealth(node.name, node.address, False, [answer.error], seconds=seconds)
        try:
            report = parse_probe(answer.stdout)
        except ValueError as exc:
            why = (answer.stderr.strip().splitlines() or [str(exc)])[-1]
            return NodeHealth(node.name, node.address, False,
                              [f"probe failed (exit {answer.exited}): {why}"], seconds=seconds)
        h = assess(node, report, seconds)
        h.then = answer.stdout.partition("\n" + commands.PROBE_END + "\n")[2]
        return h

    try:
        return list(fan_out(nodes, one).values())
    finally:
        if own:
            session.close()


def gres_gpus(gres: str | None) -> list[Gpu]:
    """The GPUs in sinfo's gres (`gpu:4`, `gpu:a100:4(S:0-1)`, `gpu:2,shard:8`)."""
    kinds: list[str] = []
    for item in (gres or "").split(","):
        parts = re.sub(r"\(.*?\)", "", item).split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            kinds += [parts[1] if len(parts) == 3 else "gpu"] * int(parts[-1])
    return [Gpu(i, kind, None, None, None, None, None) for i, kind in enumerate(kinds)]


def partition_check(cluster: Cluster, *, deep: bool = False,
                    timeout: float | None = None) -> list[NodeHealth]:
    """A Slurm partition's nodes from sinfo: state, GPUs, why a node is drained or down.

    Nothing runs on the nodes; `deep` runs the probe on every usable node through
    one short `srun` (which waits for them to be free).
    """
    from .backends.slurm import SlurmBackend

    timeout = timeout or cluster.health_timeout
    login = cluster.master
    start = time.monotonic()
    with SlurmBackend(cluster, Session(cluster, timeout)) as backend:
        try:
            rows = backend.partition()
        except UgroError as exc:
            return [NodeHealth(login.name, login.address, False, [f"sinfo: {exc}"])]
        seconds = round(time.monotonic() - start, 2)
        probes, probe_error = {}, None
        # sinfo -N lists a node once per partition it is in; its state is the same in each.
        by_name: dict = {}
        for n in rows:
            by_name.setdefault(n.name, n)
        nodes = list(by_name.values())
        usable = [n.name for n in nodes if n.usable]
        if deep and usable:
            try:
                probes = backend.probe(usable, commands.PROBE_SOURCE, True, timeout + 60)
            except UgroError as exc:
                probe_error = f"srun probe: {exc}"
    reports = []
    for n in nodes:
        where = f"{n.partition}/{n.state}"
        h = NodeHealth(n.name, where, n.usable, seconds=seconds)
        if deep and n.usable:
            try:
                h = assess(cluster.node(n.name), parse_probe(probes.get(n.name, "")), seconds)
                h.address = where
            except ValueError as exc:
                h.problems.append(probe_error or f"probe: {exc}")
                h.healthy = False
        if not n.usable:
            h.problems.append(n.state + (f": {n.reason}" if n.reason else ""))
        h.gpus = h.gpus or gres_gpus(n.gres)
        reports.append(h)
    if not reports:
        part = cluster.slurm.partition or "the default partition"
        return [NodeHealth(login.name, login.address, False, [f"{part}: no nodes"])]
    return reports


DRIFT_FIELDS = ("python", "torch", "torch_cuda", "driver")


def drift(reports: list[NodeHealth]) -> list[str]:
    """One line per version that differs across the nodes that answered."""
    answered = [r for r in reports if r.hostname]
    lines = (differs(name, group_by((r.node, str(getattr(r, name))) for r in answered))
             for name in DRIFT_FIELDS)
    return [line for line in lines if line]


def _gpu_cell(h: NodeHealth) -> str:
    if not h.gpus:
        return "-"
    cells = []
    for g in h.gpus:
        mem = (f"{(g.memory_used_mib or 0) / 1024:.1f}/{g.memory_total_mib / 1024:.0f}G"
               if g.memory_total_mib else "?")
        util = f"{g.utilization_pct}%" if g.utilization_pct is not None else "?"
        temp = f" {g.temperature_c}C" if g.temperature_c is not None else ""
        cells.append(f"{g.index}:{g.name} {mem} {util}{temp}")
    return "\n".join(cells)


def table(reports: list[NodeHealth]) -> str:
    from tabulate import tabulate

    rows = []
    for h in reports:
        status = "ok" if h.healthy else "UNHEALTHY"
        notes = h.problems + [f"warning: {w}" for w in h.warnings]
        rows.append([
            h.node, h.address, status, _gpu_cell(h), h.python or "-",
            h.torch or "-", h.torch_cuda or ("cpu" if h.torch else "-"), h.driver or "-",
            f"{h.disk_free_gib:g}G" if h.disk_free_gib is not None else "-",
            f"{h.loadavg[0]:.2f}" if h.loadavg else "-",
            "\n".join(notes) or "",
        ])
    headers = ["node", "address", "status", "GPUs (used/total, util)", "python", "torch",
               "cuda", "driver", "disk free", "load", "notes"]
    return tabulate(rows, headers=headers, tablefmt="simple")


def save(data_dir: Path, log_dir: Path, cluster: Cluster, reports: list[NodeHealth]) -> Path:
    """Write the cluster state atomically and append one line to the health log."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state = {
        "checked_at": now,
        "cluster": cluster.name,
        "nodes": [r.as_dict() for r in reports],
        "drift": drift(reports),
    }
    path = data_dir / "cluster_state.json"
    store.write_json(path, state)
    summary = " ".join(f"{r.node}={'ok' if r.healthy else 'UNHEALTHY'}" for r in reports)
    store.append_line(log_dir / "health.log", f"{now} {cluster.name} {summary}")
    return path
