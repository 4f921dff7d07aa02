"""Commands on the cluster's nodes: a `Session` of open connections, reused across a
task's steps; `fan_out` to every node at once; `trust_hosts` to pin their host keys.

Each connection comes from `ugro.transport.connect()`.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from invoke import Context

from . import store
from .config import Cluster, Node
from .transport import connect, describe_failure, fingerprint, known_hosts_name, scan_host_key

T = TypeVar("T")
KEEPALIVE = 5  # seconds between SSH keepalives on every connection


@dataclass
class Answer:
    """What one command on one node gave: its result, or why there was none."""

    node: Node
    stdout: str = ""
    stderr: str = ""
    exited: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.exited == 0


class Session:
    """Open connections to a cluster's nodes, reused across the steps of one task."""

    def __init__(self, cluster: Cluster, timeout: float | None = None):
        self.cluster = cluster
        self.timeout = timeout or cluster.health_timeout
        self._contexts: dict[str, Context] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def context(self, node: Node) -> Context:
        """The node's connection, opened once, with keepalives. One lock per node: a node
        whose sshd hangs while connecting holds up no other node."""
        with self._lock:
            lock = self._locks.setdefault(node.name, threading.Lock())
        with lock:
            cx = self._contexts.get(node.name)
            if cx is None:
                cx = connect(node, self.cluster, self.timeout)
                if not node.local:
                    try:
                        cx.open()
                    except BaseException:
                        cx.close()
                        raise
                    cx.transport.set_keepalive(KEEPALIVE)
                self._contexts[node.name] = cx
            return cx

    def run(self, node: Node, command: str, timeout: float | None = None, **kwargs) -> Answer:
        """Run `command` on `node`; never raises for a node-side failure.

        With a timeout, the answer comes within it (and the connect timeout) even when the
        node's sshd hangs: Invoke times only the command, and paramiko waits without limit
        for a hung sshd to open a channel. Such a connection is dropped, not reused.
        """
        if timeout is None:
            return self._run(node, command, None, kwargs)
        box: list[Answer] = []
        worker = threading.Thread(target=lambda: box.append(
            self._run(node, command, timeout, kwargs)), daemon=True)
        worker.start()
        worker.join(timeout + self.timeout)
        if box:
            return box[0]
        self.forget(node)
        return Answer(node, error=f"{node.name}: no answer within {timeout:g}s")

    def _run(self, node: Node, command: str, timeout: float | None, kwargs: dict) -> Answer:
        kwargs = {"hide": True, "warn": True, "in_stream": False, **kwargs}
        try:
            result = self.context(node).run(command, timeout=timeout, **kwargs)
        except Exception as exc:
            return Answer(node, error=describe_failure(node, exc))
        return Answer(node, result.stdout, result.stderr, result.exited)

    def forget(self, node: Node) -> None:
        """Drop the node's connection (it hung); the next command connects afresh."""
        with self._lock:
            cx = self._contexts.pop(node.name, None)
            self._locks.pop(node.name, None)
        if cx is not None and hasattr(cx, "close"):
            threading.Thread(target=cx.close, daemon=True).start()

    def stream(self, node: Node, command: str, out, err=None) -> Answer:
        """Run `command` on `node`, writing its output to `out` as it comes (its stderr to
        `err`, when given).

        Unlike `run`, nothing is kept in memory: a job's log may be gigabytes
        over a day, and Invoke's runner rescans everything it captured after
        every read (quadratic in the output's size).
        """
        try:
            cx = self.context(node)
            if node.local:
                runner = _streaming_runner(False)(cx)
            else:
                cx.open()
                runner = _streaming_runner(True)(context=cx, inline_env=cx.inline_ssh_env)
            result = runner.run(command, hide=False, warn=True, in_stream=False,
                                out_stream=out, err_stream=out if err is None else err)
        except Exception as exc:
            return Answer(node, error=describe_failure(node, exc))
        return Answer(node, exited=result.exited)

    def run_all(
        self, nodes: Iterable[Node], command: Callable[[Node], str], timeout: float | None = None
    ) -> dict[str, Answer]:
        return fan_out(nodes, lambda n: self.run(n, command(n), timeout=timeout))

    def close(self):
        for cx in list(self._contexts.values()):
            close = getattr(cx, "close", None)
            if close:
                close()
        self._contexts.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@functools.cache
