"""`inv monitor`: the cluster sampled every few seconds, kept, exported and shown.

Data flow: `sampler` (one SSH connection and thread per node, `commands.monitor_sample`, parsed
by `sample`; job progress from the control node's files by `progress`) -> `series` (SQLite,
one transaction per sample) -> `exporter` (`/metrics`) and `dashboard` (JSON) -> `web` (HTTP).
`service.Monitor` runs them together. Other processes read the newest sample with `latest()`.
"""

from .series import Snapshot, latest

__all__ = ["Snapshot", "latest"]
