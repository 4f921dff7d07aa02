#!/usr/bin/env bash
# Copy the project's code to every worker, for cron or a shell habit: a thin wrapper
# over `inv sync`. Exit status is non-zero when any node failed. Arguments go to the
# task (e.g. tools/sync.sh --dry-run, tools/sync.sh --nodes gpu1 --delete).
set -euo pipefail
cd "$(dirname "$0")/.."
INV=inv; [ -x .venv/bin/inv ] && INV=.venv/bin/inv
exec "$INV" sync "$@"