def _streaming_runner(remote: bool):
    """Invoke's local or Fabric's remote runner, streaming in 64 KiB reads without capture."""
    if remote:
        from fabric.runners import Remote as base
    else:
        from invoke.runners import Local as base

    class Streaming(base):
        read_chunk_size = 65536
        # How often the runner looks whether the command ended (Invoke's default, 0.01 s,
        # wakes every stream of a supervisor 100 times a second; the output itself is read
        # as it comes, whatever this is).
        input_sleep = 0.1

        def _handle_output(self, buffer_, hide, output, reader):
            for data in self.read_proc_output(reader):
                if not hide:
                    self.write_our_output(stream=output, string=data)

    return Streaming


def fan_out(nodes: Iterable[Node], fn: Callable[[Node], T]) -> dict[str, T]:
    """Call `fn` for every node at once; results keyed by node name, in node order.

    Not a Fabric ThreadingGroup: each node gets its own command line (its own
    project path and Python), and the local node is no Connection at all.
    """
    nodes = list(nodes)
    if not nodes:
        return {}
    if len(nodes) == 1:
        return {nodes[0].name: fn(nodes[0])}
    with ThreadPoolExecutor(max_workers=min(64, len(nodes))) as pool:
        futures = {n.name: pool.submit(fn, n) for n in nodes}
        return {name: f.result() for name, f in futures.items()}


def trust_hosts(cluster: Cluster, nodes: Iterable[Node], replace: bool = False) -> list[dict]:
    """Pin each node's current host key in known_hosts; report what was pinned.

    A key already known stays; a different key for a known host is refused
    unless `replace` is set, since that is exactly what a man in the middle
    looks like.
    """
    import paramiko

    path = cluster.known_hosts_path
    hostkeys = paramiko.HostKeys()
    if path.is_file():
        hostkeys.load(str(path))
    report = []
    remote = [n for n in nodes if not n.local]

    def scan(node: Node):
        try:
            return scan_host_key(node, cluster.health_timeout)
        except Exception as exc:
            return describe_failure(node, exc)

    scanned = fan_out(remote, scan)
    added, replaced = [], False
    for node in remote:
        key = scanned[node.name]
        name = known_hosts_name(node)
        row = {"node": node.name, "host": name}
        if isinstance(key, str):
            report.append({**row, "key": "-", "fingerprint": "-", "action": f"failed: {key}"})
            continue
        row.update(key=key.get_name(), fingerprint=fingerprint(key))
        known = hostkeys.lookup(name) or {}
        if known.get(key.get_name()) == key:
            report.append({**row, "action": "already trusted"})
            continue
        if known and not replace:
            olds = ", ".join(f"{k} {fingerprint(v)}" for k, v in known.items())
            report.append({**row, "action": f"REFUSED: known_hosts has {olds} (use --replace)"})
            continue
        if known:
            hostkeys.pop(name, None)
            replaced = True
        hostkeys.add(name, key.get_name(), key)
        added.append(f"{name} {key.get_name()} {key.get_base64()}\n")
        report.append({**row, "action": "replaced" if known else "trusted"})
    path.parent.mkdir(parents=True, exist_ok=True)
    if replaced:
        # Rewriting drops the old key; everything else in the file is kept.
        with store.replacing(path) as tmp:
            hostkeys.save(str(tmp))
            os.chmod(tmp, 0o600)
    elif added:
        # Appending leaves the user's own known_hosts lines exactly as they were.
        with path.open("a") as f:
            f.writelines(added)
    return report
