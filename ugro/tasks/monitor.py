"""The monitor task: sample the cluster, serve /metrics and the dashboard until Ctrl-C."""

from __future__ import annotations

import signal
import threading

from invoke import Collection, task

from ..errors import UgroError
from .common import cli, cluster_of, project_path


def _number(option: str, value, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UgroError(f"--{option}: expected a number, got {value!r}") from None


@task(help={
    "interval": "seconds between samples of each node (default 5)",
    "port": "dashboard and /metrics port (default 8765; 0 picks a free one)",
    "host": "address to listen on (default 127.0.0.1; any other address requires the token "
            "printed at start)",
    "retention_days": "days of samples kept in data/monitor/samples.sqlite3 (default 7)",
})
@cli
def monitor(c, interval=None, port=None, host=None, retention_days=None):
    """Watch every node's GPUs, load, memory and disk, and the jobs; serve a dashboard."""
    from ..monitor.service import Monitor, MonitorConfig

    d = MonitorConfig()
    config = MonitorConfig(
        interval=d.interval if interval is None else _number("interval", interval),
        port=d.port if port is None else _number("port", port, int),
        host=d.host if host is None else host,
        retention_days=(d.retention_days if retention_days is None
                        else _number("retention-days", retention_days)),
    )
    mon = Monitor(cluster_of(c), project_path(c, "data_dir"), config)
    stop = threading.Event()
    # systemd stops a unit with SIGTERM: end as cleanly as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with mon:
        print(f"ugro monitor: {len(mon.sampler.nodes)} nodes every {config.interval:g}s; "
              f"samples in {mon.series.path}", flush=True)
        print(f"dashboard: {mon.url}", flush=True)
        print(f"metrics:   {mon.url.split('?')[0]}metrics", flush=True)
        if mon.token:
            print(f"token:     {mon.token}  (send as ?token=, or 'Authorization: Bearer')",
                  flush=True)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    print("ugro monitor: stopped", flush=True)


ns = Collection(monitor)
