#!/usr/bin/env bash
# Bring every worker's Python environment to the lock and compare fingerprints, for
# cron or a shell habit: a thin wrapper over `inv sync-envs`. Exit status is non-zero
# when a node failed or the environments differ. Arguments go to the task
# (e.g. tools/sync_envs.sh --find-links /srv/wheels --no-index).
set -euo pipefail
cd "$(dirname "$0")/.."
INV=inv; [ -x .venv/bin/inv ] && INV=.venv/bin/inv
exec "$INV" sync-envs "$@"
