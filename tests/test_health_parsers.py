"""Health parsing and verdicts: pure functions over real-format text, and the probe itself."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from ugro.config import Node
from ugro.health import (
    GIB,
    Gpu,
    NodeHealth,
    assess,
    drift,
    parse_nvidia_smi,
    parse_probe,
    table,
)

ROOT = Path(__file__).resolve().parents[1]

RTX4070 = "0, NVIDIA GeForce RTX 4070, 8188, 415, 3, 38, 550.54.14"
TWO_3090 = """\
0, NVIDIA GeForce RTX 3090, 24576, 23011, 98, 71, 535.183.01
1, NVIDIA GeForce RTX 3090, 24576, 22987, 97, 69, 535.183.01
"""


def test_one_gpu():
    assert parse_nvidia_smi(RTX4070 + "\n") == [
        Gpu(0, "NVIDIA GeForce RTX 4070", 8188, 415, 3, 38, "550.54.14"),
    ]


def test_several_gpus_and_blank_lines():
    gpus = parse_nvidia_smi("\n" + TWO_3090.replace("\n", "\n   \n", 1) + "\n\n")
    assert [(g.index, g.memory_used_mib, g.utilization_pct, g.temperature_c) for g in gpus] == [
        (0, 23011, 98, 71), (1, 22987, 97, 69),
    ]
    assert {g.name for g in gpus} == {"NVIDIA GeForce RTX 3090"}
    assert {g.driver for g in gpus} == {"535.183.01"}


def test_unknown_fields_are_none():
    text = ("0, NVIDIA A100-SXM4-40GB, 40960, 0, [N/A], [Not Supported], 550.54.14\n"
            "1, Tesla T4, [N/A], N/A, [Not Supported], 41, [N/A]\r\n")
    assert parse_nvidia_smi(text) == [
        Gpu(0, "NVIDIA A100-SXM4-40GB", 40960, 0, None, None, "550.54.14"),
        Gpu(1, "Tesla T4", None, None, None, 41, None),
    ]


def test_nothing_is_no_gpus():
    assert parse_nvidia_smi("") == []
    assert parse_nvidia_smi("\n  \n") == []


@pytest.mark.parametrize("text,message", [
    ("0, NVIDIA GeForce RTX 4070, 8188, 415, 3, 38",
     "nvidia-smi line 1: expected 7 fields, got 6"),
    (RTX4070 + ", extra", "nvidia-smi line 1: expected 7 fields, got 8"),
    (f"{RTX4070}\n\nNVIDIA-SMI has failed because it couldn't communicate with the driver.",
     "nvidia-smi line 3: expected 7 fields, got 1"),
    (f"{RTX4070}\n1, NVIDIA GeForce RTX 4070, lots, 415, 3, 38, 550.54.14",
     "nvidia-smi line 2: not a number in "
     "'1, NVIDIA GeForce RTX 4070, lots, 415, 3, 38, 550.54.14'"),
    ("index, name, memory.total [MiB], memory.used [MiB], utilization.gpu [%], "
     "temperature.gpu, driver_version",
     "nvidia-smi line 1: not a number in 'index, name, memory.total [MiB], memory.used [MiB], "
     "utilization.gpu [%], temperature.gpu, driver_version'"),
    ("[N/A], GPU, 8188, 415, 3, 38, 550.54.14",
     "nvidia-smi line 1: not a number in '[N/A], GPU, 8188, 415, 3, 38, 550.54.14'"),
    ("0, GPU, nan, 415, 3, 38, 550.54.14",
     "nvidia-smi line 1: not a number in '0, GPU, nan, 415, 3, 38, 550.54.14'"),
    ("\x00\xff\ufffd", "nvidia-smi line 1: expected 7 fields, got 1"),
])
def test_garbage_is_a_value_error_naming_the_line(text, message):
    with pytest.raises(ValueError) as exc:
        parse_nvidia_smi(text)
    assert str(exc.value) == message


@pytest.mark.parametrize("memory", ["inf", "1e999"])
def test_infinite_number_is_a_value_error(memory):
    with pytest.raises(ValueError, match="nvidia-smi line 1: not a number"):
        parse_nvidia_smi(f"0, GPU, {memory}, 415, 3, 38, 550.54.14")


REPORT = {
    "hostname": "gpu1",
    "python": "3.11.7",
    "executable": "/home/ob/projects/UGRO/.pixi/envs/default/bin/python",
    "nvidia_smi": {"status": "ok", "csv": RTX4070 + "\n"},
    "loadavg": [0.52, 0.41, 0.3],
    "project_exists": True,
    "torch": "2.13.0",
    "torch_cuda": "12.8",
    "disk": {"path": "/home/ob/projects/UGRO", "free": 120 * GIB, "total": 500 * GIB},
}


def test_probe_found_among_login_noise():
    out = ("Welcome to Ubuntu 24.04.1 LTS (GNU/Linux 6.8.0-45-generic x86_64)\n"
           " * Documentation:  https://help.ubuntu.com\n"
           "echo UGRO_PROBE is how ugro checks this box\n"
           "Last login: Sun Nov 29 14:02:11 2026 from 127.0.0.100\n"
           f"UGRO_PROBE {json.dumps(REPORT)}\n"
           "logout\n")
    assert parse_probe(out) == REPORT


def test_last_probe_line_wins():
    out = 'UGRO_PROBE {"hostname": "old"}\nUGRO_PROBE {"hostname": "new"}\r\n'
    assert parse_probe(out) == {"hostname": "new"}


@pytest.mark.parametrize("out,message", [
    ("", "no probe report in the output"),
    ("bash: pixi: command not found\n", "no probe report in the output"),
    ('UGRO_PROBE{"a": 1}\n', "no probe report in the output"),
    ('  UGRO_PROBE {"a": 1}\n', "no probe report in the output"),
    ('UGRO_PROBE {"a": 1\n', "probe report is not JSON (Expecting ',' delimiter)"),
    ("UGRO_PROBE \n", "probe report is not JSON (Expecting value)"),
    ("UGRO_PROBE [1, 2]\n", "probe report is not a JSON object"),
    ("UGRO_PROBE null\n", "probe report is not a JSON object"),
    ('UGRO_PROBE "text"\n', "probe report is not a JSON object"),
])
def test_bad_probe_output(out, message):
    with pytest.raises(ValueError) as exc:
        parse_probe(out)
    assert str(exc.value) == message


def gpu_node(name="gpu1", gpus=1, host="127.0.0.101") -> Node:
    return Node(name=name, host=host, user="ob", project_path="/home/ob/projects/UGRO",
                gpus=gpus)


def report(**changes) -> dict:
    return {**REPORT, **changes}


def test_healthy_node():
    h = assess(gpu_node(), REPORT, 0.42)
    assert h.healthy and h.problems == [] and h.warnings == []
    assert (h.node, h.address, h.seconds) == ("gpu1", "127.0.0.101", 0.42)
    assert (h.hostname, h.python, h.torch, h.torch_cuda) == ("gpu1", "3.11.7", "2.13.0", "12.8")
    assert h.driver == "550.54.14"
    assert h.gpus == [Gpu(0, "NVIDIA GeForce RTX 4070", 8188, 415, 3, 38, "550.54.14")]
    assert h.disk_free_gib == 120.0
    assert h.loadavg == [0.52, 0.41, 0.3]
    assert h.deep is None
    assert json.loads(json.dumps(h.as_dict()))["gpus"][0]["memory_total_mib"] == 8188


def test_cpu_node_without_nvidia_smi_is_healthy():
    h = assess(gpu_node(gpus=0), report(nvidia_smi={"status": "absent"}), 0.1)
    assert h.healthy and h.gpus == [] and h.driver is None


@pytest.mark.parametrize("changes,gpus,problems", [
    ({"torch": None, "torch_cuda": None}, 1, ["torch is not installed in the node's Python"]),
    ({"nvidia_smi": {"status": "error", "code": 9,
                     "error": "NVIDIA-SMI has failed because it couldn't communicate"}}, 1,
     ["nvidia-smi failed: NVIDIA-SMI has failed because it couldn't communicate"]),
    ({"nvidia_smi": {"status": "absent"}}, 1, ["config says 1 GPU(s), found none"]),
    ({"nvidia_smi": {"status": "ok", "csv": ""}}, 2, ["config says 2 GPU(s), found none"]),
    ({}, 2, ["config says 2 GPU(s), found 1"]),
    ({"nvidia_smi": {"status": "ok", "csv": "garbage\n"}}, 1,
     ["nvidia-smi line 1: expected 7 fields, got 1", "config says 1 GPU(s), found none"]),
    ({"deep": {"ok": False, "error": "CUDA init: no CUDA-capable device is detected"}}, 1,
     ["CUDA init: no CUDA-capable device is detected"]),
    ({"deep": {"ok": False}}, 1, ["deep check failed"]),
    ({"deep": {"ok": True, "cuda_available": False}}, 1, ["torch cannot use CUDA"]),
])
def test_problems_make_a_node_unhealthy(changes, gpus, problems):
    h = assess(gpu_node(gpus=gpus), report(**changes), 1.0)
    assert h.problems == problems
    assert not h.healthy


def test_deep_check_passing():
    deep = {"ok": True, "cuda_available": True, "device_count": 1, "nccl": "2.21.5"}
    h = assess(gpu_node(), report(deep=deep), 2.5)
    assert h.healthy and h.deep == deep


def test_warnings_leave_a_node_healthy():
    disk = {"path": "/home/ob", "free": int(1.5 * GIB), "total": 500 * GIB}
    h = assess(gpu_node(), report(disk=disk, project_exists=False), 0.3)
    assert h.healthy
    assert h.warnings == [
        "only 1.5 GiB free at /home/ob",
        "project path /home/ob/projects/UGRO does not exist",
    ]
    assert h.disk_free_gib == 1.5


def fleet() -> list[NodeHealth]:
    master = assess(gpu_node("gpu-master", host="127.0.0.100"),
                    report(hostname="gpu-master"), 0.1)
    gpu1 = assess(gpu_node("gpu1"), REPORT, 0.2)
    smi = {"status": "ok", "csv": "0, NVIDIA GeForce RTX 3070 Ti, 8192, 1, 0, 35, 535.183.01"}
    gpu2 = assess(gpu_node("gpu2", host="127.0.0.102"),
                  report(hostname="gpu2", torch="2.5.1", nvidia_smi=smi), 0.3)
    dead = NodeHealth("gpu3", "127.0.0.103", False, ["connection refused"], seconds=5.0)
    return [master, gpu1, gpu2, dead]


def test_drift_names_each_version_and_its_nodes():
    assert drift(fleet()) == [
        "torch differs: 2.13.0 on gpu-master, gpu1; 2.5.1 on gpu2",
        "driver differs: 550.54.14 on gpu-master, gpu1; 535.183.01 on gpu2",
    ]


def test_no_drift():
    assert drift(fleet()[:2]) == []
    assert drift([]) == []


def test_table_has_a_row_per_node():
    text = table(fleet())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["node", "address", "status"]
    rows = {line.split()[0]: line for line in lines[2:] if line and not line.startswith(" ")}
    assert set(rows) == {"gpu-master", "gpu1", "gpu2", "gpu3"}
    assert rows["gpu1"].split()[1:3] == ["127.0.0.101", "ok"]
    assert "0:NVIDIA GeForce RTX 4070 0.4/8G 3% 38C" in rows["gpu1"]
    assert "120G" in rows["gpu1"] and "0.52" in rows["gpu1"]
    assert rows["gpu3"].split()[1:3] == ["127.0.0.103", "UNHEALTHY"]
    assert "connection refused" in rows["gpu3"]


def test_table_shows_warnings():
    h = assess(gpu_node(), report(project_exists=False), 0.1)
    assert "warning: project path /home/ob/projects/UGRO does not exist" in table([h])


def run_python(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, **kw)


def installed_torch() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def test_node_probe_output_parses(tmp_path):
    out = run_python("ugro/node_probe.py", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("UGRO_PROBE {")
    r = parse_probe(out.stdout)
    assert r["project_exists"] is True
    assert r["disk"]["path"] == str(tmp_path)
    assert r["disk"]["free"] > 0
    assert r["python"] == ".".join(map(str, sys.version_info[:3]))
    assert r["torch"] == installed_torch()
    assert r["nvidia_smi"]["status"] in ("ok", "absent", "error")
    assert "deep" not in r
    h = assess(Node(name="n", host="127.0.0.1", user="u", local=True,
                    project_path=str(tmp_path)), r, 0.1)
    assert h.hostname and h.disk_free_gib is not None


def test_node_probe_missing_project_falls_back_to_home(tmp_path):
    r = parse_probe(run_python("ugro/node_probe.py", str(tmp_path / "nope")).stdout)
    assert r["project_exists"] is False
    assert r["disk"]["path"] == str(Path.home())


TORCH_VERSIONS = (
    "import json, sys; sys.path.insert(0, 'ugro'); import node_probe; "
    "v = node_probe.torch_versions(); assert 'torch' not in sys.modules, 'imported'; "
    "print(json.dumps(v))"
)


def test_torch_version_read_without_importing_torch():
    out = run_python("-c", TORCH_VERSIONS)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["torch"] == installed_torch()


def test_torch_cuda_read_from_version_file(tmp_path):
    # A stand-in torch that fails if imported; its version comes from metadata,
    # its CUDA build from torch/version.py, as a real CUDA wheel has them.
    pkg = tmp_path / "torch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    (pkg / "version.py").write_text(
        "from typing import Optional\n__version__ = '2.99.0+cu128'\ndebug = False\n"
        "cuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n"
    )
    info = tmp_path / "torch-2.99.0+cu128.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.99.0+cu128\n")
    out = run_python("-c", TORCH_VERSIONS, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"torch": "2.99.0+cu128", "torch_cuda": "12.8"}
