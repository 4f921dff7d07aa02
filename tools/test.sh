#!/usr/bin/env bash
# Set up and run UGRO's whole test suite on a Debian/Ubuntu machine.
#
# Installs what the tests need when it is missing (openssh-server, rsync, pdsh
# via apt-get; the package with its dev/train extras into .venv), then runs pytest.
# The SSH lab tests start their own sshd daemons on 127.0.0.x: nothing else is
# contacted. Extra arguments go to pytest (e.g. tools/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null || missing+=(openssh-server)
command -v ssh >/dev/null || missing+=(openssh-client)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)
command -v rsync >/dev/null || missing+=(rsync)
command -v pdsh >/dev/null || missing+=(pdsh)   # the benchmark smoke test compares against it
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "tools/test.sh: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q -e '.[dev,train]'
exec .venv/bin/python -m pytest "$@"
