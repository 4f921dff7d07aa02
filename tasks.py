"""UGRO: a few SSH-reachable GPU PCs as one torchrun cluster. `inv --list` shows the tasks.

This file only composes: each module in ugro/tasks/ is one collection, and its
tasks appear here at the top level (`inv health`, `inv launch`, ...).
"""

from invoke import Collection

from ugro.tasks import cluster, jobs, monitor, sync, views
from ugro.tasks.common import DEFAULTS

ns = Collection()
for sub in (cluster.ns, jobs.ns, monitor.ns, sync.ns, views.ns):
    for t in sub.tasks.values():
        ns.add_task(t)
ns.configure(DEFAULTS)
