"""Attached `inv launch` of nodes printing as fast as they can: lines lost, lines/s at each hop,
against pdsh running the same script."""

from __future__ import annotations

import itertools
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.bench import JOB, Bench, say
from benchmarks.measure import ROOT, TIMEOUT_S, Failed, last_line
from benchmarks.tables import Section, secs, table
from ugro import commands

LOGS_BUDGET_S = 35.0
DONE = rb"spew-done \d+ (\d+) lines in ([\d.]+) s"


def run_section(bench: Bench) -> list[Section]:
    n, lines = bench.sizes.launch_nodes, bench.sizes.log_lines
    env = bench.env(bench.cluster(n))
    hosts = [x.name for x in bench.lab.nodes[:n]]
    runs = itertools.count()
    ugro_runs: list[dict] = []
    pdsh_runs: list[dict] = []

    def ugro() -> float:
        ugro_runs.append(stream_launch(bench, env, f"bench-logs-{next(runs)}"))
        return ugro_runs[-1]["wall"]

    command = ("cd ~/project && PYTHONUNBUFFERED=1 exec "
               f"{shlex.quote(sys.executable)} {JOB} --mode spew --lines {lines}")
    argv, pdsh_env = bench.pdsh(hosts, command)

    def pdsh() -> float:
        pdsh_runs.append(stream_pdsh(bench, argv, pdsh_env))
        return pdsh_runs[-1]["wall"]

    say(f"logs: {n} nodes × {lines} lines")
    # No warm-up: each run moves n × lines lines, which start-up caching cannot hide.
    cells = bench.compare("logs", {"logs:ugro": ugro, "logs:pdsh": pdsh}, warm=False,
                          budget=LOGS_BUDGET_S)
    r = bench.repeat

    def worst(facts: list[dict], key: str):
        return max((f[key] for f in facts), default="–")

    def rate(facts: list[dict], key: str) -> str:
        values = [f[key] for f in facts if f.get(key)]
        return f"{statistics.median(values):,.0f} lines/s" if values else "–"

    err = cells["logs:ugro"].error
    lost_files, lost_term = worst(ugro_runs, "lost_files"), worst(ugro_runs, "lost_term")
    ok = None if err or not ugro_runs else lost_files == 0 and lost_term == 0
    measured = f"error: {err}" if err else f"{lost_files} in the log files, " \
                                            f"{lost_term} on the terminal (worst run)"
    rows = [
        ["lines lost in the control node's logs/<node>.log", f"error: {err}" if err else
         lost_files, "–", "0", bench.target("zero lost log lines", measured, ok)],
        ["lines lost on the terminal", f"error: {err}" if err else lost_term,
         worst(pdsh_runs, "lost"), "0", "–"],
        ["lines/s the script printed, per node", rate(ugro_runs, "rate_node"),
         rate(pdsh_runs, "rate_node"), "–", "–"],
        ["lines/s reaching the nodes' output.log (torchrun's tee)",
         rate(ugro_runs, "rate_output"), "–", "–", "–"],
        ["lines/s reaching the control node's log files", rate(ugro_runs, "rate_files"),
         "–", "–", "–"],
        ["lines/s reaching the terminal", rate(ugro_runs, "rate_term"),
         rate(pdsh_runs, "rate_term"), "–", "–"],
        ["whole run, start to exit", secs(cells["logs:ugro"], r),
         secs(cells["logs:pdsh"], r), "–", "–"],
    ]
    notes = [f"{n} nodes × 1 rank, each printing {lines:,} numbered lines "
             f"({lines * n:,} in all) with PYTHONUNBUFFERED=1, as UGRO sets "
             "it; attached `inv launch`, its stdout read from a pipe. A line is lost when "
             "its (rank, number) never arrives. Rates other than the script's are for all "
             "nodes together, first line to last; losses are the worst run's.",
             "Baseline: `pdsh -R ssh` running the same script on the same nodes, without "
             "torchrun, its output counted from the pipe the same way.",
             f"No warm-up run here: each run moves {lines * n:,} lines."]
    notes += [f"run {i + 1}, lines at each hop: {f['stages']}"
              for i, f in enumerate(ugro_runs) if f["lost_files"] or f["lost_term"]]
    return [Section(f"Log streaming ({n} nodes × {lines:,} lines)",
                    table(["measure", "inv launch", "pdsh -R ssh", "target", "met"], rows),
                    notes)]


