"""Slurm as text: the batch script UGRO submits, the commands it runs, and what they print.

No I/O here: the Slurm backend runs `write_and_submit()`, `squeue()`, `cancel()`,
`sinfo()` and the per-node readers below wherever the cluster's login node is,
and hands their output to `ugro.slurm_parse`, whose parsers read exactly the
formats these functions ask for. `sacct()` and `show_job()` are not on its path
(a Slurm without slurmdbd has no accounting; `squeue -t all` and the job
directory's files say what it needs); the tests read a real Slurm with `show_job()`.

The batch script runs on the first node of the allocation. It takes that node
(`scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1`) as the c10d
rendezvous host, picks a free port there, and `srun --kill-on-bad-exit=1`
starts one task per node, each running one torchrun. A node's output goes to
`<job dir>/nodes/<node>/output.log` and torchrun's exit code to `exit_code`
beside it, as `commands.start_job` writes them on SSH nodes, exit marker
included, so the same readers serve both.

Finished jobs on Slurm 22.05 without slurmdbd: `sacct` answers only "Slurm
accounting storage is disabled"; `squeue -t all` and `scontrol show job` keep
a job for `MinJobAge` seconds (300 by default) after it ends, and the
`exit_code` files in the job directory keep each node's code for good.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .commands import MARKER_PRINTF, MARKER_SPAN, join, q, rpath
from .config import SLURM_NAME_RE, SLURM_TIME_RE
from .errors import UgroError
from .fields import ENV_KEY_RE
from .slurm_parse import STATUS
from .slurm_parse import slurm_id as _slurm_id

SQUEUE_FORMAT = "%i|%T|%r|%D|%N"
SACCT_FIELDS = "JobID,State,ExitCode,NodeList"
SINFO_FORMAT = "%N|%P|%T|%c|%m|%G|%E"


def _node_addr(var: str) -> str:
    """The NodeAddr of the node named in $var: its name unless the site set an address.

    It is how Slurm itself reaches the node (and all the lab's nodes share 127.0.0.1).
    """
    return f"scontrol show node -o \"${var}\" | sed -n \"s/.* NodeAddr=\\([^ ]*\\).*/\\1/p\""


@dataclass(frozen=True)
class BatchJob:
    """Everything the batch script needs; checked on creation.

    The cluster file's values were checked when it was read (`config`, with the same
    patterns); they are checked again here, where they become `#SBATCH` lines and shell
    text, so a BatchJob built any other way cannot inject either.
    """

    job_id: str
    job_dir: str  # absolute, on the filesystem every node shares
    workdir: str  # where torchrun starts (`~/...` is the node's home)
    nodes: int
    python: list[str]
    script: list[str]  # the training script and its arguments
    nproc_per_node: int
    gpus_per_node: int = 0
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines run before srun
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        def bad(what: str, value) -> UgroError:
            return UgroError(f"slurm job {self.job_id!r}: {what}: {value!r}")

        if not isinstance(self.job_id, str) or not SLURM_NAME_RE.match(self.job_id):
            raise bad("job id: use letters, digits, '.', '_', '+' or '-'", self.job_id)
        for name in ("nodes", "nproc_per_node"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise bad(f"{name}: not a positive integer", value)
        if type(self.gpus_per_node) is not int or self.gpus_per_node < 0:
            raise bad("gpus_per_node: not a count", self.gpus_per_node)
        for name in ("partition", "account", "qos"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not SLURM_NAME_RE.match(value)):
                raise bad(f"{name}: not a Slurm name", value)
        if self.time_limit is not None and not SLURM_TIME_RE.match(str(self.time_limit)):
            raise bad("time_limit: not a Slurm time (minutes, H:M:S, D-H:M:S)", self.time_limit)
        if not isinstance(self.job_dir, str) or not self.job_dir.startswith("/"):
            raise bad("job_dir: not an absolute path", self.job_dir)
        if not isinstance(self.workdir, str) or not self.workdir:
            raise bad("workdir: empty", self.workdir)
        for name in ("python", "script"):
            argv = getattr(self, name)
            if not argv or not all(isinstance(a, str) and a for a in argv):
                raise bad(f"{name}: not a list of non-empty strings", argv)
        for line in self.setup:
            if not isinstance(line, str) or "\n" in line:
                raise bad("setup: each line must be one line of text", line)
        for key, value in self.env.items():
            if not isinstance(key, str) or not ENV_KEY_RE.match(key):
                raise bad("env: not an environment variable name", key)
            if not isinstance(value, str):
                raise bad(f"env.{key}: not a string", value)
        texts = [self.job_dir, self.workdir, *self.python, *self.script, *self.setup,
                 *self.env.values()]
        if any("\0" in t for t in texts):
            raise bad("a value contains a NUL byte", next(t for t in texts if "\0" in t))


def torchrun(job: BatchJob) -> str:
    """One node's torchrun command line; the rendezvous values come from the environment."""
    return (
        f"{join(job.python)} -m torch.distributed.run"
        ' --nnodes "$SLURM_NNODES"'
        f" --nproc-per-node {q(job.nproc_per_node)}"
        " --max-restarts 0"
        # Each rank's lines reach output.log prefixed `[rankN]:`, as on SSH nodes.
        ' --tee 3 --log-dir "$d/torchrun"'
        " --rdzv-backend c10d"
        ' --rdzv-endpoint "$UGRO_RDZV_HOST:$UGRO_RDZV_PORT"'
        f" --rdzv-id {q(job.job_id)}"
        ' --rdzv-conf "is_host=$is_host"'
        ' --local-addr "$addr"'
        f" {join(job.script)}"
    )


