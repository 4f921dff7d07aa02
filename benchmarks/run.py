"""What UGRO's control plane costs, side by side with pdsh, plain ssh and torchrun.

    python benchmarks/run.py [--nodes 1,4,16,32] [--repeat N] [--size full|tiny] [--out FILE]
        [--only health,cli,launch,cancel,sync,logs,history,training]

Runs on the sshd lab of the test suite (tests/sshlab.py: real OpenSSH daemons on 127.0.0.2...,
nothing leaves loopback), prints markdown tables and writes them to
benchmarks/results/<YYYY-MM-DD>.md (or --out). How figures are taken: benchmarks/measure.py;
each section is a module of benchmarks/sections/ with `run_section(bench)`.

Everything lives in a temporary directory (cluster files, INVOKE_UGRO_DATA_DIR, INVOKE_UGRO_LOG_DIR,
the lab) and everything started is stopped on exit, error, Ctrl-C or SIGTERM. Timings are for
reading, never for asserting: tests/test_benchmarks.py only checks that the tables come out.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

# The benchmarks import the package, and the test suite's lab (tests/sshlab.py).
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]

from benchmarks.bench import SIZES, Bench, say  # noqa: E402
from benchmarks.measure import CELL_BUDGET_S, ROOT  # noqa: E402
from benchmarks.sections import (  # noqa: E402
    cancel,
    cli,
    health,
    history,
    launch,
    logs,
    sync,
    training,
)
from benchmarks.sections.jobs import launch_budget  # noqa: E402
from benchmarks.sections.logs import LOGS_BUDGET_S  # noqa: E402
from benchmarks.tables import Section, mark, table  # noqa: E402

SECTIONS = {"health": health, "cli": cli, "launch": launch, "cancel": cancel, "sync": sync,
            "logs": logs, "history": history, "training": training}


def run_sections(bench: Bench) -> list[Section]:
    sections = []
    for name in bench.only:
        say(f"== {name}")
        sections += SECTIONS[name].run_section(bench)
    return sections


def machine() -> str:
    def version(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "missing"
        return ((p.stdout or p.stderr).strip().splitlines() or ["?"])[0]

    import fabric
    import invoke
    import paramiko

    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = "missing"
    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = version(["git", "-C", str(ROOT), "status", "--porcelain",
                     "--untracked-files=no"]) not in ("", "?")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.node()}: {os.cpu_count()} CPUs, load {load} at the start; "
            f"Python {platform.python_version()}, torch {torch_version}, invoke "
            f"{invoke.__version__}, fabric {fabric.__version__}, paramiko {paramiko.__version__}"
            f"; {version(['ssh', '-V'])}; {version(['pdsh', '-V'])}; "
            f"{version(['rsync', '--version'])}; UGRO {commit}{' (uncommitted changes)' * dirty}")


def report(bench: Bench, sections: list[Section], host: str, size: str, started: str,
           took: float) -> str:
    targets = table(["target", "measured", "met"],
                    [[what, measured, mark(ok)] for what, measured, ok in bench.targets])
    sized = f" --size {size}" if size != "full" else ""
    warm_up = "after a warm-up run" if bench.sizes.warm_up else "without warm-up runs"
    head = (f"# UGRO control-plane benchmarks, {started}\n\n"
            f"{host}\n\n"
            f"`python benchmarks/run.py --nodes {','.join(map(str, bench.node_counts))} "
            f"--only {','.join(bench.only)} --repeat {bench.repeat}{sized}` took {took:.0f} s. "
            f"Whole-process wall times, median of {bench.repeat} run{'s' * (bench.repeat > 1)} "
            f"{warm_up}; n=… where a method stopped repeating after {CELL_BUDGET_S:g} s "
            f"in one row ({launch_budget(bench.repeat):g} s for launch, {LOGS_BUDGET_S:g} s "
            "and no warm-up for logs). Lab: "
            f"{len(bench.lab.nodes)} OpenSSH daemons on 127.0.0.2…, each with a stand-in "
            "`nvidia-smi` (RTX 4070) and this machine's Python and torch; each node's HOME is "
            "its own directory (no shell rc files). Python's bytecode caches on, as on a "
            "user's machine.\n")
    failures = [Section("Failed runs", "Runs that failed (the figures above leave them out):",
                        bench.failures)] if bench.failures else []
    return "\n".join([head, "## Targets\n\n" + targets + "\n",
                      *(s.markdown() for s in [*sections, *failures])])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,4,16,32",
                        help="lab node counts for the health fan-out (default 1,4,16,32)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"sections to run, comma-separated (default {','.join(SECTIONS)})")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed runs per figure, after one warm-up (default 5)")
    parser.add_argument("--size", choices=list(SIZES), default="full",
                        help="how big each section's work is: full (default, what results/ "
                             "holds), or tiny (a smoke test: no warm-up, not comparable)")
    parser.add_argument("--out", "--output", dest="output", type=Path,
                        help="where to write the tables (default benchmarks/results/<date>.md)")
    args = parser.parse_args(argv)
    try:
        args.nodes = sorted({int(x) for x in args.nodes.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--nodes: expected numbers like 1,4,16,32, got {args.nodes!r}")
    if not args.nodes or min(args.nodes) < 1 or max(args.nodes) > 200:
        parser.error("--nodes: each count must be between 1 and 200")
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown or not args.only:
        parser.error(f"--only: unknown section(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(SECTIONS)}")
    args.only = [s for s in SECTIONS if s in args.only]
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    for tool in ("sshd", "ssh", "pdsh", "rsync"):
        if not shutil.which(tool) and not (tool == "sshd" and Path("/usr/sbin/sshd").exists()):
            parser.error(f"{tool} is not installed")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = date.today().isoformat()
    output = args.output or ROOT / "benchmarks" / "results" / f"{started}.md"
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    # As on a user's machine: Python keeps its bytecode caches (an environment that turns
    # them off would have every `inv` and supervisor compile the package from source again).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    t0 = time.perf_counter()
    bench = Bench(args.nodes, args.only, args.repeat, SIZES[args.size])
    try:
        host = machine()
        bench.start()
        sections = run_sections(bench)
        text = report(bench, sections, host, args.size, started, time.perf_counter() - t0)
    except KeyboardInterrupt:
        say("interrupted: stopping everything this run started")
        return 130
    finally:
        bench.close()
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    say(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
