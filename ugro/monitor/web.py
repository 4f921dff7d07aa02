"""The monitor's read-only HTTP server: pages, JSON endpoints, `/metrics`, static files.

Pages (`/`, `/jobs`, `/job/<id>`, `/compare?jobs=a,b`) are one HTML file whose script asks the
JSON endpoints and polls them for live updates; the charts are uPlot, shipped in `static/vendor`.
Off 127.0.0.1 every request needs the token (`?token=`, a `Bearer` header, or the cookie the
first `?token=` visit sets), compared in constant time; without it the answer is 401.
"""

from __future__ import annotations

import hmac
import json
import mimetypes
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import UgroError
from . import dashboard, exporter

STATIC = Path(__file__).parent / "static"
PAGES = ("/", "/jobs", "/compare")
COOKIE = "ugro_monitor_token"


def static_files() -> dict[str, Path]:
    """URL path -> file, for exactly the files shipped (no path from a request reaches disk)."""
    return {"/static/" + p.relative_to(STATIC).as_posix(): p
            for p in STATIC.rglob("*") if p.is_file()}


class MonitorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, app, token: str | None):
        self.app = app  # .series, .data_dir, .interval, .snapshot()
        self.token = token
        self.files = static_files()
        self.metrics = exporter.registry(app.snapshot)
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    server: MonitorServer
    server_version = "ugro-monitor"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # a request log every few seconds per open page would drown the terminal

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        cookie = None
        if self.server.token is not None:
            given = self._token(query)
            if given is None or not hmac.compare_digest(given.encode(),
                                                        self.server.token.encode()):
                return self._send(401, b"401: this monitor needs its token (?token=...)\n",
                                  "text/plain; charset=utf-8")
            if query.get("token"):
                cookie = f"{COOKIE}={given}; Path=/; HttpOnly; SameSite=Strict"
        try:
            self._route(url.path, query, cookie)
        except UgroError as exc:
            self._json({"error": str(exc)}, 404)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _token(self, query: dict) -> str | None:
        if query.get("token"):
            return query["token"]
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[len("Bearer "):].strip()
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return value
        return None

    def _route(self, path: str, query: dict, cookie: str | None) -> None:
        app = self.server.app
        now = time.time()
        if path in PAGES or path.startswith("/job/"):
            return self._file(STATIC / "index.html", cookie)
        if path in self.server.files:
            return self._file(self.server.files[path], cookie)
        if path == "/metrics":
            return self._send(200, exporter.render(self.server.metrics), exporter.CONTENT_TYPE)
        if path == "/api/cluster":
            return self._json(dashboard.cluster(app.snapshot(), app.interval))
        if path == "/api/history":
            seconds = _number(query.get("seconds", "3600"), "seconds")
            return self._json(dashboard.history(app.series, query.get("node", ""), seconds, now))
        if path == "/api/jobs":
            return self._json(dashboard.jobs_view(app.data_dir, app.snapshot()))
        if path.startswith("/api/job/"):
            lines = int(_number(query.get("lines", "50"), "lines"))
            return self._json(dashboard.job_view(app.data_dir, unquote(path[9:]), now, lines))
        if path == "/api/compare":
            wanted = [w.strip() for w in query.get("jobs", "").split(",") if w.strip()]
            return self._json(dashboard.compare_view(app.data_dir, wanted, now))
        self._json({"error": f"no such page: {path}"}, 404)

    def _file(self, path: Path, cookie: str | None) -> None:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        self._send(200, path.read_bytes(), kind, cookie)

    def _json(self, data, code: int = 200) -> None:
        body = json.dumps(data, default=str, allow_nan=False).encode()
        self._send(code, body, "application/json")

    def _send(self, code: int, body: bytes, kind: str, cookie: str | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if cookie:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        self.wfile.write(body)


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UgroError(f"{name}={text!r}: not a number") from None
    if not value > 0 or value == float("inf"):
        raise UgroError(f"{name}={text!r}: expected a positive number")
    return value
