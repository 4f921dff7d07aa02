"""The monitor as one running thing: the sampler, its series, and the web server over them."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from ..config import Cluster
from ..errors import UgroError
from .sampler import Sampler
from .series import Series, Snapshot, db_path
from .web import MonitorServer


@dataclass(frozen=True)
class MonitorConfig:
    interval: float = 5.0
    host: str = "127.0.0.1"
    port: int = 8765
    retention_days: float = 7.0

    def __post_init__(self):
        if not 0.5 <= self.interval <= 3600:
            raise UgroError(f"--interval {self.interval:g}: expected 0.5 to 3600 seconds")
        if not 0 <= self.port <= 65535:
            raise UgroError(f"--port {self.port}: expected 0 to 65535")
        if not 0 < self.retention_days <= 3650:
            raise UgroError(f"--retention-days {self.retention_days:g}: expected 0 to 3650")
        if not self.host:
            raise UgroError("--host: an address to listen on is required")

    @property
    def needs_token(self) -> bool:
        # Only the default's own address is open; on any other one (even another loopback
        # address, which a container or port forward may expose) the token is required.
        return self.host not in ("127.0.0.1", "localhost", "::1")


class Monitor:
    """`start()` samples the cluster and serves the dashboard; `stop()` ends both cleanly."""

    def __init__(self, cluster: Cluster, data_dir: Path, config: MonitorConfig):
        self.cluster = cluster
        self.data_dir = Path(data_dir)
        self.config = config
        self.interval = config.interval
        self.token = secrets.token_urlsafe(24) if config.needs_token else None
        self.series = Series(db_path(self.data_dir), config.retention_days * 86400)
        self.sampler = Sampler(cluster, self.data_dir, self.series, config.interval)
        try:
            self.server = MonitorServer((config.host, config.port), self, self.token)
        except OSError as exc:
            self.series.close()
            raise UgroError(f"cannot listen on {config.host}:{config.port}: "
                            f"{exc.strerror or exc}") from None
        self._serving: threading.Thread | None = None

    def snapshot(self) -> Snapshot:
        return self.series.latest()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        base = f"http://{host}:{self.port}/"
        return base + (f"?token={self.token}" if self.token else "")

    def start(self) -> Monitor:
        self.sampler.start()
        self._serving = threading.Thread(target=self.server.serve_forever,
                                         name="ugro-monitor-http", daemon=True)
        self._serving.start()
        return self

    def stop(self) -> None:
        if self._serving is not None:
            self.server.shutdown()
        self.server.server_close()
        self.sampler.stop()
        self.series.close()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
