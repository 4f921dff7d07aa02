#!/usr/bin/env bash
# First-time setup of a cluster: pin the nodes' host keys (showing their
# fingerprints), create the project and data directories on every node, then
# check health. A thin wrapper over `inv init`.
set -euo pipefail
cd "$(dirname "$0")/.."
INV=inv; [ -x .venv/bin/inv ] && INV=.venv/bin/inv
exec "$INV" init "$@"
