"""The Invoke task collections, composed into one namespace for `inv`, `fab` and `ugro`.

Tasks are thin: parse options, call a function in `ugro`, print, pick the exit
code. `cli` turns a user-caused `UgroError` into one line and a non-zero exit.
Each module here is one collection; its tasks appear at the top level
(`inv health`, `inv launch`, ...).
"""

import sys

# Invoke stops Python writing bytecode caches before it loads the tasks file (its
# `--write-pyc` flag), and the setting then holds for every module of the package too: each
# `inv` command would compile them all from source again (30-80 ms a command, more for a
# launch). The package keeps Python's usual caches; PYTHONDONTWRITEBYTECODE or -B still
# turn them off.
sys.dont_write_bytecode = sys.flags.dont_write_bytecode

from invoke import Collection  # noqa: E402

from . import cluster, jobs, monitor, sync, views  # noqa: E402
from .common import DEFAULTS  # noqa: E402

ns = Collection()
for sub in (cluster.ns, jobs.ns, monitor.ns, sync.ns, views.ns):
    for t in sub.tasks.values():
        ns.add_task(t)
ns.configure(DEFAULTS)
