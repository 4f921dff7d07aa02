#!/usr/bin/env bash
# Set up and run UGRO's whole test suite on a Debian/Ubuntu machine.
#
# Installs what the tests need when it is missing (openssh-server, rsync, pdsh,
# Slurm and munge, Prometheus and Chromium via apt-get; the package with its
# dev/train extras into .venv), then runs pytest.
# The SSH lab tests start their own sshd daemons on 127.0.0.x: nothing else is
# contacted. Extra arguments go to pytest (e.g. tools/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
need() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || missing+=("$2"); }
need sshd openssh-server
need ssh openssh-client
need ssh-keygen openssh-client
need rsync rsync
need pdsh pdsh                 # the benchmark smoke test compares against it
need slurmctld slurmctld       # a real Slurm on loopback for the Slurm backend's tests
need slurmd slurmd
need sbatch slurm-client
need munged munge
need prometheus prometheus     # scrapes `inv monitor` in its test
need chromium chromium         # renders the dashboard in its test
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "tools/test.sh: installing ${missing[*]}"
    # The packages' own services (munge, slurm, prometheus) must not start system-wide:
    # the tests start their own daemons on loopback. policy-rc.d stops the postinst starts.
    added_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"
    [ -z "$added_policy" ] || $sudo rm -f /usr/sbin/policy-rc.d
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q -e '.[dev,train]'
exec .venv/bin/python -m pytest "$@"
