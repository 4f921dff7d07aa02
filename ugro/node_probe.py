"""The health probe that runs on each node (stdlib only, any Python 3.8+).

UGRO sends this file's text as `python -c` over the node's one SSH session, so
a node needs nothing installed beyond its training environment. It prints one
line, `UGRO_PROBE {json}`; the control node parses it (`ugro.health`).

A plain `inv health` runs it only as `--env CACHE`, and only when the node's
environment changed since the last probe (`ugro.commands.probe`, a shell script,
does the rest): it prints `UGRO_PROBE_ENV {json}` (the Python and torch facts) and
caches them in CACHE.json, with the paths whose modification times say whether they
still hold (the interpreter, every sys.path directory, torch's own) in CACHE.paths.

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


def environment():
    report = {"python": platform.python_version(), "executable": sys.executable}
    report.update(torch_versions())
    return report


def env_paths():
    """What a change of the environment touches: the interpreter, and the directories that
    gain or lose an entry when a package is installed, upgraded or removed."""
    paths = [sys.executable] + [p for p in sys.path if p and os.path.isdir(p)]
    try:
        from importlib import metadata, util

        spec = util.find_spec("torch")
        if spec and spec.submodule_search_locations:
            paths.append(list(spec.submodule_search_locations)[0])
        paths.append(str(metadata.distribution("torch")._path))
    except Exception:
        pass
    return [os.path.abspath(p) for p in dict.fromkeys(paths) if "\n" not in p]


def cache_environment(prefix):
    report = environment()
    text = json.dumps(report)
    print("UGRO_PROBE_ENV " + text, flush=True)
    try:  # no cache (a read-only home) only costs the next probe this Python start
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        for suffix, body in ((".json", text + "\n"), (".paths", "\n".join(env_paths()) + "\n")):
            tmp = "{}{}.{}".format(prefix, suffix, os.getpid())
            with open(tmp, "w") as f:
                f.write(body)
            os.replace(tmp, prefix + suffix)
    except OSError:
        pass


def main(project_path, deep=False, smi_timeout=5.0):
    report = {
        "hostname": socket.gethostname(),
        "nvidia_smi": nvidia_smi(smi_timeout),
        "loadavg": list(os.getloadavg()),
        "project_exists": os.path.isdir(project_path),
    }
    report.update(environment())
    where = project_path if report["project_exists"] else os.path.expanduser("~")
    usage = shutil.disk_usage(where)
    report["disk"] = {"path": where, "free": usage.free, "total": usage.total}
    if deep:
        report["deep"] = deep_check()
    print("UGRO_PROBE " + json.dumps(report), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--env"]:
        cache_environment(sys.argv[2])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else ".", "--deep" in sys.argv)
