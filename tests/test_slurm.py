"""ugro.slurm without a cluster: the batch script, the command lines, and real-format output."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ugro import slurm, slurm_parse
from ugro.errors import UgroError


def job(**over) -> slurm.BatchJob:
    fields = dict(
        job_id="exp1_20260101_120000", job_dir="/shared/ugro/exp1_20260101_120000",
        workdir="~/ugro", nodes=2, python=["~/ugro/.venv/bin/python"],
        script=["scripts/train.py", "--epochs", "3", "--note", "it's fine"],
        nproc_per_node=4, gpus_per_node=4, partition="gpu", account="ml-lab", qos="normal",
        time_limit="1-00:00:00", setup=["module load cuda/12.4"],
        env={"NCCL_DEBUG": "INFO", "WANDB_NOTES": "a b"},
    )
    fields.update(over)
    return slurm.BatchJob(**fields)


# What batch_script(job()) must render, byte for byte.
EXPECTED_SCRIPT = (Path(__file__).parent / "data" / "slurm_batch.sh").read_text()


def test_batch_script_exact():
    assert slurm.batch_script(job()) == EXPECTED_SCRIPT


def test_batch_script_is_valid_bash_and_minimal_without_options():
    text = slurm.batch_script(job(gpus_per_node=0, partition=None, account=None, qos=None,
                                  time_limit=None, setup=[], env={}))
    assert [line for line in text.splitlines() if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=exp1_20260101_120000", "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1"]
    assert "--gres" not in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_node_script_passes_script_arguments_through_intact():
    # What bash -c receives, run with echo in torchrun's place, gives back the argv.
    node = slurm.node_script(job(python=["printf", "%s\\n"], script=["a b", "$HOME", "it's"]))
    line = next(x for x in node.splitlines() if "torch.distributed.run" in x)
    cmd = line.split(" >")[0]
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True,
                         env={"SLURM_NNODES": "2", "UGRO_RDZV_HOST": "h", "UGRO_RDZV_PORT": "1",
                              "is_host": "1", "addr": "a"}).stdout
    assert out.splitlines()[-3:] == ["a b", "$HOME", "it's"]


@pytest.mark.parametrize("over, message", [
    ({"job_id": "a b"}, "job id"),
    ({"job_id": "x\n#SBATCH --uid=0"}, "job id"),
    ({"nodes": 0}, "nodes: not a positive integer"),
    ({"nodes": "2"}, "nodes: not a positive integer"),
    ({"nproc_per_node": True}, "nproc_per_node"),
    ({"gpus_per_node": -1}, "gpus_per_node"),
    ({"partition": "gpu --uid=0"}, "partition: not a Slurm name"),
    ({"account": ""}, "account: not a Slurm name"),
    ({"qos": "a\nb"}, "qos"),
    ({"time_limit": "1 day"}, "time_limit"),
    ({"time_limit": "1-"}, "time_limit"),
    ({"job_dir": "relative/dir"}, "job_dir: not an absolute path"),
    ({"workdir": ""}, "workdir"),
    ({"python": []}, "python"),
    ({"script": ["ok", ""]}, "script"),
    ({"setup": ["two\nlines"]}, "setup"),
    ({"env": {"BAD-KEY": "x"}}, "env: not an environment variable name"),
    ({"env": {"K": 3}}, "env.K: not a string"),
    ({"script": ["a\0b"]}, "NUL"),
])
def test_bad_batch_jobs_are_one_line_errors(over, message):
    with pytest.raises(UgroError, match=message) as err:
        job(**over)
    assert "\n" not in str(err.value).replace("\\n", "")


@pytest.mark.parametrize("limit", ["30", "30:00", "2:00:00", "1-0", "1-12:00", "7-00:00:00",
                                   "UNLIMITED"])
def test_time_limits_slurm_accepts(limit):
    assert job(time_limit=limit).time_limit == limit


def test_command_lines():
    assert slurm.cancel("4242") == "scancel 4242"
    assert slurm.squeue(["4242", "4243"]) == "squeue -h -t all -j 4242,4243 -o '%i|%T|%r|%D|%N'"
    assert slurm.sacct(["4242"]) == "sacct -n -P -j 4242 -o JobID,State,ExitCode,NodeList"
    assert slurm.show_job("4242") == "scontrol show job -o 4242"
    assert slurm.sinfo() == "sinfo -h -N -o '%N|%P|%T|%c|%m|%G|%E'"
    assert slurm.sinfo("gpu") == "sinfo -h -N -p gpu -o '%N|%P|%T|%c|%m|%G|%E'"
    for bad in ("4242; rm -rf /", "", "-1", "abc"):
        with pytest.raises(UgroError, match="not a Slurm job id"):
            slurm.cancel(bad)
    with pytest.raises(UgroError, match="partition"):
        slurm.sinfo("gpu;reboot")


@pytest.mark.parametrize("state, status", [
    ("PENDING", "QUEUED"), ("CONFIGURING", "QUEUED"), ("REQUEUED", "QUEUED"),
    ("RUNNING", "RUNNING"), ("COMPLETING", "RUNNING"), ("SUSPENDED", "RUNNING"),
    ("COMPLETED", "COMPLETED"),
    ("FAILED", "FAILED"), ("TIMEOUT", "FAILED"), ("NODE_FAIL", "FAILED"),
    ("OUT_OF_MEMORY", "FAILED"), ("PREEMPTED", "FAILED"), ("BOOT_FAIL", "FAILED"),
    ("DEADLINE", "FAILED"),
    ("CANCELLED", "CANCELLED"), ("CANCELLED by 1000", "CANCELLED"), ("CANCELLED+", "CANCELLED"),
])
def test_states_map_to_ugro_statuses(state, status):
    assert slurm_parse.status(state) == status


@pytest.mark.parametrize("state", ["", "running", "DONE", "<html>"])
def test_unknown_states_are_errors(state):
    with pytest.raises(UgroError, match="unknown Slurm job state"):
        slurm_parse.status(state)


def test_parse_submit():
    assert slurm_parse.parse_submit("4242\n") == "4242"
    assert slurm_parse.parse_submit("4242;cluster2\n") == "4242"
    with pytest.raises(UgroError, match="sbatch: expected a job id"):
        slurm_parse.parse_submit("sbatch: error: Batch job submission failed: "
                           "Invalid partition name specified\n")
    with pytest.raises(UgroError):
        slurm_parse.parse_submit("")


SQUEUE = """\
6|PENDING|Resources|1|
5|RUNNING|None|2|n[1-2]
4301|PENDING|ReqNodeNotAvail, UnavailableNodes:gpu[03-04]|2|
4302|COMPLETED|None|2|gpu[01-02]
"""


def test_parse_squeue():
    jobs = slurm_parse.parse_squeue(SQUEUE)
    assert [(j.slurm_id, j.state, j.status, j.reason, j.nodelist) for j in jobs] == [
        ("6", "PENDING", "QUEUED", "Resources", None),
        ("5", "RUNNING", "RUNNING", None, "n[1-2]"),
        ("4301", "PENDING", "QUEUED", "ReqNodeNotAvail, UnavailableNodes:gpu[03-04]", None),
        ("4302", "COMPLETED", "COMPLETED", None, "gpu[01-02]"),
    ]
    assert slurm_parse.parse_squeue("") == []


@pytest.mark.parametrize("text, message", [
    ("garbage\n", "squeue: line 1: expected 5"),
    ("5|RUNNING|None|2|n1\n6|WEIRD|None|1|\n", "unknown Slurm job state: 'WEIRD'"),
    ("x5|RUNNING|None|2|n1\n", "squeue: not a Slurm job id"),
    ("slurm_load_jobs error: Invalid job id specified\n", "squeue: line 1"),
])
def test_parse_squeue_garbage(text, message):
    with pytest.raises(UgroError, match=message):
        slurm_parse.parse_squeue(text)


SACCT = """\
4242|FAILED|3:0|gpu[01-02]
4242.batch|FAILED|3:0|gpu01
4242.extern|COMPLETED|0:0|gpu[01-02]
4242.0|FAILED|3:0|gpu[01-02]
4243|CANCELLED by 1000|0:15|gpu03
4244|PENDING|0:0|None assigned
"""


def test_parse_sacct():
    rows = slurm_parse.parse_sacct(SACCT)
    assert [(r.slurm_id, r.status, r.exit_code, r.signal, r.nodelist, r.is_step)
            for r in rows] == [
        ("4242", "FAILED", 3, 0, "gpu[01-02]", False),
        ("4242.batch", "FAILED", 3, 0, "gpu01", True),
        ("4242.extern", "COMPLETED", 0, 0, "gpu[01-02]", True),
        ("4242.0", "FAILED", 3, 0, "gpu[01-02]", True),
        ("4243", "CANCELLED", 0, 15, "gpu03", False),
        ("4244", "QUEUED", 0, 0, None, False),
    ]


@pytest.mark.parametrize("text, message", [
    ("Slurm accounting storage is disabled\n", "sacct: line 1: expected 4"),
    ("4242|FAILED|three|gpu01\n", "sacct: not an exit code: 'three'"),
])
def test_parse_sacct_garbage(text, message):
    with pytest.raises(UgroError, match=message):
        slurm_parse.parse_sacct(text)


# From the lab: `scontrol show job -o 6` while it waited, and the indented form.
SHOW_PENDING = (
    "JobId=6 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901754 "
    "Nice=0 Account=(null) QOS=(null) JobState=PENDING Reason=Resources Dependency=(null) "
    "Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00 "
    "TimeLimit=UNLIMITED TimeMin=N/A SubmitTime=2026-12-04T04:25:08 "
    "StartTime=2027-12-04T04:25:09 EndTime=Unknown Deadline=N/A Partition=debug "
    "AllocNode:Sid=localhost:2938 ReqNodeList=(null) ExcNodeList=(null) NodeList= "
    "NumNodes=1-1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* "
    "TRES=cpu=1,mem=1000M,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* "
    "Command=(null) WorkDir=/tmp/sl StdErr=/dev/null StdIn=/dev/null StdOut=/dev/null Power= \n"
)
SHOW_DONE = """\
JobId=7 JobName=ugro-exp
   UserId=root(0) GroupId=root(0) MCS_label=N/A
   JobState=FAILED Reason=NonZeroExitCode Dependency=(null)
   Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=3:0
   NodeList=n[1-2]
   Command=/tmp/my job/batch.sh
   WorkDir=/tmp/my job