def node_script(job: BatchJob) -> str:
    """What `srun` runs on each node (as `bash -c SCRIPT ugro-node JOB_DIR`).

    The TERM trap keeps the wrapper alive while Slurm signals the step (it
    signals torchrun directly too), so the exit code is recorded either way.
    """
    return "\n".join([
        'n=$SLURMD_NODENAME; d=$1/nodes/$n',
        'mkdir -p "$d" || exit 1',
        f"addr=$({_node_addr('n')}); addr=${{addr:-$n}}",
        'is_host=0; [ "$n" = "$UGRO_RDZV_NODE" ] && is_host=1',
        "export UGRO_NODE=$n",
        "trap : TERM INT",
        f'{torchrun(job)} >"$d/output.log" 2>&1 </dev/null',
        "c=$?",
        'echo $c >"$d/exit_code.tmp" && mv "$d/exit_code.tmp" "$d/exit_code"',
        f'printf "\\n{MARKER_PRINTF} %s\\n" $c >>"$d/output.log"',
        "exit $c",
    ])


def batch_script(job: BatchJob) -> str:
    """The sbatch script for `job`; `write_and_submit()` submits it from the job directory."""
    directives = [
        f"--job-name={job.job_id}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
    ]
    gres = [f"--gres=gpu:{job.gpus_per_node}"] if job.gpus_per_node else []
    directives += gres
    for name in ("partition", "account", "qos"):
        if getattr(job, name):
            directives.append(f"--{name}={getattr(job, name)}")
    if job.time_limit:
        directives.append(f"--time={job.time_limit}")
    env = {**job.env, "UGRO_JOB_ID": job.job_id}
    srun = [
        "srun", "--kill-on-bad-exit=1", '--nodes="$SLURM_NNODES"',
        '--ntasks="$SLURM_NNODES"', "--ntasks-per-node=1", *gres,
        "bash", "-c", q(node_script(job)), "ugro-node", q(job.job_dir),
    ]
    port = 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
    lines = [
        "#!/bin/bash",
        f"# UGRO job {job.job_id}: one torchrun per node, c10d rendezvous on the first node.",
        *(f"#SBATCH {d}" for d in directives),
        f"cd {rpath(job.workdir)} || exit 1",
        *job.setup,
        *(f"export {k}={q(v)}" for k, v in sorted(env.items())),
        'UGRO_RDZV_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"UGRO_RDZV_HOST=$({_node_addr('UGRO_RDZV_NODE')})",
        'UGRO_RDZV_HOST=${UGRO_RDZV_HOST:-$UGRO_RDZV_NODE}',
        # This script runs on the first node, so a port free here is free for the store.
        f"UGRO_RDZV_PORT=$({join(job.python)} -c {q(port)}) || exit 1",
        "export UGRO_RDZV_NODE UGRO_RDZV_HOST UGRO_RDZV_PORT",
        'echo "ugro: $SLURM_JOB_NODELIST, rendezvous $UGRO_RDZV_HOST:$UGRO_RDZV_PORT"',
        " ".join(srun),
        "",
    ]
    return "\n".join(lines)


BATCH_FILE = "batch.sh"
SLURM_ID_FILE = "slurm_id"


def write_and_submit(job_dir: str, script: str) -> str:
    """Write the batch script into the job directory and submit it; print Slurm's job id.

    The id is also kept in the job directory (`slurm_id`), where a later
    `inv cancel` or supervisor finds it from the job directory alone.
    """
    return (f"mkdir -p {rpath(job_dir)} && cd {rpath(job_dir)} && "
            f"printf %s {q(script)} >{BATCH_FILE} && "
            f"id=$(sbatch --parsable {BATCH_FILE}) && "
            f"echo \"$id\" >{SLURM_ID_FILE} && echo \"$id\"")


def hostnames(nodelist: str) -> str:
    """The node names in a compressed list (`n[1-2]`), one a line, in allocation order."""
    if not re.fullmatch(r"[A-Za-z0-9_.,\[\]-]+", nodelist):
        raise UgroError(f"not a Slurm node list: {nodelist!r}")
    return f"scontrol show hostnames {q(nodelist)}"


