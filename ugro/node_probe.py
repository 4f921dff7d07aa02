"""The health probe that runs on each node (stdlib only, any Python 3.8+).

UGRO sends this file's text as `python -c` over the node's one SSH session, so
a node needs nothing installed beyond its training environment. It prints one
line, `UGRO_PROBE {json}`; the control node parses it (`ugro.health`).

torch and its CUDA build are read from package metadata and torch/version.py,
never by importing torch, which costs over a second per node; `deep` imports it
and checks that CUDA really initialises.
"""

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys

GPU_QUERY = "index,name,memory.total,memory.used,utilization.gpu,temperature.gpu,driver_version"


def torch_versions():
    try:
        from importlib import metadata, util

        version = metadata.version("torch")
        spec = util.find_spec("torch")
    except Exception as exc:  # not installed, or broken metadata
        return {"torch": None, "torch_error": type(exc).__name__}
    cuda = None
    if spec and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
        try:
            with open(path) as f:
                m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
            cuda = m.group(1) if m else None
        except OSError:
            pass
    return {"torch": version, "torch_cuda": cuda}


def nvidia_smi(timeout):
    cmd = ["nvidia-smi", "--query-gpu=" + GPU_QUERY, "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return {"status": "absent"}
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": "nvidia-smi timed out"}
    except OSError as exc:
        return {"status": "error", "error": str(exc)}
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines() or ["no output"]
        return {"status": "error", "error": lines[0][:200], "code": out.returncode}
    return {"status": "ok", "csv": out.stdout}


def deep_check():
    try:
        import torch
    except Exception as exc:
        return {"ok": False, "error": "import torch: {}".format(exc)}
    info = {"ok": True, "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        try:
            torch.zeros(1, device="cuda")
            info["device_count"] = torch.cuda.device_count()
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:
            info.update(ok=False, error="CUDA init: {}".format(exc))
    return info


def main(project_path, deep=False, smi_timeout=5.0):
    report = {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "nvidia_smi": nvidia_smi(smi_timeout),
        "loadavg": list(os.getloadavg()),
        "project_exists": os.path.isdir(project_path),
    }
    report.update(torch_versions())
    where = project_path if report["project_exists"] else os.path.expanduser("~")
    usage = shutil.disk_usage(where)
    report["disk"] = {"path": where, "free": usage.free, "total": usage.total}
    if deep:
        report["deep"] = deep_check()
    print("UGRO_PROBE " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".", "--deep" in sys.argv)
