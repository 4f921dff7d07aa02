"""Reading a YAML mapping field by field, each error naming the file and the field path.

`$USER` and environment variables expand in strings; `~` in a path means the home of
the machine that reads it (a remote node's own, for a path used there).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import UgroError

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # a name a shell takes in `export`


class ConfigError(UgroError):
    pass


def expand(value: str) -> str:
    # $USER is often unset (cron, containers, sudo -i); it still means "me".
    user = os.environ.get("USER") or whoami()
    return os.path.expandvars(value.replace("${USER}", user).replace("$USER", user))


def expand_path(value: str, local: bool) -> str:
    # `~` on a remote node means that node's home, which only its shell knows;
    # the command builders expand it there.
    value = expand(value)
    return os.path.expanduser(value) if local else value


class Fields:
    """Reads one mapping, naming the field path in every error."""

    def __init__(self, source: Path, path: str, data: Any):
        self.source, self.path = source, path
        if not isinstance(data, dict):
            self.fail("", "expected a mapping")
        self.data = data

    def fail(self, key: str, why: str):
        where = f"{self.path}.{key}" if key and self.path else key or self.path
        raise ConfigError(f"{self.source}: {where}: {why}" if where else f"{self.source}: {why}")

    def get(self, key: str, kind: type | tuple, default: Any = ..., *, required=False):
        if key not in self.data or self.data[key] is None:
            if required or default is ...:
                self.fail(key, "missing")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(key, f"expected {kinds[0].__name__}, got {value!r}")
        if float in kinds and isinstance(value, int):
            return float(value)
        if not isinstance(value, kinds):
            self.fail(key, f"expected {kinds[0].__name__}, got {value!r}")
        return value

    def string(self, key: str, default: Any = ...) -> str:
        value = self.get(key, (str, int, float), default)
        return value if value is None else expand(str(value))

    def port(self, key: str, default: int) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            self.fail(key, "not a port")
        return value

    def count(self, key: str, default: int, minimum: int = 0) -> int:
        value = self.get(key, int, default)
        if value < minimum:
            self.fail(key, f"must be >= {minimum}")
        return value

    def env(self, key: str) -> dict[str, str]:
        """Environment variables: names as a shell takes them, values made strings."""
        env = self.get(key, dict, {})
        for k, v in env.items():
            if not isinstance(k, str) or not ENV_KEY_RE.match(k):
                self.fail(key, f"not an environment variable name: {k!r}")
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                self.fail(f"{key}.{k}", "expected a string")
        return {k: expand(str(v)) for k, v in env.items()}

    def unknown(self, allowed: set[str]):
        extra = sorted(set(self.data) - allowed)
        if extra:
            self.fail(extra[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")


def whoami() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