JobId=8 JobName=other
   JobState=CANCELLED Reason=None Dependency=(null)
   ExitCode=0:15
   NodeList=n1
"""


def test_parse_show_job():
    [pending] = slurm_parse.parse_show_job(SHOW_PENDING)
    assert (pending.slurm_id, pending.status, pending.reason, pending.nodelist) == (
        "6", "QUEUED", "Resources", None)
    failed, cancelled = slurm_parse.parse_show_job(SHOW_DONE)
    assert (failed.status, failed.exit_code, failed.signal, failed.nodelist) == (
        "FAILED", 3, 0, "n[1-2]")
    assert (cancelled.status, cancelled.signal) == ("CANCELLED", 15)
    records = slurm_parse.parse_scontrol(SHOW_DONE)
    assert records[0]["WorkDir"] == "/tmp/my job"
    assert records[0]["Command"] == "/tmp/my job/batch.sh"
    assert slurm_parse.parse_show_job("") == []


def test_parse_scontrol_node_keeps_values_with_spaces():
    text = ("NodeName=n1 Arch=x86_64 CoresPerSocket=1 CPUAlloc=0 NodeAddr=127.0.0.1 "
            "NodeHostName=localhost Version=22.05.8 OS=Linux 6.1.0-18-amd64 #1 SMP "
            "PREEMPT_DYNAMIC Debian 6.1.76-1 (2024-02-01)  RealMemory=500 State=DOWN+DRAIN "
            "Reason=Not responding [slurm@2026-12-04T04:25:09]\n")
    [node] = slurm_parse.parse_scontrol(text)
    assert node["OS"] == "Linux 6.1.0-18-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 (2024-02-01)"
    assert node["Reason"] == "Not responding [slurm@2026-12-04T04:25:09]"
    assert node["NodeAddr"] == "127.0.0.1"


@pytest.mark.parametrize("text, message", [
    ("slurm_load_jobs error: Invalid job id specified\n", "expected JobId= or NodeName="),
    ("Partition=debug JobId=5\n", "expected JobId= or NodeName="),
    ("NodeName=n1 State=IDLE\n", "not a job record"),
    ("JobId=5 JobState=RUNNING ExitCode=zero\n", "not an exit code"),
])
def test_parse_show_job_garbage(text, message):
    with pytest.raises(UgroError, match=message):
        slurm_parse.parse_show_job(text)


SINFO = """\
n1|debug*|idle|2|500|(null)|none
gpu01|gpu|mixed|64|515000|gpu:a100:4|none
gpu02|gpu|down*|64|515000|gpu:a100:4(S:0-1)|Not responding
gpu03|gpu|drained|64|515000|gpu:a100:4|bad gpu [root@2026-01-01T00:00:00]
gpu04|gpu|allocated|64|515000|gpu:a100:4|none
gpu05|gpu|idle~|64|515000|gpu:a100:4|none
"""


def test_parse_sinfo():
    nodes = slurm_parse.parse_sinfo(SINFO)
    assert [(n.name, n.partition, n.state, n.usable) for n in nodes] == [
        ("n1", "debug", "idle", True),
        ("gpu01", "gpu", "mixed", True),
        ("gpu02", "gpu", "down*", False),
        ("gpu03", "gpu", "drained", False),
        ("gpu04", "gpu", "allocated", True),
        ("gpu05", "gpu", "idle~", False),
    ]
    assert (nodes[0].cpus, nodes[0].memory_mb, nodes[0].gres, nodes[0].reason) == (
        2, 500, None, None)
    assert nodes[3].reason == "bad gpu [root@2026-01-01T00:00:00]"
    assert nodes[1].gres == "gpu:a100:4"


@pytest.mark.parametrize("text, message", [
    ("PARTITION AVAIL  TIMELIMIT  NODES  STATE NODELIST\n", "sinfo: line 1: expected 7"),
    ("n1|debug*|idle|two|500|(null)|none\n", "CPUs and memory must be numbers"),
])
def test_parse_sinfo_garbage(text, message):
    with pytest.raises(UgroError, match=message):
        slurm_parse.parse_sinfo(text)


def test_parse_exit_codes():
    assert slurm_parse.parse_exit_codes("n1 0\nn2 137\n\nn3 \n") == {"n1": "0", "n2": "137"}


def test_parse_probe_output_by_node():
    out = ("0: UGRO_NODE n1\n1: UGRO_NODE n2\n0: UGRO_PROBE {\"a\": 1}\n"
           "1: UGRO_PROBE {\"b\": 2}\n1: second line\n2: no node line\n")
    assert slurm_parse.parse_probe_output(out) == {
        "n1": 'UGRO_PROBE {"a": 1}', "n2": 'UGRO_PROBE {"b": 2}\nsecond line'}
