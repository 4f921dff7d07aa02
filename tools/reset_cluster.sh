#!/usr/bin/env bash
# The emergency button: stop every UGRO-started job on every node (by the
# process groups the jobs recorded) and mark those jobs CANCELLED.
# A thin wrapper over `inv reset`.
set -euo pipefail
cd "$(dirname "$0")/.."
INV=inv; [ -x .venv/bin/inv ] && INV=.venv/bin/inv
exec "$INV" reset "$@"
