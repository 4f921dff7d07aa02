#!/usr/bin/env bash
# Health of every node, for cron or a shell habit: a thin wrapper over `inv health`.
# Exit status is non-zero when any node is unhealthy. Arguments go to the task
# (e.g. tools/health_check.sh --json).
set -euo pipefail
cd "$(dirname "$0")/.."
INV=inv; [ -x .venv/bin/inv ] && INV=.venv/bin/inv
exec "$INV" health "$@"