# Slurm states in which a job may still write to its files: those UGRO reads as not over.
ACTIVE_STATES = tuple(s for s, status in STATUS.items() if status.is_active())


def watch_output(job_dir: str, node: str, slurm_id: str, poll: float = 0.2,
                 ask_every: int = 25) -> str:
    """Stream a node's output.log from the start through its exit marker.

    As `commands.watch_job` does on SSH nodes: new bytes go out in one piece
    per round, and the loop ends only once it has sent the marker. Whether the
    job still runs is Slurm's to say (asked every `ask_every` rounds, not every
    round: slurmctld serves the whole cluster); once it has ended without a
    marker, one last round sends what is there and a `killed` marker, as on SSH
    nodes (or `missing` when the node never wrote a line).
    """
    f = f'{rpath(job_dir)}/nodes/{q(node)}/output.log'
    active = "|".join(f"{s}*" for s in ACTIVE_STATES)
    return (
        f'F={f}; M=$(printf "{MARKER_PRINTF}"); off=0; n=0; end=0; '
        "while :; do "
        '  size=$(wc -c <"$F" 2>/dev/null || echo 0); '
        '  if [ "$size" -gt "$off" ]; then tail -c +$((off+1)) "$F" | head -c $((size-off)); '
        "    off=$size; fi; "
        # The marker must be among the bytes already sent, not just in the file.
        f"  s0=$((off-{MARKER_SPAN})); [ $s0 -lt 1 ] && s0=1; "
        '  [ "$off" -gt 0 ] && tail -c +$s0 "$F" 2>/dev/null | head -c $((off-s0+1)) '
        '| grep -q "$M" && break; '
        '  if [ $end -gt 0 ]; then [ "$off" -gt 0 ] && w=killed || w=missing; '
        f'    printf "\\n{MARKER_PRINTF} %s\\n" $w; break; fi; '
        f"  n=$((n+1)); if [ $((n % {ask_every})) -eq 1 ]; then "
        f"    st=$(squeue -h -t all -j {q(_slurm_id(slurm_id))} -o %T 2>&1); "
        f'    case "$st" in {active}) ;; '
        '      *"Invalid job id"*|"") end=1; continue ;; '
        "      [A-Z]*[A-Z]) end=1; continue ;; "
        "    esac; fi; "
        f"  sleep {poll}; "
        "done"
    )


def node_exit_codes(job_dir: str) -> str:
    """`<node> <code>` for each node that has written its exit code."""
    return (f"cd {rpath(job_dir)}/nodes 2>/dev/null || exit 0; "
            'for n in *; do [ -f "$n/exit_code" ] && echo "$n $(cat "$n/exit_code")"; done; '
            "exit 0")


def probe(python: list[str], nodes: list[str], partition: str | None, source: str,
          deep: bool, time_limit: int = 2) -> str:
    """The health probe on each of these nodes through one short `srun`, one task a node.

    Every line comes back labelled with its task (`srun -l`); each task says
    which node it is first (`UGRO_NODE n1`).
    """
    part = f" -p {q(partition)}" if partition else ""
    node_list = ",".join(nodes)
    if not re.fullmatch(r"[A-Za-z0-9_.,-]+", node_list):
        raise UgroError(f"not Slurm node names: {nodes!r}")
    body = f'echo "UGRO_NODE $SLURMD_NODENAME"; exec {join(python)} -c {q(source)} .'
    return (f"srun -l -N {len(nodes)} --ntasks-per-node=1 -w {q(node_list)}{part} "
            f"-t {time_limit} -J ugro-health bash -c {q(body + (' --deep' if deep else ''))}")


def cancel(slurm_id: str) -> str:
    return f"scancel {q(_slurm_id(slurm_id))}"


def squeue(slurm_ids: list[str]) -> str:
    ids = ",".join(_slurm_id(i) for i in slurm_ids)
    return f"squeue -h -t all -j {q(ids)} -o {q(SQUEUE_FORMAT)}"


def sacct(slurm_ids: list[str]) -> str:
    ids = ",".join(_slurm_id(i) for i in slurm_ids)
    return f"sacct -n -P -j {q(ids)} -o {q(SACCT_FIELDS)}"


def show_job(slurm_id: str) -> str:
    return f"scontrol show job -o {q(_slurm_id(slurm_id))}"


def sinfo(partition: str | None = None) -> str:
    if partition is not None and not SLURM_NAME_RE.match(partition):
        raise UgroError(f"not a Slurm partition name: {partition!r}")
    part = f" -p {q(partition)}" if partition else ""
    return f"sinfo -h -N{part} -o {q(SINFO_FORMAT)}"


