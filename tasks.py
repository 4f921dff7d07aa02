"""UGRO: a few SSH-reachable GPU PCs as one torchrun cluster. `inv --list` shows the tasks.

The collections live in ugro/tasks/ (composed there, so the installed `ugro`
command serves the same tasks); this file only hands them to Invoke.
"""

from ugro.tasks import ns  # noqa: F401
