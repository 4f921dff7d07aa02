"""The Invoke task collections, composed into one namespace for `inv`, `fab` and `ugro`.

Tasks are thin: parse options, call a function in `ugro`, print, pick the exit
code. `cli` turns a user-caused `UgroError` into one line and a non-zero exit.
Each module here is one collection; its tasks appear at the top level
(`inv health`, `inv launch`, ...).
"""

from invoke import Collection

from . import cluster, jobs, monitor, sync, views
from .common import DEFAULTS

ns = Collection()
for sub in (cluster.ns, jobs.ns, monitor.ns, sync.ns, views.ns):
    for t in sub.tasks.values():
        ns.add_task(t)
ns.configure(DEFAULTS)
