"""Submit to every rank running on Slurm: `inv launch` next to a hand-written sbatch.

Standalone: starts the two-node loopback Slurm (tests/slurmlab.py, needs root and the Slurm
packages), then --runs times each (default 3): UGRO's `inv launch --detach` against a
`backend: slurm` cluster file, and an sbatch script written by hand that runs the same torchrun
line per node through srun. The clock runs from the command's start to the moment both ranks have
printed `rank N/2 up` (the line train_single_test.py prints once its process group is up), read
from the per-node output files. Medians are reported.

    .venv/bin/python benchmarks/slurm_submit.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from slurmlab import SlurmLab, unavailable  # noqa: E402
from sshlab import rendezvous_port  # noqa: E402

from benchmarks.measure import wait_until  # noqa: E402

ARGS = "--epochs 1 --steps-per-epoch 3 --log-every 1 --batch-size 8 --seq-len 32"
HAND = """\
#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output=/dev/null
cd {root}
export GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1
srun --kill-on-bad-exit=1 --output={out}/%N-%t.log {python} -m torch.distributed.run \\
  --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{port} \\
  --rdzv-id hand --local-addr 127.0.0.1 scripts/train_single_test.py {args} --output-dir {out}
"""


def until_up(files, timeout: float = 120) -> float:
    """When both ranks had printed that they are up in the output files (perf_counter)."""
    def up() -> bool:
        text = "".join(p.read_text(errors="replace") for p in files() if p.is_file())
        return text.count(" up on ") >= 2 or ("rank 0/2 up" in text and "rank 1/2 up" in text)

    return wait_until(up, timeout, "both ranks up")


def ugro_once(lab: SlurmLab, work: Path, n: int) -> float:
    shared = work / "shared"
    cluster = work / "slurm.yaml"
    cluster.write_text(f"""backend: slurm
slurm:
  partition: debug
  nodes: 2
  shared_dir: {shared}
  project_path: {ROOT}
  python: {sys.executable}
  env: {{GLOO_SOCKET_IFNAME: lo, OMP_NUM_THREADS: "1"}}
""")
    env = lab.env({"INVOKE_UGRO_CLUSTER": str(cluster),
                   "INVOKE_UGRO_DATA_DIR": str(work / "data"),
                   "INVOKE_UGRO_LOG_DIR": str(work / "logs")})
    name = f"bench{n}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "invoke", "launch", "--name", name, "--detach",
                    "--script-args", ARGS], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True)
    took = until_up(lambda: list(shared.glob(f"{name}_*/nodes/*/output.log"))) - start
    wait_idle(lab)
    return took


def hand_once(lab: SlurmLab, work: Path, n: int) -> float:
    out = work / f"hand{n}"
    out.mkdir()
    script = out / "job.sh"
    script.write_text(HAND.format(root=ROOT, out=out, python=sys.executable, port=rendezvous_port(),
                                  args=ARGS))
    start = time.perf_counter()
    lab.run("sbatch", "--parsable", str(script), cwd=out)
    took = until_up(lambda: list(out.glob("*.log"))) - start
    wait_idle(lab)
    return took


def wait_idle(lab: SlurmLab) -> None:
    wait_until(lambda: not lab.run("squeue", "-h", "-o", "%i").stdout.strip(), 120,
               "Slurm idle", every=0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    why = unavailable()
    if why:
        print(f"slurm_submit: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lab = SlurmLab(work / "lab").start()
        try:
            ugro = [ugro_once(lab, work, n) for n in range(args.runs)]
            hand = [hand_once(lab, work, n) for n in range(args.runs)]
        finally:
            lab.stop()
    print(f"submit -> both ranks up, 2 Slurm nodes, median of {args.runs} "
          f"({os.cpu_count()} cores):")
    print(f"  inv launch --detach   {statistics.median(ugro):.2f} s  "
          f"({', '.join(f'{x:.2f}' for x in ugro)})")
    print(f"  sbatch by hand        {statistics.median(hand):.2f} s  "
          f"({', '.join(f'{x:.2f}' for x in hand)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
