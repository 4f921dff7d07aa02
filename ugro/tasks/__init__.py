"""The Invoke task collections, composed into one namespace for `inv`, `fab` and `ugro`.

Tasks are thin: parse options, call a function in `ugro`, print, pick the exit
code. `cli` turns a user-caused `UgroError` into one line and a non-zero exit.
Each module here is one collection; its tasks appear at the top level
(`inv health`, `inv launch`, ...).
"""

from .common import DEFAULTS, keep_bytecode

keep_bytecode()  # before the task modules load (`inv`, which loads tasks.py after setting it)

from invoke import Collection  # noqa: E402

from . import cluster, jobs, monitor, sync, views  # noqa: E402

ns = Collection()
for sub in (cluster.ns, jobs.ns, monitor.ns, sync.ns, views.ns):
    for t in sub.tasks.values():
        ns.add_task(t)
ns.configure(DEFAULTS)