def stream_launch(bench: Bench, env: dict, name: str) -> dict:
    n, lines = bench.sizes.launch_nodes, bench.sizes.log_lines
    argv = bench.inv + ["launch", "--name", name, "--nproc-per-node", "1", "--script", JOB,
                        "--script-args", f"--mode spew --lines {lines}"]
    nodes = bench.lab.nodes[:n]
    t0 = time.perf_counter()
    p = bench.popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    term = PipeCounter(p.stdout, rb"^\S+ r(\d+) +\| spew (\d+) (\d+) ")
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    reader.start()
    files, outputs = FileCounter(b"| spew "), FileCounter(b"]:spew ")

    def poll() -> None:
        files.poll((bench.data / "experiments").glob(f"{name}_*/logs/*.log"))
        outputs.poll(f for x in nodes for f in (x.project / "data" / "experiments").glob(
            f"{name}_*/nodes/{x.name}/output.log"))

    while p.poll() is None:
        poll()
        if time.perf_counter() - t0 > TIMEOUT_S:
            p.kill()
            raise Failed(f"inv launch did not end within {TIMEOUT_S} s")
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    poll()
    term.join()
    reader.join(10)
    if p.returncode != 0:
        raise Failed(f"inv launch: exit {p.returncode}: "
                     f"{last_line((err or [b''])[0].decode(errors='replace'))}")
    (job_dir,) = (bench.data / "experiments").glob(f"{name}_*")
    seen = set()
    for f in (job_dir / "logs").glob("*.log"):
        seen |= {(r, i) for r, _, i in re.findall(rb"^\S+ r(\d+) +\| spew (\d+) (\d+) ",
                                                  f.read_bytes(), re.M)}
    raw = b"".join(f.read_bytes() for f in outputs.offsets)
    done = re.findall(DONE, raw)
    total = lines * n
    facts = {
        "wall": wall,
        "lost_files": total - len(seen),
        "lost_term": total - len({(r, i) for r, _, i in term.keys}),
        "rate_node": statistics.median(int(k) / float(s) for k, s in done if float(s) > 0)
        if done else None,
        "rate_output": outputs.rate(),
        "rate_files": files.rate(),
        "rate_term": term.rate(),
    }
    if facts["lost_files"] or facts["lost_term"]:
        facts["stages"] = stages(bench, job_dir.name, len(seen), len(term.keys))
    return facts


def stages(bench: Bench, job_id: str, files: int, term: int) -> str:
    """Count the job's lines at each hop, to say where the lost ones went missing."""
    worker = output = 0
    for node in bench.lab.nodes[:bench.sizes.launch_nodes]:
        d = node.project / commands.node_job_dir(node, job_id)
        worker += sum(len(re.findall(rb"^spew \d+ \d+ ", f.read_bytes(), re.M))
                      for f in (d / "torchrun").rglob("stdout.log"))
        if (d / "output.log").exists():
            output += len(re.findall(rb"^\[rank\d+\]:spew \d+ \d+ ",
                                     (d / "output.log").read_bytes(), re.M))
    return (f"workers' stdout files {worker:,}, nodes' output.log {output:,}, "
            f"control logs {files:,}, terminal {term:,}")


def stream_pdsh(bench: Bench, argv: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    p = bench.popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    term = PipeCounter(p.stdout, rb"^(\S+): spew (\d+) (\d+) ")
    p.wait(TIMEOUT_S)
    term.join()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise Failed(f"pdsh: exit {p.returncode}")
    node_rates = [int(k) / float(s) for k, s in term.done if float(s) > 0]
    return {"wall": wall, "rate_term": term.rate(),
            "lost": bench.sizes.log_lines * bench.sizes.launch_nodes
            - len({(h, i) for h, _, i in term.keys}),
            "rate_node": statistics.median(node_rates) if node_rates else None}


class Counter:
    """How many matching lines arrived, and when the first and the last did."""

    def __init__(self):
        self.count = 0
        self.first = self.last = None

    def add(self, count: int) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.count += count

    def rate(self) -> float | None:
        if self.count and self.first and self.last and self.last > self.first:
            return self.count / (self.last - self.first)
        return None


class PipeCounter(Counter):
    """Reads a pipe to its end in a thread: the distinct keys of matching lines, and when."""

    def __init__(self, pipe, pattern: bytes):
        super().__init__()
        self.pipe, self.re = pipe, re.compile(pattern)
        self.keys: set[tuple] = set()
        self.done: list[tuple[bytes, bytes]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        done = re.compile(DONE)
        for line in self.pipe:
            m = self.re.match(line)
            if m:
                self.add(1)
                self.keys.add(m.groups())
            elif d := done.search(line):
                self.done.append(d.groups())

    def join(self) -> None:
        self.thread.join(60)


class FileCounter(Counter):
    """Counts the lines holding `needle` as they land in growing files."""

    def __init__(self, needle: bytes):
        super().__init__()
        self.needle = needle
        self.offsets: dict[Path, int] = {}

    def poll(self, paths) -> None:
        grew = 0
        for path in paths:
            with path.open("rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            cut = data.rfind(b"\n") + 1  # whole lines only; the rest is read next time
            self.offsets[path] = self.offsets.get(path, 0) + cut
            grew += data[:cut].count(self.needle)
        if grew:
            self.add(grew)
